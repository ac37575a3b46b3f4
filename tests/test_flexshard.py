"""FlexShard row tiers: the tier maps, a tiered table is the row-wise model
(lookups, sparse steps with every optimizer, 50-step loss histories), its
replicas stay bit-identical (in one process and across two), checkpoints
move between flexshard and row-wise on other meshes, and the tier sizes
follow the row statistics and the memory budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jdmt.data.specs import FeatureSet, SparseFeature, make_features
from jdmt.embeddings import Placement, ShardedEmbeddings, SparseOptimizer
from jdmt.embeddings.tiers import COLD, HOT, WARM, RowTiers
from jdmt.mesh import DEVICES, Topology, make_mesh
from jdmt.planner.flexshard import plan_tiers
from jdmt.planner.row_stats import HeavyHitters

from test_embeddings import FEATURES, check_step, make_batch, random_grads, run_step
from test_multiprocess import _free_port

ROOT = Path(__file__).resolve().parents[1]


def tiered_plan(features, n, seed=0):
    """Every table flexshard, with hot and warm rows drawn from its low ids
    (those `make_batch` uses most) and a few from anywhere."""
    rng = np.random.default_rng(seed)
    plan = {}
    for f in features.sparse:
        rows = rng.permutation(f.rows)
        low = [r for r in rows if r < 8]
        hot = sorted(low[: max(1, len(low) // 3)])
        warm = sorted(set(low[len(hot):]) | {int(r) for r in rows[:3] if r not in hot})
        plan[f.name] = Placement("flexshard", range(n), tuple(hot), tuple(warm))
    return plan


def test_tier_maps_round_trip_without_a_table_sized_array():
    t = RowTiers(20, hot=[3, 7], warm=[0, 8, 19])
    ids = np.array([-1, 0, 1, 2, 3, 7, 8, 9, 18, 19])
    s = t.split_np(ids)
    assert s[HOT].tolist() == [-1, -1, -1, -1, 0, 1, -1, -1, -1, -1]
    assert s[WARM].tolist() == [-1, 0, -1, -1, -1, -1, 1, -1, -1, 2]
    assert s[COLD].tolist() == [-1, -1, 0, 1, -1, -1, -1, 5, 14, -1]
    assert t.sizes == {HOT: 2, WARM: 3, COLD: 15}
    all_ids = np.arange(20)
    for tier in (HOT, WARM, COLD):  # jnp equals numpy, and slots map back to their ids
        got = np.asarray(t.split(jnp.asarray(all_ids, jnp.int32))[tier])
        assert got.tolist() == t.split_np(all_ids)[tier].tolist()
        slots = np.arange(t.sizes[tier])
        raw = np.asarray(t.raw(tier, jnp.asarray(slots, jnp.int32)))
        assert raw.tolist() == t.rows_of(tier).tolist()
        assert t.split_np(raw)[tier].tolist() == slots.tolist()
    for hot, warm, msg in (([3, 3], [], "sorted"), ([2], [2], "both"), ([20], [], "lie in")):
        with pytest.raises(ValueError, match=msg):
            RowTiers(20, hot, warm)
    with pytest.raises(ValueError, match="flexshard"):
        Placement("row_wise", range(8), hot=(1,))


# pooled sum, mean, hashed and one-id tables, and a sequence table
KINDS = FeatureSet(tuple(FEATURES[n] for n in ("u", "v", "h", "o", "s")), num_dense=1)


@pytest.fixture(scope="module")
def batch(mesh24):
    ids, lengths = make_batch(KINDS, seed=5, id_range=12)
    sh = NamedSharding(mesh24, P(DEVICES))
    return jax.device_put(ids, sh), jax.device_put(lengths, sh)


@pytest.mark.parametrize("optimizer, kernel", [("rowwise_adagrad", "xla"), ("adagrad", "cpu")])
def test_flexshard_step_matches_reference(mesh24, batch, optimizer, kernel):
    """Pooled (sum, mean, hashed, one-id) and sequence tables, every row in
    one of three tiers: the lookups and one sparse step equal the numpy
    reference of the whole tables; untouched rows are bit-identical. (The
    C++ row-wise Adagrad and SGD: the 50-step test.)"""
    opt = SparseOptimizer(optimizer, lr=0.3, initial_accumulator=0.1)
    emb = ShardedEmbeddings(KINDS, mesh24, tiered_plan(KINDS, 8), opt, cpu_kernels=kernel == "cpu",
                            kernel="xla")
    assert {p.type.value for p in emb.layout.pieces} == {"data_parallel", "host_replicated", "row_wise"}
    check_step(emb, batch)


def _replicas(arr, mesh, host_replicated):
    """Each device's copy of a replicated storage, grouped by what must be equal."""
    groups = {}
    flat = list(mesh.devices.reshape(-1))
    local = mesh.devices.shape[1]
    for s in arr.addressable_shards:
        d = flat.index(s.device)
        groups.setdefault(d % local if host_replicated else 0, []).append(np.asarray(s.data))
    return groups


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adagrad", "sgd"])
def test_fifty_steps_give_the_row_wise_losses_and_identical_replicas(mesh24, optimizer):
    """50 sparse steps of a small model (pooled and sequence tables) as
    flexshard and as routed row-wise: the same losses within 1e-5, and every
    hot replica (all devices) and warm replica (the same local rank on each
    host) bit-identical at the end."""
    feats = FeatureSet((SparseFeature("a", 300, 8, 6), SparseFeature("b", 200, 8, 4, combiner="mean"),
                        SparseFeature("s", 150, 8, 7, kind="sequence")), num_dense=1)
    opt = SparseOptimizer(optimizer, lr=0.05, initial_accumulator=0.1)
    rng = np.random.default_rng(0)
    head = lambda f: [int(r) for r in sorted(rng.choice(40, 12, replace=False))]  # noqa: E731
    plan = {}
    for f in feats.sparse:
        h = head(f)
        plan[f.name] = Placement("flexshard", range(8), tuple(h[:4]), tuple(h[4:]))
    w_pooled = jnp.asarray(rng.standard_normal((1, 16)).astype(np.float32))
    w_seq = jnp.asarray(rng.standard_normal((7, 8)).astype(np.float32))

    def loss_fn(e, y):
        z = jnp.sum(e.pooled * w_pooled, axis=1) + jnp.einsum("bsd,sd->b", e.sequence["s"], w_seq)
        return jnp.mean((z - y) ** 2)

    losses = {}
    for name, sharding in (("flex", plan), ("row", "row_wise")):
        emb = ShardedEmbeddings(feats, mesh24, sharding, opt, row_dedup="device")
        step = jax.jit(lambda s, i, n, y: emb.step(s, i, n, loss_fn, y)[:2], donate_argnums=0)
        state = emb.init(seed=4)
        out = []
        for t in range(50):
            r = np.random.default_rng(100 + t)
            ids = np.minimum(r.zipf(1.3, (64, feats.total_slots)) - 1, 149).astype(np.int32)
            lengths = r.integers(0, [7, 5, 8], (64, 3)).astype(np.int32)
            y = jnp.asarray(r.standard_normal(64).astype(np.float32))
            loss, state = step(state, ids, lengths, y)
            out.append(float(loss))
        losses[name] = out
        if name == "flex":
            for storage, st in state.items():
                if storage.startswith(("dp_", "hr_")):
                    for group in _replicas(st.weights, mesh24, storage.startswith("hr_")).values():
                        assert len(group) > 1
                        for other in group[1:]:
                            assert np.array_equal(group[0], other), storage
    np.testing.assert_allclose(losses["flex"], losses["row"], rtol=1e-5, atol=1e-6)


