"""Backward of the lookups: the gradient of each looked-up row, de-duplicated.

For every unique valid row r among the ids of a step,

    g_r = sum over the occurrences (n, l) of r of  scale[n, l] * grad[n]   (pooled)
    g_r = sum over the occurrences (n, s) of r of  grad[n, s]              (sequence)

(scale: the per-id weight, divided by the bag's count for "mean"). This is
the `g_r` of FBGEMM's row-wise Adagrad (docs/design.md). It is computed in two
parts:

1. XLA sorts the occurrences by row (one packed uint32 key where it fits)
   and finds each unique row's run `[begin, end)` of sorted positions;
2. `segment_sum` adds each run's gradients: the Pallas kernel fetches the
   gradient rows of a run by DMA and writes one output row per unique row
   (no two programs write the same row, so no atomics and no races).

Nothing of size [rows of the table, D] is formed, and no [ids, D] buffer
either in the kernel path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jdmt.pallas_kernels.common import (
    Impl,
    as_arrays,
    canonical_bags,
    check_bags,
    check_combiner,
    resolve,
    target_module,
)

_NO_KEY = 0xFFFFFFFF


# ---- sorting and runs: shared by the kernel path and the XLA path -------------------------


def sort_by_row(
    ids: jax.Array, base: jax.Array, max_rows: int, sentinel: int
) -> tuple[jax.Array, jax.Array]:
    """Sort the ids of each slot by row, keeping where each came from.

    Args:
      ids: i32[K, n] local row ids; negative = no id.
      base: i32[K] first local row of each slot's table (all ids of slot k
        lie in `[base[k], base[k] + max_rows)`).
      max_rows: static bound on the rows of any slot's table.
      sentinel: the row reported for "no id" (past the end of the table).

    Returns:
      rows: i32[K, n] sorted rows (no-id positions last, as `sentinel`).
      src: i32[K, n] the position in `ids` each sorted row came from.

    When `max_rows * n` fits in 32 bits (the common case), row and position
    are packed into one uint32 key and sorted alone, which is several times
    faster than sorting a key with a payload.
    """
    k, n = ids.shape
    pos = lax.broadcasted_iota(jnp.int32, (k, n), 1)
    valid = ids >= 0
    if max_rows * n < _NO_KEY:
        rel = (ids - base[:, None]).astype(jnp.uint32)
        key = jnp.where(valid, rel * jnp.uint32(n) + pos.astype(jnp.uint32), jnp.uint32(_NO_KEY))
        key = lax.sort(key, dimension=1)
        found = key != jnp.uint32(_NO_KEY)
        rows = (key // jnp.uint32(n)).astype(jnp.int32) + base[:, None]
        src = (key % jnp.uint32(n)).astype(jnp.int32)
        return jnp.where(found, rows, sentinel), src
    key = jnp.where(valid, ids, sentinel).astype(jnp.int32)
    return lax.sort((key, pos), dimension=1, num_keys=1)


def run_index(rows: jax.Array) -> jax.Array:
    """i32[K, n]: index of each sorted position's row among its slot's unique rows."""
    k = rows.shape[0]
    first = jnp.concatenate([jnp.ones((k, 1), bool), rows[:, 1:] != rows[:, :-1]], axis=1)
    return jnp.cumsum(first, axis=1, dtype=jnp.int32) - 1


def unique_count(rows: jax.Array, sentinel: int) -> jax.Array:
    """i32[]: the most unique rows (not counting "no id") any slot has."""
    seg = run_index(rows)
    last = jnp.where(rows == sentinel, -1, seg)
    return jnp.max(last) + 1


def run_bounds(
    rows: jax.Array, sentinel: int, capacity: int, first: jax.Array | int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The runs of the unique rows `[first, first + capacity)` of each slot.

    Args:
      rows: i32[K, n] sorted rows from `sort_by_row`.

    Returns:
      uniq: i32[K, U] the unique rows (ascending), `sentinel` past the last.
      begin, end: i32[K, U] each unique row's sorted positions `[begin, end)`
        (empty where `uniq` is the sentinel).
    """
    k, n = rows.shape
    seg = jnp.where(rows == sentinel, n, run_index(rows))  # "no id" sorts last
    want = first + jnp.arange(capacity + 1, dtype=jnp.int32)
    bounds = jax.vmap(lambda s: jnp.searchsorted(s, want, side="left"))(seg).astype(jnp.int32)
    begin, end = bounds[:, :-1], bounds[:, 1:]
    at = jnp.minimum(begin, n - 1)
    uniq = jnp.where(end > begin, jnp.take_along_axis(rows, at, axis=1), sentinel)
    return uniq, begin, end


