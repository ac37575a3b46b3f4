"""Sharded lookups and fused sparse updates vs a single-device numpy reference.

Every sharding type (and mixes of them) must give the unsharded model's
embeddings and, after one step, its tables and optimizer state; untouched
rows stay bit-identical; each device allocates the rows it owns; the
payload the exchanges count is the payload the batch implies; capacities
overflow visibly and the repeated step is exact.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jdmt.data.specs import FeatureSet, SparseFeature
from jdmt.embeddings import OptimizerKind, Placement, ShardedEmbeddings, SparseOptimizer, cpu_kernels
from jdmt.embeddings.layout import ROW_ALIGN, storage_name
from jdmt.mesh import DEVICES, make_mesh

B = 16  # global batch: 2 examples per device on 2x4

FEATURES = FeatureSet(
    (
        SparseFeature("u", 50, 8, 4),  # pooled sum
        SparseFeature("v", 37, 8, 4, combiner="mean"),  # rows not divisible by 8
        SparseFeature("w", 5, 8, 4),  # fewer rows than devices
        SparseFeature("x", 23, 8, 2),  # another id cap
        SparseFeature("h", 11, 8, 4, hashed=True),  # ids reduced modulo rows
        SparseFeature("o", 19, 8, 1),  # one id per bag: asks for unique rows
        SparseFeature("s", 30, 8, 5, kind="sequence"),
        SparseFeature("t", 9, 8, 5, kind="sequence"),
    ),
    num_dense=1,
)
TYPES = ["data_parallel", "table_wise", "row_wise", "column_wise", "table_row_wise"]


def make_batch(features, seed=0, id_range=6, batch=B):
    """Ids from a small range (many duplicates); lengths with empty and full bags."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, features.total_slots), np.int32)
    lengths = np.zeros((batch, len(features.sparse)), np.int32)
    for i, f in enumerate(features.sparse):
        ln = rng.integers(0, f.max_len + 1, batch)
        ln[0], ln[1] = 0, f.max_len  # an empty and a full bag always
        lengths[:, i] = ln
        hi = 10 * f.rows if f.hashed else min(id_range, f.rows)
        cols = rng.integers(-3 * f.rows if f.hashed else 0, hi, (batch, f.max_len))
        cols[2, :] = f.rows - 1  # the last row, repeated in one bag
        ids[:, features.columns(f.name)] = cols
    return ids, lengths


def ref_lookup(features, tables, ids, lengths, weights=None):
    out = {}
    for i, f in enumerate(features.sparse):
        c = ids[:, features.columns(f.name)]
        if f.hashed:
            c = np.mod(c, f.rows)
        m = np.arange(f.max_len)[None, :] < lengths[:, i : i + 1]
        rows = tables[f.name][np.where(m, c, 0)] * m[..., None]
        if f.weighted:
            rows = rows * np.where(m, weights[:, features.weight_columns(f.name)], 0)[..., None]
        if f.pooled:
            rows = rows.sum(1)
            if f.combiner.value == "mean":
                rows = rows / np.maximum(lengths[:, i : i + 1], 1)
        out[f.name] = rows
    return out


def ref_step(features, tables, accs, ids, lengths, grads, opt, weights=None):
    """One sparse step on full tables: FBGEMM's row-wise Adagrad (or SGD / Adagrad)."""
    new_t, new_a, touched_all = {}, {}, {}
    for i, f in enumerate(features.sparse):
        c = ids[:, features.columns(f.name)]
        if f.hashed:
            c = np.mod(c, f.rows)
        m = np.arange(f.max_len)[None, :] < lengths[:, i : i + 1]
        g_out = grads[f.name]
        if f.pooled and f.combiner.value == "mean":
            g_out = g_out / np.maximum(lengths[:, i : i + 1], 1)
        g = np.zeros((f.rows, f.dim), np.float64)
        w_of = weights[:, features.weight_columns(f.name)] if f.weighted else None
        for b in range(ids.shape[0]):
            for p in range(f.max_len):
                if m[b, p]:
                    g[c[b, p]] += (g_out[b] * (1.0 if w_of is None else w_of[b, p]) if f.pooled
                                   else g_out[b, p])
        touched = np.zeros(f.rows, bool)
        touched[c[m]] = True
        w = tables[f.name].astype(np.float64)
        if opt.kind.value == "rowwise_adagrad":
            a = accs[f.name] + np.where(touched, (g * g).mean(1), 0)
            w = w - opt.lr * g / (np.sqrt(a)[:, None] + opt.eps)
        elif opt.kind.value == "adagrad":
            a = accs[f.name] + np.where(touched[:, None], g * g, 0)
            w = w - opt.lr * g / (np.sqrt(a) + opt.eps)
        else:
            a = None
            w = w - opt.lr * g
        w[~touched] = tables[f.name][~touched]
        new_t[f.name], new_a[f.name], touched_all[f.name] = w, a, touched
    return new_t, new_a, touched_all


