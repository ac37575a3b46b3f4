"""Pooling of sequence features into one vector each, so the dense models can
treat them like pooled features.

A sequence feature arrives as `f32[B, S, D]` (one embedding per position,
zeros past the example's length) with its lengths `i32[B]`. Several of them,
stacked (`stack_sequences`), are `seq f32[B, Fs, S, D]` with `lengths
i32[B, Fs]`; `SequencePooling` reduces them to `f32[B, Fs, D]`. Positions at
or past the length never affect the result, whatever they hold.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["SEQUENCE_POOLING", "SequencePooling", "stack_sequences"]

SEQUENCE_POOLING = ("mean", "attention")
"""Sequence pooling modes `SequencePooling` (and the models) accept."""


def check_sequence_pooling(mode: str) -> None:
    """Raise a ValueError naming the choices if `mode` is not a pooling mode."""
    if mode not in SEQUENCE_POOLING:
        raise ValueError(
            f"unknown sequence pooling {mode!r}; available: {', '.join(SEQUENCE_POOLING)}"
        )


def stack_sequences(seqs: Sequence[jax.Array]) -> jax.Array:
    """Sequence features `f32[B, S_f, D]` -> one `f32[B, Fs, S, D]`, S = max S_f.

    Shorter sequences are padded with zeros past their own S_f, which their
    lengths (at most S_f) already mark as padding.
    """
    if not seqs:
        raise ValueError("stack_sequences needs at least one sequence feature")
    s = max(x.shape[1] for x in seqs)
    return jnp.stack([jnp.pad(x, ((0, 0), (0, s - x.shape[1]), (0, 0))) for x in seqs], axis=1)


class SequencePooling(nn.Module):
    """Pool each sequence feature over its valid positions.

    With `valid[b, f, s] = s < lengths[b, f]` and `n[b, f]` the number of
    valid positions:

    * `'mean'` (no parameters): `out[b, f] = sum_{s valid} seq[b, f, s] / n[b, f]`.
    * `'attention'` (target attention, as in DIN, with a dot-product score):
      a query per example and feature,
      `q[b, f] = c_f + query[b] @ W_f`  (parameters `query_bias` c:
      f32[Fs, D] and `query_kernel` W: f32[Fs, Dq, D]),
      scores `a[b, f, s] = <q[b, f], seq[b, f, s]> / sqrt(D)`, a softmax
      over the valid positions only,
      `w[b, f, s] = exp(a[b, f, s]) / sum_{t valid} exp(a[b, f, t])`, and
      `out[b, f] = sum_{s valid} w[b, f, s] seq[b, f, s]`. `c` and `W` start
      at zero, so attention starts as mean pooling and learns to weight
      the positions. The output is a convex combination of the sequence's
      own embeddings, so it lives where pooled embeddings do. Without a
      `query` the query is `c_f` alone.

    Either mode gives zeros (no NaN, finite gradients) for length 0, and is
    invariant to permutations of the valid positions.

    Attributes:
      mode: one of `SEQUENCE_POOLING`.
    """

    mode: str = "mean"

    def __post_init__(self):
        check_sequence_pooling(self.mode)
        super().__post_init__()

    @nn.compact
    def __call__(
        self, seq: jax.Array, lengths: jax.Array, query: jax.Array | None = None
    ) -> jax.Array:
        """seq f32[B, Fs, S, D], lengths i32[B, Fs] (query f32[B, Dq]) -> f32[B, Fs, D]."""
        if seq.ndim != 4 or lengths.shape != seq.shape[:2]:
            raise ValueError(
                "SequencePooling expects seq f32[B, Fs, S, D] and lengths i32[B, Fs]; got "
                f"{seq.shape} and {lengths.shape}"
            )
        _, fs, s, d = seq.shape
        valid = jnp.arange(s) < lengths[..., None]  # [B, Fs, S]
        seq = jnp.where(valid[..., None], seq, 0)
        if self.mode == "mean":
            n = jnp.maximum(valid.sum(-1), 1).astype(seq.dtype)
            return seq.sum(2) / n[..., None]

        q = self.param("query_bias", nn.initializers.zeros, (fs, d), seq.dtype)[None]  # [1, Fs, D]
        if query is not None:
            kernel = self.param(
                "query_kernel", nn.initializers.zeros, (fs, query.shape[-1], d), seq.dtype
            )
            q = q + jnp.einsum("bq,fqd->bfd", query.astype(seq.dtype), kernel)
        scores = jnp.einsum("bfd,bfsd->bfs", q, seq) / math.sqrt(d)
        # Masked softmax: padding gets weight 0, even where every position is padding.
        top = jax.lax.stop_gradient(jnp.max(jnp.where(valid, scores, -jnp.inf), -1, keepdims=True))
        e = jnp.where(valid, jnp.exp(jnp.where(valid, scores - top, 0)), 0)
        total = e.sum(-1, keepdims=True)
        w = e / jnp.where(total > 0, total, 1)
        return jnp.einsum("bfs,bfsd->bfd", w, seq)


def append_pooled_sequences(
    model: str,
    mode: str,
    x: jax.Array,
    embs: jax.Array,
    seq: jax.Array | None,
    seq_lengths: jax.Array | None,
) -> jax.Array:
    """The interaction inputs of a model: `embs`, then the pooled sequence features.

    Called inside a model's compact `__call__` (it adds a `SequencePooling`
    submodule named `sequence_pooling` when there are sequence features).

    Args:
      model: the model's name, for error messages.
      mode: the sequence pooling mode.
      x: f32[B, D] the bottom MLP's output (the attention query).
      embs: f32[B, F, D] pooled embeddings.
      seq, seq_lengths: f32[B, Fs, S, D] and i32[B, Fs], or both None.
    Returns:
      f32[B, F + Fs, D] in `x`'s dtype: `[e_1, ..., e_F, s_1, ..., s_Fs]`
      (just `embs` without sequence features).
    """
    if (seq is None) != (seq_lengths is None):
        raise ValueError(f"{model} needs both seq and seq_lengths, or neither")
    embs = embs.astype(x.dtype)
    if seq is None:
        return embs
    d = embs.shape[-1]
    if seq.ndim != 4 or seq.shape[-1] != d or seq_lengths.shape != seq.shape[:2]:
        raise ValueError(
            f"{model} expects sequence embeddings f32[B, Fs, S, {d}] and lengths i32[B, Fs]; "
            f"got {seq.shape} and {seq_lengths.shape}"
        )
    pooled = SequencePooling(mode, name="sequence_pooling")(seq.astype(x.dtype), seq_lengths, x)
    return jnp.concatenate([embs, pooled], axis=1)
