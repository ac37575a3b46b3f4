"""DLRM (Naumov et al., 2019): bottom MLP, pairwise dot interaction, top MLP.

    dense f32[B, num_dense] --bottom MLP--> x f32[B, D]
    s_k = SequencePooling(seq_k; query x)   f32[B, D]       (sequence features, if any)
    T = [x, e_1, ..., e_F, s_1, ..., s_Fs]  f32[B, N+1, D]  (e_f: pooled embeddings, N = F+Fs)
    z = upper triangle (i < j) of T T^T     f32[B, (N+1)N/2]
    logit = top MLP([x, z])                 f32[B]

The model sees only dense arrays; where the embeddings come from (and how
they are sharded) is the trainer's business.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdmt.models.sequence import append_pooled_sequences, check_sequence_pooling

__all__ = ["DLRM", "MLP", "dot_interaction", "init_dlrm"]


# DLRM's reference initialisation: Glorot-normal weights, N(0, 1/fan_out) biases
# (here zero biases, which train as well and keep the init independent of widths).
_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "truncated_normal")


class MLP(nn.Module):
    """Dense layers of the given widths; ReLU after every layer but (optionally) the last."""

    widths: Sequence[int]
    activate_last: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, w in enumerate(self.widths):
            x = nn.Dense(w, kernel_init=_KERNEL_INIT, name=f"dense_{i}")(x)
            if i + 1 < len(self.widths) or self.activate_last:
                x = nn.relu(x)
        return x


def dot_interaction(x: jax.Array, embs: jax.Array, *, cpu_threads: int = 0, mesh=None) -> jax.Array:
    """Pairwise dot products among [x, e_1, ..., e_F], strictly upper triangle.

    Args:
      x: f32[B, D] the bottom MLP's output.
      embs: f32[B, F, D] pooled embeddings.
      cpu_threads: 0: XLA ops (a batched matmul and a gather of the upper
        triangle). N > 0: the C++ CPU kernels on N threads
        (`cpu_kernels.dot_interaction`, with its own backward); each dot
        product then sums over D in order, so the values can differ from
        XLA's in the last bits. On XLA:CPU the batched matmul of small
        per-sample blocks runs at a fraction of the matmul rate and its
        backward scatters into a dense [B, N, N] buffer: at B 4096, N 27,
        D 64 forward plus backward took about 85 ms in XLA against about
        30 ms in C++ on 2 threads.
      mesh: with `cpu_threads`, the device mesh the batch is sharded over
        (axes `jdmt.mesh.DEVICES`): each device runs the kernel on its own
        samples (`shard_map`; a custom call under `jit` would otherwise be
        given the whole batch). None: the arrays are on one device. A batch
        the mesh does not divide takes the XLA ops.
    Returns:
      f32[B, (F+1)F/2]: `<t_i, t_j>` for i < j in row-major order of
      `t = [x, e_1, ..., e_F]`.
    """
    t = jnp.concatenate([x[:, None, :], embs], axis=1)  # [B, F+1, D]
    if cpu_threads and (mesh is None or t.shape[0] % mesh.devices.size == 0):
        return _cpu_interaction(t, cpu_threads, mesh)
    z = jnp.einsum("bid,bjd->bij", t, t)
    i, j = np.triu_indices(t.shape[1], k=1)
    return z[:, i, j]


def _per_device(fn, mesh, n_args: int):
    """`fn` on each device's samples (batch-sharded arguments and result)."""
    if mesh is None:
        return fn
    from jax.sharding import PartitionSpec as P

    from jdmt.mesh import DEVICES

    return jax.shard_map(fn, mesh=mesh, in_specs=(P(DEVICES),) * n_args, out_specs=P(DEVICES))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _cpu_interaction(t: jax.Array, threads: int, mesh) -> jax.Array:
    from jdmt.embeddings import cpu_kernels

    return _per_device(lambda a: cpu_kernels.dot_interaction(a, threads=threads), mesh, 1)(t)


def _cpu_interaction_fwd(t, threads, mesh):
    return _cpu_interaction(t, threads, mesh), t


def _cpu_interaction_bwd(threads, mesh, t, g):
    from jdmt.embeddings import cpu_kernels

    return (_per_device(lambda a, b: cpu_kernels.dot_interaction_grad(a, b, threads=threads), mesh, 2)(t, g),)


