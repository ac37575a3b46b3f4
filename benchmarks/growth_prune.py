#!/usr/bin/env python
"""Growth and pruning vs dense training: FLOPs, time and eval AUC, same steps, 3 seeds.

    pip install -e '.[bench]'                 # matplotlib, for the plot
    python benchmarks/growth_prune.py                         # both networks, 3 seeds
    python benchmarks/growth_prune.py --networks dlrm --dlrm-steps 300 --out-dir /tmp/gp

For each network and seed it trains the dense model and the same model with
`--growth-prune` (`--schedule`, default: the 'default' preset) for the same
steps on the same synthetic data (the seed sets data, teacher and
initialisation), one after the other (dense, then growth-prune, seed by seed):

    dlrm         the default DLRM (bottom 64-32, top 128-64, D=16) on the default
                 synthetic set, `--dlrm-steps` of `--dlrm-batch`
    dcn_mlperf   MLPerf's DLRM-DCNv2 dense network (bottom 512-256-128, 3 cross
                 layers of rank 512, top 1024-1024-512-256-1, D=128) on the
                 mlperf preset, rows capped at `--dcn-rows`; Adam at `--dcn-lr`
                 with the gradients clipped to norm 1

and writes `growth_prune.md` (a table per network: eval AUC and logloss, mean
over the seeds with the half-width of a 95% t interval, training FLOPs, time),
`growth_prune.png` (train loss and step FLOPs per step, mean over the seeds)
and `growth_prune.json` to `--out-dir`. The FLOPs are the compiled steps'
(`cost_analysis()`, summed over the devices). Times are the runs' own
training time (steps over examples/s: compiles and evaluations excluded),
measured side by side. The last line is one JSON object with a key `summary`:
`flops_saving` and `auc_delta_mean` (growth-prune minus dense, mean over seeds)
of the network that saves least / loses most, and each network's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jdmt.mesh import prepare_devices  # noqa: E402

NETWORKS = ("dlrm", "dcn_mlperf")


def network_config(name: str, args) -> dict:
    if name == "dlrm":
        return dict(model="dlrm", steps=args.dlrm_steps, global_batch=args.dlrm_batch,
                    eval_batches=args.eval_batches)
    # Adam at the default 0.003 diverges now and then on this network (losses of 10-20 in
    # the first steps and spikes later, with or without pruning): 0.001 and clipping.
    return dict(model="dcn", data="mlperf", rows_per_table=args.dcn_rows, embedding_dim=128,
                bottom_mlp=(512, 256), top_mlp=(1024, 1024, 512, 256), cross_layers=3, low_rank=512,
                steps=args.dcn_steps, global_batch=args.dcn_batch, lr=args.dcn_lr, clip_norm=1.0,
                eval_batches=args.dcn_eval_batches)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh", default="2x4")
    p.add_argument("--networks", default=",".join(NETWORKS), help=f"comma-separated, of {NETWORKS}")
    p.add_argument("--schedule", default="default", help="the --growth-prune schedule or preset")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--dlrm-steps", type=int, default=1000)
    p.add_argument("--dlrm-batch", type=int, default=4096)
    p.add_argument("--dcn-steps", type=int, default=200)
    p.add_argument("--dcn-batch", type=int, default=512)
    p.add_argument("--dcn-rows", type=int, default=20_000, help="row cap of the mlperf tables")
    p.add_argument("--dcn-lr", type=float, default=0.001, help="dcn_mlperf: Adam's rate (clip norm 1)")
    p.add_argument("--eval-batches", type=int, default=8, help="dlrm: held-out batches")
    p.add_argument("--dcn-eval-batches", type=int, default=32, help="dcn_mlperf: held-out batches")
    p.add_argument("--out-dir", default="growth_prune")
    args = p.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    nets = [n.strip() for n in args.networks.split(",") if n.strip()]
    bad = [n for n in nets if n not in NETWORKS]
    if bad or not nets or not seeds:
        p.error(f"--networks of {NETWORKS} and at least one seed; got {args.networks!r}, {args.seeds!r}")
    with open(os.devnull, "w") as quiet:
        prepare_devices(args.mesh, stream=quiet)

    from ablate import interval  # the same 95% t interval as the DMT ablation

    from jdmt.mesh import make_mesh
    from jdmt.train import TrainConfig, train_and_evaluate

    os.makedirs(args.out_dir, exist_ok=True)
    mesh = make_mesh(args.mesh)
    runs = []
    for net in nets:
        for seed in seeds:
            for mode in ("dense", "growth_prune"):
                cfg = TrainConfig(mesh=args.mesh, seed=seed, progress=False,
                                  growth_prune=args.schedule if mode == "growth_prune" else None,
                                  **network_config(net, args))
                t0 = time.perf_counter()
                s = train_and_evaluate(cfg, mesh)
                g = s["growth_prune"]
                run = {
                    "benchmark": "growth_prune", "network": net, "mode": mode, "seed": seed,
                    "steps": s["steps"], "global_batch": s["global_batch"], "mesh": s["mesh"],
                    "eval_auc": s["eval_auc"], "eval_logloss": s["eval_logloss"], "bayes_auc": s["bayes_auc"],
                    "train_flops": s["dense_train_flops"], "train_flops_unpruned": s["dense_train_flops_unpruned"],
                    "train_s": s["steps"] * s["global_batch"] / s["examples_per_sec"],
                    "compile_s": s["compile_s"], "wall_s": round(time.perf_counter() - t0, 1),
                    "step_time_ms_median": s["step_time_ms_median"],
                    "train_loss": s["train_loss"],
                    "flops_per_step": _flops_per_step(s),
                    "phases": None if g is None else g["phases"],
                    "time_saved_in_run_s": None if g is None else g["time_saved_s"],
                }
                runs.append(run)
                print(json.dumps({k: v for k, v in run.items()
                                  if k not in ("train_loss", "flops_per_step", "phases")}), flush=True)

    by_net = {}
    for net in nets:
        d = [r for r in runs if r["network"] == net and r["mode"] == "dense"]
        g = [r for r in runs if r["network"] == net and r["mode"] == "growth_prune"]
        deltas = [b["eval_auc"] - a["eval_auc"] for a, b in zip(d, g)]
        out = {"flops_saving": 1.0 - sum(r["train_flops"] for r in g) / sum(r["train_flops"] for r in d),
               "auc_delta_mean": sum(deltas) / len(deltas), "auc_deltas": deltas,
               "time_saving": 1.0 - sum(r["train_s"] for r in g) / sum(r["train_s"] for r in d),
               "train_s_dense": sum(r["train_s"] for r in d), "train_s_growth_prune": sum(r["train_s"] for r in g)}
        for mode, rs in (("dense", d), ("growth_prune", g)):
            for key in ("eval_auc", "eval_logloss"):
                out[f"{mode}_{key}"], out[f"{mode}_{key}_ci95"] = interval([r[key] for r in rs])
        out["bayes_auc"] = sum(r["bayes_auc"] for r in d) / len(d)
        by_net[net] = out
    summary = {
        "schedule": args.schedule, "seeds": seeds,
        "flops_saving": min(v["flops_saving"] for v in by_net.values()),
        "auc_delta_mean": min(v["auc_delta_mean"] for v in by_net.values()),
        "time_saving": min(v["time_saving"] for v in by_net.values()),
        "by_network": by_net,
    }
    with open(os.path.join(args.out_dir, "growth_prune.json"), "w") as f:
        json.dump({"runs": runs, "summary": summary}, f, indent=1)
    lines = []
    for net, v in by_net.items():
        r0 = next(r for r in runs if r["network"] == net)
        lines += [f"### {net}: {r0['steps']} steps of {r0['global_batch']} on {args.mesh}, schedule {args.schedule}",
                  "", "| run | eval AUC | eval logloss | training GFLOP | training s |", "|---|---|---|---|---|"]
        for mode in ("dense", "growth_prune"):
            rs = [r for r in runs if r["network"] == net and r["mode"] == mode]
            lines.append(
                f"| {mode} | {v[f'{mode}_eval_auc']:.4f} ± {v[f'{mode}_eval_auc_ci95']:.4f} | "
                f"{v[f'{mode}_eval_logloss']:.4f} ± {v[f'{mode}_eval_logloss_ci95']:.4f} | "
                f"{sum(r['train_flops'] for r in rs) / len(rs) / 1e9:,.0f} | "
                f"{sum(r['train_s'] for r in rs) / len(rs):.1f} |")
        lines += ["", f"FLOPs saved {100 * v['flops_saving']:.1f}%, time saved {100 * v['time_saving']:.1f}%, "
                  f"AUC delta {v['auc_delta_mean']:+.4f} (per seed: "
                  f"{', '.join(f'{x:+.4f}' for x in v['auc_deltas'])}); Bayes AUC {v['bayes_auc']:.4f}.", ""]
    with open(os.path.join(args.out_dir, "growth_prune.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(runs, nets, os.path.join(args.out_dir, "growth_prune.png"))
    print("\n".join(lines))
    print(json.dumps({"summary": summary}))
    return 0


def _flops_per_step(s: dict) -> list[float] | None:
    """Each step's compiled FLOPs (summed over devices) from the summary."""
    g = s["growth_prune"]
    if g is None:
        full = s["dense_train_flops_unpruned"]
        return None if full is None else [full / s["steps"]] * s["steps"]
    out = []
    for ph in g["phases"]:
        out += [ph["step_flops"]] * ph["steps"]
    return out


def _plot(runs, nets, path) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(nets), figsize=(5.5 * len(nets), 6), squeeze=False)
    for j, net in enumerate(nets):
        for mode, color in (("dense", "#4c72b0"), ("growth_prune", "#dd8452")):
            rs = [r for r in runs if r["network"] == net and r["mode"] == mode]
            loss = np.mean([r["train_loss"] for r in rs], axis=0)
            k = max(1, len(loss) // 50)  # a running mean over about 2% of the run
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            axes[0, j].plot(np.arange(len(smooth)) + k, smooth, color=color, label=mode)
            flops = rs[0]["flops_per_step"]
            if flops and all(f is not None for f in flops):
                axes[1, j].plot(np.arange(1, len(flops) + 1), np.asarray(flops) / 1e9, color=color, label=mode)
        axes[0, j].set_title(f"{net}: train loss (mean over seeds)", fontsize=10)
        axes[1, j].set_title(f"{net}: step GFLOP (all devices)", fontsize=10)
        axes[1, j].set_xlabel("step")
        for ax in axes[:, j]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
