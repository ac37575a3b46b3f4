"""Pooled embedding lookup: forward, and forward + backward + row-wise Adagrad.

Prints one JSON object per configuration: one device, then a 2x4 mesh for
each sharding type, each with the pooled lookup and the sparse update as XLA
ops and as the C++ CPU kernels (`jdmt.embeddings.cpu_kernels`, the default on
CPU), measured side by side in one run. Workload (FBGEMM's TBE benchmark
shape): `--tables`
tables of `--rows` x `--dim`, `--batch` bags per table of exactly
`--pooling` ids, Zipf(`--alpha`) ids.

    python benchmarks/lookup.py                  # the defaults below
    python benchmarks/lookup.py --malloc=glibc   # under glibc's malloc defaults
    python benchmarks/lookup.py --kernel=pallas  # Pallas kernels vs XLA
    JDMT_PEER=DIR python benchmarks/lookup.py    # and FBGEMM / TorchRec beside it

With a peer (`--peer DIR`, `benchmarks/peers.py`), the one-device figures
are measured in `--rounds` rounds, jdmt and FBGEMM's CPU TBE (and TorchRec's
FusedEBC) alternately on the same shape and id distribution, and the
one-device JSON objects carry the peer's medians and the ratios
(`ratio_to_fbgemm`: jdmt's time over FBGEMM's, below 1 is faster).

`--kernel=pallas` (or `auto` on a GPU or TPU) times the Pallas kernels
(`jdmt.pallas_kernels`) and the XLA path side by side on the accelerator,
with the forward's fraction of the memory-bandwidth roofline (bytes of
rows gathered / time / the device's peak bandwidth, `--peak-gbps` or a
table of known chips). On CPU the kernels only run interpreted, so it
checks them instead: forward and one training step of every configuration
against the XLA path, at a smaller shape (`--check-*`), no timings.

"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import peers

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096, help="global batch (bags per table)")
    p.add_argument("--pooling", type=int, default=10, help="ids per bag")
    p.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent of the ids")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per measurement")
    p.add_argument("--mesh", default="2x4", help="the multi-device mesh")
    p.add_argument("--shardings", default="data_parallel,table_wise,row_wise,column_wise",
                   help="sharding types timed on --mesh ('': the one-device run only)")
    p.add_argument("--skip-single", action="store_true", help="skip the one-device run")
    p.add_argument("--update", default="both", choices=["both", "xla", "cpu"],
                   help="the pooled lookup and sparse update as XLA ops, as the C++ CPU "
                        "kernels (the default of a CPU run), or both (side by side, one "
                        "JSON object each)")
    p.add_argument("--malloc", default="auto", choices=("auto", "tuned", "glibc"),
                   help="malloc settings (jdmt/cpu_malloc.py): auto tunes glibc when the "
                   "process drives one CPU device (--shardings '')")
    p.add_argument("--kernel", default="xla", choices=["auto", "pallas", "xla"],
                   help="xla: the XLA path (and the CPU update kernel); pallas: Pallas kernels "
                   "vs XLA (timed on GPU/TPU, checked interpreted on CPU); auto: pallas on "
                   "GPU/TPU, xla on CPU")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="the device's peak memory bandwidth in GB/s (default: a table of chips)")
    p.add_argument("--check-rows", type=int, default=2000, help="rows per table of the CPU check")
    p.add_argument("--check-batch", type=int, default=256, help="bags per table of the CPU check")
    p.add_argument("--check-tables", type=int, default=4, help="tables of the CPU check")
    p.add_argument("--table-dtype", default="f32", choices=["f32", "bf16", "f16"],
                   help="the tables' storage (16-bit: stochastic rounding on write)")
    p.add_argument("--rounds", type=int, default=3,
                   help="with a peer: rounds of jdmt then the peer on the one-device shape")
    peers.add_arguments(p)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


# Peak memory bandwidth in GB/s by `device_kind` (vendor data sheets).
PEAK_GBPS = {
    "NVIDIA H200": 4800.0, "NVIDIA H100 80GB HBM3": 3350.0, "NVIDIA H100": 3350.0,
    "NVIDIA A100-SXM4-80GB": 2039.0, "NVIDIA A100-SXM4-40GB": 1555.0, "NVIDIA L4": 300.0,
    "TPU v4": 1228.0, "TPU v5 lite": 819.0, "TPU v5e": 819.0, "TPU v5p": 2765.0,
    "TPU v6 lite": 1640.0, "TPU v6e": 1640.0,
}


def peak_gbps(device, override: float | None) -> float | None:
    if override:
        return override
    kind = device.device_kind
    return next((v for k, v in PEAK_GBPS.items() if kind.startswith(k)), None)


def zipf_ids(rng, rows: int, alpha: float, shape):
    """Truncated Zipf over [0, rows): rank k drawn with p ~ 1/(k+1)^alpha, then a
    fixed random permutation of the ranks (hot ids are not 0, 1, 2...)."""
    import numpy as np

    cdf = np.cumsum(1.0 / np.arange(1, rows + 1, dtype=np.float64) ** alpha)
    ranks = np.searchsorted(cdf / cdf[-1], rng.random(shape), side="right")
    return rng.permutation(rows)[np.minimum(ranks, rows - 1)].astype(np.int32)


def median_ms(fn, iters: int) -> float:
    import jax

    jax.block_until_ready(fn())  # warm-up (and compile)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def workload(args, tables: int, rows: int, batch: int):
    """(features, ids, lengths, weights) of the benchmark's shape."""
    import numpy as np

    from jdmt.data.specs import make_features

    feats = make_features(tables, rows, args.dim, args.pooling)
    rng = np.random.default_rng(0)
    ids = np.concatenate(
        [zipf_ids(rng, rows, args.alpha, (batch, args.pooling)) for _ in range(tables)], axis=1)
    lengths = np.full((batch, tables), args.pooling, np.int32)
    weights = rng.standard_normal((batch, tables * args.dim)).astype(np.float32)
    return feats, ids, lengths, weights


