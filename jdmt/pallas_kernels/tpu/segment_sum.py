"""Segment sum on TPU: out[u] = sum_{j in [begin[u], end[u])} scale[j] * grads[src[j]].

The de-duplicated backward of the lookups. Grid: one program per block of
`Bu` output rows ("parallel": runs do not overlap, so each output row is
written by exactly one program, and `grads` is only read).

- begin / end `[1, Bu]` blocks live in SMEM (BlockSpecs).
- src and scale stay in HBM, as `[n / 128, 128]` (padded; 2-D so that a
  window is whole rows of 128 lanes): a run can be arbitrarily long (a hot
  row may occur thousands of times), so the program copies a window of
  `tuning.WINDOW` (2048) of them into SMEM (8 KiB each) and moves the window
  when its cursor leaves it. Windows start at multiples of 128 and never
  pass the end of the padded arrays.
- grads stays in HBM; every occurrence's gradient row is copied by one DMA
  into a VMEM ring of `(1, D)` slots (`pipeline.ring`: ~`depth` DMAs in
  flight ahead of the row being added). A small SMEM ring records, per slot,
  which output row (and scale) the row belongs to.
- the `[Bu, D]` f32 output block is the accumulator (zeroed first).

The ring walks the program's rows in order; a row with an empty run takes
one no-op step, so the walk needs no search loops: its length is
`sum_u max(end[u] - begin[u], 1)`.
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

_ALIGN = 128  # window starts: a multiple of the lane tile


def segment_sum_kernel(
    begin_ref,
    end_ref,
    src_hbm,
    *refs,
    num_out: int,
    rows: int,
    window: int,
    depth: int,
    scaled: bool,
):
    """begin_ref, end_ref: SMEM i32[1, Bu]; src_hbm: HBM i32[n' / 128, 128];
    [scale_hbm: HBM f32[n' / 128, 128]]; grads_hbm: HBM f[G, D]; o_ref: VMEM
    f32[Bu, D]; scratch: slots [depth, 1, D], row sems DMA[depth], window
    sems DMA[2], src window SMEM i32[W / 128, 128], [scale window SMEM
    f32[W / 128, 128]], slot rows SMEM i32[2, depth], [slot scales SMEM
    f32[depth]]."""
    if scaled:
        scale_hbm, grads_hbm, o_ref, slots, sems, wsems, win_src, win_scale, meta, meta_scale = refs
    else:
        grads_hbm, o_ref, slots, sems, wsems, win_src, meta = refs
        scale_hbm = win_scale = meta_scale = None
    i = pl.program_id(0)
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)
    n_rows = jnp.minimum(rows, num_out - i * rows)
    src_rows = src_hbm.shape[0]
    win_rows = window // _ALIGN

    def run(u):
        return begin_ref[0, u], end_ref[0, u]

    def steps(u, total):
        b, e = run(u)
        return total + jnp.maximum(e - b, 1)

    count = lax.fori_loop(0, n_rows, steps, jnp.int32(0))

    def load_window(j):
        row = jnp.minimum(lax.div(j, _ALIGN), src_rows - win_rows)
        copies = [pltpu.make_async_copy(src_hbm.at[pl.ds(row, win_rows)], win_src, wsems.at[0])]
        if scaled:
            copies.append(pltpu.make_async_copy(scale_hbm.at[pl.ds(row, win_rows)], win_scale, wsems.at[1]))
        for c in copies:
            c.start()
        for c in copies:
            c.wait()
        return row * _ALIGN

    def at(win, j, base):
        k = j - base
        return win[lax.div(k, _ALIGN), lax.rem(k, _ALIGN)]

    def row_copy(src_row, slot):
        return pltpu.make_async_copy(grads_hbm.at[pl.ds(src_row, 1)], slots.at[slot], sems.at[slot])

    def start(t, slot, cursor):
        u, j, base = cursor
        b, e = run(u)
        live = j < e

        def issue(base):
            base = lax.cond(
                (j < base) | (j >= base + window), load_window, lambda _: base, j)
            src_row = at(win_src, j, base)
            meta[0, slot] = u
            meta[1, slot] = src_row
            if scaled:
                meta_scale[slot] = at(win_scale, j, base)
            row_copy(src_row, slot).start()
            return base

        def skip(base):
            meta[0, slot] = -1
            return base

        base = lax.cond(live, issue, skip, base)
        # advance: next occurrence of this run, else the next row's run
        done = j + 1 >= jnp.maximum(e, b + 1)
        nxt = jnp.minimum(u + 1, rows - 1)
        return (
            jnp.where(done, u + 1, u),
            jnp.where(done, begin_ref[0, nxt], j + 1),
            base,
        )

    def finish(t, slot):
        u = meta[0, slot]

        @pl.when(u >= 0)
        def _():
            row_copy(meta[1, slot], slot).wait()
            x = slots[slot].astype(jnp.float32)  # (1, D)
            if scaled:
                x = x * meta_scale[slot]
            o_ref[pl.ds(u, 1), :] += x

    # the window starts "nowhere": the first live occurrence loads it
    cursor = (jnp.int32(0), begin_ref[0, 0], jnp.int32(-2 * window))
    ring(count, depth, start, finish, cursor)


@functools.partial(jax.jit, static_argnames=("interpret",))
def segment_sum(grads, src, begin, end, scale=None, *, interpret=False):
    """Sum runs of gathered gradient rows.

    Args:
      grads: f[G, D] gradient rows, left in HBM.
      src: i32[n] source row in [0, G) of each occurrence.
      begin, end: i32[U] the occurrences [begin[u], end[u]) of output row u:
        runs do not overlap; empty where end <= begin; values in [0, n].
      scale: f32[n] per occurrence, or None (1).
      interpret: False (compile with Mosaic), True, or `pltpu.InterpretParams`.

    Returns:
      f32[U, D].
    """
    d = grads.shape[1]
    n, u = src.shape[0], begin.shape[0]
    if u == 0 or n == 0:
        return jnp.zeros((u, d), jnp.float32)
    bu = tuning.row_block(u, d)
    nb = tuning.cdiv(u, bu)
    # the run bounds are tiny: pad them to whole blocks with empty runs
    bounds = [jnp.pad(x.astype(jnp.int32), (0, nb * bu - u)).reshape(1, nb * bu) for x in (begin, end)]
    # src / scale: pad so that a window always fits and starts aligned
    window = min(tuning.WINDOW, tuning.round_up(n, _ALIGN))
    n_pad = tuning.round_up(max(n, window), _ALIGN)
    src = jnp.pad(src.astype(jnp.int32), (0, n_pad - n)).reshape(n_pad // _ALIGN, _ALIGN)
    scaled = scale is not None
    depth = tuning.ring_depth(d)

    row_spec = pl.BlockSpec((1, bu), lambda i: (0, i), memory_space=pltpu.SMEM)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = [row_spec, row_spec, hbm]
    operands = [*bounds, src]
    scratch = [
        pltpu.VMEM((depth, 1, d), grads.dtype),
        pltpu.SemaphoreType.DMA((depth,)),
        pltpu.SemaphoreType.DMA((2,)),
        pltpu.SMEM((window // _ALIGN, _ALIGN), jnp.int32),
    ]
    if scaled:
        in_specs.append(hbm)
        operands.append(jnp.pad(scale.astype(jnp.float32), (0, n_pad - n)).reshape(n_pad // _ALIGN, _ALIGN))
        scratch.append(pltpu.SMEM((window // _ALIGN, _ALIGN), jnp.float32))
    scratch.append(pltpu.SMEM((2, depth), jnp.int32))
    if scaled:
        scratch.append(pltpu.SMEM((depth,), jnp.float32))
    in_specs.append(hbm)
    operands.append(grads)

    kernel = functools.partial(
        segment_sum_kernel, num_out=u, rows=bu, window=window, depth=depth, scaled=scaled
    )
    itemsize = jnp.dtype(grads.dtype).itemsize
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((u, d), jnp.float32),
        grid_spec=pl.GridSpec(
            grid=(nb,),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bu, d), lambda i: (i, 0)),
            scratch_shapes=scratch,
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=pl.CostEstimate(
            flops=2 * n * d, transcendentals=0, bytes_accessed=n * (d * itemsize + 8) + u * d * 4
        ),
        interpret=interpret,
    )(*operands)
