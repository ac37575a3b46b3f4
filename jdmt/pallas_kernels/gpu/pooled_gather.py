"""Pooled gather on Mosaic GPU: out[n] = sum_l w[n, l] * table[ids[n, l]].

Grid (bag tiles, column blocks). A program owns 64 bags (one per tile row)
and one column block, and walks the L positions:

    step l:   start the 64 row copies of position l + 1 (slot (l+1) % 2),
              wait for position l's copies (slot l % 2),
              acc += where(id valid, w * rows, 0)        (registers, f32)
    end:      acc -> SMEM -> one TMA store of the (64, B) output tile

Row copies are TMA `copy_gmem_to_smem` of one row each into row b of a
(64, B) shared-memory tile; the ids and weights of the position come with
them (two 256-byte copies) on the same barrier. A -1 id fetches nothing:
the lane arrives on the barrier instead, and the mask drops its stale row.
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


def pooled_gather_kernel(*refs, plan: R.RowPlan, length: int, weighted: bool, ops: R.Ops):
    """refs: table operands, ids i32[T, L, 64], [weights f32[T, L, 64]],
    out[T * 64, width]; scratch: rows (2, 64, B), ids (2, 1, 64),
    [weights (2, 1, 64)], barriers (2,), out tile (64, B)."""
    lanes, nslot, blk = tuning.LANES, tuning.NUM_SLOTS, plan.block
    srcs, refs = refs[: plan.num_operands], refs[plan.num_operands :]
    if weighted:
        ids_ref, w_ref, out_ref, buf, ibuf, wbuf, bar, obuf = refs
    else:
        (ids_ref, out_ref, buf, ibuf, bar, obuf), w_ref, wbuf = refs, None, None
    tile = lax.axis_index("bags")
    col = lax.axis_index("cols")

    def issue(l, slot):
        def lane(b, carry):
            r = ids_ref[tile, l, b]

            @pl.when(r >= 0)
            def _():
                plan.fetch(srcs, r, col, buf.at[slot, b], bar.at[slot])

            @pl.when(r < 0)
            def _():
                plgpu.barrier_arrive(bar.at[slot])

            return carry

        lax.fori_loop(0, lanes, lane, 0)
        plgpu.copy_gmem_to_smem(ids_ref.at[tile, pl.ds(l, 1)], ibuf.at[slot], bar.at[slot])
        if weighted:
            plgpu.copy_gmem_to_smem(w_ref.at[tile, pl.ds(l, 1)], wbuf.at[slot], bar.at[slot])

    issue(0, 0)

    def step(l, acc):
        slot = lax.rem(l, nslot)

        @pl.when(l + 1 < length)
        def _():
            issue(l + 1, lax.rem(l + 1, nslot))

        plgpu.barrier_wait(bar.at[slot])
        got = ops.load(buf.at[slot], R.WGMMA).astype(jnp.float32)
        valid = ops.load(ibuf.at[slot, 0], R.ROW) >= 0
        if weighted:
            got = got * R.per_row(ops.load(wbuf.at[slot, 0], R.ROW), blk)
        return acc + jnp.where(R.per_row(valid, blk), got, 0.0)

    acc = lax.fori_loop(0, length, step, ops.zeros(blk))
    obuf[...] = acc.astype(obuf.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(obuf, out_ref.at[pl.ds(tile * lanes, lanes), pl.ds(col * blk, blk)])
    plgpu.wait_smem_to_gmem(0)


def pooled_gather(table: jax.Array, ids: jax.Array, weights: jax.Array | None, *, interpret=False):
    """Weighted sum of each bag's rows (canonical inputs).

    Args:
      table: f[R, D] (f32 or bf16).
      ids: i32[N, L], each -1 (skipped) or in [0, R).
      weights: f32[N, L] or None (every valid id weighs 1).
      interpret: False (compile), True or an `InterpretGPUParams`.

    Returns:
      table.dtype[N, D], accumulated in f32.
    """
    n, length = ids.shape
    num_rows, dim = table.shape
    if n == 0 or length == 0 or num_rows == 0 or dim == 0:  # (no rows: every id is -1)
        return jnp.zeros((n, dim), table.dtype)
    tiles = R.num_tiles(n)
    params = R.interpret_params(interpret)
    # Compiled: narrower column blocks when there are few bag tiles (fill the
    # SMs). Interpreted: the widest blocks (fewer simulated programs).
    plan = R.plan_rows(num_rows, dim, table.dtype, row_tiles=tiles,
                       min_programs=1 if params else tuning.MIN_PROGRAMS)
    lanes = tuning.LANES

    def lanes_last(x, fill):  # [N, L] -> [tiles, L, 64]: a position's 64 ids are contiguous
        x = R.pad_rows(x, tiles * lanes, fill)
        return x.reshape(tiles, lanes, length).transpose(0, 2, 1)

    operands = [*plan.operands(table), lanes_last(ids.astype(jnp.int32), -1)]
    scratch = [
        plgpu.SMEM((tuning.NUM_SLOTS, lanes, plan.block), table.dtype),
        plgpu.SMEM((tuning.NUM_SLOTS, 1, lanes), jnp.int32),
    ]
    weighted = weights is not None
    if weighted:
        operands.append(lanes_last(weights.astype(jnp.float32), 0.0))
        scratch.append(plgpu.SMEM((tuning.NUM_SLOTS, 1, lanes), jnp.float32))
    scratch += [
        plgpu.Barrier(num_arrivals=lanes + 1 + weighted, num_barriers=tuning.NUM_SLOTS),
        plgpu.SMEM((lanes, plan.block), table.dtype),
    ]
    kernel = plgpu.kernel(
        functools.partial(pooled_gather_kernel, plan=plan, length=length, weighted=weighted,
                          ops=R.Ops(params)),
        out_type=jax.ShapeDtypeStruct((tiles * lanes, plan.width), table.dtype),
        scratch_types=scratch,
        grid=(tiles, plan.num_blocks),
        grid_names=("bags", "cols"),
        interpret=params,
    )
    out = kernel(*operands)
    return out[:n, :dim]


__all__ = ["pooled_gather", "pooled_gather_kernel"]
