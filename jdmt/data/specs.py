"""Feature specs and the fixed-shape batch every jdmt step consumes.

One embedding table per sparse feature (the DLRM convention). A batch packs
all sparse features into one id matrix: feature f owns the columns
`[offset_f, offset_f + max_len_f)` of `ids`, and `lengths[:, f]` says how many
of them are real; positions at or past the length are padding and ignored
(writers put 0 there).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Sequence

import jax
import numpy as np


class Kind(str, enum.Enum):
    POOLED = "pooled"  # multi-hot bag, reduced to one vector (sum or mean)
    SEQUENCE = "sequence"  # ordered ids, one vector per position, not pooled


class Combiner(str, enum.Enum):
    SUM = "sum"
    MEAN = "mean"


@dataclasses.dataclass(frozen=True)
class SparseFeature:
    """A sparse feature and its embedding table.

    Attributes:
      name: unique feature (and table) name.
      rows: rows of the table; ids must lie in `[0, rows)` unless `hashed`.
      dim: embedding width.
      max_len: pooling cap P (pooled) or sequence length S (sequence).
      kind: pooled or sequence.
      combiner: sum or mean, for pooled features.
      hashed: ids are arbitrary integers, reduced modulo `rows`.
      weighted: a pooled feature with per-sample weights (TorchRec's
        weighted features, FBGEMM's `per_sample_weights`): each id comes
        with a float weight (`Batch.weights`) and the bag is the sum of
        weight x row (combiner sum only). The weights are data: no gradient
        flows to them; each row's gradient is its weight x the bag's.
    """

    name: str
    rows: int
    dim: int
    max_len: int = 1
    kind: Kind = Kind.POOLED
    combiner: Combiner = Combiner.SUM
    hashed: bool = False
    weighted: bool = False

    def __post_init__(self):
        object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "combiner", Combiner(self.combiner))
        object.__setattr__(self, "weighted", bool(self.weighted))
        if not self.name:
            raise ValueError("a sparse feature needs a name")
        if self.weighted and (self.kind is not Kind.POOLED or self.combiner is not Combiner.SUM):
            raise ValueError(f"feature {self.name!r}: per-sample weights apply to pooled features with "
                             f"combiner sum (got {self.kind.value}, {self.combiner.value})")
        if self.rows < 1 or self.dim < 1 or self.max_len < 1:
            raise ValueError(
                f"feature {self.name!r}: rows, dim and max_len must be >= 1 "
                f"(got rows={self.rows}, dim={self.dim}, max_len={self.max_len})"
            )

    @property
    def pooled(self) -> bool:
        return self.kind is Kind.POOLED


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """All features of a model: sparse (pooled and sequence) and dense."""

    sparse: tuple[SparseFeature, ...]
    num_dense: int = 13

    def __post_init__(self):
        object.__setattr__(self, "sparse", tuple(self.sparse))
        names = [f.name for f in self.sparse]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate feature names: {sorted(dup)}")
        if self.num_dense < 0:
            raise ValueError("num_dense must be >= 0")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.sparse)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First column of each feature in the packed `ids` matrix."""
        return tuple(int(x) for x in np.cumsum([0] + [f.max_len for f in self.sparse])[:-1])

    @property
    def total_slots(self) -> int:
        return int(sum(f.max_len for f in self.sparse))

    @property
    def weighted_idx(self) -> tuple[int, ...]:
        """The weighted features' indices, in order."""
        return tuple(i for i, f in enumerate(self.sparse) if f.weighted)

    @property
    def weight_slots(self) -> int:
        """Columns of `Batch.weights`: the weighted features' slots, in order."""
        return int(sum(self.sparse[i].max_len for i in self.weighted_idx))

    def weight_columns(self, name: str) -> slice:
        """A weighted feature's columns of `Batch.weights`."""
        i = self.index(name)
        if not self.sparse[i].weighted:
            raise ValueError(f"feature {name!r} is not weighted")
        off = sum(self.sparse[j].max_len for j in self.weighted_idx if j < i)
        return slice(off, off + self.sparse[i].max_len)

    def weight_map(self) -> np.ndarray:
        """i32[total_slots]: each id column's column of `Batch.weights`, or
        `weight_slots` (one past the end) for the columns of unweighted features."""
        out = np.full(self.total_slots, self.weight_slots, np.int32)
        for i in self.weighted_idx:
            f = self.sparse[i]
            out[self.columns(f.name)] = np.arange(self.weight_columns(f.name).start,
                                                  self.weight_columns(f.name).stop)
        return out

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown feature {name!r}; known: {list(self.names)}") from None

    def __getitem__(self, name: str) -> SparseFeature:
        return self.sparse[self.index(name)]

    def columns(self, name: str) -> slice:
        i = self.index(name)
        off = self.offsets[i]
        return slice(off, off + self.sparse[i].max_len)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
    """One (global or per-process) batch of fixed shapes.

    Attributes:
      dense: f32[B, num_dense] dense features.
      ids: i32[B, total_slots] packed sparse ids (see `FeatureSet.offsets`).
      lengths: i32[B, F] number of valid ids per feature, in `[0, max_len]`.
      labels: f32[B] click labels in {0, 1}.
      weights: f32[B, weight_slots] the weighted features' per-id weights
        (`FeatureSet.weight_columns`; positions at or past the length are
        ignored), or None when no feature is weighted.
    """

    dense: jax.Array | np.ndarray
    ids: jax.Array | np.ndarray
    lengths: jax.Array | np.ndarray
    labels: jax.Array | np.ndarray
    weights: jax.Array | np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def feature_ids(self, features: FeatureSet, name: str):
        """ids of one feature: i32[B, max_len]."""
        return self.ids[:, features.columns(name)]


class BadBatchError(ValueError):
    """A batch that violates its feature specs (out-of-range ids, NaNs, shapes)."""


def check_batch(features: FeatureSet, batch: Batch) -> None:
    """Validate a host (numpy) batch against the specs; raise a clear error.

    Checks shapes, lengths in `[0, max_len]`, finite dense features, labels
    and weights, and ids of non-hashed features in `[0, rows)` (within each
    length).
    """
    ids = np.asarray(batch.ids)
    lengths = np.asarray(batch.lengths)
    dense = np.asarray(batch.dense)
    labels = np.asarray(batch.labels)
    b = labels.shape[0]
    want = {
        "ids": (b, features.total_slots),
        "lengths": (b, len(features.sparse)),
        "dense": (b, features.num_dense),
    }
    for name, arr in (("ids", ids), ("lengths", lengths), ("dense", dense)):
        if arr.shape != want[name]:
            raise BadBatchError(f"batch.{name} has shape {arr.shape}, expected {want[name]}")
    if not np.all(np.isfinite(dense)):
        bad = np.argwhere(~np.isfinite(dense))[0]
        raise BadBatchError(
            f"dense feature {int(bad[1])} of example {int(bad[0])} is {dense[tuple(bad)]} "
            "(NaN or infinite dense features are not allowed)"
        )
    if not np.all(np.isfinite(labels)):
        raise BadBatchError("labels contain NaN or infinite values")
    if features.weighted_idx or batch.weights is not None:
        if batch.weights is None:
            raise BadBatchError(f"features {[features.sparse[i].name for i in features.weighted_idx]} are "
                                "weighted: the batch needs weights")
        weights = np.asarray(batch.weights)
        if weights.shape != (b, features.weight_slots):
            raise BadBatchError(f"batch.weights has shape {weights.shape}, expected {(b, features.weight_slots)}"
                                + ("" if features.weighted_idx else " (no feature is weighted: pass None)"))
        for i in features.weighted_idx:
            f = features.sparse[i]
            w = weights[:, features.weight_columns(f.name)]
            valid = np.arange(f.max_len)[None, :] < lengths[:, i][:, None]
            bad = valid & ~np.isfinite(w)
            if bad.any():
                ex, pos = (int(v) for v in np.argwhere(bad)[0])
                raise BadBatchError(f"feature {f.name!r}: weight {w[ex, pos]} at example {ex} position {pos} "
                                    "(NaN or infinite weights are not allowed)")
    for i, f in enumerate(features.sparse):
        ln = lengths[:, i]
        if ln.min(initial=0) < 0 or ln.max(initial=0) > f.max_len:
            ex = int(np.argmax((ln < 0) | (ln > f.max_len)))
            raise BadBatchError(
                f"feature {f.name!r}: length {int(ln[ex])} of example {ex} is outside "
                f"[0, {f.max_len}]"
            )
        if f.hashed:
            continue
        cols = ids[:, features.columns(f.name)]
        valid = np.arange(f.max_len)[None, :] < ln[:, None]
        bad = valid & ((cols < 0) | (cols >= f.rows))
        if bad.any():
            ex, pos = (int(v) for v in np.argwhere(bad)[0])
            raise BadBatchError(
                f"feature {f.name!r}: id {int(cols[ex, pos])} at example {ex} position "
                f"{pos} is outside [0, {f.rows}) (declare the feature hashed to reduce "
                "ids modulo its rows)"
            )


def make_features(
    num_tables: int,
    rows: int | Sequence[int],
    dim: int,
    max_len: int | Sequence[int],
    *,
    kind: Kind | str = Kind.POOLED,
    combiner: Combiner | str = Combiner.SUM,
    num_dense: int = 13,
    prefix: str = "cat",
) -> FeatureSet:
    """A uniform (or per-table) feature set: `cat_0 .. cat_{n-1}`."""
    rows = [rows] * num_tables if np.isscalar(rows) else list(rows)
    lens = [max_len] * num_tables if np.isscalar(max_len) else list(max_len)
    if len(rows) != num_tables or len(lens) != num_tables:
        raise ValueError("rows and max_len must be scalars or have one entry per table")
    return FeatureSet(
        tuple(
            SparseFeature(f"{prefix}_{i}", int(r), dim, int(p), kind=kind, combiner=combiner)
            for i, (r, p) in enumerate(zip(rows, lens))
        ),
        num_dense=num_dense,
    )
