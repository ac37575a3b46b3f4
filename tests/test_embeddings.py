"""Sharded lookups and fused sparse updates vs a single-device numpy reference."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jdmt.data.specs import FeatureSet, SparseFeature
from jdmt.embeddings import Placement, ShardedEmbeddings, SparseOptimizer, cpu_kernels
from jdmt.mesh import DEVICES

B = 16  # global batch: 2 examples per device on 2x4

FEATURES = FeatureSet(
    (
        SparseFeature("u", 50, 8, 4),  # pooled sum
        SparseFeature("v", 37, 8, 4, combiner="mean"),  # rows not divisible by 8
        SparseFeature("w", 5, 8, 4),  # fewer rows than devices
        SparseFeature("x", 23, 8, 2),  # another id cap: its own group
        SparseFeature("h", 11, 8, 4, hashed=True),  # ids reduced modulo rows
        SparseFeature("s", 30, 8, 5, kind="sequence"),
        SparseFeature("t", 9, 8, 5, kind="sequence"),
    ),
    num_dense=1,
)
TYPES = ["data_parallel", "table_wise", "row_wise", "column_wise"]


def make_batch(features, seed=0, id_range=6):
    """Ids from a small range (many duplicates); lengths with empty and full bags."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((B, features.total_slots), np.int32)
    lengths = np.zeros((B, len(features.sparse)), np.int32)
    for i, f in enumerate(features.sparse):
        ln = rng.integers(0, f.max_len + 1, B)
        ln[0], ln[1] = 0, f.max_len  # an empty and a full bag always
        lengths[:, i] = ln
        hi = 10 * f.rows if f.hashed else min(id_range, f.rows)
        cols = rng.integers(-3 * f.rows if f.hashed else 0, hi, (B, f.max_len))
        cols[2, :] = f.rows - 1  # the last row, repeated in one bag
        ids[:, features.columns(f.name)] = cols
    return ids, lengths


def ref_lookup(features, tables, ids, lengths):
    out = {}
    for i, f in enumerate(features.sparse):
        c = ids[:, features.columns(f.name)]
        if f.hashed:
            c = np.mod(c, f.rows)
        m = np.arange(f.max_len)[None, :] < lengths[:, i : i + 1]
        rows = tables[f.name][np.where(m, c, 0)] * m[..., None]
        if f.pooled:
            rows = rows.sum(1)
            if f.combiner.value == "mean":
                rows = rows / np.maximum(lengths[:, i : i + 1], 1)
        out[f.name] = rows
    return out


def ref_step(features, tables, accs, ids, lengths, grads, opt):
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
        for b in range(B):
            for p in range(f.max_len):
                if m[b, p]:
                    g[c[b, p]] += g_out[b] if f.pooled else g_out[b, p]
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


