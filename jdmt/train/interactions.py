"""Interaction measures of a trained flat model, and a partition from them.

The training side of the Tower Partitioner: it reads a trained `Trainer`'s
model and held-out batches and hands an interaction matrix to
`jdmt.towers.partition_search.learned_partition` (arrays in, partition out).
`restore_trainer` rebuilds a flat run's `Trainer` from its checkpoint, at the
batch sizes and data of the run that asks.

Interaction measures (both give a symmetric, non-negative f32[F, F] matrix
with a zero diagonal; larger means "keep these two together"):

* ``"hessian"`` (default; needs the trained dense model): the mixed second
  derivative of the model's logit with respect to two features' pooled
  embeddings, ``H_ij(x) = d^2 logit / de_i de_j`` (a D x D block), measured
  on held-out examples and scaled by how much each embedding varies::

      W_ij = sqrt(mean_x ||H_ij(x)||_F^2) * s_i * s_j,
      s_i  = sqrt(mean_x ||e_i(x) - mean_x e_i||^2)

  ``e_i^T H_ij e_j`` is the part of the logit that depends on features i and
  j jointly (what no sum of one-feature terms can express), so W_ij is the
  typical size of that joint effect, in logits. It works for any dense
  model (DLRM's dot interaction, DCN's cross layers). For DLRM with ReLU
  MLPs and pooled features the block is exactly ``(d logit / d z_ij) I_D``
  (the MLPs are piecewise linear), so W_ij is the trained top MLP's
  sensitivity to the interaction feature z_ij = <e_i, e_j>, times
  sqrt(D) s_i s_j. A sequence feature is perturbed by a shift of all its
  valid positions (its masked mean for mean pooling). The block norms are exact for D <= 32 (D Hessian-vector
  products per feature and example); wider embeddings use `probes` random
  sign vectors per feature (an unbiased estimate of ||H_ij||_F^2).
* ``"dot"`` (embeddings only; `interaction_matrix`): DLRM feeds its top MLP
  the dot products z_ij = <e_i, e_j>. A pair whose dot product varies
  across examples carries information to the top MLP; one whose dot
  product is constant carries none. ``W_ij = std_x <e_i, e_j> / (r_i r_j)``
  with ``r_i = sqrt(mean_x ||e_i||^2)``, so rescaling a table changes
  nothing.

On the synthetic data (`SyntheticData.groups` are the planted interaction
groups), after 600 steps of a small DLRM (12 features, 4 groups, dim 8),
within-group pairs score on average 5-9x the cross-group pairs by the
Hessian and only about 1.3-1.5x by the dot spread; the learned partition
recovers the groups exactly (adjusted Rand index 1) with the Hessian on
data seeds 0, 1 and 2, and with the dot spread on seeds 0 and 2 (0.64 on
seed 1, two towers per host); tests/test_partitioner.py checks seed 0.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from jdmt.mesh import host_numpy, make_mesh
from jdmt.towers.partition import PartitionError, TowerPartition, balanced_partition
from jdmt.train.checkpoint import CheckpointError, Checkpointer, features_from_json
from jdmt.train.config import TrainConfig
from jdmt.train.trainer import Trainer
from jdmt.towers.partition_search import interaction_matrix, learned_partition, make_partition

__all__ = [
    "MEASURES",
    "hessian_interaction",
    "interaction_from_trainer",
    "learned_towers",
    "mean_lengths_from_trainer",
    "partition_from_trainer",
    "pooled_embeddings",
    "restore_trainer",
]

MEASURES = ("hessian", "dot")


def _eval_inputs(trainer, state, num_batches: int | None, max_examples: int | None) -> dict:
    """Held-out inputs of the model with their looked-up embeddings, on the host.

    Returns {'dense' [N, nd], 'lengths' [N, F], 'pooled' [N, Fp, D],
    'pooled_names', 'seq' [N, Fs, S, D] or None, 'seq_lengths' [N, Fs] or None}.
    """
    import jax

    n_batches = trainer.config.eval_batches if num_batches is None else int(num_batches)
    if n_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {n_batches}")
    seq_names = tuple(trainer.seq_names)
    forward = jax.jit(trainer.emb.forward)
    pooled_names = ()
    out = {"dense": [], "lengths": [], "pooled": [], "seq": []}
    count = 0
    for i in range(n_batches):
        hb = trainer._host_eval_batch(i)
        b = trainer.device_batch(hb)
        embs = forward(state.tables, b.ids, b.lengths, b.weights)[0]
        pooled_names = embs.pooled_names
        pooled = host_numpy(embs.pooled)
        out["pooled"].append(pooled.reshape(pooled.shape[0], len(pooled_names), -1))
        if seq_names:
            seqs = [host_numpy(embs.sequence[n]) for n in seq_names]
            s_max = max(x.shape[1] for x in seqs)
            out["seq"].append(np.stack(
                [np.pad(x, ((0, 0), (0, s_max - x.shape[1]), (0, 0))) for x in seqs], axis=1))
        out["dense"].append(np.asarray(hb.dense, np.float32))
        out["lengths"].append(np.asarray(hb.lengths, np.int32))
        count += hb.dense.shape[0]
        if max_examples is not None and count >= max_examples:
            break
    cut = slice(0, max_examples)
    res = {k: np.concatenate(v)[cut] for k, v in out.items() if k != "seq"}
    res["pooled_names"] = pooled_names
    if seq_names:
        res["seq"] = np.concatenate(out["seq"])[cut]
        res["seq_lengths"] = res["lengths"][:, np.asarray(trainer.seq_index)]
    else:
        res["seq"] = res["seq_lengths"] = None
    return res


def _feature_vectors(trainer, inputs: dict) -> np.ndarray:
    """f32[N, F, D] in feature order: pooled embeddings, and sequence
    features' masked means."""
    names = trainer.features.names
    n = inputs["pooled"].shape[0]
    d = inputs["pooled"].shape[-1]
    out = np.zeros((n, len(names), d), np.float32)
    for k, name in enumerate(inputs["pooled_names"]):
        out[:, names.index(name)] = inputs["pooled"][:, k]
    if inputs["seq"] is not None:
        seq, sl = inputs["seq"], inputs["seq_lengths"]
        mask = np.arange(seq.shape[2])[None, None, :] < sl[:, :, None]
        mean = (seq * mask[..., None]).sum(2) / np.maximum(sl, 1)[..., None]
        for k, name in enumerate(trainer.seq_names):
            out[:, names.index(name)] = mean[:, k]
    return out


