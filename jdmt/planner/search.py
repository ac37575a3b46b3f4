"""The planner: a sharding type and owners per table, under a memory budget.

`auto_plan` minimises a `CostModel`'s step cost (the bottleneck device's
lookup plus communication time) over plans that fit the per-device memory
budget:

1. Baselines, as in AutoShard and TorchRec: every table table-wise, placed
   greedily (tables sorted by a weight, largest first, each on the device
   with the least weight so far that has memory left) for the weights size
   (R D), dim (D), lookup (D p) and size-lookup (D p log10 R); and every
   table row-wise, and every table data-parallel.
2. Greedy: tables in decreasing order of their cost alone; each takes the
   candidate (data-parallel, row-wise, table-wise on any device,
   table-row-wise on any host, column-wise into any shard count that
   divides its width, on the least busy devices)
   that gives the lowest (bottleneck, balance) with the tables placed so
   far and fits the budget. If some table finds no room, the greedy is
   rerun choosing the candidate that needs the least memory.
3. Local search from the greedy plan and from the best baseline: move one
   table to another candidate, or swap the owners of a table-wise table on
   the bottleneck device and one elsewhere, while (bottleneck, balance)
   improves. The better result is the plan, so it never costs more than any
   baseline under the same cost model.
4. Memory trim (`memory_slack`): moves that lower the bytes allocated over
   all devices (an SPMD buffer has one shape, so every device holds the
   largest device's share of each width) while the estimated step stays
   within the slack of step 3's and no worse than the best baseline's.

Everything is deterministic: candidates and tables are visited in fixed
orders and ties keep the first.

`Plan.table()` shows a plan table by table; `PlanFile` reads and writes the
JSON plan files of `train.py --plan=PATH` and `python -m jdmt.planner`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

from jdmt.data.specs import FeatureSet, SparseFeature
from jdmt.embeddings.types import (
    Placement,
    ShardingType,
    SparseOptimizer,
    host_devices,
    table_row_wise_host,
)
from jdmt.mesh import Topology
from jdmt.planner.cost import (
    DEFAULT_MEMORY_BUDGET,
    AnalyticCostModel,
    CostModel,
    PlanCost,
    Problem,
)

_TOL = 1e-9  # relative improvement the local search requires


class PlanningError(ValueError):
    """No plan fits the memory budget; `table` names the table that did not fit."""

    def __init__(self, message: str, table: str | None = None):
        super().__init__(message)
        self.table = table


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """A planned sharding and what it is estimated to cost.

    Attributes:
      placements: `{feature name: Placement}` in feature order; pass it as
        `ShardedEmbeddings(features, mesh, sharding=plan.placements, ...)`.
      cost: the cost model's estimate of the plan.
      problem: what was planned for.
      cost_model: the model that rated the plans.
      baselines: `{name: PlanCost}` of every feasible baseline, or a string
        saying why one is infeasible.
      stats: how the search went (evaluations, moves, which start won).
    """

    placements: dict[str, Placement]
    cost: PlanCost
    problem: Problem
    cost_model: CostModel
    baselines: dict[str, PlanCost | str]
    stats: dict[str, Any]

    def type_counts(self) -> dict[str, int]:
        counts = {t.value: 0 for t in ShardingType}
        for p in self.placements.values():
            counts[p.type.value] += 1
        return counts

    def best_baseline(self) -> tuple[str, PlanCost] | None:
        feasible = [(k, v) for k, v in self.baselines.items() if isinstance(v, PlanCost)]
        return min(feasible, key=lambda kv: kv[1].step_s) if feasible else None

    def report(self) -> dict[str, Any]:
        """A JSON-able account: the problem, each table's choice, per-device
        memory, lookup and communication estimates, and the baselines."""
        feats = self.problem.features
        best = self.best_baseline()
        tables = {}
        for name, p in self.placements.items():
            f = feats[name]
            tables[name] = {
                **p.to_json(),
                "rows": f.rows, "dim": f.dim, "max_len": f.max_len, "kind": f.kind.value,
                "bytes": f.rows * self.problem.state_bytes_per_row(f.dim),
            }
        return {
            "problem": self.problem.to_json(),
            "cost_model": self.cost_model.to_json(),
            "step_s": self.cost.step_s,
            "types": self.type_counts(),
            "tables": tables,
            "cost": self.cost.to_json(self.problem.topology),
            "baselines": {
                k: ({"step_s": v.step_s, "peak_memory_bytes": v.peak_memory}
                    if isinstance(v, PlanCost) else {"infeasible": v})
                for k, v in self.baselines.items()
            },
            "best_baseline": None if best is None else best[0],
            "speedup_vs_best_baseline": (
                None if best is None or self.cost.step_s == 0 else best[1].step_s / self.cost.step_s
            ),
            "search": dict(self.stats),
        }

    def summary(self) -> str:
        """One line for logs."""
        types = ", ".join(f"{v} {k}" for k, v in self.type_counts().items() if v)
        s = (
            f"auto plan {self.problem.hosts}x{self.problem.local}: est. embedding step "
            f"{_fmt_s(self.cost.step_s)}; {types}; peak memory "
            f"{self.cost.peak_memory / 2**30:.3g} of {self.problem.memory_budget / 2**30:.3g} GiB"
        )
        best = self.best_baseline()
        if best is not None and self.cost.step_s > 0:
            s += (f"; best baseline {best[0]} {_fmt_s(best[1].step_s)} "
                  f"({best[1].step_s / self.cost.step_s:.2f}x)")
        return s

    def table(self) -> str:
        """The plan as a plain-text table, one row per table, and a footer.

        Columns: the table's name; its sharding type; its devices ('3',
        '0-7', '0,2,5-6', or 'host 1' for table-row-wise); rows; dim;
        `alone`, the cost model's step cost of the table alone on its
        placement (the slowest of its devices' lookups and exchanges, were
        it the only table); and `share`, its `alone` over the sum of every
        table's `alone`. The shares rank what the tables ask of the devices;
        they do not split the plan's step, which is the slowest device's
        time: tables on different devices overlap, and in the plan the
        tables of one width share their exchanges, whose fixed latency each
        table's `alone` counts in full (a small table's `alone` is mostly
        that latency). The footer gives the plan's
        estimated step and peak memory, the best feasible baseline's
        name and step, and what the memory trim did.
        """
        alone = {name: self.cost_model.evaluate(self.problem, {name: p}).step_s
                 for name, p in self.placements.items()}
        total = sum(alone.values())
        rows = [("table", "type", "devices", "rows", "dim", "alone", "share")]
        for name, p in self.placements.items():
            f = self.problem.features[name]
            rows.append((
                name, p.type.value, _devices_text(p, self.problem.local), f"{f.rows:,}", str(f.dim),
                _fmt_s(alone[name]), f"{100 * alone[name] / total:.1f}%" if total > 0 else "-",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows
        ]
        footer = (f"est. embedding step {_fmt_s(self.cost.step_s)}, peak memory "
                  f"{self.cost.peak_memory / 2**30:.3g} of {self.problem.memory_budget / 2**30:.3g} "
                  "GiB per device; ")
        best = self.best_baseline()
        if best is None:
            footer += "no baseline fits the memory budget"
        else:
            footer += f"best baseline {best[0]} {_fmt_s(best[1].step_s)}"
            if self.cost.step_s > 0:
                footer += f" ({best[1].step_s / self.cost.step_s:.2f}x the plan's)"
        trim = self.stats.get("memory_trim")
        if trim and trim["allocated_over_owned"][1] < trim["allocated_over_owned"][0]:
            (a0, a1), (s0, s1) = trim["allocated_over_owned"], trim["step_s"]
            footer += (f"\nmemory trim: allocated {a0:.2f}x -> {a1:.2f}x the owned bytes for "
                       f"{100 * (s1 / s0 - 1):+.1f}% est. step (memory_slack {trim['slack']:g})")
        return "\n".join([*lines, footer])


def _fmt_s(t: float) -> str:
    if t >= 1e-3:
        return f"{t * 1e3:.3f} ms"
    return f"{t * 1e6:.1f} us" if t >= 1e-6 else f"{t * 1e9:.0f} ns"


def _devices_text(p: Placement, local: int) -> str:
    """A placement's devices in short: '3', '0-7', '0,2,5-6', or 'host 1'
    for a table-row-wise table (all the devices of host 1)."""
    if p.type is ShardingType.TABLE_ROW_WISE:
        return f"host {table_row_wise_host(p, local)[0]}"
    runs: list[list[int]] = []
    for d in sorted(set(p.devices)):
        if runs and d == runs[-1][1] + 1:
            runs[-1][1] = d
        else:
            runs.append([d, d])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# ---- candidates and baselines -----------------------------------------------------------------


def column_counts(dim: int, num_devices: int, min_width: int = 4) -> list[int]:
    """Column shard counts a table may use: 2..N, dividing `dim` into shards
    of at least `min_width` columns."""
    return [c for c in range(2, num_devices + 1) if dim % c == 0 and dim // c >= min_width]


def candidates(problem: Problem, f: SparseFeature, current: PlanCost) -> list[Placement]:
    """Every placement the search considers for `f`, in a fixed order.

    Column-wise shards go to the least busy devices of `current` (the cost of
    the other tables), so one candidate per shard count is enough.
    """
    n = problem.num_devices
    everyone = tuple(range(n))
    out = [Placement(ShardingType.DATA_PARALLEL, everyone), Placement(ShardingType.ROW_WISE, everyone)]
    out += [Placement(ShardingType.TABLE_WISE, (d,)) for d in range(n)]
    if problem.local > 1:  # with one device per host it is table-wise
        out += [Placement(ShardingType.TABLE_ROW_WISE, host_devices(h, problem.local))
                for h in range(problem.hosts)]
    busy = current.device_s
    order = sorted(range(n), key=lambda d: (busy[d], current.used_bytes[d], d))
    out += [Placement(ShardingType.COLUMN_WISE, tuple(sorted(order[:c])))
            for c in column_counts(f.dim, n)]
    return out


BASELINE_WEIGHTS: dict[str, Callable[[Problem, SparseFeature], float]] = {
    "size_greedy": lambda pr, f: float(f.rows * f.dim),
    "dim_greedy": lambda pr, f: float(f.dim),
    "lookup_greedy": lambda pr, f: f.dim * pr.mean_ids(f),
    "size_lookup_greedy": lambda pr, f: f.dim * pr.mean_ids(f) * math.log10(max(f.rows, 1)),
}


def greedy_table_wise(
    problem: Problem, weight: Callable[[Problem, SparseFeature], float]
) -> dict[str, Placement]:
    """AutoShard's greedy baseline: tables by decreasing weight, each table-wise
    on the device with the least total weight that still has memory for it.

    Raises:
      PlanningError: a table fits on no device.
    """
    n = problem.num_devices
    load, mem = [0.0] * n, [0.0] * n
    plan = {}
    order = sorted(problem.features.sparse, key=lambda f: (-weight(problem, f), f.name))
    for f in order:
        size = f.rows * problem.state_bytes_per_row(f.dim)
        room = [d for d in range(n) if mem[d] + size <= problem.memory_budget]
        if not room:
            raise PlanningError(f"table {f.name!r} fits on no device table-wise", f.name)
        d = min(room, key=lambda d: (load[d], mem[d], d))
        load[d] += weight(problem, f)
        mem[d] += size
        plan[f.name] = Placement(ShardingType.TABLE_WISE, (d,))
    return plan


def baseline_plans(problem: Problem) -> dict[str, dict[str, Placement] | str]:
    """The baselines' plans by name, or why a baseline has none."""
    out: dict[str, dict[str, Placement] | str] = {}
    for name, weight in BASELINE_WEIGHTS.items():
        try:
            out[name] = greedy_table_wise(problem, weight)
        except PlanningError as e:
            out[name] = str(e)
    everyone = tuple(range(problem.num_devices))
    for t in (ShardingType.ROW_WISE, ShardingType.DATA_PARALLEL):
        out[t.value] = {f.name: Placement(t, everyone) for f in problem.features.sparse}
    return out


