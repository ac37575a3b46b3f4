"""Segment sum on Mosaic GPU: out[u] = sum_{j in [begin[u], end[u])} scale[j] * grads[src[j]].

Grid (output tiles, column blocks). A program owns 64 outputs (the rows of
its f32 (64, B) accumulator, in registers) and is the only writer of them.
It walks the occurrences of its runs, `[lo, hi)` = from the first begin to
the last end of its non-empty runs, in chunks of 64 (one occurrence per tile
row), double-buffered:

    chunk k:  start the copies of chunk k + 1's 64 gradient rows (and scales),
              wait for chunk k,
              if the whole chunk lies in one run u (seg[j0] == seg[j_last]):
                  acc[u] += column sum of the chunk            (fast path)
              else, for each occurrence t of the chunk:
                  acc[seg[t]] += scale[t] * row[t]             (rank-1 update)

`seg[j]` (the output of occurrence j, computed in XLA) routes each row. A
long run (a hot id: thousands of occurrences) takes the fast path: 64
occurrences per step; chunks that span many short runs take the slow path,
64 masked row updates. Occurrences in `[lo, hi)` that belong to no run of
this tile are fetched but add nothing; with sorted runs (`run_bounds`)
there are none, and the work of a tile is proportional to its occurrences.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jdmt.pallas_kernels.gpu import rows as R
from jdmt.pallas_kernels.gpu import tuning


def segment_sum_kernel(*refs, plan: R.RowPlan, scaled: bool, ops: R.Ops):
    """refs: grads operands, src i32[n], seg i32[n], [scale f32[n + 64]],
    lo i32[T], hi i32[T], out f32[T * 64, width]; scratch: rows (2, 64, B),
    [scales (2, 64)], barriers (2,), out tile (64, B)."""
    lanes, nslot, blk = tuning.LANES, tuning.NUM_SLOTS, plan.block
    srcs, refs = refs[: plan.num_operands], refs[plan.num_operands :]
    if scaled:
        src_ref, seg_ref, scale_ref, lo_ref, hi_ref, out_ref, buf, sbuf, bar, obuf = refs
    else:
        (src_ref, seg_ref, lo_ref, hi_ref, out_ref, buf, bar, obuf), scale_ref, sbuf = refs, None, None
    tile = lax.axis_index("outs")
    col = lax.axis_index("cols")
    first_out = tile * lanes
    lo = lo_ref[tile]
    hi = hi_ref[tile]
    num_chunks = lax.div(hi - lo + (lanes - 1), lanes)
    lane_id = ops.lane_iota()

    def chunk_start(k):
        j0 = lo + k * lanes
        return j0, jnp.minimum(lanes, hi - j0)

    def issue(k, slot):
        j0, count = chunk_start(k)

        def lane(b, carry):
            @pl.when(b < count)
            def _():
                plan.fetch(srcs, src_ref[j0 + b], col, buf.at[slot, b], bar.at[slot])

            @pl.when(b >= count)
            def _():
                plgpu.barrier_arrive(bar.at[slot])

            return carry

        lax.fori_loop(0, lanes, lane, 0)
        if scaled:
            plgpu.copy_gmem_to_smem(scale_ref.at[pl.ds(j0, lanes)], sbuf.at[slot], bar.at[slot])

    @pl.when(num_chunks > 0)
    def _():
        issue(0, 0)

    def chunk(k, acc):
        slot = lax.rem(k, nslot)

        @pl.when(k + 1 < num_chunks)
        def _():
            issue(k + 1, lax.rem(k + 1, nslot))

        plgpu.barrier_wait(bar.at[slot])
        j0, count = chunk_start(k)
        u_first = seg_ref[j0] - first_out
        u_last = seg_ref[j0 + count - 1] - first_out
        one_run = (u_first == u_last) & (u_first >= 0) & (u_first < lanes)

        def whole_chunk(acc):  # every occurrence of the chunk belongs to output u_first
            got = ops.load(buf.at[slot], R.WGMMA).astype(jnp.float32)
            if scaled:
                got = got * R.per_row(ops.load(sbuf.at[slot], R.ROW), blk)
            got = jnp.where(R.per_row(lane_id < count, blk), got, 0.0)
            total = jnp.sum(got, axis=0)
            return acc + jnp.where(R.per_row(lane_id == u_first, blk), R.per_col(total), 0.0)

        def by_occurrence(acc):
            def occurrence(t, acc):
                u = seg_ref[j0 + t] - first_out

                def add(acc):
                    row = ops.load(buf.at[slot, t], R.COL).astype(jnp.float32)
                    if scaled:
                        row = row * scale_ref[j0 + t]
                    return acc + jnp.where(R.per_row(lane_id == u, blk), R.per_col(row), 0.0)

                return lax.cond((u >= 0) & (u < lanes), add, lambda a: a, acc)

            return lax.fori_loop(0, count, occurrence, acc)

        return lax.cond(one_run, whole_chunk, by_occurrence, acc)

    acc = lax.fori_loop(0, num_chunks, chunk, ops.zeros(blk))
    obuf[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(obuf, out_ref.at[pl.ds(first_out, lanes), pl.ds(col * blk, blk)])
    plgpu.wait_smem_to_gmem(0)


def occurrence_owner(begin: jax.Array, end: jax.Array, n: int) -> jax.Array:
    """i32[n]: the run u containing each occurrence j (begin[u] <= j < end[u]),
    -1 for none. Empty runs (end <= begin) own nothing, wherever they start."""
    nonempty = end > begin
    start = jnp.where(nonempty, begin, n + 1)  # empty runs sort last and match nothing
    order = jnp.argsort(start)
    b, e = start[order], jnp.where(nonempty, end, 0)[order]
    j = jnp.arange(n, dtype=jnp.int32)
    at = jnp.searchsorted(b, j, side="right").astype(jnp.int32) - 1
    at0 = jnp.maximum(at, 0)
    inside = (at >= 0) & (j < e[at0])
    return jnp.where(inside, order[at0], -1).astype(jnp.int32)


def tile_spans(begin: jax.Array, end: jax.Array, tiles: int) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) i32[tiles]: the occurrences spanned by each 64-output tile's
    non-empty runs ([0, 0) for none)."""
    lanes = tuning.LANES
    nonempty = end > begin
    b = R.pad_rows(jnp.where(nonempty, begin, jnp.iinfo(jnp.int32).max), tiles * lanes,
                   jnp.iinfo(jnp.int32).max).reshape(tiles, lanes)
    e = R.pad_rows(jnp.where(nonempty, end, 0), tiles * lanes, 0).reshape(tiles, lanes)
    lo, hi = jnp.min(b, axis=1), jnp.max(e, axis=1)
    return jnp.where(hi > 0, lo, 0).astype(jnp.int32), hi.astype(jnp.int32)


