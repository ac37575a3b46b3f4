#!/usr/bin/env python
"""Time and memory of the learned Tower Partitioner at scale.

    python benchmarks/partitioner_scale.py                       # 856 features, 8 hosts
    python benchmarks/partitioner_scale.py --features 214 --towers 8,64

Two parts, one JSON object each:

- `search`: `learned_partition` on F random features (rows log-uniform
  1e3-1e7, dims 16-128, 1-50 ids per bag; the cost it balances is 'work')
  with a planted interaction matrix (`--groups` groups: 1 + noise inside a
  group, noise across), for each tower count in `--towers` on `--hosts`
  hosts. Reports the wall time, the peak of Python/numpy memory
  (tracemalloc) and the share of the planted interaction kept inside towers.
- `hessian` (skip with `--no-hessian`): the "hessian" interaction measure of
  an untrained DLRM with F features (rows capped at 100: its cost does not
  depend on rows) on one CPU device, over `--examples` examples and
  `--probes` probes, at the default memory bound of one jitted call. Reports
  the wall time, the time per example and the process's peak RSS growth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _features(f: int, seed: int, max_rows: int | None = None):
    import numpy as np

    from jdmt.data.specs import FeatureSet, SparseFeature

    rng = np.random.default_rng(seed)
    rows = np.exp(rng.uniform(np.log(1e3), np.log(1e7), f)).astype(np.int64)
    if max_rows:
        rows = np.minimum(rows, max_rows)
    dims = rng.choice([16, 32, 64, 128], f)
    pool = rng.integers(1, 51, f)
    return FeatureSet(tuple(SparseFeature(f"f{i}", int(rows[i]), int(dims[i]), int(pool[i]))
                            for i in range(f)), num_dense=13)


def search(args) -> list[dict]:
    import numpy as np

    from jdmt.towers.partition_search import learned_partition

    fs = _features(args.features, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    groups = rng.integers(0, args.groups, args.features)
    w = rng.random((args.features, args.features)) * 0.05
    w[groups[:, None] == groups[None, :]] += 1.0
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0.0)
    planted = groups[:, None] == groups[None, :]
    out = []
    for t in args.towers:
        tracemalloc.start()
        t0 = time.perf_counter()
        part = learned_partition(fs, w, t, args.hosts)
        secs = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        labels = part.labels(fs.names)
        same = labels[:, None] == labels[None, :]
        out.append({
            "part": "search", "features": args.features, "towers": t, "hosts": args.hosts,
            "seconds": round(secs, 2), "peak_python_memory_mib": round(peak / 2**20, 1),
            "imbalance": round(part.report["imbalance"], 4),
            "tolerance_met": part.report["tolerance_met"],
            "within_fraction": round(part.report["within_fraction"], 4),
            # pairs i != j of a planted group that share a tower
            "planted_pairs_kept": round(float(((same & planted).sum() - args.features)
                                              / max(planted.sum() - args.features, 1)), 4),
        })
    return out


def hessian(args) -> dict:
    import jax

    from jdmt.mesh import make_mesh
    from jdmt.train import TrainConfig, Trainer
    from jdmt.train.interactions import hessian_interaction

    fs = _features(args.features, args.seed, max_rows=100)
    fs = type(fs)(tuple(f.__class__(f.name, f.rows, 16, min(f.max_len, 4)) for f in fs.sparse),
                  num_dense=fs.num_dense)
    cfg = TrainConfig(mesh="1x1", features=fs, embedding_dim=16, global_batch=8, eval_batches=1,
                      eval_batch_size=max(8, args.examples), bottom_mlp=(32,), top_mlp=(16,),
                      progress=False, steps=1)
    trainer = Trainer(cfg, make_mesh("1x1"))
    state = trainer.init_state()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    w = hessian_interaction(trainer, state, max_examples=args.examples, probes=args.probes)
    secs = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "part": "hessian", "features": args.features, "examples": args.examples,
        "probes": args.probes, "embedding_dim": 16, "backend": jax.default_backend(),
        "seconds": round(secs, 2), "seconds_per_example": round(secs / args.examples, 2),
        "peak_rss_growth_mib": round((rss1 - rss0) / 1024, 1),
        "finite": bool((w == w).all()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=856)
    p.add_argument("--hosts", type=int, default=8)
    p.add_argument("--towers", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64])
    p.add_argument("--groups", type=int, default=64, help="planted interaction groups")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hessian", action="store_true")
    p.add_argument("--examples", type=int, default=8, help="hessian: examples")
    p.add_argument("--probes", type=int, default=1, help="hessian: sign probes per feature")
    args = p.parse_args()
    for row in search(args):
        print(json.dumps(row), flush=True)
    if not args.no_hessian:
        from jdmt.mesh import prepare_devices

        prepare_devices("1x1", stream=open(os.devnull, "w"))
        print(json.dumps(hessian(args)), flush=True)


if __name__ == "__main__":
    main()