# ---- search -----------------------------------------------------------------------------------


class _Search:
    """The greedy and local search over one problem and cost model."""

    def __init__(self, problem: Problem, model: CostModel, max_rounds: int):
        self.problem = problem
        self.model = model
        self.max_rounds = max_rounds
        self.budget = problem.memory_budget
        self.evaluations = 0
        self.moves = 0

    def cost(self, plan: Mapping[str, Placement]) -> PlanCost:
        self.evaluations += 1
        return self.model.evaluate(self.problem, plan)

    def check_each_table_fits(self) -> None:
        """A table whose smallest sharding alone exceeds the budget can never fit."""
        empty = self.cost({})
        for f in self.problem.features.sparse:
            need = min(self.cost({f.name: p}).peak_memory for p in candidates(self.problem, f, empty))
            if need > self.budget:
                raise PlanningError(
                    f"table {f.name!r} ({f.rows} rows x {f.dim}) does not fit: its smallest "
                    f"sharding needs {need:,.0f} bytes per device, over the memory budget of "
                    f"{self.budget:,.0f} bytes",
                    f.name,
                )

    def greedy(self, memory_first: bool = False) -> dict[str, Placement]:
        feats = self.problem.features.sparse
        if memory_first:
            size = lambda f: f.rows * self.problem.state_bytes_per_row(f.dim)  # noqa: E731
            order = sorted(feats, key=lambda f: (-size(f), f.name))
        else:
            alone = {f.name: self.cost({f.name: Placement(ShardingType.TABLE_WISE, (0,))}).step_s
                     for f in feats}
            order = sorted(feats, key=lambda f: (-alone[f.name], f.name))
        plan: dict[str, Placement] = {}
        for f in order:
            current = self.cost(plan)
            best = None
            for cand in candidates(self.problem, f, current):
                c = self.cost({**plan, f.name: cand})
                if not c.fits(self.budget):
                    continue
                key = (c.peak_memory, *c.key()) if memory_first else (*c.key(), c.peak_memory)
                if best is None or key < best[0]:
                    best = (key, cand)
            if best is None:
                raise PlanningError(
                    f"table {f.name!r} ({f.rows} rows x {f.dim}) finds no device with room: the "
                    f"{len(plan)} tables placed before it use {current.peak_memory:,.0f} of "
                    f"{self.budget:,.0f} bytes per device",
                    f.name,
                )
            plan[f.name] = best[1]
        return plan

    def _move_each(self, plan: dict[str, Placement], cost: PlanCost,
                   accept: Callable[[PlanCost, PlanCost], bool]) -> tuple[dict, PlanCost, bool]:
        """One pass of single-table moves: each table tries every candidate
        and keeps the first that `accept(new, current)` and fits the budget."""
        improved = False
        for f in self.problem.features.sparse:
            rest = {k: v for k, v in plan.items() if k != f.name}
            for cand in candidates(self.problem, f, self.cost(rest)):
                if cand == plan[f.name]:
                    continue
                trial = {**rest, f.name: cand}
                c = self.cost(trial)
                if c.fits(self.budget) and accept(c, cost):
                    plan, cost, improved = trial, c, True
                    self.moves += 1
        return plan, cost, improved

    def improve(self, plan: dict[str, Placement]) -> tuple[dict[str, Placement], PlanCost]:
        """Moves and swaps while (bottleneck, balance) improves."""
        plan = dict(plan)
        cost = self.cost(plan)
        names = [f.name for f in self.problem.features.sparse]
        for _ in range(self.max_rounds):
            plan, cost, improved = self._move_each(plan, cost, _better)
            # swap a table-wise table of the bottleneck device with one elsewhere
            worst = int(cost.device_s.argmax()) if names else 0
            tw = [k for k in names if plan[k].type is ShardingType.TABLE_WISE]
            for a in [k for k in tw if plan[k].devices[0] == worst]:
                for b in tw:
                    if plan[a].devices == plan[b].devices:
                        continue
                    trial = {**plan, a: plan[b], b: plan[a]}
                    c = self.cost(trial)
                    if c.fits(self.budget) and _better(c, cost):
                        plan, cost, improved = trial, c, True
                        self.moves += 1
            if not improved:
                break
        return {k: plan[k] for k in names}, cost

    def trim_memory(self, plan: dict[str, Placement], cost: PlanCost,
                    limit: float) -> tuple[dict[str, Placement], PlanCost]:
        """Moves that lower the memory allocated over all devices (one SPMD
        shape per width: every device holds the largest device's rows), or
        spread the owned bytes more evenly at the same allocation, while the
        estimated step stays within `limit` seconds."""
        plan = dict(plan)
        for _ in range(self.max_rounds):
            plan, cost, improved = self._move_each(
                plan, cost, lambda c, cur: c.step_s <= limit and _less_memory(c, cur))
            if not improved:
                break
        return {f.name: plan[f.name] for f in self.problem.features.sparse}, cost


