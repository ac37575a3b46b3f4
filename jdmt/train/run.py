"""`train_and_evaluate`: one call from a `TrainConfig` to a run's summary."""

from __future__ import annotations

import sys
from typing import Any

import jax
from jax.sharding import Mesh

from jdmt.mesh import make_mesh
from jdmt.towers.partition import TowerPartition
from jdmt.train.batches import DataSource
from jdmt.train.config import TrainConfig
from jdmt.train.interactions import learned_towers
from jdmt.train.trainer import Trainer

__all__ = ["train_and_evaluate"]


def train_and_evaluate(
    config: TrainConfig, mesh: Mesh | None = None, data: DataSource | None = None
) -> dict[str, Any]:
    """Train `config.steps` steps, evaluate, and return the summary dict.

    Summary keys: steps, global_batch, mesh [H, L], sharding, train_loss (every
    step's loss), eval_auc, eval_logloss, bayes_auc, bayes_logloss (the
    synthetic teacher's, same eval set), examples_per_sec and
    step_time_ms_median (steps after the first, compiling one), first_step_s,
    wall_time_s (first_step_s includes compile_s, the ahead-of-time compile of
    the step), eval_history, out_of_range_ids, cross_host_bytes_per_step and
    intra_host_bytes_per_step (bytes the compiled step's collectives deliver,
    summed over devices, split by mesh level; `jdmt.comm`), metrics_dir,
    profile_dir, and the config's knobs.

    Raises:
      BadBatchError: a host batch violates the feature specs (e.g. NaN dense).
      OutOfRangeIdError: ids outside their tables reached the device path.
      MeshError / ValueError: bad mesh or configuration.

    With `tower_partitioner='learned'` the towers come from the flat run in
    `partition_checkpoint`, measured on this run's data at this run's batch
    sizes (`jdmt.train.interactions.learned_towers`) before the `Trainer`
    is built.
    """
    mesh = mesh if mesh is not None else make_mesh(config.mesh)
    partition: TowerPartition | None = None
    if config.tower_partitioner == "learned":
        partition = learned_towers(config, mesh, data)
        if jax.process_index() == 0:
            print(f"jdmt: learned towers from {config.partition_checkpoint}: "
                  f"{[list(t) for t in partition.towers]}", file=sys.stderr)
    return Trainer(config, mesh, data, partition=partition).run()
