"""The sharding planner: cost model sanity, budget, baselines, and plans that run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdmt.data.presets import mlperf_dcnv2_features, synthetic_default_features
from jdmt.data.specs import FeatureSet, SparseFeature
from jdmt.embeddings import Placement, ShardedEmbeddings, SparseOptimizer, build_groups
from jdmt.embeddings.optimizers import accumulator_shape
from jdmt.mesh import Topology
from jdmt.planner import (
    AnalyticCostModel,
    CostModel,
    PlanCost,
    PlanningError,
    Problem,
    auto_plan,
    baseline_plans,
)

B = 16  # global batch of the runnable tests: 2 examples per device on 2x4

# Small tables for the runnable tests: six alike, one big, one tiny with its
# own id cap, a sequence and a wide table.
MIXED = FeatureSet(
    (
        *(SparseFeature(f"m{i}", 100, 16, 4) for i in range(6)),
        SparseFeature("big", 4000, 16, 4),
        SparseFeature("tiny", 10, 8, 2),
        SparseFeature("seq", 300, 16, 5, kind="sequence"),
        SparseFeature("wide", 200, 32, 3, combiner="mean"),
    ),
    num_dense=1,
)
BIG_BYTES = 4000 * (16 * 4 + 4)  # the big table with row-wise Adagrad state
SPLIT = ("row_wise", "column_wise", "table_row_wise")  # the types that split a table


def types_of(plan):
    return {p.type.value for p in plan.placements.values()}


# ---- cost model ------------------------------------------------------------------------------


def test_cross_host_bytes_come_only_from_peers_on_other_hosts():
    feats = FeatureSet((SparseFeature("a", 1000, 16, 4), SparseFeature("b", 50, 8, 2)), num_dense=1)
    model = AnalyticCostModel()
    for hosts, local in ((1, 8), (2, 4), (8, 1), (4, 2)):
        pr = Problem(feats, hosts, local, 64)
        n = hosts * local
        plan = {"a": Placement("row_wise", range(n)), "b": Placement("table_wise", (n - 1,))}
        c = model.evaluate(pr, plan)
        cross, intra = c.cross_host_bytes.sum(0), c.intra_host_bytes.sum(0)
        # every collective spans all devices with equal chunks: per peer X
        per_peer = (cross + intra) / (n - 1)
        np.testing.assert_allclose(cross, per_peer * (n - local))
        np.testing.assert_allclose(intra, per_peer * (local - 1))
        if hosts == 1:
            assert not cross.any() and intra.all()
        if local == 1:
            assert not intra.any() and cross.all()
        topo = pr.topology
        np.testing.assert_allclose(c.comm_s, cross / topo.cross_host_bw + intra / topo.intra_host_bw)


def test_cost_model_counts():
    """Hand-checked numbers for one table of each type on 2x4."""
    f = SparseFeature("a", 1000, 16, 4)
    pr = Problem(FeatureSet((f,), num_dense=1), 2, 4, 64, optimizer="sgd")
    model = AnalyticCostModel(id_bytes=0, access_bytes=1, unique_fraction=1.0)
    b = 64 / 8  # local batch
    tw = model.evaluate(pr, {"a": Placement("table_wise", (3,))})
    # forward: ids (4 x 4 bytes) and pooled rows (16 x 4) per example from each peer
    assert tw.cross_host_bytes[0, 0] == 4 * b * (16 + 64)
    assert tw.intra_host_bytes[1, 0] == 3 * b * 64  # backward: gradients
    assert tw.cross_host_bytes[2].sum() == 0  # sgd table-wise update is local
    assert tw.memory_bytes.tolist() == [1000 * 64] * 8  # the fused buffer is padded
    assert tw.used_bytes.tolist() == [0, 0, 0, 64000, 0, 0, 0, 0]
    # the owner reads 64 ids x 4 rows forward and writes them back (sgd)
    assert tw.lookup_s[3] == pytest.approx(64 * 4 * 64 * 3 / model.memory_bw)
    assert tw.lookup_s[0] == 0
    rw = model.evaluate(pr, {"a": Placement("row_wise", range(8))})
    assert rw.memory_bytes[0] == 125 * 64
    assert rw.cross_host_bytes[0, 0] == 4 * b * (16 + 64)  # all-gather ids + reduce-scatter
    assert np.ptp(rw.lookup_s) == 0
    dp = model.evaluate(pr, {"a": Placement("data_parallel", range(8))})
    assert dp.cross_host_bytes[:2].sum() == 0 and dp.cross_host_bytes[2, 0] == 4 * b * (16 + 64)
    assert dp.memory_bytes[0] == 64000
    cw = model.evaluate(pr, {"a": Placement("column_wise", (0, 1, 2, 3))})
    assert cw.memory_bytes[0] == 1000 * 16  # width-4 shards
    assert cw.cross_host_bytes[0, 0] == 4 * b * 4 * (4 + 4)  # 4 shards: K = 1, ids + width 4


def test_cost_model_counts_table_row_wise():
    """Hand-checked numbers for a table-row-wise table on host 1 of 2x4: only
    the all-to-alls over `host` cross hosts (one peer host), the gather and
    reduce-scatter over `local` stay inside (three peers)."""
    f = SparseFeature("a", 1000, 16, 4)
    pr = Problem(FeatureSet((f,), num_dense=1), 2, 4, 64, optimizer="sgd")
    model = AnalyticCostModel(id_bytes=0, access_bytes=1, unique_fraction=1.0)
    b = 64 / 8
    c = model.evaluate(pr, {"a": Placement("table_row_wise", (4, 5, 6, 7))})
    h, k, ln = 2, 1, 4  # hosts, slots per host, devices per host
    assert c.cross_host_bytes[:, 0].tolist() == [(h - 1) * k * b * (16 + 64), (h - 1) * k * b * 64, 0]
    assert c.intra_host_bytes[:, 0].tolist() == [
        (ln - 1) * h * k * b * (16 + 64), (ln - 1) * h * k * b * 64, 0]
    assert np.ptp(c.cross_host_bytes, axis=1).max() == 0  # the same on every device
    assert c.memory_bytes.tolist() == [250 * 64] * 8  # ceil(1000 / 4) rows per device
    assert c.used_bytes.tolist() == [0] * 4 + [250 * 64] * 4
    # each device of host 1 reads a quarter of the 64 x 4 ids and writes them back
    assert c.lookup_s[4] == pytest.approx(64 * 4 / 4 * 64 * 3 / model.memory_bw)
    assert c.lookup_s[0] == 0
    tw = model.evaluate(pr, {"a": Placement("table_wise", (4,))})
    assert c.cross_host_bytes.sum() < tw.cross_host_bytes.sum()


def test_optimizer_state_counts_in_memory():
    f = SparseFeature("a", 1000, 16, 1)
    fs = FeatureSet((f,), num_dense=1)
    p = {"a": Placement("table_wise", (0,))}
    mem = {
        kind: AnalyticCostModel().evaluate(Problem(fs, 2, 4, 64, optimizer=kind), p).peak_memory
        for kind in ("sgd", "rowwise_adagrad", "adagrad")
    }
    assert mem == {"sgd": 64000, "rowwise_adagrad": 68000, "adagrad": 128000}


@pytest.mark.parametrize("opt", ["rowwise_adagrad", "adagrad", "sgd"])
def test_memory_matches_the_collections_fused_buffers(opt):
    """The model's allocated bytes are exactly the fused buffers (and state)
    that `build_groups` lays out, padding included."""
    plan = auto_plan(MIXED, 2, 4, B, optimizer=opt).placements
    rng = np.random.default_rng(0)
    plans = [plan] + [
        {f.name: Placement("table_wise", (int(rng.integers(8)),)) for f in MIXED.sparse}
        for _ in range(3)
    ]
    sparse_opt = SparseOptimizer(kind=opt)
    for p in plans:
        groups = build_groups(MIXED, p, 8)
        want = 0
        for g in groups.values():
            acc = accumulator_shape(sparse_opt, g.local_rows, g.width)
            want += 4 * (g.local_rows * g.width + (0 if acc is None else int(np.prod(acc))))
        got = AnalyticCostModel().evaluate(Problem(MIXED, 2, 4, B, optimizer=opt), p)
        assert got.memory_bytes.tolist() == [want] * 8


def _comm_per_device(rep, keep_all_reduce=lambda c: False):
    """Bytes each device receives, without all-reduces (the scalar counters)
    unless `keep_all_reduce` keeps them."""
    cross, intra = np.zeros(8), np.zeros(8)
    for c in rep.collectives:
        if c.kind != "all-reduce" or keep_all_reduce(c):
            cross += np.asarray(c.device_cross_host_bytes) * c.multiplicity
            intra += np.asarray(c.device_intra_host_bytes) * c.multiplicity
    return cross, intra


def test_comm_model_matches_the_compiled_step(mesh24):
    """The model's bytes per device equal what `jdmt.comm` counts in the
    compiled training step of a plan with every sharding type."""
    from jdmt.comm import comm_report

    plan = {
        **{f"m{i}": Placement("table_wise", (i,)) for i in range(6)},
        "big": Placement("row_wise", range(8)),
        "tiny": Placement("data_parallel", range(8)),
        "seq": Placement("column_wise", (1, 6)),
        "wide": Placement("column_wise", (0, 2, 5, 7)),
    }
    opt = SparseOptimizer(kind="sgd")
    emb = ShardedEmbeddings(MIXED, mesh24, plan, opt, cpu_kernels=False)
    ids, lengths = make_batch(MIXED)

    def step(state, ids, lengths):  # a loss with a non-constant gradient: XLA
        return emb.step(state, ids, lengths, _loss)[1]  # could fold a constant backward away

    rep = comm_report(jax.jit(step), emb.init(0), ids, lengths, mesh=mesh24)
    cross, intra = _comm_per_device(rep)
    cost = AnalyticCostModel().evaluate(Problem(MIXED, 2, 4, B, optimizer=opt), plan)
    np.testing.assert_allclose(cost.cross_host_bytes.sum(0), cross)
    np.testing.assert_allclose(cost.intra_host_bytes.sum(0), intra)


@pytest.mark.parametrize("opt", ["sgd", "rowwise_adagrad"])
def test_comm_model_matches_the_compiled_step_with_table_row_wise(mesh24, opt):
    """The same for table-row-wise tables mixed with the other types: pooled
    groups of uneven hosts (three tables on host 0, one on host 1) and a
    sequence table; their collectives run over one mesh axis each."""
    from jdmt.comm import comm_report

    plan = {
        **{f"m{i}": Placement("table_row_wise", range(4)) for i in range(3)},
        "m3": Placement("table_row_wise", range(4, 8)),
        "m4": Placement("table_wise", (2,)),
        "m5": Placement("table_wise", (5,)),
        "big": Placement("row_wise", range(8)),
        "tiny": Placement("data_parallel", range(8)),
        "seq": Placement("table_row_wise", range(4, 8)),
        "wide": Placement("column_wise", (0, 2, 5, 7)),
    }
    sparse_opt = SparseOptimizer(kind=opt)
    emb = ShardedEmbeddings(MIXED, mesh24, plan, sparse_opt, cpu_kernels=False)
    ids, lengths = make_batch(MIXED)

    def step(state, ids, lengths):
        return emb.step(state, ids, lengths, _loss)[1]

    rep = comm_report(jax.jit(step), emb.init(0), ids, lengths, mesh=mesh24)
    # all but the scalar counters: the column-wise row statistics of row-wise
    # Adagrad are an all-reduce too (one chunk of the update, as modelled)
    cross, intra = _comm_per_device(rep, keep_all_reduce=lambda c: c.operand_bytes > 4)
    cost = AnalyticCostModel().evaluate(Problem(MIXED, 2, 4, B, optimizer=sparse_opt), plan)
    np.testing.assert_allclose(cost.cross_host_bytes.sum(0), cross)
    np.testing.assert_allclose(cost.intra_host_bytes.sum(0), intra)
    # table-row-wise traffic: cross-host bytes only on the all-to-alls over `host`
    for c in rep.collectives:
        if {len(g) for g in c.groups} == {4}:  # over `local`: one host's devices
            assert c.cross_host_bytes == 0 and c.kind in ("all-gather", "reduce-scatter")
        if {len(g) for g in c.groups} == {2}:  # over `host`: one device per host
            assert c.intra_host_bytes == 0 and c.kind == "all-to-all"
    # and the memory is the fused buffers' (table-row-wise ones included)
    want = 0
    for g in emb.groups.values():
        acc = accumulator_shape(sparse_opt, g.local_rows, g.width)
        want += 4 * (g.local_rows * g.width + (0 if acc is None else int(np.prod(acc))))
    assert cost.memory_bytes.tolist() == [want] * 8


def test_search_offers_table_row_wise_on_each_host():
    from jdmt.planner import candidates

    f = MIXED["big"]
    pr = Problem(MIXED, 2, 4, 4096)
    cands = candidates(pr, f, AnalyticCostModel().evaluate(pr, {}))
    trw = [c.devices for c in cands if c.type.value == "table_row_wise"]
    assert trw == [(0, 1, 2, 3), (4, 5, 6, 7)]
    pr1 = Problem(MIXED, 8, 1, 4096)  # one device per host: that is table-wise
    assert not any(c.type.value == "table_row_wise"
                   for c in candidates(pr1, f, AnalyticCostModel().evaluate(pr1, {})))
    # a cross-host link slow enough makes the planner keep lookups inside hosts
    slow = Topology(2, 4, cross_host_bw=1e8)
    plan = auto_plan(MIXED, 2, 4, 4096, topology=slow, memory_budget=0.9 * BIG_BYTES)
    assert plan.cost.peak_memory <= 0.9 * BIG_BYTES
    assert plan.type_counts()["table_row_wise"] >= 1, plan.placements


# ---- search ----------------------------------------------------------------------------------


CASES = {
    "mixed_2x4": (MIXED, 2, 4, 4096, {}),
    "mixed_tight_2x4": (MIXED, 2, 4, 4096, {"memory_budget": 0.9 * BIG_BYTES}),
    "synthetic_2x4": (synthetic_default_features(), 2, 4, 4096, {}),
    "synthetic_4x2_adagrad": (synthetic_default_features(), 4, 2, 2048, {"optimizer": "adagrad"}),
    "mlperf_2x4": (mlperf_dcnv2_features(100_000), 2, 4, 8192, {"memory_budget": 2**28}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    feats, h, l, gb, kw = CASES[request.param]
    return feats, auto_plan(feats, h, l, gb, **kw)


def test_plan_is_no_worse_than_any_baseline(case):
    feats, plan = case
    model = plan.cost_model
    assert model.evaluate(plan.problem, plan.placements).step_s == plan.cost.step_s
    feasible = {k: v for k, v in plan.baselines.items() if isinstance(v, PlanCost)}
    assert feasible, plan.baselines
    for name, cost in feasible.items():
        assert plan.cost.step_s <= cost.step_s, name
    # and the baselines are what `baseline_plans` gives, rated by the same model
    for name, p in baseline_plans(plan.problem).items():
        if name in feasible:
            assert model.evaluate(plan.problem, p).step_s == feasible[name].step_s


def test_plan_respects_the_budget_and_places_every_table(case):
    feats, plan = case
    assert list(plan.placements) == list(feats.names)
    assert plan.cost.peak_memory <= plan.problem.memory_budget
    assert sum(plan.type_counts().values()) == len(feats.sparse)


def test_the_search_beats_the_baselines_where_it_can():
    """On the synthetic set, the best baseline leaves room: the search finds
    a plan at least 10% cheaper (the model's estimate)."""
    plan = auto_plan(synthetic_default_features(), 2, 4, 4096)
    name, best = plan.best_baseline()
    assert plan.cost.step_s < 0.9 * best.step_s, (name, best.step_s, plan.cost.step_s)


def test_a_table_bigger_than_a_device_is_split():
    budget = 0.9 * BIG_BYTES
    plan = auto_plan(MIXED, 2, 4, 4096, memory_budget=budget)
    assert plan.placements["big"].type.value in SPLIT
    assert plan.cost.peak_memory <= budget
    # the table-wise baselines cannot hold it
    assert isinstance(plan.baselines["size_greedy"], str)


def test_full_mlperf_tables_fit_16_gib_devices():
    """The five 40M-row tables (20 GiB each at dim 128) need splitting."""
    feats = mlperf_dcnv2_features(None)
    plan = auto_plan(feats, 2, 4, 8192, max_rounds=2)
    assert plan.cost.peak_memory <= 16 * 2**30
    for f in feats.sparse:
        if f.rows == 40_000_000:
            assert plan.placements[f.name].type.value in SPLIT


def test_an_impossible_budget_names_the_table():
    with pytest.raises(PlanningError, match="'big'") as e:
        auto_plan(MIXED, 2, 4, 4096, memory_budget=BIG_BYTES / 16)
    assert e.value.table == "big"
    assert isinstance(e.value, ValueError)
    # every table fits alone, but not all together: a device holds at least
    # its share of all the bytes
    total = sum(f.rows * (f.dim * 4 + 4) for f in MIXED.sparse)
    assert BIG_BYTES / 8 < 0.95 * total / 8
    with pytest.raises(PlanningError) as e:
        auto_plan(MIXED, 2, 4, 4096, memory_budget=0.95 * total / 8)
    assert e.value.table in MIXED.names and repr(e.value.table) in str(e.value)


def test_planning_is_deterministic():
    feats = synthetic_default_features()
    a = auto_plan(feats, 2, 4, 4096)
    b = auto_plan(feats, 2, 4, 4096)
    assert a.placements == b.placements
    assert json.dumps(a.report(), sort_keys=True) == json.dumps(b.report(), sort_keys=True)


def test_report_is_json_and_complete():
    plan = auto_plan(MIXED, 2, 4, 4096, topology=Topology(2, 4, cross_host_bw=25e9))
    rep = json.loads(json.dumps(plan.report()))
    assert set(rep["tables"]) == set(MIXED.names)
    assert len(rep["cost"]["devices"]) == 8
    dev = rep["cost"]["devices"][5]
    assert dev["host"] == 1 and {"memory_bytes", "lookup_s", "comm_s", "cross_host_bytes"} <= set(dev)
    assert set(rep["baselines"]) >= {"size_greedy", "dim_greedy", "lookup_greedy", "size_lookup_greedy"}
    assert rep["problem"]["topology"]["cross_host_bw"] == 25e9
    assert rep["speedup_vs_best_baseline"] >= 1
    assert "auto plan 2x4" in plan.summary()


def test_the_planner_takes_any_cost_model():
    """A cost model is anything with `evaluate` and `to_json`: here one that
    makes cross-host traffic free, so nothing but lookup balance matters."""
    calls = []

    class NoNetwork:
        def evaluate(self, problem, placements):
            calls.append(1)
            c = AnalyticCostModel().evaluate(problem, placements)
            return PlanCost(c.memory_bytes, c.used_bytes, c.lookup_s, c.cross_host_bytes,
                            c.intra_host_bytes, np.zeros_like(c.comm_s), c.num_collectives)

        def to_json(self):
            return {"name": "no_network"}

    model = NoNetwork()
    assert isinstance(model, CostModel)
    plan = auto_plan(MIXED, 2, 4, 4096, cost_model=model)
    assert calls and plan.report()["cost_model"] == {"name": "no_network"}
    assert plan.cost.comm_s.max() == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="topology"):
        auto_plan(MIXED, 2, 4, 64, topology=Topology(4, 2))
    with pytest.raises(KeyError):
        auto_plan(MIXED, 2, 4, 64, pooling={"nope": 1.0})
    with pytest.raises(ValueError, match="pooling"):
        auto_plan(MIXED, 2, 4, 64, pooling={"m0": 9.0})