def _less_memory(a: PlanCost, b: PlanCost) -> bool:
    """a allocates less over all devices, or as much with the owned bytes
    spread more evenly (which lets the next move lower the largest share)."""
    if a.allocated < b.allocated * (1 - _TOL):
        return True
    spread = lambda c: float(np.sum(c.used_bytes.astype(np.float64) ** 2))  # noqa: E731
    return a.allocated <= b.allocated * (1 + _TOL) and spread(a) < spread(b) * (1 - _TOL)


def _better(a: PlanCost, b: PlanCost) -> bool:
    """a improves on b: a lower bottleneck, or the same one and better balance."""
    if a.step_s < b.step_s * (1 - _TOL):
        return True
    return a.step_s <= b.step_s * (1 + _TOL) and a.balance < b.balance * (1 - _TOL)


def auto_plan(
    features: FeatureSet,
    hosts: int,
    local: int,
    global_batch: int,
    *,
    optimizer: SparseOptimizer | str = SparseOptimizer(),
    topology: Topology | None = None,
    memory_budget: float | None = None,
    cost_model: CostModel | None = None,
    pooling: Mapping[str, float] | None = None,
    max_rounds: int = 20,
    memory_slack: float = 0.02,
) -> Plan:
    """Plan the sharding of every table of `features` on an H x L mesh.

    Args:
      features: the model's features.
      hosts, local: mesh shape (H, L); device d is on host d // L.
      global_batch: examples per step over all devices.
      optimizer: the sparse optimizer (or its kind), whose state takes memory.
      topology: bandwidths (default: TorchRec's, `Topology(hosts, local)`).
      memory_budget: bytes of tables and optimizer state per device
        (default 16 GiB; leave room for activations).
      cost_model: rates plans (default `AnalyticCostModel()`).
      pooling: mean ids per bag by feature name, if known (default max_len).
      max_rounds: rounds of local search at most.
      memory_slack: after the search, tables move where that lowers the
        memory allocated over all devices while the estimated step stays
        within this fraction of the best plan's (and no worse than the best
        baseline's); 0 turns it off. The allocation is what every device
        holds of the largest device's share (one SPMD shape); on the MLPerf
        tables at 8x8 this took the plan from 1.66x to 1.09x its owned bytes
        for 1.9% more estimated step time. `plan.stats["memory_trim"]` says
        what it did.

    Returns:
      A `Plan`; `plan.placements` goes to `ShardedEmbeddings(sharding=...)`.

    Raises:
      PlanningError: some table cannot be placed within the budget (the
        error's `table` names it).
    """
    problem = Problem(
        features, hosts, local, global_batch,
        optimizer=optimizer if isinstance(optimizer, SparseOptimizer) else SparseOptimizer(kind=optimizer),
        topology=topology,
        memory_budget=DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget,
        pooling=pooling,
    )
    model = cost_model if cost_model is not None else AnalyticCostModel()
    search = _Search(problem, model, max_rounds)
    search.check_each_table_fits()

    baselines: dict[str, PlanCost | str] = {}
    base_plans = {}
    for name, p in baseline_plans(problem).items():
        if isinstance(p, str):
            baselines[name] = p
            continue
        c = search.cost(p)
        if c.fits(problem.memory_budget):
            baselines[name], base_plans[name] = c, p
        else:
            baselines[name] = (f"needs {c.peak_memory:,.0f} bytes per device, over the budget "
                               f"of {problem.memory_budget:,.0f}")

    starts: list[tuple[str, dict[str, Placement]]] = []
    error = None
    for label, memory_first in (("greedy", False), ("greedy_memory_first", True)):
        try:
            starts.append((label, search.greedy(memory_first)))
            break
        except PlanningError as e:
            error = error or e
    if base_plans:
        best = min(base_plans, key=lambda k: baselines[k].key())
        starts.append((f"baseline:{best}", base_plans[best]))
    if not starts:
        raise error  # every greedy and baseline failed: name the table the greedy could not place

    results = []
    for label, start in starts:
        plan, cost = search.improve(start)
        results.append((cost.key(), len(results), label, plan, cost))
    _, _, label, plan, cost = min(results)
    trim = None
    if memory_slack > 0 and plan:
        limit = cost.step_s * (1 + memory_slack)
        if base_plans:  # never worse than the best baseline
            limit = min(limit, max(cost.step_s, min(baselines[k].step_s for k in base_plans)))
        before = cost
        plan, cost = search.trim_memory(plan, cost, limit)
        trim = {"slack": memory_slack,
                "allocated_over_owned": [round(before.allocated / max(before.owned, 1.0), 4),
                                         round(cost.allocated / max(cost.owned, 1.0), 4)],
                "step_s": [before.step_s, cost.step_s]}
    stats = {
        "start": label,
        "starts": [r[2] for r in results],
        "evaluations": search.evaluations,
        "moves": search.moves,
        "memory_trim": trim,
    }
    return Plan(plan, cost, problem, model, baselines, stats)


def pooling_from_fraction(features: FeatureSet, frac: float) -> dict[str, float]:
    """`auto_plan`'s `pooling` when bags hold `frac` of their cap on average
    (at least one id), as `SyntheticData(mean_len_frac=frac)` makes them."""
    return {f.name: max(1.0, f.max_len * frac) for f in features.sparse}




__all__ = [
    "BASELINE_WEIGHTS",
    "Plan",
    "PlanningError",
    "auto_plan",
    "baseline_plans",
    "candidates",
    "column_counts",
    "greedy_table_wise",
    "pooling_from_fraction",
]
