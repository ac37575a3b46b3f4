"""Learning-rate schedules and the dense optimizer (optax).

One schedule scales both learning rates, the dense optimizer's and the
fused sparse optimizer's, as TorchRec's DLRM example does (its
`LRPolicyScheduler` steps a `CombinedOptimizer` of both):

* ``constant``: no change.
* ``dlrm``: TorchRec's DLRM example schedule (`torchrec_dlrm/lr_scheduler.py`,
  from the DLRM MLPerf reference): with ``n = step + 1`` (the torch
  scheduler's step count of the update it sets),
  - warm-up: ``n / W`` while ``n < W``;
  - decay: ``((N - (n - D)) / N) ** 2`` (at least 1e-7 / lr) while
    ``D <= n < D + N``;
  - otherwise 1 between warm-up and decay, and the last decayed value,
    ``1 / N ** 2``, after it. (Between warm-up and decay the reference holds
    the last value it set, ``(W - 1) / W``; we hold 1, the evident intent.)
  W, N and D are `warmup_steps`, `decay_steps`, `decay_start`; the
  defaults scale with the run: W = 5% of the steps, D = 60%, N = the rest.

Dense gradients may be clipped to a global norm first (`clip_norm`).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

__all__ = ["LR_SCHEDULES", "dense_optimizer", "lr_scale", "schedule_steps"]

LR_SCHEDULES = ("constant", "dlrm")
DENSE_OPTIMIZERS = ("adagrad", "adam", "sgd")
_MIN_LR = 1e-7  # the reference's floor during the decay


def schedule_steps(steps: int, warmup: int | None, decay_start: int | None,
                   decay_steps: int | None) -> tuple[int, int, int]:
    """(W, D, N) of the `dlrm` schedule for a run of `steps` (defaults: 5%,
    60%, the rest). Raises ValueError when the warm-up ends after the decay
    starts (the reference refuses that too)."""
    w = max(1, steps // 20) if warmup is None else int(warmup)
    d = (steps * 3) // 5 if decay_start is None else int(decay_start)
    n = max(0, steps - d) if decay_steps is None else int(decay_steps)
    if w < 0 or d < 0 or n < 0:
        raise ValueError(f"warmup_steps, decay_start and decay_steps must be >= 0, got {w}, {d}, {n}")
    if d < w:
        raise ValueError(f"the learning-rate warm-up ({w} steps) must end before the decay starts "
                         f"(step {d})")
    return w, d, n


def lr_scale(schedule: str, steps: tuple[int, int, int], lr: float):
    """step (0-based, an integer array) -> the factor of the base learning rate."""
    if schedule == "constant":
        return lambda step: jnp.ones((), jnp.float32)
    if schedule != "dlrm":
        raise ValueError(f"unknown lr_schedule {schedule!r}; available: {', '.join(LR_SCHEDULES)}")
    w, d, n = steps

    def scale(step):
        c = jnp.asarray(step, jnp.float32) + 1.0
        warm = c / max(w, 1)
        k = jnp.clip(c - d, 0.0, float(max(n - 1, 0)))  # after the decay: its last value
        decay = jnp.maximum(_MIN_LR / lr, jnp.square((n - k) / max(n, 1)))
        return jnp.where(c < w, warm, jnp.where((c >= d) & (n > 0), decay, 1.0)).astype(jnp.float32)

    return scale


def dense_optimizer(name: str, lr: float, scale=None, clip_norm: float | None = None,
                    count: bool = False) -> optax.GradientTransformation:
    """The dense model's optax optimizer: `name` at `lr` times `scale(step)`,
    after clipping the gradients to a global norm of `clip_norm` (if given).
    `count`: make sure the state counts the applied steps (`needs_counter`)."""
    if count and needs_counter(name, scale):  # a step count in the state; updates times 1.0
        inner = dense_optimizer(name, lr, scale, clip_norm)
        return optax.chain(inner, optax.scale_by_schedule(lambda _: 1.0))
    rate = lr if scale is None else (lambda count: lr * scale(count))
    if name == "adagrad":
        tx = optax.adagrad(rate)
    elif name == "adam":
        tx = optax.adam(rate)
    elif name == "sgd":
        tx = optax.sgd(rate)
    else:
        raise ValueError(f"unknown dense optimizer {name!r}; available: {', '.join(DENSE_OPTIMIZERS)}")
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx


def needs_counter(name: str, scale) -> bool:
    """Whether `dense_optimizer(name, ..., scale)`'s state has no step count
    (SGD and Adagrad at a constant rate keep none; Adam and any schedule do)."""
    return name in ("sgd", "adagrad") and scale is None
