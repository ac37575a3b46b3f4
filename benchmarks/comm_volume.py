#!/usr/bin/env python
"""Bytes the embedding part of a training step moves across and inside hosts.

    python benchmarks/comm_volume.py                 # 8x8 emulated, MLPerf-like tables, dim 128
    python benchmarks/comm_volume.py --mesh=2x4 --rows 2000 --batch-per-device 32

For each embedding path it compiles one step of the embedding part: route
the ids, look the rows up, distribute (flat) or run the towers (SPTT and a
Tower Module), a loss on the result, its backward pass and the fused sparse
update. The bytes come from the compiled HLO's collectives (`jdmt.comm`),
summed over all devices. The dense model's gradient all-reduce is left out:
it is the same for every path here, and it does not depend on the batch.

Paths: flat table_wise, flat table_row_wise (when the sharding type exists),
SPTT with the identity module (the flat model's embeddings over the
hierarchical path) and SPTT with each compressing Tower Module (linear, dcn,
mlp) to `--tower-dim` values per tower. One JSON object per path, then a
summary object with each path's cross-host bytes as a fraction of flat
table_wise (the issue's target for SPTT with a compressing module: <= 1/8).

Static shapes pad: flat table-wise sends every device a slot per fused
group (tables of one id cap) whether or not it owns a table of it, so with
fewer tables than devices most of its bytes are zeros. The summary also
gives the *payload* a ragged exchange would move for flat table-wise (ids
forward, pooled rows forward, their gradients backward, for the samples of
other hosts: an analytic count, not a measurement) and every path's
fraction of it, so the saving that is DMT's own can be told from padding.
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
    from jdmt.embeddings import ShardedEmbeddings, ShardingType, SparseOptimizer
    from jdmt.mesh import Topology, make_mesh
    from jdmt.towers.partitioner import round_robin_partition
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

    def flat_step(emb):
        def step(state, ids, lengths):
            routed = emb.route(ids, lengths)
            out = emb.lookup(state, routed)
            loss = lambda o: jnp.sum(jnp.tanh(emb.output_dist(o, lengths).stacked()))  # noqa: E731
            return emb.apply_gradients(state, routed, jax.grad(loss)(out), out)

        return jax.jit(step, donate_argnums=0), (emb.init(0), ids, lengths)

    def tower_step(sp):
        def step(params, state, ids, lengths):
            routed = sp.route(ids, lengths)
            out = sp.lookup(state, routed)
            loss = lambda p, o: jnp.sum(jnp.tanh(sp.tower_outputs(p, o, routed)))  # noqa: E731
            gp, go = jax.grad(loss, (0, 1))(params, out)
            return gp, sp.apply_gradients(state, routed, go, out)

        return jax.jit(step, donate_argnums=1), (sp.init_params(0), sp.emb.init(0), ids, lengths)

    paths = [("flat", "table_wise", lambda: flat_step(ShardedEmbeddings(features, mesh, "table_wise", opt)))]
    if "TABLE_ROW_WISE" in ShardingType.__members__:
        paths.append(("flat", "table_row_wise",
                      lambda: flat_step(ShardedEmbeddings(features, mesh, "table_row_wise", opt))))
    for module in ("identity", "linear", "dcn", "mlp"):
        dim = None if module == "identity" else args.tower_dim
        paths.append(("sptt", module, lambda m=module, d=dim: tower_step(
            SPTT(features, mesh, part.towers, part.hosts, opt, module=m, tower_dim=d))))

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
        row = {
            "benchmark": "comm_volume", "mesh": [hosts, local], "path": kind, "variant": name,
            "shape": args.shape, "tables": len(features.sparse), "dim": args.dim,
            "rows_cap": args.rows,
            "global_batch": batch, "id_slots": features.total_slots,
            "towers": len(part.towers) if kind == "sptt" else 0,
            "tower_dim": args.tower_dim if kind == "sptt" and name != "identity" else None,
            "cross_host_bytes": float(rep.cross_host_bytes),
            "intra_host_bytes": float(rep.intra_host_bytes),
            "cross_host_bytes_per_device": float(rep.per_device_cross_host_bytes),
            "intra_host_bytes_per_device": float(rep.per_device_intra_host_bytes),
            # Per-device bytes at each level over the Topology's bandwidths (TorchRec's defaults).
            "projected_comm_time_s": rep.projected_time_s(Topology.from_mesh(mesh)),
            "by_kind": {k: {kk: float(vv) for kk, vv in v.items()} for k, v in rep.by_kind.items()},
            "compile_s": round(time.perf_counter() - t0, 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    flat = [r for r in results if (r["path"], r["variant"]) == ("flat", "table_wise")]
    base = flat[0]["cross_host_bytes"] if flat else None
    payload = flat_payload_cross_host_bytes(features, batch, hosts)
    print(json.dumps({
        "benchmark": "comm_volume_summary", "mesh": [hosts, local],
        "cross_host_fraction_of_flat_table_wise": None if base is None else {
            f"{r['path']}:{r['variant']}": round(r["cross_host_bytes"] / base, 4) for r in results
        },
        "target_sptt_tm_at_most": 0.125,
        "flat_table_wise_payload_cross_host_bytes": payload,
        "flat_table_wise_padding_factor": None if base is None else round(base / payload, 2),
        "cross_host_fraction_of_flat_payload": {
            f"{r['path']}:{r['variant']}": round(r["cross_host_bytes"] / payload, 4)
            for r in results
        },
    }))


def flat_payload_cross_host_bytes(features, global_batch: int, hosts: int) -> float:
    """Bytes a ragged flat table-wise step would move across hosts: for each
    table, the ids (int32) of the samples on other hosts, their pooled rows
    (a sequence's rows) and the rows' gradients (float32)."""
    other = global_batch * (hosts - 1) / hosts
    return float(sum(other * 4 * (f.max_len + 2 * f.dim * (1 if f.pooled else f.max_len))
                     for f in features.sparse))


if __name__ == "__main__":
    main()