_cpu_interaction.defvjp(_cpu_interaction_fwd, _cpu_interaction_bwd)


class DLRM(nn.Module):
    """The DLRM dense part over pooled (and optionally sequence) embeddings.

    Attributes:
      embedding_dim: D, the width of every embedding; the bottom MLP ends
        with this width.
      bottom: hidden widths of the bottom MLP (D is appended).
      top: hidden widths of the top MLP (1 is appended).
      sequence_pooling: how sequence features are pooled before the
        interaction, one of `SEQUENCE_POOLING` (see `SequencePooling`;
        'attention' queries with the bottom MLP's output). Without sequence
        features it changes nothing.
      interaction_threads: 0: the interaction in XLA ops; N > 0: in the C++
        CPU kernel on N threads (CPU only; see `dot_interaction`).
      interaction_mesh: with `interaction_threads`, the mesh the batch is
        sharded over (None: one device).
    """

    embedding_dim: int
    bottom: Sequence[int] = (64, 32)
    top: Sequence[int] = (128, 64)
    sequence_pooling: str = "mean"
    interaction_threads: int = 0
    interaction_mesh: object = None

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
        extra: jax.Array | None = None,
    ) -> jax.Array:
        """dense f32[B, num_dense], embs f32[B, F, D] -> logits f32[B].

        Sequence features, if any: seq f32[B, Fs, S, D] (see `stack_sequences`)
        and seq_lengths i32[B, Fs]; they join the interaction after the pooled
        ones. `extra` f32[B, E], if given, joins the top MLP's input beside the
        bottom output and the interactions (DMT: the Tower Modules' outputs,
        which are interactions already).
        """
        x, embs = bottom_and_features(self, "DLRM", dense, embs, seq, seq_lengths)
        threads = 0 if self.is_initializing() else self.interaction_threads
        z = dot_interaction(x, embs, cpu_threads=threads, mesh=self.interaction_mesh)
        h = jnp.concatenate([x, z] + ([] if extra is None else [extra]), axis=1)
        return MLP((*self.top, 1), activate_last=False, name="top")(h)[:, 0]


def bottom_and_features(model: nn.Module, kind: str, dense, embs, seq, seq_lengths):
    """The front both models share, called inside their compact `__call__`:
    the bottom MLP ("bottom", ending at D) on the dense features, and the
    pooled embeddings f32[B, F, D] with the pooled sequence features appended.

    Returns:
      (x f32[B, D], f32[B, F + Fs, D]).
    """
    d = model.embedding_dim
    if embs.ndim != 3 or embs.shape[-1] != d:
        raise ValueError(f"{kind} expects pooled embeddings f32[B, F, {d}], got {embs.shape}")
    x = MLP((*model.bottom, d), activate_last=True, name="bottom")(dense)
    return x, append_pooled_sequences(kind, model.sequence_pooling, x, embs, seq, seq_lengths)


def _init(
    model: nn.Module,
    seed: int,
    num_dense: int,
    num_features: int,
    num_sequence: int,
    sequence_len: int,
    num_extra: int = 0,
):
    """`model.init` on zero inputs of batch 1 of the given sizes: its parameters."""
    d = model.embedding_dim
    kwargs = {"extra": jnp.zeros((1, num_extra), jnp.float32)} if num_extra else {}
    inputs = [jnp.zeros((1, num_dense), jnp.float32), jnp.zeros((1, num_features, d), jnp.float32)]
    if num_sequence:
        inputs += [
            jnp.zeros((1, num_sequence, sequence_len, d), jnp.float32),
            jnp.zeros((1, num_sequence), jnp.int32),
        ]
    return model.init(jax.random.key(seed), *inputs, **kwargs)["params"]


def init_dlrm(
    model: DLRM,
    seed: int,
    num_dense: int,
    num_features: int,
    num_sequence: int = 0,
    sequence_len: int = 1,
    num_extra: int = 0,
):
    """Parameters of `model` for inputs of the given sizes; depend only on `seed`.

    `num_features` counts the pooled features, `num_sequence` the sequence
    features (of at most `sequence_len` positions), `num_extra` the width of
    the `extra` top-MLP input. Without sequence features the parameters are
    those of a model that has never heard of them.
    """
    return _init(model, seed, num_dense, num_features, num_sequence, sequence_len, num_extra)
