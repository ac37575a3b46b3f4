"""Table pools for training and judging planners.

`dlrm_pool` draws a pool shaped like Meta's open DLRM dataset (856 tables).
The real files are not reachable from here, so the statistics are ours,
chosen from what its paper (AutoShard, arXiv 2208.06399, section 5) says of
it: heavy-tailed rows up to tens of millions, pooling factors from 0 to
about 100 (many one-hot tables), dims 16 to 128, varied index reuse:

- rows: log10 rows uniform on [3, log10 max_rows] for 80% of the tables, and
  within the top decade for the rest (the heavy tail);
- dim: 16, 32, 64, 128 with probabilities .2, .3, .3, .2;
- pooling: 1 for 30% of the tables, 0 (never looked up in the data) for 3%,
  else lognormal with median 8, capped at 100;
- Zipf exponent of the ids: uniform on [0.6, 1.3] (reuse from spread to hot).

`mlperf_pool` is the 26 MLPerf DLRM-DCNv2 tables (multi-hot sizes as the
pooling, Criteo-like exponent 1.05). `split_pool` cuts a pool into disjoint
train and test pools; `sample_tables` draws a task's tables from a pool.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jdmt.data.specs import FeatureSet, SparseFeature


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One table of a pool: what a planner needs to know of it.

    Attributes:
      name: unique in its pool.
      rows, dim: the table's shape.
      pooling: mean ids per example (0: the feature is empty in the data).
      alpha: Zipf exponent of its ids.
    """

    name: str
    rows: int
    dim: int
    pooling: float
    alpha: float = 1.05

    @property
    def max_len(self) -> int:
        """Ids per bag in the programs: lengths 1..2p-1 have mean p."""
        return max(1, int(round(2 * self.pooling)) - 1)

    @property
    def bytes(self) -> int:
        return self.rows * self.dim * 4

    def feature(self) -> SparseFeature:
        return SparseFeature(self.name, self.rows, self.dim, self.max_len)


def features_of(tables: list[TableSpec]) -> FeatureSet:
    """The tables as a `FeatureSet` (pooled, sum) for the library's planner."""
    return FeatureSet(tuple(t.feature() for t in tables), num_dense=0)


def pooling_of(tables: list[TableSpec]) -> dict[str, float]:
    """Mean ids per bag by name, for `Problem(pooling=...)` (empty tables count 1e-3)."""
    return {t.name: min(max(t.pooling, 1e-3), t.max_len) for t in tables}


def dlrm_pool(n: int = 856, *, max_rows: int = 10_000_000, seed: int = 0) -> list[TableSpec]:
    """`n` tables with the statistics of the module docstring."""
    if n < 1 or max_rows < 1000:
        raise ValueError("n >= 1 and max_rows >= 1000 needed")
    rng = np.random.default_rng(seed)
    top = math.log10(max_rows)
    tail = rng.random(n) < 0.2
    logr = np.where(tail, rng.uniform(top - 1, top, n), rng.uniform(3, top, n))
    rows = np.maximum(1000, np.round(10**logr)).astype(np.int64)
    dims = rng.choice([16, 32, 64, 128], n, p=[0.2, 0.3, 0.3, 0.2])
    kind = rng.random(n)
    pool = np.minimum(100.0, np.round(np.exp(rng.normal(math.log(8), 1.0, n)), 1))
    pool = np.where(kind < 0.30, 1.0, np.where(kind < 0.33, 0.0, np.maximum(pool, 1.0)))
    alpha = np.round(rng.uniform(0.6, 1.3, n), 3)
    return [TableSpec(f"t{i}", int(rows[i]), int(dims[i]), float(pool[i]), float(alpha[i]))
            for i in range(n)]


def mlperf_pool(max_rows: int | None = 1_000_000) -> list[TableSpec]:
    """The 26 MLPerf DLRM-DCNv2 tables (rows capped at `max_rows`), dim 128."""
    from jdmt.data.presets import MLPERF_DCNV2_MULTI_HOT, MLPERF_DCNV2_ROWS

    return [TableSpec(f"cat_{i}", r if max_rows is None else min(r, max_rows), 128, float(p), 1.05)
            for i, (r, p) in enumerate(zip(MLPERF_DCNV2_ROWS, MLPERF_DCNV2_MULTI_HOT))]


def split_pool(pool: list[TableSpec], *, test_fraction: float = 0.5,
               seed: int = 0) -> tuple[list[TableSpec], list[TableSpec]]:
    """Disjoint (train, test) pools."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    cut = int(round(len(pool) * (1 - test_fraction)))
    return [pool[i] for i in sorted(order[:cut])], [pool[i] for i in sorted(order[cut:])]


def sample_tables(pool: list[TableSpec], n: int, rng: np.random.Generator) -> list[TableSpec]:
    """`n` tables of the pool (with replacement past its size), renamed t0..t{n-1}."""
    idx = rng.choice(len(pool), n, replace=n > len(pool))
    return [dataclasses.replace(pool[i], name=f"t{j}") for j, i in enumerate(idx)]


__all__ = ["TableSpec", "dlrm_pool", "features_of", "mlperf_pool", "pooling_of", "sample_tables",
           "split_pool"]
