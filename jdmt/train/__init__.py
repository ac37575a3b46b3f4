"""Training: configuration, the trainer (jitted step, evaluation, checkpoints),
the interaction measures of a trained model, and the one-call entry point.

Modules: `config` (TrainConfig), `batches` (data sources, checks, prefetch),
`trainer` (Trainer, TrainState), `run` (train_and_evaluate), `checkpoint`,
`interactions` (a trained model's feature interactions, learned towers),
`metrics_log`, `supervisor`.
"""

from jdmt.train.batches import DataSource, checked_batch
from jdmt.train.checkpoint import CheckpointError, Checkpointer
from jdmt.train.config import DATA_SOURCES, DENSE_OPTIMIZERS, TOWER_SHARDINGS, TrainConfig
from jdmt.train.run import train_and_evaluate
from jdmt.train.trainer import Trainer, TrainState

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "DATA_SOURCES",
    "DENSE_OPTIMIZERS",
    "DataSource",
    "TOWER_SHARDINGS",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "checked_batch",
    "train_and_evaluate",
]
