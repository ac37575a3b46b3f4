"""Fused sparse optimizer update on Mosaic GPU, in place.

Grid (row tiles, column blocks). A program owns 64 of the unique rows (one
per tile row) and one column block:

    copies:   table rows, their summed gradients (and, for Adagrad, their
              accumulator rows) -> SMEM, by TMA, all on one barrier;
              invalid rows (outside [0, R), padding) fetch nothing
    compute:  registers, f32, exactly the arithmetic of `row_update_xla`
    write:    the new rows -> SMEM -> one TMA store per valid row, into the
              table itself (and the Adagrad accumulator)

The table and accumulator are passed as GMEM refs (`jax.new_ref`), which
`pl.kernel` aliases to its outputs: donated, they are updated in place and
the cost depends only on the rows listed. (`plgpu.kernel` itself rejects
Ref arguments in this JAX: its custom_vmap wrapper; `pl.kernel` with a
`plgpu.Mesh` is the same kernel without that wrapper.) Row-wise Adagrad's
per-row accumulator is updated by one scalar store per row; its new value
`accum[r] + mean(g_r ** 2)` is a [U] vector formed in XLA beforehand.

A TMA store writes a whole row only when the row is a multiple of 16 bytes
(`rows.writable`: f32 D % 4 == 0, bf16 D % 8 == 0). For other dims the
kernel writes the new rows to a [U, D] output instead and XLA scatters them
into the table (still in place when donated, still independent of R).
Tables whose rows are not a multiple of 128 bytes are read and written
through their 1-D view, which the ref holds from the start (refs cannot be
reshaped inside a Mosaic GPU kernel).
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

KINDS = ("rowwise_adagrad", "adagrad", "sgd")


def row_update_kernel(*refs, kind: str, eps: float, tplan: R.RowPlan, gplan: R.RowPlan,
                      aplan: R.RowPlan | None, in_place: bool, num_updates: int, ops: R.Ops):
    """refs, in order: table operands (the table ref, or flat ref + tail),
    [accumulator operands (Adagrad)], rows i32[T * 64], grads operands,
    [new row accumulators f32[T * 64] and the accumulator ref (row-wise)],
    lr f32[1], [outputs (not in place)], scratch: table tile, grads tile,
    [accumulator tile], barrier."""
    lanes, blk = tuning.LANES, tplan.block
    rest = list(refs)

    def take(k):
        out = rest[:k]
        del rest[:k]
        return out

    tsrc = take(tplan.num_operands)
    asrc = take(aplan.num_operands) if kind == "adagrad" else None
    (rows_ref,) = take(1)
    gsrc = take(gplan.num_operands)
    rnew_ref, racc_ref = take(2) if kind == "rowwise_adagrad" else (None, None)
    (lr_ref,) = take(1)
    if in_place:
        tout = aout = None
    else:
        (tout,) = take(1)
        (aout,) = take(1) if kind == "adagrad" else (None,)
    tbuf, gbuf, *abuf, bar = rest
    abuf = abuf[0] if abuf else None
    tile = lax.axis_index("rows")
    col = lax.axis_index("cols")
    base = tile * lanes

    def valid_row(r):
        return (r >= 0) & (r < tplan.rows)

    # ---- copies in: every lane arrives once per operand --------------------------------------
    def lane_in(i, carry):
        r = rows_ref[base + i]
        ok = valid_row(r)

        @pl.when(ok)
        def _():
            tplan.fetch(tsrc, r, col, tbuf.at[i], bar)
            if abuf is not None:
                aplan.fetch(asrc, r, col, abuf.at[i], bar)

        @pl.when(jnp.logical_not(ok))
        def _():
            for _ in range(1 + (abuf is not None)):
                plgpu.barrier_arrive(bar)

        @pl.when(base + i < num_updates)
        def _():
            gplan.fetch(gsrc, base + i, col, gbuf.at[i], bar)

        @pl.when(base + i >= num_updates)
        def _():
            plgpu.barrier_arrive(bar)

        if racc_ref is not None and in_place:  # one scalar per row, written once (column block 0)
            @pl.when(ok & (col == 0))
            def _():
                racc_ref[r] = rnew_ref[base + i]

        return carry

    lax.fori_loop(0, lanes, lane_in, 0)
    plgpu.barrier_wait(bar)

    # ---- the update, as in row_update_xla ----------------------------------------------------
    lr = lr_ref[0]
    g = ops.load(gbuf, R.WGMMA).astype(jnp.float32)
    if kind == "rowwise_adagrad":
        new = ops.load(rnew_ref.at[pl.ds(base, lanes)], R.ROW)
        delta = -(lr * g) / (R.per_row(ops.sqrt(new, R.ROW), blk) + eps)
    elif kind == "adagrad":
        new = ops.load(abuf, R.WGMMA) + g * g
        abuf[...] = new
        delta = -(lr * g) / (ops.sqrt(new, R.WGMMA) + eps)
    else:
        delta = -(lr * g)
    dtype = tbuf.dtype
    w = ops.load(tbuf, R.WGMMA)
    tbuf[...] = (w.astype(jnp.float32) + delta.astype(dtype).astype(jnp.float32)).astype(dtype)
    plgpu.commit_smem()

    # ---- copies out --------------------------------------------------------------------------
    if not in_place:
        plgpu.copy_smem_to_gmem(tbuf, tout.at[pl.ds(base, lanes), pl.ds(col * blk, blk)])
        if aout is not None:
            plgpu.copy_smem_to_gmem(abuf, aout.at[pl.ds(base, lanes), pl.ds(col * blk, blk)])
        plgpu.wait_smem_to_gmem(0)
        return

    def lane_out(i, carry):
        r = rows_ref[base + i]

        @pl.when(valid_row(r))
        def _():
            store_row(tplan, tsrc[0], tbuf.at[i], r, col)
            if abuf is not None:
                store_row(aplan, asrc[0], abuf.at[i], r, col)

        return carry

    lax.fori_loop(0, lanes, lane_out, 0)
    plgpu.wait_smem_to_gmem(0)


def store_row(plan: R.RowPlan, dst_ref, row, r, col) -> None:
    """Write the first columns of `row` (SMEM, (block,)) as columns block
    `col` of row r of `dst_ref` ([R, D], or its 1-D view for flat plans)."""
    blk = plan.block
    if not plan.flat:
        plgpu.copy_smem_to_gmem(row, dst_ref.at[r, pl.ds(col * blk, blk)])
        return
    last = plan.num_blocks - 1
    for is_last, width in ((False, blk), (True, plan.dim - last * blk)):
        if plan.num_blocks == 1 and not is_last:
            continue

        @pl.when((col == last) if is_last else (col < last))
        def _():
            at = r * plan.dim + col * blk
            plgpu.copy_smem_to_gmem(row.at[pl.ds(0, width)], dst_ref.at[pl.ds(at, width)])


def row_update(table: jax.Array, accum: jax.Array | None, rows: jax.Array, grads: jax.Array,
               lr: jax.Array, row_mean_sq: jax.Array | None, *, kind: str, eps: float,
               interpret=False) -> tuple[jax.Array, jax.Array | None]:
    """Apply one optimizer step to the rows `rows` of `table` (and `accum`).

    Args:
      table: f[R, D]; donate it (and accum) for an in-place update.
      accum: f32[R] ("rowwise_adagrad"), f32[R, D] ("adagrad") or None ("sgd").
      rows: i32[U] unique rows; entries outside [0, R) are skipped.
      grads: f32[U, D] each row's summed gradient.
      lr: f32[] learning rate (may be traced).
      row_mean_sq: f32[U] or None: row-wise Adagrad's mean of g ** 2 over the
        row (default: over this table's columns).
      kind: "rowwise_adagrad", "adagrad" or "sgd".
      eps: the Adagrad epsilon (static).
      interpret: False (compile), True or an `InterpretGPUParams`.

    Returns:
      (table, accum) with the listed rows updated.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if rows.shape[0] == 0 or table.size == 0:
        return table, accum
    # jit: refs with a memory space exist only inside a jit (an eager call
    # copies the table; under the caller's jit with donation nothing does).
    return _row_update(table, accum, rows, grads, lr, row_mean_sq, kind=kind, eps=float(eps),
                       interpret=interpret)


@functools.partial(jax.jit, static_argnames=("kind", "eps", "interpret"))
def _row_update(table, accum, rows, grads, lr, row_mean_sq, *, kind, eps, interpret):
    num_updates = rows.shape[0]
    num_rows, dim = table.shape
    lanes = tuning.LANES
    tiles = R.num_tiles(num_updates)
    rows = R.pad_rows(rows.astype(jnp.int32), tiles * lanes, -1)
    grads = grads.astype(jnp.float32)
    lr = jnp.asarray(lr, jnp.float32).reshape(1)
    eps = float(eps)
    tplan = R.plan_rows(num_rows, dim, table.dtype)
    gplan = R.plan_like(tplan, num_updates, jnp.float32)
    aplan = R.plan_like(tplan, num_rows, jnp.float32) if kind == "adagrad" else None
    in_place = R.writable(dim, table.dtype) and (aplan is None or R.writable(dim, jnp.float32))
    valid = (rows[:num_updates] >= 0) & (rows[:num_updates] < num_rows)
    safe = jnp.where(valid, rows[:num_updates], num_rows)  # out of range: dropped, as in XLA

    rnew = None
    if kind == "rowwise_adagrad":
        msq = jnp.mean(grads * grads, axis=-1) if row_mean_sq is None else row_mean_sq.astype(jnp.float32)
        rnew = accum.at[safe].get(mode="fill", fill_value=0) + msq

    def state(plan, x):  # (operands, ref or None): the ref holds x (as the plan views it)
        if not in_place:
            return list(plan.operands(x)), None
        view = x.reshape(-1) if plan.flat else x
        ref = jax.new_ref(view, memory_space=plgpu.GMEM)
        return [ref, plan.tail(view)] if plan.flat else [ref], ref

    t_ops, t_ref = state(tplan, table)
    operands = list(t_ops)
    a_ref = None
    if kind == "adagrad":
        a_ops, a_ref = state(aplan, accum)
        operands += a_ops
    operands += [rows, *gplan.operands(grads)]
    r_ref = None
    if kind == "rowwise_adagrad":
        operands.append(R.pad_rows(rnew.astype(jnp.float32), tiles * lanes, 0.0))
        if in_place:
            r_ref = jax.new_ref(accum, memory_space=plgpu.GMEM)
            operands.append(r_ref)
        else:
            operands.append(jnp.zeros((1,), jnp.float32))  # unused placeholder: same refs in the body
    operands.append(lr)

    out_type = ()
    if not in_place:
        out_type = [jax.ShapeDtypeStruct((tiles * lanes, tplan.width), table.dtype)]
        if kind == "adagrad":
            out_type.append(jax.ShapeDtypeStruct((tiles * lanes, tplan.width), jnp.float32))
        out_type = tuple(out_type)
    scratch = [
        plgpu.SMEM((lanes, tplan.block), table.dtype),
        plgpu.SMEM((lanes, tplan.block), jnp.float32),
    ]
    if kind == "adagrad":
        scratch.append(plgpu.SMEM((lanes, tplan.block), jnp.float32))
    scratch.append(plgpu.Barrier(num_arrivals=lanes * (2 + (kind == "adagrad"))))

    params = R.interpret_params(interpret)
    body = functools.partial(row_update_kernel, kind=kind, eps=eps, tplan=tplan, gplan=gplan,
                             aplan=aplan, in_place=in_place, num_updates=num_updates,
                             ops=R.Ops(params))

    def with_scratch(*refs):
        pl.run_scoped(functools.partial(body, *refs), *scratch)

    kernel = pl.kernel(with_scratch, out_type=out_type,
                       mesh=plgpu.Mesh(grid=(tiles, tplan.num_blocks), grid_names=("rows", "cols")),
                       compiler_params=plgpu.CompilerParams(), interpret=params, name="row_update")
    outs = kernel(*operands)

    if in_place:
        table = t_ref[...].reshape(num_rows, dim)
        if kind == "adagrad":
            accum = a_ref[...].reshape(num_rows, dim)
        elif kind == "rowwise_adagrad":
            accum = r_ref[...]
        return table, accum
    new_rows = outs[0][:num_updates, :dim]
    table = table.at[safe].set(new_rows, mode="drop")
    if kind == "adagrad":
        accum = accum.at[safe].set(outs[1][:num_updates, :dim], mode="drop")
    elif kind == "rowwise_adagrad":
        accum = accum.at[safe].set(rnew.astype(accum.dtype), mode="drop")
    return table, accum


__all__ = ["KINDS", "row_update", "row_update_kernel", "store_row"]
