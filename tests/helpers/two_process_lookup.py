"""One process of a two-process (2 hosts x 4 CPU devices) sharded step.

Usage: python two_process_lookup.py PORT PROCESS_ID SHARDING
Prints one JSON line: this process's mesh rows and a checksum of the tables
after one sparse step (identical on both processes, and equal to the
single-process run of the same step), and a digest of each replica of the
replicated storages it holds (`flexshard`: hot and warm rows; a test
compares them across the process boundary).
"""

import hashlib
import json
import sys

from jdmt.mesh import initialize_distributed, make_mesh

port, pid, sharding = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
initialize_distributed(f"127.0.0.1:{port}", 2, pid, local_devices=4)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdmt.data.specs import make_features  # noqa: E402
from jdmt.embeddings import ShardedEmbeddings, SparseOptimizer  # noqa: E402
from jdmt.mesh import DEVICES  # noqa: E402

mesh = make_mesh("2x4")
rows_by_process = [sorted({d.process_index for d in row}) for row in mesh.devices]

feats = make_features(6, 40, 8, 3, num_dense=1)
rng = np.random.default_rng(0)
B = 16
ids = rng.integers(0, 40, (B, feats.total_slots)).astype(np.int32)
lengths = rng.integers(0, 4, (B, 6)).astype(np.int32)
w = rng.standard_normal((B, 48)).astype(np.float32)

sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DEVICES))
lo, hi = pid * B // 2, (pid + 1) * B // 2  # this process's rows of the global batch
put = lambda x: jax.make_array_from_process_local_data(sh, x[lo:hi], x.shape)  # noqa: E731
if sharding == "flexshard":
    from jdmt.embeddings import Placement

    sharding = {f.name: Placement("flexshard", range(8), hot=(0, 5, 9), warm=(1, 2, 3, 7, 11, 30))
                for f in feats.sparse}
emb = ShardedEmbeddings(feats, mesh, sharding, SparseOptimizer(lr=0.3))
state = emb.init(seed=1)
step = jax.jit(lambda s, i, n, w: emb.step(s, i, n, lambda e, w: jnp.sum(e.pooled * w), w)[1])
new = step(state, put(ids), put(lengths), put(w))
tables, _ = emb.to_dense(new)
checksum = float(sum(np.abs(t).sum() * (k + 1) for k, t in enumerate(tables.values())))
replicas = {}  # storage -> {local rank or "all": digest of each replica this process holds}
for name, st in new.items():
    if name.startswith(("dp_", "hr_")):
        for shard in st.weights.addressable_shards:
            d = int(np.flatnonzero(mesh.devices.reshape(-1) == shard.device)[0])
            key = "all" if name.startswith("dp_") else str(d % 4)
            digest = hashlib.sha256(np.asarray(shard.data).tobytes()).hexdigest()
            replicas.setdefault(name, {}).setdefault(key, []).append(digest)
print(json.dumps({"process": pid, "rows": rows_by_process, "checksum": checksum, "replicas": replicas}),
      flush=True)
