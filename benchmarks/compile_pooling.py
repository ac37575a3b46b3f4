"""Compile time of the embedding training step against the pooling factor.

A bag of P ids is pooled by visiting its positions; if the lookup unrolled
a Python loop over them, the compiled program (and its compile time) would
grow with P. This prints one JSON object per (mesh, sharding, pooling):
seconds to lower and to compile `ShardedEmbeddings.step` (forward, backward,
row-wise Adagrad), the HLO's instruction count, and the step's median time.

    python benchmarks/compile_pooling.py                       # P = 10, 50, 200
    python benchmarks/compile_pooling.py --pooling 10,100,400 --mesh 2x4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pooling", default="10,50,200", help="ids per bag, comma-separated")
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=512, help="global batch (bags per table)")
    p.add_argument("--mesh", default="1x1", help="the mesh (1x1: one device)")
    p.add_argument("--shardings", default="table_wise,row_wise")
    p.add_argument("--iters", type=int, default=5, help="timed steps after the first")
    return p.parse_args(argv)


def measure(args, pooling: int, sharding: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jdmt.data.specs import make_features
    from jdmt.embeddings import ShardedEmbeddings, SparseOptimizer
    from jdmt.mesh import DEVICES, make_mesh

    feats = make_features(args.tables, args.rows, args.dim, pooling, combiner="sum")
    mesh = make_mesh(args.mesh)
    emb = ShardedEmbeddings(feats, mesh, sharding, SparseOptimizer("rowwise_adagrad", lr=0.01))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.rows, (args.batch, args.tables * pooling)).astype(np.int32)
    lengths = np.full((args.batch, args.tables), pooling, np.int32)
    weights = rng.standard_normal((args.batch, args.tables * args.dim)).astype(np.float32)
    sh = NamedSharding(mesh, P(DEVICES))
    ids_d, len_d, w_d = (jax.device_put(x, sh) for x in (ids, lengths, weights))
    emb.fit_caps(args.batch // mesh.devices.size, emb.measure(ids, lengths))
    state = emb.init(seed=0)
    step = jax.jit(lambda s, i, n, w: emb.step(s, i, n, lambda e, w: jnp.sum(e.pooled * w), w)[1],
                   donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(state, ids_d, len_d, w_d)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    hlo = compiled.as_text()
    instructions = sum(1 for line in hlo.splitlines() if " = " in line)
    state = jax.block_until_ready(compiled(state, ids_d, len_d, w_d))
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        state = jax.block_until_ready(compiled(state, ids_d, len_d, w_d))
        times.append(time.perf_counter() - t)
    return {
        "benchmark": "compile_pooling", "mesh": args.mesh, "sharding": sharding,
        "pooling": pooling, "tables": args.tables, "rows": args.rows, "dim": args.dim,
        "batch": args.batch, "lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3),
        "hlo_instructions": instructions,
        "step_ms_median": round(1e3 * statistics.median(times), 2),
        "backend": jax.default_backend(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from jdmt.mesh import emulate_cpu_devices, parse_mesh_spec

    hosts, local = parse_mesh_spec(args.mesh)
    emulate_cpu_devices(hosts * local)
    rows = []
    for sharding in args.shardings.split(","):
        for pooling in (int(p) for p in args.pooling.split(",")):
            rows.append(measure(args, pooling, sharding))
            print(json.dumps(rows[-1]), flush=True)
    for sharding in args.shardings.split(","):
        mine = [r for r in rows if r["sharding"] == sharding]
        print(json.dumps({"benchmark": "compile_pooling_summary", "sharding": sharding,
                          "pooling": [r["pooling"] for r in mine],
                          "compile_s_ratio_last_to_first": round(
                              mine[-1]["compile_s"] / mine[0]["compile_s"], 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
