"""Sequence gather on Mosaic GPU: out[n, s] = table[ids[n, s]] (0 for -1).

A pure DMA kernel: rows go GMEM -> SMEM (TMA, one copy per row) -> GMEM (one
TMA store per 64-row tile), never through registers. The N * S positions are
cut into 64-position tiles; grid (programs, column blocks), each program
streams `SEQUENCE_STEPS` consecutive tiles through two SMEM slots:

    step t:   wait until the store of tile t - 1 has read its slot,
              start the 64 row copies of tile t + 1 into that slot,
              wait for tile t's copies, start its store.

A -1 position copies from a one-row zero buffer (the output must hold zeros
there), never from the table.
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


def sequence_gather_kernel(*refs, plan: R.RowPlan, steps: int, num_tiles: int):
    """refs: table operands, ids i32[tiles * 64], zeros[width],
    out[tiles * 64, width]; scratch: rows (2, 64, B), barriers (2,)."""
    lanes, nslot, blk = tuning.LANES, tuning.NUM_SLOTS, plan.block
    srcs = refs[: plan.num_operands]
    ids_ref, zero_ref, out_ref, buf, bar = refs[plan.num_operands :]
    first = lax.axis_index("tiles") * steps
    col = lax.axis_index("cols")
    count = jnp.minimum(steps, num_tiles - first)

    def issue(t, slot):
        base = (first + t) * lanes

        def lane(b, carry):
            r = ids_ref[base + b]

            @pl.when(r >= 0)
            def _():
                plan.fetch(srcs, r, col, buf.at[slot, b], bar.at[slot])

            @pl.when(r < 0)
            def _():
                plgpu.copy_gmem_to_smem(zero_ref.at[pl.ds(col * blk, blk)], buf.at[slot, b], bar.at[slot])

            return carry

        lax.fori_loop(0, lanes, lane, 0)

    issue(0, 0)

    def step(t, carry):
        slot = lax.rem(t, nslot)

        @pl.when(t + 1 < count)
        def _():
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # tile t - 1's store has read its slot
            issue(t + 1, lax.rem(t + 1, nslot))

        plgpu.barrier_wait(bar.at[slot])
        dst = out_ref.at[pl.ds((first + t) * lanes, lanes), pl.ds(col * blk, blk)]
        plgpu.copy_smem_to_gmem(buf.at[slot], dst)
        return carry

    lax.fori_loop(0, count, step, 0)
    plgpu.wait_smem_to_gmem(0)


def sequence_gather(table: jax.Array, ids: jax.Array, *, interpret=False):
    """Rows of every position (canonical inputs).

    Args:
      table: f[R, D].
      ids: i32[N, S], each -1 (zero row) or in [0, R).
      interpret: False (compile), True or an `InterpretGPUParams`.

    Returns:
      table.dtype[N, S, D].
    """
    n, s = ids.shape
    num_rows, dim = table.shape
    if n * s == 0 or num_rows == 0 or dim == 0:
        return jnp.zeros((n, s, dim), table.dtype)
    plan = R.plan_rows(num_rows, dim, table.dtype)
    lanes = tuning.LANES
    tiles = R.num_tiles(n * s)
    steps = min(tuning.SEQUENCE_STEPS, tiles)
    programs = -(-tiles // steps)
    flat_ids = R.pad_rows(ids.astype(jnp.int32).reshape(-1), tiles * lanes, -1)
    zeros = jnp.zeros((plan.width,), table.dtype)
    params = R.interpret_params(interpret)
    kernel = plgpu.kernel(
        functools.partial(sequence_gather_kernel, plan=plan, steps=steps, num_tiles=tiles),
        out_type=jax.ShapeDtypeStruct((tiles * lanes, plan.width), table.dtype),
        scratch_types=[
            plgpu.SMEM((tuning.NUM_SLOTS, lanes, plan.block), table.dtype),
            plgpu.Barrier(num_arrivals=lanes, num_barriers=tuning.NUM_SLOTS),
        ],
        grid=(programs, plan.num_blocks),
        grid_names=("tiles", "cols"),
        interpret=params,
    )
    out = kernel(*plan.operands(table), flat_ids, zeros)
    return out[: n * s, :dim].reshape(n, s, dim)


__all__ = ["sequence_gather", "sequence_gather_kernel"]