def test_checkpoint_layouts_move_between_flexshard_and_row_wise_on_other_meshes(mesh24):
    """A flexshard state read back as whole tables, laid out row-wise on 2x4
    and as flexshard (other tiers) on 4x2, and read back: the same tables
    and accumulators bit for bit."""
    opt = SparseOptimizer(lr=0.3, initial_accumulator=0.1)
    emb = ShardedEmbeddings(KINDS, mesh24, tiered_plan(KINDS, 8), opt)
    ids, lengths = make_batch(KINDS, seed=6, id_range=12)
    grads = random_grads(KINDS, {f.name: (16, f.dim) if f.pooled else (16, f.max_len, f.dim)
                                 for f in KINDS.sparse})
    state, _ = run_step(emb, emb.init(seed=2), ids, lengths, grads)
    tables, accs = emb.to_dense(state)
    mesh42 = make_mesh("4x2")
    for target in (ShardedEmbeddings(KINDS, mesh24, "row_wise", opt),
                   ShardedEmbeddings(KINDS, mesh42, tiered_plan(KINDS, 8, seed=1), opt)):
        t2, a2 = target.to_dense(target.from_dense(tables, accs))
        for n in tables:
            assert np.array_equal(t2[n], tables[n]) and np.array_equal(a2[n], accs[n]), n


