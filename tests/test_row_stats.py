"""Row access statistics: the Misra-Gries summary's bounds against exact counts."""

import json

import numpy as np
import pytest

from jdmt.data.specs import Batch, FeatureSet, SparseFeature
from jdmt.planner.row_stats import HeavyHitters, coverage_report, main, row_statistics


def _zipf(rng, n, rows, alpha=1.1):
    p = 1.0 / np.arange(1, rows + 1) ** alpha
    perm = rng.permutation(rows)  # hot rows are not 0, 1, 2, ...
    return perm[rng.choice(rows, size=n, p=p / p.sum())]


def _check_bounds(s: HeavyHitters, truth: np.ndarray):
    assert s.total == truth.sum()
    assert s.error <= s.total / (s.capacity + 1)
    est = dict(zip(s.keys.tolist(), s.counts.tolist()))
    for key, c in est.items():  # lower bounds, short by at most `error`
        assert truth[key] - s.error <= c <= truth[key]
    heavy = np.flatnonzero(truth > s.error)  # every row above the error bound is kept
    assert set(heavy.tolist()) <= set(est)
    for k in (1, 10, 100, 1000):
        lo, hi = s.coverage(k)
        exact = np.sort(truth)[::-1][:k].sum() / truth.sum()
        assert lo - 1e-12 <= exact <= hi + 1e-12, (k, lo, exact, hi)


@pytest.mark.parametrize("capacity", [64, 512])
def test_summary_bounds_hold_on_a_zipf_stream_in_batches(capacity):
    rng = np.random.default_rng(0)
    rows = 50_000
    truth = np.zeros(rows, np.int64)
    s = HeavyHitters(capacity)
    for _ in range(20):
        ids = _zipf(rng, 4000, rows)
        np.add.at(truth, ids, 1)
        s.update(ids)
    assert s.error > 0 and s.keys.size <= capacity  # more distinct rows than counters
    _check_bounds(s, truth)
    # the i-th row returned is at most `error` below the truly i-th hottest
    top, _ = s.top(20)
    assert np.all(truth[top] >= np.sort(truth)[::-1][:20] - s.error)
    assert set(np.argsort(-truth)[:3].tolist()) <= set(top.tolist())


def test_exact_when_the_distinct_rows_fit_and_merge_keeps_the_bounds():
    rng = np.random.default_rng(1)
    a, b = _zipf(rng, 3000, 300), _zipf(rng, 3000, 300)
    s = HeavyHitters(512).update(a).update(b)
    truth = np.bincount(np.concatenate([a, b]), minlength=300)
    assert s.error == 0
    assert np.array_equal(s.counts, truth[s.keys]) and set(s.keys.tolist()) == set(np.flatnonzero(truth).tolist())
    # two processes' summaries merged: the same guarantees over the joint stream
    big = 20_000
    x, y = _zipf(rng, 30_000, big), _zipf(rng, 30_000, big)
    m = HeavyHitters(128).update(x).merge(HeavyHitters(128).update(y))
    _check_bounds(m, np.bincount(np.concatenate([x, y]), minlength=big))
    with pytest.raises(ValueError, match="capacity"):
        HeavyHitters(0)


def test_row_statistics_count_real_positions_and_hash():
    fs = FeatureSet((SparseFeature("a", 10, 4, 3), SparseFeature("h", 7, 4, 2, hashed=True),
                     SparseFeature("s", 5, 4, 2, kind="sequence")), num_dense=1)
    ids = np.array([[1, 1, 9, 15, -3, 4, 0], [2, 0, 0, 8, 0, 1, 1]], np.int32)
    lengths = np.array([[2, 2, 1], [1, 1, 2]], np.int32)
    batch = Batch(dense=np.zeros((2, 1), np.float32), ids=ids, lengths=lengths, labels=np.zeros(2, np.float32))
    st = row_statistics(fs, [batch, batch])
    assert dict(zip(st["a"].keys.tolist(), st["a"].counts.tolist())) == {1: 4, 2: 2}  # 9 and 0 are padding
    assert dict(zip(st["h"].keys.tolist(), st["h"].counts.tolist())) == {1: 4, 4: 2}  # 15, 8 -> 1; -3 -> 4
    assert dict(zip(st["s"].keys.tolist(), st["s"].counts.tolist())) == {4: 2, 1: 4}
    rep = {r["table"]: r for r in coverage_report(fs, st, ks=(1, 2, 6))}
    assert rep["a"]["coverage_top_k"] == {"1": [0.6667, 0.6667], "2": [1.0, 1.0], "6": [1.0, 1.0]}
    assert "6" not in rep["s"]["coverage_top_k"] and rep["s"]["exact"]


def test_command_prints_a_coverage_curve_per_table(capsys):
    assert main(["--batches", "2", "--batch-size", "512", "--capacity", "256"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 26 and all(r["lookups"] > 0 for r in rows)
    for r in rows:
        bounds = list(r["coverage_top_k"].values())
        lows = [lo for lo, _ in bounds]
        assert lows == sorted(lows) and all(lo <= hi for lo, hi in bounds)  # a curve, rising in k


def test_summaries_merge_over_processes_in_process_order(monkeypatch):
    """`merge_over_processes` pads each process's summary to its capacity,
    gathers them, and merges them in process order: here two processes'
    summaries, gathered by a stand-in for `process_allgather`."""
    from jax.experimental import multihost_utils

    from jdmt.planner.row_stats import merge_over_processes

    rng = np.random.default_rng(0)
    parts = []
    for _ in range(2):
        s = HeavyHitters(64)
        s.update(_zipf(rng, 5000, 1000).astype(np.int64))
        parts.append(s)
    sent = []

    def allgather(tree):
        sent.append(tree)
        if len(sent) == 1:  # this process's arrays, then the other's
            return tuple(np.stack([a, b]) for a, b in zip(tree, _padded(parts[1])))
        raise AssertionError("one gather per table")

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    merged = merge_over_processes({"t": parts[0]})["t"]
    expect = HeavyHitters(64).merge(_copy(parts[0])).merge(_copy(parts[1]))
    assert merged.total == parts[0].total + parts[1].total == expect.total
    assert merged.error == expect.error
    assert dict(zip(merged.keys.tolist(), merged.counts.tolist())) == dict(zip(expect.keys.tolist(),
                                                                                expect.counts.tolist()))
    assert sent[0][0].shape == (64,) and (sent[0][0][parts[0].keys.size:] == -1).all()


def _padded(s):
    keys = np.full(s.capacity, -1, np.int64)
    counts = np.zeros(s.capacity, np.int64)
    keys[: s.keys.size], counts[: s.keys.size] = s.keys, s.counts
    return keys, counts, np.array([s.total, s.error], np.int64)


def _copy(s):
    c = HeavyHitters(s.capacity)
    c.keys, c.counts, c.total, c.error = s.keys.copy(), s.counts.copy(), s.total, s.error
    return c
