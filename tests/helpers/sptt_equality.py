"""SPTT with the identity Tower Module equals the flat table-wise path.

Usage: python sptt_equality.py MESH     (e.g. 8x8; emulates H*L CPU devices)
Builds uneven towers (one host holds two, some hold none when H > towers),
runs the lookup, a loss, its gradients and one sparse update both ways, and
prints one JSON line: whether embeddings, gradients' effect on the tables,
and the tables after the step are bit-identical.
"""

import json
import os
import sys

if __name__ == "__main__":  # before JAX starts: the mesh's devices
    from jdmt.mesh import prepare_devices

    with open(os.devnull, "w") as quiet:
        prepare_devices(sys.argv[1], stream=quiet)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdmt.data import SyntheticData, make_features  # noqa: E402
from jdmt.embeddings import ShardedEmbeddings, SparseOptimizer  # noqa: E402
from jdmt.mesh import make_mesh, mesh_shape  # noqa: E402
from jdmt.towers.sptt import SPTT  # noqa: E402

FEATURES = make_features(
    13, [50, 37, 5, 23, 64, 100, 9, 80, 41, 3, 70, 12, 33], 8,
    [3, 2, 1, 4, 2, 3, 2, 1, 3, 2, 4, 1, 2], combiner="mean", num_dense=2,
)


def uneven_towers(names, hosts):
    """Towers of 1, 2, 3, ... features round the hosts; host 0 gets two."""
    towers, i, size = [], 0, 1
    while i < len(names):
        towers.append(list(names[i:i + size]))
        i, size = i + size, size % 3 + 1
    return towers, [0] + [t % hosts for t in range(len(towers) - 1)]


def run(mesh, features, towers, tower_hosts, global_batch, seed=0):
    opt = SparseOptimizer(lr=0.3)
    sp = SPTT(features, mesh, towers, tower_hosts, opt, module="identity")
    flat = ShardedEmbeddings(features, mesh, "table_wise", opt)
    b = SyntheticData(features, seed=seed).batch(0, global_batch)
    ids, lengths = jnp.asarray(b.ids), jnp.asarray(b.lengths)
    w = jnp.asarray(np.random.default_rng(seed).standard_normal(
        (global_batch, len(features.sparse), features.sparse[0].dim)), jnp.float32)
    params = sp.init_params(0)

    @jax.jit
    def sptt_step(state, ids, lengths):
        routed = sp.route(ids, lengths)
        out = sp.lookup(state, routed)
        loss = lambda o: jnp.sum(jnp.tanh(sp.flat_embeddings(sp.tower_outputs(params, o, routed))) * w)  # noqa: E731
        e = sp.flat_embeddings(sp.tower_outputs(params, out, routed))
        return e, sp.apply_gradients(state, routed, jax.grad(loss)(out), out)

    @jax.jit
    def flat_step(state, ids, lengths):
        routed = flat.route(ids, lengths)
        out = flat.lookup(state, routed)
        loss = lambda o: jnp.sum(jnp.tanh(flat.output_dist(o, lengths).stacked()) * w)  # noqa: E731
        e = flat.output_dist(out, lengths).stacked()
        return e, flat.apply_gradients(state, routed, jax.grad(loss)(out), out)

    e1, s1 = sptt_step(sp.emb.init(seed), ids, lengths)
    e0, s0 = flat_step(flat.init(seed), ids, lengths)
    t1, a1 = sp.emb.to_dense(s1)
    t0, a0 = flat.to_dense(s0)
    moved = sum(int(np.any(t0[k] != flat.to_dense(flat.init(seed))[0][k])) for k in t0)
    return {
        "embeddings_equal": bool(jnp.array_equal(e0, e1)),
        "tables_equal": all(np.array_equal(t0[k], t1[k]) for k in t0),
        "accumulators_equal": all(np.array_equal(a0[k], a1[k]) for k in a0),
        "tables_moved": moved,
    }


def main(spec: str) -> dict:
    mesh = make_mesh(spec)
    hosts, local = mesh_shape(mesh)
    towers, tower_hosts = uneven_towers(FEATURES.names, hosts)
    result = run(mesh, FEATURES, towers, tower_hosts, global_batch=4 * hosts * local)
    result.update(mesh=[hosts, local], towers=towers, hosts=tower_hosts)
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
