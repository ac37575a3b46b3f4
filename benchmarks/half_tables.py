#!/usr/bin/env python
"""16-bit tables against f32: eval AUC of the default run, table memory, lookup time.

    python benchmarks/half_tables.py                    # everything below
    python benchmarks/half_tables.py --steps 300 --skip-lookup

1. **Quality.** The default training run (`train.py --mesh=2x4`: the default
   synthetic set and DLRM, `--steps` steps) with `--table-dtype` f32, bf16
   and f16, one after the other, same seed: eval AUC and logloss, the AUC
   delta to f32, table bytes (tables and optimizer state), examples/s.
2. **Lookup.** One device, the FBGEMM TBE benchmark's shape
   (`benchmarks/lookup.py`'s workload: `--tables` x `--rows` x `--dim`,
   `--batch` bags of `--pooling` Zipf ids): the pooled forward and the
   forward + backward + row-wise Adagrad step, the C++ CPU kernels (the CPU
   default) and the XLA path, f32 and 16-bit tables timed alternately in
   `--rounds` rounds (medians), with the bytes of table rows each forward
   reads.

Prints one JSON object per measurement; the last line is one JSON object
with a key `summary`: `auc` and `auc_delta_vs_f32` per type, `table_bytes`,
and per type and path the forward and step medians and their ratio to f32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

DTYPES = ("f32", "bf16", "f16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: train.py's)")
    p.add_argument("--mesh", default="2x4")
    p.add_argument("--train-args", default="", help="more train.py flags, e.g. '--seed 1'")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-lookup", action="store_true")
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--pooling", type=int, default=10)
    p.add_argument("--alpha", type=float, default=1.05)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args(argv)


def train(args) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dt in DTYPES:
            path = os.path.join(tmp, f"{dt}.json")
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--mesh={args.mesh}",
                   f"--table-dtype={dt}", "--no-progress", "--summary-json", path,
                   *(["--steps", str(args.steps)] if args.steps else []), *args.train_args.split()]
            print("# " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(path) as f:
                s = json.load(f)
            row = {"benchmark": "half_tables_train", "table_dtype": dt, "path": s["path"],
                   "steps": s["steps"], "eval_auc": s["eval_auc"], "eval_logloss": s["eval_logloss"],
                   "table_bytes": s["table_bytes"], "table_bytes_allocated": s["table_bytes_allocated"],
                   "examples_per_sec": s["examples_per_sec"], "final_train_loss": s["train_loss"][-1]}
            print(json.dumps(row), flush=True)
            out[dt] = row
    return out


def lookup(args) -> dict:
    import jax

    import lookup as lk
    from jdmt.embeddings import cpu_kernels

    feats, ids, lengths, weights = lk.workload(args, args.tables, args.rows, args.batch)
    paths = ["cpu", "xla"] if cpu_kernels.available() else ["xla"]
    dev = [jax.devices()[0]]
    built = {(dt, u): lk.build(feats, "1x1", "table_wise", dev, "xla", ids, lengths, weights,
                               cpu_update=u == "cpu", table_dtype=dt)[2:]
             for dt in DTYPES for u in paths}
    rounds = []
    for r in range(args.rounds):
        row = {k: (lk.median_ms(f, args.iters), lk.median_ms(s, args.iters)) for k, (f, s) in built.items()}
        rounds.append(row)
        print(f"# round {r + 1}/{args.rounds}: " + ", ".join(
            f"{dt}/{u} fwd {v[0]:.1f} ms step {v[1]:.1f} ms" for (dt, u), v in row.items()),
            file=sys.stderr, flush=True)
    lookups = args.batch * args.tables * args.pooling
    out = {}
    for (dt, u) in built:
        fwd = statistics.median(r[(dt, u)][0] for r in rounds)
        step = statistics.median(r[(dt, u)][1] for r in rounds)
        f32 = (statistics.median(r[("f32", u)][0] for r in rounds),
               statistics.median(r[("f32", u)][1] for r in rounds))
        item = 4 if dt == "f32" else 2
        row = {"benchmark": "half_tables_lookup", "table_dtype": dt,
               "path": "cpu_kernels" if u == "cpu" else "xla",
               "tables": args.tables, "rows": args.rows, "dim": args.dim, "batch": args.batch,
               "pooling": args.pooling, "alpha": args.alpha, "rounds": args.rounds,
               "row_bytes_read_per_fwd": lookups * args.dim * item,
               "fwd_ms": round(fwd, 2), "fwd_bwd_update_ms": round(step, 2),
               "fwd_ratio_to_f32": round(fwd / f32[0], 3), "step_ratio_to_f32": round(step / f32[1], 3),
               "per_round": [[round(r[(dt, u)][0], 2), round(r[(dt, u)][1], 2)] for r in rounds]}
        print(json.dumps(row), flush=True)
        out[f"{dt}/{row['path']}"] = row
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = {}
    if not args.skip_train:
        t = train(args)
        summary["auc"] = {dt: t[dt]["eval_auc"] for dt in t}
        summary["auc_delta_vs_f32"] = {dt: t[dt]["eval_auc"] - t["f32"]["eval_auc"] for dt in t if dt != "f32"}
        summary["table_bytes"] = {dt: t[dt]["table_bytes"] for dt in t}
        summary["examples_per_sec"] = {dt: t[dt]["examples_per_sec"] for dt in t}
    if not args.skip_lookup:
        from jdmt.mesh import prepare_devices

        prepare_devices("1x1")
        lk = lookup(args)
        summary["lookup"] = {k: {"fwd_ms": v["fwd_ms"], "fwd_bwd_update_ms": v["fwd_bwd_update_ms"],
                                 "fwd_ratio_to_f32": v["fwd_ratio_to_f32"],
                                 "step_ratio_to_f32": v["step_ratio_to_f32"]} for k, v in lk.items()}
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
