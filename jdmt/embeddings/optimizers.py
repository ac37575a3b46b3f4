"""Fused sparse optimizers: de-duplicate touched rows, update only those, in place.

These functions run on one device's local shard (inside `shard_map`). They
never form a gradient of the whole table: gradients arrive per looked-up id,
are summed per unique row (sort + segment sum), and a single scatter-add
(`pallas_kernels.sparse_update`: XLA, or the row-update kernel) writes the
step into the (donated) table. Cost is proportional to the ids of
the step, not to the rows of the table.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jdmt.embeddings.types import OptimizerKind, SparseOptimizer
from jdmt.pallas_kernels.common import XLA, Impl
from jdmt.pallas_kernels.row_gradients import run_index, sort_by_row, summed_runs, unique_count
from jdmt.pallas_kernels.sparse_update import run_update


def segment_rows(
    rows: jax.Array,
    src: jax.Array,
    grads: jax.Array,
    sentinel: int,
    capacity: int | None = None,
    first: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Sum the gradients of each unique row of a sorted stream.

    Args:
      rows, src: i32[K, n] from `sort_by_row`.
      grads: f32[K, G, D] gradient sources; sorted position j of slot k
        takes `grads[k, src[k, j] // (n // G)]` (so pooled bags of n // G ids
        share their bag's gradient).
      sentinel: the "no id" row.
      capacity: unique rows returned per slot (default n: all of them).
      first: return the unique rows `[first, first + capacity)` of each slot.

    Returns:
      uniq: i32[K, U] unique rows of each slot, ascending, then `sentinel`.
      summed: f32[K, U, D] the summed gradient of each unique row.
    """
    k, n = rows.shape
    cap = n if capacity is None else min(capacity, n)
    per = n // grads.shape[1]
    seg = run_index(rows) - first
    seg = jnp.where((seg >= 0) & (seg < cap), seg, cap)  # cap: dropped

    def per_slot(rows, src, seg, g):
        uniq = jnp.full((cap,), sentinel, jnp.int32).at[seg].set(
            rows, indices_are_sorted=True, mode="drop")
        gs = g[src // per] if per > 1 else g[src]
        summed = jnp.zeros((cap, g.shape[-1]), g.dtype).at[seg].add(
            gs, indices_are_sorted=True, mode="drop")
        return uniq, summed

    return jax.vmap(per_slot)(rows, src, seg, grads)


def init_accumulator(opt: SparseOptimizer, rows: int, dim: int, dtype=jnp.float32):
    """The optimizer state of a local shard of `rows` x `dim`, or None."""
    shape = accumulator_shape(opt, rows, dim)
    return None if shape is None else jnp.full(shape, opt.initial_accumulator, dtype)


def accumulator_shape(opt: SparseOptimizer, rows: int, dim: int) -> tuple[int, ...] | None:
    """Shape of the optimizer state of a `rows` x `dim` shard (None: no state)."""
    if opt.kind is OptimizerKind.ROWWISE_ADAGRAD:
        return (rows,)
    if opt.kind is OptimizerKind.ADAGRAD:
        return (rows, dim)
    return None


def sparse_step(
    opt: SparseOptimizer,
    table: jax.Array,
    accum: jax.Array | None,
    ids: jax.Array,
    grads: jax.Array,
    *,
    base: jax.Array,
    max_rows: int,
    lr: jax.Array | float,
    row_mean_sq: Callable[[jax.Array], jax.Array] | None = None,
    capacity: int | None = None,
    agree: Callable[[jax.Array], jax.Array] | None = None,
    cpu_kernel: bool = False,
    impl: Impl = XLA,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """De-duplicate and apply: the whole fused update of one local shard.

    Args:
      ids: i32[K, M, L] local row ids of K tables (slots), M bags of L ids;
        negative = no id.
      grads: f32[K, M, D] bag gradients (pooled) or f32[K, M, L, D].
      base, max_rows: where each slot's table starts, and a bound on the
        rows of any slot's table (see `sort_by_row`).
      row_mean_sq: maps the summed row gradients f32[K, U, D] to the mean of
        their squares over the full row, f32[K, U] (column shards need the
        other shards' columns); default: the mean over this shard.
      capacity: unique rows per slot handled at once. The de-duplicated rows
        and the table write are this size instead of M*L; a step with more
        unique rows runs as many chunks as it needs, so no row is dropped.
      agree: makes the chunk count identical on every device (a `pmax` over
        the devices), needed when `row_mean_sq` communicates.
      cpu_kernel: do the whole update in the C++ FFI kernel
        (`cpu_kernels.sparse_update`: one pass, in place; CPU only). The
        caller checks `cpu_kernels.available()` and that `row_mean_sq` is the
        plain mean over this shard's columns (no column-sharded tables);
        `row_mean_sq`, `capacity` and `agree` are then unused (nothing is
        chunked or dropped).
      impl: with a Pallas implementation, each unique row's run of
        gradients is summed by the `segment_sum` kernel and the rows are
        written by the `row_update` kernel, in place
        (`jdmt.pallas_kernels`); the sort stays in XLA. Ignored when
        `cpu_kernel` is set.

    Returns:
      (table, accum, overflowed): overflowed is 1 if more than one chunk ran.
    """
    if cpu_kernel:
        from jdmt.embeddings import cpu_kernels

        table, accum = cpu_kernels.sparse_update(
            opt.kind, table, accum, ids, base, grads, lr, eps=opt.eps, max_rows=max_rows)
        return table, accum, jnp.zeros((), jnp.int32)
    k, m, ln = ids.shape
    d = grads.shape[-1]
    n = m * ln
    sentinel = table.shape[0]
    rows, src = sort_by_row(ids.reshape(k, n), base, max_rows, sentinel)
    grads = grads.reshape(k, -1, d)

    def update(cap, first, table, accum):
        if impl.pallas:
            uniq, g = summed_runs(impl, rows, src, grads, sentinel, cap, first)
        else:
            uniq, g = segment_rows(rows, src, grads, sentinel, cap, first)
        msq = None  # uniq i32[K, cap], g f32[K, cap, D]
        if row_mean_sq is not None and opt.kind is OptimizerKind.ROWWISE_ADAGRAD:
            msq = row_mean_sq(g).reshape(-1)
        # The caller makes `grads` depend on this step's reads of `table`, or XLA
        # keeps the old table alive with a whole-table copy (research.md).
        return run_update(impl, table, accum, uniq.reshape(-1), g.reshape(-1, d), lr, msq,
                          kind=opt.kind, eps=opt.eps)

    if capacity is None or capacity >= n:
        return (*update(n, 0, table, accum), jnp.zeros((), jnp.int32))
    # Unique rows in chunks of `capacity`: almost always one chunk. A loop
    # (not a `lax.cond`) keeps the table update in place: XLA copies buffers
    # that flow through a conditional.
    chunks = (unique_count(rows, sentinel) + capacity - 1) // capacity
    if agree is not None:
        chunks = agree(chunks)
    table, accum = lax.fori_loop(
        0, chunks, lambda i, ta: update(capacity, i * capacity, *ta), (table, accum)
    )
    return table, accum, (chunks > 1).astype(jnp.int32)