def pooled_embeddings(trainer, state, num_batches: int | None = None,
                      max_examples: int | None = None) -> np.ndarray:
    """f32[N, F, D]: a trained flat model's embeddings of held-out examples.

    Args:
      trainer: a `jdmt.train.Trainer` (the flat model's).
      state: its `TrainState` (trained, or restored from a checkpoint).
      num_batches: eval batches to use (default `config.eval_batches`).
      max_examples: stop after this many examples.

    Features are in `trainer.features` order; pooled features give their
    pooled embedding, sequence features the mean over their valid positions.
    """
    return _feature_vectors(trainer, _eval_inputs(trainer, state, num_batches, max_examples))


def mean_lengths_from_trainer(trainer, num_batches: int | None = None) -> dict[str, float]:
    """Mean ids per example (valid positions of sequences) by feature, from the
    trainer's eval batches (for `feature_costs`)."""
    n = trainer.config.eval_batches if num_batches is None else int(num_batches)
    lengths = np.concatenate([trainer._host_eval_batch(i).lengths for i in range(n)])
    return {name: float(v) for name, v in zip(trainer.features.names, lengths.mean(0), strict=True)}


def hessian_interaction(
    trainer,
    state,
    *,
    num_batches: int | None = None,
    max_examples: int = 1024,
    probes: int | None = None,
    chunk: int = 64,
    seed: int = 0,
    memory_bytes: int = 512 * 2**20,
) -> np.ndarray:
    """The "hessian" measure (module docstring): f32[F, F] in feature order.

    Args:
      trainer, state: the trained flat model (`jdmt.train.Trainer`, `TrainState`).
      num_batches: eval batches to draw examples from (default all of the config's).
      max_examples: examples to average over.
      probes: random sign probes per feature and example; None: exact block
        norms when D <= 32, else 16 probes.
      chunk: examples per jitted call (at most).
      seed: the probes' seed (the result is deterministic for a seed).
      memory_bytes: the scratch memory one jitted call may use. Each call
        takes the Hessian-vector products of a block of examples x features
        (all probes of each); the block is sized from the compiled scratch
        of one example x one feature, so the live memory stays bounded at
        any F (at F = 856 the unblocked products needed terabytes).
    """
    import jax
    import jax.numpy as jnp

    inputs = _eval_inputs(trainer, state, num_batches, max_examples)
    names = trainer.features.names
    f = len(names)
    n, _, d = inputs["pooled"].shape
    pidx = np.array([names.index(x) for x in inputs["pooled_names"]], np.int32)
    sidx = np.array([names.index(x) for x in trainer.seq_names], np.int32)
    has_seq = inputs["seq"] is not None
    params = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state.params)
    model = trainer.model

    def logit(u, params, dense, pooled, seq, seq_len):
        """Logit of one example with feature k's input shifted by u[k]."""
        args = [dense[None], (pooled + u[pidx])[None]]
        if has_seq:
            mask = (jnp.arange(seq.shape[1])[None, :] < seq_len[:, None])[..., None]
            args += [(seq + u[sidx][:, None, :] * mask)[None], seq_len[None]]
        return model.apply({"params": params}, *args)[0]

    exact = probes is None and d <= 32
    k = d if exact else int(probes or 16)
    if k < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")

    def block_sq(params, dense, pooled, seq, seq_len, vecs, js):
        """f[J, F]: for each probed feature j in `js`, the sum over its probes
        `vecs[j]` of ||H_ij v||^2 for every output block i."""
        u0 = jnp.zeros((f, d), jnp.float32)
        grad = jax.grad(logit)

        def hvp(j, v):
            tangent = jnp.zeros((f, d), jnp.float32).at[j].set(v)
            return jax.jvp(lambda u: grad(u, params, dense, pooled, seq, seq_len), (u0,), (tangent,))[1]

        def per_feature(j, vs):  # vs [k, D]
            hv = jax.vmap(lambda v: hvp(j, v))(vs)  # [k, F, D]
            return jnp.sum(jnp.square(hv), axis=(0, 2))  # [F]

        return jax.vmap(per_feature)(js, vecs)

    batched = jax.jit(jax.vmap(block_sq, in_axes=(None, 0, 0, 0, 0, 0, None)))
    seq_all = inputs["seq"] if has_seq else np.zeros((n, 1, 1, d), np.float32)
    sl_all = inputs["seq_lengths"] if has_seq else np.zeros((n, 1), np.int32)

    # Block size from the compiled scratch of one example x one feature.
    one = jax.ShapeDtypeStruct
    probe = batched.lower(
        params, one((1, *inputs["dense"].shape[1:]), np.float32),
        one((1, *inputs["pooled"].shape[1:]), np.float32), one((1, *seq_all.shape[1:]), np.float32),
        one((1, *sl_all.shape[1:]), sl_all.dtype), one((1, 1, k, d), np.float32), one((1,), np.int32),
    ).compile().memory_analysis()
    unit = max(int(getattr(probe, "temp_size_in_bytes", 0) or 0), 4 * k * f * d, 1)
    per_call = max(1, int(memory_bytes) // unit)  # examples x features per call
    fb = max(1, min(f, per_call))
    chunk = max(1, min(int(chunk), n, per_call // fb))
    rng = np.random.default_rng(seed)
    total = np.zeros((f, f))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        m = hi - lo
        if exact:
            vecs = np.broadcast_to(np.eye(d, dtype=np.float32), (m, f, d, d))
        else:
            vecs = rng.choice(np.array([-1.0, 1.0], np.float32), size=(m, f, k, d))
        pad = chunk - m  # whole chunks and blocks: one compiled shape serves every call

        def padded(x, rows=pad):
            return np.concatenate([x, np.zeros((rows, *x.shape[1:]), x.dtype)]) if rows else x

        for j0 in range(0, f, fb):
            js = np.arange(j0, j0 + fb, dtype=np.int32)
            live = min(fb, f - j0)
            vb = np.zeros((m, fb, k, d), np.float32)
            vb[:, :live] = vecs[:, j0:j0 + live]
            js[live:] = 0  # padding features probe with zero vectors: they add nothing
            out = batched(params, padded(inputs["dense"][lo:hi]), padded(inputs["pooled"][lo:hi]),
                          padded(seq_all[lo:hi]), padded(sl_all[lo:hi]), padded(vb), js)
            total[:, j0:j0 + live] += np.asarray(out, np.float64)[:m, :live].sum(0).T
    hsq = total / n / (1 if exact else k)
    vec = _feature_vectors(trainer, inputs)
    spread = np.sqrt(np.mean(np.sum(np.square(vec - vec.mean(0)), -1), 0))
    w = np.sqrt(hsq) * np.outer(spread, spread)
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0.0)
    return w.astype(np.float32)


def interaction_from_trainer(trainer, state, measure: str = "hessian", **kwargs) -> np.ndarray:
    """f32[F, F] interaction of a trained flat model by `measure` ('hessian' or 'dot')."""
    if measure == "hessian":
        return hessian_interaction(trainer, state, **kwargs)
    if measure == "dot":
        return interaction_matrix(pooled_embeddings(trainer, state, **kwargs))
    raise PartitionError(f"unknown interaction measure {measure!r}; available: {', '.join(MEASURES)}")


def partition_from_trainer(
    trainer,
    state,
    num_towers: int | None = None,
    num_hosts: int | None = None,
    *,
    method: str = "learned",
    measure: str = "hessian",
    seed: int = 0,
    balance_tolerance: float = 0.1,
    cost: str = "mixed",
    memory_budget: float | None = None,
    measure_kwargs: Mapping[str, Any] | None = None,
) -> TowerPartition:
    """A partition of a trained flat model's features for `num_hosts` hosts
    (default: the trainer's mesh), by `method`. Costs use the mean lengths of
    the trainer's eval batches; the report records the measure (learned)."""
    h = trainer.hosts if num_hosts is None else int(num_hosts)
    fs = trainer.features
    opt = trainer.emb.optimizer
    if method == "balanced":  # the hosts balanced by `cost`, largest feature first
        part = balanced_partition(fs, num_towers, h, cost=cost,
                                  mean_lengths=mean_lengths_from_trainer(trainer), optimizer=opt)
    elif method != "learned":
        part = make_partition(method, fs, num_towers, h, seed=seed)
    if method != "learned":
        if memory_budget is not None:
            part.validate(fs, h, memory_budget=memory_budget, optimizer=opt)
        return part
    w = interaction_from_trainer(trainer, state, measure, **dict(measure_kwargs or {}))
    part = learned_partition(
        fs, w, num_towers, h, cost=cost, balance_tolerance=balance_tolerance,
        mean_lengths=mean_lengths_from_trainer(trainer), memory_budget=memory_budget, optimizer=opt,
    )
    report = {**part.report, "measure": measure, "interaction": w.round(6).tolist()}
    return dataclasses.replace(part, report=report)



def restore_trainer(
    checkpoint_dir: str | os.PathLike,
    mesh=None,
    *,
    step: int | None = None,
    data: str = "synthetic",
    data_seed: int = 0,
    eval_batches: int = 4,
    eval_batch_size: int = 1024,
    global_batch: int | None = None,
    source=None,
):
    """Rebuild a flat model's `Trainer` from a checkpoint's layout and restore it.

    Args:
      checkpoint_dir: a `train.py --checkpoint-dir`.
      mesh: the mesh to restore onto (any; default: the checkpoint's own
        `HxL`, which needs that many devices).
      step: the checkpoint (default: the newest).
      data: the run's data source (`synthetic`, `mlperf`, `criteo:PATH`):
        the examples the interactions are measured on.
      data_seed: the synthetic data's seed (train.py's `--seed`): ids are
        drawn per seed, so another seed mostly hits untrained rows.
      eval_batches, eval_batch_size: the held-out examples to use
        (`eval_batch_size` must divide over the mesh's devices and, with
        Criteo data, be the run's own eval batch size).
      global_batch: the training batch of the rebuilt config (default
        `eval_batch_size`; nothing is trained, but it must divide over the
        mesh's devices).
      source: a data source object to use instead of `data` (e.g. the very
        `SyntheticData` the run trained on); its features must be the
        checkpoint's.

    Returns:
      (trainer, state, meta) with the checkpoint's meta.

    Raises:
      CheckpointError: no checkpoint in the directory, or one that does not restore.
    """

    if not os.path.isdir(os.fspath(checkpoint_dir)):
        raise CheckpointError(f"checkpoint directory {os.fspath(checkpoint_dir)} does not exist")
    ckpt = Checkpointer(checkpoint_dir, asynchronous=False)
    try:
        s = ckpt.latest_step() if step is None else int(step)
        if s is None:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}")
        if s not in ckpt.all_steps():
            raise CheckpointError(f"no checkpoint {s} in {ckpt.directory} (have {ckpt.all_steps()})")
        layout = ckpt.meta(s)["layout"]
        model = layout["model"]
        fs = features_from_json(layout["features"])
        if mesh is None:
            mesh = make_mesh("x".join(str(v) for v in layout["mesh"]))
        cfg = TrainConfig(
            mesh="x".join(str(v) for v in mesh.devices.shape),
            model=model["name"],
            data=data,
            steps=1,
            global_batch=global_batch or eval_batch_size,
            eval_batch_size=eval_batch_size,
            eval_batches=eval_batches,
            embedding_dim=int(model["embedding_dim"]),
            bottom_mlp=tuple(model["bottom_mlp"]),
            top_mlp=tuple(model["top_mlp"]),
            sequence_pooling=model.get("sequence_pooling", "mean"),
            **{k: int(model[k]) for k in ("cross_layers", "low_rank") if k in model},
            embedding_optimizer=layout["embedding_optimizer"],
            optimizer=layout["dense_optimizer"],
            features=fs,
            seed=data_seed,
            data_seed=data_seed,
            progress=False,
            towers=0,
        )
        trainer = Trainer(cfg, mesh, source)
        state, meta = trainer.restore(ckpt, s)
    finally:
        ckpt.close()
    return trainer, state, meta


def learned_towers(config: TrainConfig, mesh, data=None) -> TowerPartition:
    """The learned partition a tower run asks for (`tower_partitioner='learned'`):
    the flat model in `config.partition_checkpoint`, restored onto `mesh`,
    measured (Hessian interactions) on the held-out batches of this run's own
    data source, eval batch size and eval batch count, and partitioned into
    this run's towers (`'auto'`: one per host) on its hosts.

    Args:
      config: the tower run's configuration.
      mesh: the tower run's mesh.
      data: the tower run's data source object, if it has one (else the one
        `config.data` names is built, as the run will build it).
    """
    if config.partition_checkpoint is None:
        raise ValueError("tower_partitioner='learned' needs partition_checkpoint")
    hosts = mesh.devices.shape[0]
    flat, state, _ = restore_trainer(
        config.partition_checkpoint, mesh, data=config.data, data_seed=config.data_seed
        if config.data_seed is not None else config.seed,
        eval_batches=config.eval_batches, eval_batch_size=config.eval_size,
        global_batch=config.global_batch, source=data,
    )
    towers = None if config.towers == "auto" else int(config.towers)
    return partition_from_trainer(flat, state, towers or min(hosts, len(flat.features.sparse)), hosts)
