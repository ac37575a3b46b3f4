"""A neural cost model of one device's fused embedding step (AutoShard's).

The cost of a *set* of pieces fused on one device is not the sum of their
costs alone (they share caches and buffers), so the model is: a per-piece
encoder (MLP) giving hidden features h and the piece's own cost c (seconds,
positive); a sum over the device's pieces; and a set-level factor:

    seconds = (sum of c) * exp(g(sum of h / 16, log of sum of c))

with g an MLP started at 0, so the model starts additive and learns how a
set departs from the sum of its parts. It is fitted (Flax + optax, log
seconds, squared error; seconds on a CPU) to a dataset of measured sets
(`python -m jdmt.planner.collect`), and saved with the feature version and
the backend it was measured on; loading it on another backend warns.

Piece features (`piece_features`, `FEATURES`): log2 of rows, width, bags,
mean ids per bag, ids, and bytes; and the 17-bin reuse histogram of the
piece's ids (`measure.reuse_histogram`).

For the search, the fitted model runs in numpy (`encode`, `head`): a
device's encoding sum (h and c) is kept and a candidate piece's effect on
every device is one small matrix product.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from jdmt.planner.measure import REUSE_BINS, Piece, backend_name, reuse_histogram

FEATURE_VERSION = 2
SET_SCALE = 16.0
"""Divides the summed hidden features of a device's pieces before the head."""
FEATURES = ("log2_rows", "log2_width", "log2_bags", "log2_pooling", "log2_ids", "log2_bytes",
            *(f"reuse_{i}" for i in range(REUSE_BINS)))


_REUSE: dict = {}


def piece_features(p: Piece) -> np.ndarray:
    """f32[len(FEATURES)] of one piece. The reuse histogram is estimated from
    at most 16k of its ids (`Piece.sample_ids`); pieces that differ only in
    width (column shards) share it."""
    key = (p.rows, p.bags, p.pooling, p.alpha, p.seed)
    hist = _REUSE.get(key)
    if hist is None:
        hist = reuse_histogram(*p.sample_ids())
        if len(_REUSE) > 1 << 16:
            _REUSE.clear()
        _REUSE[key] = hist
    return np.concatenate([
        np.log2(np.array([p.rows, p.width, p.bags + 1, p.pooling + 1, p.ids + 1,
                          4.0 * p.rows * p.width], np.float64)),
        hist,
    ]).astype(np.float32)


