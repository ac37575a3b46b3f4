#!/usr/bin/env python
"""DMT ablation: flat vs SPTT vs SPTT + Tower Module vs + learned partition.

    pip install -e '.[bench]'                 # matplotlib, for the plot
    python benchmarks/ablate.py               # 2x4 emulated, default synthetic data
    python benchmarks/ablate.py --steps 200 --out-dir /tmp/ablation

Trains, on the same synthetic data, seed and steps:

    flat             the flat table-wise path
    sptt_identity    SPTT with the identity Tower Module (the flat model)
    sptt_tm          SPTT with a compressing Tower Module, round-robin towers
    sptt_tm_random   the same with random towers (the partitioner's baseline)
    sptt_tm_learned  the same with the learned Tower Partitioner's towers,
                     from the flat run's checkpoint

and writes `ablation.md` (a markdown table: eval AUC, logloss, cross-host
bytes per step from the compiled step, median step time), `ablation.png`
(the same four figures as bars) and `ablation.json` to `--out-dir`, and
prints each run's JSON line. The partition's adjusted Rand index against
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh", default="2x4")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--tower-module", default="dot", choices=("linear", "dot", "dcn", "mlp"))
    p.add_argument("--tower-dim", type=int, default=32)
    p.add_argument("--towers", type=int, default=None, help="default: one per host")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernel", default="auto", choices=("auto", "pallas", "xla"),
                   help="lookups and sparse updates (auto: Pallas on GPU/TPU, XLA on CPU)")
    p.add_argument("--out-dir", default="ablation")
    args = p.parse_args(argv)
    with open(os.devnull, "w") as quiet:
        hosts, _ = prepare_devices(args.mesh, stream=quiet)

    from jdmt.mesh import make_mesh
    from jdmt.towers.partitioner import (
        adjusted_rand_index,
        labels_of,
        pair_recall,
        partition_from_trainer,
        random_partition,
        restore_trainer,
        round_robin_partition,
    )
    from jdmt.train import TrainConfig, Trainer

    os.makedirs(args.out_dir, exist_ok=True)
    mesh = make_mesh(args.mesh)
    towers = args.towers or hosts
    base = dict(mesh=args.mesh, steps=args.steps, global_batch=args.batch_size, seed=args.seed,
                progress=False, kernel=args.kernel)
    flat_ck = os.path.join(args.out_dir, "flat_checkpoint")
    partition_path = os.path.join(args.out_dir, "learned_partition.json")
    tm = dict(towers=towers, tower_module=args.tower_module, tower_dim=args.tower_dim)
    runs = [
        ("flat", dict(towers=0, checkpoint_dir=flat_ck)),
        ("sptt_identity", dict(towers=towers)),
        ("sptt_tm", dict(tm, tower_partitioner="round_robin")),
        ("sptt_tm_random", dict(tm, tower_partitioner="random")),
        ("sptt_tm_learned", dict(tm, tower_partitioner=partition_path)),
    ]
    rows = []
    for name, extra in runs:
        if name == "flat" and os.path.isdir(flat_ck):
            raise SystemExit(f"ablate: {flat_ck} exists; choose another --out-dir")
        t0 = time.perf_counter()
        trainer = Trainer(TrainConfig(**base, **extra), mesh)
        s = trainer.run()
        row = {"benchmark": "ablate", "run": name, "mesh": s["mesh"], "steps": s["steps"],
               "towers": s["towers"], "tower_module": s["tower_module"],
               **{k: s[k] for k, _ in FIGURES}, "bayes_auc": s["bayes_auc"],
               "wall_s": round(time.perf_counter() - t0, 1)}
        if name == "flat":
            groups = trainer.data.groups
            flat_trainer, state, _ = restore_trainer(flat_ck, mesh, data_seed=args.seed,
                                                     source=trainer.data)
            learned = partition_from_trainer(flat_trainer, state, towers, hosts)
            learned.save(partition_path)
            names = trainer.features.names
            truth = labels_of(groups, names)
            parts = {
                "learned": learned,
                "round_robin": round_robin_partition(trainer.features, towers, hosts),
                # the towers of the sptt_tm_random run (the trainer's seed)
                "random": random_partition(trainer.features, towers, hosts, seed=args.seed),
            }
            row["partition_ari_vs_planted_groups"] = {
                k: adjusted_rand_index(p.labels(names), truth) for k, p in parts.items()}
            row["partition_pair_recall"] = {
                k: pair_recall(p.labels(names), truth) for k, p in parts.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)

    with open(os.path.join(args.out_dir, "ablation.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["| run | eval AUC | eval logloss | cross-host MiB/step | step ms |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['eval_auc']:.4f} | {r['eval_logloss']:.4f} | "
                     f"{r['cross_host_bytes_per_step'] / 2**20:.2f} | {r['step_time_ms_median']:.1f} |")
    ari = rows[0]["partition_ari_vs_planted_groups"]
    rec = rows[0]["partition_pair_recall"]
    lines += ["", f"Bayes AUC {rows[0]['bayes_auc']:.4f}. Partition ARI vs the planted groups: "
              f"learned {ari['learned']:.3f}, round robin {ari['round_robin']:.3f}, random "
              f"{ari['random']:.3f}; planted pairs kept in one tower: learned "
              f"{rec['learned']:.3f}, round robin {rec['round_robin']:.3f}, random "
              f"{rec['random']:.3f}. "
              f"{args.steps} steps of {args.batch_size} on {args.mesh}, Tower Module "
              f"{args.tower_module} to {args.tower_dim} values, {towers} towers."]
    with open(os.path.join(args.out_dir, "ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(rows, os.path.join(args.out_dir, "ablation.png"))
    print("\n".join(lines))
    return 0


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FIGURES), figsize=(4 * len(FIGURES), 3.2))
    names = [r["run"] for r in rows]
    for ax, (key, label) in zip(axes, FIGURES):
        ax.bar(range(len(rows)), [r[key] for r in rows], color="#4c72b0")
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
