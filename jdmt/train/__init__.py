"""Training: the jitted step, evaluation, checkpoints and the end-to-end loop."""

from jdmt.train.checkpoint import CheckpointError, Checkpointer

from jdmt.train.loop import (
    DATA_SOURCES,
    DENSE_OPTIMIZERS,
    TrainConfig,
    Trainer,
    TrainState,
    checked_batch,
    train_and_evaluate,
)

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "DATA_SOURCES",
    "DENSE_OPTIMIZERS",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "checked_batch",
    "train_and_evaluate",
]
