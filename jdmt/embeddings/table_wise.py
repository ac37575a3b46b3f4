"""Table-wise sharding: each table (or column shard of one) lives on one device.

input_dist:  all-to-all of ids over all devices (each device sends every owner
             the ids of the owner's tables for the local batch)
lookup:      the owner gathers (and pools) its rows for the N*B samples
output_dist: all-to-all of the pooled rows (or sequences) back

Column-wise sharding reuses this machinery: a column shard is a narrower
table on its own device (see `column_wise.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from jdmt.data.specs import FeatureSet
from jdmt.embeddings.base import Group, Piece, Segment
from jdmt.mesh import DEVICES


@dataclasses.dataclass(frozen=True)
class Shard:
    """Columns `[col0, col0 + width)` of feature `feature`, all rows, on `device`."""

    feature: int
    col0: int
    device: int


class TableWiseGroup(Group):
    """Whole-row shards, one per owner device, exchanged by all-to-all."""

    slot_axis = 1

    def __init__(
        self,
        name: str,
        features: FeatureSet,
        shards: Sequence[Shard],
        width: int,
        num_devices: int,
    ):
        self.shards = tuple(shards)
        members = sorted({s.feature for s in self.shards})
        # slot k of device d holds shard `by_device[d][k]`
        self.by_device: list[list[Shard]] = [[] for _ in range(num_devices)]
        for s in self.shards:
            self.by_device[s.device].append(s)
        self.slots = max(1, max(len(v) for v in self.by_device))
        super().__init__(name, features, members, width, num_devices)

    def _place(self) -> list[list[Segment]]:
        out = []
        for shards in self.by_device:
            off, segs = 0, []
            for s in shards:
                rows = self.features.sparse[s.feature].rows
                segs.append(Segment(s.feature, 0, rows, s.col0, off))
                off += rows
            out.append(segs)
        return out

    def slot_tables(self):
        """Static routing tables, i32[N, K] each: member index (-1 = empty
        slot) and local row offset of every slot."""
        n, k = self.num_devices, self.slots
        member = np.full((n, k), -1, np.int32)
        offset = np.zeros((n, k), np.int32)
        pos = {f: i for i, f in enumerate(self.members)}
        for d, shards in enumerate(self.by_device):
            for j, (s, seg) in enumerate(zip(shards, self.segments[d])):
                member[d, j] = pos[s.feature]
                offset[d, j] = seg.offset
        return member, offset

    def slot_bounds(self):
        _, offset = self.slot_tables()
        most = max(self.features.sparse[s.feature].rows for s in self.shards)
        return jnp.asarray(offset)[lax.axis_index(DEVICES)], most

    def pieces(self) -> list[Piece]:
        return [Piece(s.feature, s.col0) for s in self.shards]

    def send_ids(self, ids, lengths):
        """The local batch's ids arranged for the owners: (i32[N(dest), K, B, L]
        local rows at each destination's slots, -1 = none; out-of-range count)."""
        gid, bad = self.member_ids(ids, lengths)  # [B, T, L]
        member, offset = self.slot_tables()
        send = gid[:, np.maximum(member, 0)]  # [B, N, K, L]
        keep = (send >= 0) & jnp.asarray(member >= 0)[None, :, :, None]
        send = jnp.where(keep, send + jnp.asarray(offset)[None, :, :, None], -1)
        return jnp.transpose(send, (1, 2, 0, 3)), bad

    def input_dist(self, ids, lengths):
        send, bad = self.send_ids(ids, lengths)  # [N(dest), K, B, L]
        recv = lax.all_to_all(send, DEVICES, 0, 0, tiled=True)  # [N(src), K, B, L]
        return recv, bad

    def output_dist(self, owner_out):
        back = lax.all_to_all(owner_out, DEVICES, 0, 0, tiled=True)  # [N(owner), K, B, ...]
        n, k = back.shape[:2]
        where = np.array([s.device * k + self.by_device[s.device].index(s) for s in self.shards])
        pieces = jnp.take(back.reshape((n * k,) + back.shape[2:]), where, axis=0)  # [P, B, ...]
        return jnp.moveaxis(pieces, 0, 1)

    def row_mean_sq(self, g):
        """Mean of squared row gradients over each table's full width.

        All column shards of a table receive the same ids in the same order,
        so their de-duplicated rows line up slot by slot; the per-row sums of
        squares of a table's shards are added by one `psum` over the devices.
        Slots of whole tables need no communication.
        """
        ssq = jnp.sum(g * g, axis=-1)  # [K, U]
        n, k = self.num_devices, self.slots
        tables = sorted({s.feature for s in self.shards if self._split(s.feature)})
        if not tables:
            return ssq / self.width
        split = np.full((n, k), len(tables), np.int32)  # len(tables) = not split
        dims = np.full((n, k), self.width, np.float32)
        for d, shards in enumerate(self.by_device):
            for j, s in enumerate(shards):
                if s.feature in tables:
                    split[d, j] = tables.index(s.feature)
                    dims[d, j] = self.features.sparse[s.feature].dim
        me = lax.axis_index(DEVICES)
        mine = jnp.asarray(split)[me]
        total = jnp.zeros((len(tables),) + ssq.shape[1:], ssq.dtype).at[mine].add(ssq, mode="drop")
        total = lax.psum(total, DEVICES)
        full = jnp.where((mine < len(tables))[:, None], total[jnp.minimum(mine, len(tables) - 1)], ssq)
        return full / jnp.asarray(dims)[me][:, None]

    @property
    def communicating_update(self) -> bool:
        """The update exchanges row statistics between column shards."""
        return any(self._split(s.feature) for s in self.shards)

    def _split(self, feature: int) -> bool:
        return sum(s.feature == feature for s in self.shards) > 1

    def update_view(self, owner_ids, owner_grads):
        n, k, b, ln = owner_ids.shape
        ids = jnp.transpose(owner_ids, (1, 0, 2, 3)).reshape(k, n * b, ln)
        g = jnp.moveaxis(owner_grads, 1, 0)
        return ids, g.reshape((k, n * b) + g.shape[3:])


def table_wise_shards(features: FeatureSet, plan) -> dict[str, list[Shard]]:
    """One whole-width shard per table-wise table."""
    return {
        name: [Shard(features.index(name), 0, p.devices[0])]
        for name, p in plan.items()
    }


__all__ = ["Shard", "TableWiseGroup", "table_wise_shards"]
