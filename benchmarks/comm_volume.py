#!/usr/bin/env python
"""Bytes the embedding part of a training step moves across and inside hosts.

    python benchmarks/comm_volume.py                 # 8x8 emulated, MLPerf tables (rows capped), dim 128
    python benchmarks/comm_volume.py --mesh=2x4 --rows 2000 --batch-per-device 32

For each embedding path it compiles and runs one step of the embedding part
on a synthetic batch: look the rows up (flat, or through the towers: SPTT
and a Tower Module), a loss on the result, its backward pass and the fused
sparse update. Two figures per path, summed over all devices:

- payload: the bytes the exchanges really send to other devices (ids,
  lengths, rows, gradients; counted on the devices as the step runs). On
  GPU and TPU the exchanges are `ragged_all_to_all`s that send exactly this,
  plus one i32 size per peer and exchange (`ragged_wire`);
- wire: the bytes of the compiled program's collectives on this CPU
  (`jdmt.comm`), where every exchange is padded to its capacity (fitted to
  the batch: what it needs plus a quarter).

The dense model's gradient all-reduce is left out: it is the same for every
path, and it does not depend on the batch.

Paths: flat table_wise, row_wise (two hops: requests de-duplicated per
host), row_wise_device (each device asks the owners directly) and
table_row_wise; SPTT with the identity
module (the flat model's embeddings over the two-hop path) and with each
compressing Tower Module (linear, dcn, mlp) to `--tower-dim` values per
tower. One JSON object per path, then a summary: each path's cross-host
payload as a fraction of flat table-wise's (the goal for SPTT with a
compressing module: <= 1/8), and each path's wire over payload.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jdmt.mesh import prepare_devices  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh", default="8x8")
    p.add_argument("--shape", choices=("mlperf", "uniform"), default="mlperf",
                   help="mlperf: the 26 MLPerf DLRM-DCNv2 tables (rows capped at --rows); "
                   "uniform: --tables tables of --rows rows, --pooling ids per bag")
    p.add_argument("--rows", type=int, default=10_000, help="rows (cap) of every table")
    p.add_argument("--tables", type=int, default=26, help="uniform shape: number of tables")
    p.add_argument("--pooling", type=int, default=10, help="uniform shape: ids per bag")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch-per-device", type=int, default=64)
    p.add_argument("--towers", type=int, default=None,
                   help="default: one per host (at most one per feature)")
    p.add_argument("--tower-dim", type=int, default=32)
    p.add_argument("--paths", default=None,
                   help="comma-separated PATH:VARIANT to compile (default: all), e.g. "
                   "flat:table_wise,sptt:linear")
    args = p.parse_args()
    with open(os.devnull, "w") as quiet:
        hosts, local = prepare_devices(args.mesh, stream=quiet)

    import jax
    import jax.numpy as jnp

    from jdmt.comm import comm_report
    from jdmt.data import SyntheticData, make_features, mlperf_dcnv2_features
    from jdmt.embeddings import ShardedEmbeddings, SparseOptimizer
    from jdmt.mesh import Topology, make_mesh
    from jdmt.towers.partition import round_robin_partition
    from jdmt.towers.sptt import SPTT

    mesh = make_mesh(args.mesh)
    if args.shape == "mlperf":
        features = mlperf_dcnv2_features(max_rows=args.rows, dim=args.dim)
    else:
        features = make_features(args.tables, args.rows, args.dim, args.pooling)
    batch = hosts * local * args.batch_per_device
    b = SyntheticData(features, seed=0).batch(0, batch)
    ids, lengths = jnp.asarray(b.ids), jnp.asarray(b.lengths)
    opt = SparseOptimizer(lr=0.05)
    part = round_robin_partition(features, args.towers or min(hosts, len(features.sparse)), hosts)

    def fitted(emb):
        emb.fit_caps(batch // (hosts * local), emb.measure(b.ids, b.lengths))
        return emb

    def flat_step(emb):
        def step(state, ids, lengths):
            e, ctx, st = emb.forward(state, ids, lengths)
            g = jax.grad(lambda e: jnp.sum(jnp.tanh(e.stacked())))(e)
            new, ust = emb.update(state, ctx, g, ids, lengths)
            return new, st, ust

        return jax.jit(step, donate_argnums=0), (emb.init(0), ids, lengths)

    def tower_step(sp):
        def step(params, state, ids, lengths):
            acts, ctx, st = sp.forward(state, ids, lengths)
            loss = lambda p, a: jnp.sum(jnp.tanh(sp.tower_outputs(p, a)))  # noqa: E731
            gp, ga = jax.grad(loss, (0, 1))(params, acts)
            new, ust = sp.update(state, ctx, ga, ids, lengths)
            return gp, new, st, ust

        return jax.jit(step, donate_argnums=1), (sp.init_params(0), sp.emb.init(0), ids, lengths)

    def identity_step(sp):
        return flat_step(sp.emb)

    paths = [("flat", t, lambda t=t: flat_step(fitted(ShardedEmbeddings(features, mesh, t, opt))))
             for t in ("table_wise", "row_wise", "table_row_wise")]
    # row-wise with each device asking the owners directly (no per-host de-duplication)
    paths.insert(2, ("flat", "row_wise_device", lambda: flat_step(fitted(
        ShardedEmbeddings(features, mesh, "row_wise", opt, row_dedup="device")))))
    paths.append(("sptt", "identity", lambda: identity_step(_fit_sptt(
        SPTT(features, mesh, part.towers, part.hosts, opt, module="identity"), fitted))))
    for module in ("linear", "dcn", "mlp"):
        paths.append(("sptt", module, lambda m=module: tower_step(_fit_sptt(
            SPTT(features, mesh, part.towers, part.hosts, opt, module=m, tower_dim=args.tower_dim),
            fitted))))

    if args.paths:
        want = args.paths.split(",")
        unknown = set(want) - {f"{k}:{n}" for k, n, _ in paths}
        if unknown:
            p.error(f"unknown --paths {sorted(unknown)}")
        paths = [x for x in paths if f"{x[0]}:{x[1]}" in want]
    results = []
    for kind, name, build in paths:
        t0 = time.perf_counter()
        fn, fargs = build()
        rep = comm_report(fn, *fargs, mesh=mesh)
        out = fn(*fargs)
        st, ust = jax.device_get(out[-2]), jax.device_get(out[-1])
        assert int(st["overflow"]) == 0, st
        cross = float(st["payload_cross_host_bytes"] + ust["payload_cross_host_bytes"])
        intra = float(st["payload_intra_host_bytes"] + ust["payload_intra_host_bytes"])
        # a ragged exchange also sends each peer one i32 size
        sizes = 4.0 * sum(c.group_size - 1 for c in rep.collectives
                          if c.kind == "all-to-all" and c.operand_bytes == 4 * c.group_size)
        n_dev = hosts * local
        row = {
            "benchmark": "comm_volume", "mesh": [hosts, local], "path": kind, "variant": name,
            "shape": args.shape, "tables": len(features.sparse), "dim": args.dim,
            "rows_cap": args.rows,
            "global_batch": batch, "id_slots": features.total_slots,
            "towers": len(part.towers) if kind == "sptt" else 0,
            "tower_dim": args.tower_dim if kind == "sptt" and name != "identity" else None,
            "cross_host_payload_bytes": cross,
            "intra_host_payload_bytes": intra,
            "ragged_wire_bytes": cross + intra + sizes * n_dev,
            "cross_host_wire_bytes": float(rep.cross_host_bytes),
            "intra_host_wire_bytes": float(rep.intra_host_bytes),
            "cross_host_wire_over_payload": round(float(rep.cross_host_bytes) / max(cross, 1.0), 3),
            "dedup_ratio": (round(int(st["ids_unique"]) / int(st["ids_requested"]), 4)
                            if int(st["ids_requested"]) else None),
            "host_dedup_ratio": (round(int(st["ids_unique_host"]) / int(st["ids_requested"]), 4)
                                 if int(st["ids_unique_host"]) else None),
            "cross_host_wire_bytes_per_device": float(rep.per_device_cross_host_bytes),
            "intra_host_wire_bytes_per_device": float(rep.per_device_intra_host_bytes),
            # Per-device payload at each level over the Topology's bandwidths (TorchRec's defaults).
            "projected_comm_time_s": Topology.from_mesh(mesh).comm_time_s(
                cross / n_dev, intra / n_dev, len(rep.collectives)),
            "by_kind": {k: {kk: float(vv) for kk, vv in v.items()} for k, v in rep.by_kind.items()},
            "compile_s": round(time.perf_counter() - t0, 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    flat = [r for r in results if (r["path"], r["variant"]) == ("flat", "table_wise")]
    base = flat[0]["cross_host_payload_bytes"] if flat else None
    print(json.dumps({
        "benchmark": "comm_volume_summary", "mesh": [hosts, local],
        "cross_host_payload_fraction_of_flat_table_wise": None if base is None else {
            f"{r['path']}:{r['variant']}": round(r["cross_host_payload_bytes"] / base, 4) for r in results
        },
        "target_sptt_tm_at_most": 0.125,
        "cross_host_wire_over_payload_cpu": {
            f"{r['path']}:{r['variant']}": r["cross_host_wire_over_payload"] for r in results
        },
    }))


def _fit_sptt(sp, fitted):
    fitted(sp.emb)
    return sp


if __name__ == "__main__":
    main()