def test_tiers_follow_statistics_and_budget():
    """The chooser replicates the rows whose requests cost more than an
    all-reduce, never exceeds the memory budget, and at 1.0x (no room)
    keeps every row cold."""
    feats = FeatureSet((SparseFeature("s", 100_000, 16, 32, kind="sequence"),
                        SparseFeature("p", 1000, 16, 4)), num_dense=1)
    ranks = np.arange(1, 100_001)
    p = ranks ** -1.05
    p /= p.sum()
    rng = np.random.default_rng(0)
    hh = HeavyHitters(1 << 14).update(rng.choice(100_000, 200_000, p=p))
    plan = {"s": Placement("flexshard", range(64)), "p": Placement("row_wise", range(64))}
    topo = Topology(8, 8)
    lam = {"s": 4096 * 32}
    out, rep = plan_tiers(feats, plan, {"s": hh}, topo, global_batch_lookups=lam, budget=1.25,
                          row_dedup="device")
    (r,) = rep
    assert r.hot + r.warm > 0 and r.cross_host_bytes < 0.7 * r.row_wise_cross_host_bytes
    assert out["p"] == plan["p"] and len(out["s"].hot) == r.hot and len(out["s"].warm) == r.warm
    total_rw = sum(f.rows * 4 * (f.dim + 1) / 64 for f in feats.sparse)
    assert r.memory_bytes - r.row_wise_memory_bytes <= 0.25 * total_rw + 4 * 17 * 16
    none, rep0 = plan_tiers(feats, plan, {"s": hh}, topo, global_batch_lookups=lam, budget=1.0,
                            row_dedup="device")
    assert rep0[0].hot == 0 and rep0[0].warm <= 8 and rep0[0].memory_bytes <= r.row_wise_memory_bytes + 4 * 17 * 8
    with pytest.raises(ValueError, match="budget"):
        plan_tiers(feats, plan, {"s": hh}, topo, global_batch_lookups=lam, budget=0.5)


