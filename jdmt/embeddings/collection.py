"""Sharded embedding collection: every table of a model, placed by a plan.

A training step is two `shard_map` programs around the dense model:

    embs, ctx, stats = emb.forward(state, ids, lengths)   # ids to owners, rows back
    loss, g_embs = jax.value_and_grad(dense_loss)(embs)    # the dense part (GSPMD)
    state, ustats = emb.update(state, ctx, g_embs, ids, lengths,
                               skip=emb.must_skip(stats))  # gradients to owners, fused update

The gradient is taken with respect to the embeddings, never the tables:
`update` sends each bag's (or each unique row's) gradient back to the owner
of its rows, where `optimizers.sparse_step` sums the gradients of every
touched row and updates those rows in place. `forward` and `update` are
not differentiated (their exchanges are written out both ways).

Where the step cannot be exact it says so and changes nothing:
`stats["overflow"]` > 0 means some exchange block had more rows than its
capacity, `stats["out_of_range"]` > 0 counts ids outside their table. With
`skip=must_skip(stats)`, `update` then writes nothing; the caller raises the
capacities (`grow`) and repeats the step, or reports the bad ids. Nothing
is ever dropped silently.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdmt import precision
from jdmt.data.specs import Combiner, FeatureSet
from jdmt.embeddings import optimizers, routing
from jdmt.embeddings.exchange import MODES, broadcast
from jdmt.embeddings.flat import (Caps, Stats, WidthRoute, _read_token, owner_rows, piece_weights, pool_received,
                                 position_grads)
from jdmt.embeddings.host_replicated import LocalRows, replica_sum
from jdmt.embeddings.hosted import HostCaps, HostPath
from jdmt.embeddings.layout import Layout, Memory, storage_name
from jdmt.embeddings.tiers import TierFold
from jdmt.embeddings import two_hop
from jdmt.embeddings.two_hop import HopCaps, TwoHopRows
from jdmt.embeddings.types import (
    OptimizerKind,
    Placement,
    ShardingType,
    SparseOptimizer,
    check_plan,
    plan_sharding,
)
from jdmt.mesh import DEVICES, HOST, LOCAL, host_numpy, mesh_shape
from jdmt.pallas_kernels.common import Impl, resolve

__all__ = [
    "Embeddings",
    "OutOfRangeIdError",
    "ShardedEmbeddings",
    "TableState",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TableState:
    """A storage buffer and its optimizer state (global arrays)."""

    weights: jax.Array  # f32[N * R, D] sharded over devices, or f32[R, D] replicated
    accum: jax.Array | None  # f32[N * R] / f32[N * R, D] / None


@dataclasses.dataclass
class Embeddings:
    """The looked-up embeddings of a batch.

    Attributes:
      pooled: f32[B, sum of dims] pooled features side by side in feature
        order (None if there are none), like TorchRec's KeyedTensor.
      sequence: `{name: f32[B, S, D]}` sequence features (zeros past each length).
      pooled_names, pooled_dims: the keys and widths of `pooled`'s blocks.
    """

    pooled: jax.Array | None
    sequence: dict[str, jax.Array]
    pooled_names: tuple[str, ...] = ()
    pooled_dims: tuple[int, ...] = ()

    def stacked(self) -> jax.Array:
        """Pooled features as f32[B, F, D] (all pooled dims must be equal)."""
        if len(set(self.pooled_dims)) != 1:
            raise ValueError(f"pooled features have different dims {self.pooled_dims}")
        return self.pooled.reshape(self.pooled.shape[0], len(self.pooled_dims), self.pooled_dims[0])

    def __getitem__(self, name: str) -> jax.Array:
        if name in self.sequence:
            return self.sequence[name]
        i = self.pooled_names.index(name)
        start = sum(self.pooled_dims[:i])
        return self.pooled[:, start : start + self.pooled_dims[i]]

    def to_dict(self) -> dict[str, jax.Array]:
        """Every feature's embedding by name."""
        return {n: self[n] for n in (*self.pooled_names, *self.sequence)}


jax.tree_util.register_dataclass(
    Embeddings, data_fields=["pooled", "sequence"], meta_fields=["pooled_names", "pooled_dims"]
)


class OutOfRangeIdError(ValueError):
    """Ids outside a table's rows reached the device path."""


