"""Row access statistics: which rows of each table the lookups hit, and how often.

    python -m jdmt.planner.row_stats                              # default synthetic set, 16 x 4096 examples
    python -m jdmt.planner.row_stats --data mlperf --max-rows 40000000 --batches 32

Row-tiered placements (hot rows replicated, the rest sharded) need each
table's access frequencies. A table may have tens of millions of rows, so
nothing here holds an array of a table's size: each table's ids stream
through a *Misra-Gries summary* (`HeavyHitters`) of at most `capacity`
counters, merged batch by batch (numpy, on the host). Its guarantees, for a
stream of n lookups:

- every counted row's estimate is a lower bound on its true count, short
  of it by at most `error` (the summary's total decrement);
- `error <= n / (capacity + 1)`, so any row hit more often than that is
  always in the summary; with at most `capacity` distinct rows seen the
  counts are exact (`error == 0`).

`coverage(k)` is the fraction of lookups that the k most frequent rows
take, as an interval: the summed lower bounds of the summary's top k
(a lower bound), and that plus `k * error` (an upper bound).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable, Sequence

import numpy as np

from jdmt.data.specs import Batch, FeatureSet

__all__ = ["HeavyHitters", "coverage_report", "merge_over_processes", "row_statistics"]


class HeavyHitters:
    """A Misra-Gries summary of one table's row stream (mergeable, batched).

    Args:
      capacity: counters kept at most (memory: two int64 per counter).
    """

    def __init__(self, capacity: int = 1 << 16):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.keys = np.zeros(0, np.int64)  # sorted
        self.counts = np.zeros(0, np.int64)
        self.total = 0  # lookups seen
        self.error = 0  # total decrement: each estimate is within this of the truth

    def update(self, rows) -> "HeavyHitters":
        """Add a batch of row ids (any shape)."""
        k, c = np.unique(np.asarray(rows, np.int64).ravel(), return_counts=True)
        self.total += int(c.sum())
        return self._merge(k, c, 0)

    def merge(self, other: "HeavyHitters") -> "HeavyHitters":
        """Add another summary of the same table (e.g. another process's)."""
        self.total += other.total
        return self._merge(other.keys, other.counts, other.error)

    def _merge(self, keys, counts, error) -> "HeavyHitters":
        allk = np.concatenate([self.keys, keys])
        allc = np.concatenate([self.counts, counts])
        uk, inv = np.unique(allk, return_inverse=True)
        uc = np.bincount(inv, weights=allc, minlength=uk.size).astype(np.int64)
        self.error += int(error)
        if uk.size > self.capacity:
            # subtract the (capacity + 1)-th largest count from every counter
            cut = int(np.partition(uc, uc.size - self.capacity - 1)[uc.size - self.capacity - 1])
            uc = uc - cut
            keep = uc > 0
            uk, uc = uk[keep], uc[keep]
            self.error += cut
        self.keys, self.counts = uk, uc
        return self

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The (at most) k rows with the largest estimates, most frequent
        first, and their estimates (lower bounds of their counts)."""
        k = min(int(k), self.keys.size)
        order = np.argsort(-self.counts, kind="stable")[:k]
        return self.keys[order], self.counts[order]

    def coverage(self, k: int) -> tuple[float, float]:
        """(lower, upper) bounds on the fraction of lookups the k most
        frequent rows take."""
        if self.total == 0:
            return 0.0, 0.0
        _, est = self.top(k)
        low = float(est.sum()) / self.total
        return low, min(1.0, low + k * self.error / self.total)


def row_statistics(features: FeatureSet, batches: Iterable[Batch],
                   capacity: int = 1 << 16) -> dict[str, HeavyHitters]:
    """Every table's summary over `batches` (real positions only: padding
    past each bag's length is not a lookup; hashed ids reduced modulo rows)."""
    stats = {f.name: HeavyHitters(capacity) for f in features.sparse}
    for batch in batches:
        ids, lengths = np.asarray(batch.ids), np.asarray(batch.lengths)
        for i, f in enumerate(features.sparse):
            valid = np.arange(f.max_len)[None, :] < lengths[:, i : i + 1]
            rows = ids[:, features.columns(f.name)][valid].astype(np.int64)
            if f.hashed:
                rows = np.mod(rows, f.rows)
            stats[f.name].update(rows)
    return stats


def merge_over_processes(stats: dict[str, HeavyHitters]) -> dict[str, HeavyHitters]:
    """Every process's summaries merged, table by table, in process order, so
    every process gets the same result (a collective: all processes call it
    with the same tables and capacities)."""
    from jax.experimental import multihost_utils

    out = {}
    for name, s in stats.items():
        cap = s.capacity
        keys = np.full(cap, -1, np.int64)
        counts = np.zeros(cap, np.int64)
        keys[: s.keys.size], counts[: s.keys.size] = s.keys, s.counts
        meta = np.array([s.total, s.error], np.int64)
        all_keys, all_counts, all_meta = multihost_utils.process_allgather((keys, counts, meta))
        merged = HeavyHitters(cap)
        for k, c, m in zip(all_keys, all_counts, all_meta):
            part = HeavyHitters(cap)
            ok = k >= 0
            part.keys, part.counts, part.total, part.error = k[ok], c[ok], int(m[0]), int(m[1])
            merged.merge(part)
        out[name] = merged
    return out


DEFAULT_KS = (10, 100, 1_000, 10_000, 100_000)


def coverage_report(features: FeatureSet, stats: dict[str, HeavyHitters],
                    ks: Sequence[int] = DEFAULT_KS) -> list[dict]:
    """One JSON-ready row per table: its size, the lookups seen, the
    summary's error bound, and the coverage interval of the top k rows for
    each k (k below the table's rows)."""
    out = []
    for f in features.sparse:
        s = stats[f.name]
        cov = {}
        for k in ks:
            if k < f.rows:
                lo, hi = s.coverage(k)
                cov[str(k)] = [round(lo, 4), round(hi, 4)]
        out.append({"table": f.name, "rows": f.rows, "lookups": s.total, "counters": int(s.keys.size),
                    "error": s.error, "exact": s.error == 0, "coverage_top_k": cov})
    return out


def main(argv=None) -> int:
    from jdmt.data import SyntheticData, mlperf_dcnv2_features, synthetic_default_features

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("synthetic", "mlperf"), default="synthetic",
                   help="the default synthetic set, or the 26 MLPerf DCNv2 tables (synthetic ids)")
    p.add_argument("--max-rows", type=int, default=1_000_000, help="mlperf: cap on each table's rows")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--capacity", type=int, default=1 << 16, help="counters per table")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.batches, args.batch_size, args.capacity) < 1:
        p.error("--batches, --batch-size and --capacity must be >= 1")
    features = (mlperf_dcnv2_features(max_rows=args.max_rows) if args.data == "mlperf"
                else synthetic_default_features())
    data = SyntheticData(features, seed=args.seed)
    stats = row_statistics(features, (data.batch(i, args.batch_size) for i in range(args.batches)),
                           capacity=args.capacity)
    for row in coverage_report(features, stats):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
