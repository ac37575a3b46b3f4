#!/usr/bin/env python
"""Step time of the flat path vs Disaggregated Multi-Tower, in two real processes.

    python benchmarks/dmt_speedup.py                    # 2 processes x 4 CPU devices
    python benchmarks/dmt_speedup.py --quick            # tiny smoke run
    python benchmarks/dmt_speedup.py --project-mesh=64x8   # the issue's scale (slow to compile on 2 cores)
    python benchmarks/dmt_speedup.py --links=loopback,500   # as root: a 500 Mbit/s link between hosts

Runs `benchmarks/train_throughput.py` twice, one after the other on the same
model and data (26 tables x 100k x 64, 10 ids per bag, 4096 examples per
host, TorchRec's DLRM MLPs): flat table_wise, then DMT with one tower per
host and a compressing Tower Module. Prints one JSON object with
`flat_step_ms`, `dmt_step_ms` and `speedup` (flat / DMT, medians of the
steps after the compiled first one), the bytes each step moves, and a
projection of the embedding step's communication time on `--project-mesh`:
`benchmarks/comm_volume.py` compiles the embedding part of both steps on
that many emulated devices (at `--project-batch-per-device` examples per
device, with the same tables) and times its per-device bytes with the
`Topology` model (600 GB/s inside a host, 12.5 GB/s across).

The two processes talk over loopback, as do the devices inside each process
(gloo carries every collective over TCP): on this machine a host's "fast"
network is no faster than the one between hosts, and compute is slow, so
the cross-host bytes DMT saves hardly show. `--links` repeats the pair of
runs over other links, one JSON object each: `veth` puts each process in its
own network namespace (`two_hosts.py`: traffic inside a process stays on
its own loopback, traffic between them crosses a veth pair), and a number
caps that veth at so many Mbit/s per direction, a slow link between hosts as
in a data centre. Needs root and iproute2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_throughput  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECTION_ROWS = 1000


def project(mesh: str, batch_per_device: int, tower_module: str, tower_dim: int, quick: bool) -> dict:
    """Embedding-step communication time (s) of flat table_wise and of DMT on `mesh`."""
    shape = train_throughput.QUICK if quick else train_throughput.FULL
    # Bytes moved do not depend on a table's rows: 1,000 rows keep 512
    # emulated devices' compile and memory small.
    cmd = [sys.executable, os.path.join(HERE, "comm_volume.py"), "--mesh", mesh,
           "--shape", "uniform", "--tables", str(shape["tables"]),
           "--rows", str(min(shape["rows"], PROJECTION_ROWS)),
           "--dim", str(shape["dim"]), "--pooling", str(shape["ids_per_bag"]),
           "--batch-per-device", str(batch_per_device), "--tower-dim", str(tower_dim),
           "--paths", f"flat:table_wise,sptt:{tower_module}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.setdefault("JAX_PLATFORMS", "cpu")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    rows = {(r["path"], r["variant"]): r for r in map(json.loads, out.strip().splitlines())
            if r["benchmark"] == "comm_volume"}
    flat, dmt = rows[("flat", "table_wise")], rows[("sptt", tower_module)]
    return {
        "mesh": flat["mesh"],
        "batch_per_device": batch_per_device,
        "flat_comm_s": flat["projected_comm_time_s"],
        "dmt_comm_s": dmt["projected_comm_time_s"],
        "comm_speedup": flat["projected_comm_time_s"] / dmt["projected_comm_time_s"],
        "flat_cross_host_payload_bytes": flat["cross_host_payload_bytes"],
        "dmt_cross_host_payload_bytes": dmt["cross_host_payload_bytes"],
        "flat_cross_host_wire_bytes_per_device": flat["cross_host_wire_bytes_per_device"],
        "dmt_cross_host_wire_bytes_per_device": dmt["cross_host_wire_bytes_per_device"],
        "towers": dmt["towers"],
    }


def compare(common: list[str], args) -> dict | None:
    """One flat run and one DMT run, back to back: the comparison's fields."""
    flat = train_throughput.run(common)
    dmt = train_throughput.run([*common, "--towers", str(train_throughput.PROCESSES),
                                "--tower-module", args.tower_module,
                                "--tower-dim", str(args.tower_dim)])
    if isinstance(flat, int) or isinstance(dmt, int):
        return None
    return {
        "shape": flat["shape"],
        "mesh": flat["mesh"],
        "towers": dmt["towers"],
        "flat_step_ms": flat["step_time_ms_median"],
        "dmt_step_ms": dmt["step_time_ms_median"],
        "speedup": round(flat["step_time_ms_median"] / dmt["step_time_ms_median"], 3),
        "flat_examples_per_sec": flat["examples_per_sec"],
        "dmt_examples_per_sec": dmt["examples_per_sec"],
        "flat_cross_host_bytes_per_step": flat["cross_host_bytes_per_step"],
        "dmt_cross_host_bytes_per_step": dmt["cross_host_bytes_per_step"],
        "flat_cross_host_payload_bytes_per_step": flat["cross_host_payload_bytes_per_step"],
        "dmt_cross_host_payload_bytes_per_step": dmt["cross_host_payload_bytes_per_step"],
        "flat_intra_host_bytes_per_step": flat["intra_host_bytes_per_step"],
        "dmt_intra_host_bytes_per_step": dmt["intra_host_bytes_per_step"],
        "flat_final_loss": flat["final_train_loss"],
        "dmt_final_loss": dmt["final_train_loss"],
        "load_average_1m": [flat["load_average_1m"], dmt["load_average_1m"]],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tower-module", default="linear", choices=("identity", "linear", "dcn", "mlp"))
    p.add_argument("--tower-dim", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    p.add_argument("--malloc", default="auto", choices=("auto", "tuned", "glibc"),
                   help="the processes' malloc settings (train_throughput.py --malloc)")
    p.add_argument("--local", type=int, default=4,
                   help="devices per process (train_throughput.py --local): 4, so that each "
                   "host has devices for the tower's intra-host exchange")
    p.add_argument("--kernel", default="auto", choices=("auto", "pallas", "xla"),
                   help="lookups and sparse updates of both runs (train_throughput.py --kernel)")
    p.add_argument("--links", default="loopback",
                   help="comma-separated links, one pair of runs each: loopback, veth (two "
                   "network namespaces), or a veth rate in Mbit/s (root, iproute2); '' for "
                   "the projection alone")
    p.add_argument("--project-mesh", default="16x8",
                   help="mesh of the communication projection ('' to skip it)")
    p.add_argument("--project-batch-per-device", type=int, default=8,
                   help="examples per device of the projection's compiled step (bytes "
                   "scale linearly with it; the ratio does not depend on it)")
    args = p.parse_args(argv)
    # jdmt against itself: no peer run (train_throughput.py --peer '')
    common = ["--steps", str(args.steps), "--kernel", args.kernel, "--peer", "", "--local", str(args.local),
              *(["--quick"] if args.quick else []),
              "--malloc", args.malloc]
    for link in filter(None, args.links.split(",")):
        res = compare([*common, "--link", link], args)
        if res is None:
            print("dmt_speedup: a training run failed", file=sys.stderr)
            return 1
        out = {
            "benchmark": "dmt_speedup",
            "link": train_throughput.link_name(train_throughput.parse_link(link)),
            "processes": train_throughput.PROCESSES,
            "tower_module": args.tower_module,
            "tower_dim": args.tower_dim,
            **res,
            "target_speedup": 2.0,
        }
        print(json.dumps(out), flush=True)
    if args.project_mesh:
        out = {"benchmark": "dmt_speedup_projection",
               "projection": project(args.project_mesh, args.project_batch_per_device,
                                     args.tower_module, args.tower_dim, args.quick)}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
