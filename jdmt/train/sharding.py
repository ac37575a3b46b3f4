"""How a run's tables are placed: `--sharding=auto` (the analytic or the
learned planner), plan files (`--plan`), and flexshard row tiers.

Functions of a `Trainer` under construction (its features, mesh, data and
config); they return placements and leave the tables to `ShardedEmbeddings`.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from jdmt.data import Batch, FeatureSet, SyntheticData
from jdmt.embeddings.types import Placement, ShardingType, SparseOptimizer
from jdmt.mesh import Topology

__all__ = ["auto_plan", "load_plan", "plan_file_exists", "tier_plan", "write_plan"]


def auto_plan(trainer, optimizer: SparseOptimizer):
    """`--sharding=auto`: the planner's placement for this mesh and batch:
    the analytic search, or with `cost_model` the learned planner.

    The mean bag sizes come from the synthetic data's length model when
    it has one (else the caps); the ids' Zipf exponent (learned planner)
    from the synthetic data (else 1.05)."""
    from jdmt.planner import AnalyticCostModel, auto_plan, pooling_from_fraction

    frac = getattr(trainer.data, "mean_len_frac", None)
    pooling = None if frac is None else pooling_from_fraction(trainer.features, frac)
    if trainer.config.cost_model is not None:  # the learned planner
        from jdmt.planner.learned import learned_auto_plan, learned_note
        from jdmt.planner.neural import NeuralCostModel
        from jdmt.planner.cost import DEFAULT_MEMORY_BUDGET

        plan = learned_auto_plan(
            trainer.features, trainer.hosts, trainer.local, trainer.config.global_batch,
            NeuralCostModel.load(trainer.config.cost_model), optimizer=optimizer,
            topology=Topology.from_mesh(trainer.mesh), memory_budget=DEFAULT_MEMORY_BUDGET,
            pooling=pooling, alpha=float(getattr(trainer.data, "alpha", 1.05)),
            analytic=AnalyticCostModel(row_dedup=trainer.config.row_dedup))
        if jax.process_index() == 0:
            print(f"jdmt: {learned_note(plan, trainer.config.cost_model)}", file=sys.stderr)
        return plan
    return auto_plan(
        trainer.features, trainer.hosts, trainer.local, trainer.config.global_batch,
        optimizer=optimizer, topology=Topology.from_mesh(trainer.mesh), pooling=pooling,
        cost_model=AnalyticCostModel(row_dedup=trainer.config.row_dedup),
    )


def plan_file_exists(path: str) -> bool:
    """Whether the `plan` file exists, as process 0 sees it: every process
    then loads it, or none does (process 0 writes it only after all
    have asked)."""
    exists = os.path.exists(path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    return exists


def load_plan(trainer, optimizer: SparseOptimizer) -> dict[str, Placement]:
    """The `plan` file's placements, checked against this model, mesh and
    the memory budget it was planned for (`PlanFile.check`); what it was
    made for otherwise (the batch, table sizes) is noted on stderr."""
    from jdmt.planner import PlanFile

    plan_file = PlanFile.read(trainer.config.plan)
    plan_file.check(trainer.features, trainer.hosts, trainer.local, optimizer)
    if jax.process_index() == 0:
        for what in plan_file.differences(trainer.features, trainer.config.global_batch):
            print(f"jdmt: note: {plan_file.source} was made for {what}; its placements "
                  "hold, its cost estimates assume that", file=sys.stderr)
    return dict(plan_file.placements)


def write_plan(trainer, path: str) -> None:
    """Write the plan this run uses (and the planner's report, with
    `sharding='auto'`) to the `plan` file."""
    from jdmt.planner import PlanFile

    report = None if trainer.plan is None else trainer.plan.report()
    PlanFile(dict(trainer.emb.plan), trainer.hosts, trainer.local, trainer.config.global_batch, report).write(path)
    print(f"jdmt: wrote the plan to {path}", file=sys.stderr)


def tier_plan(trainer, plan, optimizer: SparseOptimizer):
    """Flexshard tables' hot and warm rows (`--row-tiers=auto`): row
    statistics of the first batches' ids (each process counts its rows;
    the summaries are merged in process order, so every process gets the
    same plan), sized by `jdmt.planner.flexshard.plan_tiers`."""
    from jdmt.planner.flexshard import plan_tiers
    from jdmt.planner.row_stats import merge_over_processes, row_statistics

    cfg = trainer.config
    if cfg.row_tiers == "none":
        return plan
    flex = [n for n, p in plan.items() if p.type is ShardingType.FLEXSHARD]
    sub = FeatureSet(tuple(trainer.features[n] for n in flex), num_dense=trainer.features.num_dense)
    cols = np.concatenate([np.arange(trainer.features.total_slots)[trainer.features.columns(n)] for n in flex])
    fidx = np.array([trainer.features.index(n) for n in flex])
    pid, nproc = jax.process_index(), jax.process_count()
    if isinstance(trainer.data, SyntheticData):  # random access: the training batches themselves
        get = lambda i: trainer.data.batch(i, cfg.global_batch, process_index=pid, num_processes=nproc)  # noqa: E731
        count = cfg.row_tier_batches
    else:  # streamed data: the held-out batches, not the training stream
        get = lambda i: trainer.data.eval_batch(i, cfg.eval_size, process_index=pid, num_processes=nproc)  # noqa: E731
        count = min(cfg.row_tier_batches, cfg.eval_batches)
    batches = [get(i) for i in range(count)]
    sub_batches = (Batch(b.dense, np.asarray(b.ids)[:, cols], np.asarray(b.lengths)[:, fidx], b.labels)
                   for b in batches)
    stats = row_statistics(sub, sub_batches)
    if nproc > 1:
        stats = merge_over_processes(stats)
    lookups = {n: stats[n].total / count for n in flex}
    plan, report = plan_tiers(trainer.features, plan, stats, Topology.from_mesh(trainer.mesh),
                              global_batch_lookups=lookups, optimizer=optimizer,
                              budget=cfg.memory_budget, row_dedup=cfg.row_dedup)
    trainer.tier_report = report
    if pid == 0:
        for r in report:
            print(f"jdmt: flexshard {r.table}: {r.hot} hot rows ({100 * r.coverage_hot:.1f}% of lookups), "
                  f"{r.warm} warm ({100 * r.coverage_warm:.1f}%), {r.rows - r.hot - r.warm} cold; "
                  f"{r.memory_bytes / 2**20:.1f} MiB per device (row-wise {r.row_wise_memory_bytes / 2**20:.1f}); "
                  f"modeled cross-host bytes per device and step {r.cross_host_bytes:,.0f} "
                  f"(row-wise {r.row_wise_cross_host_bytes:,.0f})", file=sys.stderr)
    return plan
