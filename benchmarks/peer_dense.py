"""The DLRM dense part in PyTorch on CPU: run with the peer's Python by
`dense_compute.py` (it does not import jdmt). Prints one JSON line: the
median ms of the MLPs' matmuls alone, forward and backward (`torch.mm`), and
of the whole dense model (the bottom and top MLPs with biases and ReLUs, the
dot interaction, BCE loss), forward and backward.

    python benchmarks/peer_dense.py --batch 4096 --threads 1
"""

import argparse
import json
import statistics
import time


def add_shape_arguments(p) -> None:
    """The dense model's shape flags (`dense_compute.py` passes them on)."""
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dense", type=int, default=13)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--bottom", default="512,256")
    p.add_argument("--top", default="512,512,256")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per measurement")


def widths(a) -> tuple[list[int], list[int]]:
    """The bottom and top MLPs' layer widths, inputs first: the top MLP takes
    the bottom output and the interaction's (F + 1)F / 2 products."""
    n = a.features + 1
    bottom = [a.dense, *map(int, a.bottom.split(",")), a.dim]
    top = [a.dim + n * (n - 1) // 2, *map(int, a.top.split(",")), 1]
    return bottom, top


def main():
    p = argparse.ArgumentParser()
    add_shape_arguments(p)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    b, d, f = a.batch, a.dim, a.features
    bottom, top = widths(a)
    n = f + 1

    def mlp(widths):
        layers = []
        for i in range(len(widths) - 1):
            layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
            if i + 2 < len(widths) or widths is bottom:
                layers.append(torch.nn.ReLU())
        return torch.nn.Sequential(*layers)

    bot, topm = mlp(bottom), mlp(top)
    dense = torch.randn(b, a.dense)
    embs = torch.randn(b, f, d, requires_grad=True)
    labels = (torch.rand(b) < 0.3).float()
    iu = torch.triu_indices(n, n, 1)

    def model_step():
        for m in (bot, topm):
            m.zero_grad(set_to_none=True)
        embs.grad = None
        x = bot(dense)
        t = torch.cat([x[:, None], embs], dim=1)
        z = torch.bmm(t, t.transpose(1, 2))[:, iu[0], iu[1]]
        logit = topm(torch.cat([x, z], dim=1))[:, 0]
        torch.nn.functional.binary_cross_entropy_with_logits(logit, labels).backward()

    ws = [torch.randn(i, o) * 0.05 for i, o in zip(bottom[:-1], bottom[1:])]
    wt = [torch.randn(i, o) * 0.05 for i, o in zip(top[:-1], top[1:])]

    def matmuls():
        for chain, x0 in ((ws, dense), (wt, torch.randn(b, top[0]))):
            acts = [x0]
            for w in chain:
                acts.append(acts[-1] @ w)
            g = torch.ones_like(acts[-1])
            for i in range(len(chain) - 1, -1, -1):
                acts[i].T @ g  # the weight's gradient
                if i:
                    g = g @ chain[i].T  # the input's gradient (not for the first layer)

    def median_ms(fn):
        with torch.no_grad() if fn is matmuls else torch.enable_grad():
            fn()
            ts = []
            for _ in range(a.iters):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    print(json.dumps({"torch_matmuls_ms": median_ms(matmuls), "torch_model_ms": median_ms(model_step),
                      "torch": torch.__version__, "threads": a.threads}))


if __name__ == "__main__":
    main()
