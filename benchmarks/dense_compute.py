"""The DLRM dense part on CPU: achieved GFLOP/s of jdmt's model, of plain
`jnp.dot`s of the same shapes and of PyTorch, side by side in one run.

TorchRec's DLRM shape (`train_throughput.py`): a batch of `--batch` examples
(4096, one process's share), 13 dense features, bottom MLP 512-256-64, 26
pooled embeddings of 64, the dot interaction of 27 vectors (351 products),
top MLP 512-512-256-1. Each round times, on one device:

- `jdmt_model`: jdmt's `DLRM` forward and backward as the trainer runs it
  (loss, gradients of the parameters and of the embeddings), with the
  interaction in C++ (the CPU default) and, as `jdmt_model_xla_interaction`,
  in XLA ops;
- `jax_matmuls`: the MLPs' matmuls alone, forward and backward, as plain
  `jnp.dot`s (no bias, ReLU or interaction): what XLA:CPU's matmuls reach;
- with a peer (`--peer DIR` or JDMT_PEER), `peer_dense.py` under the peer's
  Python: the same matmuls in `torch.mm`, and the whole dense model in
  PyTorch (nn.Linear, ReLU, bmm interaction, BCE).

GFLOP/s count the MLPs' matmul FLOPs (forward, the weights' gradients, and
the inputs' gradients but the first layer's), the same count for every
column, so the model columns include the interaction and elementwise time
in their denominator. Threads: this process's cores for both (XLA's pool;
`torch.set_num_threads`). Prints one JSON object with the medians over
`--rounds` and the ratios (jdmt over torch: below 1 is faster).

    JDMT_PEER=DIR python benchmarks/dense_compute.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import peers
from lookup import median_ms
from peer_dense import add_shape_arguments, widths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    p.add_argument("--rounds", type=int, default=3, help="rounds of jdmt then the peer")
    peers.add_arguments(p)
    return p.parse_args(argv)


def matmul_flops(args) -> float:
    """The MLPs' forward and backward matmul FLOPs for one batch."""
    bottom, top = widths(args)
    layers = list(zip(bottom[:-1], bottom[1:])) + list(zip(top[:-1], top[1:]))
    mac = sum(i * o for i, o in layers)
    first = bottom[0] * bottom[1]  # no gradient of the dense features
    return 2.0 * args.batch * (3 * mac - first)


def jdmt_runs(args, threads: int) -> dict:
    """{name: a no-argument function that runs it once and blocks}."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jdmt.models import DLRM, init_dlrm

    bottom, top = widths(args)
    rng = np.random.default_rng(0)
    dense = jnp.asarray(rng.standard_normal((args.batch, args.dense)), jnp.float32)
    embs = jnp.asarray(rng.standard_normal((args.batch, args.features, args.dim)), jnp.float32)
    labels = jnp.asarray(rng.random(args.batch) < 0.3, jnp.float32)
    runs = {}
    for name, inter in (("jdmt_model", threads), ("jdmt_model_xla_interaction", 0)):
        model = DLRM(args.dim, tuple(bottom[1:-1]), tuple(top[1:-1]), interaction_threads=inter)
        params = init_dlrm(model, 0, args.dense, args.features)

        def loss(p, e, model=model):
            return optax.sigmoid_binary_cross_entropy(model.apply({"params": p}, dense, e), labels).mean()

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        runs[name] = lambda step=step, params=params: jax.block_until_ready(step(params, embs))

    ws = [jnp.asarray(rng.standard_normal((i, o)) * 0.05, jnp.float32) for i, o in zip(bottom[:-1], bottom[1:])]
    wt = [jnp.asarray(rng.standard_normal((i, o)) * 0.05, jnp.float32) for i, o in zip(top[:-1], top[1:])]
    x_top = jnp.asarray(rng.standard_normal((args.batch, top[0])), jnp.float32)

    @jax.jit
    def matmuls(ws, wt, x0, x1):
        out = []
        for chain, x in ((ws, x0), (wt, x1)):
            acts = [x]
            for w in chain:
                acts.append(jnp.dot(acts[-1], w))
            g = jnp.ones_like(acts[-1])
            for i in range(len(chain) - 1, -1, -1):
                out.append(jnp.dot(acts[i].T, g))  # the weight's gradient
                if i:
                    g = jnp.dot(g, chain[i].T)
        return out

    runs["jax_matmuls"] = lambda: jax.block_until_ready(matmuls(ws, wt, dense, x_top))
    return runs


def main(argv=None):
    args = parse_args(argv)
    from jdmt.embeddings.cpu_kernels import host_cores
    from jdmt.mesh import emulate_cpu_devices

    emulate_cpu_devices(1)
    threads = host_cores()
    peer, reason = peers.find(args.peer, args.peer_python)
    if peer is None:
        peers.warn_missing(reason, args.peer)
    runs = jdmt_runs(args, threads)
    bottom, top = widths(args)
    here = os.path.dirname(os.path.abspath(__file__))
    argv = ["--batch", str(args.batch), "--dense", str(args.dense), "--dim", str(args.dim),
            "--features", str(args.features), "--bottom", args.bottom, "--top", args.top,
            "--iters", str(args.iters), "--threads", str(threads)]
    rounds = []
    for _ in range(args.rounds if peer is not None else 1):
        r = {name: median_ms(fn, args.iters) for name, fn in runs.items()}
        if peer is not None:
            out = peer.run(os.path.join(here, "peer_dense.py"), argv, 1200).strip().splitlines()[-1]
            r.update({k.removesuffix("_ms"): v for k, v in json.loads(out).items() if k.endswith("_ms")})
        rounds.append(r)
    ms = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    flops = matmul_flops(args)
    row = {
        "benchmark": "dense_compute",
        "batch": args.batch, "bottom_mlp": bottom[1:], "top_mlp": top[1:],
        "interaction_vectors": args.features + 1, "threads": threads,
        "matmul_gflop_per_step": round(flops / 1e9, 3),
        "ms": {k: round(v, 2) for k, v in ms.items()},
        "gflops": {k: round(flops / (v / 1e3) / 1e9, 1) for k, v in ms.items()},
        "rounds": [{k: round(v, 2) for k, v in r.items()} for r in rounds],
        "peer": peers.describe(peer, reason),
    }
    if peer is not None:
        row["ratio_to_torch"] = {  # jdmt's time over torch's: below 1 is faster
            "model": round(ms["jdmt_model"] / ms["torch_model"], 3),
            "matmuls": round(ms["jax_matmuls"] / ms["torch_matmuls"], 3),
        }
        row["peer"]["torch_threads"] = threads
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
