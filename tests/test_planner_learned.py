"""The learned planner: measured pieces, the dataset, the neural cost model, the search."""

import warnings

import numpy as np
import pytest

from jdmt.embeddings.types import Placement, ShardingType, SparseOptimizer, check_plan
from jdmt.planner import collect, neural
from jdmt.planner.cost import AnalyticCostModel, Problem
from jdmt.planner.learned import learned_plan
from jdmt.planner.measure import Bench, Piece, device_pieces, reuse_histogram, zipf_rows
from jdmt.planner.search import PlanningError
from jdmt.planner.tablesets import (
    TableSpec,
    dlrm_pool,
    features_of,
    mlperf_pool,
    pooling_of,
    sample_tables,
    split_pool,
)

# ---- table pools and ids -----------------------------------------------------------------------


def test_dlrm_pool_has_the_stated_shape_and_splits_disjointly():
    pool = dlrm_pool(856, max_rows=10_000_000, seed=3)
    assert len(pool) == 856 and len({t.name for t in pool}) == 856
    assert {t.dim for t in pool} == {16, 32, 64, 128}
    rows = np.array([t.rows for t in pool])
    assert rows.min() >= 1000 and rows.max() <= 10_000_000 and rows.max() > 3_000_000
    pooling = np.array([t.pooling for t in pool])
    assert (pooling == 0).any() and (pooling == 1).mean() > 0.2 and pooling.max() <= 100
    train, test = split_pool(pool, seed=1)
    assert len(train) + len(test) == 856 and not {t.name for t in train} & {t.name for t in test}
    assert len(mlperf_pool()) == 26
    tasks = sample_tables(train, 500, np.random.default_rng(0))
    assert [t.name for t in tasks] == [f"t{i}" for i in range(500)]


def test_zipf_rows_stay_in_range_and_skew_with_alpha():
    rng = np.random.default_rng(0)
    for rows in (1, 7, 1000, 10_000_000):
        ids = zipf_rows(rows, 1.1, 5000, rng)
        assert ids.min() >= 0 and ids.max() < rows
    flat = zipf_rows(100_000, 0.0, 20_000, rng)
    hot = zipf_rows(100_000, 1.3, 20_000, rng)
    assert np.unique(hot).size < 0.5 * np.unique(flat).size


def test_reuse_histogram_counts_lookups_by_reuse():
    # row 5 once, row 1 twice, row 2 four times, and -1 ignored
    h = reuse_histogram(np.array([5, 1, 1, 2, 2, 2, 2, -1]))
    assert h.shape == (17,) and h.sum() == pytest.approx(1.0)
    assert h[0] == pytest.approx(1 / 7) and h[1] == pytest.approx(2 / 7) and h[2] == pytest.approx(4 / 7)
    # a sample of a 4x larger stream: each count is scaled before binning
    assert reuse_histogram(np.array([3, 3]), scale=4.0)[3] == pytest.approx(1.0)
    assert not reuse_histogram(np.array([-1])).any()


def test_piece_ids_have_the_mean_pooling_and_padding():
    p = Piece(rows=500, width=8, bags=4000, pooling=6.0, alpha=1.0, seed=2)
    ids = p.draw()
    assert ids.shape == (4000, 11)
    valid = ids >= 0
    assert valid.sum(1).min() >= 1 and abs(valid.sum(1).mean() - 6.0) < 0.3
    assert ids[valid].max() < 500
    # padding only after a bag's ids
    assert (np.diff(valid.astype(int), axis=1) <= 0).all()
    assert (Piece(10, 8, 3, 1.0).draw() >= 0).all()
    assert (p.draw() == ids).all()  # deterministic


# ---- measurement -------------------------------------------------------------------------------


