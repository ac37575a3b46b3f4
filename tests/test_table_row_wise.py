"""Table-row-wise sharding: a table on one host, its rows over the host's devices.

Checked like the other types (tests/test_embeddings.py, whose reference and
helpers are reused): lookups and one-step tables/accumulators equal a numpy
single-device reference, untouched rows stay bit-identical, the compiled step
copies no table, and only the all-to-alls over `host` cross hosts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import test_embeddings as te
from jdmt.comm import comm_report
from jdmt.data.specs import FeatureSet, SparseFeature
from jdmt.embeddings import (
    Placement,
    ShardedEmbeddings,
    SparseOptimizer,
    build_groups,
    check_plan,
    cpu_kernels,
    dense_from_buffers,
    plan_sharding,
)
from jdmt.embeddings.table_row_wise import TableRowWiseGroup
from jdmt.mesh import DEVICES, make_mesh

TRW = "table_row_wise"
HOST0, HOST1 = tuple(range(4)), tuple(range(4, 8))


def _kernel_or_skip(kernel):
    if kernel == "cpu" and not cpu_kernels.available():
        pytest.skip(f"CPU kernel unavailable: {cpu_kernels.unavailable_reason()}")


@pytest.fixture(scope="module")
def batch():
    return te.make_batch(te.FEATURES)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "sgd", "adagrad"])
@pytest.mark.parametrize("kernel", ["xla", "cpu"])
def test_lookup_and_step_match_reference(mesh24, batch, optimizer, kernel):
    """Pooled (sum, mean, hashed, a 5-row table: one device of its host holds
    no rows) and sequence features, duplicate ids, empty and full bags, rows
    not divisible by 4; both update paths. The checks are test_embeddings'."""
    emb = ShardedEmbeddings(te.FEATURES, mesh24, TRW)
    assert {p.type.value for p in emb.plan.values()} == {TRW}
    assert {p.devices for p in emb.plan.values()} == {HOST0, HOST1}
    assert all(isinstance(g, TableRowWiseGroup) for g in emb.groups.values())
    te.test_lookup_and_step_match_reference(mesh24, batch, TRW, optimizer, kernel)


FEW = FeatureSet(
    (
        *te.FEATURES.sparse,
        SparseFeature("z", 3, 8, 4),  # fewer rows than the host's 4 devices
        SparseFeature("q", 2, 8, 5, kind="sequence"),  # likewise, a sequence
    ),
    num_dense=1,
)
MIXED_PLAN = {
    "u": Placement(TRW, HOST1),
    "v": Placement("table_wise", (2,)),
    "w": Placement(TRW, HOST1),
    "x": Placement(TRW, HOST1),  # its group: host 1 only, host 0 has an empty slot
    "h": Placement("table_wise", (6,)),
    "s": Placement(TRW, HOST0),
    "t": Placement("table_wise", (3,)),
    "z": Placement(TRW, HOST1),
    "q": Placement(TRW, HOST1),
}


@pytest.mark.parametrize("optimizer, kernel", [("rowwise_adagrad", "xla"), ("adagrad", "cpu")])
def test_mixed_with_table_wise(mesh24, optimizer, kernel):
    """Table-wise and table-row-wise tables in one model, uneven hosts
    (three pooled tables of one cap on host 1, none on host 0), tables with
    fewer rows than devices per host."""
    _kernel_or_skip(kernel)
    ids, lengths = te.make_batch(FEW, seed=3)
    opt = SparseOptimizer(optimizer, lr=0.4, initial_accumulator=0.1)
    emb = ShardedEmbeddings(FEW, mesh24, MIXED_PLAN, opt, cpu_kernels=kernel == "cpu")
    state = emb.init(seed=5)
    tables, accs = emb.to_dense(state)
    out = jax.jit(emb.forward)(state, ids, lengths)
    ref = te.ref_lookup(FEW, tables, ids, lengths)
    for f in FEW.sparse:
        np.testing.assert_allclose(np.asarray(out[f.name]), ref[f.name], rtol=1e-6, atol=1e-6)
    grads = te.random_grads(FEW, {k: v.shape for k, v in ref.items()}, seed=2)
    new, bad = te.run_step(emb, state, ids, lengths, grads)
    assert bad == 0
    te.assert_step_matches(emb, new, tables, accs, ids, lengths, grads)
    got, _ = emb.to_dense(new)
    _, _, touched = te.ref_step(FEW, tables, accs, ids, lengths, grads, opt)
    for f in FEW.sparse:
        assert np.array_equal(got[f.name][~touched[f.name]], tables[f.name][~touched[f.name]])