def random_grads(features, out_shapes, seed=1):
    rng = np.random.default_rng(seed)
    return {f.name: rng.standard_normal(out_shapes[f.name]).astype(np.float32) for f in features.sparse}


def run_step(emb, state, ids, lengths, grads, embeddings=False, weights=None):
    """A jitted sparse step whose loss is sum(emb * grads): d loss / d emb = grads.
    Returns (new state, stats) and, with `embeddings`, the step's lookups."""
    pooled_names = [f.name for f in emb.features.sparse if f.pooled]
    wp = jnp.concatenate([grads[n] for n in pooled_names], axis=1)
    seq = {n: grads[n] for n in grads if n not in pooled_names}

    def step(state, ids, lengths, weights):
        embs, ctx, stats = emb.forward(state, ids, lengths, weights)
        g = jax.grad(lambda e: jnp.sum(e.pooled * wp) + sum(jnp.sum(e.sequence[k] * seq[k]) for k in seq))(embs)
        new, ust = emb.update(state, ctx, g, ids, lengths, weights, skip=emb.must_skip(stats))
        return embs, new, {**stats, **{f"update_{k}": v for k, v in ust.items()}}

    embs, new, stats = jax.jit(step, donate_argnums=0)(state, ids, lengths, weights)
    stats = jax.device_get(stats)
    return (new, stats, embs) if embeddings else (new, stats)


def check_step(emb, batch, seed=3, grad_seed=1):
    """Forward and one sparse step of `emb` vs the numpy reference; untouched
    rows bit-identical. Returns the step's stats. `batch`: (ids, lengths) or
    (ids, lengths, weights)."""
    ids, lengths, weights = (*batch, None)[:3]
    state = emb.init(seed=seed)
    tables, accs = emb.to_dense(state)
    w_np = None if weights is None else np.asarray(weights)
    ref = ref_lookup(emb.features, tables, np.asarray(ids), np.asarray(lengths), w_np)
    grads = random_grads(emb.features, {k: v.shape for k, v in ref.items()}, seed=grad_seed)
    new, stats, embs = run_step(emb, state, ids, lengths, grads, embeddings=True, weights=weights)
    assert int(stats["overflow"]) == 0 and int(stats["out_of_range"]) == 0
    for f in emb.features.sparse:
        np.testing.assert_allclose(np.asarray(embs[f.name]), ref[f.name], rtol=1e-6, atol=1e-6)
    got_t, got_a = emb.to_dense(new)
    want_t, want_a, touched = ref_step(emb.features, tables, accs or {}, ids, lengths, grads,
                                       emb.optimizer, w_np)
    for f in emb.features.sparse:
        np.testing.assert_allclose(got_t[f.name], want_t[f.name], rtol=2e-5, atol=2e-6)
        assert np.array_equal(got_t[f.name][~touched[f.name]], tables[f.name][~touched[f.name]])
        if want_a[f.name] is not None:
            np.testing.assert_allclose(got_a[f.name], want_a[f.name], rtol=2e-5, atol=2e-6)
    return stats


@pytest.fixture(scope="module")
def batch(mesh24):
    ids, lengths = make_batch(FEATURES)
    sh = NamedSharding(mesh24, P(DEVICES))
    return jax.device_put(ids, sh), jax.device_put(lengths, sh)


@pytest.mark.parametrize("sharding", TYPES)
@pytest.mark.parametrize("optimizer, kernel", [("rowwise_adagrad", "xla"), ("rowwise_adagrad", "cpu"),
                                               ("adagrad", "cpu"), ("sgd", "xla")])
def test_lookup_and_step_match_reference(mesh24, batch, sharding, optimizer, kernel):
    """kernel: the update as XLA ops, or as the C++ CPU kernel (cpu_kernels);
    each optimizer on each path somewhere, every pair on every type."""
    if kernel == "cpu" and not cpu_kernels.available():
        pytest.skip(f"CPU kernel unavailable: {cpu_kernels.unavailable_reason()}")
    opt = SparseOptimizer(optimizer, lr=0.5, initial_accumulator=0.1)
    emb = ShardedEmbeddings(FEATURES, mesh24, sharding, opt, cpu_kernels=kernel == "cpu")
    check_step(emb, batch)


# Pallas kernels, interpreted on CPU: every sharding type, with the optimizers
# spread over them (column-wise: row-wise Adagrad over column shards, whose row
# statistics are summed across devices).
PALLAS_CASES = [
    ("data_parallel", "sgd"), ("table_wise", "rowwise_adagrad"), ("row_wise", "adagrad"),
    ("column_wise", "rowwise_adagrad"), ("table_row_wise", "adagrad"),
]


