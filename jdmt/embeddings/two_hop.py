"""Row-wise requests de-duplicated per host: inside the host first, then across.

On the flat path (`flat.WidthRoute`) every device asks every row shard
directly, de-duplicating only its own ids. On a mesh of H hosts of L devices
the same row is then asked for, and sent back, up to L times across hosts:
once by every device of a host that needs it. `TwoHopRows` routes the
row-wise pieces of one width in two hops so that a host asks for each row
once:

1. *inside the host* (over `local`): the requester (h, l) de-duplicates its
   ids per owner and sends each owner's requests to (h, l'), the device of
   its host with the owner's local rank l' (`routing.row_send` keyed by
   the owner's local rank, then its host and storage row);
2. *across hosts* (over `host`): (h, l') merges what the L devices of its
   host asked of owners of local rank l', de-duplicates it per owner host
   (`routing.send_keys`), and sends each owner (h', l') its unique rows.

The owner returns each row once to (h, l'), which hands each requester the
rows it asked for; pooling happens at the requester as on the flat path.
The backward runs the hops in reverse: the requester sums each unique row's
gradients, (h, l') sums what its host's devices sent for the same row, and
the owner gets one gradient row per host and row: what `sparse_step` takes.

Cross-host requests, rows and gradients drop to one per (host, row) from
one per (device, row); the second hop adds the same again inside the host,
where links are faster (`docs/design.md`, Routing).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from jdmt.embeddings import routing
from jdmt.embeddings.exchange import exchange, overflow
from jdmt.embeddings.flat import (Stats, _read_token, owner_rows, piece_weights, pool_received, take_rows,
                                 unique_row_grads)
from jdmt.embeddings.layout import Layout
from jdmt.mesh import HOST, LOCAL
from jdmt.pallas_kernels.common import Impl

__all__ = ["HopCaps", "TwoHopRows", "usable"]


@dataclasses.dataclass(frozen=True)
class HopCaps:
    """Capacities of the two hops, per peer block: unique rows a requester
    asks of one device of its host (`local`), unique rows a host's device
    asks of one owner host (`host`)."""

    local: int
    host: int


def usable(layout: Layout, width: int) -> bool:
    """Whether the two hops apply to a width: more than one host and more
    than one device per host, and keys (owner host, storage row) in int32."""
    h, ln = layout.hosts, layout.local
    rows = max(1, layout.rows.get(width, 0))
    return h > 1 and ln > 1 and h * ln * rows < np.iinfo(np.int32).max


class TwoHopRows:
    """The two-hop routing of the row-wise pieces of one width.

    Args:
      layout: the layout.
      width: the pieces' width.
      pieces: indices of the row-wise pieces (rows spread over devices).
    """

    def __init__(self, layout: Layout, width: int, pieces: list[int]):
        h, ln = layout.hosts, layout.local
        self.hosts, self.local = h, ln
        self.width = width
        self.pieces = list(pieces)
        feats = layout.features.sparse
        offsets = layout.features.offsets
        self.rows_per_device = r = max(1, layout.rows.get(width, 0))
        ps = [layout.pieces[i] for i in self.pieces]
        smax = max(p.stride for p in ps)
        self.stride = np.array([p.stride for p in ps], np.int32)
        # row shard s of piece k: owner local rank, and (owner host) * R + storage offset
        self.rank = np.zeros((len(ps), smax), np.int32)
        self.offsets = np.zeros((len(ps), smax), np.int32)
        cols, piece_of_col = [], []
        self.pos: list[np.ndarray] = []  # per piece: its positions among the columns
        for k, p in enumerate(ps):
            d = np.asarray(p.devices, np.int64)
            self.rank[k, : p.stride] = d % ln
            self.offsets[k, : p.stride] = (d // ln) * r + np.asarray(p.offsets)
            m = feats[p.feature].max_len
            self.pos.append(np.arange(len(cols), len(cols) + m))
            cols += list(offsets[p.feature] + np.arange(m))
            piece_of_col += [k] * m
        self.cols = np.array(cols, np.int64)  # [M] batch columns of the pieces' ids
        self.piece_of_col = np.array(piece_of_col, np.int32)
        self.pooled = [feats[p.feature].pooled for p in ps]
        self.weighted = [feats[p.feature].weighted for p in ps]

    # ---- sizes ---------------------------------------------------------------------------

    def bound(self, b: int) -> HopCaps:
        """Capacities that cannot overflow: every id of a requester unique
        (first hop), every id of a host's L requesters unique (second)."""
        m = max(1, len(self.cols) * b)
        return HopCaps(m, self.local * m)

    def default_caps(self, b: int) -> HopCaps:
        """Before any data is seen: 1.5 times an even spread of the ids over
        the row shards, plus slack (de-duplication only lowers the counts)."""
        bd = self.bound(b)
        m = len(self.cols) * b

        def est(x, bound):
            return int(min(bound, max(8, -(-(int(np.ceil(1.5 * x)) + 32) // 8) * 8)))

        return HopCaps(est(m / self.local, bd.local), est(m / self.hosts, bd.host))

    def keys(self, canon_d: np.ndarray) -> np.ndarray:
        """The unique first-hop keys of one device's batch (host numpy):
        `rank * (H * R) + host * R + storage row` of every row it asks for."""
        b = canon_d.shape[0]
        rows = canon_d[:, self.cols].reshape(-1)
        piece = np.tile(self.piece_of_col, b)
        ok = rows >= 0
        r, k = rows[ok].astype(np.int64), piece[ok]
        stride = self.stride[k]
        s = r % stride
        hr = self.hosts * self.rows_per_device
        return np.unique(self.rank[k, s].astype(np.int64) * hr + self.offsets[k, s] + r // stride)

    def measure(self, canon: np.ndarray) -> dict[str, int]:
        """What the two hops need for one global batch (host numpy; the keys
        and meaning of a step's `stats["need"]`).

        Args:
          canon: i32[N, B, slots + 1] each device's table rows (-1: none).
        """
        h, ln = self.hosts, self.local
        hr = h * self.rows_per_device
        first = second = 0
        for x in range(h):
            keys = [self.keys(canon[x * ln + l]) for l in range(ln)]
            for k in keys:
                if k.size:
                    first = max(first, int(np.bincount(k // hr, minlength=ln).max()))
            u = np.unique(np.concatenate(keys))
            if u.size:  # per (first-hop device, owner host)
                second = max(second, int(np.bincount((u // hr) * h + (u % hr) // self.rows_per_device).max()))
        return {f"w{self.width}/rows_local": first, f"w{self.width}/rows_host": second}

    # ---- one step, inside shard_map --------------------------------------------------------

    def forward(self, table, canon, caps: HopCaps, mode: str, impl: Impl, wcanon=None):
        """Look up the pieces for the local batch.

        Args:
          table: f32[R, D] this device's storage of the width.
          canon: i32[B, slots + 1] the batch's table rows (-1: none).
          wcanon: f32[B, slots + 1] per-sample weights at canon's columns, or None.

        Returns:
          ({piece k: f32[B, D] pooled or f32[B, S, D]}, ctx, stats).
        """
        b = canon.shape[0]
        h, ln, w, r = self.hosts, self.local, self.width, self.rows_per_device
        me_h, me_l = lax.axis_index(HOST), lax.axis_index(LOCAL)
        inside = (np.zeros(ln, np.int32), jnp.int32(0), me_l)  # payload: every peer on this host
        across = (np.arange(h, dtype=np.int32), me_h, me_h)
        stats = Stats()
        rows = routing.take_columns(canon, self.cols).reshape(-1)
        piece = jnp.asarray(np.tile(self.piece_of_col, b))
        # hop 1: to the device of this host with the owner's local rank
        send1, sz1, inv1, unique1 = routing.row_send(
            rows, piece, jnp.asarray(self.stride), jnp.asarray(self.rank), jnp.asarray(self.offsets),
            h * r, ln, caps.local, impl)
        stats.need(f"w{w}/rows_local", jnp.max(sz1))
        stats.over(overflow(sz1, caps.local))
        sz1 = jnp.minimum(sz1, caps.local)
        stats.payload(sz1, 4, *inside)
        stats.dedup(jnp.sum(rows >= 0, dtype=jnp.int32), unique1)
        recv1, rsz1 = exchange(send1, sz1, (LOCAL,), mode=mode, fill=-1)
        # hop 2: this host's requests, unique per (owner host, row), to the owners
        send2, sz2, inv2, unique2 = routing.send_keys(recv1.reshape(-1), r, h, caps.host, impl)
        stats.need(f"w{w}/rows_host", jnp.max(sz2))
        stats.over(overflow(sz2, caps.host))
        sz2 = jnp.minimum(sz2, caps.host)
        stats.payload(sz2, 4, *across)
        stats.host_unique = stats.host_unique + unique2
        ids, rsz2 = exchange(send2, sz2, (HOST,), mode=mode, fill=-1)
        # the owners' rows back to hop 1's devices, and on to the requesters
        got = owner_rows(table, ids, impl)  # [H, cap2, D]
        back2, _ = exchange(got, rsz2, (HOST,), recv_sizes=sz2, mode=mode)
        stats.payload(rsz2, 4 * w, *across)
        fwd = take_rows(back2.reshape(-1, w), inv2, impl).reshape(ln, caps.local, w)
        back1, _ = exchange(fwd, rsz1, (LOCAL,), recv_sizes=sz1, mode=mode)
        stats.payload(rsz1, 4 * w, *inside)
        flat = back1.reshape(-1, w)
        inv1 = inv1.reshape(b, -1)
        out = {}
        wts = piece_weights(wcanon, self.cols, self.pos, self.weighted)
        for k, pos in enumerate(self.pos):
            at = inv1[:, pos]
            out[k] = pool_received(flat, at, impl, wts.get(k)) if self.pooled[k] else take_rows(flat, at, impl)
        ctx = dict(inv1=inv1, sz1=sz1, rsz1=rsz1, inv2=inv2, sz2=sz2, rsz2=rsz2, ids=ids,
                   read=_read_token([got]))
        return out, ctx, stats

    def backward(self, ctx, g_rows, mode: str, wcanon=None):
        """The gradients of `forward`'s outputs, summed per host, at the owners.

        Args:
          g_rows: {piece k: f32[B, D] or f32[B, S, D]}.
          wcanon: the forward's weights.

        Returns:
          (rows i32[n] storage rows, src i32[n], grads f32[n, D], stats): what
          `sparse_step` takes for this device's storage.
        """
        h, ln, w = self.hosts, self.local, self.width
        me_h, me_l = lax.axis_index(HOST), lax.axis_index(LOCAL)
        inside = (np.zeros(ln, np.int32), jnp.int32(0), me_l)
        across = (np.arange(h, dtype=np.int32), me_h, me_h)
        stats = Stats()
        cap1 = ctx["inv2"].shape[0] // ln
        cap2 = ctx["ids"].shape[1]
        send1 = unique_row_grads(ctx["inv1"], g_rows, self.pos, self.pooled, ln * cap1, w, piece_weights(wcanon, self.cols, self.pos, self.weighted))
        g1, _ = exchange(send1.reshape(ln, cap1, w), ctx["sz1"], (LOCAL,), recv_sizes=ctx["rsz1"], mode=mode)
        stats.payload(ctx["sz1"], 4 * w, *inside)
        at2 = jnp.where(ctx["inv2"] >= 0, ctx["inv2"], h * cap2)
        send2 = jnp.zeros((h * cap2, w), g1.dtype).at[at2].add(g1.reshape(-1, w), mode="drop")
        g2, _ = exchange(send2.reshape(h, cap2, w), ctx["sz2"], (HOST,), recv_sizes=ctx["rsz2"], mode=mode)
        stats.payload(ctx["sz2"], 4 * w, *across)
        rows = ctx["ids"].reshape(-1) + ctx["read"]  # the write waits for this step's reads
        src = jnp.arange(h * cap2, dtype=jnp.int32)
        return rows, src, g2.reshape(-1, w), stats
