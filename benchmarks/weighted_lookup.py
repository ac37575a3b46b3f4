"""Per-sample weights: the pooled lookup and its training step, weighted and
not, in jdmt and in FBGEMM's CPU TBE, side by side in one run.

One device, `lookup.py`'s shape (`--tables` tables of `--rows` x `--dim`,
`--batch` bags of `--pooling` Zipf ids each); every feature weighted (weights
uniform in [0.5, 1.5)) or none. jdmt's weighted bags ask for unique rows and
are pooled with their weights by the C++ lookup (`flat.pool_received`); its
unweighted bags are pooled at their owner. Each round times jdmt unweighted,
jdmt weighted, then (with a peer: `--peer DIR` or JDMT_PEER, built by the
peers' setup script) FBGEMM's TBE both ways (`peer_tbe_weighted.py`, run
with the peer's Python). Prints one JSON object: the medians over the
rounds, and the ratios (jdmt's time over FBGEMM's, below 1 is faster; and
each one's weighted time over its unweighted time).

    JDMT_PEER=DIR python benchmarks/weighted_lookup.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import peers
from lookup import median_ms, zipf_ids

FWD, STEP = "fbgemm TBE fwd", "fbgemm TBE fwd+bwd+RowWiseAdagrad (fused)"
WFWD, WSTEP = "fbgemm TBE weighted fwd", "fbgemm TBE weighted fwd+bwd+RowWiseAdagrad (fused)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--pooling", type=int, default=10)
    p.add_argument("--alpha", type=float, default=1.05)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per measurement")
    p.add_argument("--rounds", type=int, default=3, help="rounds of jdmt then the peer")
    peers.add_arguments(p)
    return p.parse_args(argv)


def jdmt_runs(args):
    """{weighted: (forward(), step())} on one device (table_wise, the defaults)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jdmt.data.specs import make_features
    from jdmt.embeddings import ShardedEmbeddings, SparseOptimizer
    from jdmt.mesh import make_mesh

    rng = np.random.default_rng(0)
    ids = np.concatenate([zipf_ids(rng, args.rows, args.alpha, (args.batch, args.pooling))
                          for _ in range(args.tables)], axis=1)
    lengths = np.full((args.batch, args.tables), args.pooling, np.int32)
    weights = rng.uniform(0.5, 1.5, ids.shape).astype(np.float32)
    grad = rng.standard_normal((args.batch, args.tables * args.dim)).astype(np.float32)
    mesh = make_mesh("1x1", devices=jax.devices()[:1])
    ids_d, len_d, g_d = jnp.asarray(ids), jnp.asarray(lengths), jnp.asarray(grad)

    def make(weighted: bool):
        feats = make_features(args.tables, args.rows, args.dim, args.pooling)
        if weighted:
            feats = dataclasses.replace(feats, sparse=tuple(dataclasses.replace(f, weighted=True)
                                                            for f in feats.sparse))
        emb = ShardedEmbeddings(feats, mesh, "table_wise", SparseOptimizer("rowwise_adagrad", lr=0.01))
        emb.fit_caps(args.batch, emb.measure(ids, lengths))
        w = jnp.asarray(weights) if weighted else None
        fwd = jax.jit(lambda s, i, n, w: emb.forward(s, i, n, w)[0].pooled)
        step = jax.jit(lambda s, i, n, w, g: emb.step(s, i, n, lambda e, g: jnp.sum(e.pooled * g), g,
                                                       weights=w)[1], donate_argnums=0)
        holder = [emb.init(seed=0)]

        def one_step():
            holder[0] = step(holder[0], ids_d, len_d, w, g_d)
            return holder[0]

        return (lambda: fwd(holder[0], ids_d, len_d, w)), one_step

    out = {weighted: make(weighted) for weighted in (False, True)}
    return out


def main(argv=None):
    args = parse_args(argv)
    peer, reason = peers.find(args.peer, args.peer_python)
    if peer is None:
        peers.warn_missing(reason, args.peer)
    runs = jdmt_runs(args)
    here = os.path.dirname(os.path.abspath(__file__))
    rounds = []
    for r in range(args.rounds):
        row = {}
        for weighted, (fwd, step) in runs.items():
            tag = "weighted" if weighted else "unweighted"
            row[f"jdmt {tag} fwd"] = median_ms(fwd, args.iters)
            row[f"jdmt {tag} fwd+bwd+RowWiseAdagrad"] = median_ms(step, args.iters)
        if peer is not None:
            argv = ["--tables", str(args.tables), "--rows", str(args.rows), "--dim", str(args.dim),
                    "--batch", str(args.batch), "--pooling", str(args.pooling), "--alpha", str(args.alpha),
                    "--iters", str(max(args.iters, 10))]
            row.update(peers.parse_ebc_bench(peer.run(os.path.join(here, "peer_tbe_weighted.py"), argv, 1200)))
        print(f"# round {r}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row.items()), flush=True)
        rounds.append(row)
    med = {k: round(statistics.median(x[k] for x in rounds), 2) for k in rounds[0]}
    out = {"benchmark": "weighted_lookup", "tables": args.tables, "rows": args.rows, "dim": args.dim,
           "batch": args.batch, "pooling": args.pooling, "alpha": args.alpha, "rounds": args.rounds,
           "ms": med,
           "jdmt_weighted_over_unweighted": {
               "fwd": round(med["jdmt weighted fwd"] / med["jdmt unweighted fwd"], 3),
               "fwd_bwd_update": round(med["jdmt weighted fwd+bwd+RowWiseAdagrad"]
                                       / med["jdmt unweighted fwd+bwd+RowWiseAdagrad"], 3)},
           "peer": peers.describe(peer, reason)}
    if peer is not None:
        out["fbgemm_weighted_over_unweighted"] = {"fwd": round(med[WFWD] / med[FWD], 3),
                                                  "fwd_bwd_update": round(med[WSTEP] / med[STEP], 3)}
        out["ratio_to_fbgemm"] = {  # jdmt's time over FBGEMM's: below 1 is faster
            "weighted_fwd": round(med["jdmt weighted fwd"] / med[WFWD], 3),
            "weighted_fwd_bwd_update": round(med["jdmt weighted fwd+bwd+RowWiseAdagrad"] / med[WSTEP], 3),
            "unweighted_fwd": round(med["jdmt unweighted fwd"] / med[FWD], 3),
            "unweighted_fwd_bwd_update": round(med["jdmt unweighted fwd+bwd+RowWiseAdagrad"] / med[STEP], 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
