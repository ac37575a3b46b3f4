"""`TrainState`: everything a training step updates (and donates)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jdmt.embeddings import TableState


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step updates (donated to the step)."""

    params: Any  # dense model parameters (replicated)
    opt_state: Any  # optax state of `params` (replicated)
    tables: dict[str, TableState]  # embedding tables and their accumulators (sharded)
