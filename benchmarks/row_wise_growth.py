#!/usr/bin/env python
"""How row-wise cross-host requests grow with the mesh, and the least any routing can send.

    python benchmarks/row_wise_growth.py                   # MLPerf tables (rows capped at 10k), 2x4 vs 8x8
    python benchmarks/row_wise_growth.py --shape default   # the default synthetic set

Row-wise sharding puts row r of every table on device r mod N. For the same
global batch on each mesh, counted on the real synthetic ids (no
compilation, numpy only), this prints per mesh the row requests that cross
hosts:

- `raw`: one per id occurrence (no de-duplication);
- `per_device`: one per unique (requesting device, feature, row): what the
  direct row-wise route sends (`--row-dedup=device`, `jdmt.embeddings.flat`);
- `per_host`: one per unique (requesting host, feature, row): the least any
  routing can send across hosts, since every host must receive each row it
  needs from another host at least once; jdmt's default two-hop route
  (`--row-dedup=host`, `jdmt.embeddings.two_hop`) sends exactly this.

and the growth of each from the first mesh to the second. The growth of
`per_host` is the floor for any row-wise exchange: de-duplication removes
more at the smaller mesh (more examples per device and per host), so the
de-duplicated counts grow faster than `raw` (whose growth is just the
cross-host share of owners, (H-1)/H) while staying far below it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jdmt.data import SyntheticData, mlperf_dcnv2_features, synthetic_default_features  # noqa: E402
from jdmt.mesh import parse_mesh_spec  # noqa: E402


def cross_host_requests(fs, batch, hosts: int, local: int) -> dict[str, int]:
    """Row requests of one batch that cross hosts on a `hosts` x `local` mesh."""
    n = hosts * local
    b = batch.size
    if b % n:
        raise ValueError(f"batch {b} is not divisible by {n} devices")
    examples, keys = [], []
    for t, f in enumerate(fs.sparse):
        valid = np.arange(f.max_len)[None, :] < batch.lengths[:, t : t + 1]
        examples.append(np.broadcast_to(np.arange(b)[:, None], valid.shape)[valid])
        keys.append((np.int64(t) << 40) | batch.feature_ids(fs, f.name)[valid].astype(np.int64))
    ex, key = np.concatenate(examples), np.concatenate(keys)
    device = ex // (b // n)
    host = device // local
    cross = host != ((key & ((1 << 40) - 1)) % n) // local
    return {
        "raw": int(cross.sum()),
        "per_device": int(np.unique(np.stack([device[cross], key[cross]]), axis=1).shape[1]),
        "per_host": int(np.unique(np.stack([host[cross], key[cross]]), axis=1).shape[1]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--meshes", default="2x4,8x8")
    p.add_argument("--shape", choices=("mlperf", "default"), default="mlperf")
    p.add_argument("--rows", type=int, default=10_000, help="mlperf: rows cap of every table")
    p.add_argument("--batch", type=int, default=4096, help="global batch (the same on every mesh)")
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args()
    fs = (mlperf_dcnv2_features(max_rows=args.rows, dim=128) if args.shape == "mlperf"
          else synthetic_default_features())
    data = SyntheticData(fs)
    batches = [data.batch(s, args.batch) for s in range(args.batches)]
    meshes = [parse_mesh_spec(m) for m in args.meshes.split(",")]
    per_mesh = {}
    for h, ln in meshes:
        tot: dict[str, int] = {}
        for bt in batches:
            for k, v in cross_host_requests(fs, bt, h, ln).items():
                tot[k] = tot.get(k, 0) + v
        per_mesh[f"{h}x{ln}"] = {k: v / len(batches) for k, v in tot.items()}
    names = list(per_mesh)
    first, last = per_mesh[names[0]], per_mesh[names[-1]]
    print(json.dumps({
        "shape": args.shape, "global_batch": args.batch,
        "cross_host_requests_per_step": per_mesh,
        f"growth_{names[0]}_to_{names[-1]}": {k: round(last[k] / first[k], 3) for k in first},
    }, indent=1))


if __name__ == "__main__":
    main()
