"""What every sharding type shares: fused local buffers, id gathering, pooling.

A *group* is a set of tables that share one sharding type, kind (pooled or
sequence), shard width and id cap; its tables live in one fused buffer per
device (rows of its tables concatenated, padded to the same count on every
device) and it moves its ids and embeddings with one collective per
direction. Each sharding-type module subclasses `Group` with its three
stages: `input_dist` (ids to owners), `lookup` (local rows, pooled or not)
and `output_dist` (embeddings back to the batch's devices), all of them
`shard_map` bodies over the `('host', 'local')` mesh.

Shapes inside the bodies: B = local batch, N = devices, L = ids per bag
(pooling cap, or sequence length), D = shard width.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jdmt.data.specs import FeatureSet, Kind
from jdmt.mesh import DEVICES
from jdmt.pallas_kernels.common import XLA, Impl
from jdmt.pallas_kernels.pooled_lookup import pooled_gather
from jdmt.pallas_kernels.sequence_lookup import sequence_gather


@dataclasses.dataclass(frozen=True)
class Segment:
    """A block of one table stored in a device's fused buffer.

    Rows `[row0, row0 + rows)` and columns `[col0, col0 + width)` of feature
    `feature` (index into the FeatureSet) sit at local rows
    `[offset, offset + rows)`.
    """

    feature: int
    row0: int
    rows: int
    col0: int
    offset: int


@dataclasses.dataclass(frozen=True)
class Piece:
    """Part of a feature's embedding that a group outputs: columns
    `[col0, col0 + width)` of feature `feature`."""

    feature: int
    col0: int


class Group(abc.ABC):
    """Tables of one sharding type sharing one fused buffer and collectives."""

    replicated: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        features: FeatureSet,
        members: Sequence[int],
        width: int,
        num_devices: int,
    ):
        self.name = name
        self.features = features
        self.members = tuple(members)
        self.width = int(width)
        self.num_devices = int(num_devices)
        specs = [features.sparse[i] for i in self.members]
        kinds = {f.kind for f in specs}
        lens = {f.max_len for f in specs}
        if len(kinds) != 1 or len(lens) != 1:
            raise ValueError(f"group {name}: tables must share kind and id cap")
        self.kind = kinds.pop()
        self.max_len = lens.pop()
        # per member: rows, column-0-of-feature and whether ids are hashed
        self.rows = np.array([f.rows for f in specs], np.int64)
        self.hashed = np.array([f.hashed for f in specs], bool)
        self.segments: list[list[Segment]] = self._place()
        self.local_rows = max(1, max((s.offset + s.rows for d in self.segments for s in d), default=1))

    # ---- layout, fixed at construction -------------------------------------------------

    @abc.abstractmethod
    def _place(self) -> list[list[Segment]]:
        """Segments of every device's fused buffer (device-major)."""

    @property
    def pooled(self) -> bool:
        return self.kind is Kind.POOLED

    @property
    def spec(self) -> P:
        """PartitionSpec of the fused buffer's first axis."""
        return P() if self.replicated else P(DEVICES)

    @property
    def global_rows(self) -> int:
        return self.local_rows if self.replicated else self.num_devices * self.local_rows

    @abc.abstractmethod
    def pieces(self) -> list[Piece]:
        """The embedding pieces `output_dist` returns, in order."""

    # ---- shard_map bodies ---------------------------------------------------------------

    def member_ids(self, ids: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Gather this group's ids from the packed batch; mask what is not an id.

        Args:
          ids: i32[B, slots] packed ids of the local batch.
          lengths: i32[B, F] valid ids per feature.

        Returns:
          gid: i32[B, T, L] ids per member table in `[0, rows)`, -1 where the
            position is padding or the id is out of range.
          bad: i32[] number of out-of-range ids of non-hashed features.
        """
        offs = np.array([self.features.offsets[i] for i in self.members])
        cols = offs[:, None] + np.arange(self.max_len)[None, :]  # [T, L]
        gid = ids[:, cols]  # [B, T, L]
        ln = lengths[:, np.array(self.members)]  # [B, T]
        valid = lax.broadcasted_iota(jnp.int32, gid.shape, 2) < ln[:, :, None]
        rows = jnp.asarray(self.rows, jnp.int32)[None, :, None]
        if self.hashed.any():
            hashed = jnp.asarray(self.hashed)[None, :, None]
            gid = jnp.where(hashed, jnp.remainder(gid, rows), gid)
        in_range = (gid >= 0) & (gid < rows)
        bad = jnp.sum(valid & ~in_range, dtype=jnp.int32)
        return jnp.where(valid & in_range, gid, -1), bad

    def gather(
        self, buf: jax.Array, lid: jax.Array, slot_axis: int = 0, impl: Impl = XLA
    ) -> jax.Array:
        """Look up local rows: pooled sum over the last id axis, or not.

        Args:
          buf: f32[R, D] local fused buffer.
          lid: i32[..., L] local row ids, -1 = none; axis `slot_axis` indexes
            the buffer's tables.
          slot_axis: the axis of `lid` that indexes the tables.
          impl: a Pallas implementation runs the pooled or sequence gather
            kernel over all bags at once (`jdmt.pallas_kernels`).

        Returns:
          f32[..., D] (pooled) or f32[..., L, D] (sequence).

        Tables are looked up one after another (a loop over `slot_axis`), each
        as one fused pass that gathers and sums its L id positions: a table's
        hot rows stay in cache, nothing of size [ids, D] is materialised, and
        XLA cannot fuse the lookup into its consumers in another order (which
        interleaves tables and ran 2-4x slower on CPU).
        """
        if impl.pallas:
            ln = lid.shape[-1]
            flat = lid.reshape(-1, ln)
            flat = jnp.where((flat >= 0) & (flat < buf.shape[0]), flat, -1)
            if self.pooled:
                return pooled_gather(impl, buf, flat, None).reshape(lid.shape[:-1] + buf.shape[1:])
            return sequence_gather(impl, buf, flat).reshape(lid.shape + buf.shape[1:])
        lid = jnp.where(lid >= 0, lid, buf.shape[0])  # past the end: reads as 0
        lid = jnp.moveaxis(lid, slot_axis, 0)
        take = lambda i: buf.at[i].get(mode="fill", fill_value=0)  # noqa: E731

        def one_table(ids):
            if not self.pooled:
                return take(ids)
            out = take(ids[..., 0])
            for pos in range(1, ids.shape[-1]):
                out = out + take(ids[..., pos])
            return out

        return jnp.moveaxis(lax.map(one_table, lid), 0, slot_axis)

    @abc.abstractmethod
    def slot_bounds(self) -> tuple[jax.Array, int]:
        """(i32[K] first local row of each slot's table on this device, a static
        bound on the rows of any slot's table); called inside the body."""

    @abc.abstractmethod
    def input_dist(self, ids: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Ids of the local batch -> (ids each owner looks up, out-of-range count)."""

    slot_axis: ClassVar[int] = 0  # the axis of `input_dist`'s ids that indexes tables

    def lookup(self, buf: jax.Array, owner_ids: jax.Array, impl: Impl = XLA) -> jax.Array:
        """Local lookup at the owner."""
        return self.gather(buf, owner_ids, self.slot_axis, impl)

    @abc.abstractmethod
    def output_dist(self, owner_out: jax.Array) -> list[jax.Array]:
        """Owner outputs -> the pieces stacked in `pieces()` order:
        f32[B, P, D] (pooled) or f32[B, P, L, D] (sequence)."""

    def row_mean_sq(self, g: jax.Array) -> jax.Array:
        """Mean of squared summed row gradients over the full row: f32[K, U]."""
        return jnp.mean(g * g, axis=-1)

    @abc.abstractmethod
    def update_view(self, owner_ids: jax.Array, owner_grads: jax.Array):
        """Ids and gradients at the owner, arranged `[K, M, L]` / `[K, M, (L,) D]`
        (K = tables in the buffer) for `optimizers.sparse_step`."""

    # ---- initial values --------------------------------------------------------------------

    def segment_table(self) -> np.ndarray:
        """i64[N, S, 5] (offset, rows, feature, row0, col0) per device, padded."""
        s_max = max(1, max(len(d) for d in self.segments))
        out = np.zeros((len(self.segments), s_max, 5), np.int64)
        out[:, :, 0] = self.local_rows  # padding segments start past the end
        for d, segs in enumerate(self.segments):
            for j, s in enumerate(segs):
                out[d, j] = (s.offset, s.rows, s.feature, s.row0, s.col0)
        return out

    def init_local(self, seed: jax.Array, device: jax.Array, scales: np.ndarray) -> jax.Array:
        """This device's fused buffer, each value a hash of (seed, feature, row, col).

        Values are uniform in `[-scale, scale)` with the feature's scale
        (TorchRec's default `sqrt(1 / rows)`), and do not depend on the
        sharding: every plan starts from the same tables.
        """
        seg = jnp.asarray(self.segment_table().astype(np.int32))[device]  # [S, 5]
        r = jnp.arange(self.local_rows, dtype=jnp.int32)
        j = jnp.maximum(jnp.searchsorted(seg[:, 0], r, side="right") - 1, 0)
        s = seg[j]  # [R, 5]
        inside = (r >= s[:, 0]) & (r < s[:, 0] + s[:, 1])
        grow = s[:, 3] + r - s[:, 0]
        cols = s[:, 4][:, None] + jnp.arange(self.width, dtype=jnp.int32)[None, :]
        u = hash_uniform(seed, s[:, 2][:, None], grow[:, None], cols)
        scale = jnp.asarray(scales, jnp.float32)[s[:, 2]][:, None]
        return jnp.where(inside[:, None], (2.0 * u - 1.0) * scale, 0.0)

    # ---- host-side conversion ---------------------------------------------------------------

    def assemble(self, tables: Sequence[np.ndarray], device: int, dtype=np.float32) -> np.ndarray:
        """The fused buffer of `device` from full tables (index = feature)."""
        buf = np.zeros((self.local_rows, self.width) + tables[self.members[0]].shape[2:], dtype)
        for s in self.segments[device]:
            t = tables[s.feature]
            buf[s.offset : s.offset + s.rows] = t[s.row0 : s.row0 + s.rows, s.col0 : s.col0 + self.width]
        return buf

    def assemble_rows(self, values: Sequence[np.ndarray], device: int, dtype=np.float32) -> np.ndarray:
        """Like `assemble` for per-row state f32[rows] (row-wise accumulators)."""
        buf = np.zeros((self.local_rows,), dtype)
        for s in self.segments[device]:
            buf[s.offset : s.offset + s.rows] = values[s.feature][s.row0 : s.row0 + s.rows]
        return buf

    def scatter_into(self, buffers: Sequence[np.ndarray], out: dict[int, np.ndarray]) -> None:
        """Write fused buffers (one per device) back into full tables `out`."""
        for d, segs in enumerate(self.segments):
            buf = buffers[0] if self.replicated else buffers[d]
            for s in segs:
                view = buf[s.offset : s.offset + s.rows]
                tgt = out[s.feature]
                if tgt.ndim == 1:
                    tgt[s.row0 : s.row0 + s.rows] = view
                else:
                    tgt[s.row0 : s.row0 + s.rows, s.col0 : s.col0 + self.width] = view


def _mix32(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a fast, well-mixing bijection on uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_uniform(seed, feature, row, col) -> jax.Array:
    """Uniform [0, 1) floats from a counter-based hash of four integers."""
    u32 = lambda v: jnp.asarray(v).astype(jnp.uint32)  # noqa: E731
    h = _mix32(u32(seed) * jnp.uint32(0x9E3779B9) + u32(feature))
    h = _mix32(h ^ (u32(row) * jnp.uint32(0x632BE5AB)))
    h = _mix32(h + u32(col) * jnp.uint32(0x85157AF5))
    return (h >> 8).astype(jnp.float32) * jnp.float32(1.0 / (1 << 24))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["Group", "Piece", "Segment", "ceil_div", "hash_uniform"]
