"""DCNv2 (Wang et al., 2021), as in MLPerf's DLRM-DCNv2: bottom MLP, low-rank cross network, top MLP.

    dense f32[B, num_dense] --bottom MLP--> x f32[B, D]
    s_k = SequencePooling(seq_k; query x)  f32[B, D]  (sequence features, if any)
    x0 = [x, e_1, ..., e_F, s_1, ..., s_Fs] flattened   f32[B, (F+Fs+1)D]
    x_{l+1} = x0 * (U_l (V_l x_l) + b_l) + x_l     (V_l: in -> r, U_l: r -> in)
    logit = top MLP(x_L)                   f32[B]

Same interface as `DLRM`: the model sees only dense arrays.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdmt.models.dlrm import _KERNEL_INIT, MLP, _init, bottom_and_features
from jdmt.models.sequence import check_sequence_pooling

__all__ = ["DCN", "LowRankCross", "init_dcn"]


class LowRankCross(nn.Module):
    """One low-rank cross layer: `x0 * (U (V x) + b) + x`."""

    low_rank: int

    @nn.compact
    def __call__(self, x0: jax.Array, x: jax.Array) -> jax.Array:
        v = nn.Dense(self.low_rank, use_bias=False, kernel_init=_KERNEL_INIT, name="V")(x)
        u = nn.Dense(x.shape[-1], use_bias=True, kernel_init=_KERNEL_INIT, name="U")(v)
        return x0 * u + x


class DCN(nn.Module):
    """The DCNv2 dense part over pooled (and optionally sequence) embeddings.

    Attributes:
      embedding_dim: D, the width of every embedding; the bottom MLP ends
        with this width.
      bottom: hidden widths of the bottom MLP (D is appended).
      cross_layers: number of low-rank cross layers.
      low_rank: r, the rank of every cross layer's `U V`.
      top: hidden widths of the top MLP (1 is appended).
      sequence_pooling: how sequence features are pooled before the cross
        network, one of `SEQUENCE_POOLING` (see `SequencePooling`;
        'attention' queries with the bottom MLP's output). Without sequence
        features it changes nothing.
    """

    embedding_dim: int
    bottom: Sequence[int] = (64, 32)
    cross_layers: int = 3
    low_rank: int = 64
    top: Sequence[int] = (128, 64)
    sequence_pooling: str = "mean"

    def __post_init__(self):
        check_sequence_pooling(self.sequence_pooling)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        dense: jax.Array,
        embs: jax.Array,
        seq: jax.Array | None = None,
        seq_lengths: jax.Array | None = None,
    ) -> jax.Array:
        """dense f32[B, num_dense], embs f32[B, F, D] -> logits f32[B].

        Sequence features, if any: seq f32[B, Fs, S, D] (see `stack_sequences`)
        and seq_lengths i32[B, Fs]; their pooled vectors follow the pooled
        embeddings in `x0`.
        """
        x, embs = bottom_and_features(self, "DCN", dense, embs, seq, seq_lengths)
        b, f, d = embs.shape
        x0 = jnp.concatenate([x, embs.reshape(b, f * d)], axis=1)
        h = x0
        for i in range(self.cross_layers):
            h = LowRankCross(self.low_rank, name=f"cross_{i}")(x0, h)
        return MLP((*self.top, 1), activate_last=False, name="top")(h)[:, 0]


def init_dcn(
    model: DCN,
    seed: int,
    num_dense: int,
    num_features: int,
    num_sequence: int = 0,
    sequence_len: int = 1,
):
    """Parameters of `model` for inputs of the given sizes; depend only on `seed`.

    Sizes as in `init_dlrm`.
    """
    return _init(model, seed, num_dense, num_features, num_sequence, sequence_len)