@pytest.mark.parametrize("sharding, optimizer", PALLAS_CASES)
def test_pallas_tpu_kernels_in_every_sharding(mesh24, batch, sharding, optimizer):
    opt = SparseOptimizer(optimizer, lr=0.5, initial_accumulator=0.1)
    emb = ShardedEmbeddings(FEATURES, mesh24, sharding, opt, kernel="pallas")
    assert (emb.impl.target, emb.impl.interpret, emb.cpu_kernels) == ("tpu", True, False)
    check_step(emb, batch)


@pytest.mark.parametrize("sharding, optimizer", PALLAS_CASES[1:2])
def test_pallas_gpu_kernels_in_the_sharded_step(sharding, optimizer):
    """The Mosaic GPU kernels in the same pipeline, on a one-device mesh: jax
    0.10.2's Mosaic GPU interpreter keeps its simulated shared memory in one
    process-wide table and fails when several emulated devices run kernels at
    once (the TPU kernels cover the multi-device layouts above)."""
    from jdmt.pallas_kernels import Impl

    mesh = make_mesh("1x1", devices=jax.devices()[:1])
    opt = SparseOptimizer(optimizer, lr=0.5, initial_accumulator=0.1)
    emb = ShardedEmbeddings(FEATURES, mesh, sharding, opt, kernel=Impl("pallas", "gpu", True))
    check_step(emb, make_batch(FEATURES))


MIXED_PLAN = {
    "u": Placement("table_wise", (5,)),
    "v": Placement("column_wise", (7, 1)),
    "w": Placement("row_wise", tuple(range(8))),
    "x": Placement("data_parallel", tuple(range(8))),
    "h": Placement("table_row_wise", (4, 5, 6, 7)),
    "o": Placement("table_wise", (5,)),
    "s": Placement("column_wise", (0, 3, 6, 2)),
    "t": Placement("table_row_wise", (0, 1, 2, 3)),
}


@pytest.mark.parametrize("exchange", ["padded", "emulated"])
def test_mixed_plan_with_every_type(mesh24, batch, exchange):
    """One model with every sharding type at once, owners chosen by hand;
    `emulated` runs the ragged all-to-all's arguments through its definition."""
    emb = ShardedEmbeddings(FEATURES, mesh24, MIXED_PLAN, SparseOptimizer(lr=0.3), exchange=exchange)
    check_step(emb, batch, seed=1, grad_seed=5)


@pytest.mark.parametrize("sharding", TYPES)
def test_ragged_arguments_give_the_padded_result_bit_for_bit(mesh24, batch, sharding):
    """The exchange's ragged arguments (offsets, sizes), run by the definition
    of `ragged_all_to_all`, give exactly what the padded CPU exchange gives."""
    out = []
    for mode in ("padded", "emulated"):
        emb = ShardedEmbeddings(FEATURES, mesh24, sharding, SparseOptimizer(lr=0.3), exchange=mode)
        ids, lengths = batch
        grads = random_grads(FEATURES, {f.name: (B, f.dim) if f.pooled else (B, f.max_len, f.dim)
                                        for f in FEATURES.sparse})
        new, stats = run_step(emb, emb.init(seed=4), ids, lengths, grads)
        out.append((emb.to_dense(new), stats))
    (t0, a0), s0 = out[0]
    (t1, a1), s1 = out[1]
    for n in t0:
        assert np.array_equal(t0[n], t1[n]) and np.array_equal(a0[n], a1[n])
    assert s0["payload_cross_host_bytes"] == s1["payload_cross_host_bytes"]


@pytest.mark.parametrize("spec", ["4x2", "8x1", "1x8"])
@pytest.mark.parametrize("sharding", ["row_wise", "table_row_wise", "table_wise"])
def test_other_mesh_shapes(spec, sharding):
    mesh = make_mesh(spec)
    emb = ShardedEmbeddings(FEATURES, mesh, sharding, SparseOptimizer(lr=0.3, initial_accumulator=0.1),
                            cpu_kernels=False)
    check_step(emb, make_batch(FEATURES, seed=7), seed=1, grad_seed=4)


@pytest.mark.parametrize("sharding, bags", [("table_wise", True), ("table_wise", False),
                                           ("column_wise", True), ("row_wise", False)])
@pytest.mark.parametrize("kernel", ["xla", "cpu"])
def test_one_device_matches_the_reference(sharding, bags, kernel):
    """One device (the exchanges are with oneself): the same embeddings and
    update as the reference, with bags, with rows, and both in one width
    (sequence features ask for rows)."""
    if kernel == "cpu" and not cpu_kernels.available():
        pytest.skip(f"CPU kernel unavailable: {cpu_kernels.unavailable_reason()}")
    mesh = make_mesh("1x1", devices=jax.devices()[:1])
    names = [f.name for f in FEATURES.sparse if f.pooled] if bags else ()
    emb = ShardedEmbeddings(FEATURES, mesh, sharding, SparseOptimizer(lr=0.3, initial_accumulator=0.1),
                            cpu_kernels=kernel == "cpu", bag_features=names)
    assert any(r.bag_pieces for r in emb.routes.values()) == bags
    check_step(emb, make_batch(FEATURES, seed=5), seed=2, grad_seed=6)


