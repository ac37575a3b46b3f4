"""The planner's user view: `Plan.table()`, plan files (`PlanFile`, `train.py
--plan=PATH`) and `python -m jdmt.planner`."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from jdmt.data.presets import synthetic_default_features
from jdmt.data.specs import FeatureSet, SparseFeature
from jdmt.data.synthetic import SyntheticData
from jdmt.embeddings import Placement, ShardingType, SparseOptimizer
from jdmt.planner import PlanFile, PlanFileError, auto_plan, pooling_from_fraction
from jdmt.planner import __main__ as cli
from jdmt.planner.search import _devices_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FEATS = FeatureSet(
    (
        SparseFeature("a", 50, 8, 3, combiner="mean"),
        SparseFeature("b", 37, 8, 2),
        SparseFeature("c", 5, 8, 1),
        SparseFeature("d", 23, 8, 4, combiner="mean"),
        SparseFeature("e", 4000, 8, 2, hashed=True),
    ),
    num_dense=3,
)


@pytest.fixture(scope="module")
def plan():
    return auto_plan(FEATS, 2, 4, 64)


def test_table_has_a_row_per_table_and_the_footer(plan):
    lines = plan.table().splitlines()
    assert lines[0].split() == ["table", "type", "devices", "rows", "dim", "alone", "share"]
    rows, footer = lines[1:-1], lines[-1]
    assert [r.split()[0] for r in rows] == list(FEATS.names)
    for r, (name, p) in zip(rows, plan.placements.items()):
        cells = r.split()
        assert cells[1] == p.type.value
        assert " ".join(cells[2:-5]) == _devices_text(p, 4)
        assert cells[-5:-3] == [f"{FEATS[name].rows:,}", str(FEATS[name].dim)]
    shares = [float(r.split()[-1].rstrip("%")) for r in rows]
    assert sum(shares) == pytest.approx(100, abs=0.1 * len(rows))
    best, cost = plan.best_baseline()
    assert footer.startswith("est. embedding step ") and f"best baseline {best} " in footer
    assert f"({cost.step_s / plan.cost.step_s:.2f}x the plan's)" in footer


def test_devices_in_short():
    tw = lambda *d: Placement(ShardingType.TABLE_WISE if len(d) == 1 else ShardingType.COLUMN_WISE, d)  # noqa: E731
    assert _devices_text(tw(3), 4) == "3"
    assert _devices_text(Placement(ShardingType.ROW_WISE, range(8)), 4) == "0-7"
    assert _devices_text(tw(5, 0, 2, 6), 4) == "0,2,5-6"
    assert _devices_text(Placement(ShardingType.TABLE_ROW_WISE, (4, 5, 6, 7)), 4) == "host 1"


def test_plan_file_round_trips(plan, tmp_path):
    path = tmp_path / "plan.json"
    PlanFile.from_plan(plan).write(path)
    back = PlanFile.read(path)
    assert back == PlanFile.from_plan(plan) and back.placements == plan.placements
    assert back.source == f"plan {path}"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # the temporary file renamed
    obj = json.loads(path.read_text())
    assert (obj["format"], obj["mesh"], obj["global_batch"]) == (1, "2x4", 64)
    assert obj["report"]["step_s"] == plan.cost.step_s
    back.check(FEATS, 2, 4)
    # flexshard tiers survive; a plan without a report has no budget
    tiers = dict(plan.placements, e=Placement(ShardingType.FLEXSHARD, range(8), hot=(1, 7), warm=(3,)))
    PlanFile(tiers, 2, 4, 64).write(path)
    assert PlanFile.read(path).placements == tiers and PlanFile.read(path).memory_budget is None


def _bad(plan, **changes):
    return dataclasses.replace(PlanFile.from_plan(plan), **changes)


def test_plan_file_errors_name_the_cause(plan):
    pf = PlanFile.from_plan(plan)
    fewer = FeatureSet(FEATS.sparse[1:], num_dense=3)
    with pytest.raises(PlanFileError, match=r"places tables this model does not have: \['a'\]"):
        pf.check(fewer, 2, 4)
    more = FeatureSet(FEATS.sparse + (SparseFeature("z", 10, 8, 1),), num_dense=3)
    with pytest.raises(PlanFileError, match=r"misses tables of this model: \['z'\]"):
        pf.check(more, 2, 4)
    with pytest.raises(PlanFileError, match="made for mesh 2x4; this run's mesh is 1x8"):
        pf.check(FEATS, 1, 8)
    two = _bad(plan, placements=dict(plan.placements, c=Placement(ShardingType.TABLE_WISE, (0, 1))))
    with pytest.raises(PlanFileError, match="invalid on mesh 2x4: feature 'c': table-wise needs exactly one"):
        two.check(FEATS, 2, 4)
    with pytest.raises(PlanFileError, match="over the memory budget of"):
        pf.check(FEATS, 2, 4, memory_budget=1000.0)
    # the budget the planner was given: plain Adagrad's state (D floats a row) does not fit
    # a plan made to the byte for row-wise Adagrad
    need = plan.cost.peak_memory
    tight = auto_plan(FEATS, 2, 4, 64, memory_budget=need * 1.01)
    PlanFile.from_plan(tight).check(FEATS, 2, 4)
    with pytest.raises(PlanFileError, match=r"GiB per device for the tables and their adagrad state"):
        PlanFile.from_plan(tight).check(FEATS, 2, 4, SparseOptimizer(kind="adagrad"))


@pytest.mark.parametrize("edit, named", [
    (lambda o: "not json", "is not JSON"),
    (lambda o: [o], "expected a JSON object"),
    (lambda o: {**o, "format": 2}, "format 2 is not one this version reads"),
    (lambda o: {**o, "mesh": "2by4"}, "malformed mesh spec '2by4'"),
    (lambda o: {**o, "global_batch": 0}, "'global_batch' must be a positive integer"),
    (lambda o: {**o, "placements": {"a": {"type": "diagonal", "devices": [0]}}}, "table 'a': bad placement"),
    (lambda o: {**o, "placements": {"a": {"type": "table_wise"}}}, "table 'a': placement .* has no 'devices'"),
])
def test_malformed_plan_files_are_named(plan, tmp_path, edit, named):
    path = tmp_path / "plan.json"
    obj = edit(PlanFile.from_plan(plan).to_json())
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    with pytest.raises(PlanFileError, match=f"plan {path}.*{named}"):
        PlanFile.read(path)


def test_differences_are_noted_not_refused(plan):
    pf = PlanFile.from_plan(plan)
    assert pf.differences(FEATS, 64) == []
    resized = FeatureSet((dataclasses.replace(FEATS.sparse[0], rows=60),) + FEATS.sparse[1:], num_dense=3)
    pf.check(resized, 2, 4)
    assert pf.differences(resized, 128) == ["global batch 64 (this run: 128)",
                                            "tables of other sizes: a 50x8"]


def test_cli_plans_as_train_py_would():
    """`--sharding=auto` plans with the synthetic data's mean bag size."""
    assert SyntheticData(FEATS).mean_len_frac == cli.MEAN_LEN_FRAC


