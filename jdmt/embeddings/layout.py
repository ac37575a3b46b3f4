"""Where every row of every table lives: pieces, row shards and per-device storage.

A table (one per sparse feature) is cut into *pieces*, each a column range
`[col0, col0 + width)` of the table, whose rows are spread over S row shards:
row r lives in shard `r % S` at local index `r // S` (id mod S, so Zipf-hot
ids, which are the low ids, spread evenly). Shard s sits on device
`devices[s]` at row `offsets[s]` of that device's *storage* for the piece's
width. The sharding types are placements of pieces:

| type            | pieces                  | S | row shards on                    |
|-----------------|-------------------------|---|----------------------------------|
| table_wise      | one, all columns        | 1 | its device                       |
| column_wise     | one per column shard    | 1 | one device each                  |
| row_wise        | one                     | N | every device                     |
| table_row_wise  | one                     | L | the L devices of its host        |
| data_parallel   | one                     | 1 | every device (replicated storage)|
| host_replicated | one                     | L | local rank r % L of every host   |
| flexshard       | three tier tables (below)                                  |

Storage is owned, not padded per table: a device holds one buffer per
embedding width, `f32[rows, width]`, in which its shards of every piece of
that width sit one after another, and one accumulator buffer beside it. The
buffers of all devices form one global array sharded over the devices
(`P(('host', 'local'))`), so (one SPMD program, one shape on every device)
each device allocates the largest device's share of that width, rounded up
to a multiple of `ROW_ALIGN` rows: `allocated - owned` is the plan's
imbalance plus at most `ROW_ALIGN - 1` rows per device and width. A
balanced plan (row-wise, table-row-wise, or table-wise over tables that
split evenly) allocates what it owns; `Layout.memory()` reports both.
Data-parallel tables live in a replicated buffer per width (`dp_w64`),
host-replicated ones in a buffer per width sharded over the devices whose
shard l is the same on every host (`hr_w64`).

A flexshard table is laid out as three *tier tables* (`jdmt.embeddings.tiers`):
its hot rows data-parallel, its warm rows host-replicated, its cold rows
row-wise. `features` and `plan` are those of the tier tables (what the routes
see); `user_features` and `user_plan` are the model's. `assemble` and
`to_dense` take and give the model's tables.

The layout depends only on the features, the plan and the mesh shape, so a
saved state can be read anywhere (`to_dense`), and the tables' initial
values depend only on (seed, feature, row, column) (`init_local`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdmt.data.specs import Combiner, FeatureSet, SparseFeature
from jdmt.embeddings import tiers as tiers_
from jdmt.embeddings.tiers import RowTiers, tier_name
from jdmt.embeddings.types import (
    OptimizerKind,
    Placement,
    ShardingType,
    SparseOptimizer,
    check_plan,
    table_row_wise_host,
)
from jdmt.precision import mix32

__all__ = [
    "ROW_ALIGN",
    "Layout",
    "Memory",
    "Piece",
    "hash_uniform",
    "storage_name",
]

ROW_ALIGN = 8
"""Storage rows per device are rounded up to a multiple of this (the stated slack)."""


def storage_name(width: int, replicated: bool | str = False) -> str:
    """Key of a storage buffer in the state: `w64` (sharded), `dp_w64`
    (replicated: `replicated=True`) or `hr_w64` (host-replicated: `"host"`)."""
    prefix = "hr_" if replicated == "host" else "dp_" if replicated else ""
    return f"{prefix}w{width}"


@dataclasses.dataclass(frozen=True)
class Piece:
    """Columns `[col0, col0 + width)` of feature `feature`, rows in S row shards.

    Row r is in shard `r % S` at local index `r // S`; shard s lives on flat
    device `devices[s]` (S = len(devices)) from row `offsets[s]` of that
    device's storage of `width`. A data-parallel piece has no devices and one
    offset into the replicated storage.
    """

    feature: int
    col0: int
    width: int
    type: ShardingType
    devices: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def replicated(self) -> bool:
        return self.type is ShardingType.DATA_PARALLEL

    @property
    def host_replicated(self) -> bool:
        """Shard s on local rank s of every host (`devices` are the local ranks)."""
        return self.type is ShardingType.HOST_REPLICATED

    @property
    def storage(self) -> str:
        return storage_name(self.width, "host" if self.host_replicated else self.replicated)

    @property
    def stride(self) -> int:
        return max(1, len(self.devices))

    def shard_rows(self, rows: int, s: int) -> int:
        """Rows of a `rows`-row table in shard s (those r < rows with r % S == s)."""
        k = self.stride
        return max(0, (rows - s + k - 1) // k)


@dataclasses.dataclass(frozen=True)
class Memory:
    """Table memory of a layout (tables and optimizer state), in bytes.

    Attributes:
      owned: the tables' own bytes (each row once; no padding, no replicas).
      allocated: bytes of the storage buffers summed over devices.
      per_device_owned: f64[N] bytes of the rows each device owns
        (replicated tables counted on every device).
      per_device_allocated: bytes every device allocates (the same on all).
    """

    owned: float
    allocated: float
    per_device_owned: np.ndarray
    per_device_allocated: float

    @property
    def ratio(self) -> float:
        return self.allocated / max(self.owned, 1.0)

    def to_json(self) -> dict:
        return {
            "table_bytes": self.owned,
            "table_bytes_allocated": self.allocated,
            "table_bytes_allocated_per_device": self.per_device_allocated,
            "table_bytes_owned_max_device": float(self.per_device_owned.max(initial=0.0)),
            "table_bytes_owned_mean_device": float(self.per_device_owned.mean()) if self.per_device_owned.size else 0.0,
        }


def _acc_floats(opt: SparseOptimizer, width: int) -> int:
    """Optimizer-state floats per row of a `width`-wide buffer."""
    return {OptimizerKind.ROWWISE_ADAGRAD: 1, OptimizerKind.ADAGRAD: width, OptimizerKind.SGD: 0}[
        opt.kind
    ]


class Layout:
    """The pieces of every table and the storage they live in, for one plan.

    Args:
      features: the model's features.
      plan: a placement per feature (checked).
      hosts, local: the mesh shape (N = hosts * local devices).
    """

    def __init__(self, features: FeatureSet, plan: Mapping[str, Placement], hosts: int, local: int):
        self.hosts, self.local = int(hosts), int(local)
        self.num_devices = self.hosts * self.local
        plan = {f.name: plan[f.name] for f in features.sparse}
        check_plan(features, plan, self.num_devices, self.local)
        self.user_features, self.user_plan = features, plan
        features, plan = self._expand(features, plan)
        self.features = features
        self.plan = plan
        self.pieces: list[Piece] = []
        used: dict[tuple[int, int], int] = {}  # (device, width) -> rows so far
        dp_used: dict[int, int] = {}
        hr_used: dict[tuple[int, int], int] = {}  # (local rank, width) -> rows so far

        def place(dev: int, width: int, rows: int) -> int:
            off = used.get((dev, width), 0)
            used[(dev, width)] = off + rows
            return off

        for i, f in enumerate(features.sparse):
            p = plan[f.name]
            t = p.type
            if t is ShardingType.HOST_REPLICATED:
                probe = Piece(i, 0, f.dim, t, tuple(range(self.local)), (0,) * self.local)
                offs = []
                for s in range(self.local):
                    offs.append(hr_used.get((s, f.dim), 0))
                    hr_used[(s, f.dim)] = offs[-1] + probe.shard_rows(f.rows, s)
                self.pieces.append(Piece(i, 0, f.dim, t, probe.devices, tuple(offs)))
            elif t is ShardingType.DATA_PARALLEL:
                off = dp_used.get(f.dim, 0)
                dp_used[f.dim] = off + f.rows
                self.pieces.append(Piece(i, 0, f.dim, t, (), (off,)))
            elif t in (ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE):
                c = len(p.devices)
                w = f.dim // c
                for j, d in enumerate(p.devices):
                    self.pieces.append(Piece(i, j * w, w, t, (d,), (place(d, w, f.rows),)))
            else:  # row-wise over all devices, or table-row-wise over one host's
                if t is ShardingType.TABLE_ROW_WISE:
                    table_row_wise_host(p, self.local)
                devs = tuple(p.devices)
                probe = Piece(i, 0, f.dim, t, devs, (0,) * len(devs))
                offs = tuple(place(d, f.dim, probe.shard_rows(f.rows, s)) for s, d in enumerate(devs))
                self.pieces.append(Piece(i, 0, f.dim, t, devs, offs))
        widths = sorted({w for (_, w) in used})
        self.owned_rows = {
            w: np.array([used.get((d, w), 0) for d in range(self.num_devices)], np.int64) for w in widths
        }
        self.rows = {w: int(-(-max(1, self.owned_rows[w].max()) // ROW_ALIGN) * ROW_ALIGN) for w in widths}
        self.dp_rows = dict(sorted(dp_used.items()))
        hr_widths = sorted({w for (_, w) in hr_used})
        self.hr_rows = {w: int(-(-max(hr_used.get((s, w), 0) for s in range(self.local)) // ROW_ALIGN)
                               * ROW_ALIGN) for w in hr_widths}

    def _expand(self, features: FeatureSet, plan: Mapping[str, Placement]):
        """The tier tables of the flexshard tables (the others as they are).

        Sets `source` (each table's model feature), `tier_of` (each table's
        (tier, RowTiers) or None) and `row_tiers` ({model feature: RowTiers})."""
        feats, vplan, source, tier_of = [], {}, [], []
        self.row_tiers: dict[int, RowTiers] = {}
        everyone = tuple(range(self.num_devices))
        kinds = {tiers_.HOT: ShardingType.DATA_PARALLEL, tiers_.WARM: ShardingType.HOST_REPLICATED,
                 tiers_.COLD: ShardingType.ROW_WISE}
        for u, f in enumerate(features.sparse):
            p = plan[f.name]
            if p.type is not ShardingType.FLEXSHARD or not (p.hot or p.warm):
                # (a flexshard table without hot or warm rows is a row-wise table)
                feats.append(f), source.append(u), tier_of.append(None)
                vplan[f.name] = p if p.type is not ShardingType.FLEXSHARD else Placement(
                    ShardingType.ROW_WISE, everyone)
                continue
            rt = RowTiers(f.rows, p.hot, p.warm)
            self.row_tiers[u] = rt
            for tier, rows in rt.sizes.items():
                if not rows:
                    continue
                name = tier_name(f.name, tier)
                feats.append(SparseFeature(name, rows, f.dim, f.max_len, f.kind, Combiner.SUM))
                source.append(u), tier_of.append((tier, rt))
                vplan[name] = Placement(kinds[tier], everyone)
        self.source = np.array(source, np.int64)
        self.tier_of = tier_of
        if not self.row_tiers:
            return features, vplan
        return FeatureSet(tuple(feats), num_dense=features.num_dense), vplan

    # ---- tier tables <-> the model's tables (host numpy) ---------------------------------------

    def split_values(self, values: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per-table arrays of the model's tables (rows first) -> the tier tables'."""
        out = []
        for v, u in enumerate(self.source):
            t = self.tier_of[v]
            out.append(values[u] if t is None else np.asarray(values[u])[t[1].rows_of(t[0])])
        return out

    def fold_values(self, values: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The inverse of `split_values`."""
        if not self.row_tiers:
            return list(values)
        out: list = [None] * len(self.user_features.sparse)
        for v, u in enumerate(self.source):
            t = self.tier_of[v]
            if t is None:
                out[u] = values[v]
                continue
            if out[u] is None:
                out[u] = np.zeros((t[1].rows,) + np.shape(values[v])[1:], np.asarray(values[v]).dtype)
            out[u][t[1].rows_of(t[0])] = values[v]
        return out

    # ---- queries -----------------------------------------------------------------------------

    @property
    def widths(self) -> list[int]:
        return sorted(self.rows)

    def storages(self) -> dict[str, tuple[int, int, bool]]:
        """`{name: (rows per device or replicated rows, width, replicated)}`."""
        out = {storage_name(w): (r, w, False) for w, r in self.rows.items()}
        out.update({storage_name(w, True): (r, w, True) for w, r in self.dp_rows.items()})
        out.update({storage_name(w, "host"): (r, w, False) for w, r in self.hr_rows.items()})
        return out

    def pieces_of(self, feature: int) -> list[Piece]:
        return [p for p in self.pieces if p.feature == feature]

    def memory(self, optimizer: SparseOptimizer, weight_bytes: int = 4) -> Memory:
        """Owned and allocated bytes of tables and optimizer state (`weight_bytes`
        per table element: 4 for f32, 2 for 16-bit tables; the state is f32)."""
        n = self.num_devices

        def row_bytes(w):
            return weight_bytes * w + 4.0 * _acc_floats(optimizer, w)

        owned = 0.0
        per_dev = np.zeros(n)
        for p in self.pieces:
            f = self.features.sparse[p.feature]
            rb = row_bytes(p.width)
            owned += f.rows * rb
            if p.replicated:
                per_dev += f.rows * rb
            elif p.host_replicated:
                for d in range(n):
                    per_dev[d] += p.shard_rows(f.rows, d % self.local) * rb
            else:
                for s, d in enumerate(p.devices):
                    per_dev[d] += p.shard_rows(f.rows, s) * rb
        alloc_dev = sum(r * row_bytes(w) for rows in (self.rows, self.dp_rows, self.hr_rows)
                        for w, r in rows.items())
        return Memory(owned, alloc_dev * n, per_dev, alloc_dev)

    # ---- initial values (traced, on the devices) ---------------------------------------------

    def _segments(self, width: int, host: bool = False) -> np.ndarray:
        """i64[N, S, 6] per device, the shards in its storage of `width`
        (`host`: its host-replicated storage): (offset, rows, feature, first
        row, stride, col0), padded with segments that start past the end."""
        segs: list[list[tuple]] = [[] for _ in range(self.num_devices)]
        for p in self.pieces:
            if p.width != width or p.replicated or p.host_replicated != host:
                continue
            rows = self.features.sparse[p.feature].rows
            for s, (d, off) in enumerate(zip(p.devices, p.offsets)):
                n = p.shard_rows(rows, s)
                if not n:
                    continue
                for dev in (range(d, self.num_devices, self.local) if host else (d,)):
                    segs[dev].append((off, n, p.feature, s, p.stride, p.col0))
        k = max(1, max(len(v) for v in segs))
        out = np.zeros((self.num_devices, k, 6), np.int64)
        out[:, :, 0] = (self.hr_rows if host else self.rows)[width]
        for d, v in enumerate(segs):
            for j, s in enumerate(sorted(v)):
                out[d, j] = s
        return out

    def _dp_segments(self, width: int) -> np.ndarray:
        v = [(p.offsets[0], self.features.sparse[p.feature].rows, p.feature, 0, 1, 0)
             for p in self.pieces if p.replicated and p.width == width]
        return np.array(sorted(v), np.int64).reshape(-1, 6)

    def init_local(self, name: str, seed: jax.Array, device: jax.Array, scales: np.ndarray) -> jax.Array:
        """A device's storage buffer `name`: each owned value a hash of (seed,
        feature, row, col), uniform in `[-scale, scale)` with the feature's
        scale (TorchRec's `sqrt(1 / rows)`); unowned rows 0. The values do not
        depend on the plan: every plan starts from the same tables (a tier
        table's rows hash as the raw rows of their model table).

        Args:
          scales: f32[model features] each model table's scale."""
        rows, width, replicated = self.storages()[name]
        host = name.startswith("hr_")
        seg = self._dp_segments(width) if replicated else self._segments(width, host)
        seg = jnp.asarray(seg.astype(np.int32))
        if not replicated:
            seg = seg[device]
        r = jnp.arange(rows, dtype=jnp.int32)
        j = jnp.maximum(jnp.searchsorted(seg[:, 0], r, side="right") - 1, 0)
        s = seg[j]  # [R, 6]
        inside = (r >= s[:, 0]) & (r < s[:, 0] + s[:, 1])
        grow = s[:, 3] + (r - s[:, 0]) * s[:, 4]
        for v, t in enumerate(self.tier_of):  # tier tables: slot -> the model table's row
            if t is not None and any(p.feature == v and p.storage == name for p in self.pieces):
                grow = jnp.where(s[:, 2] == v, t[1].raw(t[0], grow), grow)
        feature = jnp.asarray(self.source.astype(np.int32))[s[:, 2]]
        cols = s[:, 5][:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
        u = hash_uniform(seed, feature[:, None], grow[:, None], cols)
        scale = jnp.asarray(scales, jnp.float32)[feature][:, None]
        return jnp.where(inside[:, None], (2.0 * u - 1.0) * scale, 0.0)

    # ---- host-side conversion ----------------------------------------------------------------

    def assemble(self, name: str, device: int, values: Sequence[np.ndarray], per_row: bool = False,
                 fill: float = 0.0) -> np.ndarray:
        """Device `device`'s buffer `name` cut from full per-feature arrays of
        the model's tables: f32[rows, dim] (or, `per_row`, row-wise
        accumulators f32[rows])."""
        return self.assemble_split(name, device, self.split_values(values), per_row, fill)

    def assemble_split(self, name: str, device: int, values: Sequence[np.ndarray], per_row: bool = False,
                       fill: float = 0.0) -> np.ndarray:
        """`assemble` from arrays of the layout's tables (`split_values`)."""
        rows, width, replicated = self.storages()[name]
        shape = (rows,) if per_row else (rows, width)
        buf = np.full(shape, fill, np.float32)
        if name.startswith("hr_"):  # host-replicated: shard l sits on local rank l of every host
            device = device % self.local
        for p in self.pieces:
            if p.storage != name:
                continue
            full = values[p.feature]
            part = full if per_row else full[:, p.col0 : p.col0 + width]
            if replicated:
                buf[p.offsets[0] : p.offsets[0] + part.shape[0]] = part
                continue
            for s, (d, off) in enumerate(zip(p.devices, p.offsets)):
                if d == device:
                    sub = part[s :: p.stride]
                    buf[off : off + sub.shape[0]] = sub
        return buf

    def to_dense(self, buffers: Mapping[str, np.ndarray], per_row: bool = False) -> list[np.ndarray]:
        """Full per-feature arrays of the model's tables (feature order) from
        host copies of the global storage buffers `{name: [N * rows (or
        rows), width]}` (host-replicated rows read from the first host).
        With `per_row`, row-wise accumulators f32[rows] instead of tables."""
        feats = self.features.sparse
        out = [np.zeros((f.rows,) if per_row else (f.rows, f.dim), np.float32) for f in feats]
        for p in self.pieces:
            name = p.storage
            if name not in buffers:
                continue
            arr = np.asarray(buffers[name])
            rows = self.storages()[name][0]
            tgt = out[p.feature]
            view = tgt if per_row else tgt[:, p.col0 : p.col0 + p.width]
            if p.replicated:
                view[:] = arr[p.offsets[0] : p.offsets[0] + feats[p.feature].rows]
                continue
            for s, (d, off) in enumerate(zip(p.devices, p.offsets)):
                n = p.shard_rows(feats[p.feature].rows, s)
                view[s :: p.stride] = arr[d * rows + off : d * rows + off + n]
        return self.fold_values(out)


def hash_uniform(seed, feature, row, col) -> jax.Array:
    """Uniform [0, 1) floats from a counter-based hash of four integers."""
    u32 = lambda v: jnp.asarray(v).astype(jnp.uint32)  # noqa: E731
    h = mix32(u32(seed) * jnp.uint32(0x9E3779B9) + u32(feature))
    h = mix32(h ^ (u32(row) * jnp.uint32(0x632BE5AB)))
    h = mix32(h + u32(col) * jnp.uint32(0x85157AF5))
    return (h >> 8).astype(jnp.float32) * jnp.float32(1.0 / (1 << 24))

