"""The flat path: every device asks the owners of its ids' rows directly.

One exchange group holds all N devices, numbered local-rank-major (`AXIS`:
peer g is device (h, l) with g = l * H + h), so that the rows an owner
receives arrive in the same order from the flat path and from SPTT's
in-host path (which visits sources local rank by local rank): their updates
then sum duplicate ids in the same order, bit for bit.

For the pieces of one width (`WidthRoute`), a step:

1. *bags* (pooled features whose piece lives whole on one device:
   table-wise, column shards): every bag of the local batch goes to the
   piece's owner (`routing.bag_send`); the owner pools it and returns one
   row per bag; the backward returns one gradient row per bag.
2. *rows* (row-wise pieces, unless they take two hops (`two_hop`),
   sequence features, and pooled bags where asking for unique rows is
   cheaper): the ids are de-duplicated per owner
   (`routing.row_send`), each owner returns each asked row once, and the
   requester pools (or places) them; the backward sums each unique row's
   gradients before they go back.

Each owner then updates the rows it received gradients for
(`optimizers.sparse_step`), once per storage buffer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdmt.embeddings import routing
from jdmt.embeddings.exchange import exchange, overflow, payload_bytes
from jdmt.embeddings.layout import Layout
from jdmt.embeddings.types import ShardingType
from jdmt.mesh import HOST, LOCAL
from jdmt.pallas_kernels.common import Impl
from jdmt.pallas_kernels.pooled_lookup import pooled_gather
from jdmt.pallas_kernels.sequence_lookup import sequence_gather

__all__ = ["AXIS", "FLAT_TYPES", "Caps", "Stats", "WidthRoute", "owner_pool", "owner_rows", "peer_of",
           "piece_weights", "pool_received", "position_grads", "take_rows", "unique_row_grads"]

AXIS = (LOCAL, HOST)
FLAT_TYPES = (ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE, ShardingType.ROW_WISE)


def peer_of(device: int, hosts: int, local: int) -> int:
    """A flat device index's position in the flat exchange group (`AXIS`)."""
    return (device % local) * hosts + device // local


@dataclasses.dataclass(frozen=True)
class Caps:
    """Capacities of one width's blocks, per peer: ids of bags beyond the
    header (`bag_ids`) and unique rows asked for (`rows`)."""

    bag_ids: int
    rows: int


def owner_pool(table, ids, count, impl: Impl, weights=None):
    """Pooled rows f32[..., D] of bags i32[..., P] of storage rows at their
    owner (-1: none), visiting at most `count` positions; each row times its
    weight where `weights` f32[..., P] are given."""
    if impl.pallas:
        flat = ids.reshape(-1, ids.shape[-1])
        flat = jnp.where((flat >= 0) & (flat < table.shape[0]), flat, -1)
        w = None if weights is None else weights.reshape(flat.shape)
        return pooled_gather(impl, table, flat, w).reshape(ids.shape[:-1] + table.shape[1:])
    if impl.cpu_threads:  # C++ visits every position; those past `count` hold -1
        return pool_received(table, ids, impl, weights)
    return routing.pool_rows(table, ids, count, weights)


def pool_received(rows, at, impl: Impl, weights=None):
    """Bags f32[..., D] summed from rows f32[M, D] (a table, or rows received
    from their owners) at i32[..., P] (-1: none), in position order, each
    row times its weight where `weights` f32[..., P] are given (per-sample
    weights): in C++ where the CPU kernels run (`impl.cpu_threads`), else
    XLA ops."""
    if impl.cpu_threads:
        from jdmt.embeddings import cpu_kernels

        return cpu_kernels.pooled_lookup(rows, at, threads=impl.cpu_threads, weights=weights)
    return routing.pool_rows(rows, at, weights=weights)


