"""Automatic sharding plans (`--sharding=auto`).

    from jdmt.planner import auto_plan
    plan = auto_plan(features, hosts, local, global_batch, optimizer=opt)
    emb = ShardedEmbeddings(features, mesh, sharding=plan.placements, optimizer=opt)
    print(plan.summary()); print(plan.table())
    PlanFile.from_plan(plan).write("plan.json")  # what `train.py --plan=plan.json` loads

`cost.py` says what a plan costs (the `CostModel` protocol and the analytic
model); `search.py` finds a cheap plan under a memory budget; `planfile.py`
reads and writes plan files. `python -m jdmt.planner` plans without training.
"""

from jdmt.planner.cost import (
    DEFAULT_MEMORY_BUDGET,
    PHASES,
    AnalyticCostModel,
    CostModel,
    PlanCost,
    Problem,
)
from jdmt.planner.planfile import PLAN_FORMAT, PlanFile, PlanFileError
from jdmt.planner.search import (
    BASELINE_WEIGHTS,
    Plan,
    PlanningError,
    auto_plan,
    baseline_plans,
    candidates,
    column_counts,
    greedy_table_wise,
    pooling_from_fraction,
)

__all__ = [
    "BASELINE_WEIGHTS",
    "DEFAULT_MEMORY_BUDGET",
    "PHASES",
    "PLAN_FORMAT",
    "AnalyticCostModel",
    "CostModel",
    "Plan",
    "PlanCost",
    "PlanFile",
    "PlanFileError",
    "PlanningError",
    "Problem",
    "auto_plan",
    "baseline_plans",
    "candidates",
    "column_counts",
    "greedy_table_wise",
    "pooling_from_fraction",
]
