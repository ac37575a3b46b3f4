"""Sharded embedding tables with fused sparse optimizers."""

from jdmt.embeddings.collection import (
    Embeddings,
    OutOfRangeIdError,
    ShardedEmbeddings,
    TableState,
)
from jdmt.embeddings.layout import Layout, Memory, Piece
from jdmt.embeddings.types import (
    OptimizerKind,
    Placement,
    ShardingType,
    SparseOptimizer,
    check_plan,
    host_devices,
    plan_sharding,
)

__all__ = [
    "Embeddings",
    "Layout",
    "Memory",
    "OptimizerKind",
    "OutOfRangeIdError",
    "Piece",
    "Placement",
    "ShardedEmbeddings",
    "ShardingType",
    "SparseOptimizer",
    "TableState",
    "check_plan",
    "host_devices",
    "plan_sharding",
]
