"""Automatic sharding plans (`--sharding=auto`).

    from jdmt.planner import auto_plan
    plan = auto_plan(features, hosts, local, global_batch, optimizer=opt)
    emb = ShardedEmbeddings(features, mesh, sharding=plan.placements, optimizer=opt)
    print(plan.summary()); json.dump(plan.report(), f)

`cost.py` says what a plan costs (the `CostModel` protocol and the analytic
model); `search.py` finds a cheap plan under a memory budget.
"""

from jdmt.planner.cost import (
    DEFAULT_MEMORY_BUDGET,
    PHASES,
    AnalyticCostModel,
    CostModel,
    PlanCost,
    Problem,
)
from jdmt.planner.search import (
    BASELINE_WEIGHTS,
    Plan,
    PlanningError,
    auto_plan,
    baseline_plans,
    candidates,
    column_counts,
    greedy_table_wise,
)

__all__ = [
    "BASELINE_WEIGHTS",
    "DEFAULT_MEMORY_BUDGET",
    "PHASES",
    "AnalyticCostModel",
    "CostModel",
    "Plan",
    "PlanCost",
    "PlanningError",
    "Problem",
    "auto_plan",
    "baseline_plans",
    "candidates",
    "column_counts",
    "greedy_table_wise",
]