def test_two_hops_give_the_direct_route_s_model_with_fewer_cross_host_bytes(mesh24):
    """Row-wise requests de-duplicated per host (two hops) against each device
    asking the owners directly: the same embeddings bit for bit (the same
    rows reach the requester), the same tables after a step (the owner sums
    each row's gradients in another order), and fewer bytes across hosts
    (a row every device of a host needs crosses once)."""
    ids, lengths = make_batch(FEATURES, seed=11, id_range=6, batch=64)
    opt = SparseOptimizer(lr=0.3, initial_accumulator=0.1)
    grads = random_grads(FEATURES, {f.name: (64, f.dim) if f.pooled else (64, f.max_len, f.dim)
                                    for f in FEATURES.sparse})
    got = {}
    for dedup in ("host", "device"):
        emb = ShardedEmbeddings(FEATURES, mesh24, "row_wise", opt, row_dedup=dedup, cpu_kernels=False)
        assert bool(emb.hops) == (dedup == "host")
        new, stats, embs = run_step(emb, emb.init(seed=2), ids, lengths, grads, embeddings=True)
        assert int(stats["overflow"]) == 0
        got[dedup] = ({n: np.asarray(v) for n, v in embs.to_dict().items()}, emb.to_dense(new)[0], stats)
    (e_h, t_h, s_h), (e_d, t_d, s_d) = got["host"], got["device"]
    for n in e_d:
        assert np.array_equal(e_h[n], e_d[n]), n
        np.testing.assert_allclose(t_h[n], t_d[n], rtol=1e-6, atol=1e-7)
    cross = lambda s: s["payload_cross_host_bytes"] + s["update_payload_cross_host_bytes"]  # noqa: E731
    assert cross(s_h) < 0.8 * cross(s_d)
    assert 0 < s_h["ids_unique_host"] < s_h["ids_unique"] == s_d["ids_unique"]