@pytest.mark.parametrize("spec", ["4x2", "8x1", "1x8"])
def test_other_mesh_shapes(spec):
    """More hosts than tables per host, one device per host (a host's only
    device holds the table: table-wise by another route), one host."""
    mesh = make_mesh(spec)
    ids, lengths = te.make_batch(te.FEATURES, seed=7)
    opt = SparseOptimizer(lr=0.3, initial_accumulator=0.1)
    emb = ShardedEmbeddings(te.FEATURES, mesh, TRW, opt, cpu_kernels=False)
    state = emb.init(seed=1)
    tables, accs = emb.to_dense(state)
    out = jax.jit(emb.forward)(state, ids, lengths)
    ref = te.ref_lookup(te.FEATURES, tables, ids, lengths)
    for f in te.FEATURES.sparse:
        np.testing.assert_allclose(np.asarray(out[f.name]), ref[f.name], rtol=1e-6, atol=1e-6)
    grads = te.random_grads(te.FEATURES, {k: v.shape for k, v in ref.items()}, seed=4)
    new, _ = te.run_step(emb, state, ids, lengths, grads)
    te.assert_step_matches(emb, new, tables, accs, ids, lengths, grads)


def test_step_cost_does_not_grow_with_rows(mesh24):
    """No table-sized temporary or copy; the same scratch for 2k and 200k rows."""
    te.test_step_cost_does_not_grow_with_rows(mesh24, TRW)


def test_update_in_chunks_when_unique_rows_exceed_capacity(mesh24):
    te.test_update_in_chunks_when_unique_rows_exceed_capacity(mesh24, TRW)


def test_only_the_host_all_to_alls_cross_hosts(mesh24):
    """Forward: exact bytes per device (ids and pooled rows over `host`, the
    id gather and the reduce-scatter over `local`). Whole step: every
    collective with cross-host bytes is an all-to-all between the same local
    rank of the two hosts; the collectives over `local` stay in the host;
    the update communicates nothing but the scalar counters."""
    feats = FeatureSet(tuple(SparseFeature(f"f{i}", 30, 8, 3) for i in range(8)), num_dense=1)
    emb = ShardedEmbeddings(feats, mesh24, TRW)
    assert sorted(p.devices for p in emb.plan.values()) == [HOST0] * 4 + [HOST1] * 4
    ids, lengths = te.make_batch(feats)
    h, ln, k, b, p, d = 2, 4, 4, 2, 3, 8  # hosts, local, slots per host, local batch, cap, dim
    rep = comm_report(jax.jit(lambda s, i, n: emb.forward(s, i, n).pooled), emb.init(), ids,
                      lengths, mesh=mesh24)
    assert rep.by_kind["all-to-all"]["count"] == 2
    assert rep.per_device_cross_host_bytes == (h - 1) * k * b * (p + d) * 4
    assert rep.per_device_intra_host_bytes == (ln - 1) * h * k * b * (p + d) * 4
    # the same bytes cross hosts as the flat table-wise path (one table per device)
    tw = ShardedEmbeddings(feats, mesh24, "table_wise")
    rep_tw = comm_report(jax.jit(lambda s, i, n: tw.forward(s, i, n).pooled), tw.init(), ids,
                         lengths, mesh=mesh24)
    assert rep.cross_host_bytes == rep_tw.cross_host_bytes

    wp = jnp.asarray(np.random.default_rng(0).standard_normal((16, 64)), jnp.float32)

    def step(state, ids, lengths):
        return emb.step(state, ids, lengths, lambda e: jnp.sum(jnp.sin(e.pooled) * wp))[1]

    rep = comm_report(jax.jit(step), emb.init(), ids, lengths, mesh=mesh24)
    peers = {tuple(g) for g in ([0, 4], [1, 5], [2, 6], [3, 7])}
    hosts = {HOST0, HOST1}
    kinds = []
    for c in rep.collectives:
        groups = {tuple(g) for g in c.groups}
        if c.kind == "all-reduce":
            assert c.operand_bytes <= 4  # the out-of-range and overflow counters
            continue
        kinds.append(c.kind)
        if groups == peers:
            assert c.kind == "all-to-all" and c.intra_host_bytes == 0 and c.cross_host_bytes > 0
        else:
            assert groups == hosts and c.cross_host_bytes == 0, c
    # forward: 2 all-to-alls, the id gather, the reduce-scatter; backward: the
    # transposes of the output stage (all-to-all, all-gather)
    assert sorted(kinds) == sorted(["all-to-all"] * 3 + ["all-gather"] * 2 + ["reduce-scatter"])


def test_shards_live_on_the_owner_host(mesh24):
    """A table's rows are split over its host's devices only: the other host's
    buffers hold none of its rows; from_dense/to_dense round-trip; init is
    the same as under any other plan."""
    emb = ShardedEmbeddings(FEW, mesh24, MIXED_PLAN)
    g = emb.groups["trw_pooled_d8_l4"]
    assert g.local_rows == 13 + 2 + 1  # ceil(50/4) + ceil(5/4) + ceil(3/4) on host 1
    for dev in range(8):
        rows = {(s.feature, s.row0, s.rows) for s in g.segments[dev]}
        if dev < 4:
            assert not rows
    u = FEW.index("u")
    assert [s.rows for dev in HOST1 for s in g.segments[dev] if s.feature == u] == [13, 13, 13, 11]
    z = FEW.index("z")
    assert [s.rows for dev in HOST1 for s in g.segments[dev] if s.feature == z] == [1, 1, 1]
    rng = np.random.default_rng(0)
    tables = {f.name: rng.standard_normal((f.rows, f.dim)).astype(np.float32) for f in FEW.sparse}
    back, _ = emb.to_dense(emb.from_dense(tables))
    for name in tables:
        assert np.array_equal(back[name], tables[name])
    a = emb.to_dense(emb.init(seed=9))[0]
    b = ShardedEmbeddings(FEW, mesh24, "row_wise")
    b = b.to_dense(b.init(seed=9))[0]
    for name in a:
        assert np.array_equal(a[name], b[name])


