"""Sequence gather on TPU: out[n, s] = table[ids[n, s]], 0 for id -1.

A pure copy, so rows never visit VMEM: each position is one HBM -> HBM DMA
from its table row straight to its output row (the output is a `pl.ANY`
buffer the kernel fills by DMA). A position with id -1 is filled by a DMA
from a zero row kept in VMEM.

Grid: one program per 8192 positions (`tuning.SEQ_ID_ROWS` rows of 128
ids). The ids are flattened to `[M / 128, 128]` and blocked into SMEM by a
BlockSpec (32 KiB per buffer), never all at once. Within a program,
`pipeline.ring` keeps ~`depth` row DMAs in flight (the next ones are issued
before the current one is waited for). Programs write disjoint output rows
and only read the table: "parallel".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jdmt.pallas_kernels.tpu import tuning
from jdmt.pallas_kernels.tpu.pipeline import ring


def sequence_gather_kernel(
    ids_ref, table_ref, o_ref, zero_ref, sems, *, num_positions: int, seq_len: int, block: int, depth: int
):
    """ids_ref: SMEM i32[block / 128, 128]; table_ref: HBM f[R, D]; o_ref: HBM
    [N, S, D]; zero_ref: VMEM [1, D]; sems: DMA[depth]."""
    i = pl.program_id(0)
    zero_ref[...] = jnp.zeros(zero_ref.shape, zero_ref.dtype)
    first = i * block
    count = jnp.minimum(block, num_positions - first)
    lanes = ids_ref.shape[1]

    def copy(t, slot):
        row = ids_ref[lax.div(t, lanes), lax.rem(t, lanes)]
        p = first + t
        dst = o_ref.at[lax.div(p, seq_len), pl.ds(lax.rem(p, seq_len), 1)]
        from_table = pltpu.make_async_copy(table_ref.at[pl.ds(jnp.maximum(row, 0), 1)], dst, sems.at[slot])
        from_zero = pltpu.make_async_copy(zero_ref, dst, sems.at[slot])
        return row >= 0, from_table, from_zero

    def start(t, slot, carry):
        valid, from_table, from_zero = copy(t, slot)
        pl.when(valid)(from_table.start)
        pl.when(jnp.logical_not(valid))(from_zero.start)
        return carry

    def finish(t, slot):
        valid, from_table, from_zero = copy(t, slot)
        pl.when(valid)(from_table.wait)
        pl.when(jnp.logical_not(valid))(from_zero.wait)

    ring(count, depth, start, finish)


@functools.partial(jax.jit, static_argnames=("interpret",))
def sequence_gather(table, ids, *, interpret=False):
    """Rows of every position.

    Args:
      table: f[R, D], left in HBM.
      ids: i32[N, S] canonical: -1 (zero row) or in [0, R).
      interpret: False (compile with Mosaic), True, or `pltpu.InterpretParams`.

    Returns:
      table.dtype[N, S, D].
    """
    n, s = ids.shape
    d = table.shape[1]
    m = n * s
    if m == 0:
        return jnp.zeros((n, s, d), table.dtype)
    lanes = tuning.LANES
    rows = tuning.cdiv(m, lanes)
    br = rows if rows <= tuning.SEQ_ID_ROWS else tuning.SEQ_ID_ROWS
    nb = tuning.cdiv(rows, br)
    flat = jnp.pad(ids.astype(jnp.int32).reshape(m), (0, nb * br * lanes - m), constant_values=-1)
    depth = tuning.ring_depth(d)
    kernel = functools.partial(
        sequence_gather_kernel, num_positions=m, seq_len=s, block=br * lanes, depth=depth
    )
    itemsize = jnp.dtype(table.dtype).itemsize
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, s, d), table.dtype),
        grid_spec=pl.GridSpec(
            grid=(nb,),
            in_specs=[
                pl.BlockSpec((br, lanes), lambda i: (i, 0), memory_space=pltpu.SMEM),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=pl.BlockSpec(memory_space=pl.ANY),
            scratch_shapes=[pltpu.VMEM((1, d), table.dtype), pltpu.SemaphoreType.DMA((depth,))],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=pl.CostEstimate(flops=0, transcendentals=0, bytes_accessed=m * (2 * d * itemsize + 4)),
        interpret=interpret,
    )(flat.reshape(nb * br, lanes), table)
