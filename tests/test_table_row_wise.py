"""Table-row-wise sharding: a table on one host, its rows over the host's devices.

The numerical checks (every optimizer, both update paths, other mesh shapes,
mixed plans) run in tests/test_embeddings.py with the other types. Here:
mixed with table-wise on uneven hosts, what crosses hosts (only the host
hop, never the row requests inside a host), the layout, and the plan.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_embeddings as te
from jdmt.comm import comm_report
from jdmt.data.specs import FeatureSet, SparseFeature
from jdmt.embeddings import Placement, ShardedEmbeddings, SparseOptimizer, check_plan, plan_sharding
from jdmt.embeddings.layout import Layout, storage_name

TRW = "table_row_wise"
HOST0, HOST1 = tuple(range(4)), tuple(range(4, 8))

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
    "x": Placement(TRW, HOST1),
    "h": Placement("table_wise", (6,)),
    "o": Placement(TRW, HOST0),
    "s": Placement(TRW, HOST0),
    "t": Placement("table_wise", (3,)),
    "z": Placement(TRW, HOST1),
    "q": Placement(TRW, HOST1),
}


@pytest.mark.parametrize("optimizer, kernel", [("rowwise_adagrad", "xla"), ("adagrad", "cpu")])
def test_mixed_with_table_wise(mesh24, optimizer, kernel):
    """Table-wise and table-row-wise tables in one model, uneven hosts (most
    row-spread tables on host 1), tables with fewer rows than devices per
    host; pooled bags, one-id bags and sequences."""
    if kernel == "cpu" and not te.cpu_kernels.available():
        pytest.skip(f"CPU kernel unavailable: {te.cpu_kernels.unavailable_reason()}")
    opt = SparseOptimizer(optimizer, lr=0.4, initial_accumulator=0.1)
    emb = ShardedEmbeddings(FEW, mesh24, MIXED_PLAN, opt, cpu_kernels=kernel == "cpu")
    assert set(emb.host.hosted) == {FEW.index(n) for n, p in MIXED_PLAN.items() if p.type.value == TRW}
    te.check_step(emb, te.make_batch(FEW, seed=3), seed=5, grad_seed=2)


def test_only_the_host_hop_crosses_hosts(mesh24):
    """Every collective with cross-host bytes is over `host` (device (h, l)
    with (h', l) only: the groups {0, 4}, {1, 5}, ...); the row requests
    and rows inside a host stay inside it; and the cross-host payload is the
    flat table-wise path's (one table per device: ids, lengths, one row and
    one gradient per bag)."""
    feats = FeatureSet(tuple(SparseFeature(f"f{i}", 30, 8, 3) for i in range(8)), num_dense=1)
    emb = ShardedEmbeddings(feats, mesh24, TRW)
    assert sorted(p.devices for p in emb.plan.values()) == [HOST0] * 4 + [HOST1] * 4
    ids, lengths = te.make_batch(feats)
    wp = jnp.asarray(np.random.default_rng(0).standard_normal((16, 64)), jnp.float32)

    def step(state, ids, lengths):
        return emb.step(state, ids, lengths, lambda e: jnp.sum(jnp.sin(e.pooled) * wp))[1]

    rep = comm_report(jax.jit(step), emb.init(), ids, lengths, mesh=mesh24)
    peers = {(0, 4), (1, 5), (2, 6), (3, 7)}
    for c in rep.collectives:
        if c.cross_host_bytes:
            assert {tuple(g) for g in c.groups} == peers or c.kind == "all-reduce" and c.operand_bytes <= 8, c
    # the same payload crosses hosts as on the flat table-wise path with the
    # same tables on each host
    tw_plan = {n: Placement("table_wise", (p.devices[i % 4],)) for i, (n, p) in enumerate(emb.plan.items())}
    tw = ShardedEmbeddings(feats, mesh24, tw_plan)
    grads = te.random_grads(feats, {f.name: (16, 8) for f in feats.sparse})
    _, s_trw = te.run_step(emb, emb.init(), ids, lengths, grads)
    _, s_tw = te.run_step(tw, tw.init(), ids, lengths, grads)
    cross = lambda s: s["payload_cross_host_bytes"] + s["update_payload_cross_host_bytes"]  # noqa: E731
    assert cross(s_trw) == cross(s_tw) > 0


def test_shards_live_on_the_owner_host(mesh24):
    """A table's rows are spread over its host's devices only, row r on local
    rank r % 4; from_dense / to_dense round-trip; init is the same as under
    any other plan."""
    emb = ShardedEmbeddings(FEW, mesh24, MIXED_PLAN)
    u = [p for p in emb.layout.pieces if p.feature == FEW.index("u")][0]
    assert u.devices == HOST1 and u.stride == 4
    assert [u.shard_rows(50, s) for s in range(4)] == [13, 13, 12, 12]
    owned = emb.layout.owned_rows[8]
    z = [p for p in emb.layout.pieces if p.feature == FEW.index("z")][0]
    assert [z.shard_rows(3, s) for s in range(4)] == [1, 1, 1, 0]
    assert owned[:4].sum() + owned[4:].sum() == sum(f.rows for f in FEW.sparse)
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
    """`Layout` needs only features, plan and mesh shape (as a checkpoint
    restore knows them): it reads the tables back out of saved buffers."""
    emb = ShardedEmbeddings(FEW, mesh24, MIXED_PLAN, SparseOptimizer(initial_accumulator=0.5))
    state = emb.init(seed=2)
    rebuilt = Layout(FEW, emb.plan, 2, 4)
    assert rebuilt.pieces == emb.layout.pieces and rebuilt.rows == emb.layout.rows
    w = {n: np.asarray(s.weights) for n, s in state.items()}
    a = {n: np.asarray(s.accum) for n, s in state.items()}
    want_t, want_a = emb.to_dense(state)
    for f, t, acc in zip(FEW.sparse, rebuilt.to_dense(w), rebuilt.to_dense(a, per_row=True)):
        assert np.array_equal(t, want_t[f.name]) and np.array_equal(acc, want_a[f.name])
    assert set(w) == {storage_name(8)}  # one buffer for the one width: no per-table padding


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
    with pytest.raises(ValueError, match="local="):
        plan_sharding(FEW, 8, TRW)
    with pytest.raises(ValueError, match="does not divide"):
        plan_sharding(FEW, 8, TRW, local=3)