MIXED_SIZES = FeatureSet(
    (SparseFeature("big", 1_000_000, 8, 3),
     *(SparseFeature(f"small{i}", 1000, 8, 2 + i % 3) for i in range(7))),
    num_dense=1,
)


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "table_row_wise"])
def test_a_million_rows_beside_thousand_row_tables(mesh24, sharding):
    """Mixed table sizes: every type equals the reference; a balanced plan
    allocates what it owns; table-wise allocates the largest device's share
    on every device (one SPMD program: one buffer shape), and no more."""
    ids, lengths = make_batch(MIXED_SIZES, seed=3, id_range=1000, batch=32)
    emb = ShardedEmbeddings(MIXED_SIZES, mesh24, sharding, SparseOptimizer(lr=0.2))
    check_step(emb, (ids, lengths))
    m = emb.memory()
    owned_rows = emb.layout.owned_rows[8]
    assert m.allocated == 8 * (-(-owned_rows.max() // ROW_ALIGN) * ROW_ALIGN) * 4 * (8 + 1)
    if sharding == "table_wise":
        assert owned_rows.max() == 1_000_000 and 7.8 < m.ratio < 8.0
    elif sharding == "table_row_wise":  # a host holds the big table: its devices a quarter each
        assert owned_rows.max() == 250_000 and m.ratio < 2.0
    else:
        assert m.ratio < 1.001, m.ratio


@pytest.mark.parametrize("sharding", ["row_wise", "table_row_wise", "table_wise", "column_wise"])
def test_each_device_stores_only_what_it_owns(mesh24, sharding):
    """A device's storage holds its shards' rows, one after another, and zeros
    past them (at most the alignment and the plan's imbalance); row-wise rows
    are spread id mod S, so Zipf-hot low ids land on different devices."""
    feats = FeatureSet(tuple(SparseFeature(f"f{i}", 40 + 13 * i, 8, 2) for i in range(8)), num_dense=1)
    emb = ShardedEmbeddings(feats, mesh24, sharding)
    rng = np.random.default_rng(0)
    tables = {f.name: rng.standard_normal((f.rows, f.dim)).astype(np.float32) + 5 for f in feats.sparse}
    state = emb.from_dense(tables)
    w = emb.layout.widths[0]
    rows = emb.layout.rows[w]
    owned = emb.layout.owned_rows[w]
    buf = state[storage_name(w)].weights
    assert buf.shape[0] == 8 * rows and rows == -(-owned.max() // ROW_ALIGN) * ROW_ALIGN
    assert owned.sum() == sum(f.rows * (f.dim // w) for f in feats.sparse)
    for shard in buf.addressable_shards:
        d = shard.index[0].start // rows
        local = np.asarray(shard.data)
        assert np.all(local[owned[d]:] == 0) and np.all(local[: owned[d]] != 0)
    if sharding in ("row_wise", "table_row_wise"):
        p = emb.layout.pieces[0]
        for s, (d, off) in enumerate(zip(p.devices, p.offsets)):
            local = np.asarray(buf.addressable_shards[d].data)
            np.testing.assert_array_equal(local[off : off + 3], tables["f0"][s :: p.stride][:3])
    back, _ = emb.to_dense(state)
    for n in tables:
        assert np.array_equal(back[n], tables[n])


def test_init_is_independent_of_the_plan(mesh24):
    embs = [ShardedEmbeddings(FEATURES, mesh24, t) for t in TYPES] + [
        ShardedEmbeddings(FEATURES, mesh24, MIXED_PLAN)]
    dense = [e.to_dense(e.init(seed=7))[0] for e in embs]
    for other in dense[1:]:
        for name in dense[0]:
            assert np.array_equal(dense[0][name], other[name])
    f = FEATURES["u"]
    t = dense[0]["u"]
    assert np.abs(t).max() <= np.sqrt(1 / f.rows) and t.std() > 0.2 * np.sqrt(1 / f.rows)


def test_from_dense_round_trip(mesh24):
    rng = np.random.default_rng(0)
    tables = {f.name: rng.standard_normal((f.rows, f.dim)).astype(np.float32) for f in FEATURES.sparse}
    for t in TYPES:
        emb = ShardedEmbeddings(FEATURES, mesh24, t)
        back, _ = emb.to_dense(emb.from_dense(tables))
        for name in tables:
            assert np.array_equal(back[name], tables[name])


@pytest.mark.parametrize("sharding", ["table_wise", "table_row_wise"])
def test_out_of_range_ids_are_counted_and_nothing_is_written(mesh24, sharding):
    ids, lengths = make_batch(FEATURES)
    col = FEATURES.columns("u").start
    lengths[3, FEATURES.index("u")] = 2
    ids[3, col], ids[3, col + 1] = 50, -1  # rows = 50
    emb = ShardedEmbeddings(FEATURES, mesh24, sharding)
    state = emb.init()
    before, _ = emb.to_dense(state)
    grads = random_grads(FEATURES, {f.name: (B, f.dim) if f.pooled else (B, f.max_len, f.dim)
                                    for f in FEATURES.sparse})
    new, stats, embs = run_step(emb, state, ids, lengths, grads, embeddings=True)
    assert stats["out_of_range"] == 2
    assert np.all(np.asarray(embs["u"])[3] == 0)  # the bad ids read as nothing
    after, _ = emb.to_dense(new)
    for n in before:
        assert np.array_equal(before[n], after[n])


@pytest.mark.parametrize("row_dedup", ["host", "device"])
def test_an_overflowing_batch_changes_nothing_and_the_repeat_is_exact(mesh24, row_dedup):
    """Capacities fitted to a spread batch; a batch whose ids all hit one row
    shard overflows: the step reports it and writes nothing; with the
    capacities grown the repeated step equals the unsharded reference. Both
    row routes: direct, and two hops (the overflow is in either hop)."""
    feats = FeatureSet((SparseFeature("a", 4000, 8, 6), SparseFeature("q", 4000, 8, 4, kind="sequence")),
                       num_dense=1)
    opt = SparseOptimizer(lr=0.2)
    emb = ShardedEmbeddings(feats, mesh24, "row_wise", opt, row_dedup=row_dedup)
    assert emb.row_dedup == row_dedup
    spread = make_batch(feats, seed=1, id_range=4000, batch=64)
    b = 64 // 8
    emb.fit_caps(b, emb.measure(*spread))
    ids, lengths = make_batch(feats, seed=2, id_range=400, batch=64)
    ids = np.minimum(ids, 499) * 8  # every id is 0 mod 8: all on row shard 0
    need = emb.measure(ids, lengths)
    caps = emb.describe_caps(b)
    over = [k for k in caps if need[k] > caps[k]]
    assert over, (need, caps)
    state = emb.init(seed=3)
    before, _ = emb.to_dense(state)
    grads = random_grads(feats, {"a": (64, 8), "q": (64, 4, 8)})
    new, stats = run_step(emb, state, ids, lengths, grads)
    assert stats["overflow"] > 0
    # the first exchange's need is exact; a later hop sees only what the first let through
    first = over[0]
    assert int(stats["need"][first]) == need[first]
    assert all(int(stats["need"][k]) <= need[k] for k in need)
    after, _ = emb.to_dense(new)
    for n in before:
        assert np.array_equal(before[n], after[n])
    for _ in range(len(need)):  # as the trainer does: grow and repeat until nothing overflows
        emb.grow(b, stats)
        stats = run_step(emb, emb.init(seed=3), ids, lengths, grads)[1]
        if int(stats["overflow"]) == 0:
            break
    caps = emb.describe_caps(b)
    assert all(caps[k] >= need[k] for k in need)
    stats = check_step(emb, (ids, lengths), seed=3)
    assert stats["overflow"] == 0


def _payload(emb, ids, lengths):
    """Payload of one step computed from the batch alone (numpy): per flat
    piece, the bags or unique rows each device asks of each other device;
    for row-wise pieces on two hops, the unique rows each device asks of its
    host's device with the owner's local rank, and the unique rows that
    device asks, for its whole host, of each owner on another host."""
    ids, lengths = np.asarray(ids), np.asarray(lengths)
    n, ln = emb.num_devices, emb.local
    b = ids.shape[0] // n
    cross = intra = 0.0
    feats = emb.features.sparse
    hopped = {i for r in emb.hops.values() for i in r.pieces}
    host_asked = {}  # (host, owner, piece, row) -> width: what a host asks across, once
    for d in range(n):
        sl = slice(d * b, (d + 1) * b)
        asked = {}  # (owner, feature, piece col0, row) -> asked for once (unique rows)
        for i, p in enumerate(emb.layout.pieces):
            f = feats[p.feature]
            c = ids[sl, emb.features.columns(f.name)]
            valid = np.arange(f.max_len)[None, :] < lengths[sl, p.feature : p.feature + 1]
            rows = np.mod(c, f.rows) if f.hashed else c
            width = 4 * p.width
            if p.stride == 1 and f.pooled and p.feature in emb.bag_features:
                o = p.devices[0]
                if o == d:
                    continue
                nbytes = 4 * valid.sum() + 4 * b + 2 * b * width  # ids, lengths, rows, gradients
                cross, intra = (cross + nbytes, intra) if o // ln != d // ln else (cross, intra + nbytes)
                continue
            for r in rows[valid]:
                if i in hopped:
                    o = p.devices[r % p.stride]
                    asked[(d // ln * ln + o % ln, i, r)] = width  # hop 1: inside the host
                    host_asked[(d // ln, o, i, r)] = width
                else:
                    asked[(p.devices[r % p.stride], i, r)] = width
        for (o, _, _), width in asked.items():
            if o == d:
                continue
            nbytes = 4 + 2 * width  # the id, the row, its gradient
            cross, intra = (cross + nbytes, intra) if o // ln != d // ln else (cross, intra + nbytes)
    for (h, o, _, _), width in host_asked.items():  # hop 2: across hosts, once per host and row
        if o // ln != h:
            cross += 4 + 2 * width
    if emb.optimizer.kind is OptimizerKind.ROWWISE_ADAGRAD:
        # a table cut into column shards: each holder sends every other the
        # squared-gradient sum of each unique row of the step (4 bytes)
        for i, f in enumerate(feats):
            holders = [p.devices[0] for p in emb.layout.pieces_of(i)]
            if len(holders) < 2 or emb.layout.pieces_of(i)[0].stride != 1:
                continue
            c = ids[:, emb.features.columns(f.name)]
            valid = np.arange(f.max_len)[None, :] < lengths[:, i : i + 1]
            u = len(np.unique(c[valid]))
            for d in holders:
                for o in holders:
                    if o != d:
                        cross, intra = (cross + 4 * u, intra) if o // ln != d // ln else (cross, intra + 4 * u)
    return cross, intra


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "row_wise:device", "column_wise"])
def test_payload_is_what_the_batch_needs(mesh24, sharding):
    """The payload the exchanges count equals the bytes the batch implies:
    bags (ids, one length, one row and one gradient per bag) to the owner of
    a whole-table piece, and one request, row and gradient per unique row
    asked of another device; sending to oneself is free."""
    feats = FeatureSet(tuple(f for f in FEATURES.sparse if not f.hashed), num_dense=1)
    ids, lengths = make_batch(feats, seed=5, id_range=12, batch=32)
    sharding, _, dedup = sharding.partition(":")
    emb = ShardedEmbeddings(feats, mesh24, sharding, row_dedup=dedup or "host")
    assert emb.row_dedup == ("host" if sharding == "row_wise" and not dedup else "device")
    grads = random_grads(feats, {f.name: (32, f.dim) if f.pooled else (32, f.max_len, f.dim)
                                 for f in feats.sparse})
    _, stats = run_step(emb, emb.init(), ids, lengths, grads)
    cross = stats["payload_cross_host_bytes"] + stats["update_payload_cross_host_bytes"]
    intra = stats["payload_intra_host_bytes"] + stats["update_payload_intra_host_bytes"]
    assert (cross, intra) == _payload(emb, ids, lengths)
    assert 0 < stats["ids_unique"] < stats["ids_requested"]  # de-duplication did something


TABLE_OPS = {
    "parameter", "scatter", "bitcast", "tuple", "get-tuple-element", "gather", "fusion", "while",
    "dynamic-slice",  # a row-block read inside the fused lookup loop
    "custom-call",  # the in-place CPU kernel (cpu_kernels), aliased to its output
}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%[\w.-]+ = .*? ([a-z][\w-]*)\(")


def _instructions(hlo_text):
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            yield m.group(1), line.strip()


def _mixed_features(rows):
    """Tables of different sizes: a plan that pads would show a table-sized buffer."""
    sizes = (rows, rows // 10, 3, 700)
    return FeatureSet(tuple(SparseFeature(f"t{i}", r, 16, 4) for i, r in enumerate(sizes)), num_dense=1)


@pytest.mark.parametrize("sharding", TYPES)
def test_step_cost_does_not_grow_with_rows(mesh24, sharding):
    """The compiled step has no table-sized temporary: no dense gradient, no
    copy of a table; its scratch memory is the same for 20k and 2M rows, and
    the tables are updated in place (donated, aliased to the outputs)."""
    check_step_cost(mesh24, sharding)


@pytest.mark.parametrize("sharding,cpu", [("table_wise", False), ("row_wise", False), ("data_parallel", False),
                                          ("table_wise", None)])
def test_half_table_step_cost_does_not_grow_with_rows(mesh24, sharding, cpu):
    """The same for 16-bit tables (read, updated in f32, rounded and written
    in place), on the XLA path and with the C++ kernels where they build."""
    check_step_cost(mesh24, sharding, table_dtype="bf16", cpu_kernels=cpu)


def check_step_cost(mesh, sharding, **kw):
    temps = []
    for rows in (20_000, 2_000_000):
        feats = _mixed_features(rows)
        emb = ShardedEmbeddings(feats, mesh, sharding, **kw)
        ids, lengths = make_batch(feats, id_range=rows)
        shapes = emb.state_shapes()
        wp = jnp.zeros((B, 64))

        def step(state, ids, lengths, wp):
            return emb.step(state, ids, lengths, lambda e, w: jnp.sum(e.pooled * w), wp, seed=jnp.uint32(5))[1]

        lowered = jax.jit(step, donate_argnums=0).lower(shapes, ids, lengths, wp)
        compiled = lowered.compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
        text = compiled.as_text()
        sizes = {r for r, _, _ in emb.layout.storages().values()}
        for op, line in _instructions(text):
            for r in sizes:
                if f"[{r}," in line or f"[{r}]" in line:
                    # a table-sized value may only be the table itself, read or
                    # written in place: never copied, broadcast, added, sorted
                    assert op in TABLE_OPS, line
        assert "input_output_alias" in text
    assert temps[1] <= temps[0] * 1.01 + 4096, temps


@pytest.mark.parametrize("sharding", TYPES)
def test_update_in_chunks_when_unique_rows_exceed_capacity(mesh24, sharding):
    """Many unique ids and a tiny capacity: the update runs several chunks,
    says so, and still equals the reference exactly (nothing dropped).
    (Column shards with row-wise Adagrad never chunk: their row statistics
    are summed over the shards in one pass; Adagrad here.)"""
    feats = FeatureSet(
        (SparseFeature("a", 500, 8, 4), SparseFeature("b", 300, 8, 3, kind="sequence")),
        num_dense=1,
    )
    ids, lengths = make_batch(feats, seed=4, id_range=500)
    # the XLA path (the CPU kernel never chunks)
    emb = ShardedEmbeddings(feats, mesh24, sharding, SparseOptimizer("adagrad", lr=0.2),
                            unique_capacity=0.05, cpu_kernels=False)
    stats = check_step(emb, (ids, lengths), seed=2)
    assert stats["update_unique_overflow"] > 0


def test_bags_or_rows_give_the_same_model(mesh24, batch):
    """Whether a pooled feature's bags go to their owner or its ids ask for
    unique rows is a routing choice: the same embeddings and update."""
    opt = SparseOptimizer(lr=0.3)
    outs = []
    for bags in ((), [f.name for f in FEATURES.sparse if f.pooled]):
        emb = ShardedEmbeddings(FEATURES, mesh24, "table_wise", opt, bag_features=bags)
        outs.append(check_step(emb, batch))
    assert outs[0]["ids_requested"] > outs[1]["ids_requested"]  # only rows ask for rows


# ---- per-sample weights (weighted features) ----------------------------------------------------

WEIGHTED = FeatureSet(
    (
        SparseFeature("u", 50, 8, 4, weighted=True),  # a weighted bag
        SparseFeature("v", 37, 8, 4, combiner="mean"),
        SparseFeature("o", 19, 8, 1, weighted=True),  # one weighted id
        SparseFeature("h", 11, 8, 3, hashed=True, weighted=True),
        SparseFeature("x", 23, 8, 2),
        SparseFeature("s", 30, 8, 5, kind="sequence"),
    ),
    num_dense=1,
)


def weighted_batch(mesh, features=WEIGHTED, seed=0):
    """A batch with per-sample weights: normal values (negative ones too), and
    NaN at padding positions, which must be ignored."""
    ids, lengths = make_batch(features, seed=seed)
    rng = np.random.default_rng(seed + 100)
    w = rng.standard_normal((ids.shape[0], features.weight_slots)).astype(np.float32)
    for i in features.weighted_idx:
        f = features.sparse[i]
        pad = np.arange(f.max_len)[None, :] >= lengths[:, i : i + 1]
        w[:, features.weight_columns(f.name)] = np.where(pad, np.nan, w[:, features.weight_columns(f.name)])
    sh = NamedSharding(mesh, P(DEVICES))
    return jax.device_put(ids, sh), jax.device_put(lengths, sh), jax.device_put(w, sh)


@pytest.mark.parametrize("sharding", ["data_parallel", "table_wise", "row_wise", "row_wise:device", "column_wise",
                                      "host_replicated", "table_wise:rows", "table_row_wise",
                                      "table_wise:host", "table_row_wise:rows"])
@pytest.mark.parametrize("kernel", ["xla", "cpu"])
def test_weighted_features_match_the_reference(mesh24, sharding, kernel):
    """Each bag is the sum of weight x row, and each row's gradient is its
    weight x the bag's, in every sharding type, whether the bag travels to
    its owner with its weights (table_wise, column_wise; over the host path
    to the entry and on to the owner: `:host`, table_row_wise) or asks for
    rows and is pooled by the requester (`:rows`, row_wise) or the entry
    (table_row_wise); padding weights (NaN here) are never read."""
    if kernel == "cpu" and not cpu_kernels.available():
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    sharding, _, how = sharding.partition(":")
    emb = ShardedEmbeddings(WEIGHTED, mesh24, sharding, SparseOptimizer(lr=0.1), cpu_kernels=kernel == "cpu",
                            kernel="xla", row_dedup="device" if how == "device" else "host",
                            bag_features=() if how == "rows" else None,
                            host_features=WEIGHTED.names if how == "host" else None)
    bagged = {emb.tables.sparse[emb.layout.pieces[j].feature].name for r in emb.routes.values()
              for j in r.bag_pieces}
    assert ("u" in bagged) == (sharding in ("table_wise", "column_wise") and how not in ("rows", "host"))
    if emb.host is not None:
        assert emb.host.weighted == (how != "rows")
    check_step(emb, weighted_batch(mesh24))


def test_weighted_features_on_one_device():
    mesh = make_mesh("1x1", devices=jax.devices()[:1])
    for kernel in ("xla", "cpu"):
        if kernel == "cpu" and not cpu_kernels.available():
            continue
        for bags in (None, ()):
            emb = ShardedEmbeddings(WEIGHTED, mesh, "table_wise", SparseOptimizer(lr=0.1),
                                    cpu_kernels=kernel == "cpu", kernel="xla", bag_features=bags)
            check_step(emb, weighted_batch(mesh))


def test_weights_are_required_and_paths_that_cannot_pool_them_refuse(mesh24):
    emb = ShardedEmbeddings(WEIGHTED, mesh24, "table_wise", kernel="xla")
    ids, lengths, w = weighted_batch(mesh24)
    with pytest.raises(ValueError, match="weighted: pass their per-sample weights"):
        emb.forward(emb.init(), ids, lengths)
    with pytest.raises(ValueError, match="expected"):
        emb.forward(emb.init(), ids, lengths, w[:, :3])
    with pytest.raises(ValueError, match="combiner sum"):
        SparseFeature("m", 10, 8, 3, combiner="mean", weighted=True)
    with pytest.raises(ValueError, match="combiner sum"):
        SparseFeature("q", 10, 8, 3, kind="sequence", weighted=True)


def test_weighted_bags_with_the_pallas_kernels(mesh24):
    """The TPU Pallas kernels (interpreted): the owner's weighted pooled gather
    and the update's per-id scales give the reference."""
    emb = ShardedEmbeddings(WEIGHTED, mesh24, "table_wise", SparseOptimizer(lr=0.1), kernel="pallas")
    assert emb.impl.pallas and any(r.bag_weighted.any() for r in emb.routes.values())
    check_step(emb, weighted_batch(mesh24))
