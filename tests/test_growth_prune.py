"""Alternate growth and pruning of the dense network: schedules, the importance
criterion, physically smaller phases, function-preserving growth, checkpoints."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdmt.models.dcn import DCN, init_dcn
from jdmt.models.dlrm import DLRM, init_dlrm
from jdmt.towers.modules import TowerModule, init_stacked
from jdmt.train import TrainConfig, Trainer, train_and_evaluate
from jdmt.train import growth_prune as gp
from jdmt.train.checkpoint import Checkpointer
from jdmt.train.schedule import dense_optimizer, lr_scale

FLAGS = dict(num_tables=6, rows_per_table=1000, pooling=4, embedding_dim=8, global_batch=256,
             eval_batches=2, bottom_mlp=(16,), top_mlp=(32, 16), progress=False)


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**FLAGS, **kw})


# ---- schedules ----------------------------------------------------------------------------

def test_schedule_in_steps_and_percent():
    ph = gp.parse_schedule("dense:200,prune0.5:400,grow:300,prune0.25:300,grow:300", 1500)
    assert [(p.kind, p.fraction, p.start, p.steps) for p in ph] == [
        ("dense", 0, 0, 200), ("prune", 0.5, 200, 400), ("grow", 0, 600, 300),
        ("prune", 0.25, 900, 300), ("grow", 0, 1200, 300)]
    ph = gp.parse_schedule("dense:10%,prune0.7:60%,grow:30%", 1001)
    assert sum(p.steps for p in ph) == 1001 and ph[1].steps == 601
    for steps in (1, 2, 3, 4, 5, 7, 100, 1500, 12345):  # the preset fits any run
        ph = gp.parse_schedule("default", steps)
        assert sum(p.steps for p in ph) == steps and not ph[-1].pruned
        assert all(p.steps >= 1 for p in ph) and (steps == 1 or any(p.pruned for p in ph))
    assert gp.phase_index(ph, 0) == 0 and gp.phase_index(ph, 12344) == len(ph) - 1


@pytest.mark.parametrize("text,steps,match", [
    ("", 10, "empty"),
    ("dense:5,shrink:5", 10, "not KIND:STEPS"),
    ("dense:5,prune1.5:3,grow:2", 10, r"in \(0, 1\)"),
    ("dense:5,prune0:3,grow:2", 10, r"in \(0, 1\)"),
    ("dense:5,prune0.5:3,grow:3", 10, "add up to 11 steps"),
    ("dense:50%,prune0.5:30%,grow:30%", 10, "110%"),
    ("dense:5,prune0.5:50%", 10, "mixes"),
    ("dense:5,prune0.5:5", 10, "ends pruned"),
    ("dense:5,grow:5", 10, "follows a prune phase"),
    ("prune0.5:5,dense:5", 10, "write grow:N"),
    ("prune0.5:5,prune0.2:3,grow:2", 10, "grow first"),
    ("dense:50%,prune0.5:1%,grow:49%", 2, "more than the run's 2 steps"),
    ("dense", 10, "not KIND:STEPS"),
])
def test_bad_schedules_say_why(text, steps, match):
    with pytest.raises(gp.ScheduleError, match=match):
        gp.parse_schedule(text, steps)
    with pytest.raises(ValueError, match=match):
        config(steps=steps, growth_prune=text)


# ---- the criterion and the state transforms -----------------------------------------------

def _dlrm():
    m = DLRM(8, bottom=(16, 12), top=(32, 16))
    return m, init_dlrm(m, 0, 5, 4)


def test_importance_is_the_product_of_weight_norms_and_idle_units_go_first():
    m, p = _dlrm()
    p = jax.tree.map(np.array, p)  # writable host copies
    groups = {g.name: g for g in gp.unit_groups(m)}
    assert set(groups) == {"bottom/0", "bottom/1", "top/0", "top/1"}
    g = groups["top/0"]
    imp = gp.importance(p, g)
    k, b, nxt = p["top"]["dense_0"]["kernel"], p["top"]["dense_0"]["bias"], p["top"]["dense_1"]["kernel"]
    want = np.sqrt((k ** 2).sum(0) + b ** 2) * np.sqrt((nxt ** 2).sum(1))
    np.testing.assert_allclose(imp, want, rtol=1e-6)
    # Units 3 and 7 feed nothing: they go first, whatever their incoming weights.
    p["top"]["dense_1"]["kernel"][[3, 7]] = 0.0
    p["top"]["dense_0"]["kernel"][:, [3, 7]] *= 100.0
    keep = gp.select(p, [g], 1 - 30 / 32)  # keep 30 of 32
    assert keep["top/0"].tolist() == [i for i in range(32) if i not in (3, 7)]
    assert gp.kept_count(32, 0.5) == 16 and gp.kept_count(3, 0.9) == 1


def _step(model, tx, params, opt, x, e):
    @jax.jit
    def step(params, opt):
        g = jax.grad(lambda q: jnp.sum(jnp.sin(model.apply({"params": q}, x, e))))(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt

    return step(params, opt)


def _jitted(tx, groups, keep):
    """gather, scatter and grow jitted (as the trainer runs them): op by op they are slow."""
    return (jax.jit(lambda p, o: gp.gather(tx, p, o, groups, keep)),
            jax.jit(lambda f, s_: gp.scatter(tx, f, s_, groups, keep)),
            jax.jit(lambda p, o: gp.grow(tx, p, o, groups, keep)))


@pytest.mark.parametrize("kind,optimizer", [("dlrm", "adam"), ("dcn", "adagrad")])
def test_pruned_phase_is_smaller_and_growth_preserves_the_function(kind, optimizer):
    if kind == "dlrm":
        m, p = _dlrm()
    else:
        m = DCN(8, bottom=(16,), top=(24,), cross_layers=2, low_rank=10)
        p = init_dcn(m, 0, 5, 4)
    tx = dense_optimizer(optimizer, 0.01, lr_scale("dlrm", (2, 6, 4), 0.01), clip_norm=1.0)
    o = tx.init(p)
    x = jax.random.normal(jax.random.key(1), (32, 5))
    e = jax.random.normal(jax.random.key(2), (32, 4, 8))
    for _ in range(2):
        p, o = _step(m, tx, p, o, x, e)
    groups = gp.unit_groups(m)
    keep = gp.select(jax.device_get(p), groups, 0.5)
    gather, scatter, grow = _jitted(tx, groups, keep)
    sp, so = gather(p, o)
    small = gp.pruned_model(m, groups, keep)
    # Physically smaller: every pruned weight has half the units.
    for g in groups:
        for path, ax in g.incoming + g.outgoing:
            a = gp._get(sp, path)
            assert a.shape[ax] == gp.kept_count(g.size, 0.5) < gp._get(p, path).shape[ax]
    for _ in range(3):
        sp, so = _step(small, tx, sp, so, x, e)
    fp, fo = scatter((p, o), (sp, so))
    # Scatter then gather gives the pruned phase's state back exactly.
    for a, b in zip(jax.tree.leaves(gather(fp, fo)), jax.tree.leaves((sp, so))):
        np.testing.assert_array_equal(a, b)
    gp_, go = grow(fp, fo)
    # The grown model is the pruned function (the loss does not jump at the boundary).
    np.testing.assert_allclose(m.apply({"params": gp_}, x, e), small.apply({"params": sp}, x, e),
                               rtol=1e-5, atol=1e-5)
    # Kept units keep weights and optimizer state exactly; a returning unit's outgoing
    # weights are zero.
    for a, b in zip(jax.tree.leaves(gather(gp_, go)), jax.tree.leaves((sp, so))):
        np.testing.assert_array_equal(a, b)
    g = groups[0]
    gone = np.setdiff1d(np.arange(g.size), keep[g.name])
    out_path, out_ax = g.outgoing[0]
    host = lambda tree, path: np.asarray(gp._get(tree, path))  # noqa: E731
    assert not np.any(np.take(host(gp_, out_path), gone, axis=out_ax))
    in_path, in_ax = g.incoming[0]
    np.testing.assert_array_equal(np.take(host(gp_, in_path), gone, axis=in_ax),
                                  np.take(host(p, in_path), gone, axis=in_ax))  # as they left
    # Its first moments start as a new parameter's (zero); its second-moment
    # estimates (adam's nu, adagrad's sum_of_squares) are those it left with.
    def moments(tree):
        return {tuple(str(k) for k in path): np.take(np.asarray(leaf), gone, axis=in_ax)
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
                if tuple(getattr(k, "key", None) for k in path[-len(in_path):]) == in_path}

    grown, before = moments(go), moments(fo)
    second = {k for k in grown if any(n in "".join(k) for n in ("nu", "sum_of_squares"))}
    first = set(grown) - second
    assert second and len(first) == (1 if optimizer == "adam" else 0)
    for k in second:
        np.testing.assert_array_equal(grown[k], before[k])
        assert np.all(before[k] > 0)  # the check can fail: not an initial value
    for k in first:
        assert not np.any(grown[k]) and np.any(before[k])
    counts = [np.asarray(c) for c in jax.tree.leaves(go) if np.ndim(c) == 0]
    assert counts and all(int(c) == 5 for c in counts)  # 2 full + 3 pruned steps, shared


@pytest.mark.parametrize("kind", ["mlp", "dcn"])
def test_tower_modules_prune_per_tower(kind):
    mod = TowerModule(kind, 12, cross_layers=2, low_rank=6, hidden=10)
    slots = jnp.array([[0, 1], [2, -1]], jnp.int32)  # 2 hosts, at most 2 towers each
    tp = init_stacked(mod, 0, slots, 3, 4)
    groups = gp.unit_groups(DLRM(4, bottom=(8,), top=(8,)), mod, (2, 2))
    tgroups = [g for g in groups if g.name.startswith("towers/")]
    assert [g.name for g in tgroups] == (["towers/hidden"] if kind == "mlp" else ["towers/cross_0", "towers/cross_1"])
    params = {"model": init_dlrm(DLRM(4, bottom=(8,), top=(8,)), 0, 3, 2), "towers": tp, "adapter": {}}
    keep = gp.select(jax.device_get(params), groups, 0.5)
    assert keep[tgroups[0].name].shape == (2, 2, (10 if kind == "mlp" else 6) // 2)
    tx = optax.adam(0.01)
    o = tx.init(params)
    gather, _, grow = _jitted(tx, groups, keep)
    sp, so = gather(params, o)
    small = gp.pruned_tower_module(mod, keep)
    x = jax.random.normal(jax.random.key(0), (5, 3, 4))
    grown, _ = grow(params, o)
    outs = []
    for h in range(2):
        for t in range(2):
            y = small.apply({"params": jax.tree.map(lambda a: a[h, t], sp["towers"])}, x)
            assert y.shape == (5, 12)
            g1 = jax.tree.map(lambda a: a[h, t], grown["towers"])
            np.testing.assert_allclose(mod.apply({"params": g1}, x), y, rtol=1e-5, atol=1e-5)
            outs.append(y)
    assert not np.allclose(outs[0], outs[1])  # towers keep their own units


# ---- training runs ------------------------------------------------------------------------

SCHEDULE = "dense:3,prune0.5:5,grow:4"


def test_run_reports_phases_flops_and_ends_full(mesh24):
    s = train_and_evaluate(config(steps=12, growth_prune=SCHEDULE, eval_every=4), mesh24)
    g = s["growth_prune"]
    assert [p["label"] for p in g["phases"]] == ["dense", "prune0.5", "grow"]
    assert [t["step"] for t in g["transitions"]] == [3, 8]
    full, pruned, grown = (p["step_flops"] for p in g["phases"])
    assert full == grown and 0 < pruned < full
    assert s["dense_train_flops"] == pytest.approx(7 * full + 5 * pruned)
    assert s["dense_train_flops_unpruned"] == pytest.approx(12 * full)
    assert g["flops_saving"] == pytest.approx(1 - s["dense_train_flops"] / s["dense_train_flops_unpruned"])
    assert "top/0 32->16" in g["phases"][1]["widths"] and "bottom/0 16->8" in g["phases"][1]["widths"]
    assert all(p["steps_timed"] == p["steps"] for p in g["phases"])
    assert "growth-prune" in s["path"] and np.all(np.isfinite(s["train_loss"]))
    plain = train_and_evaluate(config(steps=12, eval_every=4), mesh24)
    assert plain["growth_prune"] is None
    assert plain["dense_train_flops"] == plain["dense_train_flops_unpruned"] == pytest.approx(12 * full)
    # The same 3 dense steps first: bit-identical losses until the first pruning.
    assert s["train_loss"][:3] == plain["train_loss"][:3]


def test_growth_keeps_the_loss_of_the_pruned_model(mesh24):
    """At the grow boundary the model's logits do not change (function-preserving)."""
    cfg = config(steps=12, growth_prune=SCHEDULE, model="dcn", cross_layers=2, low_rank=8)
    t = Trainer(cfg, mesh24)
    state = t.gp.enter(t.init_state(), 3)  # pruned
    assert t.model.low_rank == 4 and t.model.top == (16, 8)
    batch = t.data.batch(0, cfg.global_batch)
    before = t.logits(state, batch)
    state = t.gp.enter(state, 8)  # grown
    assert t.model is t.full_model
    np.testing.assert_allclose(t.logits(state, batch), before, rtol=1e-5, atol=1e-6)