def test_cli_rejects_bad_flags(capsys):
    for args, named in ((["--mesh", "8by8"], "malformed mesh spec '8by8'"),
                        (["--mesh", "0x8"], "'0x8'"),
                        (["--mesh", "2x4", "--global-batch", "60"], "not divisible by the 8 devices"),
                        (["--mesh", "2x4", "--memory-budget-gib", "-1"], "--memory-budget-gib"),
                        (["--mesh", "2x4", "--features", "mlperf", "--sequence-features", "2"],
                         "synthetic set only"),
                        (["--mesh", "2x4", "--out", "/no/such/dir/plan.json"],
                         "--out /no/such/dir/plan.json: its directory does not exist")):
        with pytest.raises(SystemExit) as e:
            cli.main(["--global-batch", "64", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and named in err[0], err
    assert cli.main(["--mesh", "2x4", "--global-batch", "64", "--memory-budget-gib", "1e-6"]) == 1
    assert "does not fit" in capsys.readouterr().err


def test_train_py_plan_flag_names_a_path_it_cannot_write(capsys):
    from jdmt.cli.train import build_parser

    for arg, named in (("--plan=/no/such/dir/plan.json", "its directory, where it would be written"),
                       ("--plan=", "argument --plan: needs a file path")):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([arg])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and named in err[0], err


def test_python_m_jdmt_planner_writes_a_plan_that_loads(tmp_path):
    out = tmp_path / "plan.json"
    r = subprocess.run(
        [sys.executable, "-m", "jdmt.planner", "--features", "synthetic", "--mesh", "2x4",
         "--global-batch", "64", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    feats = synthetic_default_features()
    assert lines[0].startswith("auto plan 2x4: est. embedding step")
    assert [ln.split()[0] for ln in lines[2:2 + 26]] == list(feats.names)
    assert lines[-1] == f"wrote {out}"
    assert lines[2 + 26].startswith("est. embedding step")
    trim = lines[2 + 27 : -1]  # the memory trim's line, where it moved tables
    assert all(ln.startswith("memory trim: allocated ") for ln in trim) and len(trim) <= 1
    pf = PlanFile.read(out)
    pf.check(feats, 2, 4)
    assert pf.global_batch == 64 and pf.report["problem"]["pooling"] == pooling_from_fraction(
        feats, cli.MEAN_LEN_FRAC)


def test_train_py_plan_writes_then_loads(mesh24, tmp_path, capsys):
    """One run writes the plan it uses (here the planner's), the next loads it;
    a plan for another mesh is refused before anything trains."""
    from jdmt.mesh import make_mesh
    from jdmt.train import Trainer, TrainConfig

    path = str(tmp_path / "plan.json")
    base = dict(features=FEATS, embedding_dim=8, steps=1, global_batch=64, eval_batches=1,
                bottom_mlp=(8,), top_mlp=(8,), progress=False, plan=path)
    first = Trainer(TrainConfig(**base, sharding="auto"), mesh24)
    assert not first.plan_loaded and os.path.exists(path)
    written = PlanFile.read(path)
    assert written.placements == first.emb.plan == first.plan.placements
    assert written.report["step_s"] == first.plan.cost.step_s
    err = capsys.readouterr().err
    assert first.plan.table() in err and f"jdmt: wrote the plan to {path}" in err

    second = Trainer(TrainConfig(**base, sharding="table_wise"), mesh24)
    assert second.plan_loaded and second.plan is None and second.emb.plan == written.placements
    assert f"flat plan from {path} (" in second.path_line()

    with pytest.raises(PlanFileError, match="made for mesh 2x4; this run's mesh is 1x8"):
        Trainer(TrainConfig(**base), make_mesh("1x8"))
    with pytest.raises(ValueError, match="towers place their own tables"):
        TrainConfig(**{**base, "features": None}, towers=2)


def test_train_py_loads_a_plan_file(tmp_path):
    """`train.py --plan=PATH`: a 1-step run on the loaded plan, reported as such."""
    path = tmp_path / "plan.json"  # for the uniform set of 3 tables, cat_0 .. cat_2
    placements = {"cat_0": Placement(ShardingType.TABLE_WISE, (5,)),
                  "cat_1": Placement(ShardingType.ROW_WISE, range(8)),
                  "cat_2": Placement(ShardingType.TABLE_ROW_WISE, (4, 5, 6, 7))}
    PlanFile(placements, 2, 4, 64).write(path)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--mesh=2x4", "--num-tables=3",
         "--rows-per-table=40", "--pooling=2", "--embedding-dim=4", "--steps=1", "--batch-size=64",
         "--eval-batches=1", "--bottom-mlp=8", "--top-mlp=8", "--no-progress", f"--plan={path}"],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert r.returncode == 0, r.stderr
    assert f"flat plan from {path} (1 table_wise, 1 row_wise, 1 table_row_wise)" in r.stderr
    assert f"flat plan from {path}, " in r.stdout
    assert PlanFile.read(path).placements == placements  # read, not rewritten
