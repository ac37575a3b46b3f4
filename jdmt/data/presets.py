"""Named feature sets: the MLPerf DLRM-DCNv2 tables and a laptop-sized default."""

from __future__ import annotations

from jdmt.data.specs import FeatureSet, Kind, make_features

__all__ = [
    "MLPERF_DCNV2_ROWS",
    "MLPERF_DCNV2_MULTI_HOT",
    "SYNTHETIC_DEFAULT_ROWS",
    "SYNTHETIC_DEFAULT_MAX_LEN",
    "SYNTHETIC_SEQUENCE_ROWS",
    "mlperf_dcnv2_features",
    "synthetic_default_features",
]

MLPERF_DCNV2_ROWS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000,
    3067956, 405282, 10, 2209, 11938, 155, 4, 976, 14, 40000000,
    40000000, 40000000, 590152, 12973, 108, 36,
)  # fmt: skip
"""Rows of the 26 tables of MLPerf DLRM-DCNv2 (Criteo 1TB multi-hot)."""

MLPERF_DCNV2_MULTI_HOT = (
    3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1,
)  # fmt: skip
"""Multi-hot size (ids per example) of each MLPerf DLRM-DCNv2 table."""

SYNTHETIC_DEFAULT_ROWS = (
    100000, 5000, 20000, 2000, 50000, 1000, 8000, 3000, 1000, 100000,
    60000, 40000, 1000, 4000, 12000, 1500, 1000, 2500, 1200, 100000,
    80000, 100000, 30000, 10000, 1000, 1000,
)  # fmt: skip
"""Rows of the default synthetic tables: MLPerf's shape, squeezed into [1e3, 1e5]."""

SYNTHETIC_DEFAULT_MAX_LEN = (
    3, 2, 4, 2, 6, 1, 3, 4, 2, 7, 3, 8, 1, 6, 9, 5, 2, 3, 1, 10, 10, 10, 10, 3, 4, 2,
)  # fmt: skip
"""Pooling caps of the default synthetic tables (mean 4.6, at most 10)."""

SYNTHETIC_SEQUENCE_ROWS = 50000
"""Rows of each sequence table that `synthetic_default_features` adds."""


def mlperf_dcnv2_features(max_rows: int | None = 1_000_000, dim: int = 128) -> FeatureSet:
    """The 26 MLPerf DLRM-DCNv2 tables: `cat_0 .. cat_25`, sum pooling, 13 dense.

    Args:
      max_rows: cap on each table's rows (the five 40M-row tables do not fit
        small machines); None keeps the full sizes (about 204M rows in all).
      dim: embedding width (MLPerf uses 128).

    Each feature's `max_len` is its multi-hot size (1 to 100; 214 slots per
    example in all).
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    rows = [r if max_rows is None else min(r, max_rows) for r in MLPERF_DCNV2_ROWS]
    return make_features(len(rows), rows, dim, list(MLPERF_DCNV2_MULTI_HOT), combiner="sum")


def synthetic_default_features(
    dim: int = 16, combiner: str = "mean", *, num_sequence: int = 0, sequence_len: int = 20
) -> FeatureSet:
    """The default feature set for training on one small machine.

    26 pooled features (mean-pooled by default: the synthetic teacher averages
    its ids' latent vectors, and mean pooling learns it measurably faster)
    `cat_0 .. cat_25` with 1,000 to 100,000 rows each (735,200 rows in all:
    11.8M parameters at dim 16), pooling caps of 1 to 10 (121 slots per
    example), and 13 dense features. A batch is dense f32[B, 13], ids
    i32[B, 121], lengths i32[B, 26], labels f32[B].

    Args:
      dim: embedding width of every table.
      combiner: combiner of the pooled features.
      num_sequence: sequence features `seq_0 .. seq_{n-1}` appended after
        the pooled ones (`SYNTHETIC_SEQUENCE_ROWS` rows each, like item
        histories); each adds `sequence_len` id columns and one length column.
      sequence_len: S, the positions of every sequence feature. `SyntheticData`
        gives each example 1 to S of them (`mean_len_frac * S` on average).

    With `num_sequence=0` the set is exactly the 26 pooled features.
    """
    if num_sequence < 0:
        raise ValueError(f"num_sequence must be >= 0, got {num_sequence}")
    pooled = make_features(
        len(SYNTHETIC_DEFAULT_ROWS),
        list(SYNTHETIC_DEFAULT_ROWS),
        dim,
        list(SYNTHETIC_DEFAULT_MAX_LEN),
        combiner=combiner,
    )
    if not num_sequence:
        return pooled
    if sequence_len < 1:
        raise ValueError(f"sequence_len must be >= 1, got {sequence_len}")
    seq = make_features(
        num_sequence, SYNTHETIC_SEQUENCE_ROWS, dim, sequence_len, kind=Kind.SEQUENCE, prefix="seq"
    )
    return FeatureSet(pooled.sparse + seq.sparse, num_dense=pooled.num_dense)
