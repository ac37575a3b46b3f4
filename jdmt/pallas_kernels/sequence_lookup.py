"""Sequence embedding lookup: the rows of each position, not pooled.

    out[n, s] = table[ids[n, s]]   where valid, else 0

A position is valid when `s < lengths[n]` (if given) and `0 <= id < rows`.
Differentiable like `pooled_lookup`: the backward pass de-duplicates the
per-position gradients by row (`row_gradients`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jdmt.pallas_kernels.common import (
    Impl,
    as_arrays,
    canonical_bags,
    check_bags,
    check_table,
    resolve,
    target_module,
)


def check_sequence(table, ids, lengths) -> None:
    """The one validator of `sequence_lookup` and its reference."""
    check_table(table)
    check_bags(ids, lengths, None)


def sequence_lookup_reference(table, ids, lengths=None):
    """XLA reference of `sequence_lookup`."""
    table, ids, lengths = as_arrays(table, ids, lengths)
    check_sequence(table, ids, lengths)
    cids, _ = canonical_bags(ids, lengths, None, table.shape[0])
    return sequence_gather_xla(table, cids)


def sequence_gather_xla(table, ids):
    """Canonical sequence gather in XLA: ids i32[N, S] (-1 = none) -> [N, S, D]."""
    safe = jnp.where(ids >= 0, ids, table.shape[0])
    return table.at[safe].get(mode="fill", fill_value=0)


def sequence_lookup(
    table: jax.Array,
    ids: jax.Array,
    lengths: jax.Array | None = None,
    *,
    kernel: str = "pallas",
    target: str | None = None,
    interpret: object = None,
) -> jax.Array:
    """Rows of every position of every sequence.

    Args:
      table: f[R, D].
      ids: i32[N, S] row ids; invalid positions give zero rows.
      lengths: i32[N] valid positions per sequence, or None (all S).
      kernel, target, interpret: the implementation (`common.resolve`).

    Returns:
      table.dtype[N, S, D].
    """
    table, ids, lengths = as_arrays(table, ids, lengths)
    check_sequence(table, ids, lengths)
    impl = resolve(kernel, target, interpret)
    cids, _ = canonical_bags(ids, lengths, None, table.shape[0])
    return _sequence(impl, table, cids)


def sequence_gather(impl: Impl, table, ids):
    """Canonical sequence gather with a resolved implementation (no autodiff)."""
    if not impl.pallas:
        return sequence_gather_xla(table, ids)
    return target_module(impl).sequence_gather(table, ids, interpret=impl.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sequence(impl, table, ids):
    return sequence_gather(impl, table, ids)


def _sequence_fwd(impl, table, ids):
    return sequence_gather(impl, table, ids), (table, ids)


def _sequence_bwd(impl, res, g):
    from jdmt.pallas_kernels.row_gradients import dense_table_gradient

    table, ids = res
    return dense_table_gradient(impl, table, ids, g.astype(jnp.float32), None), None


_sequence.defvjp(_sequence_fwd, _sequence_bwd)


__all__ = [
    "check_sequence",
    "sequence_gather",
    "sequence_gather_xla",
    "sequence_lookup",
    "sequence_lookup_reference",
]
