"""SPTT and Tower Modules: the hierarchical all-to-all, semantic preservation
against the flat path, where Tower Module gradients are reduced, and errors."""

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
from jdmt.embeddings import SparseOptimizer
from jdmt.mesh import DEVICES, make_mesh
from jdmt.towers.modules import TOWER_MODULES
from jdmt.towers.sptt import SPTT, TowerError, hierarchical_all_to_all

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


def test_identity_towers_equal_the_flat_path_on_2x4(mesh24):
    towers, hosts = sptt_equality.uneven_towers(sptt_equality.FEATURES.names, 2)
    assert hosts.count(0) >= 2 and len({len(t) for t in towers}) > 1  # uneven, shared host
    r = sptt_equality.run(mesh24, sptt_equality.FEATURES, towers, hosts, global_batch=32)
    assert r == {"embeddings_equal": True, "tables_equal": True, "accumulators_equal": True,
                 "tables_moved": 13}


def test_identity_towers_equal_the_flat_path_on_8x8():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    p = subprocess.run([sys.executable, str(HELPER), "8x8"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["mesh"] == [8, 8] and len(r["towers"]) == 7 and r["hosts"].count(0) == 2
    assert r["embeddings_equal"] and r["tables_equal"] and r["accumulators_equal"]
    assert r["tables_moved"] == 13


def _tower_step(sp, features, batch=32, seed=0):
    b = SyntheticData(features, seed=seed).batch(0, batch)
    ids, lengths = jnp.asarray(b.ids), jnp.asarray(b.lengths)

    def step(params, state, ids, lengths):
        routed = sp.route(ids, lengths)
        out = sp.lookup(state, routed)

        def loss(p, o):
            y = sp.tower_outputs(p, o, routed)
            return jnp.sum(jnp.tanh(y) * jnp.arange(y.shape[-1], dtype=y.dtype))

        value, (gp, go) = jax.value_and_grad(loss, (0, 1))(params, out)
        return value, gp, sp.apply_gradients(state, routed, go, out)

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
    param_reduces = [m.string for m in reduces if m.group(1).strip() != "f32[]"]  # not the loss
    assert param_reduces, "no all-reduce of the Tower Module gradients"
    for ln in param_reduces:
        assert "replica_groups={{0,1,2,3},{4,5,6,7}}" in ln, ln  # the 4 devices of a host
    value, grads, _ = step(*args)
    assert np.isfinite(float(value))
    g = np.asarray(jax.tree.leaves(grads)[0])
    # Host 0 holds tower 0 and an empty slot; host 1 towers 1 and 2.
    assert np.abs(g[0, 0]).sum() > 0 and np.abs(g[1, 0]).sum() > 0 and np.abs(g[1, 1]).sum() > 0
    assert np.all(g[0, 1] == 0)


def test_compressing_towers_move_fewer_cross_host_bytes(mesh24):
    feats = make_features(8, 200, 16, 2, num_dense=2)
    towers, hosts = [feats.names[:4], feats.names[4:]], [0, 1]
    cross = {}
    for module, dim in (("identity", None), ("linear", 8)):
        sp = SPTT(feats, mesh24, towers, hosts, SparseOptimizer(lr=0.1), module=module,
                  tower_dim=dim)
        step, args = _tower_step(sp, feats)
        cross[module] = comm_report(step, *args, mesh=mesh24).cross_host_bytes
    # identity sends 4 x 16 values per tower and sample, linear 8: the embedding
    # part of the cross-host bytes shrinks 8x (ids are the same).
    assert cross["linear"] < cross["identity"] / 3, cross


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
    seq = FeatureSet(FEATS.sparse + (SparseFeature("s", 9, 8, 4, kind="sequence"),), num_dense=2)
    with pytest.raises(TowerError, match="pooled features only"):
        SPTT(seq, mesh24, [seq.names], [0], opt)
    with pytest.raises(ValueError, match="needs a tower_dim"):
        SPTT(FEATS, mesh24, [FEATS.names], [0], opt, module="linear")
    with pytest.raises(ValueError, match="unknown tower module 'conv'"):
        SPTT(FEATS, mesh24, [FEATS.names], [0], opt, module="conv")
    assert TOWER_MODULES == ("identity", "linear", "dot", "dcn", "mlp")
