"""Learning-rate schedules (TorchRec's DLRM example schedule) and dense gradient clipping."""

import jax
import numpy as np
import optax
import pytest

from jdmt.data import FeatureSet, SparseFeature
from jdmt.train import TrainConfig, Trainer
from jdmt.train.schedule import dense_optimizer, lr_scale, schedule_steps


def _reference(n, w, d, k, lr):
    """The DLRM reference's LRPolicyScheduler factor at torch step count n
    (held at 1 between warm-up and decay; see jdmt.train.schedule)."""
    if n < w:
        return 1.0 - (w - n) / w
    if d <= n < d + k:
        return max(1e-7, lr * ((k - (n - d)) / k) ** 2) / lr
    if n >= d + k and k > 0:
        return max(1e-7, lr * (1 / k) ** 2) / lr  # the last decayed value
    return 1.0


@pytest.mark.parametrize("w, d, k", [(5, 10, 8), (1, 0, 20), (4, 30, 0)])
def test_dlrm_schedule_follows_the_reference(w, d, k):
    scale = jax.jit(lr_scale("dlrm", (w, d, k), 0.5))
    got = np.array([float(scale(s)) for s in range(40)])
    want = np.array([_reference(s + 1, w, d, k, 0.5) for s in range(40)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_schedule_defaults_and_errors():
    assert schedule_steps(1000, None, None, None) == (50, 600, 400)
    with pytest.raises(ValueError, match="must end before the decay starts"):
        schedule_steps(100, 20, 10, 5)
    with pytest.raises(ValueError, match="shape lr_schedule='dlrm'"):
        TrainConfig(warmup_steps=3)
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        TrainConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="clip_norm must be a positive number"):
        TrainConfig(clip_norm=0.0)


def test_clipping_bounds_the_dense_update():
    tx = dense_optimizer("sgd", 1.0, clip_norm=0.5)
    params = {"a": np.zeros(3, np.float32), "b": np.zeros(4, np.float32)}
    grads = {"a": np.full(3, 10.0, np.float32), "b": np.full(4, -10.0, np.float32)}
    upd, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.tree.norm(upd)) == pytest.approx(0.5, rel=1e-5)


FEATS = FeatureSet((SparseFeature("a", 40, 8, 2), SparseFeature("b", 30, 8, 3)), num_dense=2)


def _first_step_deltas(mesh, **kw):
    cfg = TrainConfig(features=FEATS, embedding_dim=8, steps=10, global_batch=64, eval_batches=1,
                      bottom_mlp=(8,), top_mlp=(8,), optimizer="sgd", embedding_optimizer="sgd",
                      progress=False, **kw)
    trainer = Trainer(cfg, mesh)
    state = trainer.init_state()
    before = jax.tree.map(np.asarray, (state.params, state.tables))
    batch = trainer.device_batch(trainer._host_train_batch(0))
    state, _ = trainer.compiled_step(state)(state, batch, trainer.no_halt())
    after = jax.tree.map(np.asarray, (state.params, state.tables))
    return jax.tree.map(lambda x, y: y.astype(np.float64) - x, before, after)


def test_the_schedule_scales_dense_and_sparse_updates(mesh24):
    """SGD updates are linear in the rate: the first step of a 4-step warm-up
    moves every dense parameter and every touched table row by 1/4 of the
    constant schedule's step."""
    const = _first_step_deltas(mesh24)
    warm = _first_step_deltas(mesh24, lr_schedule="dlrm", warmup_steps=4, decay_start=8, decay_steps=2)
    moved = 0
    for c, w in zip(jax.tree.leaves(const), jax.tree.leaves(warm), strict=True):
        np.testing.assert_allclose(w, c / 4, rtol=1e-4, atol=1e-7)
        moved += int(np.count_nonzero(c))
    assert moved > 0
