"""Fused sparse optimizers: de-duplicate touched rows, update only those, in place.

These functions run on one device's storage (inside `shard_map`). They never
form a gradient of the whole table: gradients arrive per looked-up id (or
per bag, shared by its ids), are summed per unique row (sort + segment sum),
and a single scatter (`pallas_kernels.sparse_update`: XLA, or the row-update
kernel) writes the step into the (donated) buffer. Cost is proportional to
the ids of the step, not to the rows of the table; rows that were not
touched are never written.
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
    scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sum the gradients of each unique row of a sorted stream.

    Args:
      rows: i32[n] sorted rows (`sort_by_row`), `sentinel` for "no id".
      src: i32[n] the gradient row (in `grads`) of each sorted position.
      grads: f32[M, D] gradient rows.
      sentinel: the "no id" row.
      capacity: unique rows returned (default n: all of them).
      first: return the unique rows `[first, first + capacity)`.
      scale: f32[n] each sorted position's gradient multiplier, or None.

    Returns:
      uniq: i32[U] unique rows ascending, then `sentinel`.
      summed: f32[U, D] the summed gradient of each unique row.
    """
    n = rows.shape[0]
    cap = n if capacity is None else min(capacity, n)
    seg = run_index(rows[None])[0] - first
    seg = jnp.where((seg >= 0) & (seg < cap) & (rows != sentinel), seg, cap)  # cap: dropped
    uniq = jnp.full((cap,), sentinel, jnp.int32).at[seg].set(rows, indices_are_sorted=True, mode="drop")
    g = grads[src] if scale is None else grads[src] * scale[:, None]
    summed = jnp.zeros((cap, grads.shape[-1]), grads.dtype).at[seg].add(
        g, indices_are_sorted=True, mode="drop")
    return uniq, summed


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
    rows: jax.Array,
    src: jax.Array,
    grads: jax.Array,
    *,
    lr: jax.Array | float,
    row_mean_sq: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    capacity: int | None = None,
    agree: Callable[[jax.Array], jax.Array] | None = None,
    cpu_kernel: bool = False,
    impl: Impl = XLA,
    seed: jax.Array | int | None = None,
    scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """De-duplicate and apply: the whole fused update of one device's storage.

    Args:
      table: f32[R, D] the storage buffer (donated by the caller's jit), or
        bf16/f16: updated in f32 and written back with stochastic rounding
        (`jdmt.precision`).
      accum: its optimizer state, or None.
      rows: i32[n] storage rows of the ids whose gradients arrived; negative
        or >= R = none.
      src: i32[n] the row of `grads` holding each id's gradient (a pooled
        bag's ids share their bag's row).
      grads: f32[M, D] gradient rows.
      row_mean_sq: maps (unique rows i32[U], their summed gradients
        f32[U, D]) to the mean of the squared gradient over each row's full
        width, f32[U] (column shards need the other shards' columns);
        default: the mean over this buffer's columns.
      capacity: unique rows handled at once. The de-duplicated rows and the
        table write are this size instead of n; a step with more unique rows
        runs as many chunks as it needs, so no row is dropped.
      agree: makes the chunk count identical on every device (a `pmax`),
        needed when `row_mean_sq` communicates.
      cpu_kernel: do the whole update in the C++ FFI kernel
        (`cpu_kernels.sparse_update`: one pass, in place; CPU only). The
        caller checks `cpu_kernels.available()` and that `row_mean_sq` is
        the plain mean over this buffer's columns. It runs on
        `impl.cpu_threads` threads (at least one).
      impl: with a Pallas implementation, each unique row's run of gradients
        is summed by the `segment_sum` kernel and the rows are written by the
        `row_update` kernel, in place (`jdmt.pallas_kernels`); the sort stays
        in XLA. Ignored when `cpu_kernel` is set.
      seed: u32, the stochastic rounding's seed of a 16-bit table (a new one
        every step; `precision.update_seed`); not used for f32 tables.
      scale: f32[n] or None: each id's gradient is `grads[src]` times its
        scale (per-sample weights: the ids of a weighted bag share the bag's
        gradient row, each times its weight).

    Returns:
      (table, accum, overflowed): overflowed is 1 if more than one chunk ran.

    Occurrences of a row are summed in ascending position of `rows` (the sort
    is stable), so the same ids in the same order give the same bits.
    """
    n = rows.shape[0]
    r = table.shape[0]
    rows = jnp.where((rows >= 0) & (rows < r), rows, -1)
    if cpu_kernel:
        from jdmt.embeddings import cpu_kernels

        threads = max(1, getattr(impl, "cpu_threads", 1))
        table, accum = cpu_kernels.sparse_update(opt.kind, table, accum, rows, src, grads, lr,
                                                 eps=opt.eps, threads=threads, seed=seed, scale=scale)
        return table, accum, jnp.zeros((), jnp.int32)
    d = grads.shape[-1]
    sentinel = r
    srows, spos = sort_by_row(rows[None], jnp.zeros((1,), jnp.int32), r, sentinel)
    srows, ssrc = srows[0], src[spos[0]]
    sscale = None if scale is None else scale[spos[0]]

    def update(cap, first, table, accum):
        if impl.pallas:
            uniq, g = summed_runs(impl, srows[None], ssrc[None], grads[None], sentinel, cap, first,
                                  scale=None if sscale is None else sscale[None], per=1)
            uniq, g = uniq[0], g[0]
        else:
            uniq, g = segment_rows(srows, ssrc, grads, sentinel, cap, first, sscale)
        msq = None
        if row_mean_sq is not None and opt.kind is OptimizerKind.ROWWISE_ADAGRAD:
            msq = row_mean_sq(uniq, g)
        # The caller makes `grads` depend on this step's reads of `table`, or XLA
        # keeps the old table alive with a whole-table copy (docs/design.md).
        return run_update(impl, table, accum, uniq, g.reshape(-1, d), lr, msq,
                          kind=opt.kind, eps=opt.eps, seed=seed)

    if capacity is None or capacity >= n:
        return (*update(n, 0, table, accum), jnp.zeros((), jnp.int32))
    # Unique rows in chunks of `capacity`: almost always one chunk. A loop
    # (not a `lax.cond`) keeps the table update in place: XLA copies buffers
    # that flow through a conditional.
    chunks = (unique_count(srows[None], sentinel) + capacity - 1) // capacity
    if agree is not None:
        chunks = agree(chunks)
    table, accum = lax.fori_loop(
        0, chunks, lambda i, ta: update(capacity, i * capacity, *ta), (table, accum)
    )
    return table, accum, (chunks > 1).astype(jnp.int32)
