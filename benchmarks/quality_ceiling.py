#!/usr/bin/env python
"""How much of the synthetic teacher's Bayes AUC any learner can reach from N examples.

    python benchmarks/quality_ceiling.py                  # default set, 1,500 x 4,096 examples
    python benchmarks/quality_ceiling.py --teacher deep --scales 1,4,16

The Bayes AUC of the synthetic data (`SyntheticData.bayes_metrics`) needs
the teacher's latent vector of every row. A learner only sees labels, so a
row seen n times in training is known only so well. This script puts a
number on that, for an idealised learner that is better placed than any
real model:

- it knows the teacher's functional form exactly (groups, pooling, scale,
  dense weights and bias); only the rows' latents are unknown;
- each row's latent is estimated as efficiently as statistics allows
  (Cramer-Rao, with every other row's latent known): from n occurrences
  with Fisher information j per occurrence and latent dimension, and the
  teacher's own prior N(0, 1), the posterior mean is
  `rho * (latent + noise / sqrt(n j))` with `rho = n j / (1 + n j)`, i.e.
  `rho * latent + sqrt(rho (1 - rho)) * N(0, 1)`;
- j is measured per feature on held-out batches from the teacher
  (`E[p (1 - p) * (scale / n_f)^2 * |sum of the other latents of its
  group|^2] / LATENT_DIM` per occurrence, for the 'dlrm' teacher; for 'deep'
  the gradient of the network is used the same way);
- n is each row's real count in training batches `0 .. steps-1` of
  `--batch-size` examples (the default run's stream), times each
  `--scales` factor for bigger or smaller budgets.

It then scores the eval batches (`--eval-batches` of `--batch-size`, the
default run's held-out set) with the estimated latents. One JSON object:
the ceiling AUC per number of training examples, the Bayes AUC, and the
lift share `(AUC - 0.5) / (Bayes - 0.5)` of each. A real model (DLRM, any
optimizer) learns the latents jointly and without knowing the form, so it
stays below this line; the gap between its eval AUC and the ceiling at the
same examples is what a better model or optimizer could still win.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jdmt.data import synthetic_default_features  # noqa: E402
from jdmt.data.synthetic import LATENT_DIM, SyntheticData, splitmix64  # noqa: E402
from jdmt.metrics import auc  # noqa: E402


def _counts(data: SyntheticData, steps: int, batch: int) -> list[np.ndarray]:
    """Occurrences of every row of every feature in training batches 0..steps-1."""
    fs = data.features
    counts = [np.zeros(f.rows, np.int64) for f in fs.sparse]
    for s in range(steps):
        b = data.batch(s, batch)
        for t, f in enumerate(fs.sparse):
            valid = np.arange(f.max_len)[None, :] < b.lengths[:, t : t + 1]
            counts[t] += np.bincount(b.feature_ids(fs, f.name)[valid], minlength=f.rows)
    return counts


def _fisher(data: SyntheticData, batches: range, batch: int) -> np.ndarray:
    """f64[F]: Fisher information about one latent dimension per occurrence, per feature.

    The logit's gradient with respect to one id's latent, by central
    differences of `logits_of_latents` along each latent dimension of every
    slot at once (slots of one feature do not interact with each other in the
    'dlrm' teacher; for 'deep' this is the usual first-order estimate).
    """
    fs = data.features
    num, den = np.zeros(len(fs.sparse)), np.zeros(len(fs.sparse))
    eps = 1e-3
    for i in batches:
        b = data.eval_batch(i, batch)
        lat = data.slot_latents(b)
        p = 1.0 / (1.0 + np.exp(-data.logits_of_latents(b, lat)))
        valid = np.abs(lat).sum(-1) > 0  # [slots, B]: the bag is not empty at slot 0
        for t, f in enumerate(fs.sparse):
            cols = slice(fs.offsets[t], fs.offsets[t] + f.max_len)
            g2 = np.zeros(b.size)
            for k in range(LATENT_DIM):
                # move slot 0's latent of feature t (a valid id when the bag is not empty)
                up, down = lat.copy(), lat.copy()
                up[cols.start, :, k] += eps
                down[cols.start, :, k] -= eps
                g = (data.logits_of_latents(b, up) - data.logits_of_latents(b, down)) / (2 * eps)
                g2 += g * g
            n = np.asarray(b.lengths[:, t], np.float64)  # the bag's occurrences, each as informative
            num[t] += (n * p * (1 - p) * g2 / LATENT_DIM)[valid[cols.start]].sum()
            den[t] += n.sum()
    return num / np.maximum(den, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="training batches counted (default run: 1500)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--teacher", default="dlrm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scales", default="0.333,0.5,1,2,4,8,16,64",
                   help="multiples of the counted examples to report")
    args = p.parse_args()
    t0 = time.time()
    fs = synthetic_default_features()
    data = SyntheticData(fs, seed=args.seed, teacher=args.teacher)
    feature_of_slot = np.repeat(np.arange(len(fs.sparse)), [f.max_len for f in fs.sparse])
    counts = _counts(data, args.steps, args.batch_size)
    j = _fisher(data, range(1000, 1004), args.batch_size)
    evals = [data.eval_batch(i, args.batch_size) for i in range(args.eval_batches)]
    labels = np.concatenate([e.labels for e in evals])
    examples = args.steps * args.batch_size
    bayes = auc(np.concatenate([data.logits(e) for e in evals]), labels)
    ceiling = {}
    for scale in [float(x) for x in args.scales.split(",")]:
        z = []
        for e in evals:
            lat = data.slot_latents(e)
            ids_t = np.asarray(e.ids, np.int64).T
            n = np.stack([counts[feature_of_slot[c]][ids_t[c]] for c in range(fs.total_slots)]) * scale
            nj = n * j[feature_of_slot][:, None]
            rho = (nj / (1.0 + nj))[..., None]
            # the same noise for every occurrence of a row: hashed from (feature, id)
            key = (feature_of_slot[:, None].astype(np.uint64) << np.uint64(32)) | ids_t.astype(np.uint64)
            h = splitmix64(key[..., None] * np.uint64(2 * LATENT_DIM)
                           + np.arange(2 * LATENT_DIM, dtype=np.uint64))
            u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
            noise = np.sqrt(-2.0 * np.log1p(-u[..., :LATENT_DIM])) * np.cos(2 * np.pi * u[..., LATENT_DIM:])
            est = (rho * lat + np.sqrt(rho * (1.0 - rho)) * noise) * (np.abs(lat).sum(-1, keepdims=True) > 0)
            z.append(data.logits_of_latents(e, est))
        a = auc(np.concatenate(z), labels)
        ceiling[int(round(scale * examples))] = {"auc": round(a, 4), "lift": round((a - 0.5) / (bayes - 0.5), 4)}
    print(json.dumps({
        "teacher": args.teacher,
        "counted_examples": examples,
        "eval_examples": int(labels.size),
        "bayes_auc": round(bayes, 4),
        "fisher_per_occurrence": [round(float(x), 5) for x in j],
        "ceiling_by_training_examples": ceiling,
        "seconds": round(time.time() - t0, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
