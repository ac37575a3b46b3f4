"""FBGEMM's CPU TBE with and without per-sample weights (run with the peer's
Python by `benchmarks/weighted_lookup.py`; jdmt never imports torch).

Prints one summary table in the peers' `ebc_bench.py` format (`peers.parse_ebc_bench`):
the median ms of the forward and of forward + backward + fused row-wise
Adagrad, unweighted and weighted (`per_sample_weights`, SUM pooling), on
Zipf ids of `--tables` tables of `--rows` x `--dim`, `--batch` bags of
`--pooling` ids each.
"""

import argparse
import statistics
import time

import numpy as np
import torch


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--pooling", type=int, default=10)
    p.add_argument("--alpha", type=float, default=1.05)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    return p.parse_args()


def main():
    a = parse()
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, EmbeddingLocation, SplitTableBatchedEmbeddingBagsCodegen)

    t, r, d, b, p = a.tables, a.rows, a.dim, a.batch, a.pooling
    rng = np.random.default_rng(0)
    cdf = np.cumsum(np.arange(1, r + 1, dtype=np.float64) ** -a.alpha)
    cdf /= cdf[-1]
    ids = np.concatenate([rng.permutation(r)[np.minimum(np.searchsorted(cdf, rng.random(b * p)), r - 1)]
                          for _ in range(t)])  # table-major, bag after bag
    indices = torch.from_numpy(ids).long()
    offsets = torch.arange(0, t * b * p + 1, p, dtype=torch.long)
    weights = torch.from_numpy(rng.uniform(0.5, 1.5, ids.size).astype(np.float32))
    grad = torch.from_numpy(rng.standard_normal((b, t * d)).astype(np.float32))
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(r, d, EmbeddingLocation.HOST, ComputeDevice.CPU)] * t,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=a.lr, eps=1e-8,
        pooling_mode=PoolingMode.SUM, device=torch.device("cpu"))

    def timed(fn):
        times = []
        for i in range(a.warmup + a.iters):
            t0 = time.perf_counter()
            fn()
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times), min(times)

    def fwd(w):
        with torch.no_grad():
            return tbe(indices, offsets, per_sample_weights=w)

    def step(w):
        tbe(indices, offsets, per_sample_weights=w).backward(grad)

    rows = [("fbgemm TBE fwd", timed(lambda: fwd(None))),
            ("fbgemm TBE weighted fwd", timed(lambda: fwd(weights))),
            ("fbgemm TBE fwd+bwd+RowWiseAdagrad (fused)", timed(lambda: step(None))),
            ("fbgemm TBE weighted fwd+bwd+RowWiseAdagrad (fused)", timed(lambda: step(weights)))]
    print(f"torch {torch.__version__} threads={torch.get_num_threads()} T={t} rows={r} D={d} B={b} L={p}")
    print(f"{'variant':50s} {'median ms':>10s} {'min ms':>8s} {'samples/s':>11s} {'Mlookups/s':>11s}")
    for name, (med, mn) in rows:
        print(f"{name:50s} {med * 1e3:10.1f} {mn * 1e3:8.1f} {b / med:11.0f} {b * t * p / med / 1e6:11.2f}")


if __name__ == "__main__":
    main()
