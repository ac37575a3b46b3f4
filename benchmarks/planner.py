"""Planners judged by measured cost: the learned planner against greedy baselines and the analytic planner.

    python benchmarks/planner.py --samples 4000 --out /tmp/planner     # collect, fit, judge
    python benchmarks/planner.py --data costs.npz [--model model.npz] --out /tmp/planner

1. The cost model: a dataset of measured fused steps (`jdmt.planner.collect`,
   on this backend), fitted (`jdmt.planner.neural`) with a held-out fifth;
   its MAPE and Spearman beside the analytic model's (bandwidth fitted on
   the same training sets).
2. Tasks: random table sets from the train half of a DLRM-like pool
   (`jdmt.planner.tablesets`): 50 tables on 1x8, 100 on 2x8, 200 on 8x8, 856
   on 8x8; `--tasks` each; and the same sizes from the unseen test half
   (transfer). Global batch `--global-batch`; memory budget per device
   `--budget-x` times the tables' bytes over the devices (at least 1.1x the
   largest table).
3. Plans: random, size/dim/lookup/size-lookup greedy (table-wise, AutoShard's
   baselines: `search.greedy_table_wise`), the analytic planner
   (`search.auto_plan`, on tasks of at most `--analytic-max-tables` tables:
   it takes minutes beyond), and the learned planner (`learned.learned_plan`,
   whose local search also starts from the greedy baselines' and the
   analytic planner's plans).
4. Measured cost of a plan: each device's pieces (`measure.device_pieces`)
   run as one fused step on this backend (`measure.Bench`), plus the
   analytic communication time of its payload under the default
   `Topology`; the bottleneck over devices, each device's time the median
   of `--rounds` timings interleaved over the task's plans. On meshes of more than 16
   devices the devices measured are a sample: the 4 slowest by each of the
   neural model, the calibrated analytic model, and the ids they serve.
   A plan is feasible when each device's owned table and optimizer bytes fit
   the budget (what the greedy baselines check, and what an allocation by
   owner needs); the SPMD allocation of jdmt's `Layout` (per width, the
   largest device's rows on every device) is reported beside it
   (`spmd_fits`): the learned planner plans under that stricter rule.

Prints one line per task, a table, writes planner.json and planner.png to
--out, and prints the JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jdmt.embeddings.types import OptimizerKind, Placement, ShardingType, SparseOptimizer  # noqa: E402
from jdmt.planner import collect, neural  # noqa: E402
from jdmt.planner.cost import AnalyticCostModel, Problem  # noqa: E402
from jdmt.planner.learned import learned_plan  # noqa: E402
from jdmt.planner.measure import Bench, device_pieces  # noqa: E402
from jdmt.planner.search import BASELINE_WEIGHTS, PlanningError, auto_plan, greedy_table_wise  # noqa: E402
from jdmt.planner.tablesets import dlrm_pool, features_of, pooling_of, sample_tables, split_pool  # noqa: E402

SIZES = ((50, 1, 8), (100, 2, 8), (200, 8, 8), (856, 8, 8))


def random_plan(problem: Problem, rng) -> dict[str, Placement]:
    n = problem.num_devices
    mem = np.zeros(n)
    plan = {}
    for f in problem.features.sparse:
        size = f.rows * problem.state_bytes_per_row(f.dim)
        room = np.flatnonzero(mem + size <= problem.memory_budget)
        if not room.size:
            raise PlanningError(f"{f.name} fits nowhere")
        d = int(rng.choice(room))
        mem[d] += size
        plan[f.name] = Placement(ShardingType.TABLE_WISE, (d,))
    return plan


class Judge:
    """Measured cost of the plans of one task: each plan's sampled devices are
    timed in `rounds` rounds, interleaved over the plans (so a slow phase of
    the machine falls on all of them alike), and each device's median is
    taken."""

    def __init__(self, tables, hosts, local, batch, problem, model, scale, bench, optimizer, rounds):
        self.tables, self.hosts, self.local, self.batch = tables, hosts, local, batch
        self.problem, self.model, self.scale, self.bench, self.opt = problem, model, scale, bench, optimizer
        self.rounds = rounds
        self.analytic = AnalyticCostModel()

    def prepare(self, placements) -> dict:
        cost = self.analytic.evaluate(self.problem, placements)
        owned = float(cost.used_bytes.max())
        out = {"owned_peak_bytes": owned, "spmd_peak_bytes": cost.peak_memory,
               "spmd_fits": cost.fits(self.problem.memory_budget), "analytic_step_s": cost.step_s}
        if owned > self.problem.memory_budget:
            return {"feasible": False, **out}
        pieces = device_pieces(self.tables, placements, self.hosts, self.local, self.batch)
        n = len(pieces)
        if n <= 16:
            devs = list(range(n))
        else:
            pred = self.model.predict_sets(pieces) + cost.comm_s
            ana = neural.analytic_seconds(pieces, self.opt) * self.scale + cost.comm_s
            ids = np.array([sum(p.ids for p in s) for s in pieces])
            devs = sorted({int(d) for v in (pred, ana, ids) for d in np.argsort(-v)[:4]})
        return {"feasible": True, **out, "_jobs": [(d, pieces[d], float(cost.comm_s[d])) for d in devs]}

    def measure(self, prepared: dict[str, dict]) -> None:
        """Fills `measured_s` (the bottleneck) of every feasible prepared plan."""
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(self.rounds):
            for name, r in prepared.items():
                for d, pieces, _ in r.get("_jobs", ()):
                    times.setdefault((name, d), []).append(self.bench.run(pieces))
        for name, r in prepared.items():
            if not r.get("feasible"):
                continue
            dev = {d: float(np.median(times[(name, d)])) + comm for d, _, comm in r.pop("_jobs")}
            worst = max(dev, key=dev.get)
            r.update(measured_s=dev[worst], bottleneck_device=worst, devices_measured=len(dev))


def run_task(tables, hosts, local, args, model, scale, bench, opt, rng, with_analytic: bool) -> dict:
    n = hosts * local
    state = {t.name: t.rows * (4 * t.dim + 4) for t in tables}
    budget = max(args.budget_x * sum(state.values()) / n, 1.1 * max(state.values()))
    problem = Problem(features_of(tables), hosts, local, args.global_batch, optimizer=opt,
                      memory_budget=budget, pooling=pooling_of(tables))
    judge = Judge(tables, hosts, local, args.global_batch, problem, model, scale, bench, opt, args.rounds)
    plans, times = {}, {}
    try:
        plans["random"] = random_plan(problem, rng)
    except PlanningError as e:
        plans["random"] = str(e)
    for name, w in BASELINE_WEIGHTS.items():
        t0 = time.perf_counter()
        try:
            plans[name] = greedy_table_wise(problem, w)
        except PlanningError as e:
            plans[name] = str(e)
        times[name] = time.perf_counter() - t0
    if with_analytic:
        t0 = time.perf_counter()
        try:
            plans["analytic"] = auto_plan(problem.features, hosts, local, args.global_batch, optimizer=opt,
                                          memory_budget=budget, pooling=problem.pooling).placements
        except PlanningError as e:
            plans["analytic"] = str(e)
        times["analytic"] = time.perf_counter() - t0
    starts = {k: v for k, v in plans.items() if k != "random" and not isinstance(v, str)}
    t0 = time.perf_counter()
    try:
        plans["learned"], info = learned_plan(tables, hosts, local, args.global_batch, model,
                                              memory_budget=budget, optimizer=opt, starts=starts)
    except PlanningError as e:
        plans["learned"], info = str(e), {}
    times["learned"] = time.perf_counter() - t0
    results = {name: ({"feasible": False, "error": pl} if isinstance(pl, str) else judge.prepare(pl))
               for name, pl in plans.items()}
    judge.measure(results)
    for name in results:
        results[name]["plan_s"] = times.get(name)
    types = {} if isinstance(plans["learned"], str) else {
        t.value: sum(p.type is t for p in plans["learned"].values()) for t in ShardingType}
    return {"tables": len(tables), "mesh": f"{hosts}x{local}", "budget_bytes": budget, "results": results,
            "learned_info": {k: v for k, v in info.items() if k != "predicted_device_s"},
            "learned_types": {k: v for k, v in types.items() if v}}


def saved(res: dict, base: str, ours: str = "learned") -> float | None:
    r = res["results"]
    if not r[ours].get("feasible") or not r.get(base, {}).get("feasible"):
        return None
    return 1.0 - r[ours]["measured_s"] / r[base]["measured_s"]


def best_greedy(res: dict) -> str | None:
    ok = [k for k in BASELINE_WEIGHTS if res["results"][k].get("feasible")]
    return min(ok, key=lambda k: res["results"][k]["measured_s"]) if ok else None


def mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="a dataset from python -m jdmt.planner.collect (else one is collected)")
    ap.add_argument("--model", help="a cost model fitted to --data (python -m jdmt.planner.neural); else fitted here")
    ap.add_argument("--samples", type=int, default=4000, help="sets to collect when --data is not given")
    ap.add_argument("--out", default="/tmp/jdmt-planner")
    ap.add_argument("--tasks", type=int, default=10, help="tasks per size (train pool)")
    ap.add_argument("--transfer-tasks", type=int, default=5, help="tasks per size (test pool)")
    ap.add_argument("--sizes", default="all", help="'all' or indices into 50/8,100/16,200/64,856/64, e.g. 0,1")
    ap.add_argument("--global-batch", type=int, default=2048)
    ap.add_argument("--budget-x", type=float, default=3.0)
    ap.add_argument("--pool-rows", type=int, default=1_000_000)
    ap.add_argument("--analytic-max-tables", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="timings of each device, interleaved (median)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    opt = SparseOptimizer(kind=OptimizerKind.ROWWISE_ADAGRAD)

    if args.data:
        sets, seconds, meta = collect.load(args.data)
    else:
        sets, seconds, meta = collect.collect(args.samples, global_batch=args.global_batch, seed=args.seed)
        collect.save(out / "costs.npz", sets, seconds, meta)
    if args.model:  # fitted by python -m jdmt.planner.neural on this dataset
        model = neural.NeuralCostModel.load(args.model)
        heldout = model.meta["heldout"]
    else:
        model, heldout = neural.fit_and_evaluate(sets, seconds, backend=meta["backend"], optimizer=opt)
        model.save(out / "cost_model.npz")
    print(json.dumps({"cost_model": heldout, "dataset": meta}), flush=True)
    scale = heldout["analytic_scale"]

    bench = Bench(opt, iters=3)
    rng = np.random.default_rng(args.seed + 17)
    train_pool, test_pool = split_pool(dlrm_pool(max_rows=args.pool_rows, seed=args.seed), seed=args.seed)
    sizes = SIZES if args.sizes == "all" else [SIZES[int(i)] for i in args.sizes.split(",")]
    tasks = []
    for pool_name, pool, count in (("train", train_pool, args.tasks), ("test", test_pool, args.transfer_tasks)):
        for ntab, h, ln in sizes:
            for k in range(count):
                tables = sample_tables(pool, ntab, rng)
                res = run_task(tables, h, ln, args, model, scale, bench, opt, rng,
                               with_analytic=ntab <= args.analytic_max_tables)
                res["pool"] = pool_name
                bg = best_greedy(res)
                res["best_greedy"] = bg
                res["vs_best_greedy"] = None if bg is None else saved(res, bg)
                res["vs_analytic"] = saved(res, "analytic") if "analytic" in res["results"] else None
                tasks.append(res)
                r = res["results"]
                line = {k2: (round(v["measured_s"] * 1e3, 2) if v.get("feasible") else "infeasible")
                        for k2, v in r.items()}
                print(json.dumps({"pool": pool_name, "task": f"{ntab}x{h * ln}", "k": k, "ms": line,
                                  "best_greedy": bg, "vs_best_greedy": res["vs_best_greedy"],
                                  "vs_analytic": res["vs_analytic"],
                                  "learned_plan_s": r["learned"]["plan_s"],
                                  "learned_types": res["learned_types"]}), flush=True)

    def by(pool, key, size=None):
        return mean([t[key] for t in tasks if t["pool"] == pool and (size is None or t["tables"] == size)])

    table = []
    print(f"{'pool':6} {'task':>8} {'learned vs best greedy':>24} {'vs analytic':>12} {'plan s':>8}")
    for pool in ("train", "test"):
        for ntab, h, ln in sizes:
            sel = [t for t in tasks if t["pool"] == pool and t["tables"] == ntab]
            if not sel:
                continue
            row = {"pool": pool, "task": f"{ntab}x{h * ln}", "tasks": len(sel),
                   "vs_best_greedy": by(pool, "vs_best_greedy", ntab), "vs_analytic": by(pool, "vs_analytic", ntab),
                   "learned_plan_s": max(t["results"]["learned"]["plan_s"] for t in sel)}
            table.append(row)
            f = lambda x: "-" if x is None else f"{x:+.1%}"  # noqa: E731
            print(f"{pool:6} {row['task']:>8} {f(row['vs_best_greedy']):>24} {f(row['vs_analytic']):>12} "
                  f"{row['learned_plan_s']:8.2f}")
    big = [t["results"]["learned"]["plan_s"] for t in tasks if t["tables"] == 856]
    summary = {
        "vs_best_greedy": by("train", "vs_best_greedy"),
        "vs_analytic": by("train", "vs_analytic"),
        "transfer_vs_best_greedy": by("test", "vs_best_greedy"),
        "plan_time_856x64_s": max(big) if big else None,
        "cost_model_mape": heldout["cost_model_mape"],
        "analytic_mape": heldout["analytic_mape"],
        "cost_model_spearman": heldout["cost_model_spearman"],
        "analytic_spearman": heldout["analytic_spearman"],
        "backend": meta["backend"], "global_batch": args.global_batch,
    }
    (out / "planner.json").write_text(json.dumps({"summary": summary, "table": table, "tasks": tasks,
                                                  "cost_model": heldout, "dataset": meta}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['pool']}\n{r['task']}" for r in table]
        x = np.arange(len(table))
        ax.bar(x - 0.2, [100 * (r["vs_best_greedy"] or 0) for r in table], 0.4, label="vs best greedy")
        ax.bar(x + 0.2, [100 * (r["vs_analytic"] or 0) for r in table], 0.4, label="vs analytic planner")
        ax.axhline(20, ls="--", c="gray", lw=0.8)
        ax.set_xticks(x, labels)
        ax.set_ylabel("measured bottleneck saved (%)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "planner.png", dpi=120)
    except ImportError as e:
        print(f"no plot: {e}", file=sys.stderr)
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