def test_two_processes_keep_replicas_identical_across_the_process_boundary(mesh24):
    """Two real processes (one host each): the flexshard step's tables equal
    the one-process row-wise step's, and each warm replica (local rank l on
    host 0 and host 1) and every hot replica hash the same in both."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    script = Path(__file__).parent / "helpers" / "two_process_lookup.py"
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), "flexshard"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    a, b = outs
    assert a["checksum"] == b["checksum"]
    for storage in a["replicas"]:
        for key, digests in a["replicas"][storage].items():
            both = digests + b["replicas"][storage][key]
            assert len(both) >= 2 and len(set(both)) == 1, (storage, key)
    # the same step row-wise, in this process
    feats = make_features(6, 40, 8, 3, num_dense=1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, (16, feats.total_slots)).astype(np.int32)
    lengths = rng.integers(0, 4, (16, 6)).astype(np.int32)
    w = rng.standard_normal((16, 48)).astype(np.float32)
    emb = ShardedEmbeddings(feats, mesh24, "row_wise", SparseOptimizer(lr=0.3))
    step = jax.jit(lambda s, i, n, w: emb.step(s, i, n, lambda e, w: jnp.sum(e.pooled * w), w)[1])
    tables, _ = emb.to_dense(step(emb.init(seed=1), ids, lengths, w))
    want = float(sum(np.abs(t).sum() * (k + 1) for k, t in enumerate(tables.values())))
    assert a["checksum"] == pytest.approx(want, rel=1e-6)


def test_trainer_flexshard_checkpoint_restores_into_row_wise_on_another_mesh(mesh24, tmp_path):
    """`--sharding=flexshard` in the trainer: the tiers are chosen from the
    first batches (per-device requests: replication pays) and its checkpoint
    (the plan with its hot and warm rows in the meta) restores into a
    row-wise trainer on 4x2 with every table and accumulator bit for bit.
    (Its losses against the other shardings, with mean and attention
    sequence pooling: tests/test_train.py.)"""
    from jdmt.train import Trainer, TrainConfig
    from jdmt.train.checkpoint import Checkpointer
    from jdmt.train.trainer import TrainState

    base = dict(num_tables=4, rows_per_table=2000, pooling=6, embedding_dim=8, global_batch=256,
                eval_batches=1, bottom_mlp=(16,), top_mlp=(16,), steps=4, progress=False,
                row_dedup="device")
    flex = Trainer(TrainConfig(**base, sharding="flexshard", memory_budget=1.5), mesh24)
    assert len(flex.tier_report) == 4 and sum(t.hot + t.warm for t in flex.tier_report) > 0
    rng = np.random.default_rng(0)
    tables = {f.name: rng.standard_normal((f.rows, f.dim)).astype(np.float32) for f in flex.features.sparse}
    accs = {f.name: rng.random(f.rows).astype(np.float32) for f in flex.features.sparse}
    st = flex.init_state()
    st = TrainState(st.params, st.opt_state, flex.emb.from_dense(tables, accs))
    ckpt = Checkpointer(tmp_path / "ck", asynchronous=False)
    try:
        ckpt.save(4, st, {"layout": flex.layout()})
        ckpt.wait()
        row = Trainer(TrainConfig(**base, sharding="row_wise"), make_mesh("4x2"))
        state, meta = row.restore(ckpt, 4)
        assert meta["layout"]["plan"]["cat_0"]["type"] == "flexshard"
        got_t, got_a = row.emb.to_dense(state.tables)
        for n in tables:
            assert np.array_equal(got_t[n], tables[n]) and np.array_equal(got_a[n], accs[n]), n
    finally:
        ckpt.close()


def test_pallas_tpu_kernels_in_the_tiers(mesh24):
    """The hot, warm and cold tiers' lookups and updates as the TPU Pallas
    kernels (interpreted on the CPU mesh): the same reference step."""
    feats = FeatureSet(tuple(FEATURES[n] for n in ("v", "s")), num_dense=1)  # mean pooled, sequence
    ids, lengths = make_batch(feats, seed=5, id_range=12)
    sh = NamedSharding(mesh24, P(DEVICES))
    batch = jax.device_put(ids, sh), jax.device_put(lengths, sh)
    opt = SparseOptimizer(lr=0.5, initial_accumulator=0.1)
    emb = ShardedEmbeddings(feats, mesh24, tiered_plan(feats, 8), opt, kernel="pallas")
    assert (emb.impl.target, emb.impl.interpret) == ("tpu", True)
    check_step(emb, batch)


def test_auto_plan_offers_tiers_to_row_wise_sequence_tables(mesh24):
    """`--sharding=auto`: each sequence table the planner makes row-wise
    becomes flexshard, with tiers only where the chooser says they pay
    (none are built for the others: they stay row-wise tables)."""
    from jdmt.train import Trainer, TrainConfig

    feats = FeatureSet((SparseFeature("a", 3000, 8, 4), SparseFeature("s1", 20_000, 8, 16, kind="sequence"),
                        SparseFeature("s2", 30_000, 8, 8, kind="sequence")), num_dense=2)
    cfg = TrainConfig(features=feats, embedding_dim=8, global_batch=512, eval_batches=1, bottom_mlp=(16,),
                      top_mlp=(16,), steps=1, progress=False, sharding="auto", row_dedup="device",
                      memory_budget=1.5)
    t = Trainer(cfg, mesh24)
    planned = t.plan.placements
    for name in ("s1", "s2"):
        if planned[name].type.value == "row_wise":
            assert t.emb.plan[name].type.value == "flexshard"
            assert name in {r.table for r in t.tier_report}
        else:
            assert t.emb.plan[name] == planned[name]
    assert t.emb.plan["a"] == planned["a"]
    tiered = {r.table for r in t.tier_report if r.hot + r.warm}
    assert {f.name.split("#")[0] for f in t.emb.tables.sparse if "#" in f.name} == tiered
