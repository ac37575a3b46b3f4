"""Fused sparse optimizer step on TPU, in place: only the listed rows move.

    rowwise_adagrad: m_r += mean(g ** 2);  w_r -= lr * g / (sqrt(m_r) + eps)
    adagrad:         m_r += g ** 2;        w_r -= lr * g / (sqrt(m_r) + eps)
    sgd:             w_r -= lr * g

The table and the accumulator are kernel outputs aliased to their inputs
(`input_output_aliases`) and stay in HBM (`pl.ANY`): each listed row is read
by DMA into a VMEM slot, updated, and written back by DMA from a second
slot ring, so the cost depends on the rows listed, never on the table's
size (donate the buffers, or XLA copies them to honour the aliasing).

Grid: one program per block of `Bu` rows ("parallel": the rows are unique,
so no two programs touch the same row). The rows (and `row_mean_sq`) come
as `[1, Bu]` SMEM blocks, the gradients as an f32 `[Bu, D]` VMEM block, and
the learning rate as a scalar-prefetch operand. Within a program,
`pipeline.ring` reads ~`depth` rows ahead; a write-back slot is reused only
after its previous write has been waited for, and the program waits for its
last writes before it ends. Rows outside [0, R) (the sentinel R) issue no
DMA at all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jdmt.pallas_kernels.tpu import tuning
from jdmt.pallas_kernels.tpu.pipeline import ring

KINDS = ("rowwise_adagrad", "adagrad", "sgd")


def row_update_kernel(
    lr_ref,
    rows_ref,
    *refs,
    kind: str,
    eps: float,
    num_rows: int,
    block: int,
    depth: int,
    given_msq: bool,
):
    """lr_ref: SMEM f32[1]; rows_ref: SMEM i32[1, Bu]; [msq_ref: SMEM f32[1, Bu]];
    g_ref: VMEM f32[Bu, D]; table (and accum) HBM, input then aliased output;
    scratch: table read / write slots [depth, 1, D] and their DMA sems,
    then the same for the accumulator (f32 [depth, 1, D] for adagrad,
    [depth, 1] for rowwise_adagrad)."""
    refs = list(refs)
    msq_ref = refs.pop(0) if given_msq else None
    g_ref = refs.pop(0)
    has_accum = kind != "sgd"
    refs.pop(0)  # the table input: aliased to the output below
    if has_accum:
        refs.pop(0)
    table_ref = refs.pop(0)
    accum_ref = refs.pop(0) if has_accum else None
    t_in, t_out, t_rsem, t_wsem = refs[:4]
    a_in, a_out, a_rsem, a_wsem = refs[4:8] if has_accum else (None,) * 4

    i = pl.program_id(0)
    count = jnp.minimum(block, num_rows - i * block)
    size = table_ref.shape[0]
    lr = lr_ref[0]

    def row_of(t):
        r = rows_ref[0, t]
        return r, (r >= 0) & (r < size)

    def reads(r, slot):
        cps = [pltpu.make_async_copy(table_ref.at[pl.ds(r, 1)], t_in.at[slot], t_rsem.at[slot])]
        if has_accum:
            cps.append(pltpu.make_async_copy(accum_ref.at[pl.ds(r, 1)], a_in.at[slot], a_rsem.at[slot]))
        return cps

    def writes(r, slot):
        cps = [pltpu.make_async_copy(t_out.at[slot], table_ref.at[pl.ds(r, 1)], t_wsem.at[slot])]
        if has_accum:
            cps.append(pltpu.make_async_copy(a_out.at[slot], accum_ref.at[pl.ds(r, 1)], a_wsem.at[slot]))
        return cps

    def start(t, slot, carry):
        r, ok = row_of(t)

        @pl.when(ok)
        def _():
            for c in reads(r, slot):
                c.start()

        return carry

    def finish(t, slot):
        # the write slot was last used by element t - depth: wait for that write
        @pl.when(t >= depth)
        def _():
            r_old, ok_old = row_of(t - depth)

            @pl.when(ok_old)
            def _():
                for c in writes(r_old, slot):
                    c.wait()

        r, ok = row_of(t)

        @pl.when(ok)
        def _():
            for c in reads(r, slot):
                c.wait()
            g = g_ref[pl.ds(t, 1), :]  # f32 (1, D)
            w = t_in[slot]  # (1, D)
            if kind == "rowwise_adagrad":
                m = a_in[pl.ds(slot, 1), :]  # (1, 1)
                if given_msq:
                    msq = msq_ref[0, t]
                else:
                    msq = jnp.mean(g * g, axis=1, keepdims=True)
                m = m + msq
                a_out[pl.ds(slot, 1), :] = m
                delta = -(lr * g) / (jnp.sqrt(m) + jnp.float32(eps))
            elif kind == "adagrad":
                m = a_in[slot] + g * g
                a_out[slot] = m
                delta = -(lr * g) / (jnp.sqrt(m) + jnp.float32(eps))
            else:
                delta = -(lr * g)
            # as the reference: the step is rounded to the table's dtype, then added
            step = delta.astype(w.dtype).astype(jnp.float32)
            t_out[slot] = (w.astype(jnp.float32) + step).astype(w.dtype)
            for c in writes(r, slot):
                c.start()

    ring(count, depth, start, finish)

    # drain: the last `depth` elements' writes have not been waited for
    def drain(t, carry):
        r, ok = row_of(t)

        @pl.when(ok)
        def _():
            for c in writes(r, jax.lax.rem(t, depth)):
                c.wait()

        return carry

    jax.lax.fori_loop(jnp.maximum(count - depth, 0), count, drain, 0)


@functools.partial(jax.jit, static_argnames=("kind", "eps", "interpret"))
def row_update(table, accum, rows, grads, lr, row_mean_sq=None, *, kind, eps, interpret=False):
    """One optimizer step on the rows `rows`, in place.

    Args:
      table: f[R, D], aliased to the first output.
      accum: f32[R] (rowwise_adagrad), f32[R, D] (adagrad) or None (sgd),
        aliased to the second output.
      rows: i32[U] unique rows; entries outside [0, R) are skipped.
      grads: f[U, D] each row's gradient (used in f32).
      lr: f32[] learning rate (traced; passed through SMEM).
      row_mean_sq: f32[U] or None: rowwise_adagrad's mean of g ** 2 per row
        (default: over this table's D columns).
      kind: "rowwise_adagrad", "adagrad" or "sgd".
      eps: the Adagrad epsilon (static).
      interpret: False (compile with Mosaic), True, or `pltpu.InterpretParams`.

    Returns:
      (table, accum), the listed rows updated.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    has_accum = kind != "sgd"
    given_msq = kind == "rowwise_adagrad" and row_mean_sq is not None
    r, d = table.shape
    u = rows.shape[0]
    if u == 0:
        return table, accum
    bu = tuning.row_block(u, d)
    nb = tuning.cdiv(u, bu)
    depth = tuning.ring_depth(d)

    def smem_row(x, dtype, fill):
        x = jnp.pad(x.astype(dtype), (0, nb * bu - u), constant_values=fill)
        return x.reshape(1, nb * bu)

    row_spec = pl.BlockSpec((1, bu), lambda i, lr: (0, i), memory_space=pltpu.SMEM)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = [row_spec]
    operands = [smem_row(rows, jnp.int32, r)]
    if given_msq:
        in_specs.append(row_spec)
        operands.append(smem_row(row_mean_sq, jnp.float32, 0))
    in_specs.append(pl.BlockSpec((bu, d), lambda i, lr: (i, 0)))
    operands.append(grads.astype(jnp.float32))
    first_aliased = 1 + len(operands)  # scalar-prefetch operands count first
    in_specs.append(hbm)
    operands.append(table)
    out_shape = [jax.ShapeDtypeStruct(table.shape, table.dtype)]
    aliases = {first_aliased: 0}
    scratch = [
        pltpu.VMEM((depth, 1, d), table.dtype),
        pltpu.VMEM((depth, 1, d), table.dtype),
        pltpu.SemaphoreType.DMA((depth,)),
        pltpu.SemaphoreType.DMA((depth,)),
    ]
    if has_accum:
        in_specs.append(hbm)
        operands.append(accum)
        out_shape.append(jax.ShapeDtypeStruct(accum.shape, accum.dtype))
        aliases[first_aliased + 1] = 1
        slot = (depth, 1, d) if kind == "adagrad" else (depth, 1)
        scratch += [
            pltpu.VMEM(slot, accum.dtype),
            pltpu.VMEM(slot, accum.dtype),
            pltpu.SemaphoreType.DMA((depth,)),
            pltpu.SemaphoreType.DMA((depth,)),
        ]

    kernel = functools.partial(
        row_update_kernel, kind=kind, eps=float(eps), num_rows=u, block=bu, depth=depth, given_msq=given_msq
    )
    itemsize = jnp.dtype(table.dtype).itemsize
    accum_bytes = 0 if not has_accum else (d * 4 if kind == "adagrad" else 4)
    out = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(nb,),
            in_specs=in_specs,
            out_specs=tuple([hbm] * len(out_shape)),
            scratch_shapes=scratch,
        ),
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=pl.CostEstimate(
            flops=6 * u * d, transcendentals=u * d if kind == "adagrad" else u,
            bytes_accessed=u * (2 * d * itemsize + 2 * accum_bytes + 4 * d + 8),
        ),
        interpret=interpret,
    )(jnp.reshape(jnp.asarray(lr, jnp.float32), (1,)), *operands)
    return (out[0], out[1]) if has_accum else (out[0], None)
