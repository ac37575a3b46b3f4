"""Host-replicated tables: every host holds the table, its rows split over the host's devices.

Row r of a host-replicated table lives on local rank `r % L` of *every*
host (FlexShard's warm tier, `jdmt.embeddings.tiers`). A device asks only
the devices of its own host: ids and rows travel over `local`, never across
hosts. Each owner sums the gradients its host sent for each of its rows;
the replicas of a row (one per host) then add their hosts' sums over `host`
and apply the same update to the same sum, so they stay bit-identical.

`LocalRows` is the route of one width's host-replicated pieces (storage
`hr_w{D}`): requests de-duplicated per owner (`routing.row_send`), one
exchange of ids and one of rows over `local`, and the reverse for the
gradients. `replica_sum` is the sum over the replicas.
"""

from __future__ import annotations

import jax
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

__all__ = ["LocalRows", "replica_sum"]


class LocalRows:
    """The route of the host-replicated pieces of one width, over `local`."""

    def __init__(self, layout: Layout, width: int):
        feats = layout.features.sparse
        offsets = layout.features.offsets
        ln = layout.local
        self.width = width
        self.peers = ln
        self.rows_per_device = layout.hr_rows.get(width, 0)
        mine = [(i, p) for i, p in enumerate(layout.pieces) if p.width == width and p.host_replicated]
        self.pieces = [i for i, _ in mine]
        k = max(1, len(mine))
        self.stride = np.full(k, ln, np.int32)
        self.devices = np.tile(np.arange(ln, dtype=np.int32), (k, 1))
        self.offsets = np.zeros((k, ln), np.int32)
        cols, piece_of_col, self.pos, self.pooled = [], [], [], []
        for j, (_, p) in enumerate(mine):
            self.offsets[j] = p.offsets
            m = feats[p.feature].max_len
            self.pos.append(np.arange(len(cols), len(cols) + m))
            cols += list(offsets[p.feature] + np.arange(m))
            piece_of_col += [j] * m
            self.pooled.append(feats[p.feature].pooled)
        self.cols = np.array(cols, np.int64)
        self.piece_of_col = np.array(piece_of_col, np.int32)
        self.weighted = [feats[p.feature].weighted for _, p in mine]

    def bound(self, b: int) -> int:
        """The most unique rows one owner can be asked for by one device."""
        return max(8, min(len(self.cols) * b, self.rows_per_device))

    def default_caps(self, b: int) -> int:
        """1.5 times an even spread of a device's ids over the L owners."""
        want = int(np.ceil(1.5 * len(self.cols) * b / self.peers)) + 32
        return min(self.bound(b), max(8, -(-want // 8) * 8))

    def measure(self, canon: np.ndarray) -> dict[str, int]:
        """The most unique rows any device asks of one owner (host numpy;
        canon i32[N, B, slots + 1] each device's tier rows)."""
        most = 0
        b = canon.shape[1]
        piece = np.tile(self.piece_of_col, b)
        for d in range(canon.shape[0]):
            rows = canon[d][:, self.cols].reshape(-1)
            ok = rows >= 0
            r, k = rows[ok].astype(np.int64), piece[ok]
            key = np.unique((r % self.peers) * self.rows_per_device + self.offsets[k, r % self.peers]
                            + r // self.peers)
            if key.size:
                most = max(most, int(np.bincount(key // max(1, self.rows_per_device)).max()))
        return {f"hr{self.width}/rows": most}

    # ---- one step, inside shard_map ----------------------------------------------------------

    def forward(self, table, canon, cap: int, mode: str, impl: Impl, wcanon=None):
        """The pieces' rows for the local batch: ({piece k: f32[B, D] pooled
        or f32[B, S, D]}, ctx, stats). `table`: this device's `hr_w{D}`;
        `wcanon`: per-sample weights at canon's columns, or None."""
        b = canon.shape[0]
        g = self.peers
        me = lax.axis_index(LOCAL)
        stats = Stats()
        rows = routing.take_columns(canon, self.cols).reshape(-1)
        piece = jnp.asarray(np.tile(self.piece_of_col, b))
        send, sizes, inv, unique = routing.row_send(
            rows, piece, jnp.asarray(self.stride), jnp.asarray(self.devices), jnp.asarray(self.offsets),
            max(1, self.rows_per_device), g, cap, impl)
        stats.need(f"hr{self.width}/rows", jnp.max(sizes))
        stats.over(overflow(sizes, cap))
        stats.dedup(jnp.sum(rows >= 0, dtype=jnp.int32), unique)
        here = np.zeros(g, np.int32)  # every peer is on this host
        stats.payload(jnp.minimum(sizes, cap), 4, here, 0, me)
        recv, rsz = exchange(send, sizes, (LOCAL,), mode=mode, fill=-1)
        out = owner_rows(table, recv, impl)  # [L, cap, D]
        back, _ = exchange(out, rsz, (LOCAL,), recv_sizes=jnp.minimum(sizes, cap), mode=mode)
        stats.payload(rsz, 4 * self.width, here, 0, me)
        rows_back = back.reshape(-1, self.width)
        inv = inv.reshape(b, -1)
        res = {}
        wts = piece_weights(wcanon, self.cols, self.pos, self.weighted)
        for j, pos in enumerate(self.pos):
            at = inv[:, pos]
            res[j] = (pool_received(rows_back, at, impl, wts.get(j)) if self.pooled[j]
                      else take_rows(rows_back, at, impl))
        ctx = {"row_ids": recv, "row_recv": rsz, "row_sizes": jnp.minimum(sizes, cap), "row_inv": inv,
               "read": _read_token([out])}
        return res, ctx, stats

    def backward(self, ctx, g_rows, mode: str, wcanon=None):
        """Each owner's rows and this host's gradient sums for them (`wcanon`:
        the forward's weights).

        Returns (rows i32[L * cap] storage rows, -1: none; grads f32[L * cap, D]; stats)."""
        g = self.peers
        me = lax.axis_index(LOCAL)
        stats = Stats()
        cap = ctx["row_ids"].shape[1]
        send = unique_row_grads(ctx["row_inv"], g_rows, self.pos, self.pooled, g * cap, self.width,
                                piece_weights(wcanon, self.cols, self.pos, self.weighted))
        got, _ = exchange(send.reshape(g, cap, self.width), ctx["row_sizes"], (LOCAL,),
                          recv_sizes=ctx["row_recv"], mode=mode)
        stats.payload(ctx["row_sizes"], 4 * self.width, np.zeros(g, np.int32), 0, me)
        return ctx["row_ids"].reshape(-1), got.reshape(-1, self.width), stats


def replica_sum(rows, grads, table_rows: int, hosts: int, local: int, everywhere: bool,
                token) -> tuple[jax.Array, jax.Array, Stats]:
    """Sum a replicated storage's gradients over its replicas (inside the body).

    Args:
      rows: i32[n] storage rows with a gradient here (-1: none; repeats are
        summed); grads: f32[n, D].
      table_rows: rows of this device's storage.
      everywhere: the storage is replicated on every device (data-parallel:
        a hierarchical all-reduce, reduce-scatter over `local`, all-reduce of
        the 1/L part over `host`, all-gather over `local`); else once per
        host (host-replicated: an all-reduce over `host`).
      token: the step's read token.

    Returns (rows i32[R]: every storage row any replica touched, else -1;
    grads f32[R, D] their sums, bit-identical on every replica; stats: the
    all-reduce's payload, 2 (G - 1) / G of each level's block per device).
    A dense block of gradients and touch counts is summed: hot and warm
    tiers are rows that nearly every host touches in every step, where a
    dense sum moves the least.
    """
    w = grads.shape[1]
    rp = -(-table_rows // local) * local if everywhere else table_rows
    at = jnp.where(rows >= 0, rows, rp)
    ones = jnp.ones((grads.shape[0], 1), grads.dtype)
    block = jnp.zeros((rp + 1, w + 1), grads.dtype).at[at].add(jnp.concatenate([grads, ones], 1), mode="drop")[:rp]
    stats = Stats()
    row_bytes = 4.0 * (w + 1)
    if everywhere:
        part = lax.psum_scatter(block, LOCAL, scatter_dimension=0, tiled=True)
        part = lax.psum(part, HOST)
        block = lax.all_gather(part, LOCAL, axis=0, tiled=True)
        stats.intra = jnp.float32(2.0 * (local - 1) / local * rp * row_bytes)
        stats.cross = jnp.float32(2.0 * (hosts - 1) / hosts * rp / local * row_bytes)
    else:
        block = lax.psum(block, HOST)
        stats.cross = jnp.float32(2.0 * (hosts - 1) / hosts * rp * row_bytes)
    block = block[:table_rows]
    touched = jnp.where(block[:, w] > 0, jnp.arange(table_rows, dtype=jnp.int32), -1) + token
    return touched, block[:, :w], stats
