"""Pooled gather on TPU: out[n] = sum_l w[n, l] * table[ids[n, l]].

Grid `(bag blocks, position blocks)`: program (i, j) owns bags
`[i * Bn, (i + 1) * Bn)` and positions `[j * Lb, (j + 1) * Lb)` of them.

- ids (and weights) `[Bn, Lb]` blocks live in SMEM (BlockSpec with
  `memory_space=SMEM`, so Pallas double-buffers them across programs); the
  bound on their size is `tuning.SMEM_BLOCK_WORDS` (64 KiB per buffer even
  if Mosaic pads lanes to 128 words): never the whole id array at once.
- the table stays in HBM (`pl.ANY`); each valid id's row is copied by one
  DMA into a VMEM ring of `(1, D)` slots (`pipeline.ring`: the DMAs of the
  next ~`depth` positions are in flight while the current row is added).
  id -1 issues no DMA and adds nothing.
- an f32 `[Bn, D]` VMEM accumulator collects the block's bags across the
  position blocks ("arbitrary" axis); it is cast to the table's dtype into
  the `[Bn, D]` output block on the last one. Bag blocks write disjoint
  outputs and only read the table, so that axis is "parallel".

VMEM row slots are `[depth, 1, D]`: a slot is selected on the leading
(untiled) dimension, so no dynamic index ever falls inside a packed bf16
tile; the f32 accumulator is indexed by row (one 32-bit sublane each).
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


def pooled_gather_kernel(
    ids_ref,
    *refs,
    num_bags: int,
    bags: int,
    positions: int,
    depth: int,
    weighted: bool,
):
    """ids_ref: SMEM i32[Bn, Lb]; [w_ref: SMEM f32[Bn, Lb]]; table_ref: HBM
    f[R, D]; o_ref: VMEM [Bn, D]; scratch: slots [depth, 1, D], acc f32[Bn, D],
    sems DMA[depth]."""
    if weighted:
        w_ref, table_ref, o_ref, slots, acc_ref, sems = refs
    else:
        w_ref = None
        table_ref, o_ref, slots, acc_ref, sems = refs
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    # bags past the end of the last block hold no ids: do not walk them
    valid_bags = jnp.minimum(bags, num_bags - i * bags)
    count = valid_bags * positions

    def copy(t, slot):
        bag, pos = lax.div(t, positions), lax.rem(t, positions)
        row = ids_ref[bag, pos]
        dma = pltpu.make_async_copy(table_ref.at[pl.ds(row, 1)], slots.at[slot], sems.at[slot])
        return bag, pos, row, dma

    def start(t, slot, carry):
        _, _, row, dma = copy(t, slot)

        @pl.when(row >= 0)
        def _():
            dma.start()

        return carry

    def finish(t, slot):
        bag, pos, row, dma = copy(t, slot)

        @pl.when(row >= 0)
        def _():
            dma.wait()
            x = slots[slot].astype(jnp.float32)  # (1, D)
            if weighted:
                x = x * w_ref[bag, pos]
            acc_ref[pl.ds(bag, 1), :] += x

    ring(count, depth, start, finish)

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def pooled_gather(table, ids, weights=None, *, interpret=False):
    """Weighted sum of each bag's rows.

    Args:
      table: f[R, D] (f32 or bf16), left in HBM.
      ids: i32[N, L] canonical: each entry -1 (skipped) or in [0, R).
      weights: f32[N, L] or None (every valid position weighs 1).
      interpret: False (compile with Mosaic), True, or `pltpu.InterpretParams`.

    Returns:
      table.dtype[N, D], accumulated in f32.
    """
    n, ln = ids.shape
    r, d = table.shape
    if n == 0 or ln == 0:
        return jnp.zeros((n, d), table.dtype)
    bn, lb = tuning.pool_blocks(n, ln)
    nb, nl = tuning.cdiv(n, bn), tuning.cdiv(ln, lb)
    # pad the (small) id arrays to whole blocks; padding ids are -1
    pad = ((0, nb * bn - n), (0, nl * lb - ln))
    ids = jnp.pad(ids.astype(jnp.int32), pad, constant_values=-1)
    depth = tuning.ring_depth(d)
    weighted = weights is not None

    smem_block = pl.BlockSpec((bn, lb), lambda i, j: (i, j), memory_space=pltpu.SMEM)
    in_specs = [smem_block]
    operands = [ids]
    if weighted:
        in_specs.append(smem_block)
        operands.append(jnp.pad(weights.astype(jnp.float32), pad))
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    operands.append(table)

    kernel = functools.partial(
        pooled_gather_kernel, num_bags=n, bags=bn, positions=lb, depth=depth, weighted=weighted
    )
    itemsize = jnp.dtype(table.dtype).itemsize
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, d), table.dtype),
        grid_spec=pl.GridSpec(
            grid=(nb, nl),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
            scratch_shapes=[
                pltpu.VMEM((depth, 1, d), table.dtype),
                pltpu.VMEM((bn, d), jnp.float32),
                pltpu.SemaphoreType.DMA((depth,)),
            ],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=2 * n * ln * d,
            transcendentals=0,
            bytes_accessed=n * ln * (d * itemsize + 8) + n * d * itemsize,
        ),
        interpret=interpret,
    )(*operands)
