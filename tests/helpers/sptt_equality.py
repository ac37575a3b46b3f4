"""SPTT with the identity Tower Module equals the flat path.

Usage: python sptt_equality.py MESH     (e.g. 8x8; emulates H*L CPU devices)
Builds uneven towers (one host holds two, some hold none when H > towers),
runs the lookup, a loss, its gradients and one sparse update both ways (the
flat path with the SPTT's own plan), and prints one JSON line per case:
whether embeddings, sequences, and the tables and accumulators after the
step are bit-identical, and the cross-host payload of each. The cases: pooled
features only, and pooled with sequence features of different lengths (one
tower holds a sequence feature alone).
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
from jdmt.data.specs import FeatureSet, SparseFeature  # noqa: E402
from jdmt.embeddings import ShardedEmbeddings, SparseOptimizer  # noqa: E402
from jdmt.mesh import make_mesh, mesh_shape  # noqa: E402
from jdmt.towers.sptt import SPTT  # noqa: E402

FEATURES = make_features(
    13, [50, 37, 5, 23, 64, 100, 9, 80, 41, 3, 70, 12, 33], 8,
    [3, 2, 1, 4, 2, 3, 2, 1, 3, 2, 4, 1, 2], combiner="mean", num_dense=2,
)
# FEATURES plus sequence features of two lengths (two share one length, so
# one group holds both) and a sum-pooled feature.
SEQ_FEATURES = FeatureSet(
    FEATURES.sparse + (
        SparseFeature("seq_0", 40, 8, 6, kind="sequence"),
        SparseFeature("seq_1", 17, 8, 3, kind="sequence"),
        SparseFeature("seq_2", 90, 8, 6, kind="sequence"),
        SparseFeature("sum_0", 30, 8, 3),
    ),
    num_dense=2,
)


def uneven_towers(names, hosts):
    """Towers of 1, 2, 3, ... features round the hosts; host 0 gets two."""
    towers, i, size = [], 0, 1
    while i < len(names):
        towers.append(list(names[i:i + size]))
        i, size = i + size, size % 3 + 1
    return towers, [0] + [t % hosts for t in range(len(towers) - 1)]


def sequence_towers(hosts):
    """`uneven_towers` of FEATURES, two of them given a sequence feature (and
    one the sum-pooled feature), and one more tower of `seq_1` alone."""
    towers, tower_hosts = uneven_towers(FEATURES.names, hosts)
    towers[1] += ["seq_0", "sum_0"]
    towers[-1] += ["seq_2"]
    towers.append(["seq_1"])
    tower_hosts.append((len(towers) - 1) % hosts)
    return towers, tower_hosts


def run(mesh, features, towers, tower_hosts, global_batch, seed=0, *, row_wise=(),
        flat="same", kernel="auto"):
    """One step both ways. `flat`: the flat path's sharding, or 'same': the
    SPTT's own plan (its table-wise tables take the flat path; table-row-wise
    ones the host path in either). `kernel`: the SPTT side's lookups and
    updates (the flat side: XLA)."""
    opt = SparseOptimizer(lr=0.3)
    sp = SPTT(features, mesh, towers, tower_hosts, opt, module="identity", row_wise=row_wise,
              kernel=kernel)
    flat_emb = ShardedEmbeddings(features, mesh, sp.emb.plan if flat == "same" else flat, opt,
                                 kernel="xla")
    b = SyntheticData(features, seed=seed).batch(0, global_batch)
    ids, lengths = jnp.asarray(b.ids), jnp.asarray(b.lengths)
    rng = np.random.default_rng(seed)
    pooled = [f for f in features.sparse if f.pooled]
    w = jnp.asarray(rng.standard_normal((global_batch, len(pooled), pooled[0].dim)), jnp.float32)
    ws = {f.name: jnp.asarray(rng.standard_normal((global_batch, f.max_len, f.dim)), jnp.float32)
          for f in features.sparse if not f.pooled}

    def loss(e):
        return jnp.sum(jnp.tanh(e.stacked()) * w) + sum(jnp.sum(jnp.tanh(e.sequence[n]) * ws[n]) for n in ws)

    def step_of(emb):
        @jax.jit
        def step(state, ids, lengths):
            e, ctx, stats = emb.forward(state, ids, lengths)
            new, ustats = emb.update(state, ctx, jax.grad(loss)(e), ids, lengths)
            cross = stats["payload_cross_host_bytes"] + ustats["payload_cross_host_bytes"]
            return (e.stacked(), e.sequence), new, cross

        return step

    (e1, q1), s1, c1 = step_of(sp)(sp.emb.init(seed), ids, lengths)
    (e0, q0), s0, c0 = step_of(flat_emb)(flat_emb.init(seed), ids, lengths)
    t1, a1 = sp.emb.to_dense(s1)
    t0, a0 = flat_emb.to_dense(s0)
    start = flat_emb.to_dense(flat_emb.init(seed))[0]
    moved = sum(int(np.any(t0[k] != start[k])) for k in t0)
    diff = lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))  # noqa: E731
    return {
        "embeddings_equal": bool(jnp.array_equal(e0, e1)),
        "sequences_equal": sorted(q0) == sorted(q1) and all(
            bool(jnp.array_equal(q0[n], q1[n])) for n in q0),
        "tables_equal": all(np.array_equal(t0[k], t1[k]) for k in t0),
        "accumulators_equal": all(np.array_equal(a0[k], a1[k]) for k in a0),
        "tables_moved": moved,
        "sequence_features": sorted(q1),
        "row_wise": list(sp.row_wise),
        "max_embedding_diff": max([diff(e0, e1)] + [diff(q0[n], q1[n]) for n in q0]),
        "max_table_diff": max(diff(t0[k], t1[k]) for k in t0),
        "accumulator_rel_diff": max(diff(a0[k], a1[k]) for k in a0) / max(
            float(np.max(np.abs(a0[k]))) for k in a0),
        "cross_host_payload": [float(c0), float(c1)],
    }


def main(spec: str) -> list[dict]:
    mesh = make_mesh(spec)
    hosts, local = mesh_shape(mesh)
    out = []
    # pooled and sequence features together (uneven towers of pooled features
    # alone run on 2x4 in the tests)
    for features, make in ((SEQ_FEATURES, lambda: sequence_towers(hosts)),):
        towers, tower_hosts = make()
        result = run(mesh, features, towers, tower_hosts, global_batch=4 * hosts * local)
        result.update(mesh=[hosts, local], towers=towers, hosts=tower_hosts)
        out.append(result)
    return out


if __name__ == "__main__":
    for r in main(sys.argv[1]):
        print(json.dumps(r))
