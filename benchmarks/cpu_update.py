"""Microbenchmark: the fused sparse optimizer step of one local shard on CPU.

XLA `optimizers.sparse_step` vs the C++ FFI kernel `cpu_kernels.sparse_update`
on the DLRM-like shape: 26 slots x 100k rows x 64 dims, batch 4096 bags of 10
ids, ids from a Zipf(1.05) truncated to the table (inverse CDF), hot rows
scattered over the table by a random permutation.

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        python benchmarks/cpu_update.py [--opt rowwise_adagrad] [--threads 1,2]

Prints the median of --reps timed steps (after 2 warm-ups) for each variant.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdmt.embeddings import cpu_kernels, optimizers
from jdmt.embeddings.types import SparseOptimizer


def zipf_ids(rng, n_rows: int, shape, alpha: float = 1.05, permute: bool = True) -> np.ndarray:
    """Ids in [0, n_rows) with P(rank k) ~ k**-alpha (truncated, inverse CDF)."""
    p = np.arange(1, n_rows + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(shape)), n_rows - 1)
    if not permute:
        return ranks.astype(np.int32)
    return rng.permutation(n_rows).astype(np.int32)[ranks]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=26)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--hot", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=1.05)
    ap.add_argument("--opt", default="rowwise_adagrad")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--no-permute", action="store_true")
    ap.add_argument("--skip-xla", action="store_true")
    a = ap.parse_args()

    malloc = all(os.environ.get(k) for k in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"))
    print(f"jax {jax.__version__}, devices {jax.devices()[0].platform} x{jax.device_count()}, "
          f"malloc env {'set' if malloc else 'NOT set'}, loadavg {os.getloadavg()[0]:.2f}")
    rng = np.random.default_rng(0)
    k, r, d = a.slots, a.rows, a.dim
    base = (np.arange(k) * r).astype(np.int32)
    ids = zipf_ids(rng, r, (k, a.batch, a.hot), a.alpha, not a.no_permute) + base[:, None, None]
    uniq = np.mean([len(np.unique(ids[s])) for s in range(k)])
    print(f"{k} slots x {a.batch}x{a.hot} ids, {r} rows x {d}, unique rows/slot {uniq:.0f}, opt {a.opt}")
    # One storage buffer of k * r rows (what a device holds); each id's
    # gradient is its bag's row (a pooled bag's ids share it).
    rows = jnp.asarray(ids.reshape(-1))
    src = jnp.asarray(np.repeat(np.arange(k * a.batch, dtype=np.int32), a.hot))
    grads = jnp.asarray(rng.normal(size=(k * a.batch, d)).astype(np.float32))
    opt = SparseOptimizer(kind=a.opt, lr=0.01, eps=1e-8)

    def fresh():
        t = jnp.asarray(rng.normal(size=(k * r, d)).astype(np.float32) * 0.01)
        return t, optimizers.init_accumulator(opt, k * r, d)

    def bench(name, fn):
        t, acc = fresh()
        times = []
        for i in range(a.reps + 2):
            t0 = time.perf_counter()
            t, acc = fn(t, acc, rows, src, grads)
            jax.block_until_ready(t)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        ms = np.array(times) * 1e3
        print(f"{name:28s} median {np.median(ms):7.2f} ms  (min {ms.min():.2f}, max {ms.max():.2f})"
              f"  loadavg {os.getloadavg()[0]:.2f}")
        return np.median(ms)

    if not a.skip_xla:
        # capacity None (every id may be unique), and half the ids
        # (ShardedEmbeddings' default, unique_capacity=0.5)
        for cap in (None, k * a.batch * a.hot // 2):
            xla = jax.jit(
                lambda t, acc, i, s, g, cap=cap: optimizers.sparse_step(
                    opt, t, acc, i, s, g, lr=opt.lr, capacity=cap)[:2],
                donate_argnums=(0, 1))
            bench(f"xla sparse_step cap={cap}", xla)
    if not cpu_kernels.available():
        print("kernel unavailable:", cpu_kernels.unavailable_reason())
        return
    for th in [int(x) for x in a.threads.split(",")]:
        ker = jax.jit(
            lambda t, acc, i, s, g, th=th: cpu_kernels.sparse_update(
                opt.kind, t, acc, i, s, g, opt.lr, eps=opt.eps, threads=th),
            donate_argnums=(0, 1))
        bench(f"ffi kernel threads={th}", ker)

if __name__ == "__main__":
    main()