def segment_sum(grads: jax.Array, src: jax.Array, begin: jax.Array, end: jax.Array,
                scale: jax.Array | None, *, interpret=False) -> jax.Array:
    """Sum runs of gathered gradient rows.

    Args:
      grads: f[G, D] gradient sources.
      src: i32[n], each in [0, G).
      begin, end: i32[U] non-overlapping runs of positions into src
        (empty where end <= begin; values in [0, n]).
      scale: f32[n] or None (1).
      interpret: False (compile), True or an `InterpretGPUParams`.

    Returns:
      f32[U, D].
    """
    n = src.shape[0]
    num_src, dim = grads.shape
    u = begin.shape[0]
    if u == 0 or n == 0 or num_src == 0 or dim == 0:
        return jnp.zeros((u, dim), jnp.float32)
    plan = R.plan_rows(num_src, dim, grads.dtype)
    lanes = tuning.LANES
    tiles = R.num_tiles(u)
    begin = begin.astype(jnp.int32)
    end = end.astype(jnp.int32)
    lo, hi = tile_spans(begin, end, tiles)
    seg = occurrence_owner(begin, end, n)
    operands = [*plan.operands(grads), src.astype(jnp.int32), seg]
    scratch = [plgpu.SMEM((tuning.NUM_SLOTS, lanes, plan.block), grads.dtype)]
    scaled = scale is not None
    if scaled:  # padded: a chunk's 64 scales are one copy, also at the end
        operands.append(R.pad_rows(scale.astype(jnp.float32), n + lanes, 0.0))
        scratch.append(plgpu.SMEM((tuning.NUM_SLOTS, lanes), jnp.float32))
    operands += [lo, hi]
    scratch += [
        plgpu.Barrier(num_arrivals=lanes + scaled, num_barriers=tuning.NUM_SLOTS),
        plgpu.SMEM((lanes, plan.block), jnp.float32),
    ]
    params = R.interpret_params(interpret)
    kernel = plgpu.kernel(
        functools.partial(segment_sum_kernel, plan=plan, scaled=scaled, ops=R.Ops(params)),
        out_type=jax.ShapeDtypeStruct((tiles * lanes, plan.width), jnp.float32),
        scratch_types=scratch,
        grid=(tiles, plan.num_blocks),
        grid_names=("outs", "cols"),
        interpret=params,
    )
    return kernel(*operands)[:u, :dim]


__all__ = ["occurrence_owner", "segment_sum", "segment_sum_kernel", "tile_spans"]
