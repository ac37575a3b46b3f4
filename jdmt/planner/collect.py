"""Measured fused steps of random table sets: the cost model's dataset.

    python -m jdmt.planner.collect --samples 3000 --out costs.npz

Each sample is one device's share of a random plan: 1 to `--max-tables`
tables (log-uniform) drawn from the train half of a DLRM-like pool
(`tablesets.dlrm_pool`), each table-wise, a column shard, a row-wise or
table-row-wise shard, or a replica (a mix drawn per set) on a mesh of 8, 16
or 64 devices, turned into pieces as the library routes them
(`measure.device_pieces`) and timed on this backend (`measure.Bench`: the library's forward and fused update). The file
holds the pieces, their features, the seconds, the backend, and how it was
made; `python -m jdmt.planner.neural` fits the cost model to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jdmt.embeddings.types import OptimizerKind, Placement, ShardingType, SparseOptimizer
from jdmt.planner.measure import Bench, Piece, backend_name, device_pieces
from jdmt.planner.tablesets import TableSpec, dlrm_pool, split_pool

MESHES = ((1, 8), (2, 8), (8, 8))
PIECE_FIELDS = ("rows", "width", "bags", "pooling", "alpha", "seed")


KINDS = ("table_wise", "column_wise", "row_wise", "table_row_wise", "data_parallel")


def random_piece(t: TableSpec, kind: str, rng: np.random.Generator, global_batch: int) -> Piece | None:
    """One device's piece of table `t` sharded as `kind` on a random mesh."""
    hosts, local = MESHES[rng.integers(len(MESHES))]
    n = hosts * local
    if kind == "column_wise":
        ks = [k for k in (2, 4, 8) if t.dim % k == 0 and t.dim // k >= 4] or [1]
        pl = Placement(ShardingType.COLUMN_WISE, tuple(range(int(rng.choice(ks)))))
    elif kind == "row_wise":
        pl = Placement(ShardingType.ROW_WISE, tuple(range(n)))
    elif kind == "table_row_wise" and hosts > 1:
        pl = Placement(ShardingType.TABLE_ROW_WISE, tuple(range(local)))
    elif kind == "data_parallel":
        pl = Placement(ShardingType.DATA_PARALLEL, tuple(range(n)))
    else:
        pl = Placement(ShardingType.TABLE_WISE, (0,))
    pieces = device_pieces([t], {t.name: pl}, hosts, local, global_batch)[0]
    return pieces[0] if pieces else None


def random_sets(pool: list[TableSpec], samples: int, *, max_tables: int, global_batch: int,
                max_bytes: int, seed: int = 0) -> list[list[Piece]]:
    """`samples` random sets of pieces whose rows of each width fit `max_bytes`.

    A set has k pieces, k log-uniform on [1, max_tables], and its own mix of
    sharding kinds (Dirichlet weights over `KINDS`), so sets range from all
    table-wise to all row-wise shards, as plans do."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < samples:
        k = int(np.exp(rng.uniform(0, np.log(max_tables + 1))))
        k = min(max(k, 1), max_tables)
        mix = rng.dirichlet(np.full(len(KINDS), 0.5))
        rows: dict[int, int] = {}
        pieces = []
        for i in rng.choice(len(pool), k):
            kind = KINDS[int(rng.choice(len(KINDS), p=mix))]
            if kind == "data_parallel" and pool[i].rows > 100_000:
                kind = "table_wise"  # replicas are small tables
            p = random_piece(pool[i], kind, rng, global_batch)
            if p is None or 4 * p.width * (rows.get(p.width, 0) + p.rows) > max_bytes:
                continue
            rows[p.width] = rows.get(p.width, 0) + p.rows
            pieces.append(Piece(p.rows, p.width, p.bags, p.pooling, p.alpha, int(rng.integers(1 << 30))))
        if pieces:
            out.append(pieces)
    return out


def save(path: str | Path, sets: list[list[Piece]], seconds, meta: dict) -> None:
    """Writes sets (f64[S, K, 6] pieces, NaN-padded), seconds and meta (atomically)."""
    k = max(len(s) for s in sets)
    arr = np.full((len(sets), k, len(PIECE_FIELDS)), np.nan)
    for i, s in enumerate(sets):
        for j, p in enumerate(s):
            arr[i, j] = [getattr(p, f) for f in PIECE_FIELDS]
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, pieces=arr, seconds=np.asarray(seconds, np.float64), meta=np.array(json.dumps(meta)))
    tmp.replace(path)


def load(path: str | Path) -> tuple[list[list[Piece]], np.ndarray, dict]:
    """(sets, seconds, meta) of a file `save` wrote."""
    with np.load(path) as z:
        arr, seconds, meta = z["pieces"], z["seconds"], json.loads(str(z["meta"]))
    sets = []
    for row in arr:
        s = []
        for v in row:
            if np.isnan(v[0]):
                break
            s.append(Piece(int(v[0]), int(v[1]), int(v[2]), float(v[3]), float(v[4]), int(v[5])))
        sets.append(s)
    return sets, seconds, meta


def collect(samples: int, *, max_tables: int = 512, global_batch: int = 2048, max_bytes: int = 1 << 30,
            pool_rows: int = 2_000_000, optimizer: str = "rowwise_adagrad", iters: int = 3,
            seed: int = 0, progress: bool = True) -> tuple[list[list[Piece]], np.ndarray, dict]:
    """Draws and measures `samples` sets; returns (sets, seconds, meta)."""
    opt = SparseOptimizer(kind=OptimizerKind(optimizer))
    train_pool, _ = split_pool(dlrm_pool(max_rows=pool_rows, seed=seed), seed=seed)
    sets = random_sets(train_pool, samples, max_tables=max_tables, global_batch=global_batch,
                       max_bytes=max_bytes, seed=seed + 1)
    bench = Bench(opt, iters=iters, max_bytes=max_bytes)
    t0 = time.perf_counter()
    seconds = []
    for i, s in enumerate(sets):
        seconds.append(bench.run(s))
        if progress and (i + 1) % 100 == 0:
            el = time.perf_counter() - t0
            print(f"collect: {i + 1}/{len(sets)} sets, {el:.0f} s", file=sys.stderr, flush=True)
    meta = {"backend": backend_name(), "kernel": bench.kernel, "optimizer": opt.kind.value,
            "global_batch": global_batch, "max_tables": max_tables, "max_bytes": max_bytes,
            "pool_rows": pool_rows, "iters": iters, "seed": seed, "samples": len(sets),
            "seconds_collecting": time.perf_counter() - t0}
    return sets, np.asarray(seconds), meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jdmt.planner.collect", description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--out", required=True, help="dataset file (.npz)")
    ap.add_argument("--max-tables", type=int, default=512,
                    help="tables per set, at most (a device of a 856-table plan on 64 devices holds "
                    "a shard of every row-wise table: hundreds)")
    ap.add_argument("--global-batch", type=int, default=2048)
    ap.add_argument("--max-bytes", type=int, default=1 << 30, help="table bytes per width per set, at most")
    ap.add_argument("--pool-rows", type=int, default=2_000_000, help="largest table of the pool")
    ap.add_argument("--optimizer", default="rowwise_adagrad", choices=[k.value for k in OptimizerKind])
    ap.add_argument("--iters", type=int, default=3, help="timed steps per set (median)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.samples < 1 or a.max_tables < 1 or a.global_batch < 1:
        ap.error("--samples, --max-tables and --global-batch must be >= 1")
    sets, seconds, meta = collect(a.samples, max_tables=a.max_tables, global_batch=a.global_batch,
                                  max_bytes=a.max_bytes, pool_rows=a.pool_rows, optimizer=a.optimizer,
                                  iters=a.iters, seed=a.seed)
    save(a.out, sets, seconds, meta)
    print(json.dumps({"out": a.out, **meta, "median_step_s": float(np.median(seconds))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