class ShardedEmbeddings:
    """All embedding tables of a model, sharded over a `('host','local')` mesh.

    Args:
      features: the model's feature set (one table per sparse feature).
      mesh: the jdmt mesh.
      sharding: a sharding type for all tables, a type per table, or a full
        plan (`{name: Placement}`). A `flexshard` placement with hot and
        warm rows is laid out as three tier tables (`jdmt.embeddings.tiers`):
        `features` stays the model's, `tables` lists what is laid out and
        routed (the tier tables in place of the flexshard tables).
      optimizer: the fused sparse optimizer.
      unique_capacity: fraction of a storage's gradient rows that one chunk of
        the update holds as unique rows (None: all). A step with more unique
        rows runs more chunks: nothing is dropped; only the time changes.
      cpu_kernels: run the optimizer step of each storage whose update does
        not communicate (all but those holding column shards, with row-wise
        Adagrad) as the C++ FFI kernel (`jdmt.embeddings.cpu_kernels`). None
        (default): when every device of the mesh is a CPU and the kernel
        builds; False: always the XLA path. Not used with Pallas kernels.
      kernel: the owners' lookups and updates: "xla", "pallas"
        (`jdmt.pallas_kernels`: the target's kernels; interpreted on a CPU
        mesh) or "auto" (Pallas on TPU and GPU, XLA on CPU); or a resolved
        `pallas_kernels.Impl`.
      exchange: "auto" (ragged all-to-alls on GPU/TPU, padded on CPU),
        "ragged", "padded" or "emulated" (`jdmt.embeddings.exchange`).
      bag_features: names of the pooled features whose whole-table pieces
        (table-wise, column shards) send bags to their owner, which pools
        them; the others' ids ask for unique rows. Default: the features
        with more than one id per bag (a one-id bag costs the same row
        either way, and de-duplication can only save).
      host_features: names of table-wise features (placed inside one host)
        that take the host path (`jdmt.embeddings.hosted`: to the host
        first, then inside it) instead of the flat one; table-row-wise
        features always do. SPTT routes every feature so.
      towers: the host path stops at the entry devices: `forward` returns
        the hosted bags pooled there (the Tower Modules' inputs) instead of
        embeddings at the requesters (every feature must be hosted).
      row_dedup: how row-wise requests are de-duplicated before they cross
        hosts: "host" (default; `jdmt.embeddings.two_hop`: inside the host
        first, then one request per host and row across hosts) or
        "device" (every device asks the row shards directly, one request
        per device and row). "host" applies on meshes with more than one
        host and more than one device per host; elsewhere both are the
        direct route.
      table_dtype: the tables' value type: "f32" (default), "bf16" or "f16"
        (`jdmt.precision`: rows stored in 16 bits, read as f32, updated in
        f32 and written back with stochastic rounding; the optimizer state
        stays f32). The state holds 16-bit rows as their bit patterns
        (`storage_dtype`: bf16 as uint16, f16 as int16); `to_dense` gives
        f32 values. 16-bit tables run on the XLA and C++ paths, not the
        Pallas kernels.
    """

    def __init__(
        self,
        features: FeatureSet,
        mesh: Mesh,
        sharding: str | ShardingType | Mapping[str, str | ShardingType | Placement] = "table_wise",
        optimizer: SparseOptimizer = SparseOptimizer(),
        *,
        unique_capacity: float | None = 0.5,
        cpu_kernels: bool | None = None,
        kernel: str | Impl = "auto",
        exchange: str = "auto",
        bag_features=None,
        host_features=None,
        towers: bool = False,
        row_dedup: str = "host",
        table_dtype="f32",
    ):
        self.features = features
        self.table_dtype = precision.resolve_dtype(table_dtype)  # the values' type
        self.storage_dtype = precision.storage_dtype(self.table_dtype)  # the state's
        if row_dedup not in ("host", "device"):
            raise ValueError(f"row_dedup must be 'host' or 'device', got {row_dedup!r}")
        platform = mesh.devices.flat[0].platform
        self.impl = kernel if isinstance(kernel, Impl) else resolve(kernel, platform=platform)
        if self.impl.pallas:
            if cpu_kernels:
                raise ValueError("cpu_kernels=True and Pallas kernels exclude each other")
            if precision.is_half(self.table_dtype):
                raise ValueError(f"{precision.dtype_name(self.table_dtype)} tables run on the XLA and C++ "
                                 "paths; the Pallas kernels take f32 tables (kernel='xla')")
            cpu_kernels = False
        if exchange not in MODES:
            raise ValueError(f"exchange must be one of {MODES}, got {exchange!r}")
        self.exchange_mode = exchange
        self.unique_capacity = unique_capacity
        self.mesh = mesh
        self.hosts, self.local = mesh_shape(mesh)
        self.num_devices = self.hosts * self.local
        self.optimizer = optimizer
        if cpu_kernels is None or cpu_kernels:
            from jdmt.embeddings import cpu_kernels as ck

            on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
            if cpu_kernels and not (on_cpu and ck.available()):
                raise ValueError("cpu_kernels=True needs a CPU mesh and a built kernel: "
                                 + (ck.unavailable_reason() or "the mesh is not on CPU"))
            cpu_kernels = on_cpu and ck.available()
        self.cpu_kernels = bool(cpu_kernels)
        if self.cpu_kernels:  # the pooled lookup in C++ too, over this process's share of cores
            from jdmt.embeddings.cpu_kernels import host_cores

            mine = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
            self.impl = dataclasses.replace(
                self.impl, cpu_threads=max(1, host_cores() // max(1, mine)))
        if isinstance(sharding, Mapping) and all(isinstance(v, Placement) for v in sharding.values()):
            plan = dict(sharding)
        else:
            plan = plan_sharding(features, self.num_devices, sharding, local=self.local)
        check_plan(features, plan, self.num_devices, self.local)
        self.plan = {f.name: plan[f.name] for f in features.sparse}
        self.layout = Layout(features, self.plan, self.hosts, self.local)
        # From here on `features` are the layout's tables: a flexshard table's
        # tier tables in its place (`jdmt.embeddings.tiers`); the model's
        # features are `user_features`.
        features = self.tables = self.layout.features
        if self.layout.row_tiers and towers:
            raise ValueError("flexshard tables take the flat path, not towers")
        if any(self.layout.tier_of[i] is not None for i in self.tables.weighted_idx):
            raise ValueError("weighted features cannot be flexshard tables")
        if bag_features is None:
            bag = frozenset(i for i, f in enumerate(features.sparse) if f.pooled and f.max_len > 1)
        else:
            bag = frozenset(features.index(n) for n in bag_features if n in features.names)
        self.bag_features = bag
        hosted = {i for i, f in enumerate(features.sparse)
                  if self.layout.plan[f.name].type is ShardingType.TABLE_ROW_WISE}
        hosted |= {features.index(n) for n in (host_features or ()) if n in features.names}
        self.towers = bool(towers)
        if self.towers and len(hosted) != len(features.sparse):
            raise ValueError("towers=True needs every feature on the host path (host_features)")
        self.host = None
        exclude = frozenset()
        if hosted:
            host_bags = frozenset(hosted) if self.towers else frozenset(
                i for i in hosted if features.sparse[i].pooled and i in bag)
            self.host = HostPath(self.layout, frozenset(hosted), host_bags, towers=self.towers)
            exclude = frozenset(self.host.piece.values())
        # row-wise pieces of a width take two hops where de-duplication per host applies
        self.hops: dict[int, TwoHopRows] = {}
        if row_dedup == "host":
            for w in self.layout.widths:
                rw = [i for i, p in enumerate(self.layout.pieces) if p.width == w and i not in exclude
                      and p.type is ShardingType.ROW_WISE and not p.replicated]
                if rw and two_hop.usable(self.layout, w):
                    self.hops[w] = TwoHopRows(self.layout, w, rw)
        self.row_dedup = "host" if self.hops else "device"
        hopped = frozenset(i for r in self.hops.values() for i in r.pieces)
        self.routes = {w: WidthRoute(self.layout, w, bag, exclude | hopped) for w in self.layout.widths}
        self.routes = {w: r for w, r in self.routes.items() if r.pieces}
        self.hr_routes = {w: LocalRows(self.layout, w) for w in self.layout.hr_rows}
        self._caps: dict[int, dict[int, Caps]] = {}
        self.version = 0  # bumped when capacities change (re-trace jitted steps)
        self._static_tables()

    # ---- static tables -----------------------------------------------------------------------

    def _static_tables(self) -> None:
        feats = self.tables.sparse
        offs = self.tables.offsets
        slots = self.tables.total_slots
        ufeats = self.features.sparse  # the batch's columns are the model's features'
        self._col_feature = np.concatenate([[i] * f.max_len for i, f in enumerate(ufeats)]).astype(np.int32)
        self._col_pos = np.concatenate([np.arange(f.max_len) for f in ufeats]).astype(np.int32)
        self._col_rows = np.array([ufeats[i].rows for i in self._col_feature], np.int32)
        self._col_hashed = np.array([ufeats[i].hashed for i in self._col_feature], bool)
        self.user_pooled_idx = [i for i, f in enumerate(ufeats) if f.pooled]
        self.user_seq_idx = [i for i, f in enumerate(ufeats) if not f.pooled]
        self._dp: dict[int, list[int]] = {}
        for i, p in enumerate(self.layout.pieces):
            if p.replicated:
                self._dp.setdefault(p.width, []).append(i)
        self._dp_cols = {
            w: np.concatenate([offs[self.layout.pieces[i].feature] + np.arange(feats[self.layout.pieces[i].feature].max_len)
                               for i in v]).astype(np.int64)
            for w, v in self._dp.items()
        }
        self._dp_weighted = {w: [feats[self.layout.pieces[i].feature].weighted for i in v]
                             for w, v in self._dp.items()}
        self._dp_pos = {}
        for w, v in self._dp.items():
            start, pos = 0, []
            for i in v:
                m = feats[self.layout.pieces[i].feature].max_len
                pos.append(np.arange(start, start + m))
                start += m
            self._dp_pos[w] = pos
        self.pooled_idx = [i for i, f in enumerate(feats) if f.pooled]
        self.seq_idx = [i for i, f in enumerate(feats) if not f.pooled]
        # piece -> its first column in the pooled embeddings f32[B, sum dims]
        self._pooled_col, start = {}, 0
        for i in self.pooled_idx:
            for j, p in enumerate(self.layout.pieces):
                if p.feature == i:
                    self._pooled_col[j] = start + p.col0
            start += feats[i].dim
        self._mean = [i for i in self.pooled_idx if feats[i].combiner is Combiner.MEAN]
        del slots
        self.tier_fold = TierFold(self.features, self.layout)
        # each canon column's column of the batch's weights (a zero column past them
        # for unweighted features, tier tables and the last, all -1, column)
        umap = self.features.weight_map()
        none = self.features.weight_slots
        if self.tier_fold.active:
            uoff = self.features.offsets
            umap = np.concatenate([
                umap[uoff[u] : uoff[u] + feats[v].max_len] if self.layout.tier_of[v] is None
                else np.full(feats[v].max_len, none, np.int32)
                for v, u in enumerate(self.layout.source)])
        self._wmap = np.concatenate([umap, [none]]).astype(np.int32)

    # ---- capacities ---------------------------------------------------------------------------

    def caps(self, batch: int) -> dict:
        """Block capacities for a local batch of `batch` samples:
        `{"flat": {width: Caps}, "host": HostCaps or None, "hop": {width: HopCaps}}`."""
        if batch not in self._caps:
            self._caps[batch] = {
                "flat": {w: r.default_caps(batch) for w, r in self.routes.items()},
                "host": None if self.host is None else self.host.default_caps(batch),
                "hop": {w: r.default_caps(batch) for w, r in self.hops.items()},
                "hr": {w: r.default_caps(batch) for w, r in self.hr_routes.items()},
            }
        return self._caps[batch]

    def set_caps(self, batch: int, caps: Mapping) -> None:
        self._caps[batch] = dict(caps)
        self.version += 1

    def grow(self, batch: int, stats: Mapping) -> dict:
        """Raise the capacities that `stats` (a step's, host values) say were
        too small, to what was needed plus a quarter (never past the bounds
        that cannot overflow); returns the new capacities."""
        old = self.caps(batch)
        need = {k: int(v) for k, v in stats["need"].items()}

        def up(have, key, bound):
            want = need.get(key, 0)
            if want <= have:
                return have
            return int(min(bound, -(-int(want * 1.25 + 8) // 8) * 8))

        flat = {w: Caps(up(c.bag_ids, f"w{w}/bag_ids", r.bag_bound(batch)),
                        up(c.rows, f"w{w}/rows", r.row_bound(batch)))
                for (w, c), r in zip(old["flat"].items(), self.routes.values())}
        host = old["host"]
        if host is not None:
            bd = self.host.bound(batch)
            host = HostCaps(
                up(host.bag_ids, "host/bag_ids", bd.bag_ids),
                {w: up(v, f"host/local_bag_ids_{w}", bd.local_bag_ids[w]) for w, v in host.local_bag_ids.items()},
                {w: up(v, f"host/local_rows_{w}", bd.local_rows[w]) for w, v in host.local_rows.items()},
                {w: up(v, f"host/host_rows_{w}", bd.host_rows[w]) for w, v in host.host_rows.items()},
                {w: up(v, f"host/fwd_rows_{w}", bd.fwd_rows[w]) for w, v in host.fwd_rows.items()},
            )
        hop = {}
        for w, c in old["hop"].items():
            bd = self.hops[w].bound(batch)
            hop[w] = HopCaps(up(c.local, f"w{w}/rows_local", bd.local), up(c.host, f"w{w}/rows_host", bd.host))
        hr = {w: up(c, f"hr{w}/rows", self.hr_routes[w].bound(batch)) for w, c in old.get("hr", {}).items()}
        new = {"flat": flat, "host": host, "hop": hop, "hr": hr}
        self.set_caps(batch, new)
        return new

    def measure(self, ids: np.ndarray, lengths: np.ndarray) -> dict[str, int]:
        """What each exchange of a step needs for a global batch (host numpy,
        no device work): the keys and meaning of `forward`'s `stats["need"]`."""
        ids, lengths = np.asarray(ids), np.asarray(lengths)
        valid = self._col_pos[None, :] < lengths[:, self._col_feature]
        rows = self._col_rows[None, :].astype(np.int64)
        r = np.where(self._col_hashed[None, :], np.mod(ids, rows), ids)
        canon = np.where(valid & (r >= 0) & (r < rows), r, -1).astype(np.int32)
        canon = np.concatenate([canon, np.full((canon.shape[0], 1), -1, np.int32)], axis=1)
        canon = self.tier_fold.to_tiers(canon, np)
        canon = canon.reshape(self.num_devices, -1, canon.shape[1])
        out = {}
        for r_ in self.routes.values():
            out.update(r_.measure(canon))
        if self.host is not None:
            out.update(self.host.measure(canon))
        for r_ in self.hops.values():
            out.update(r_.measure(canon))
        for r_ in self.hr_routes.values():
            out.update(r_.measure(canon))
        return out

    def fit_caps(self, batch: int, need: Mapping[str, int], headroom: float = 1.25) -> dict:
        """Capacities from measured needs (`measure` over a few batches, max
        taken): each `headroom` times its need plus 8, in multiples of 8, never
        past the bound that cannot overflow. A later batch that needs more
        overflows visibly (`stats["overflow"]`) and `grow` raises it."""
        def fit(key, bound):
            want = int(np.ceil(need.get(key, 0) * headroom)) + 8
            return int(min(bound, max(8, -(-want // 8) * 8)))

        flat = {w: Caps(fit(f"w{w}/bag_ids", r.bag_bound(batch)), fit(f"w{w}/rows", r.row_bound(batch)))
                for w, r in self.routes.items()}
        host = None
        if self.host is not None:
            bd = self.host.bound(batch)
            host = HostCaps(
                fit("host/bag_ids", bd.bag_ids),
                {w: fit(f"host/local_bag_ids_{w}", v) for w, v in bd.local_bag_ids.items()},
                {w: fit(f"host/local_rows_{w}", v) for w, v in bd.local_rows.items()},
                {w: fit(f"host/host_rows_{w}", v) for w, v in bd.host_rows.items()},
                {w: fit(f"host/fwd_rows_{w}", v) for w, v in bd.fwd_rows.items()},
            )
        hop = {}
        for w, r in self.hops.items():
            bd = r.bound(batch)
            hop[w] = HopCaps(fit(f"w{w}/rows_local", bd.local), fit(f"w{w}/rows_host", bd.host))
        hr = {w: fit(f"hr{w}/rows", r.bound(batch)) for w, r in self.hr_routes.items()}
        self.set_caps(batch, {"flat": flat, "host": host, "hop": hop, "hr": hr})
        return self._caps[batch]

    def describe_caps(self, batch: int) -> dict[str, int]:
        """The capacities for a local batch, flat: `{key: rows per block}` (the
        keys of `stats["need"]`, only those of exchanges this plan has)."""
        c = self.caps(batch)
        out = {}
        for w, r in self.routes.items():
            if r.bag_pieces:
                out[f"w{w}/bag_ids"] = c["flat"][w].bag_ids
            if r.row_pieces:
                out[f"w{w}/rows"] = c["flat"][w].rows
        h = c["host"]
        if h is not None:
            hp = self.host
            if hp.bag_set:
                out["host/bag_ids"] = h.bag_ids
            for w in hp.widths:
                if any(hp.local_bags[w]["tw"]):
                    out[f"host/local_bag_ids_{w}"] = h.local_bag_ids[w]
                if any(hp.local_row[w]["trw"]):
                    out[f"host/local_rows_{w}"] = h.local_rows[w]
                if hp.host_row[w]["features"]:
                    out[f"host/host_rows_{w}"] = h.host_rows[w]
                    out[f"host/fwd_rows_{w}"] = h.fwd_rows[w]
        for w, hc in c["hop"].items():
            out[f"w{w}/rows_local"] = hc.local
            out[f"w{w}/rows_host"] = hc.host
        for w, hc in c.get("hr", {}).items():
            out[f"hr{w}/rows"] = hc
        return out

    @staticmethod
    def must_skip(stats) -> jax.Array:
        """True when the step cannot be applied: an overflow or bad ids."""
        return (stats["overflow"] > 0) | (stats["out_of_range"] > 0)

    # ---- state --------------------------------------------------------------------------------

    def _storage_spec(self, name: str) -> P:
        return P() if self.layout.storages()[name][2] else P(DEVICES)

    def state_specs(self) -> dict[str, TableState]:
        """PartitionSpecs of the state (same tree as `init`'s output)."""
        acc = optimizers.accumulator_shape(self.optimizer, 1, 1)
        return {
            name: TableState(self._storage_spec(name), self._storage_spec(name) if acc is not None else None)
            for name in self.layout.storages()
        }

    def state_shardings(self):
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.state_specs())

    def state_shapes(self) -> dict[str, TableState]:
        """`jax.ShapeDtypeStruct`s of the state with shardings (for restores)."""
        out = {}
        for name, (rows, width, rep) in self.layout.storages().items():
            sh = NamedSharding(self.mesh, self._storage_spec(name))
            total = rows if rep else rows * self.num_devices
            acc = optimizers.accumulator_shape(self.optimizer, total, width)
            out[name] = TableState(
                jax.ShapeDtypeStruct((total, width), self.storage_dtype, sharding=sh),
                None if acc is None else jax.ShapeDtypeStruct(acc, jnp.float32, sharding=sh),
            )
        return out

    def memory(self) -> Memory:
        """Owned and allocated bytes of the tables and their optimizer state."""
        return self.layout.memory(self.optimizer, self.storage_dtype.itemsize)

    def _shard_map(self, body, in_specs, out_specs, check_vma=False):
        return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=check_vma)

    def init(self, seed: int = 0) -> dict[str, TableState]:
        """Initial tables, built shard by shard on the devices (no host copy of
        any table). The values depend on (seed, feature, row, col) only, so
        every sharding plan starts from the same model."""
        scales = np.array([np.sqrt(1.0 / f.rows) for f in self.features.sparse], np.float32)
        names = list(self.layout.storages())

        def body(seed):
            me = lax.axis_index(DEVICES)
            out = {}
            for name in names:
                rows, width, rep = self.layout.storages()[name]
                w = precision.encode(self.layout.init_local(name, seed, me, scales), self.table_dtype)
                out[name] = TableState(w, optimizers.init_accumulator(self.optimizer, rows, width))
            return out

        fn = self._shard_map(body, in_specs=(P(),), out_specs=self.state_specs())
        return jax.jit(fn)(jnp.uint32(seed))

    def from_dense(
        self,
        tables: Mapping[str, np.ndarray],
        accumulators: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, TableState]:
        """State from full host tables `{name: f32[rows, dim]}` (tests, imports,
        restores onto another layout). Each device's shard is cut from the
        host arrays by the process that owns the device."""
        feats = self.features.sparse
        order = [np.asarray(tables[f.name], np.float32) for f in feats]
        for f, t in zip(feats, order):
            if t.shape != (f.rows, f.dim):
                raise ValueError(f"table {f.name!r} has shape {t.shape}, expected {(f.rows, f.dim)}")
        acc_kind = optimizers.accumulator_shape(self.optimizer, 1, 1)
        per_row = acc_kind is not None and len(acc_kind) == 1
        if accumulators is not None:
            accs = [np.asarray(accumulators[f.name], np.float32) for f in feats]
        elif acc_kind is not None:
            init = self.optimizer.initial_accumulator
            accs = [np.full((f.rows,) if per_row else (f.rows, f.dim), init, np.float32) for f in feats]
        order = self.layout.split_values(order)  # the layout's tables
        if acc_kind is not None:
            accs = self.layout.split_values(accs)
        out = {}
        for name, (rows, width, rep) in self.layout.storages().items():
            sh = NamedSharding(self.mesh, self._storage_spec(name))
            total = rows if rep else rows * self.num_devices
            cut = self.layout.assemble_split

            def make(shape, piece):
                def cb(index):
                    start = index[0].start or 0
                    return piece(0 if rep else start // rows)

                return jax.make_array_from_callback(shape, sh, cb)

            w = make((total, width), lambda d: precision.encode_host(cut(name, d, order), self.table_dtype))
            acc = None
            if acc_kind is not None:
                fill = self.optimizer.initial_accumulator
                if per_row:
                    acc = make((total,), lambda d: cut(name, d, accs, per_row=True, fill=fill))
                else:
                    acc = make((total, width), lambda d: cut(name, d, accs, fill=fill))
            out[name] = TableState(w, acc)
        return out

    def to_dense(self, state: Mapping[str, TableState]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """Full host copies of all tables and accumulators (tests, exports)."""
        names = [f.name for f in self.features.sparse]
        w = {k: precision.decode_host(host_numpy(v.weights)) for k, v in state.items()}
        tables = dict(zip(names, self.layout.to_dense(w)))
        accs = None
        if any(v.accum is not None for v in state.values()):
            a = {k: host_numpy(v.accum) for k, v in state.items()}
            per_row = next(iter(a.values())).ndim == 1
            accs = dict(zip(names, self.layout.to_dense(a, per_row=per_row)))
        return tables, accs

    # ---- the step -----------------------------------------------------------------------------

    def _canonical(self, ids, lengths):
        """i32[B, slots + 1] table rows of the batch's ids (-1: none, and a last
        all -1 column), and the count of out-of-range ids of non-hashed tables.
        The columns are the layout's tables' (a flexshard table's tiers)."""
        valid = jnp.asarray(self._col_pos)[None, :] < routing.take_columns(lengths, self._col_feature)
        rows = jnp.asarray(self._col_rows)[None, :]
        r = jnp.where(jnp.asarray(self._col_hashed)[None, :], jnp.remainder(ids, rows), ids)
        inside = (r >= 0) & (r < rows)
        bad = jnp.sum(valid & ~inside, dtype=jnp.int32)
        canon = jnp.where(valid & inside, r, -1)
        canon = jnp.concatenate([canon, jnp.full((canon.shape[0], 1), -1, jnp.int32)], axis=1)
        return self.tier_fold.to_tiers(canon), bad

    def _weights(self, weights, canon):
        """f32[B, slots + 1] the per-sample weights at canon's columns (0 where
        there is no id), or None when no feature is weighted."""
        if weights is None:
            return None
        w = jnp.concatenate([weights.astype(jnp.float32), jnp.zeros((weights.shape[0], 1), jnp.float32)], 1)
        return jnp.where(canon >= 0, routing.take_columns(w, self._wmap), 0.0)

    def _check_weights(self, weights, ids):
        names = [f.name for f in self.features.sparse if f.weighted]
        if names and weights is None:
            raise ValueError(f"features {names} are weighted: pass their per-sample weights")
        if weights is not None and (not names or weights.shape != (ids.shape[0], self.features.weight_slots)):
            raise ValueError(f"weights {list(weights.shape)}: expected "
                             + (f"f32[{ids.shape[0]}, {self.features.weight_slots}]" if names
                                else "None (no feature is weighted)"))

    def _mean_scale(self, lengths):
        """f32[B, F_pooled] the factor of each pooled feature (1 / count for mean)."""
        feats = self.tables.sparse
        n = jnp.maximum(routing.take_columns(lengths, np.array(self.pooled_idx)), 1).astype(jnp.float32)
        mean = np.array([feats[i].combiner is Combiner.MEAN for i in self.pooled_idx])
        return jnp.where(jnp.asarray(mean)[None, :], 1.0 / n, 1.0)

    def forward(self, state: Mapping[str, TableState], ids: jax.Array, lengths: jax.Array,
                weights: jax.Array | None = None):
        """Look up the batch's embeddings (not differentiable: see `update`).

        Args:
          state: the tables (`init`).
          ids: i32[B_global, slots] packed ids, sharded over the devices.
          lengths: i32[B_global, F] valid ids per feature.
          weights: f32[B_global, weight_slots] the weighted features'
            per-sample weights (`Batch.weights`), or None if none is weighted.

        Returns:
          (embs, ctx, stats): the `Embeddings` (with `towers`: the bags pooled
          at the entry devices, f32[N * H, B, J, D], sums); what `update`
          needs (per-device arrays); the step's figures (global scalars):
          `overflow`, `out_of_range`, `need` (what each exchange needed),
          payload bytes across and inside hosts, `ids_requested` and
          `ids_unique` (de-duplication of the row requests).
        """
        feats = self.tables.sparse
        b = ids.shape[0] // self.num_devices
        caps = self.caps(b)
        mode = self.exchange_mode
        impl = self.impl
        self._check_weights(weights, ids)

        def body(store, ids, lengths, weights):
            canon, bad = self._canonical(ids, lengths)
            wc = self._weights(weights, canon)
            outs, st = {}, []
            stacked = {}  # piece -> (its route's bag block f32[K, B, D], k)
            ctx = {"flat": {}}
            for w, route in self.routes.items():
                bag, rows, c, s = route.forward(store[storage_name(w)], canon, caps["flat"][w], mode, impl, wc)
                ctx["flat"][w] = {**c, "read": c["read"][None]}
                st.append(s)
                for k, i in enumerate(route.bag_pieces):
                    outs[i] = bag[k]
                    stacked[i] = (bag, k)
                for k, i in enumerate(route.row_pieces):
                    outs[i] = rows[k]
            ctx["hop"] = {}
            for w, route in self.hops.items():
                rows, c, s = route.forward(store[storage_name(w)], canon, caps["hop"][w], mode, impl, wc)
                ctx["hop"][w] = {**c, "read": c["read"][None]}
                st.append(s)
                for k, i in enumerate(route.pieces):
                    outs[i] = rows[k]
            ctx["hr"] = {}
            for w, route in self.hr_routes.items():
                res, c, s = route.forward(store[storage_name(w, "host")], canon, caps["hr"][w], mode, impl, wc)
                ctx["hr"][w] = {**c, "read": c["read"][None]}
                st.append(s)
                for k, i in enumerate(route.pieces):
                    outs[i] = res[k]
            entry = None
            if self.host is not None:
                tables = {w: store[storage_name(w)] for w in self.host.widths}
                o, c, s = self.host.forward(tables, canon, caps["host"], mode, impl, wc)
                ctx["host"] = c
                st.append(s)
                if self.towers:
                    entry = o
                else:
                    for f, i in self.host.piece.items():
                        outs[i] = o[f]
            for w, pieces in self._dp.items():
                table = store[storage_name(w, True)]
                at = routing.take_columns(canon, self._dp_cols[w])
                wts = piece_weights(wc, self._dp_cols[w], self._dp_pos[w], self._dp_weighted[w])
                for k, i in enumerate(pieces):
                    base = self.layout.pieces[i].offsets[0]
                    rows = jnp.where(at[:, self._dp_pos[w][k]] >= 0, at[:, self._dp_pos[w][k]] + base, -1)
                    outs[i] = (pool_received(table, rows, impl, wts.get(k))
                               if feats[self.layout.pieces[i].feature].pooled else owner_rows(table, rows, impl))
                ctx.setdefault("dp", {})[w] = _read_token([outs[i] for i in pieces])[None]
            stats = _reduce(st, bad)
            if self.towers:
                return entry, {}, ctx, stats
            pooled, seqs = self._assemble(outs, self.tier_fold.lengths(lengths), stacked)
            pooled, seqs = self.tier_fold.fold(pooled, seqs, lengths)
            return pooled, seqs, ctx, stats

        ufeats = self.features.sparse
        pooled_spec = P(DEVICES) if (self.pooled_idx or self.towers) else None
        seq_specs = {} if self.towers else {ufeats[i].name: P(DEVICES) for i in self.user_seq_idx}
        pooled, seqs, ctx, stats = self._shard_map(
            body, (self._weight_specs(), P(DEVICES), P(DEVICES), None if weights is None else P(DEVICES)),
            (pooled_spec, seq_specs, P(DEVICES), P()),
        )({k: v.weights for k, v in state.items()}, ids, lengths, weights)
        if self.towers:
            return pooled, ctx, stats
        embs = Embeddings(pooled, seqs, tuple(ufeats[i].name for i in self.user_pooled_idx),
                          tuple(ufeats[i].dim for i in self.user_pooled_idx))
        return embs, ctx, stats

    def _assemble(self, outs, lengths, stacked=None):
        """Per-piece outputs -> pooled f32[B, sum dims] (feature order, mean
        applied) and sequences {name: f32[B, S, D]}.

        `stacked`: piece -> (block f32[K, B, D], k) where the piece's output
        is row k of a block; consecutive pieces from one block go in as one
        permuting transpose of their rows (a static take and a swap of the
        first two axes, which XLA:CPU fuses into one pass) rather than K
        slices and a concatenation (which XLA:CPU runs as K + 1 copies)."""
        feats = self.tables.sparse
        stacked = stacked or {}
        pooled = None
        if self.pooled_idx:
            order = [j for i in self.pooled_idx
                     for j, p in enumerate(self.layout.pieces) if p.feature == i]
            cols, run = [], []

            def flush():
                if len(run) > 1:
                    block = stacked[run[0]][0]
                    ks = np.array([stacked[j][1] for j in run])
                    part = (block[ks[0] : ks[0] + len(ks)] if np.array_equal(ks, ks[0] + np.arange(len(ks)))
                            else jnp.take(block, ks, axis=0))  # [n, B, D]
                    cols.append(jnp.swapaxes(part, 0, 1).reshape(part.shape[1], -1))
                elif run:
                    cols.append(outs[run[0]])
                run.clear()

            for j in order:  # runs of pieces from one block, in any order within it
                prev = stacked.get(run[-1]) if run else None
                cur = stacked.get(j)
                if not (prev and cur and cur[0] is prev[0]):
                    flush()
                run.append(j)
            flush()
            pooled = jnp.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]
            if self._mean:
                scale = self._mean_scale(lengths)
                dims = [feats[i].dim for i in self.pooled_idx]
                pooled = pooled * jnp.repeat(scale, np.array(dims), axis=1, total_repeat_length=sum(dims))
        seqs = {}
        for i in self.seq_idx:
            parts = [outs[j] for j, p in enumerate(self.layout.pieces) if p.feature == i]
            seqs[feats[i].name] = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
        return pooled, seqs

    def _bag_grads(self, pieces, width: int, gp, g_pooled, groups=None):
        """f32[K, B, D]: the gradients of a route's bag pieces, stacked. When
        the pieces' columns of the pooled gradient are whole width-wide
        blocks (the usual case), the stack is one permuting transpose of
        them (a swap of axes and a static take, one pass in XLA:CPU), not K
        slices (which XLA:CPU copies one by one) and a stack; with `groups`
        (pieces per peer, `WidthRoute.bag_groups`) one such pass per peer,
        concatenated, so that each peer's block is an array of its own."""
        if not pieces:
            return None
        cols = self._pooled_col
        at = [cols.get(j) for j in pieces]
        if (g_pooled is not None and all(c is not None and c % width == 0 for c in at)
                and g_pooled.shape[1] % width == 0
                and all(self.layout.pieces[j].width == width for j in pieces)):
            ks = np.array(at) // width
            if np.array_equal(ks, ks[0] + np.arange(len(ks))):  # side by side: a slice
                block = g_pooled[:, at[0] : at[0] + len(pieces) * width]
                return jnp.swapaxes(block.reshape(block.shape[0], len(pieces), width), 0, 1)
            g3 = jnp.swapaxes(g_pooled.reshape(g_pooled.shape[0], -1, width), 0, 1)  # [F, B, D]
            if groups is None:
                return jnp.take(g3, ks, axis=0)
            cut = np.cumsum(groups)[:-1]
            return jnp.concatenate([jnp.take(g3, part, axis=0) for part in np.split(ks, cut) if len(part)])
        return jnp.stack([gp[i] for i in pieces])

    def _piece_grads(self, g_pooled, g_seqs, lengths) -> tuple[dict[int, jax.Array], jax.Array | None]:
        """The embeddings' gradients split per piece (mean's 1/count applied),
        and the pooled gradient they were cut from."""
        feats = self.tables.sparse
        out = {}
        if self.pooled_idx:
            if self._mean:
                dims = [feats[i].dim for i in self.pooled_idx]
                scale = self._mean_scale(lengths)
                g_pooled = g_pooled * jnp.repeat(scale, np.array(dims), axis=1, total_repeat_length=sum(dims))
            for j, c in self._pooled_col.items():
                out[j] = g_pooled[:, c : c + self.layout.pieces[j].width]
        for i in self.seq_idx:
            g = g_seqs[feats[i].name]
            for j, p in enumerate(self.layout.pieces):
                if p.feature == i:
                    out[j] = g[..., p.col0 : p.col0 + p.width]
        return out, (g_pooled if self.pooled_idx else None)

    def update(
        self,
        state: Mapping[str, TableState],
        ctx,
        grads,
        ids: jax.Array,
        lengths: jax.Array,
        weights: jax.Array | None = None,
        *,
        lr: jax.Array | float | None = None,
        skip: jax.Array | bool = False,
        seed: jax.Array | int | None = None,
    ) -> tuple[dict[str, TableState], dict[str, jax.Array]]:
        """The fused sparse optimizer step at the owners, touched rows only.

        Args:
          ctx: `forward`'s context for the same batch and state.
          grads: the loss's gradient with respect to `forward`'s embeddings
            (an `Embeddings`; with `towers`, of the entry's pooled bags).
          ids, lengths, weights: the batch given to `forward`.
          lr: learning rate override (e.g. a schedule); default the optimizer's.
          skip: write nothing (e.g. `must_skip(forward's stats)`).
          seed: u32 seed of the stochastic rounding of 16-bit tables, a new
            one every step (the trainer passes the step count); each storage
            buffer and device mixes in its own (`precision.update_seed`;
            replicas of a row round alike). Required for 16-bit tables.

        Returns:
          (new state, stats): payload bytes of the backward exchanges and
          `unique_overflow`, the storages whose unique rows needed more than
          one chunk of the update (slower, never lossy).
        """
        lr = self.optimizer.lr if lr is None else lr
        b = ids.shape[0] // self.num_devices
        caps = self.caps(b)
        mode = self.exchange_mode
        feats = self.tables.sparse

        if precision.is_half(self.table_dtype) and seed is None:
            raise TypeError(f"updating {precision.dtype_name(self.table_dtype)} tables needs `seed` "
                            "(a new one every step: the stochastic rounding's bits)")

        self._check_weights(weights, ids)

        def body(state, ctx, g_pooled, g_seqs, ids, lengths, weights, lr, skip, seed):
            streams: dict[str, list] = {}
            st = []
            canon = self._canonical(ids, lengths)[0] if (weights is not None or self._dp) else None
            wc = self._weights(weights, canon)
            if not self.towers:
                g_pooled, g_seqs = self.tier_fold.unfold(g_pooled, g_seqs, lengths)
                gp, g_scaled = self._piece_grads(g_pooled, g_seqs, self.tier_fold.lengths(lengths))
            for w, route in self.routes.items():
                c = {**ctx["flat"][w], "read": ctx["flat"][w]["read"][0]}
                g_bag = self._bag_grads(route.bag_pieces, route.width, gp, g_scaled, route.bag_groups(self.impl))
                g_rows = {k: gp[i] for k, i in enumerate(route.row_pieces)}
                rows, src, g, scale, s = route.backward(c, g_bag, g_rows, caps["flat"][w], mode, self.impl, wc)
                st.append(s)
                streams.setdefault(storage_name(w), []).append((rows, src, g, scale))
            for w, route in self.hops.items():
                c = {**ctx["hop"][w], "read": ctx["hop"][w]["read"][0]}
                rows, src, g, s = route.backward(c, {k: gp[i] for k, i in enumerate(route.pieces)}, mode, wc)
                st.append(s)
                streams.setdefault(storage_name(w), []).append((rows, src, g, None))
            if self.host is not None:
                hg = g_pooled if self.towers else {f: gp[i] for f, i in self.host.piece.items()}
                per_w, s = self.host.backward(ctx["host"], hg, b, mode, self.impl, wc)
                st.append(s)
                for w, x in per_w.items():
                    streams.setdefault(storage_name(w), []).append(x)
            new = {}
            chunked = jnp.zeros((), jnp.int32)
            for name, parts in streams.items():
                rows, src, g, scale = parts[0]
                for r2, s2, g2, c2 in parts[1:]:
                    if scale is not None or c2 is not None:  # per-id scales (weighted bags), 1 elsewhere
                        scale = jnp.concatenate([jnp.ones(rows.shape, jnp.float32) if scale is None else scale,
                                                 jnp.ones(r2.shape, jnp.float32) if c2 is None else c2])
                    src = jnp.concatenate([src, s2 + g.shape[0]])
                    rows = jnp.concatenate([rows, r2])
                    g = jnp.concatenate([g, g2])
                new[name], o = self._apply(name, state[name], rows, src, g, lr, skip, seed, b, scale=scale)
                chunked = chunked + o
                st.append(self._split_payload(name, rows))
            for w, route in self.hr_routes.items():
                name = storage_name(w, "host")
                c = {**ctx["hr"][w], "read": ctx["hr"][w]["read"][0]}
                rows, g, s = route.backward(c, {k: gp[i] for k, i in enumerate(route.pieces)}, mode, wc)
                st.append(s)
                r_all = state[name].weights.shape[0]
                rows, g, s = replica_sum(rows, g, r_all, self.hosts, self.local, False, c["read"])
                st.append(s)
                new[name], o = self._apply(name, state[name], rows, jnp.arange(r_all, dtype=jnp.int32), g, lr,
                                           skip, seed, b, chunk=False)
                chunked = chunked + o
            for w, pieces in self._dp.items():
                name = storage_name(w, True)
                at = routing.take_columns(canon, self._dp_cols[w])
                wts = piece_weights(wc, self._dp_cols[w], self._dp_pos[w], self._dp_weighted[w])
                rows, gpos = [], []
                for k, i in enumerate(pieces):
                    base = self.layout.pieces[i].offsets[0]
                    r = at[:, self._dp_pos[w][k]]
                    rows.append(jnp.where(r >= 0, r + base, -1))
                    pooled = feats[self.layout.pieces[i].feature].pooled
                    gpos.append(position_grads(gp[i], r.shape[1], wts.get(k)) if pooled else gp[i])
                rows = jnp.concatenate(rows, axis=1).reshape(-1)
                gpos = jnp.concatenate(gpos, axis=1).reshape(-1, w)
                table = state[name].weights
                r_all = table.shape[0]
                if (any(self.layout.tier_of[self.layout.pieces[i].feature] for i in pieces)
                        and 2 * r_all <= self.num_devices * min(r_all, rows.shape[0])):
                    # hot tiers: a dense sum over all replicas (`replica_sum`), when its
                    # all-reduce moves less than gathering every device's touched rows could
                    rows, g, s = replica_sum(rows, gpos, r_all, self.hosts, self.local, True, ctx["dp"][w][0])
                    st.append(s)
                    new[name], o = self._apply(name, state[name], rows, jnp.arange(r_all, dtype=jnp.int32), g,
                                               lr, skip, seed, b, chunk=False)
                    chunked = chunked + o
                    continue
                rows = jnp.where((rows >= 0) & (rows < table.shape[0]), rows, -1)
                srows, spos = optimizers.sort_by_row(rows[None], jnp.zeros((1,), jnp.int32),
                                                     table.shape[0], table.shape[0])
                uniq, summed = optimizers.segment_rows(srows[0], spos[0], gpos, table.shape[0])
                count = jnp.sum(uniq < table.shape[0], dtype=jnp.int32)
                uniq = jnp.where(uniq < table.shape[0], uniq, -1)
                all_rows, _ = broadcast(uniq, count, DEVICES, mode=mode, fill=-1)
                all_g, _ = broadcast(summed, count, DEVICES, mode=mode)
                s = Stats()
                peer_host = np.arange(self.num_devices) // self.local
                s.payload(jnp.full((self.num_devices,), count), 4 * (w + 1), peer_host,
                          lax.axis_index(HOST), lax.axis_index(DEVICES))
                st.append(s)
                n = all_rows.size
                new[name], o = self._apply(name, state[name], all_rows.reshape(-1),
                                           jnp.arange(n, dtype=jnp.int32), all_g.reshape(n, w), lr, skip, seed, b)
                chunked = chunked + o
            for name in state:  # storages nothing routes to (no piece of the batch): unchanged
                new.setdefault(name, state[name])
            red = _reduce(st, jnp.zeros((), jnp.int32))
            return new, {"payload_cross_host_bytes": red["payload_cross_host_bytes"],
                         "payload_intra_host_bytes": red["payload_intra_host_bytes"],
                         "unique_overflow": lax.psum(chunked, DEVICES)}

        if self.towers:
            g_pooled, g_seqs = grads, {}
            seq_specs = {}
        else:
            g_pooled, g_seqs = grads.pooled, dict(grads.sequence)
            seq_specs = {self.features.sparse[i].name: P(DEVICES) for i in self.user_seq_idx}
        new, stats = self._shard_map(
            body,
            (self.state_specs(), P(DEVICES), P(DEVICES) if g_pooled is not None else None, seq_specs,
             P(DEVICES), P(DEVICES), None if weights is None else P(DEVICES), P(), P(), P()),
            (self.state_specs(), P()),
        )(dict(state), ctx, g_pooled, g_seqs, ids, lengths, weights, jnp.asarray(lr, jnp.float32),
          jnp.asarray(skip, bool), jnp.asarray(0 if seed is None else seed).astype(jnp.uint32))
        return new, stats

    def _apply(self, name, st: TableState, rows, src, grads, lr, skip, seed, batch: int, chunk: bool = True,
               scale=None):
        """sparse_step on one storage buffer (inside the body); `chunk=False`:
        the rows are already unique (one chunk, whatever `unique_capacity`);
        `scale`: each id's gradient multiplier (weighted bags), or None."""
        if precision.is_half(self.table_dtype):  # replicas of a row round alike
            _, _, rep = self.layout.storages()[name]
            device = (lax.axis_index(LOCAL) if name.startswith("hr_") else 0 if rep
                      else lax.axis_index(DEVICES))
            seed = precision.update_seed(seed, sorted(self.layout.storages()).index(name), device)
        rows = jnp.where(skip, -1, rows)
        split = self._split_rows(name, batch)
        opt = self.optimizer
        row_mean_sq = None
        if split is not None and opt.kind is OptimizerKind.ROWWISE_ADAGRAD:
            row_mean_sq = split
        n = rows.shape[0]
        cap = None
        if self.unique_capacity is not None and row_mean_sq is None and chunk:
            cap = max(8, -(-int(self.unique_capacity * n) // 8) * 8)
            cap = None if cap >= n else cap
        w, acc, o = optimizers.sparse_step(
            opt, st.weights, st.accum, rows, src, grads, lr=lr, row_mean_sq=row_mean_sq, capacity=cap,
            cpu_kernel=self.cpu_kernels and row_mean_sq is None, impl=self.impl, seed=seed, scale=scale,
        )
        return TableState(w, acc), o

    def _split_payload(self, name: str, rows: jax.Array) -> Stats:
        """The payload of `_split_rows`' sum (row-wise Adagrad over column
        shards, inside the body): each holder of a column shard sends the
        squared-gradient sum of each unique row of the table it touched this
        step (4 bytes) to every other holder of that table's shards, split by
        level. The psum that carries it moves more (its wire bytes)."""
        s = Stats()
        if self.optimizer.kind is not OptimizerKind.ROWWISE_ADAGRAD:
            return s
        _, width, rep = self.layout.storages()[name]
        holders: dict[int, list] = {}
        for p in self.layout.pieces:
            if (p.type is ShardingType.COLUMN_WISE and not rep and p.width == width
                    and len(self.layout.pieces_of(p.feature)) > 1):
                holders.setdefault(p.feature, []).append(p)
        if rep or not holders:
            return s
        n, ln = self.num_devices, self.local
        # per device, per entry: (first row, rows, other holders off-host, on-host)
        per = [[] for _ in range(n)]
        for f, ps in holders.items():
            devs = [q.devices[0] for q in ps]
            for q in ps:
                d = q.devices[0]
                others = [e for e in devs if e != d]
                cross = sum(e // ln != d // ln for e in others)
                per[d].append((q.offsets[0], self.tables.sparse[f].rows, cross, len(others) - cross))
        k = max(len(v) for v in per)
        tab = np.zeros((n, k, 4), np.int32)
        for d, v in enumerate(per):
            if v:
                tab[d, : len(v)] = v
        me = jnp.asarray(tab)[lax.axis_index(DEVICES)]  # [k, 4]
        big = jnp.iinfo(jnp.int32).max
        r = jnp.sort(jnp.where(rows >= 0, rows, big))
        first = jnp.concatenate([jnp.ones((1,), bool), r[1:] != r[:-1]]) & (r < big)
        inside = (r[None, :] >= me[:, :1]) & (r[None, :] < me[:, :1] + me[:, 1:2])  # [k, n]
        uniq = jnp.sum(inside & first[None, :], axis=1).astype(jnp.float32)  # [k]
        s.cross = 4.0 * jnp.sum(uniq * me[:, 2])
        s.intra = 4.0 * jnp.sum(uniq * me[:, 3])
        return s

    def _split_rows(self, name: str, batch: int) -> Callable | None:
        """For a storage holding column shards of a table (on any device): the
        `row_mean_sq` that adds the other shards' squared gradients (row-wise
        Adagrad's mean is over the whole row). All column shards of a table
        receive the same ids, so each shard's unique rows of the table, in
        ascending order, line up rank by rank across its devices; one psum of
        a [tables, U] buffer adds them."""
        rows_, width, rep = self.layout.storages()[name]
        if rep:
            return None
        split = sorted({p.feature for p in self.layout.pieces
                        if p.type is ShardingType.COLUMN_WISE and len(self.layout.pieces_of(p.feature)) > 1
                        and p.width == width})
        if not split:
            return None
        feats = self.tables.sparse
        n = self.num_devices
        per = [[] for _ in range(n)]
        for p in self.layout.pieces:
            if p.feature in split and p.width == width:
                per[p.devices[0]].append((p.offsets[0], feats[p.feature].rows, split.index(p.feature),
                                          feats[p.feature].dim))
        k = max(1, max(len(v) for v in per))
        tab = np.zeros((n, k, 4), np.int64)
        tab[:, :, 0] = np.iinfo(np.int32).max  # empty entries start past every row
        tab[:, :, 2] = -1
        for d, v in enumerate(per):
            for j, e in enumerate(sorted(v)):
                tab[d, j] = e
        tab = tab.astype(np.int32)
        # a table's unique rows in a step: at most its rows, and its ids
        ubound = max(min(feats[f].rows, n * batch * feats[f].max_len) for f in split)

        def row_mean_sq(uniq, g):
            ssq = jnp.sum(g * g, axis=-1)  # [U]
            me = jnp.asarray(tab)[lax.axis_index(DEVICES)]  # [k, 4]
            off, nrows, t, dim = me[:, 0], me[:, 1], me[:, 2], me[:, 3]
            j = jnp.maximum(jnp.searchsorted(off, uniq, side="right") - 1, 0)
            inside = (uniq >= off[j]) & (uniq < off[j] + nrows[j]) & (t[j] >= 0)
            first = jnp.searchsorted(uniq, off)  # index of each entry's first unique row
            rank = jnp.arange(uniq.shape[0], dtype=jnp.int32) - first[j]
            u = min(ubound, uniq.shape[0])
            total = jnp.zeros((len(split), u), ssq.dtype)
            total = total.at[jnp.where(inside, t[j], len(split)), rank].add(ssq, mode="drop")
            total = lax.psum(total, DEVICES)
            full = total[jnp.maximum(t[j], 0), jnp.clip(rank, 0, u - 1)]
            return jnp.where(inside, full / jnp.maximum(dim[j], 1).astype(ssq.dtype), ssq / width)

        return row_mean_sq

    def _weight_specs(self):
        return {name: self._storage_spec(name) for name in self.layout.storages()}

    # ---- conveniences -------------------------------------------------------------------------------

    def step(self, state, ids, lengths, loss_fn: Callable, *args, lr=None, seed=None, weights=None):
        """One sparse training step of the embeddings alone (dense parts are the
        caller's): `loss_fn(embs, *args) -> scalar`. Returns (loss, new state,
        gradients of `args`, stats); the state is unchanged when
        `must_skip(stats)` (an overflow: `grow` and repeat; or bad ids).
        `weights`: the batch's per-sample weights (weighted features)."""
        embs, ctx, stats = self.forward(state, ids, lengths, weights)
        loss, grads = jax.value_and_grad(loss_fn, argnums=tuple(range(1 + len(args))))(embs, *args)
        new, ustats = self.update(state, ctx, grads[0], ids, lengths, weights, lr=lr,
                                  skip=self.must_skip(stats), seed=seed)
        return loss, new, grads[1:], {**stats, **{f"update_{k}": v for k, v in ustats.items()}}

    def describe(self) -> list[dict]:
        """One line per storage buffer: its width, tables and rows per device."""
        out = []
        for name, (rows, width, rep) in self.layout.storages().items():
            tables = sorted({self.tables.sparse[p.feature].name for p in self.layout.pieces
                             if p.storage == name})
            out.append({"storage": name, "tables": tables, "rows_per_device": rows, "width": width,
                        "replicated": rep})
        return out


def _reduce(stats, bad) -> dict:
    """Per-device `Stats` of the routes -> global scalars (inside the body)."""
    cross = sum((s.cross for s in stats), jnp.zeros((), jnp.float32))
    intra = sum((s.intra for s in stats), jnp.zeros((), jnp.float32))
    req = sum((s.requested for s in stats), jnp.zeros((), jnp.int32))
    uni = sum((s.unique for s in stats), jnp.zeros((), jnp.int32))
    host_uni = sum((s.host_unique for s in stats), jnp.zeros((), jnp.int32))
    over = jnp.zeros((), jnp.int32)
    for s in stats:
        over = jnp.maximum(over, s.overflow)
    need = {k: lax.pmax(v, DEVICES) for s in stats for k, v in s.needs.items()}
    return {
        "payload_cross_host_bytes": lax.psum(cross, DEVICES),
        "payload_intra_host_bytes": lax.psum(intra, DEVICES),
        "ids_requested": lax.psum(req, DEVICES),
        "ids_unique": lax.psum(uni, DEVICES),
        "ids_unique_host": lax.psum(host_uni, DEVICES),
        "out_of_range": lax.psum(bad, DEVICES),
        "overflow": lax.pmax(over, DEVICES),
        "need": need,
    }

