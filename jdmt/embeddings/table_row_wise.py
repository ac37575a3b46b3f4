"""Table-row-wise sharding: a table lives on one host, its rows spread over
that host's L local devices.

Local rank l of the table's host holds rows `[l * ceil(R / L), (l + 1) *
ceil(R / L))`. Notation: H hosts, L devices per host, B local batch, K the
group's slots per host (the most tables any host holds in the group), P ids
per bag.

input_dist:  the ids of host h's tables go to host h by an all-to-all over
             `host` only (device (h', l) talks to the same local rank l of
             every host): device (h, l) then holds host h's ids for the
             samples of devices (h', l), all h'. An all-gather over `local`
             gives every device of the host the ids of all H * L * B samples;
             each keeps those that fall in its row block.
lookup:      partial pooled sums (or the sequence rows it owns, zeros
             elsewhere) for the N * B samples
output_dist: reduce-scatter (`psum_scatter`) over `local`: device (h, l)
             gets the full sums for the samples of devices (h', l); then an
             all-to-all over `host` sends each sample's rows back to its own
             device (h', l).

Only the two all-to-alls cross hosts, and each moves K B (P ids or one
output) per peer host; the all-gather and the reduce-scatter stay inside a
host. The backward pass is the transpose: an all-to-all over `host`, then an
all-gather over `local` of the output gradients. The update is local (each
device owns whole rows), so the CPU kernel path applies.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from jdmt.data.specs import FeatureSet
from jdmt.embeddings.base import Group, Piece, Segment, ceil_div
from jdmt.embeddings.types import ShardingType, table_row_wise_host
from jdmt.mesh import HOST, LOCAL


class TableRowWiseGroup(Group):
    """Tables each owned by one host, their row blocks spread over its devices.

    Args:
      members: feature indices of the group's tables.
      hosts: the owner host of each member (same order).
      num_devices: H * L.
      local: L, the devices per host.
    """

    slot_axis = 2  # ids at the owner: [L(src local), H(src host), K, B, P]

    def __init__(
        self,
        name: str,
        features: FeatureSet,
        members: Sequence[int],
        hosts: Sequence[int],
        width: int,
        num_devices: int,
        local: int,
    ):
        if local < 1 or num_devices % local:
            raise ValueError(f"group {name}: {local} devices per host do not divide {num_devices}")
        if len(hosts) != len(members):
            raise ValueError(f"group {name}: one host per member needed")
        self.local = int(local)
        self.hosts = num_devices // self.local
        order = sorted(range(len(members)), key=lambda i: members[i])
        members = [int(members[i]) for i in order]
        self.owner_host = np.array([int(hosts[i]) for i in order], np.int64)
        if np.any((self.owner_host < 0) | (self.owner_host >= self.hosts)):
            raise ValueError(f"group {name}: owner hosts {self.owner_host.tolist()} not in [0, {self.hosts})")
        # slot k of host h holds member `by_host[h][k]` (member index, not feature)
        self.by_host: list[list[int]] = [[] for _ in range(self.hosts)]
        for t, h in enumerate(self.owner_host):
            self.by_host[int(h)].append(t)
        self.slots = max(1, max(len(v) for v in self.by_host))
        super().__init__(name, features, members, width, num_devices)

    # ---- layout -----------------------------------------------------------------------------

    def _place(self) -> list[list[Segment]]:
        ln, k = self.local, self.slots
        self.block = np.array([ceil_div(int(r), ln) for r in self.rows], np.int64)
        # per (host, slot): member (-1 empty), row block and local row offset
        self.member = np.full((self.hosts, k), -1, np.int32)
        self.slot_block = np.zeros((self.hosts, k), np.int32)
        self.slot_offset = np.zeros((self.hosts, k), np.int32)
        for h, ts in enumerate(self.by_host):
            off = 0
            for j, t in enumerate(ts):
                self.member[h, j] = t
                self.slot_block[h, j] = self.block[t]
                self.slot_offset[h, j] = off
                off += int(self.block[t])
        out = []
        for d in range(self.num_devices):
            h, l = divmod(d, ln)
            segs = []
            for j, t in enumerate(self.by_host[h]):
                row0 = l * int(self.block[t])
                rows = max(0, min(int(self.block[t]), int(self.rows[t]) - row0))
                if rows:
                    segs.append(Segment(self.members[t], row0, rows, 0, int(self.slot_offset[h, j])))
            out.append(segs)
        return out

    def slot_bounds(self):
        me = lax.axis_index(HOST)
        return jnp.asarray(self.slot_offset)[me], int(self.block.max())

    def pieces(self) -> list[Piece]:
        return [Piece(f, 0) for f in self.members]

    # ---- stages -----------------------------------------------------------------------------

    def send_ids(self, ids, lengths):
        """The local batch's ids arranged for the owner hosts: (i32[H(dest), K, B, P]
        rows of each destination host's slot tables, -1 = none; out-of-range count)."""
        gid, bad = self.member_ids(ids, lengths)  # [B, T, P]
        send = gid[:, np.maximum(self.member, 0)]  # [B, H, K, P]
        send = jnp.where(jnp.asarray(self.member >= 0)[None, :, :, None], send, -1)
        return jnp.transpose(send, (1, 2, 0, 3)), bad

    def input_dist(self, ids, lengths):
        send, bad = self.send_ids(ids, lengths)
        # device (h, l) now holds host h's ids for the samples of devices (h', l)
        recv = lax.all_to_all(send, HOST, 0, 0, tiled=True)  # [H(src), K, B, P]
        return self.row_blocks(recv), bad

    def row_blocks(self, recv):
        """Inside `shard_map`: host h's ids at device (h, l), i32[H(src host), K,
        B, P] table rows of the samples of devices (h', l) -> the local rows of
        this device's row blocks for the samples of every device (h', l'),
        i32[L(src), H(src), K, B, P] (-1: none), by an all-gather over `local`."""
        allg = lax.all_gather(recv, LOCAL, axis=0, tiled=False)  # [L(src), H(src), K, B, P]
        h, l = lax.axis_index(HOST), lax.axis_index(LOCAL)
        block = jnp.asarray(self.slot_block)[h][None, None, :, None, None]
        offset = jnp.asarray(self.slot_offset)[h][None, None, :, None, None]
        rel = allg - l * block
        own = (allg >= 0) & (rel >= 0) & (rel < block)
        return jnp.where(own, rel + offset, -1)

    def output_dist(self, owner_out):
        # full sums for the samples of devices (h', l), h' = every host
        mine = lax.psum_scatter(owner_out, LOCAL, scatter_dimension=0, tiled=True)[0]  # [H, K, B, ...]
        back = lax.all_to_all(mine, HOST, 0, 0, tiled=True)  # [H(owner), K, B, ...]
        return self.pieces_of(back)

    def pieces_of(self, back):
        """Outputs at the batch's device, [H(owner host), K, B, ...] -> the
        pieces in `pieces()` order, [B, T, ...]."""
        h, k = back.shape[:2]
        where = np.array([int(self.owner_host[t]) * k + self.by_host[self.owner_host[t]].index(t)
                          for t in range(len(self.members))])
        pieces = jnp.take(back.reshape((h * k,) + back.shape[2:]), where, axis=0)  # [T, B, ...]
        return jnp.moveaxis(pieces, 0, 1)

    communicating_update = False  # each device owns whole rows: the update is local

    def update_view(self, owner_ids, owner_grads):
        ln, h, k, b, p = owner_ids.shape
        ids = jnp.transpose(owner_ids, (2, 0, 1, 3, 4)).reshape(k, ln * h * b, p)
        g = jnp.moveaxis(owner_grads, 2, 0)
        return ids, g.reshape((k, ln * h * b) + g.shape[4:])


def table_row_wise_hosts(plan, local: int | None = None) -> tuple[dict[str, int], int | None]:
    """({name: owner host}, L) of the table-row-wise placements of `plan`.

    L is `local` if given, else read from the placements (their device
    count), which must agree.
    """
    hosts, lns = {}, set()
    for name, p in plan.items():
        if p.type is ShardingType.TABLE_ROW_WISE:
            hosts[name], ln = table_row_wise_host(p, local)
            lns.add(ln)
    if len(lns) > 1:
        raise ValueError(f"table_row_wise placements disagree on the devices per host: {sorted(lns)}")
    return hosts, (lns.pop() if lns else local)


__all__ = ["TableRowWiseGroup", "table_row_wise_hosts"]