def _ckpt_steps(d):
    c = Checkpointer(d)
    try:
        return c.all_steps()
    finally:
        c.close()


def test_resume_inside_a_pruned_phase_is_bit_exact_and_restores_into_plain_runs(tmp_path, mesh24):
    ck = tmp_path / "ck"
    cfg = config(steps=12, growth_prune=SCHEDULE, checkpoint_dir=str(ck), checkpoint_every=5,
                 keep_checkpoints=5)
    full = train_and_evaluate(cfg, mesh24)
    assert _ckpt_steps(ck) == [5, 10, 12]
    part = tmp_path / "part"
    shutil.copytree(ck, part)
    for step in ("10", "12"):
        shutil.rmtree(part / step)
    resumed = train_and_evaluate(config(steps=12, growth_prune=SCHEDULE, checkpoint_dir=str(part),
                                        resume=True, checkpoint_every=5), mesh24)
    assert resumed["start_step"] == 5
    assert resumed["train_loss"] == full["train_loss"]  # every step, bit for bit
    assert resumed["eval_auc"] == full["eval_auc"]
    # the compiled steps' FLOPs include the row-wise route's XLA ops, sized by
    # exchange capacities that the resumed run fits to its own first batch
    assert resumed["dense_train_flops"] == pytest.approx(full["dense_train_flops"], rel=0.01)
    # The pruned checkpoint restores into a run without growth-prune: the removed
    # units return, so its logits are the pruned model's.
    t = Trainer(config(steps=12, growth_prune=SCHEDULE), mesh24)
    c = Checkpointer(part)
    try:
        st, meta = t.restore(c, 5)
        pruned = t.gp.resume(st, meta["growth_prune"])
        batch = t.data.batch(0, 256)
        want = t.logits(pruned, batch)
        plain = Trainer(config(steps=12), mesh24)
        st2, meta2 = plain.restore(c, 5)
        got = plain.logits(gp.resume_state(plain, st2, meta2["growth_prune"]), batch)
    finally:
        c.close()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [
    dict(model="dcn", cross_layers=2, low_rank=8, sharding="row_wise"),
    dict(towers=2, tower_module="mlp", tower_dim=8, sharding="table_wise", tower_row_wise="auto"),
    dict(towers=2, tower_module="dcn", tower_dim=8, model="dcn", cross_layers=1, low_rank=8),
], ids=["dcn_row_wise", "dmt_mlp_module", "dmt_dcn_module"])
def test_models_towers_and_shardings(extra, mesh24):
    s = train_and_evaluate(config(steps=6, growth_prune="dense:2,prune0.5:2,grow:2", **extra), mesh24)
    widths = s["growth_prune"]["phases"][1]["widths"]
    if "towers" in extra:
        name = "towers/hidden" if extra["tower_module"] == "mlp" else "towers/cross_0"
        assert name in widths
    if extra.get("model") == "dcn":
        assert "model/cross_0" in widths or "cross_0 8->4" in widths
    flops = [p["step_flops"] for p in s["growth_prune"]["phases"]]
    assert flops[1] < flops[0] == flops[2]
    assert np.all(np.isfinite(s["train_loss"]))


def test_no_prunable_units_is_a_clear_error(mesh24):
    with pytest.raises(ValueError, match="no prunable units"):
        Trainer(config(steps=6, bottom_mlp=(), top_mlp=(), growth_prune="default"), mesh24)


def test_train_py_prints_the_phases(tmp_path):
    """`train.py --growth-prune=default` on a tiny run: the preset fits 3 steps, the start-up
    line names it, and the summary lines and JSON give the phases' FLOPs."""
    out = tmp_path / "s.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), "--mesh=1x2", "--steps=3",
         "--batch-size=64", "--eval-batches=1", "--embedding-dim=4", "--bottom-mlp=8", "--top-mlp=8",
         "--no-progress", "--growth-prune=default", f"--summary-json={out}"],
        capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "growth-prune default (3 phases)" in r.stderr
    assert "growth-prune: step 1: prune0.75 for 1 steps" in r.stderr
    assert "% saved" in r.stdout and "prune0.75 steps 1-2" in r.stdout
    s = json.loads(out.read_text())
    assert 0 < s["dense_train_flops"] < s["dense_train_flops_unpruned"]