def set_features(sets: Sequence[Sequence[Piece]], cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(f32[S, K, F] features, f32[S, K] mask) of S sets of at most K pieces."""
    cache = {} if cache is None else cache
    k = max(1, max((len(s) for s in sets), default=1))
    x = np.zeros((len(sets), k, len(FEATURES)), np.float32)
    m = np.zeros((len(sets), k), np.float32)
    for i, s in enumerate(sets):
        for j, p in enumerate(s):
            if p not in cache:
                cache[p] = piece_features(p)
            x[i, j] = cache[p]
            m[i, j] = 1.0
    return x, m


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties broken by order)."""
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    if len(a) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def mape(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean absolute percentage error, as a fraction."""
    return float(np.mean(np.abs(pred - true) / np.maximum(true, 1e-12)))


@dataclasses.dataclass
class NeuralCostModel:
    """Fitted parameters (numpy) and what they were fitted on.

    `params` holds the encoder's and head's dense layers: lists of (W, b).
    Inputs are standardised with `mean`/`std` of the training features.
    """

    encoder: list[tuple[np.ndarray, np.ndarray]]
    head_layers: list[tuple[np.ndarray, np.ndarray]]
    mean: np.ndarray
    std: np.ndarray
    backend: str
    meta: dict

    # ---- inference (numpy) -----------------------------------------------------------------

    @property
    def encoding_size(self) -> int:
        """Length of `encode`'s vectors: hidden features and the piece's cost."""
        return int(self.encoder[1][0].shape[1]) + 1

    def encode(self, x: np.ndarray) -> np.ndarray:
        """f32[..., H + 1] encodings of piece features f32[..., F]: the hidden
        features, then the piece's own cost in seconds (last)."""
        h = (np.asarray(x, np.float32) - self.mean) / self.std
        (w0, b0), (w1, b1), (wc, bc) = self.encoder
        h = np.maximum(h @ w0 + b0, 0.0)
        h = np.maximum(h @ w1 + b1, 0.0)
        c = np.exp(np.minimum(h @ wc + bc, 30.0))
        return np.concatenate([h, c], -1)

    def head(self, s: np.ndarray) -> np.ndarray:
        """Seconds f64[...] of devices whose encodings sum to f32[..., H + 1]:
        the pieces' costs summed, times exp(g(set features, log of that sum))."""
        s = np.asarray(s, np.float64)
        total = s[..., -1]
        z = np.concatenate([s[..., :-1] / SET_SCALE, np.log(np.maximum(total, 1e-12))[..., None]], -1)
        (w0, b0), (w1, b1) = self.head_layers
        g = (np.maximum(z @ w0 + b0, 0.0) @ w1 + b1)[..., 0]
        return np.where(total > 0, total * np.exp(g), 0.0)

    def predict(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Seconds f64[S] of S sets: features f32[S, K, F], mask f32[S, K]."""
        return self.head((self.encode(x) * mask[..., None]).sum(-2))

    def predict_sets(self, sets: Sequence[Sequence[Piece]]) -> np.ndarray:
        return self.predict(*set_features(sets))

    # ---- files ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        arrays = {"mean": self.mean, "std": self.std}
        for name, layers in (("enc", self.encoder), ("head", self.head_layers)):
            for i, (w, b) in enumerate(layers):
                arrays[f"{name}{i}_w"], arrays[f"{name}{i}_b"] = w, b
        meta = {"feature_version": FEATURE_VERSION, "features": list(FEATURES), "backend": self.backend,
                "encoder_layers": len(self.encoder), "head_layers": len(self.head_layers), **self.meta}
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, *, backend: str | None = None) -> "NeuralCostModel":
        """Loads a saved model; warns when it was fitted on another backend
        (`backend`, default this process's), fails on another feature version."""
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("feature_version") != FEATURE_VERSION:
                raise ValueError(f"{path}: cost model of feature version {meta.get('feature_version')}, "
                                 f"this jdmt reads version {FEATURE_VERSION}")
            enc = [(z[f"enc{i}_w"], z[f"enc{i}_b"]) for i in range(meta["encoder_layers"])]
            head = [(z[f"head{i}_w"], z[f"head{i}_b"]) for i in range(meta["head_layers"])]
            mean, std = z["mean"], z["std"]
        here = backend or backend_name()
        if meta["backend"] != here:
            warnings.warn(f"{path}: cost model fitted on {meta['backend']}, used on {here}: "
                          "its seconds are another machine's", stacklevel=2)
        rest = {k: v for k, v in meta.items()
                if k not in ("feature_version", "features", "backend", "encoder_layers", "head_layers")}
        return cls(enc, head, mean, std, meta["backend"], rest)


def fit(x: np.ndarray, mask: np.ndarray, seconds: np.ndarray, *, backend: str, hidden: int = 32,
        steps: int = 3000, lr: float = 3e-3, batch_size: int = 128, seed: int = 0) -> NeuralCostModel:
    """Fits the model to measured sets: features f32[S, K, F], mask f32[S, K],
    seconds f64[S] (> 0), minimising the squared error of log seconds (Adam,
    minibatches of `batch_size` sets, cosine-decayed learning rate)."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    import optax

    class Net(nn.Module):
        """log seconds = log(sum of piece costs) + g(sum of piece features, that log)."""

        @nn.compact
        def __call__(self, xs, ms):
            h = nn.relu(nn.Dense(hidden, name="enc0")(xs))
            h = nn.relu(nn.Dense(hidden, name="enc1")(h))
            c = jnp.exp(jnp.minimum(nn.Dense(1, name="cost")(h)[..., 0], 30.0)) * ms
            total = c.sum(-1)
            z = jnp.concatenate([(h * ms[..., None]).sum(-2) / SET_SCALE,
                                 jnp.log(jnp.maximum(total, 1e-12))[..., None]], -1)
            g = nn.Dense(1, name="head1", kernel_init=nn.initializers.zeros)(
                nn.relu(nn.Dense(hidden, name="head0")(z)))[..., 0]
            return jnp.log(jnp.maximum(total, 1e-12)) + g

    seconds = np.asarray(seconds, np.float64)
    if np.any(seconds <= 0):
        raise ValueError("measured seconds must be > 0")
    flat = x[mask > 0]
    mean = flat.mean(0).astype(np.float32)
    std = np.maximum(flat.std(0), 1e-3).astype(np.float32)
    xs = jnp.asarray((x - mean) / std * (mask[..., None] > 0))
    ms = jnp.asarray(mask)
    ys = jnp.asarray(np.log(seconds), jnp.float32)
    net = Net()
    params = net.init(jax.random.key(seed), xs[:1], ms[:1])
    # start each piece's cost near the mean time of a set's piece
    mean_k = float(np.asarray(mask).sum(1).mean())
    params["params"]["cost"]["bias"] = jnp.full((1,), float(ys.mean()) - math.log(mean_k))
    sched = optax.cosine_decay_schedule(lr, steps)
    tx = optax.adam(sched)
    state = tx.init(params)

    def loss_fn(p, idx):
        return jnp.mean((net.apply(p, xs[idx], ms[idx]) - ys[idx]) ** 2)

    n = xs.shape[0]
    bs = min(n, batch_size)

    @jax.jit
    def train(p, st):
        def body(carry, key):
            p, st = carry
            idx = jax.random.choice(key, n, (bs,), replace=False) if bs < n else jnp.arange(n)
            loss, g = jax.value_and_grad(loss_fn)(p, idx)
            upd, st = tx.update(g, st, p)
            return (optax.apply_updates(p, upd), st), loss
        keys = jax.random.split(jax.random.key(seed + 1), steps)
        (p, st), losses = jax.lax.scan(body, (p, st), keys)
        return p, st, losses

    t0 = time.perf_counter()
    params, state, losses = train(params, state)
    losses = np.asarray(losses)
    pr = jax.tree_util.tree_map(np.asarray, params["params"])
    layers = lambda names: [(pr[n]["kernel"], pr[n]["bias"]) for n in names]  # noqa: E731
    return NeuralCostModel(
        layers(["enc0", "enc1", "cost"]), layers(["head0", "head1"]), mean, std, backend,
        {"hidden": hidden, "steps": steps, "batch_size": bs, "train_sets": int(x.shape[0]),
         "train_s": time.perf_counter() - t0, "final_loss": float(losses[-1])},
    )


# ---- the analytic model on the same sets -------------------------------------------------------


def analytic_seconds(sets: Sequence[Sequence[Piece]], optimizer=None, model=None) -> np.ndarray:
    """The analytic model's lookup + update seconds of each set
    (`AnalyticCostModel`'s owner work: per id, routing bytes and a row read;
    per unique row, the update's read and write of row and state; with its
    `unique_fraction`), before any calibration."""
    from jdmt.embeddings.types import SparseOptimizer
    from jdmt.planner.cost import AnalyticCostModel, Problem, _Costing
    from jdmt.planner.tablesets import TableSpec, features_of

    model = model or AnalyticCostModel()
    optimizer = optimizer or SparseOptimizer()
    c = _Costing(model, Problem(features_of([TableSpec("x", 1, 1, 1.0)]), 1, 1, 1, optimizer=optimizer))
    out = np.zeros(len(sets))
    for i, s in enumerate(sets):
        work = 0.0
        for p in s:
            if p.max_len == 1:  # unique rows asked: each one read and applied
                work += p.ids * (2 * model.id_bytes + c.read(p.width) + c.apply(p.width))
            else:  # bags: every id unpacked, read and sorted; u of them applied
                work += p.ids * (2 * model.id_bytes + c.read(p.width)) + c.u * p.ids * c.apply(p.width)
        out[i] = work / model.memory_bw
    return out


def calibrate(pred: np.ndarray, true: np.ndarray) -> float:
    """The scale a that minimises the squared log error of a * pred (the
    analytic model's bandwidth fitted to this machine)."""
    ok = (pred > 0) & (true > 0)
    return float(np.exp(np.mean(np.log(true[ok]) - np.log(pred[ok])))) if ok.any() else 1.0


def evaluate(model: NeuralCostModel, sets, seconds, *, analytic_scale: float, optimizer=None) -> dict:
    """Held-out errors of the neural and the (calibrated) analytic model."""
    seconds = np.asarray(seconds, np.float64)
    pred = model.predict_sets(sets)
    ana = analytic_seconds(sets, optimizer) * analytic_scale
    return {
        "sets": len(sets),
        "cost_model_mape": mape(pred, seconds),
        "cost_model_spearman": spearman(pred, seconds),
        "analytic_mape": mape(ana, seconds),
        "analytic_spearman": spearman(ana, seconds),
        "analytic_scale": analytic_scale,
    }


def fit_and_evaluate(sets, seconds, *, backend: str, optimizer=None, test_fraction: float = 0.2,
                     seed: int = 0, **fit_kw) -> tuple[NeuralCostModel, dict]:
    """Fits on a random (1 - test_fraction) of the sets; errors on the rest.
    The analytic model's scale is fitted on the same training sets."""
    seconds = np.asarray(seconds, np.float64)
    order = np.random.default_rng(seed).permutation(len(sets))
    cut = int(round(len(sets) * (1 - test_fraction)))
    tr, te = order[:cut], order[cut:]
    if len(tr) < 2 or len(te) < 1:
        raise ValueError(f"{len(sets)} sets are too few to fit and hold out")
    cache: dict = {}
    x, m = set_features([sets[i] for i in tr], cache)
    model = fit(x, m, seconds[tr], backend=backend, seed=seed, **fit_kw)
    scale = calibrate(analytic_seconds([sets[i] for i in tr], optimizer), seconds[tr])
    report = evaluate(model, [sets[i] for i in te], seconds[te], analytic_scale=scale, optimizer=optimizer)
    report["train_sets"] = int(len(tr))
    model.meta.update(heldout=report)
    return model, report


def main(argv=None) -> int:
    import argparse
    import sys

    from jdmt.embeddings.types import OptimizerKind, SparseOptimizer
    from jdmt.planner import collect

    ap = argparse.ArgumentParser(prog="python -m jdmt.planner.neural",
                                 description="Fit the neural cost model to a dataset of measured sets.")
    ap.add_argument("data", help="a dataset from python -m jdmt.planner.collect")
    ap.add_argument("--out", required=True, help="model file (.npz)")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    sets, seconds, meta = collect.load(a.data)
    opt = SparseOptimizer(kind=OptimizerKind(meta.get("optimizer", "rowwise_adagrad")))
    model, report = fit_and_evaluate(sets, seconds, backend=meta["backend"], optimizer=opt,
                                     test_fraction=a.test_fraction, seed=a.seed, steps=a.steps,
                                     hidden=a.hidden)
    model.meta.update(dataset=str(a.data), optimizer=opt.kind.value,
                      global_batch=meta.get("global_batch"))
    model.save(a.out)
    print(json.dumps({"out": a.out, "fit_s": model.meta["train_s"], **report}), file=sys.stdout)
    return 0


__all__ = ["FEATURES", "FEATURE_VERSION", "NeuralCostModel", "analytic_seconds", "calibrate",
           "evaluate", "fit", "fit_and_evaluate", "mape", "piece_features", "set_features", "spearman"]

if __name__ == "__main__":
    raise SystemExit(main())