def test_bench_runs_the_library_update_on_the_touched_rows_only():
    bench = Bench(SparseOptimizer(), iters=1, max_bytes=1 << 22)
    pieces = [Piece(300, 16, 64, 3.0, 1.0, 1), Piece(200, 16, 32, 1.0, 0.5, 2), Piece(100, 32, 16, 2.0, 1.0, 3)]
    s = bench.run(pieces)
    assert s > 0
    progs = {w: (blocks, rows, bag) for w, blocks, rows, bag in bench.programs(pieces)}
    assert set(progs) == {16, 32}
    (one, five), rows, bag = progs[16]  # a block per pooling bucket: 1 and 8 ids per bag
    assert one.shape == (32, 1) and five.shape == (64, 8)
    assert (one >= 300).all() and one.max() < 500  # the second piece's rows follow the first's
    assert five.max() < 300 and (five[:, 5:] == -1).all()
    n = (one >= 0).sum() + (five >= 0).sum()
    assert rows.shape == (256,) and (rows[:n] >= 0).all() and (rows[n:] == -1).all()
    assert (rows[:32] == one[:, 0]).all() and (bag[:32] == np.arange(32)).all()  # ids meet their bag
    assert bag[32] == 32 and rows[32] == five[0, 0]
    table, accum = bench._buffers[16]
    table = np.asarray(table)
    touched = np.zeros(table.shape[0], bool)
    touched[rows[rows >= 0]] = True
    assert np.abs(table[touched]).min() > 0  # every touched row moved (gradients are positive)
    assert not table[~touched].any()  # and nothing else
    assert bench.run([Piece(10, 8, 0, 0.0)]) == 0.0
    with pytest.raises(ValueError, match="over this bench"):
        bench.programs([Piece(1 << 20, 16, 8, 1.0)])


def test_device_pieces_follow_the_routes():
    t = [TableSpec("a", 1000, 32, 4.0), TableSpec("b", 800, 16, 1.0), TableSpec("c", 64, 16, 2.0),
         TableSpec("z", 100, 16, 0.0)]
    plan = {"a": Placement(ShardingType.COLUMN_WISE, (1, 3)), "b": Placement(ShardingType.TABLE_WISE, (2,)),
            "c": Placement(ShardingType.ROW_WISE, tuple(range(8))), "z": Placement(ShardingType.TABLE_WISE, (0,))}
    pieces = device_pieces(t, plan, 2, 4, 256)
    assert [len(p) for p in pieces] == [1, 2, 2, 2, 1, 1, 1, 1]
    a = pieces[1][0]
    assert (a.rows, a.width, a.bags, a.pooling) == (1000, 16, 256, 4.0) and pieces[3][0] == a
    b = pieces[2][0]  # one-id bags: each device's distinct rows, pooling 1
    assert b.width == 16 and b.pooling == 1.0 and 8 <= b.bags <= 256
    c = pieces[0][0]  # a row-wise shard: 8 rows, the two hosts' distinct rows that live there
    assert c.rows == 8 and c.pooling == 1.0 and 1 <= c.bags <= 2 * 8
    with pytest.raises(ValueError, match="no measured pieces"):
        device_pieces(t[:1], {"a": Placement(ShardingType.FLEXSHARD, tuple(range(8)))}, 2, 4, 256)


# ---- dataset and cost model --------------------------------------------------------------------


def test_collect_writes_a_dataset_that_loads_back(tmp_path):
    sets, seconds, meta = collect.collect(4, max_tables=3, global_batch=64, max_bytes=1 << 22,
                                          pool_rows=20_000, iters=1, progress=False)
    assert len(sets) == 4 and all(1 <= len(s) <= 3 for s in sets) and (seconds > 0).all()
    assert meta["backend"].startswith("cpu") and meta["kernel"] in ("cpu-ffi", "xla")
    collect.save(tmp_path / "d.npz", sets, seconds, meta)
    sets2, seconds2, meta2 = collect.load(tmp_path / "d.npz")
    assert sets2 == sets and (seconds2 == seconds).all() and meta2 == meta


def _synthetic_sets(n, rng):
    """Sets whose 'seconds' follow a known non-additive law of the pieces."""
    sets, secs = [], []
    for _ in range(n):
        s = [Piece(int(rng.integers(1000, 100_000)), int(rng.choice([16, 64])), int(rng.integers(64, 2048)),
                   float(rng.choice([1.0, 4.0, 16.0])), 1.0, int(rng.integers(1 << 20)))
             for _ in range(int(rng.integers(1, 6)))]
        work = sum(p.ids * p.width for p in s)
        rows = sum(p.rows * p.width for p in s)
        sets.append(s)
        secs.append(1e-9 * work * (1 + 0.5 * np.log10(rows)))
    return sets, np.array(secs)


