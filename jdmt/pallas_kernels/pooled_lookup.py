"""Pooled embedding lookup: the weighted sum (or mean) of each bag's rows.

    out[n] = sum_l w[n, l] * table[ids[n, l]]     over the valid positions l

A position is valid when `l < lengths[n]` (if lengths are given) and
`0 <= ids[n, l] < rows`; "mean" divides by the bag's valid count (an empty
bag gives zeros). `pooled_lookup` is differentiable (`jax.custom_vjp`): the
backward pass is the de-duplicating row-gradient kernel (`row_gradients`),
and the weights' gradient is `<g[n], table[ids[n, l]]>`.

Differentiating with respect to the *table* materialises a table-sized
gradient (the row gradients scattered into zeros): that is for tests and
small tables. Training never does it: it differentiates with respect to the
lookup's outputs and hands the row gradients to `sparse_update`
(`jdmt.embeddings.optimizers.sparse_step`).
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
    check_combiner,
    check_table,
    resolve,
    target_module,
)


def check_pooled(table, ids, lengths, weights, combiner) -> None:
    """The one validator of `pooled_lookup` and its reference."""
    check_table(table)
    check_bags(ids, lengths, weights)
    check_combiner(combiner)


def pooled_lookup_reference(table, ids, lengths=None, weights=None, *, combiner="sum"):
    """XLA reference of `pooled_lookup` (same signature, no kernel choice)."""
    table, ids, lengths, weights = as_arrays(table, ids, lengths, weights)
    check_pooled(table, ids, lengths, weights, combiner)
    cids, w = canonical_bags(ids, lengths, weights, table.shape[0], combiner)
    return pooled_gather_xla(table, cids, w)


def pooled_gather_xla(table, ids, weights):
    """Canonical pooled gather in XLA: ids i32[N, L] (-1 = none), weights
    f32[N, L] or None -> table.dtype[N, D]. One masked gather per position,
    accumulated in f32: nothing of size [N, L, D] is formed."""
    out = jnp.zeros((ids.shape[0], table.shape[1]), jnp.float32)
    for pos, row in enumerate(_position_rows(table, ids)):
        out = out + (row if weights is None else row * weights[:, pos : pos + 1])
    return out.astype(table.dtype)


def _position_rows(table, ids):
    """f32[N, D] per position of canonical ids i32[N, L]: the rows, 0 where -1."""
    safe = jnp.where(ids >= 0, ids, table.shape[0])  # past the end: reads as 0
    for pos in range(ids.shape[1]):
        yield table.at[safe[:, pos]].get(mode="fill", fill_value=0).astype(jnp.float32)


def pooled_lookup(
    table: jax.Array,
    ids: jax.Array,
    lengths: jax.Array | None = None,
    weights: jax.Array | None = None,
    *,
    combiner: str = "sum",
    kernel: str = "pallas",
    target: str | None = None,
    interpret: object = None,
) -> jax.Array:
    """Pooled lookup of bags of ids.

    Args:
      table: f[R, D] embedding table (or a device's fused buffer).
      ids: i32[N, L] row ids; positions past a bag's length, negative or
        >= R contribute nothing.
      lengths: i32[N] valid ids per bag, or None (all L positions).
      weights: f[N, L] per-id weights, or None (1).
      combiner: "sum" or "mean" (divide by the bag's valid count).
      kernel, target, interpret: the implementation (`common.resolve`):
        "pallas" (default) runs the target's kernel, "xla" the reference.

    Returns:
      table.dtype[N, D].
    """
    table, ids, lengths, weights = as_arrays(table, ids, lengths, weights)
    check_pooled(table, ids, lengths, weights, combiner)
    impl = resolve(kernel, target, interpret)
    cids, w = canonical_bags(ids, lengths, weights, table.shape[0], combiner)
    return _pooled(impl, table, cids, w)


def pooled_gather(impl: Impl, table, ids, weights):
    """Canonical pooled gather with a resolved implementation (no autodiff)."""
    if not impl.pallas:
        return pooled_gather_xla(table, ids, weights)
    return target_module(impl).pooled_gather(table, ids, weights, interpret=impl.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pooled(impl, table, ids, weights):
    return pooled_gather(impl, table, ids, weights)


def _pooled_fwd(impl, table, ids, weights):
    return pooled_gather(impl, table, ids, weights), (table, ids, weights)


def _pooled_bwd(impl, res, g):
    from jdmt.pallas_kernels.row_gradients import dense_table_gradient

    table, ids, weights = res
    g = g.astype(jnp.float32)
    d_table = dense_table_gradient(impl, table, ids, g, weights)
    d_weights = None
    if weights is not None:
        d_weights = weight_gradients_xla(table, ids, g).astype(weights.dtype)
    return d_table, None, d_weights


def weight_gradients_xla(table, ids, g):
    """d out[n] / d w[n, l] contracted with g: <table[ids[n, l]], g[n]>, f32[N, L]
    (0 where the id is -1). One gather of [N, D] per position, reduced at
    once: no [N, L, D] buffer. (XLA for every implementation: only weighted
    lookups that are differentiated need it.)"""
    return jnp.stack([jnp.sum(row * g, axis=1) for row in _position_rows(table, ids)], axis=1)


_pooled.defvjp(_pooled_fwd, _pooled_bwd)


__all__ = ["check_pooled", "pooled_gather", "pooled_gather_xla", "pooled_lookup", "pooled_lookup_reference"]