# ---- the segment sum: the part that is a kernel ------------------------------------------


def check_segments(grads, src, begin, end, scale) -> None:
    """The one validator of `segment_sum` and its reference."""
    if grads.ndim != 2:
        raise ValueError(f"grads must be [sources, dim], got shape {grads.shape}")
    if src.ndim != 1 or begin.ndim != 1 or begin.shape != end.shape:
        raise ValueError(f"src must be [n], begin and end [U]; got {src.shape}, {begin.shape}, {end.shape}")
    if scale is not None and scale.shape != src.shape:
        raise ValueError(f"scale must be [{src.shape[0]}], got {scale.shape}")


def segment_sum_reference(grads, src, begin, end, scale=None):
    """XLA reference of `segment_sum`."""
    grads, src, begin, end, scale = as_arrays(grads, src, begin, end, scale)
    check_segments(grads, src, begin, end, scale)
    return segment_sum_xla(grads, src, begin, end, scale)


def segment_sum_xla(grads, src, begin, end, scale):
    """out[u] = sum_{j in [begin[u], end[u])} scale[j] * grads[src[j]] (runs
    must not overlap; empty or reversed runs give 0)."""
    n, u = src.shape[0], begin.shape[0]
    j = jnp.arange(n, dtype=jnp.int32)
    # the run of position j: the last non-empty u with begin[u] <= j, if j < end[u]
    # (empty runs sort past every position, so they hide no other run)
    order = jnp.argsort(jnp.where(end > begin, begin, n))
    b, e = jnp.where(end > begin, begin, n)[order], end[order]
    at = jnp.searchsorted(b, j, side="right").astype(jnp.int32) - 1
    inside = (at >= 0) & (j < e[jnp.maximum(at, 0)])
    seg = jnp.where(inside, order[jnp.maximum(at, 0)], u)
    g = grads[src].astype(jnp.float32)
    if scale is not None:
        g = g * scale.astype(jnp.float32)[:, None]
    return jnp.zeros((u, grads.shape[1]), jnp.float32).at[seg].add(g, mode="drop")


def segment_sum(
    grads: jax.Array,
    src: jax.Array,
    begin: jax.Array,
    end: jax.Array,
    scale: jax.Array | None = None,
    *,
    kernel: str = "pallas",
    target: str | None = None,
    interpret: object = None,
) -> jax.Array:
    """Sum runs of gathered gradient rows.

    Args:
      grads: f[G, D] gradient sources (a bag's gradient, or a position's).
      src: i32[n] the source row of each sorted occurrence, in `[0, G)`.
      begin, end: i32[U] the occurrences `[begin[u], end[u])` of output row
        u; runs do not overlap (empty where end <= begin).
      scale: f32[n] per occurrence, or None (1).

    Returns:
      f32[U, D].
    """
    grads, src, begin, end, scale = as_arrays(grads, src, begin, end, scale)
    check_segments(grads, src, begin, end, scale)
    return run_segment_sum(resolve(kernel, target, interpret), grads, src, begin, end, scale)


def run_segment_sum(impl: Impl, grads, src, begin, end, scale):
    """`segment_sum` with a resolved implementation (inputs already checked)."""
    if not impl.pallas:
        return segment_sum_xla(grads, src, begin, end, scale)
    return target_module(impl).segment_sum(grads, src, begin, end, scale, interpret=impl.interpret)


# ---- the whole backward of one table -------------------------------------------------------