def configs(args):
    import jax

    from jdmt.mesh import parse_mesh_spec

    out = [] if args.skip_single else [("1x1", "table_wise", [jax.devices()[0]])]
    h, l = parse_mesh_spec(args.mesh)
    if h * l > len(jax.devices()):
        print(f"# skipping mesh {args.mesh}: it needs {h * l} devices, {len(jax.devices())} here",
              file=sys.stderr)
        return out
    for s in filter(None, args.shardings.split(",")):  # --shardings '': one device only
        out.append((args.mesh, s, jax.devices()[: h * l]))
    return out


def build(feats, spec, sharding, devices, kernel, ids, lengths, weights, cpu_update=None, table_dtype="f32"):
    """(embeddings, state, forward(), step() with a donated state holder)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jdmt.embeddings import ShardedEmbeddings, SparseOptimizer
    from jdmt.mesh import DEVICES, make_mesh

    mesh = make_mesh(spec, devices=devices)
    emb = ShardedEmbeddings(feats, mesh, sharding, SparseOptimizer("rowwise_adagrad", lr=0.01),
                            cpu_kernels=cpu_update, kernel=kernel, table_dtype=table_dtype)
    sh = NamedSharding(mesh, P(DEVICES))
    ids_d, len_d, w_d = (jax.device_put(x, sh) for x in (ids, lengths, weights))
    # exchange capacities from this batch (as the trainer fits them from its first)
    emb.fit_caps(ids.shape[0] // mesh.devices.size, emb.measure(ids, lengths))
    fwd = jax.jit(lambda s, i, n: emb.forward(s, i, n)[0].pooled)
    step = jax.jit(lambda s, i, n, w, seed: emb.step(s, i, n, lambda e, w: jnp.sum(e.pooled * w), w,
                                                      seed=seed)[1], donate_argnums=0)
    holder = [emb.init(seed=0), 0]

    def one_step():
        holder[1] += 1  # a new stochastic-rounding seed every step (16-bit tables)
        holder[0] = step(holder[0], ids_d, len_d, w_d, jnp.uint32(holder[1]))
        return holder[0]

    return emb, holder, (lambda: fwd(holder[0], ids_d, len_d)), one_step


def check_kernels(args) -> list[dict]:
    """CPU: the interpreted Pallas kernels vs the XLA path, forward and one step."""
    import jax
    import numpy as np

    feats, ids, lengths, weights = workload(args, args.check_tables, args.check_rows,
                                            args.check_batch)
    results = []
    for spec, sharding, devices in configs(args):
        runs = {}
        for kernel in ("xla", "pallas"):
            emb, holder, fwd, step = build(feats, spec, sharding, devices, kernel, ids, lengths,
                                           weights, cpu_update=False)
            t0 = time.perf_counter()
            out = np.asarray(fwd())
            step()
            tables, _ = emb.to_dense(holder[0])
            runs[kernel] = (out, tables, time.perf_counter() - t0)
        fwd_err = float(np.max(np.abs(runs["xla"][0] - runs["pallas"][0])))
        tab_err = max(float(np.max(np.abs(runs["xla"][1][k] - runs["pallas"][1][k])))
                      for k in runs["xla"][1])
        results.append({
            "benchmark": "lookup_kernel_check",
            "mesh": spec, "sharding": "single_device" if spec == "1x1" else sharding,
            "tables": args.check_tables, "rows": args.check_rows, "dim": args.dim,
            "batch": args.check_batch, "pooling": args.pooling,
            "target": emb.impl.target, "interpreted": bool(emb.impl.interpret),
            "fwd_max_abs_diff": fwd_err, "tables_after_step_max_abs_diff": tab_err,
            "matches_xla": fwd_err <= 1e-5 and tab_err <= 1e-5,
            "interpret_wall_s": round(runs["pallas"][2], 2),
            "backend": jax.default_backend(),
        })
        print(json.dumps(results[-1]), flush=True)
    return results


def time_kernels(args) -> list[dict]:
    """GPU/TPU: Pallas kernels vs XLA, timed side by side, with the roofline."""
    import jax

    feats, ids, lengths, weights = workload(args, args.tables, args.rows, args.batch)
    lookups = args.batch * args.tables * args.pooling
    row_bytes = lookups * args.dim * 4  # f32 rows gathered by the forward
    results = []
    for spec, sharding, devices in configs(args):
        row = {"benchmark": "lookup_kernels", "mesh": spec,
               "sharding": "single_device" if spec == "1x1" else sharding,
               "tables": args.tables, "rows": args.rows, "dim": args.dim, "batch": args.batch,
               "pooling": args.pooling, "alpha": args.alpha, "device": devices[0].device_kind}
        peak = peak_gbps(devices[0], args.peak_gbps)
        for kernel in ("xla", "pallas"):
            _, _, fwd, step = build(feats, spec, sharding, devices, kernel, ids, lengths, weights)
            f_ms, s_ms = median_ms(fwd, args.iters), median_ms(step, args.iters)
            per_device_gbps = row_bytes / len(devices) / (f_ms / 1e3) / 1e9
            row[f"{kernel}_fwd_ms"] = round(f_ms, 3)
            row[f"{kernel}_fwd_bwd_update_ms"] = round(s_ms, 3)
            row[f"{kernel}_fwd_gbps_per_device"] = round(per_device_gbps, 1)
            row[f"{kernel}_fwd_roofline_fraction"] = (
                None if peak is None else round(per_device_gbps / peak, 3))
        row["peak_gbps"] = peak
        row["pallas_speedup_fwd"] = round(row["xla_fwd_ms"] / row["pallas_fwd_ms"], 3)
        row["pallas_speedup_step"] = round(
            row["xla_fwd_bwd_update_ms"] / row["pallas_fwd_bwd_update_ms"], 3)
        row["backend"] = jax.default_backend()
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def run(args) -> list[dict]:
    """The XLA path: every configuration with each sparse update; with a peer,
    the one-device ones alternately with FBGEMM's TBE and TorchRec's FusedEBC."""
    import jax
    import numpy as np

    from jdmt import cpu_malloc
    from jdmt.embeddings import cpu_kernels

    peer, reason = peers.find(args.peer, args.peer_python)
    if peer is None:
        peers.warn_missing(reason, args.peer)
    feats, ids, lengths, weights = workload(args, args.tables, args.rows, args.batch)
    lookups = args.batch * args.tables * args.pooling
    unique = np.mean([len(np.unique(ids[:, feats.columns(f.name)])) for f in feats.sparse])
    updates = ["xla", "cpu"] if args.update == "both" else [args.update]
    if "cpu" in updates and not cpu_kernels.available():
        print(f"# CPU kernel unavailable: {cpu_kernels.unavailable_reason()}", file=sys.stderr)
        updates = [u for u in updates if u != "cpu"]
    runs = [(c, u) for c in configs(args) for u in updates]
    single = [r for r in runs if r[0][0] == "1x1"] if peer is not None else []
    # with a peer, the one-device configurations go first, in rounds with it
    timed = {}
    if single:
        built = {u: build(feats, c[0], c[1], c[2], "xla", ids, lengths, weights,
                          cpu_update=u == "cpu", table_dtype=args.table_dtype)[2:] for c, u in single}
        rounds = []
        for r in range(args.rounds):
            row = {}
            for u, (fwd, step) in built.items():
                row[u] = (median_ms(fwd, args.iters), median_ms(step, args.iters))
            row["peer"] = peers.ebc_bench(
                peer, tables=args.tables, rows=args.rows, dim=args.dim, batch=args.batch,
                pooling=args.pooling, alpha=args.alpha, iters=args.iters,
                variants=(peers.TBE_FWD, peers.TBE_STEP, peers.TORCHREC_STEP))["ms"]
            print(f"# round {r + 1}/{args.rounds}: " + ", ".join(
                f"jdmt {u}-update fwd {row[u][0]:.1f} ms step {row[u][1]:.1f} ms" for u in built)
                + ", " + ", ".join(f"{k} {v:.1f} ms" for k, v in row["peer"].items()),
                file=sys.stderr, flush=True)
            rounds.append(row)
        for u in built:
            timed[u] = {
                "fwd_ms": statistics.median(r[u][0] for r in rounds),
                "step_ms": statistics.median(r[u][1] for r in rounds),
                "peer": {k: statistics.median(r["peer"][k] for r in rounds)
                         for k in rounds[0]["peer"]},
                "rounds": [{"jdmt_fwd_ms": round(r[u][0], 2), "jdmt_fwd_bwd_update_ms":
                            round(r[u][1], 2), **{k: round(v, 2) for k, v in r["peer"].items()}}
                           for r in rounds],
            }
        del built
    results = []
    for (spec, sharding, devices), update in runs:
        if spec == "1x1" and update in timed:
            t = timed[update]
            fwd_ms, step_ms = t["fwd_ms"], t["step_ms"]
        else:
            _, _, fwd, step = build(feats, spec, sharding, devices, "xla", ids, lengths, weights,
                                    cpu_update=update == "cpu", table_dtype=args.table_dtype)
            fwd_ms = median_ms(fwd, args.iters)
            step_ms = median_ms(step, args.iters)
            t = None
        row = {
            "benchmark": "lookup",
            "mesh": spec,
            "devices": len(devices),
            "sharding": "single_device" if spec == "1x1" else sharding,
            "tables": args.tables, "rows": args.rows, "dim": args.dim,
            "batch": args.batch, "pooling": args.pooling, "alpha": args.alpha,
            "unique_ids_per_table": float(unique),
            "optimizer": "rowwise_adagrad",
            "table_dtype": args.table_dtype,
            # the C++ CPU kernels run the pooled lookup and the update together
            "lookup": "cpu_kernel" if update == "cpu" else "xla",
            "update": "cpu_kernel" if update == "cpu" else "xla",
            "fwd_ms": round(fwd_ms, 2),
            "fwd_bwd_update_ms": round(step_ms, 2),
            "lookups_per_sec": round(lookups / (step_ms / 1e3)),
            "fwd_lookups_per_sec": round(lookups / (fwd_ms / 1e3)),
            "malloc": cpu_malloc.state(),
            "backend": jax.default_backend(),
        }
        if spec == "1x1":
            row["peer"] = peers.describe(peer, reason)
        if t is not None:
            p = t["peer"]
            row["peer"].update({
                "fbgemm_tbe_fwd_ms": round(p[peers.TBE_FWD], 2),
                "fbgemm_tbe_fwd_bwd_update_ms": round(p[peers.TBE_STEP], 2),
                "torchrec_fused_ebc_fwd_bwd_update_ms": round(p[peers.TORCHREC_STEP], 2),
                "rounds": t["rounds"],
            })
            # jdmt's time over the peer's (medians over the rounds): below 1 is faster
            row["ratio_to_fbgemm"] = {
                "fwd": round(fwd_ms / p[peers.TBE_FWD], 3),
                "fwd_bwd_update": round(step_ms / p[peers.TBE_STEP], 3),
            }
            row["ratio_to_torchrec"] = {"fwd_bwd_update": round(step_ms / p[peers.TORCHREC_STEP], 3)}
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def main(argv=None):
    args = parse_args(argv)
    from jdmt import cpu_malloc
    from jdmt.mesh import emulate_cpu_devices, parse_mesh_spec

    cpu_malloc.set_policy(args.malloc)
    hosts, local = parse_mesh_spec(args.mesh)
    # the one-device run alone needs one device (and then malloc's `auto` tunes it)
    emulate_cpu_devices(hosts * local if args.shardings.strip() else 1)
    import jax

    kernel = args.kernel
    if kernel == "auto":
        kernel = "xla" if jax.default_backend() == "cpu" else "pallas"
    if kernel == "pallas":
        if jax.default_backend() == "cpu":
            check_kernels(args)
        else:
            time_kernels(args)
        return
    run(args)


if __name__ == "__main__":
    main()
