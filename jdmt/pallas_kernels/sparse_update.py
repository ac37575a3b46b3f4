"""Fused sparse optimizer update: write the touched rows (and their state) in place.

For each row r of `rows` inside the table (rows are unique; others, e.g.
the sentinel `R` that pads a de-duplicated list, are skipped), with its
summed gradient g_r:

- row-wise Adagrad (FBGEMM): m_r += mean(g_r ** 2); w_r -= lr * g_r / (sqrt(m_r) + eps)
- Adagrad: m_r += g_r ** 2 (element-wise); w_r -= lr * g_r / (sqrt(m_r) + eps)
- SGD: w_r -= lr * g_r

The Pallas kernels alias the table and the accumulator to their outputs
(`input_output_aliases`): with donated buffers the update touches only the
listed rows, and its cost does not depend on the table's size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jdmt import precision

from jdmt.pallas_kernels.common import Impl, as_arrays, check_table, resolve, target_module

KINDS = ("rowwise_adagrad", "adagrad", "sgd")


def _kind(kind) -> str:
    kind = getattr(kind, "value", kind)
    if kind not in KINDS:
        raise ValueError(f"optimizer kind must be one of {KINDS}, got {kind!r}")
    return kind


def check_update(table, accum, rows, grads, kind: str, row_mean_sq) -> None:
    """The one validator of `sparse_update` and its reference."""
    check_table(table)
    r, d = table.shape
    if rows.ndim != 1 or grads.shape != (rows.shape[0], d):
        raise ValueError(f"rows must be [U] and grads [U, {d}]; got {rows.shape}, {grads.shape}")
    want = {"rowwise_adagrad": (r,), "adagrad": (r, d), "sgd": None}[kind]
    got = None if accum is None else tuple(accum.shape)
    if got != want:
        raise ValueError(f"{kind} needs an accumulator of shape {want}, got {got}")
    if row_mean_sq is not None:
        if kind != "rowwise_adagrad":
            raise ValueError("row_mean_sq is for rowwise_adagrad only")
        if row_mean_sq.shape != rows.shape:
            raise ValueError(f"row_mean_sq must be [{rows.shape[0]}], got {row_mean_sq.shape}")


def sparse_update_reference(
    table, accum, rows, grads, lr, *, kind="rowwise_adagrad", eps=1e-8, row_mean_sq=None, seed=None
):
    """XLA reference of `sparse_update`."""
    table, accum, rows, grads, row_mean_sq = as_arrays(table, accum, rows, grads, row_mean_sq)
    kind = _kind(kind)
    check_update(table, accum, rows, grads, kind, row_mean_sq)
    return row_update_xla(table, accum, rows, grads, lr, row_mean_sq, kind=kind, eps=eps, seed=seed)


def row_update_xla(table, accum, rows, grads, lr, row_mean_sq, *, kind: str, eps: float, seed=None):
    """The update in XLA: gathers of the touched state, one scatter each.

    A 16-bit table (bf16 stored as uint16, f16 as int16:
    `precision.storage_dtype`) is updated in f32 and written back rounded
    stochastically with the bits `precision.sr_bits(seed, row, col)`
    (`seed`: u32, required then; `jdmt.precision`)."""
    r = table.shape[0]
    rows = jnp.where((rows >= 0) & (rows < r), rows, r)  # out of range: dropped
    grads = grads.astype(jnp.float32)
    lr = jnp.asarray(lr, jnp.float32)
    eps = jnp.float32(eps)
    if kind == "rowwise_adagrad":
        msq = jnp.mean(grads * grads, axis=-1) if row_mean_sq is None else row_mean_sq.astype(jnp.float32)
        new = accum.at[rows].get(mode="fill", fill_value=0) + msq
        accum = accum.at[rows].set(new.astype(accum.dtype), mode="drop")
        delta = -(lr * grads) / (jnp.sqrt(new)[:, None] + eps)
    elif kind == "adagrad":
        new = accum.at[rows].get(mode="fill", fill_value=0) + grads * grads
        accum = accum.at[rows].set(new.astype(accum.dtype), mode="drop")
        delta = -(lr * grads) / (jnp.sqrt(new) + eps)
    else:
        delta = -(lr * grads)
    if precision.is_stored_half(table.dtype):
        if seed is None:
            raise TypeError("a 16-bit table's update needs `seed` (the stochastic rounding's bits)")
        # (stored as integers: `precision.storage_dtype`; gathers and scatters in place)
        old = precision.widen(table.at[rows].get(mode="fill", fill_value=0))
        # the add stays a separate add (as the f32 scatter-add and the C++
        # kernel do it): no fused multiply-add across the barrier
        new = old + lax.optimization_barrier(delta)
        bits = precision.sr_bits(seed, rows[:, None], jnp.arange(table.shape[1], dtype=jnp.int32)[None, :])
        return table.at[rows].set(precision.round_stored(new, table.dtype, bits), mode="drop"), accum
    return table.at[rows].add(delta.astype(table.dtype), mode="drop"), accum


def sparse_update(
    table: jax.Array,
    accum: jax.Array | None,
    rows: jax.Array,
    grads: jax.Array,
    lr: jax.Array | float,
    *,
    kind: str = "rowwise_adagrad",
    eps: float = 1e-8,
    row_mean_sq: jax.Array | None = None,
    kernel: str = "pallas",
    target: str | None = None,
    interpret: object = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Apply one optimizer step to the rows `rows` of `table`, in place.

    Args:
      table: f[R, D] (donate it for an in-place update).
      accum: f32[R] (row-wise Adagrad), f32[R, D] (Adagrad) or None (SGD).
      rows: i32[U] unique rows; entries outside [0, R) are skipped.
      grads: f[U, D] each row's summed gradient.
      lr: learning rate (scalar, may be traced).
      kind: "rowwise_adagrad", "adagrad" or "sgd" (or an `OptimizerKind`).
      eps: the Adagrad epsilon.
      row_mean_sq: f32[U] mean of g ** 2 over each row's full width, for
        row-wise Adagrad on a column shard; default: over this table's columns.
      kernel, target, interpret: the implementation (`common.resolve`).

    Returns:
      (table, accum) with the touched rows updated.
    """
    table, accum, rows, grads, row_mean_sq = as_arrays(table, accum, rows, grads, row_mean_sq)
    kind = _kind(kind)
    check_update(table, accum, rows, grads, kind, row_mean_sq)
    return run_update(resolve(kernel, target, interpret), table, accum, rows, grads, lr,
                      row_mean_sq, kind=kind, eps=eps)


def run_update(impl: Impl, table, accum, rows, grads, lr, row_mean_sq, *, kind: str, eps: float, seed=None):
    """`sparse_update` with a resolved implementation (inputs already checked)."""
    kind = _kind(kind)
    if not impl.pallas:
        return row_update_xla(table, accum, rows, grads, lr, row_mean_sq, kind=kind, eps=eps, seed=seed)
    if precision.is_stored_half(table.dtype):
        raise ValueError("the Pallas row-update kernels take f32 (or bf16 / f16 typed) tables, not "
                         "16-bit tables stored as bits (`--table-dtype`): those run on the XLA and C++ paths")
    return target_module(impl).row_update(
        table, accum, rows.astype(jnp.int32), grads, jnp.asarray(lr, jnp.float32), row_mean_sq,
        kind=kind, eps=float(eps), interpret=impl.interpret)


__all__ = ["KINDS", "check_update", "row_update_xla", "run_update", "sparse_update", "sparse_update_reference"]