def assert_step_matches(emb, new_state, tables, accs, ids, lengths, grads):
    """Tables and accumulators after a sharded step equal `ref_step`'s."""
    got_t, got_a = emb.to_dense(new_state)
    want_t, want_a, _ = ref_step(emb.features, tables, accs, ids, lengths, grads, emb.optimizer)
    for f in emb.features.sparse:
        np.testing.assert_allclose(got_t[f.name], want_t[f.name], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(got_a[f.name], want_a[f.name], rtol=2e-5, atol=1e-7)


def random_grads(features, out_shapes, seed=1):
    rng = np.random.default_rng(seed)
    return {
        f.name: rng.standard_normal(out_shapes[f.name]).astype(np.float32)
        for f in features.sparse
    }


def run_step(emb, state, ids, lengths, grads):
    """A jitted sparse step whose loss is sum(emb * grads): d loss / d emb = grads."""
    pooled_names = [f.name for f in emb.features.sparse if f.pooled]
    wp = jnp.concatenate([grads[n] for n in pooled_names], axis=1)
    seq = {n: grads[n] for n in grads if n not in pooled_names}

    def loss_fn(e, wp, seq):
        return jnp.sum(e.pooled * wp) + sum(jnp.sum(e.sequence[k] * seq[k]) for k in seq)

    step = jax.jit(lambda s, i, l: emb.step(s, i, l, loss_fn, wp, seq), donate_argnums=0)
    _, new, _, bad = step(state, ids, lengths)
    return new, int(bad)


@pytest.fixture(scope="module")
def batch():
    return make_batch(FEATURES)


@pytest.mark.parametrize("sharding", TYPES)
@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "sgd", "adagrad"])
@pytest.mark.parametrize("kernel", ["xla", "cpu"])
def test_lookup_and_step_match_reference(mesh24, batch, sharding, optimizer, kernel):
    """kernel: the update as XLA ops, or as the C++ CPU kernel (cpu_kernels)."""
    if kernel == "cpu" and not cpu_kernels.available():
        pytest.skip(f"CPU kernel unavailable: {cpu_kernels.unavailable_reason()}")
    ids, lengths = batch
    opt = SparseOptimizer(optimizer, lr=0.5, initial_accumulator=0.1)
    emb = ShardedEmbeddings(FEATURES, mesh24, sharding, opt, cpu_kernels=kernel == "cpu")
    state = emb.init(seed=3)
    tables, accs = emb.to_dense(state)
    sh = NamedSharding(mesh24, P(DEVICES))
    ids_d, len_d = jax.device_put(ids, sh), jax.device_put(lengths, sh)

    out = jax.jit(emb.forward)(state, ids_d, len_d)
    ref = ref_lookup(FEATURES, tables, ids, lengths)
    for f in FEATURES.sparse:
        np.testing.assert_allclose(np.asarray(out[f.name]), ref[f.name], rtol=1e-6, atol=1e-6)

    grads = random_grads(FEATURES, {k: v.shape for k, v in ref.items()})
    new, bad = run_step(emb, state, ids_d, len_d, grads)
    assert bad == 0
    got_t, got_a = emb.to_dense(new)
    ref_accs = accs if accs is not None else {}
    want_t, want_a, touched = ref_step(FEATURES, tables, ref_accs, ids, lengths, grads, opt)
    for f in FEATURES.sparse:
        np.testing.assert_allclose(got_t[f.name], want_t[f.name], rtol=2e-5, atol=2e-6)
        # untouched rows are bit-identical
        assert np.array_equal(got_t[f.name][~touched[f.name]], tables[f.name][~touched[f.name]])
        assert touched[f.name].any() and not touched[f.name].all() or f.rows <= 6
        if want_a[f.name] is not None:
            np.testing.assert_allclose(got_a[f.name], want_a[f.name], rtol=2e-5, atol=1e-7)


# Pallas kernels, interpreted on CPU: every sharding type, with the optimizers
# spread over them (column-wise: row-wise Adagrad over column shards, whose row
# statistics are summed across devices).
PALLAS_CASES = [
    ("data_parallel", "sgd"), ("table_wise", "rowwise_adagrad"), ("row_wise", "adagrad"),
    ("column_wise", "rowwise_adagrad"), ("table_row_wise", "adagrad"),
]