def test_neural_cost_model_learns_a_set_law_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    sets, secs = _synthetic_sets(400, rng)
    model, report = neural.fit_and_evaluate(sets, secs, backend="test:cpu", steps=1500, test_fraction=0.25)
    assert report["cost_model_mape"] < 0.15 and report["cost_model_spearman"] > 0.95
    assert model.meta["heldout"] == report
    model.save(tmp_path / "m.npz")
    with pytest.warns(UserWarning, match="fitted on test:cpu"):
        back = neural.NeuralCostModel.load(tmp_path / "m.npz")
    assert np.allclose(back.predict_sets(sets[:5]), model.predict_sets(sets[:5]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neural.NeuralCostModel.load(tmp_path / "m.npz", backend="test:cpu")
    # the analytic model's scale fits its bandwidth to the data
    ana = neural.analytic_seconds(sets)
    assert neural.calibrate(ana, 3 * ana) == pytest.approx(3.0)
    assert neural.spearman(np.arange(5.0), np.arange(5.0) ** 2) == pytest.approx(1.0)
    assert neural.mape(np.array([1.1, 0.9]), np.array([1.0, 1.0])) == pytest.approx(0.1)


# ---- the search --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    sets, secs = _synthetic_sets(200, np.random.default_rng(1))
    model, _ = neural.fit_and_evaluate(sets, secs, backend="test:cpu", steps=300)
    return model


def test_learned_plan_places_every_table_within_the_spmd_budget(small_model):
    tables = sample_tables(dlrm_pool(200, max_rows=200_000, seed=1), 40, np.random.default_rng(2))
    opt = SparseOptimizer()
    total = sum(t.rows * (4 * t.dim + 4) for t in tables)
    budget = 1.5 * total / 8
    plan, info = learned_plan(tables, 2, 4, 512, small_model, memory_budget=budget, optimizer=opt)
    assert list(plan) == [t.name for t in tables]
    check_plan(features_of(tables), plan, 8, 4)
    pr = Problem(features_of(tables), 2, 4, 512, optimizer=opt, memory_budget=budget, pooling=pooling_of(tables))
    cost = AnalyticCostModel().evaluate(pr, plan)
    assert cost.peak_memory <= budget  # jdmt's own allocation rule, not a looser one
    assert info["peak_memory_bytes"] == pytest.approx(cost.peak_memory, rel=0.02)
    assert info["plan_s"] < 30 and info["predicted_step_s"] > 0
    again, _ = learned_plan(tables, 2, 4, 512, small_model, memory_budget=budget, optimizer=opt,
                            time_limit=1e9)
    assert again == learned_plan(tables, 2, 4, 512, small_model, memory_budget=budget, optimizer=opt,
                                 time_limit=1e9)[0]  # deterministic


def test_learned_plan_splits_what_fits_no_device_and_says_when_nothing_fits(small_model):
    big = TableSpec("big", 100_000, 64, 3.0)
    small = [TableSpec(f"s{i}", 2000, 16, 2.0) for i in range(6)]
    budget = 0.5 * big.rows * (4 * 64 + 4)
    plan, _ = learned_plan([big, *small], 1, 8, 256, small_model, memory_budget=budget)
    assert plan["big"].type in (ShardingType.ROW_WISE, ShardingType.COLUMN_WISE)
    with pytest.raises(PlanningError, match="fits nowhere"):
        learned_plan([big], 1, 8, 256, small_model, memory_budget=1000.0)


def test_learned_plan_is_never_predicted_worse_than_a_start(small_model):
    tables = sample_tables(dlrm_pool(100, max_rows=100_000, seed=4), 24, np.random.default_rng(5))
    budget = 2.0 * sum(t.rows * (4 * t.dim + 4) for t in tables) / 8
    pr = Problem(features_of(tables), 2, 4, 512, memory_budget=budget, pooling=pooling_of(tables))
    from jdmt.planner.search import BASELINE_WEIGHTS, greedy_table_wise

    starts = {k: greedy_table_wise(pr, w) for k, w in BASELINE_WEIGHTS.items()}
    starts["odd"] = {t.name: Placement(ShardingType.COLUMN_WISE, (0, 1, 2)) for t in tables}  # no 3-way splits
    plan, info = learned_plan(tables, 2, 4, 512, small_model, memory_budget=budget, starts=starts,
                              time_limit=1e9)
    assert "odd" not in info["starts"] and set(BASELINE_WEIGHTS) <= set(info["starts"]) | {"greedy"}
    for name, r in info["starts"].items():
        if isinstance(r, dict):
            assert info["predicted_step_s"] <= r["predicted_s"] * (1 + 1e-6)
            assert r["improved_s"] <= r["predicted_s"] * (1 + 1e-6)
    assert info["start"] in info["starts"]


def test_planner_command_plans_with_a_cost_model(small_model, tmp_path, capsys):
    from jdmt.planner import PlanFile
    from jdmt.planner.__main__ import main

    small_model.save(tmp_path / "m.npz")
    out = tmp_path / "plan.json"
    with pytest.warns(UserWarning, match="fitted on test:cpu"):
        rc = main(["--features", "synthetic", "--mesh", "2x4", "--global-batch", "512",
                   "--cost-model", str(tmp_path / "m.npz"), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "learned planner" in text and "predicted embedding step" in text
    loaded = PlanFile.read(out)
    assert len(loaded.placements) == 26 and loaded.report["search"]["planner"] == "learned"
    with pytest.warns(UserWarning):
        rc = main(["--features", "synthetic", "--sequence-features", "1", "--mesh", "2x4",
                   "--global-batch", "512", "--cost-model", str(tmp_path / "m.npz")])
    assert rc == 1 and "does not model sequence features" in capsys.readouterr().err


def test_trainer_plans_with_a_cost_model(small_model, mesh24, tmp_path, capsys):
    """`train.py --sharding=auto --cost-model=PATH`: the learned planner's plan
    is the one the embeddings use, said at start-up; sequence features and
    another sharding are refused."""
    from jdmt.data.specs import FeatureSet, SparseFeature
    from jdmt.train import Trainer, TrainConfig

    small_model.save(tmp_path / "m.npz")
    feats = FeatureSet(tuple(SparseFeature(f"f{i}", 50 + 40 * i, 8, 1 + i % 3) for i in range(5)), num_dense=2)
    base = dict(features=feats, embedding_dim=8, steps=1, global_batch=64, eval_batches=1,
                bottom_mlp=(8,), top_mlp=(8,), progress=False, cost_model=str(tmp_path / "m.npz"))
    with pytest.warns(UserWarning, match="fitted on test:cpu"):
        tr = Trainer(TrainConfig(**base, sharding="auto"), mesh24)
    assert tr.plan.stats["planner"] == "learned" and tr.emb.plan == tr.plan.placements
    err = capsys.readouterr().err
    assert "learned planner" in err and tr.plan.table() in err
    seq = FeatureSet((*feats.sparse, SparseFeature("s", 30, 8, 4, kind="sequence")), num_dense=2)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="does not model sequence features"):
        Trainer(TrainConfig(**{**base, "features": seq}, sharding="auto"), mesh24)
    with pytest.raises(ValueError, match="needs sharding='auto'"):
        TrainConfig(**base, sharding="row_wise")


def test_learned_planner_moves_comm_by_the_mesh_symmetry(small_model):
    """The search computes a table's communication for owner 0 (host 0) and
    moves it to any owner (host): it must equal the analytic model's for
    that owner."""
    from jdmt.planner.learned import LearnedPlanner

    lp = LearnedPlanner(small_model, 2, 4, 256, memory_budget=1e12)
    for t in (TableSpec("x", 5000, 32, 6.0), TableSpec("y", 3000, 16, 1.0)):
        base = lp._comm(t, Placement(ShardingType.TABLE_WISE, (0,)), t.dim)
        for d in range(8):
            direct = lp._comm(t, Placement(ShardingType.TABLE_WISE, (d,)), t.dim)
            assert np.allclose(base[lp.perm[d]], direct, rtol=1e-9, atol=0), (t.name, d)
        host0 = lp._comm(t, Placement(ShardingType.TABLE_ROW_WISE, (0, 1, 2, 3)), t.dim)
        host1 = lp._comm(t, Placement(ShardingType.TABLE_ROW_WISE, (4, 5, 6, 7)), t.dim)
        assert np.allclose(host0[lp.perm[4]], host1, rtol=1e-9, atol=0)
        assert base.max() > 0
