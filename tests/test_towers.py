"""SPTT and Tower Modules: the hierarchical all-to-all, semantic preservation
against the flat path (pooled and sequence features, table-wise and row-wise
tables inside a host), sequences pooled in compressing towers, cross-host
bytes, where Tower Module gradients are reduced, training, and errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jdmt.comm import comm_report
from jdmt.data import SyntheticData, make_features
from jdmt.data.specs import FeatureSet, SparseFeature
from jdmt.embeddings import Placement, ShardedEmbeddings, ShardingType, SparseOptimizer
from jdmt.mesh import DEVICES, make_mesh
from jdmt.models.sequence import SequencePooling
from jdmt.towers.modules import TOWER_MODULES
from jdmt.towers.sptt import SPTT, TowerError, auto_row_wise, hierarchical_all_to_all, tower_plan
from jdmt.train import TrainConfig, Trainer, train_and_evaluate

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import sptt_equality  # noqa: E402

HELPER = Path(__file__).parent / "helpers" / "sptt_equality.py"


@pytest.mark.parametrize("spec", ["2x4", "4x2"])
def test_hierarchical_all_to_all_equals_the_flat_one(spec):
    mesh = make_mesh(spec)
    h, l = mesh.devices.shape
    x = jnp.arange(8 * 8 * 3 * 2, dtype=jnp.float32).reshape(8 * 8, 3, 2)  # [N * N(dest), 3, 2]

    def run(fn):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(DEVICES), out_specs=P(DEVICES)))(x)

    flat = run(lambda b: jax.lax.all_to_all(b, DEVICES, 0, 0, tiled=True))
    hier = run(lambda b: hierarchical_all_to_all(b, h, l))
    np.testing.assert_array_equal(np.asarray(hier), np.asarray(flat))
    # Splitting the same axis twice would be wrong: each device would hear H peers only.
    wrong = run(lambda b: jax.lax.all_to_all(
        jax.lax.all_to_all(b, "host", 0, 0, tiled=True), "local", 0, 0, tiled=True))
    assert not np.array_equal(np.asarray(wrong), np.asarray(flat))


EQUAL = {"embeddings_equal": True, "sequences_equal": True, "tables_equal": True,
         "accumulators_equal": True}


def test_identity_towers_equal_the_flat_path_on_2x4(mesh24):
    towers, hosts = sptt_equality.uneven_towers(sptt_equality.FEATURES.names, 2)
    assert hosts.count(0) >= 2 and len({len(t) for t in towers}) > 1  # uneven, shared host
    r = sptt_equality.run(mesh24, sptt_equality.FEATURES, towers, hosts, global_batch=32)
    assert {k: r[k] for k in EQUAL} == EQUAL and r["tables_moved"] == 13


def test_identity_towers_with_sequences_equal_the_flat_path_on_2x4(mesh24):
    towers, hosts = sptt_equality.sequence_towers(2)
    assert ["seq_1"] in towers  # a tower of one sequence feature
    r = sptt_equality.run(mesh24, sptt_equality.SEQ_FEATURES, towers, hosts, global_batch=32)
    assert {k: r[k] for k in EQUAL} == EQUAL, r
    assert r["sequence_features"] == ["seq_0", "seq_1", "seq_2"] and r["tables_moved"] == 17


def test_towers_with_pallas_kernels_equal_the_flat_xla_path(mesh24):
    """SPTT's lookups and updates by the Pallas TPU kernels (interpreted), with
    pooled and sequence features and row-wise tables inside a host, against
    the flat XLA path: the same embeddings, and tables after the step equal
    to f32 rounding (the kernels add a row's gradients in their own order)."""
    towers, hosts = sptt_equality.sequence_towers(2)
    r = sptt_equality.run(mesh24, sptt_equality.SEQ_FEATURES, towers, hosts, global_batch=32,
                          row_wise=("cat_5", "seq_0"), flat="same", kernel="pallas")
    assert r["row_wise"] == ["cat_5", "seq_0"] and r["tables_moved"] == 17
    assert r["max_embedding_diff"] <= 1e-6 and r["max_table_diff"] <= 1e-6, r
    assert r["accumulator_rel_diff"] <= 1e-5, r


def test_identity_towers_equal_the_flat_path_on_8x8():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    p = subprocess.run([sys.executable, str(HELPER), "8x8"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    seq = json.loads(p.stdout.strip().splitlines()[-1])
    # 8 towers on 8 hosts (host 0 two, host 7 none), one of them a sequence feature alone
    assert seq["mesh"] == [8, 8] and ["seq_1"] in seq["towers"] and len(seq["towers"]) == 8
    assert {k: seq[k] for k in EQUAL} == EQUAL and seq["tables_moved"] == 17


ROW_WISE = ("cat_5", "cat_10", "sum_0", "seq_1", "seq_2")


@pytest.mark.parametrize("spec", ["2x4", "4x2"])
def test_row_wise_towers_equal_the_flat_path(spec):
    """Tables row-wise inside their tower's host: bit-identical to the flat
    path with the same plan (its table-row-wise tables take the same host
    path). Against the all-table-wise flat path the embeddings are still
    bit-identical (a bag's rows are summed in id order wherever it is
    pooled); the updates add a row's gradients in another order (the entry
    sums the H*B samples it serves before they reach the owner), so tables
    agree to float rounding."""
    mesh = make_mesh(spec)
    towers, hosts = sptt_equality.sequence_towers(mesh.devices.shape[0])
    feats = sptt_equality.SEQ_FEATURES
    same = sptt_equality.run(mesh, feats, towers, hosts, global_batch=32, row_wise=ROW_WISE)
    assert sorted(same["row_wise"]) == sorted(ROW_WISE)
    assert {k: same[k] for k in EQUAL} == EQUAL, same
    if spec == "4x2":  # the same plan on the other host count; the rest runs on 2x4
        return
    tw = sptt_equality.run(mesh, feats, towers, hosts, global_batch=32, row_wise=ROW_WISE,
                           flat="table_wise")
    assert tw["sequences_equal"] and tw["embeddings_equal"], tw
    assert tw["max_table_diff"] < 1e-6 and tw["accumulator_rel_diff"] < 1e-6, tw
    auto = sptt_equality.run(mesh, feats, towers, hosts, global_batch=32, row_wise="auto")
    assert auto["row_wise"] and {k: auto[k] for k in EQUAL} == EQUAL, auto


def _tower_step(sp, features, batch=32, seed=0):
    """A jitted step through the towers: (params, state, ids, lengths) -> (loss,
    parameter gradients, new state, stats); identity towers' embeddings and
    sequences make the loss."""
    b = SyntheticData(features, seed=seed).batch(0, batch)
    ids, lengths = jnp.asarray(b.ids), jnp.asarray(b.lengths)

    def step(params, state, ids, lengths):
        acts, ctx, stats = sp.forward(state, ids, lengths)

        def loss(p, a):
            if sp.identity:
                return jnp.sum(jnp.tanh(a.pooled)) + sum(jnp.sum(jnp.tanh(q)) for q in a.sequence.values())
            y = sp.tower_outputs(p, a)
            return jnp.sum(jnp.tanh(y) * jnp.arange(y.shape[-1], dtype=y.dtype))

        value, (gp, ga) = jax.value_and_grad(loss, (0, 1))(params, acts)
        new, ustats = sp.update(state, ctx, ga, ids, lengths)
        cross = stats["payload_cross_host_bytes"] + ustats["payload_cross_host_bytes"]
        return value, gp, new, cross

    return jax.jit(step), (sp.init_params(seed), sp.emb.init(seed), ids, lengths)


FEATS = make_features(6, [50, 37, 5, 23, 64, 9], 8, [3, 2, 1, 3, 2, 2], combiner="mean",
                      num_dense=2)
TOWERS = [["cat_0", "cat_3"], ["cat_1"], ["cat_2", "cat_4", "cat_5"]]
HOSTS = [0, 1, 1]


@pytest.mark.parametrize("module", ["linear", "dot", "dcn", "mlp"])
def test_tower_module_gradients_are_reduced_over_local_only(mesh24, module):
    sp = SPTT(FEATS, mesh24, TOWERS, HOSTS, SparseOptimizer(lr=0.1), module=module, tower_dim=4)
    step, args = _tower_step(sp, FEATS)
    params = args[0]
    # Stacked [H, T_max, ...], sharded over host: a host keeps its towers only.
    for leaf in jax.tree.leaves(params):
        assert leaf.shape[:2] == (2, 2) and leaf.sharding.spec == P("host")
    hlo = step.lower(*args).compile().as_text()
    reduces = [m for m in (re.search(r"= (.*?) all-reduce(?:-start)?\(", ln) for ln in hlo.splitlines())
               if m]
    scalar = lambda t: re.fullmatch(r"\(?\s*([a-z0-9]+\[\],?\s*)+\)?", t.strip())  # noqa: E731
    param_reduces = [m.string for m in reduces if not scalar(m.group(1))]  # not the loss, counters
    assert param_reduces, "no all-reduce of the Tower Module gradients"
    for ln in param_reduces:
        assert "replica_groups={{0,1,2,3},{4,5,6,7}}" in ln, ln  # the 4 devices of a host
    value, grads, _, _ = step(*args)
    assert np.isfinite(float(value))
    g = np.asarray(jax.tree.leaves(grads)[0])
    # Host 0 holds tower 0 and an empty slot; host 1 towers 1 and 2.
    assert np.abs(g[0, 0]).sum() > 0 and np.abs(g[1, 0]).sum() > 0 and np.abs(g[1, 1]).sum() > 0
    assert np.all(g[0, 1] == 0)


def test_compressing_towers_step_scatters_no_rows(mesh24):
    """The entry's bags, the Tower Modules' inputs, their gradients and the
    gradients back to the owners each come from a static place: the compiled
    step gathers them; it scatters no float rows into zero buffers (only the
    ids are scattered into their exchange blocks)."""
    sp = SPTT(FEATS, mesh24, TOWERS, HOSTS, SparseOptimizer(lr=0.1), module="linear", tower_dim=4)
    step, args = _tower_step(sp, FEATS)
    hlo = step.lower(*args).compile().as_text()
    scatters = [ln.strip() for ln in hlo.splitlines() if re.search(r"= [a-z0-9]+\[[0-9,]*\]\S* scatter\(", ln)]
    assert scatters, "the ids' routing scatters: the pattern must see them"
    assert not [ln for ln in scatters if re.search(r"= f(16|32|64)\[", ln)], scatters


def test_compressing_towers_move_fewer_cross_host_bytes(mesh24):
    feats = make_features(8, 200, 16, 2, num_dense=2)
    towers, hosts = [feats.names[:4], feats.names[4:]], [0, 1]
    cross, payload = {}, {}
    for module, dim in (("identity", None), ("linear", 8)):
        sp = SPTT(feats, mesh24, towers, hosts, SparseOptimizer(lr=0.1), module=module,
                  tower_dim=dim)
        step, args = _tower_step(sp, feats)
        cross[module] = comm_report(step, *args, mesh=mesh24).cross_host_bytes
        payload[module] = float(step(*args)[3])
    # identity sends 4 x 16 values per tower and sample both ways, linear 8:
    # the embedding part of the cross-host bytes shrinks 8x (ids are the same).
    assert cross["linear"] < cross["identity"] / 3, cross
    assert payload["linear"] < payload["identity"] / 3, payload


def test_tower_errors(mesh24):
    opt = SparseOptimizer()
    with pytest.raises(TowerError, match="7 towers for 6 features"):
        SPTT(FEATS, mesh24, [[n] for n in FEATS.names] + [["cat_0"]], [0] * 7, opt)
    with pytest.raises(TowerError, match="unknown features: \\['nope'\\]"):
        SPTT(FEATS, mesh24, [FEATS.names[:5] + ("nope",)], [0], opt)
    with pytest.raises(TowerError, match="in no tower: \\['cat_5'\\]"):
        SPTT(FEATS, mesh24, [FEATS.names[:5]], [0], opt)
    with pytest.raises(TowerError, match="more than one tower: \\['cat_0'\\]"):
        SPTT(FEATS, mesh24, [FEATS.names, ["cat_0"]], [0, 1], opt)
    with pytest.raises(TowerError, match="outside the mesh's 2 hosts"):
        SPTT(FEATS, mesh24, [FEATS.names], [2], opt)
    with pytest.raises(TowerError, match="tower 1 is empty"):
        SPTT(FEATS, mesh24, [FEATS.names, []], [0, 1], opt)
    with pytest.raises(TowerError, match="row_wise must be 'auto' or feature names"):
        SPTT(FEATS, mesh24, [FEATS.names], [0], opt, row_wise="cat_0")
    with pytest.raises(TowerError, match="row_wise names unknown features: \\['nope'\\]"):
        SPTT(FEATS, mesh24, [FEATS.names], [0], opt, row_wise=["cat_0", "nope"])
    wide = FeatureSet(FEATS.sparse + (SparseFeature("w", 9, 16, 2),), num_dense=2)
    with pytest.raises(TowerError, match="share one width"):
        SPTT(wide, mesh24, [wide.names], [0], opt)
    with pytest.raises(TowerError, match="the identity Tower Module has no outputs"):
        SPTT(FEATS, mesh24, [FEATS.names], [0], opt).tower_outputs({}, None)
    with pytest.raises(ValueError, match="needs a tower_dim"):
        SPTT(FEATS, mesh24, [FEATS.names], [0], opt, module="linear")
    with pytest.raises(ValueError, match="unknown tower module 'conv'"):
        SPTT(FEATS, mesh24, [FEATS.names], [0], opt, module="conv")
    assert TOWER_MODULES == ("identity", "linear", "dot", "dcn", "mlp")


# ---- sequence features -------------------------------------------------------------------

SEQ_FEATS = sptt_equality.SEQ_FEATURES
SEQ_TOWERS, SEQ_HOSTS = sptt_equality.sequence_towers(2)


def test_compressing_towers_pool_sequences_in_the_tower(mesh24):
    """A compressing tower's inputs are its pooled features and its sequences'
    means over their valid positions, each tower's own module applied: the
    same as the module on the flat path's embeddings, pooled like
    `SequencePooling('mean')`. Only its C outputs cross hosts."""
    sp = SPTT(SEQ_FEATS, mesh24, SEQ_TOWERS, SEQ_HOSTS, SparseOptimizer(), module="linear",
              tower_dim=6, row_wise=("seq_2", "cat_5"))
    assert sp.tower_inputs == tuple(map(tuple, SEQ_TOWERS))  # sequences are tower inputs
    flat = ShardedEmbeddings(SEQ_FEATS, mesh24, "table_wise")
    b = SyntheticData(SEQ_FEATS, seed=3).batch(0, 32)
    ids, lengths = jnp.asarray(b.ids), jnp.asarray(b.lengths)
    params = sp.init_params(1)

    @jax.jit
    def towers(params, state, ids, lengths):
        return sp.tower_outputs(params, sp.forward(state, ids, lengths)[0])

    got = np.asarray(towers(params, sp.emb.init(0), ids, lengths))
    e = jax.jit(flat.forward)(flat.init(0), ids, lengths)[0]
    vec = {n: np.asarray(e[n]) for n in e.pooled_names}
    for n, q in e.sequence.items():
        ln = np.asarray(lengths)[:, SEQ_FEATS.index(n)]
        vec[n] = np.asarray(SequencePooling("mean").apply({}, q[:, None], jnp.asarray(ln)[:, None]))[:, 0]
    assert got.shape == (32, len(SEQ_TOWERS), 6)
    for t, names in enumerate(SEQ_TOWERS):
        h, j = map(int, np.argwhere(sp.slot_tower == t)[0])
        x = np.zeros((32, sp.f_max, 8), np.float32)
        for i, n in enumerate(names):
            x[:, i] = vec[n]
        p = jax.tree.map(lambda a: a[h, j], params)
        want = sp.module.apply({"params": p}, jnp.asarray(x))
        np.testing.assert_allclose(got[:, t], np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=str(t))


def test_compressing_towers_with_sequences_move_fewer_cross_host_bytes(mesh24):
    cross = {}
    for module, dim in (("identity", None), ("linear", 8)):
        sp = SPTT(SEQ_FEATS, mesh24, SEQ_TOWERS, SEQ_HOSTS, SparseOptimizer(lr=0.1),
                  module=module, tower_dim=dim)
        step, args = _tower_step(sp, SEQ_FEATS)
        cross[module] = float(step(*args)[3])
        if module == "linear":  # the gradients reach the sequence tables through the tower
            before = sp.emb.to_dense(args[1])[0]
            after = sp.emb.to_dense(step(*args)[2])[0]
            assert all(np.any(after[n] != before[n]) for n in SEQ_FEATS.names), module
    # identity ships a row per unique sequence id both ways (payload)
    assert cross["linear"] < cross["identity"] / 2, cross


# ---- row-wise tables inside a tower's host ------------------------------------------------


def test_tower_plan_places_row_wise_tables_over_their_host():
    feats = make_features(7, [1000, 40, 30, 20, 10, 10, 10], 8, 2)
    towers, hosts = [["cat_0", "cat_1", "cat_2"], ["cat_3", "cat_4", "cat_5", "cat_6"]], [1, 0]
    # bigger than an even share of their host's tables: 1070 / 4 and 50 / 4 rows
    assert auto_row_wise(feats, towers, hosts, 4) == {"cat_0", "cat_3"}
    assert auto_row_wise(feats, towers, hosts, 1) == frozenset()
    plan = tower_plan(feats, towers, hosts, 4, row_wise="auto")
    assert plan["cat_0"] == Placement(ShardingType.TABLE_ROW_WISE, (4, 5, 6, 7))
    assert plan["cat_3"] == Placement(ShardingType.TABLE_ROW_WISE, (0, 1, 2, 3))
    # the table-wise ones fill their host's least loaded devices, largest first
    assert [plan[n].devices for n in ("cat_1", "cat_2", "cat_4", "cat_5", "cat_6")] == [
        (4,), (5,), (0,), (1,), (2,)]
    assert tower_plan(feats, towers, hosts, 4, row_wise=["cat_4"])["cat_4"].devices == (0, 1, 2, 3)
    assert all(p.type is ShardingType.TABLE_WISE for p in tower_plan(feats, towers, hosts, 4).values())


@pytest.mark.parametrize("module", ["identity", "linear"])
def test_row_wise_inside_a_host_adds_no_cross_host_bytes(mesh24, module):
    """How a host shards its towers' tables over `local` changes only traffic
    inside the host: the same payload crosses hosts."""
    cross = {}
    for rw in ((), ROW_WISE, "auto"):
        sp = SPTT(SEQ_FEATS, mesh24, SEQ_TOWERS, SEQ_HOSTS, SparseOptimizer(lr=0.1),
                  module=module, tower_dim=None if module == "identity" else 8, row_wise=rw)
        assert (len(sp.row_wise) > 0) == (rw != ())
        step, args = _tower_step(sp, SEQ_FEATS)
        cross[rw] = float(step(*args)[3])
    assert len(set(cross.values())) == 1 and cross[()] > 0, cross


# ---- training -----------------------------------------------------------------------------


def _train(mesh, **kw):
    base = dict(embedding_dim=8, steps=4, global_batch=64, eval_batches=1, bottom_mlp=(16,),
                top_mlp=(16,), lr=0.01, embedding_lr=0.1, progress=False)
    return train_and_evaluate(TrainConfig(**{**base, **kw}), mesh)


def test_identity_towers_with_sequence_features_give_the_flat_loss_history(mesh24):
    # attention pooling: the model queries each sequence with the bottom MLP's output
    cfg = dict(sequence_features=2, sequence_len=6, sequence_pooling="attention", steps=3,
               sharding="table_wise")
    flat = _train(mesh24, towers=0, **cfg)
    dmt = _train(mesh24, towers=2, tower_module="identity", **cfg)
    assert dmt["towers"] and {"seq_0", "seq_1"} <= {n for t in dmt["towers"] for n in t}
    assert dmt["sequence_features"] == ["seq_0", "seq_1"]
    assert dmt["train_loss"] == flat["train_loss"]  # bit for bit
    assert dmt["eval_auc"] == flat["eval_auc"]


def test_compressing_towers_with_sequence_features_train(mesh24):
    feats = SEQ_FEATS
    cfg = dict(features=feats, towers=3, tower_partitioner="random")
    dmt = _train(mesh24, tower_module="linear", tower_dim=5, steps=10, **cfg)
    loss = dmt["train_loss"]
    assert all(np.isfinite(loss)) and np.mean(loss[-3:]) < np.mean(loss[:3]), loss
    ident = _train(mesh24, steps=1, **cfg)
    assert dmt["cross_host_payload_bytes_per_step"] < ident["cross_host_payload_bytes_per_step"] / 2
    with pytest.raises(ValueError, match="mean-pools sequence features inside its tower"):
        TrainConfig(features=feats, towers=2, tower_module="dot", tower_dim=4,
                    sequence_pooling="attention")


def test_row_wise_towers_train_like_flat(mesh24):
    """Inside their hosts, tower tables sit as `sharding` says: row_wise (the
    default) spreads every table over its host's devices, table_wise puts
    each on one device, with `tower_row_wise` as exceptions. Every layout
    trains as the flat model does, with the same cross-host payload."""
    base = dict(features=sptt_equality.FEATURES, embedding_dim=8, steps=4, global_batch=64,
                eval_batches=1, bottom_mlp=(16,), top_mlp=(16,), lr=0.01, progress=False)
    flat = train_and_evaluate(TrainConfig(**base, towers=0), mesh24)
    towers = train_and_evaluate(TrainConfig(**base, towers=2, sharding="table_wise"), mesh24)
    trainer = Trainer(TrainConfig(**base, towers=2, sharding="table_wise", tower_row_wise="auto"), mesh24)
    assert trainer.sptt.row_wise and all(
        trainer.emb.plan[n].type is ShardingType.TABLE_ROW_WISE for n in trainer.sptt.row_wise)
    assert len(trainer.sptt.row_wise) < len(sptt_equality.FEATURES.sparse)
    rw = trainer.run()
    default = Trainer(TrainConfig(**base, towers=2), mesh24)  # sharding row_wise: every table spread
    assert default.sptt.row_wise == sptt_equality.FEATURES.names
    assert "tables row_wise in their host" in default.path_line()
    spread = default.run()
    for s in (rw, spread):
        np.testing.assert_allclose(s["train_loss"], flat["train_loss"], rtol=1e-5)
        assert s["cross_host_payload_bytes_per_step"] == towers["cross_host_payload_bytes_per_step"]
    assert spread["table_bytes_allocated"] <= rw["table_bytes_allocated"]
    with pytest.raises(ValueError, match="tower_row_wise shards tower tables"):
        TrainConfig(towers=0, tower_row_wise="auto")
    with pytest.raises(ValueError, match="every tower table is spread over its host's devices already"):
        TrainConfig(towers=2, tower_row_wise="auto")
    assert TrainConfig(towers=2, sharding="table_wise",
                       tower_row_wise="cat_0, cat_1").tower_row_wise == ("cat_0", "cat_1")
