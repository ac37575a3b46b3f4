"""Sharded embedding tables with fused sparse optimizers."""

from jdmt.embeddings.collection import (
    Embeddings,
    OutOfRangeIdError,
    Routed,
    ShardedEmbeddings,
    TableState,
    build_groups,
    dense_from_buffers,
)
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
    "OptimizerKind",
    "OutOfRangeIdError",
    "Placement",
    "Routed",
    "ShardedEmbeddings",
    "ShardingType",
    "SparseOptimizer",
    "TableState",
    "build_groups",
    "dense_from_buffers",
    "check_plan",
    "host_devices",
    "plan_sharding",
]