# ---- plans run -------------------------------------------------------------------------------


def make_batch(features, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((B, features.total_slots), np.int32)
    lengths = np.zeros((B, len(features.sparse)), np.int32)
    for i, f in enumerate(features.sparse):
        lengths[:, i] = rng.integers(0, f.max_len + 1, B)
        ids[:, features.columns(f.name)] = rng.integers(0, f.rows, (B, f.max_len))
    return ids, lengths


def _loss(e):
    return jnp.sum(jnp.sin(e.pooled)) + jnp.sum(e.sequence["seq"] ** 2)


def _forward_and_step(emb, ids, lengths):
    """Embeddings of a batch from `init(0)`, and the tables after one step."""
    state = emb.init(0)
    e = jax.jit(emb.forward)(state, ids, lengths)
    new = jax.jit(lambda s, i, n: emb.step(s, i, n, _loss)[1])(state, ids, lengths)
    return {n: np.asarray(v) for n, v in e.to_dict().items()}, emb.to_dense(new)[0]


@pytest.fixture(scope="module")
def table_wise_reference(mesh24):
    ids, lengths = make_batch(MIXED)
    emb = ShardedEmbeddings(MIXED, mesh24, "table_wise", SparseOptimizer(lr=0.1))
    return ids, lengths, _forward_and_step(emb, ids, lengths)


@pytest.mark.parametrize("budget", [None, 0.9 * BIG_BYTES])
def test_planned_embeddings_equal_table_wise(mesh24, table_wise_reference, budget):
    """A plan (mixing sharding types) builds a collection whose embeddings,
    and tables after a training step, equal a table-wise collection's: the
    initial values do not depend on the plan."""
    opt = SparseOptimizer(lr=0.1)
    plan = auto_plan(MIXED, 2, 4, B, optimizer=opt, memory_budget=budget)
    assert len(types_of(plan)) >= 2, plan.placements
    if budget is not None:
        assert plan.placements["big"].type.value in SPLIT
    ids, lengths, (want_out, want_tables) = table_wise_reference
    out, tables = _forward_and_step(ShardedEmbeddings(MIXED, mesh24, plan.placements, opt), ids, lengths)
    for name in MIXED.names:
        np.testing.assert_allclose(out[name], want_out[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(tables[name], want_tables[name], rtol=1e-5, atol=1e-6)
