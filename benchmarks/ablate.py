#!/usr/bin/env python
"""DMT ablation: flat vs SPTT vs SPTT + Tower Module vs + learned partition.

    pip install -e '.[bench]'                 # matplotlib, for the plot
    python benchmarks/ablate.py               # 2x4 emulated, default synthetic data
    python benchmarks/ablate.py --steps 200 --out-dir /tmp/ablation

Trains, on the same synthetic data and steps, for each of `--seeds` (3 by
default: data, teacher and initialisation change with the seed):

    flat             the flat table-wise path
    sptt_identity    SPTT with the identity Tower Module (the flat model)
    sptt_tm          SPTT with a compressing Tower Module, round-robin towers
    sptt_tm_random   the same with random towers (the partitioner's baseline)
    sptt_tm_learned  the same with the learned Tower Partitioner's towers,
                     from the flat run's checkpoint
    flat_growth_prune  the flat path with alternate growth and pruning of the
                     dense network (`--growth-prune`, the 'default' preset)

and writes `ablation.md` (a markdown table: eval AUC and logloss as the
mean over the seeds with the half-width of a 95% t interval, cross-host
bytes per step from the compiled step, median step time), `ablation.png`
(the same four figures as bars with their intervals) and `ablation.json`
to `--out-dir`, and prints each run's JSON line and each run's summary. The partition's adjusted Rand index against
the teacher's planted interaction groups is reported for every tower set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jdmt.mesh import prepare_devices  # noqa: E402

FIGURES = (
    ("eval_auc", "eval AUC"),
    ("eval_logloss", "eval logloss"),
    ("cross_host_bytes_per_step", "cross-host bytes / step"),
    ("step_time_ms_median", "step time (ms)"),
)


# Student t quantiles t_{0.975, df} for the 95% interval of a mean over df + 1 seeds.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def interval(xs) -> tuple[float, float]:
    """(mean, half-width of its 95% t interval) of per-seed values."""
    import numpy as np

    x = np.asarray(xs, np.float64)
    if x.size < 2:
        return float(x.mean()), float("nan")
    df = x.size - 1
    t = _T975.get(df) or next((v for k, v in sorted(_T975.items()) if k >= df), 1.96)
    return float(x.mean()), float(t * x.std(ddof=1) / np.sqrt(x.size))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh", default="2x4")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--tower-module", default="dot", choices=("linear", "dot", "dcn", "mlp"))
    p.add_argument("--tower-dim", type=int, default=32)
    p.add_argument("--towers", type=int, default=None, help="default: one per host")
    p.add_argument("--seeds", default="0,1,2",
                   help="comma-separated seeds (data, teacher and init); each run's figures are "
                   "reported as the mean over them with a 95%% t interval")
    p.add_argument("--teacher", default="dlrm", choices=("dlrm", "deep"),
                   help="the synthetic labels' teacher (deep: no planted groups, so the "
                   "partition ARI figures are not meaningful there)")
    p.add_argument("--kernel", default="auto", choices=("auto", "pallas", "xla"),
                   help="lookups and sparse updates (auto: the XLA path)")
    p.add_argument("--growth-prune", default="default",
                   help="schedule of the flat_growth_prune run ('' leaves the run out)")
    p.add_argument("--out-dir", default="ablation")
    args = p.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    with open(os.devnull, "w") as quiet:
        hosts, _ = prepare_devices(args.mesh, stream=quiet)

    from jdmt.mesh import make_mesh
    from jdmt.towers.partition import (
        adjusted_rand_index,
        labels_of,
        pair_recall,
        random_partition,
        round_robin_partition,
    )
    from jdmt.train import TrainConfig, Trainer
    from jdmt.train.interactions import partition_from_trainer, restore_trainer

    os.makedirs(args.out_dir, exist_ok=True)
    mesh = make_mesh(args.mesh)
    towers = args.towers or hosts
    rows = []
    for seed in seeds:
        base = dict(mesh=args.mesh, steps=args.steps, global_batch=args.batch_size, seed=seed,
                    progress=False, kernel=args.kernel, teacher=args.teacher)
        flat_ck = os.path.join(args.out_dir, f"seed{seed}", "flat_checkpoint")
        partition_path = os.path.join(args.out_dir, f"seed{seed}", "learned_partition.json")
        if os.path.isdir(flat_ck):
            raise SystemExit(f"ablate: {flat_ck} exists; choose another --out-dir")
        tm = dict(towers=towers, tower_module=args.tower_module, tower_dim=args.tower_dim)
        runs = [
            ("flat", dict(towers=0, checkpoint_dir=flat_ck)),
            ("sptt_identity", dict(towers=towers)),
            ("sptt_tm", dict(tm, tower_partitioner="round_robin")),
            ("sptt_tm_random", dict(tm, tower_partitioner="random")),
            ("sptt_tm_learned", dict(tm, tower_partitioner=partition_path)),
        ] + ([("flat_growth_prune", dict(towers=0, growth_prune=args.growth_prune))]
             if args.growth_prune else [])
        for name, extra in runs:
            t0 = time.perf_counter()
            trainer = Trainer(TrainConfig(**base, **extra), mesh)
            s = trainer.run()
            row = {"benchmark": "ablate", "run": name, "seed": seed, "mesh": s["mesh"],
                   "steps": s["steps"], "towers": s["towers"], "tower_module": s["tower_module"],
                   **{k: s[k] for k, _ in FIGURES}, "bayes_auc": s["bayes_auc"],
                   "train_gflop": (s["dense_train_flops"] or float("nan")) / 1e9,
                   "wall_s": round(time.perf_counter() - t0, 1)}
            if name == "flat":
                groups = trainer.data.groups
                flat_trainer, state, _ = restore_trainer(
                    flat_ck, mesh, data_seed=seed, eval_batch_size=trainer.config.eval_size,
                    global_batch=args.batch_size, source=trainer.data)
                learned = partition_from_trainer(flat_trainer, state, towers, hosts)
                learned.save(partition_path)
                names = trainer.features.names
                truth = labels_of(groups, names)
                parts = {
                    "learned": learned,
                    "round_robin": round_robin_partition(trainer.features, towers, hosts),
                    # the towers of the sptt_tm_random run (the trainer's seed)
                    "random": random_partition(trainer.features, towers, hosts, seed=seed),
                }
                row["partition_ari_vs_planted_groups"] = {
                    k: adjusted_rand_index(p.labels(names), truth) for k, p in parts.items()}
                row["partition_pair_recall"] = {
                    k: pair_recall(p.labels(names), truth) for k, p in parts.items()}
            rows.append(row)
            print(json.dumps(row), flush=True)

    summary = []
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        out = {"benchmark": "ablate_summary", "run": name, "seeds": [r["seed"] for r in mine]}
        for key, _ in (*FIGURES, ("bayes_auc", ""), ("train_gflop", "")):
            out[key], out[key + "_ci95"] = interval([r[key] for r in mine])
        summary.append(out)
        print(json.dumps(out), flush=True)
    flats = [r for r in rows if r["run"] == "flat"]
    with open(os.path.join(args.out_dir, "ablation.json"), "w") as f:
        json.dump({"runs": rows, "summary": summary}, f, indent=1)
    lines = ["| run | eval AUC | eval logloss | cross-host MiB/step | step ms | training GFLOP |",
             "|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(
            f"| {r['run']} | {r['eval_auc']:.4f} ± {r['eval_auc_ci95']:.4f} | "
            f"{r['eval_logloss']:.4f} ± {r['eval_logloss_ci95']:.4f} | "
            f"{r['cross_host_bytes_per_step'] / 2**20:.2f} | {r['step_time_ms_median']:.1f} | "
            f"{r['train_gflop']:,.0f} |")

    def mean_of(key, part):
        return sum(r[key][part] for r in flats) / len(flats)

    lines += ["", f"Mean ± half-width of the 95% t interval over seeds {seeds}. Bayes AUC "
              f"{summary[0]['bayes_auc']:.4f} (mean). Partition ARI vs the planted groups (mean): "
              f"learned {mean_of('partition_ari_vs_planted_groups', 'learned'):.3f}, round robin "
              f"{mean_of('partition_ari_vs_planted_groups', 'round_robin'):.3f}, random "
              f"{mean_of('partition_ari_vs_planted_groups', 'random'):.3f}; planted pairs kept in "
              f"one tower: learned {mean_of('partition_pair_recall', 'learned'):.3f}, round robin "
              f"{mean_of('partition_pair_recall', 'round_robin'):.3f}, random "
              f"{mean_of('partition_pair_recall', 'random'):.3f}. "
              f"{args.steps} steps of {args.batch_size} on {args.mesh}, Tower Module "
              f"{args.tower_module} to {args.tower_dim} values, {towers} towers, teacher "
              f"{args.teacher}."]
    with open(os.path.join(args.out_dir, "ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(summary, os.path.join(args.out_dir, "ablation.png"))
    print("\n".join(lines))
    return 0


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FIGURES), figsize=(4 * len(FIGURES), 3.2))
    names = [r["run"] for r in rows]
    for ax, (key, label) in zip(axes, FIGURES):
        err = [r.get(key + "_ci95", 0.0) for r in rows]
        ax.bar(range(len(rows)), [r[key] for r in rows], yerr=err, capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        if key in ("eval_auc", "eval_logloss"):
            lo = min(r[key] for r in rows)
            hi = max(r[key] for r in rows)
            ax.set_ylim(lo - 0.02 * max(hi, 1e-9), hi + 0.02 * max(hi, 1e-9))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