def summed_runs(impl: Impl, rows, src, grads, sentinel: int, capacity: int, first=0, scale=None,
                per: int | None = None):
    """Each slot's unique rows `[first, first + capacity)` and their summed gradients.

    Args:
      rows, src: i32[K, n] from `sort_by_row`.
      grads: f[K, G, D] gradient sources: sorted position j of slot k takes
        `grads[k, src[k, j] // per]`, by default per = n // G (a pooled
        bag's n // G ids share its gradient); per=1: `src` names the row.
      scale: f32[K, n] per sorted position, or None (1).

    Returns:
      uniq: i32[K, U] the unique rows (`run_bounds`).
      summed: f32[K, U, D] their summed gradients (`segment_sum` over all
        slots' runs at once; sorted position j of slot k is k * n + j).
    """
    k, n = rows.shape
    g, d = grads.shape[1], grads.shape[2]
    per = n // g if per is None else per
    uniq, begin, end = run_bounds(rows, sentinel, capacity, first)
    slot = jnp.arange(k, dtype=jnp.int32)[:, None]
    src_rows = ((src // per if per > 1 else src) + g * slot).reshape(-1)
    summed = run_segment_sum(impl, grads.reshape(k * g, d), src_rows, (begin + n * slot).reshape(-1),
                             (end + n * slot).reshape(-1),
                             None if scale is None else scale.reshape(-1))
    return uniq, summed.reshape(k, capacity, d)


def _occurrences(impl: Impl, ids, grads, weights, num_rows: int, capacity: int, first):
    """Canonical ids i32[N, L] -> (uniq i32[U], f32[U, D], unique count)."""
    n, ln = ids.shape
    rows, pos = sort_by_row(ids.reshape(1, n * ln), jnp.zeros((1,), jnp.int32), num_rows, num_rows)
    # pooled: a bag's ids share its gradient; sequence: one gradient per position
    g = grads[None] if grads.ndim == 2 else grads.reshape(1, n * ln, grads.shape[-1])
    scale = None if weights is None else weights.reshape(1, -1)[:, pos[0]]
    uniq, summed = summed_runs(impl, rows, pos, g, num_rows, capacity, first, scale)
    return uniq[0], summed[0], unique_count(rows, num_rows)


def check_row_gradients(ids, grads, lengths, weights, num_rows, combiner) -> None:
    """The one validator of `row_gradients` and its reference."""
    check_bags(ids, lengths, weights)
    check_combiner(combiner)
    n, ln = ids.shape
    if grads.ndim == 2:
        ok = grads.shape[0] == n
    else:
        ok = grads.ndim == 3 and grads.shape[:2] == (n, ln)
        if ok and (weights is not None or combiner != "sum"):
            raise ValueError("sequence gradients take no weights and no mean combiner")
    if not ok:
        raise ValueError(f"grads must be [{n}, D] (pooled) or [{n}, {ln}, D] (sequence), got {grads.shape}")
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")


def row_gradients_reference(
    ids, grads, lengths=None, weights=None, *, num_rows, combiner="sum", capacity=None, first=0
):
    """XLA reference of `row_gradients`."""
    return row_gradients(ids, grads, lengths, weights, num_rows=num_rows, combiner=combiner,
                         capacity=capacity, first=first, kernel="xla")


def row_gradients(
    ids: jax.Array,
    grads: jax.Array,
    lengths: jax.Array | None = None,
    weights: jax.Array | None = None,
    *,
    num_rows: int,
    combiner: str = "sum",
    capacity: int | None = None,
    first: jax.Array | int = 0,
    kernel: str = "pallas",
    target: str | None = None,
    interpret: object = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """De-duplicated gradients of the rows a lookup read.

    Args:
      ids: i32[N, L] the lookup's ids (invalid positions are skipped, as in
        the lookup).
      grads: f[N, D], the gradient of a pooled lookup's output, or
        f[N, L, D], of a sequence lookup's.
      lengths, weights, combiner: as given to the lookup.
      num_rows: rows of the table (ids >= num_rows are invalid); also the
        sentinel row that pads the output.
      capacity: unique rows returned (default N * L: all of them). The
        third output tells whether more exist (then call again with `first`).
      first: return the unique rows `[first, first + capacity)`.

    Returns:
      rows: i32[U] unique rows ascending, then `num_rows`.
      summed: f32[U, D] each row's summed gradient (0 for padding).
      unique: i32[] the number of unique valid rows in all.
    """
    ids, grads, lengths, weights = as_arrays(ids, grads, lengths, weights)
    check_row_gradients(ids, grads, lengths, weights, num_rows, combiner)
    impl = resolve(kernel, target, interpret)
    cids, w = canonical_bags(ids, lengths, weights, num_rows, combiner)
    cap = ids.size if capacity is None else int(capacity)
    return _occurrences(impl, cids, grads, w, num_rows, cap, first)


def dense_table_gradient(impl: Impl, table, ids, g, weights):
    """The table-sized gradient of a lookup (custom-VJP backward only: see
    `pooled_lookup`'s docstring). ids canonical i32[N, L]."""
    rows, summed, _ = _occurrences(impl, ids, g, weights, table.shape[0], ids.size, 0)
    zero = jnp.zeros(table.shape, jnp.float32)
    return zero.at[rows].add(summed, mode="drop").astype(table.dtype)


__all__ = [
    "check_row_gradients",
    "check_segments",
    "dense_table_gradient",
    "row_gradients",
    "row_gradients_reference",
    "run_bounds",
    "run_index",
    "run_segment_sum",
    "segment_sum",
    "segment_sum_reference",
    "segment_sum_xla",
    "sort_by_row",
    "summed_runs",
    "unique_count",
]