def test_layout_rebuilds_without_a_mesh(mesh24):
    """`build_groups` reads L from the placements (as a checkpoint restore
    does, knowing only the device count): the same layout, and
    `dense_from_buffers` gives the tables back."""
    emb = ShardedEmbeddings(FEW, mesh24, MIXED_PLAN)
    state = emb.init(seed=2)
    rebuilt = build_groups(FEW, emb.plan, 8)
    assert list(rebuilt) == list(emb.groups)
    for name, g in emb.groups.items():
        assert rebuilt[name].segments == g.segments
    host = {n: (np.asarray(s.weights), np.asarray(s.accum)) for n, s in state.items()}
    tables, accs = dense_from_buffers(FEW, rebuilt, 8, host)
    want_t, want_a = emb.to_dense(state)
    for name in tables:
        assert np.array_equal(tables[name], want_t[name])
        assert np.array_equal(accs[name], want_a[name])


def test_plan_sharding_puts_tables_on_the_least_loaded_host():
    feats = FeatureSet(
        (SparseFeature("big", 1000, 8, 1), *(SparseFeature(f"s{i}", 100, 8, 1) for i in range(10))),
        num_dense=1,
    )
    plan = plan_sharding(feats, 8, TRW, local=4)
    assert plan["big"].devices == HOST0  # largest first, ties to the lower host
    assert all(plan[f"s{i}"].devices == HOST1 for i in range(10))  # 1000 rows vs 100 each
    plan = plan_sharding(feats, 8, TRW, local=2)
    per_host = {}
    for p in plan.values():
        per_host.setdefault(p.devices[0] // 2, []).append(p)
    assert sorted(per_host) == [0, 1, 2, 3]
    # one type per table works too, mixed with table-wise
    mixed = plan_sharding(feats, 8, {f.name: "table_wise" if f.name == "big" else TRW
                                     for f in feats.sparse}, local=4)
    assert mixed["big"].type.value == "table_wise"
    check_plan(feats, mixed, 8, 4)


@pytest.mark.parametrize(
    "devices, match",
    [
        ((2, 3, 4, 5), r"exactly the 4 devices of one host .* on hosts \[0, 1\]"),
        ((0, 1), "exactly the 4 devices of one host"),
        ((4, 5, 7, 6), "exactly the 4 devices of one host"),
        ((0, 1, 2, 3, 4, 5, 6, 7), "exactly the 4 devices of one host"),
    ],
)
def test_placements_that_are_not_one_host_are_refused(mesh24, devices, match):
    plan = dict(MIXED_PLAN, u=Placement(TRW, devices))
    with pytest.raises(ValueError, match="feature 'u': table_row_wise needs " + match):
        ShardedEmbeddings(FEW, mesh24, plan)
    with pytest.raises(ValueError, match="feature 'u'"):
        check_plan(FEW, plan, 8, 4)


def test_plan_errors_without_the_mesh():
    # without `local`, L is each placement's device count: it must be one
    # host's aligned block, divide the mesh, and agree between tables
    check_plan(FEW, MIXED_PLAN, 8)
    with pytest.raises(ValueError, match="one host"):
        check_plan(FEW, dict(MIXED_PLAN, u=Placement(TRW, (1, 2))), 8)
    with pytest.raises(ValueError, match="does not divide"):
        check_plan(FEW, dict(MIXED_PLAN, u=Placement(TRW, (0, 1, 2))), 8)
    with pytest.raises(ValueError, match="disagree"):
        check_plan(FEW, dict(MIXED_PLAN, u=Placement(TRW, (0, 1))), 8)
    with pytest.raises(ValueError, match="disagree"):
        build_groups(FEW, dict(MIXED_PLAN, u=Placement(TRW, (0, 1))), 8)
    with pytest.raises(ValueError, match="local="):
        plan_sharding(FEW, 8, TRW)
    with pytest.raises(ValueError, match="does not divide"):
        plan_sharding(FEW, 8, TRW, local=3)


def test_out_of_range_ids_are_counted(mesh24, batch):
    ids, lengths = batch
    ids, lengths = ids.copy(), lengths.copy()
    col = te.FEATURES.columns("u").start
    lengths[3, te.FEATURES.index("u")] = 2
    ids[3, col], ids[3, col + 1] = 50, -1  # rows = 50
    emb = ShardedEmbeddings(te.FEATURES, mesh24, TRW)
    sh = NamedSharding(mesh24, P(DEVICES))
    ids, lengths = jax.device_put(ids, sh), jax.device_put(lengths, sh)
    assert int(jax.jit(emb.route)(ids, lengths).out_of_range) == 2
    out = jax.jit(emb.forward)(emb.init(), ids, lengths)
    assert np.all(np.asarray(out["u"])[3] == 0)