def take_rows(rows, at, impl: Impl):
    """Rows f32[..., D] of rows f32[M, D] (a table, or rows received from
    their owners) at i32[...] (-1 or past the end: zeros; 16-bit rows are
    widened): in C++ where the CPU kernels run (the pooled lookup of
    one-position bags: a copy or a widening per row), else XLA ops."""
    if impl.cpu_threads:
        from jdmt.embeddings import cpu_kernels

        return cpu_kernels.pooled_lookup(rows, at[..., None], threads=impl.cpu_threads)
    return routing.gather_rows(rows, at)


def owner_rows(table, ids, impl: Impl):
    """Rows f32[..., D] of storage rows i32[...] at their owner (zeros for -1)."""
    if impl.pallas:
        flat = jnp.where((ids >= 0) & (ids < table.shape[0]), ids, -1).reshape(-1, 1)
        return sequence_gather(impl, table, flat).reshape(ids.shape + table.shape[1:])
    return take_rows(table, ids, impl)


SPLIT_PEERS = 16  # `WidthRoute.split_blocks` up to this many peers (bounds the program's size)


class WidthRoute:
    """The flat path's static routing of the pieces of one width.

    Args:
      layout: the layout.
      width: the pieces' width.
      bag_features: pooled features whose whole-table pieces travel as bags
        (the others' ids ask for unique rows). A weighted bag's weights
        travel with its ids (an f32 per id), and the owner pools weight x
        row; a weighted feature that asks for rows is pooled with its
        weights by the requester (the weights stay there).
      exclude: pieces that take another path (the host path).
    """

    def __init__(self, layout: Layout, width: int, bag_features: frozenset[int],
                 exclude: frozenset[int] = frozenset()):
        h, ln = layout.hosts, layout.local
        n = h * ln
        feats = layout.features.sparse
        offsets = layout.features.offsets
        self.width = width
        self.peers = n
        self.rows_per_device = layout.rows.get(width, 0)
        # the host of each peer, for payload accounting
        self.peer_host = np.array([g % h for g in range(n)], np.int32)
        mine = [(i, p) for i, p in enumerate(layout.pieces)
                if p.width == width and p.type in FLAT_TYPES and i not in exclude]
        self.pieces = [i for i, _ in mine]

        bags = [(i, p) for i, p in mine
                if p.stride == 1 and feats[p.feature].pooled and p.feature in bag_features]
        bags.sort(key=lambda ip: (peer_of(ip[1].devices[0], h, ln), ip[1].feature, ip[1].col0))
        self.bag_pieces = [i for i, _ in bags]
        count = np.zeros(n, np.int64)
        self.bag_maxlen = np.zeros(n, np.int64)  # per peer: the longest bag it pools
        self.bag_slots = np.zeros(n, np.int64)  # per peer: id positions per sample
        dst, kd, base, pool = [], [], [], []
        for _, p in bags:
            f = feats[p.feature]
            g = peer_of(p.devices[0], h, ln)
            dst.append(g)
            kd.append(count[g])
            base.append(p.offsets[0])
            count[g] += 1
            self.bag_maxlen[g] = max(self.bag_maxlen[g], f.max_len)
            self.bag_slots[g] += f.max_len
            pool.append(f.max_len)
        self.bag_count = count  # per peer: pieces it pools
        # weighted bags: their ids' weights travel beside them (unweighted bags of the
        # same width send weights of 1), and the owner pools weight x row
        self.bag_weighted = np.array([feats[p.feature].weighted for _, p in bags], bool)
        self.bag_dst = np.array(dst, np.int32)
        self.bag_kd = np.array(kd, np.int32)
        self.bag_base = np.array(base, np.int32)
        self.bag_pool = max(pool, default=1)
        cols = np.full((len(bags), self.bag_pool), -1, np.int64)
        for k, (_, p) in enumerate(bags):
            m = feats[p.feature].max_len
            cols[k, :m] = offsets[p.feature] + np.arange(m)
        self.bag_cols = cols  # [K_bag, P] batch columns (-1: none)

        rows = [(i, p) for i, p in mine if i not in set(self.bag_pieces)]
        self.row_pieces = [i for i, _ in rows]
        smax = max((p.stride for _, p in rows), default=1)
        self.row_stride = np.array([p.stride for _, p in rows] or [1], np.int32)
        self.row_devices = np.zeros((max(1, len(rows)), smax), np.int32)
        self.row_offsets = np.zeros((max(1, len(rows)), smax), np.int32)
        col_list, piece_of_col = [], []
        self.row_pos: list[np.ndarray] = []  # per row piece: its positions among the row columns
        for k, (_, p) in enumerate(rows):
            self.row_devices[k, : p.stride] = [peer_of(d, h, ln) for d in p.devices]
            self.row_offsets[k, : p.stride] = p.offsets
            m = feats[p.feature].max_len
            self.row_pos.append(np.arange(len(col_list), len(col_list) + m))
            col_list += list(offsets[p.feature] + np.arange(m))
            piece_of_col += [k] * m
        self.row_cols = np.array(col_list, np.int64)  # [M] batch columns of the row pieces' ids
        self.row_piece_of_col = np.array(piece_of_col, np.int32)
        self.row_pooled = [feats[p.feature].pooled for _, p in rows]
        self.row_weighted = [feats[p.feature].weighted for _, p in rows]

    def split_blocks(self, impl: Impl) -> bool:
        """Whether the bags' blocks are produced peer by peer (the C++ path
        on CPU, up to `SPLIT_PEERS` peers): the padded exchange splits its
        operand into the peers' blocks, and XLA:CPU copies each block out
        of one buffer, but cancels the split against a stack of separate
        arrays, so each lookup (and each gradient block, `bag_groups`)
        writes straight into what travels."""
        return impl.cpu and 1 < self.peers <= SPLIT_PEERS

    def bag_groups(self, impl: Impl) -> np.ndarray | None:
        """The bag pieces per peer (in piece order) when `split_blocks`, else None."""
        return self.bag_count if self.split_blocks(impl) else None

    # ---- sizes ---------------------------------------------------------------------------

    def header(self, b: int) -> np.ndarray:
        """i32[G] bags each peer pools for a batch of b samples."""
        return (self.bag_count * b).astype(np.int32)

    def bag_bound(self, b: int) -> int:
        """The most bag ids one peer can get from one device (every bag full)."""
        return int(self.bag_slots.max(initial=0)) * b

    def row_bound(self, b: int) -> int:
        """The most unique rows one peer can be asked for by one device."""
        return max(1, len(self.row_cols) * b)

    def default_caps(self, b: int) -> Caps:
        """Capacities before any data is seen: every bag full (never
        overflows), and for rows 1.5 times an even spread of a device's ids
        over the row shards plus the ids of whole-table pieces at the busiest
        peer (de-duplication only lowers the real counts)."""
        spread = 0.0
        whole = np.zeros(self.peers)
        for k, i in enumerate(self.row_pieces):
            m = len(self.row_pos[k]) * b
            if self.row_stride[k] == 1:
                whole[self.row_devices[k, 0]] += m
            else:
                spread += m / self.row_stride[k]
        rows = int(np.ceil(1.5 * (spread + whole.max(initial=0)))) + 32
        rows = min(self.row_bound(b), -(-rows // 8) * 8)
        return Caps(max(1, self.bag_bound(b)), max(8, rows))

    def measure(self, canon: np.ndarray) -> dict[str, int]:
        """What this width's exchanges need for one global batch (host numpy;
        the keys and meaning of a step's `stats["need"]`).

        Args:
          canon: i32[N, B, slots + 1] each device's table rows (-1: none).
        """
        out = {}
        n, b = canon.shape[:2]
        if self.bag_pieces:
            header = self.header(b)
            ids = (canon[:, :, self.bag_cols] >= 0) & (self.bag_cols >= 0)  # [N, B, K, P]
            per_piece = ids.sum(axis=(1, 3))  # [N, K]
            per_dst = np.zeros((n, self.peers), np.int64)
            for k, g in enumerate(self.bag_dst):
                per_dst[:, g] += per_piece[:, k]
            out[f"w{self.width}/bag_ids"] = int((per_dst + header).max() - header.max())
        if self.row_pieces:
            most = 0
            c = max(1, self.rows_per_device)
            for d in range(n):
                rows = canon[d][:, self.row_cols].reshape(-1)
                piece = np.tile(self.row_piece_of_col, b)
                ok = rows >= 0
                r, k = rows[ok].astype(np.int64), piece[ok]
                stride = self.row_stride[k]
                s = r % stride
                key = np.unique(self.row_devices[k, s].astype(np.int64) * c + self.row_offsets[k, s] + r // stride)
                if key.size:
                    most = max(most, int(np.bincount(key // c).max()))
            out[f"w{self.width}/rows"] = most
        return out

    # ---- one step, inside shard_map --------------------------------------------------------

    def forward(self, table, canon, caps: Caps, mode: str, impl: Impl, wcanon=None):
        """Look up this width's pieces for the local batch.

        Args:
          table: f32[R, D] this device's storage of the width.
          canon: i32[B, slots + 1] the batch's table rows (-1: none; the last
            column is all -1).
          caps: block capacities.
          wcanon: f32[B, slots + 1] per-sample weights at canon's columns (0
            where there is no id), or None; read for weighted features only.

        Returns:
          (bag_out f32[K_bag, B, D], row_out {row piece k: f32[B, D] pooled
           or f32[B, S, D]}, ctx, stats).
        """
        b = canon.shape[0]
        g = self.peers
        me = lax.axis_index(AXIS)
        my_host = lax.axis_index(HOST)
        stats = Stats()
        ctx = {}
        bag_out = row_out = None
        # Both kinds of request go in one exchange of ids (a block per peer cut in
        # two slices: bags, then rows) and one of rows back: fewer collectives.
        sends, sizes, parts = [], [], []
        alone = g == 1  # one device: no exchange, and bags are pooled where they are
        in_order = samples = False
        if self.bag_pieces:
            header = self.header(b)
            imax = int(header.max())
            items = jnp.asarray(header)[me]
            rows = routing.take_columns(canon, self.bag_cols)  # [B, K, P]
            wb = None  # the ids' weights, laid out as `rows`
            if wcanon is not None and self.bag_weighted.any():
                wb = jnp.where(jnp.asarray(self.bag_weighted)[None, :, None],
                               routing.take_columns(wcanon, self.bag_cols), 1.0)
            kk = np.repeat(np.arange(len(self.bag_pieces)), b)
            rank = self.bag_kd[kk] * b + np.tile(np.arange(b), len(self.bag_pieces))
            in_order = alone and np.array_equal(rank, np.arange(len(kk)))  # item (k, j) at slot k * B + j
            # One device with the C++ lookup: the bags stay in the samples' order
            # (b, k) and the kernel visits them table by table; no transpose of the
            # ids, of the pooled embeddings, or of their gradients
            samples = in_order and impl.cpu
            if samples:  # storage rows, [1, B * K, P] in (b, k) order
                base = jnp.asarray(self.bag_base)[None, :, None]
                local_ids = jnp.where(rows >= 0, rows + base, -1).reshape(1, -1, self.bag_pool)
                if wb is not None:
                    wb = wb.reshape(1, -1, self.bag_pool)
            else:
                rows = jnp.transpose(rows, (1, 0, 2)).reshape(-1, self.bag_pool)  # items (k, b)
                if wb is not None:
                    wb = jnp.transpose(wb, (1, 0, 2)).reshape(-1, self.bag_pool)
            if alone:
                if not samples:  # items in (k, b) order are the owner's order (rank); storage rows
                    base = jnp.asarray(self.bag_base[kk])[:, None]
                    local_ids = jnp.where(rows >= 0, rows + base, -1)[None]  # [1, I, P]
                    if wb is not None:
                        wb = wb[None]
                stats.need(f"w{self.width}/bag_ids", jnp.sum(rows >= 0, dtype=jnp.int32))
            else:
                cap = imax + caps.bag_ids
                if impl.cpu:  # in C++, from canon in one pass
                    from jdmt.embeddings import cpu_kernels

                    # canon without its all -1 last column (a bag's missing positions
                    # are -1 in bag_cols): XLA drops the column's concatenation, so the
                    # kernel reads the canonical rows as they were computed, not a copy
                    send, bsz, wsend = cpu_kernels.bag_pack(
                        canon[:, :-1], self.bag_cols, self.bag_dst, self.bag_kd, self.bag_base, header, cap,
                        wcanon=None if wb is None else wcanon[:, :-1], weighted=self.bag_weighted,
                        threads=impl.cpu_threads)
                else:
                    send, bsz, _, wsend = routing.bag_send(
                        rows, jnp.asarray(self.bag_dst[kk]), jnp.asarray(rank), jnp.asarray(self.bag_base[kk]),
                        jnp.asarray(header), cap, wb)
                stats.need(f"w{self.width}/bag_ids", jnp.max(bsz) - imax)
                stats.over(overflow(bsz, cap))
                stats.payload(jnp.minimum(bsz, cap), 4, self.peer_host, my_host, me)
                sends.append(send), sizes.append(bsz), parts.append(cap)
                if wsend is not None:  # the weights: a part of their own (as bits), laid out as the ids
                    stats.payload(jnp.minimum(bsz, cap) - jnp.asarray(header), 4, self.peer_host, my_host, me)
                    sends.append(wsend), sizes.append(bsz)
                    parts.append(cap)
        row_part, row_off = len(parts), sum(parts)  # the rows' part of the blocks
        if self.row_pieces:
            rows = routing.take_columns(canon, self.row_cols).reshape(-1)  # [B * M]
            piece = jnp.asarray(np.tile(self.row_piece_of_col, b))
            send, rsz_sent, inv, unique = routing.row_send(
                rows, piece, jnp.asarray(self.row_stride), jnp.asarray(self.row_devices),
                jnp.asarray(self.row_offsets), max(1, self.rows_per_device), g, caps.rows, impl)
            stats.need(f"w{self.width}/rows", jnp.max(rsz_sent))
            stats.over(overflow(rsz_sent, caps.rows))
            stats.payload(jnp.minimum(rsz_sent, caps.rows), 4, self.peer_host, my_host, me)
            stats.dedup(jnp.sum(rows >= 0, dtype=jnp.int32), unique)
            sends.append(send), sizes.append(rsz_sent), parts.append(caps.rows)
        if alone:  # the exchange with oneself is the identity
            recv = jnp.concatenate(sends, axis=1) if sends else None
            rsz = jnp.stack(sizes, axis=1) if sizes else None
        else:
            recv, rsz = exchange(jnp.concatenate(sends, axis=1), jnp.stack(sizes, axis=1), AXIS,
                                 parts=parts, mode=mode, fill=-1)
        outs, back_sizes, back_recv = [], [], []
        k = 0
        if self.bag_pieces:
            if alone:
                ids, bw = local_ids, wb
            else:
                wrecv = None if wb is None else recv[:, parts[0] : parts[0] + parts[1]]
                ids, bw = routing.bag_ids_at_owner(recv[:, : parts[0]], items, imax, self.bag_pool, wrecv)
            if samples:
                from jdmt.embeddings import cpu_kernels

                outs.append(cpu_kernels.pooled_lookup(table, ids[0], threads=impl.cpu_threads,
                                                      visit=len(self.bag_pieces),
                                                      weights=None if bw is None else bw[0])[None])
            elif self.split_blocks(impl):  # one lookup per peer's block, stacked
                outs.append(jnp.stack([pool_received(table, ids[s_], impl, None if bw is None else bw[s_])
                                       for s_ in range(g)]))
            else:
                outs.append(owner_pool(table, ids, jnp.asarray(self.bag_maxlen)[me], impl, bw))  # [G, I, D]
            back_sizes.append(jnp.full((g,), items, jnp.int32))
            back_recv.append(jnp.asarray(header))
            ctx["bag_ids"] = ids
            if bw is not None:
                ctx["bag_w"] = bw
            k = 1
        if self.row_pieces:
            c = row_part  # the rows' column of the sizes (alone: bags went nowhere)
            row_ids = recv[:, row_off:]
            outs.append(owner_rows(table, row_ids, impl))  # [G, cap, D]
            back_sizes.append(rsz[:, c])
            back_recv.append(rsz_sent)
            ctx.update(row_ids=row_ids, row_recv=rsz[:, c], row_sizes=rsz_sent, row_inv=inv.reshape(b, -1))
        back_parts = [o.shape[1] for o in outs]
        if alone:
            back = jnp.concatenate(outs, axis=1)
        else:
            # fill=None: the bags are read up to each peer's count and the rows at
            # `inv` (valid positions only), never past what was sent: no masking pass
            back, _ = exchange(jnp.concatenate(outs, axis=1), jnp.stack(back_sizes, axis=1), AXIS,
                               parts=back_parts, recv_sizes=jnp.stack(back_recv, axis=1), mode=mode,
                               fill=None)
            for bs in back_sizes:
                stats.payload(bs, 4 * self.width, self.peer_host, my_host, me)
        if self.bag_pieces:
            nk, i_all = len(self.bag_pieces), len(kk)
            if samples:  # [B, K, D] viewed as [K, B, D]; `_assemble` transposes it back (no copy)
                bag_out = jnp.swapaxes(outs[0][0].reshape(b, nk, self.width), 0, 1)
            elif in_order:
                bag_out = back[0, :i_all].reshape(nk, b, self.width)
            else:  # pieces are sorted by peer: peer g's first count[g] * B rows, in order
                bag_out = jnp.concatenate([back[g_, : c * b] for g_, c in enumerate(self.bag_count) if c],
                                          axis=0).reshape(nk, b, self.width)
        if self.row_pieces:
            rows_back = back[:, back_parts[0] if k else 0 :].reshape(-1, self.width)
            inv = ctx["row_inv"]
            wts = piece_weights(wcanon, self.row_cols, self.row_pos, self.row_weighted)
            row_out = {}
            for j, pos in enumerate(self.row_pos):
                at = inv[:, pos]
                row_out[j] = (pool_received(rows_back, at, impl, wts.get(j)) if self.row_pooled[j]
                              else take_rows(rows_back, at, impl))
        ctx["read"] = _read_token(outs)
        return bag_out, row_out, ctx, stats

    def backward(self, ctx, g_bag, g_rows, caps: Caps, mode: str, impl: Impl, wcanon=None):
        """The gradients of `forward`'s outputs, back at the owners.

        Args:
          g_bag: f32[K_bag, B, D]; g_rows: {row piece k: f32[B, D] or f32[B, S, D]}.
          impl: the forward's kernels (they decide the bags' order).
          wcanon: the forward's weights (a weighted row's gradient is its
            weight times its bag's).

        Returns:
          (rows i32[n] storage rows, src i32[n], grads f32[M, D], scale f32[n]
          or None (weighted bags: each id's weight), stats): what
          `sparse_step` takes for this device's storage.
        """
        g = self.peers
        me = lax.axis_index(AXIS)
        my_host = lax.axis_index(HOST)
        stats = Stats()
        sends, sizes, recv_sizes, rows, srcs = [], [], [], [], []
        if self.bag_pieces:
            b = g_bag.shape[1]
            header = self.header(b)
            items = jnp.asarray(header)[me]
            imax = int(header.max())
            kk = np.repeat(np.arange(len(self.bag_pieces)), b)
            rank = self.bag_kd[kk] * b + np.tile(np.arange(b), len(self.bag_pieces))
            # Each block slot's item is known statically: a gather of the
            # gradients (zeros for a slot no item fills), not a scatter into
            # zeros (on CPU a memset and a scatter of the whole block).
            item_at = np.full(g * imax, len(kk), np.int32)  # len(kk): out of range -> 0
            item_at[self.bag_dst[kk] * imax + rank] = np.arange(len(kk))
            nk = len(self.bag_pieces)
            in_block_order = np.array_equal(item_at, np.arange(g * imax))
            sample_order = g == 1 and in_block_order
            if sample_order:  # one device: the gradients in the pooled order [B, K, D], read
                # through `src` (g_bag is a transposed view of them: no copy)
                send = jnp.swapaxes(g_bag, 0, 1).reshape(-1, self.width)
            elif in_block_order:
                send = g_bag.reshape(-1, self.width)
            else:  # (pieces are sorted by peer, so this means slots left empty)
                send = jnp.take(g_bag.reshape(-1, self.width), jnp.asarray(item_at), axis=0, mode="fill",
                                fill_value=0)
            sends.append(send.reshape(g, imax, self.width))
            sizes.append(jnp.asarray(header))
            recv_sizes.append(jnp.full((g,), items, jnp.int32))
            ids = ctx["bag_ids"]  # [G, I, P]
            rows.append(ids.reshape(-1))
            srcs.append(None)  # set below, once the block layout is known
        if self.row_pieces:
            cap = ctx["row_ids"].shape[1]
            send = unique_row_grads(ctx["row_inv"], g_rows, self.row_pos, self.row_pooled, g * cap, self.width,
                                    piece_weights(wcanon, self.row_cols, self.row_pos, self.row_weighted))
            sends.append(send.reshape(g, cap, self.width))
            sizes.append(jnp.minimum(ctx["row_sizes"], cap))
            recv_sizes.append(ctx["row_recv"])
            rows.append(ctx["row_ids"].reshape(-1))
            srcs.append(None)  # set below, once the block layout is known
        block = [s_.shape[1] for s_ in sends]
        if g == 1:  # the exchange with oneself is the identity
            got = jnp.concatenate(sends, axis=1)
        else:
            # fill=None: the update reads a received gradient only through an id
            # that came with it (ids past what was sent are -1)
            got, _ = exchange(jnp.concatenate(sends, axis=1), jnp.stack(sizes, axis=1), AXIS, parts=block,
                              recv_sizes=jnp.stack(recv_sizes, axis=1), mode=mode, fill=None)
            for sz in sizes:
                stats.payload(sz, 4 * self.width, self.peer_host, my_host, me)
        # gradient row of received slot (peer s, position j of its block): s * total + j
        total = sum(block)
        if self.bag_pieces:
            imax = block[0]
            item = (np.arange(g)[:, None, None] * total + np.arange(imax)[None, :, None]).astype(np.int32)
            if sample_order and impl.cpu:  # ids in (b, k) order
                item = np.arange(imax, dtype=np.int32)[None, :, None]
            elif sample_order:  # item k * B + j's gradient is row j * K + k
                j = np.arange(imax)
                item = ((j % b) * nk + j // b).astype(np.int32)[None, :, None]
            srcs[0] = jnp.broadcast_to(jnp.asarray(item), ctx["bag_ids"].shape).reshape(-1)
        if self.row_pieces:
            off = block[0] if self.bag_pieces else 0
            cap = block[-1]
            srcs[-1] = jnp.asarray((np.arange(g)[:, None] * total + off + np.arange(cap)[None, :])
                                   .reshape(-1).astype(np.int32))
        token = ctx["read"]
        scale = None
        if "bag_w" in ctx:  # each bag id's weight; the row requests' gradients are already weighted
            scale = ctx["bag_w"].reshape(-1)
            if self.row_pieces:
                scale = jnp.concatenate([scale, jnp.ones(rows[-1].shape, jnp.float32)])
        rows = jnp.concatenate(rows) + token  # the write waits for this step's reads
        return rows, jnp.concatenate(srcs), got.reshape(-1, self.width), scale, stats


def position_grads(g, n: int, weights=None):
    """f32[..., n, D]: the gradient of each of a bag's n positions from the
    bag's f32[..., D]: the bag's own (a broadcast), or times each position's
    weight where `weights` f32[..., n] are given (weighted bags)."""
    if weights is None:
        return jnp.broadcast_to(g[..., None, :], g.shape[:-1] + (n, g.shape[-1]))
    return g[..., None, :] * weights[..., None]


def piece_weights(wcanon, cols, pos, weighted) -> dict:
    """{piece k: f32[B, P] its ids' per-sample weights} for the weighted
    pieces of a route whose ids are the batch columns `cols` (`pos`: each
    piece's positions among them); {} without weights."""
    if wcanon is None or not any(weighted):
        return {}
    return {k: routing.take_columns(wcanon, cols[p]) for k, p in enumerate(pos) if weighted[k]}


def unique_row_grads(inv, g_rows, pos, pooled, slots: int, width: int, weights=None) -> jax.Array:
    """f32[slots, D]: each asked-for unique row's summed gradient, at its
    slot of the rows that came back (`inv` i32[B, M], -1: none); `g_rows`
    {piece k: f32[B, D] pooled (every position of the bag gets it, times
    its weight where `weights` {piece k: f32[B, P]} has the piece) or
    f32[B, S, D]} and `pos` each piece's columns of `inv`."""
    weights = weights or {}
    parts = [position_grads(g_rows[k], len(p), weights.get(k)) if pooled[k] else g_rows[k]
             for k, p in enumerate(pos)]
    gpos = jnp.concatenate(parts, axis=1).reshape(-1, width)  # [B * M, D]
    at = jnp.where(inv >= 0, inv, slots).reshape(-1)
    return jnp.zeros((slots, width), gpos.dtype).at[at].add(gpos, mode="drop")


def _read_token(reads) -> jax.Array:
    """An i32 zero that XLA cannot tell is zero, computed from every value this
    step read from a table: adding it to the update's rows orders the in-place
    write after the reads (else XLA keeps the old table alive with a copy;
    docs/design.md). NaN or inf in the reads do not leak into it."""
    tok = jnp.zeros((), jnp.int32)
    for r in reads:
        bits = lax.bitcast_convert_type(jnp.sum(r[..., :1]).astype(jnp.float32), jnp.int32)
        tok = tok | lax.shift_right_logical(bits & 1, 1)
    return tok


class Stats:
    """What a step's exchanges report (per device; the caller reduces them)."""

    def __init__(self):
        self.cross = jnp.zeros((), jnp.float32)
        self.intra = jnp.zeros((), jnp.float32)
        self.overflow = jnp.zeros((), jnp.int32)
        self.needs: dict[str, jax.Array] = {}
        self.requested = jnp.zeros((), jnp.int32)
        self.unique = jnp.zeros((), jnp.int32)
        self.host_unique = jnp.zeros((), jnp.int32)  # rows a host asks across (`two_hop`)

    def payload(self, sizes, row_bytes, peer_host, my_host, me):
        c, i = payload_bytes(sizes, row_bytes, peer_host, my_host, me)
        self.cross = self.cross + c
        self.intra = self.intra + i

    def over(self, x):
        self.overflow = jnp.maximum(self.overflow, x)

    def need(self, key, x):
        self.needs[key] = jnp.maximum(self.needs.get(key, jnp.zeros((), jnp.int32)), x.astype(jnp.int32))

    def dedup(self, requested, unique):
        self.requested = self.requested + requested
        self.unique = self.unique + unique
