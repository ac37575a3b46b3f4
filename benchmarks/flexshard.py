#!/usr/bin/env python
"""FlexShard against routed row-wise on a sequence workload: bytes per step, and step time.

    python benchmarks/flexshard.py                        # 8x8 emulated payload curve, then 2 processes
    python benchmarks/flexshard.py --quick                # tiny smoke run
    sudo python benchmarks/flexshard.py --links=loopback,500   # step time also over a 500 Mbit/s link
    python benchmarks/flexshard.py --links ''             # the payload curve alone

Workload: `--tables` sequence tables (default 4) of `--rows` rows (default
1M; 10M in the issue: memory and this CPU's time scale it down, and the
JSON states the coverage of the hottest rows at `--full-rows` from the same
Zipf law), S = `--seq-len` positions (256), D = `--dim` (64), Zipf 1.05
ids, row-wise Adagrad.

1. **Payload** (`--mesh`, default 8x8 emulated in this process): one
   compiled step of the embedding part (lookup, a loss, its gradient, the
   fused sparse update) per configuration, on the same batches:
   routed row-wise with requests de-duplicated per host (two hops, the
   default) and per device (each device asks the owners), and FlexShard with
   each cold route at memory budgets `--budgets` (1.0, 1.1, 1.25, 1.5 times
   row-wise's footprint). The tiers come from the row statistics of
   `--stat-batches` batches (`jdmt.planner.flexshard`); payload is counted on
   the devices (ids, rows, gradients, and the replicas' all-reduce), wire
   bytes are read from the compiled program (`jdmt.comm`, padded on CPU).
   A PNG (`--plot`) draws the reduction against each baseline over budgets.
   `--forced` (default) also measures the hottest rows forced into the hot
   tier, and into the warm tier, up to the 1.25x budget: the model's check.
2. **Step time** (`--links`): `train_throughput.py --shape=sequence` in two
   real processes (2 hosts x 4 CPU devices, a DLRM over the sequence
   tables, mean sequence pooling), row-wise then FlexShard at 1.25x,
   alternating for `--time-rounds` rounds, each with `--row-dedup`; a link number caps a veth between two network
   namespaces at that many Mbit/s (`two_hosts.py`, root).

The last line is one JSON object with `summary`:
`payload_reduction_vs_row_wise` ({budget: fraction of routed row-wise's
cross-host payload of the sequence tables removed}, against the
`--row-dedup` baseline; `..._vs_two_hop` and `..._vs_device` give both),
`payload_reduction_vs_no_dedup` (against row-wise that sends every
looked-up id's row and gradient, as TorchRec's row-wise sequence sharding
does and as FlexShard's paper counts), `speedup_500mbit` and
`speedup_loopback` (row-wise step time / FlexShard's; null when not run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from jdmt.mesh import prepare_devices  # noqa: E402

QUICK = dict(tables=2, rows=5000, seq_len=16, dim=8, batch_per_device=8, stat_batches=2)


def coverage_at(rows: int, seq_len: int, tables: int, batches: int, batch: int, ks) -> dict:
    """Share of the lookups the top k rows take at `rows` rows (ids only, no table)."""
    from jdmt.data import SyntheticData
    from jdmt.data.specs import FeatureSet, SparseFeature
    from jdmt.planner.row_stats import row_statistics

    feats = FeatureSet(tuple(SparseFeature(f"seq_{i}", rows, 8, seq_len, kind="sequence")
                             for i in range(tables)), num_dense=1)
    gen = SyntheticData(feats, seed=0)
    st = row_statistics(feats, (gen.batch(i, batch) for i in range(batches)))
    s = st["seq_0"]
    return {str(k): [round(x, 4) for x in s.coverage(k)] for k in ks if k < rows}


def payload_curve(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jdmt.comm import comm_report
    from jdmt.data import SyntheticData
    from jdmt.data.specs import FeatureSet, SparseFeature
    from jdmt.embeddings import Placement, ShardedEmbeddings, SparseOptimizer
    from jdmt.mesh import Topology, make_mesh
    from jdmt.planner.flexshard import plan_tiers
    from jdmt.planner.row_stats import row_statistics

    mesh = make_mesh(args.mesh)
    hosts, local = mesh.devices.shape
    n = hosts * local
    feats = FeatureSet(tuple(SparseFeature(f"seq_{i}", args.rows, args.dim, args.seq_len, kind="sequence")
                             for i in range(args.tables)), num_dense=1)
    batch = n * args.batch_per_device
    gen = SyntheticData(feats, seed=0)
    stat_batches = [gen.batch(i, batch) for i in range(args.stat_batches)]
    stats = row_statistics(feats, stat_batches)
    lookups = {f.name: stats[f.name].total / len(stat_batches) for f in feats.sparse}
    run_batches = [gen.batch(1000 + i, batch) for i in range(args.steps)]
    opt = SparseOptimizer(lr=0.05)
    topo = Topology.from_mesh(mesh)
    everyone = tuple(range(n))

    def measure(sharding, dedup):
        emb = ShardedEmbeddings(feats, mesh, sharding, opt, row_dedup=dedup)
        need = {}
        for b in run_batches:
            for k, v in emb.measure(b.ids, b.lengths).items():
                need[k] = max(need.get(k, 0), v)
        emb.fit_caps(args.batch_per_device, need)

        def step(state, ids, lengths):
            e, ctx, st = emb.forward(state, ids, lengths)
            g = jax.grad(lambda e: sum(jnp.sum(jnp.tanh(v)) for v in e.sequence.values()))(e)
            new, ust = emb.update(state, ctx, g, ids, lengths, skip=emb.must_skip(st))
            return new, st, ust

        fn = jax.jit(step, donate_argnums=0)
        state = emb.init(0)
        t0 = time.perf_counter()
        rep = comm_report(fn, state, jnp.asarray(run_batches[0].ids), jnp.asarray(run_batches[0].lengths),
                          mesh=mesh)
        cross = intra = requested = 0.0
        for b in run_batches:
            state, st, ust = fn(state, jnp.asarray(b.ids), jnp.asarray(b.lengths))
            st, ust = jax.device_get((st, ust))
            assert int(st["overflow"]) == 0 and int(st["out_of_range"]) == 0, st
            cross += float(st["payload_cross_host_bytes"] + ust["payload_cross_host_bytes"])
            intra += float(st["payload_intra_host_bytes"] + ust["payload_intra_host_bytes"])
            requested += float(st["ids_requested"])
        mem = emb.memory()
        del state
        return {
            "cross_host_payload_bytes": cross / len(run_batches),
            "intra_host_payload_bytes": intra / len(run_batches),
            # Row-wise without de-duplication (TorchRec's row-wise sequence sharding): every
            # looked-up id, its row and its gradient, to an owner off the host for (N - L) / N of them.
            "no_dedup_cross_host_payload_bytes": requested / len(run_batches) * (8 * args.dim + 4) * (n - local) / n,
            "cross_host_wire_bytes": float(rep.cross_host_bytes),
            "intra_host_wire_bytes": float(rep.intra_host_bytes),
            "table_bytes_allocated_per_device": mem.per_device_allocated,
            "table_bytes_owned_max_device": float(mem.per_device_owned.max()),
            "seconds": round(time.perf_counter() - t0, 1),
        }

    rows = []
    base = {}
    for dedup in args.dedups:
        r = {"benchmark": "flexshard_payload", "mesh": [hosts, local], "config": f"row_wise:{dedup}",
             "row_dedup": dedup, "budget": None, **measure("row_wise", dedup)}
        base[dedup] = r
        rows.append(r)
        print(json.dumps(r), flush=True)
        plan = {f.name: Placement("flexshard", everyone) for f in feats.sparse}
        for budget in args.budgets:
            tiered, report = plan_tiers(feats, plan, stats, topo, global_batch_lookups=lookups, optimizer=opt,
                                        budget=budget, row_dedup=dedup)
            r = {"benchmark": "flexshard_payload", "mesh": [hosts, local], "config": f"flexshard:{dedup}",
                 "row_dedup": dedup, "budget": budget,
                 "hot_rows": [t.hot for t in report], "warm_rows": [t.warm for t in report],
                 "coverage_hot": [round(t.coverage_hot, 4) for t in report],
                 "coverage_warm": [round(t.coverage_warm, 4) for t in report],
                 "modeled_cross_host_bytes_per_device": sum(t.cross_host_bytes for t in report),
                 "modeled_row_wise_cross_host_bytes_per_device": sum(t.row_wise_cross_host_bytes
                                                                      for t in report),
                 **measure(tiered, dedup)}
            r["payload_reduction"] = round(1.0 - r["cross_host_payload_bytes"]
                                           / max(base[dedup]["cross_host_payload_bytes"], 1.0), 4)
            r["payload_reduction_vs_no_dedup"] = round(1.0 - r["cross_host_payload_bytes"]
                                                       / max(base[dedup]["no_dedup_cross_host_payload_bytes"], 1.0), 4)
            r["memory_vs_row_wise"] = round(r["table_bytes_allocated_per_device"]
                                            / base[dedup]["table_bytes_allocated_per_device"], 4)
            rows.append(r)
            print(json.dumps(r), flush=True)
        # The model's check: the hottest rows forced into one tier, filling the 1.25x budget.
        for tier in ("hot", "warm") if args.forced else ():
            room = 0.25 * sum(f.rows for f in feats.sparse) / n  # rows of room per device, all tables
            per_table = int(room / len(feats.sparse) / ((1 - 1 / n) if tier == "hot" else (1 / local - 1 / n)))
            forced = {}
            for f in feats.sparse:
                top = np.sort(stats[f.name].top(per_table)[0])
                forced[f.name] = Placement("flexshard", everyone, tuple(top) if tier == "hot" else (),
                                           tuple(top) if tier == "warm" else ())
            r = {"benchmark": "flexshard_payload", "mesh": [hosts, local], "config": f"forced_{tier}:{dedup}",
                 "row_dedup": dedup, "budget": 1.25, f"{tier}_rows_per_table": per_table, **measure(forced, dedup)}
            r["payload_reduction"] = round(1.0 - r["cross_host_payload_bytes"]
                                           / max(base[dedup]["cross_host_payload_bytes"], 1.0), 4)
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for dedup, label in (("host", "vs row-wise, two hops (per-host requests)"),
                         ("device", "vs row-wise, per-device requests")):
        pts = [(r["budget"], 100 * r["payload_reduction"]) for r in rows
               if r["config"] == f"flexshard:{dedup}"]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
        nd = [(r["budget"], 100 * r["payload_reduction_vs_no_dedup"]) for r in rows
              if r["config"] == f"flexshard:{dedup}"]
        if nd:
            ax.plot(*zip(*nd), marker="x", ls=":", label=f"({dedup} route) vs row-wise sending every looked-up row")
    ax.axhline(90, color="grey", ls="--", lw=0.8, label="goal: 90%")
    ax.set_xlabel("memory budget (x row-wise's footprint per device)")
    ax.set_ylabel("cross-host payload removed (%)")
    ax.set_title("FlexShard, sequence tables")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def step_times(args) -> dict:
    import train_throughput

    out = {}
    for link in filter(None, args.links.split(",")):
        common = ["--shape", "sequence", "--steps", str(args.time_steps), "--peer", "", "--rounds", "1",
                  "--row-dedup", args.row_dedup, "--link", link, *(["--quick"] if args.quick else [])]
        rws, fxs = [], []
        for _ in range(args.time_rounds):  # A B A B: the machine's drift hits both alike
            rws.append(train_throughput.run([*common, "--sharding", "row_wise"]))
            fxs.append(train_throughput.run([*common, "--sharding", "flexshard", "--memory-budget",
                                             str(args.time_budget)]))
            if isinstance(rws[-1], int) or isinstance(fxs[-1], int):
                raise SystemExit("flexshard: a training run failed")
        rw, fx = rws[-1], fxs[-1]
        t_rw = statistics.median(r["step_time_ms_median"] for r in rws)
        t_fx = statistics.median(r["step_time_ms_median"] for r in fxs)
        name = train_throughput.link_name(train_throughput.parse_link(link))
        res = {
            "benchmark": "flexshard_step_time", "link": name, "row_dedup": args.row_dedup,
            "budget": args.time_budget, "rounds": args.time_rounds,
            "row_wise_step_ms": t_rw, "flexshard_step_ms": t_fx, "speedup": round(t_rw / t_fx, 3),
            "row_wise_step_ms_rounds": [r["step_time_ms_median"] for r in rws],
            "flexshard_step_ms_rounds": [r["step_time_ms_median"] for r in fxs],
            "row_wise_cross_host_payload_bytes_per_step": rw["cross_host_payload_bytes_per_step"],
            "flexshard_cross_host_payload_bytes_per_step": fx["cross_host_payload_bytes_per_step"],
            "row_wise_final_loss": rw["final_train_loss"], "flexshard_final_loss": fx["final_train_loss"],
            "row_tiers": fx.get("row_tiers"),
        }
        out[name] = res
        print(json.dumps(res), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh", default="8x8", help="mesh of the payload curve (emulated)")
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--full-rows", type=int, default=10_000_000,
                   help="the workload's real table size, for the coverage figures")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-per-device", type=int, default=16)
    p.add_argument("--stat-batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="measured steps per configuration")
    p.add_argument("--budgets", default="1.0,1.1,1.25,1.5")
    p.add_argument("--row-dedup", default="host", choices=("host", "device"),
                   help="the baseline route of the summary and of the step-time runs")
    p.add_argument("--links", default="loopback",
                   help="comma-separated links of the step-time runs (loopback, veth, or Mbit/s); '' skips")
    p.add_argument("--time-steps", type=int, default=12)
    p.add_argument("--time-rounds", type=int, default=2, help="alternating rounds per link (medians)")
    p.add_argument("--time-budget", type=float, default=1.25)
    p.add_argument("--plot", default="flexshard_payload.png", help="PNG of the curve ('' skips)")
    p.add_argument("--forced", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the hottest rows forced into the hot (or warm) tier up to the "
                   "1.25x budget, whatever the model says (its check)")
    p.add_argument("--payload", action=argparse.BooleanOptionalAction, default=True,
                   help="the payload curve (--no-payload: the step times alone)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        args.full_rows = args.rows
        args.mesh = "2x4" if args.mesh == "8x8" else args.mesh
    args.budgets = [float(x) for x in args.budgets.split(",") if x]
    args.dedups = ["host", "device"]
    with open(os.devnull, "w") as quiet:
        prepare_devices(args.mesh, stream=quiet)
    t0 = time.perf_counter()
    rows = payload_curve(args) if args.payload else []
    cov = coverage_at(args.full_rows, args.seq_len, 1, args.stat_batches,
                      args.batch_per_device * 64, (100, 1_000, 10_000, 100_000)) if args.payload else None
    if args.plot and rows:
        plot(rows, args.plot)
    red = {d: {f"{r['budget']:g}": r["payload_reduction"] for r in rows if r["config"] == f"flexshard:{d}"}
           for d in args.dedups}
    red_nd = {f"{r['budget']:g}": r["payload_reduction_vs_no_dedup"] for r in rows
              if r["config"] == f"flexshard:{args.row_dedup}"}
    times = step_times(args) if args.links else {}
    pick = lambda name: times[name]["speedup"] if name in times else None  # noqa: E731
    summary = {
        "payload_reduction_vs_row_wise": red[args.row_dedup],
        "payload_reduction_vs_two_hop": red["host"],
        "payload_reduction_vs_device": red["device"],
        "payload_reduction_vs_no_dedup": red_nd,
        "speedup_500mbit": pick("veth at 500 Mbit/s"),
        "speedup_loopback": pick("loopback"),
        "baseline_row_dedup": args.row_dedup,
        "goals": {"payload_reduction_at_1.25": 0.9, "speedup_500mbit": 3.0, "speedup_loopback": 1.0},
    }
    print(json.dumps({"benchmark": "flexshard", "mesh": args.mesh, "tables": args.tables, "rows": args.rows,
                      "seq_len": args.seq_len, "dim": args.dim, "batch_per_device": args.batch_per_device,
                      f"coverage_top_k_at_{args.full_rows}_rows": cov, "plot": args.plot or None,
                      "wall_s": round(time.perf_counter() - t0, 1), "summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