def _check_step(emb, batch, seed=3):
    """Forward and one sparse step of `emb` vs the numpy reference; untouched
    rows bit-identical."""
    ids, lengths = batch
    state = emb.init(seed=seed)
    tables, accs = emb.to_dense(state)
    out = jax.jit(emb.forward)(state, ids, lengths)
    ref = ref_lookup(emb.features, tables, ids, lengths)
    for f in emb.features.sparse:
        np.testing.assert_allclose(np.asarray(out[f.name]), ref[f.name], rtol=1e-6, atol=1e-6)
    grads = random_grads(emb.features, {k: v.shape for k, v in ref.items()})
    new, bad = run_step(emb, state, ids, lengths, grads)
    assert bad == 0
    got_t, got_a = emb.to_dense(new)
    want_t, want_a, touched = ref_step(emb.features, tables, accs or {}, ids, lengths, grads,
                                       emb.optimizer)
    for f in emb.features.sparse:
        np.testing.assert_allclose(got_t[f.name], want_t[f.name], rtol=2e-5, atol=2e-6)
        assert np.array_equal(got_t[f.name][~touched[f.name]], tables[f.name][~touched[f.name]])
        if want_a[f.name] is not None:
            np.testing.assert_allclose(got_a[f.name], want_a[f.name], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("sharding, optimizer", PALLAS_CASES)
def test_pallas_tpu_kernels_in_every_sharding(mesh24, batch, sharding, optimizer):
    opt = SparseOptimizer(optimizer, lr=0.5, initial_accumulator=0.1)
    emb = ShardedEmbeddings(FEATURES, mesh24, sharding, opt, kernel="pallas")
    assert (emb.impl.target, emb.impl.interpret, emb.cpu_kernels) == ("tpu", True, False)
    _check_step(emb, batch)


@pytest.mark.parametrize("sharding, optimizer", PALLAS_CASES[1:2])
def test_pallas_gpu_kernels_in_the_sharded_step(batch, sharding, optimizer):
    """The Mosaic GPU kernels in the same pipeline, on a one-device mesh: jax
    0.10.2's Mosaic GPU interpreter keeps its simulated shared memory in one
    process-wide table and fails when several emulated devices run kernels at
    once (the TPU kernels cover the multi-device layouts above)."""
    from jdmt.mesh import make_mesh
    from jdmt.pallas_kernels import Impl

    mesh = make_mesh("1x1", devices=jax.devices()[:1])
    opt = SparseOptimizer(optimizer, lr=0.5, initial_accumulator=0.1)
    emb = ShardedEmbeddings(FEATURES, mesh, sharding, opt, kernel=Impl("pallas", "gpu", True))
    _check_step(emb, batch)


def test_mixed_plan_with_explicit_placements(mesh24, batch):
    """One model with every sharding type at once, owners chosen by hand."""
    ids, lengths = batch
    plan = {
        "u": Placement("table_wise", (5,)),
        "v": Placement("column_wise", (7, 1)),
        "w": Placement("row_wise", tuple(range(8))),
        "x": Placement("data_parallel", tuple(range(8))),
        "h": Placement("table_wise", (5,)),
        "s": Placement("column_wise", (0, 3, 6, 2)),
        "t": Placement("row_wise", tuple(range(8))),
    }
    opt = SparseOptimizer(lr=0.3)
    emb = ShardedEmbeddings(FEATURES, mesh24, plan, opt)
    state = emb.init(seed=1)
    tables, accs = emb.to_dense(state)
    ref = ref_lookup(FEATURES, tables, ids, lengths)
    grads = random_grads(FEATURES, {k: v.shape for k, v in ref.items()}, seed=5)
    new, _ = run_step(emb, state, ids, lengths, grads)
    assert_step_matches(emb, new, tables, accs, ids, lengths, grads)


def test_init_is_independent_of_the_plan(mesh24):
    embs = [ShardedEmbeddings(FEATURES, mesh24, t) for t in TYPES]
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


def test_tables_are_really_sharded(mesh24):
    emb = ShardedEmbeddings(FEATURES, mesh24, "row_wise")
    state = emb.init()
    for name, st in state.items():
        shards = st.weights.addressable_shards
        assert len(shards) == 8
        assert shards[0].data.shape[0] * 8 == st.weights.shape[0]


def test_out_of_range_ids_are_counted_not_wrapped(mesh24, batch):
    ids, lengths = batch
    ids = ids.copy()
    col = FEATURES.columns("u").start
    lengths = lengths.copy()
    lengths[3, FEATURES.index("u")] = 2
    ids[3, col] = 50  # rows = 50
    ids[3, col + 1] = -1
    emb = ShardedEmbeddings(FEATURES, mesh24, "table_wise")
    state = emb.init()
    routed = jax.jit(emb.route)(ids, lengths)
    assert int(routed.out_of_range) == 2
    # the bad ids read as nothing: the bag's embedding is zero
    out = jax.jit(emb.forward)(state, ids, lengths)
    assert np.all(np.asarray(out["u"])[3] == 0)


TABLE_OPS = {
    "parameter", "scatter", "bitcast", "tuple", "get-tuple-element", "gather", "fusion", "while",
    "custom-call",  # the in-place CPU kernel (cpu_kernels), aliased to its output
}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%[\w.-]+ = .*? ([a-z][\w-]*)\(")


def _instructions(hlo_text):
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            yield m.group(1), line.strip()


def _big_features(rows):
    return FeatureSet(tuple(SparseFeature(f"t{i}", rows, 16, 4) for i in range(4)), num_dense=1)


@pytest.mark.parametrize("sharding", TYPES)
def test_step_cost_does_not_grow_with_rows(mesh24, sharding):
    """The compiled step has no table-sized temporary: no dense gradient, no
    copy of a table; its scratch memory is the same for 2k and 200k rows, and
    the tables are updated in place (donated, aliased to the outputs)."""
    temps = []
    for rows in (2_000, 200_000):
        feats = _big_features(rows)
        emb = ShardedEmbeddings(feats, mesh24, sharding)
        ids, lengths = make_batch(feats, id_range=rows)
        shapes = emb.state_shapes()
        wp = jnp.zeros((B, 64))

        def step(state, ids, lengths, wp):
            return emb.step(state, ids, lengths, lambda e, w: jnp.sum(e.pooled * w), wp)[1]

        lowered = jax.jit(step, donate_argnums=0).lower(shapes, ids, lengths, wp)
        compiled = lowered.compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
        text = compiled.as_text()
        local = next(iter(emb.groups.values())).local_rows
        for op, line in _instructions(text):
            if f"[{local}," in line or f"[{local}]" in line:
                # a table-sized value may only be the table itself, read or
                # written in place: never copied, broadcast, added, sorted
                assert op in TABLE_OPS, line
        assert "input_output_alias" in text
    assert temps[1] <= temps[0] * 1.01 + 4096, temps


@pytest.mark.parametrize("sharding", TYPES)
def test_update_in_chunks_when_unique_rows_exceed_capacity(mesh24, sharding):
    """Many unique ids and a tiny capacity: the update runs several chunks,
    says so, and still equals the reference exactly (nothing dropped)."""
    feats = FeatureSet(
        (SparseFeature("a", 500, 8, 4), SparseFeature("b", 300, 8, 3, kind="sequence")),
        num_dense=1,
    )
    ids, lengths = make_batch(feats, seed=4, id_range=500)
    opt = SparseOptimizer(lr=0.2)
    # the XLA path (the CPU kernel never chunks)
    emb = ShardedEmbeddings(feats, mesh24, sharding, opt, unique_capacity=0.05, cpu_kernels=False)
    state = emb.init(seed=2)
    tables, accs = emb.to_dense(state)
    ref = ref_lookup(feats, tables, ids, lengths)
    grads = random_grads(feats, {k: v.shape for k, v in ref.items()})
    wp, seq = jnp.asarray(grads["a"]), {"b": jnp.asarray(grads["b"])}

    def step(state, ids, lengths):
        routed = emb.route(ids, lengths)
        out = emb.lookup(state, routed)

        def loss(o):
            e = emb.output_dist(o, lengths)
            return jnp.sum(e.pooled * wp) + jnp.sum(e.sequence["b"] * seq["b"])

        g = jax.grad(loss)(out)
        return emb.apply_gradients_with_stats(state, routed, g, out)

    new, stats = jax.jit(step)(state, ids, lengths)
    assert int(stats["unique_overflow"]) > 0
    assert_step_matches(emb, new, tables, accs, ids, lengths, grads)


def test_table_wise_forward_moves_the_expected_bytes(mesh24):
    """The flat table-wise lookup: one all-to-all of ids and one of pooled rows,
    each device receiving 1/8 of its peers' payload from each of them."""
    from jdmt.comm import comm_report

    feats = FeatureSet(tuple(SparseFeature(f"f{i}", 30, 8, 3) for i in range(8)), num_dense=1)
    emb = ShardedEmbeddings(feats, mesh24, "table_wise")
    assert all(len(p.devices) == 1 for p in emb.plan.values())
    assert len({p.devices[0] for p in emb.plan.values()}) == 8  # one table per device
    ids, lengths = make_batch(feats)
    rep = comm_report(jax.jit(lambda s, i, n: emb.forward(s, i, n).pooled), emb.init(), ids,
                      lengths, mesh=mesh24)
    ids_payload = 8 * 1 * 2 * 3 * 4  # [N, K, B_local, L] int32 per device
    emb_payload = 8 * 1 * 2 * 8 * 4  # [N, K, B_local, D] f32 per device
    per_peer = (ids_payload + emb_payload) / 8
    assert rep.by_kind["all-to-all"]["count"] == 2
    assert rep.per_device_cross_host_bytes == 4 * per_peer  # 4 peers on the other host
    assert rep.per_device_intra_host_bytes == 3 * per_peer
    assert rep.cross_host_bytes == 8 * 4 * per_peer
