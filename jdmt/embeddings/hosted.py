"""The host path: tables owned by one host, reached in two hops.

A *hosted* table lives inside one host h: whole on one of its devices
(table-wise in the host) or with its rows spread over the host's L devices
(table-row-wise, row r on local rank r % L). Every device (h', l) reaches
host h through its *entry* (h, l), the device of the same local rank: the
first hop crosses hosts (over `host`), the second stays inside host h (over
`local`). This is DMT's SPTT route, and the flat table-row-wise route.

Two kinds of request take it:

*Host bags* (`HostPath.bag_features`): every bag of a hosted feature goes
to the entry (ids compacted, behind a header of lengths: `routing.bag_send`
over `host`). The entry then holds host h's bags for the H*B samples of the
devices (h', l) and looks them up inside the host: a bag of a table-wise
table goes on to its owner, which pools it (`routing.bag_send` over
`local`); a bag of a row-spread table is split into unique row requests to
the row shards (`routing.row_send` over `local`, de-duplicated over all H*B
samples) and pooled at the entry. The entry ends with one pooled row per
bag: the Tower Modules' inputs (SPTT), or, returned over `host`, the
requester's pooled embeddings (table-row-wise, identity towers).

*Host rows* (identity only: sequence features, one-id bags): the requester
de-duplicates its ids per owner before they cross hosts (`routing.row_send`
over `host`, keyed by (owner's local rank, storage row)); the entry forwards
each host's requests to the owners without merging them, so an owner gets
exactly the requests the flat path would send it, in the same order (the
flat path numbers its peers local-rank-major for this): identity towers
update the tables bit for bit as the flat path does.

The backward runs the same hops in reverse, ending at the owners with the
rows and gradients that `optimizers.sparse_step` takes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdmt.embeddings import routing
from jdmt.embeddings.exchange import exchange, overflow
from jdmt.embeddings.flat import (Stats, owner_pool, owner_rows, piece_weights, pool_received, position_grads,
                                 take_rows)
from jdmt.embeddings.layout import Layout
from jdmt.embeddings.types import ShardingType
from jdmt.mesh import HOST, LOCAL

__all__ = ["HostCaps", "HostPath"]

HOSTED_TYPES = (ShardingType.TABLE_WISE, ShardingType.TABLE_ROW_WISE)


@dataclasses.dataclass(frozen=True)
class HostCaps:
    """Block capacities of the host path for one local batch size.

    Attributes:
      bag_ids: ids per host block of the host-bag hop (beyond its header).
      local_bag_ids: {width: ids per in-host block of bags to owners}.
      local_rows: {width: unique rows per in-host block asked of row shards}.
      host_rows: {width: unique rows per host block of host-row requests}.
      fwd_rows: {width: host-row requests per in-host block the entry forwards}.
    """

    bag_ids: int
    local_bag_ids: dict
    local_rows: dict
    host_rows: dict
    fwd_rows: dict


class HostPath:
    """Static routing of the hosted features.

    Args:
      layout: the layout (hosted features have one piece each, table-wise on
        a device of one host or table-row-wise over one host).
      hosted: feature indices that take the host path.
      bag_features: hosted features that travel as host bags (the others,
        identity only, as host rows).
      towers: the entry keeps the pooled bags (Tower Modules' inputs) instead
        of returning them; every hosted feature must then be a bag.
    """

    def __init__(self, layout: Layout, hosted: frozenset[int], bag_features: frozenset[int],
                 towers: bool = False):
        h, ln = layout.hosts, layout.local
        self.hosts, self.local = h, ln
        feats = layout.features.sparse
        self.features = layout.features
        self.towers = towers
        slots = layout.features.total_slots
        offsets = layout.features.offsets
        self.piece = {}
        self.host_of = {}
        for f in sorted(hosted):
            ps = layout.pieces_of(f)
            if len(ps) != 1 or ps[0].type not in HOSTED_TYPES:
                raise ValueError(f"feature {feats[f].name!r}: the host path needs one table-wise or "
                                 f"table-row-wise piece, got {[p.type.value for p in ps]}")
            p = ps[0]
            hosts = {d // ln for d in p.devices}
            if len(hosts) != 1:
                raise ValueError(f"feature {feats[f].name!r} is not inside one host")
            self.piece[f] = layout.pieces.index(p)
            self.host_of[f] = hosts.pop()
        self.hosted = frozenset(self.piece)
        bags = frozenset(bag_features) & self.hosted
        if towers and bags != self.hosted:
            raise ValueError("with Tower Modules every hosted feature travels as a bag")
        self.bag_set = bags
        self.rows_per_device = dict(layout.rows)

        # ---- the host-bag hop: per host, its bag features (slot j) -----------------------
        self.bags = [sorted(f for f in bags if self.host_of[f] == hh) for hh in range(h)]
        self.jmax = max(1, max(len(v) for v in self.bags))
        self.bag_pool = max([feats[f].max_len for f in bags], default=1)
        cols = np.full((h, self.jmax, self.bag_pool), slots, np.int64)  # `slots`: the all -1 column
        for hh, fs in enumerate(self.bags):
            for j, f in enumerate(fs):
                cols[hh, j, : feats[f].max_len] = offsets[f] + np.arange(feats[f].max_len)
        self.bag_cols = cols
        self.bag_count = np.array([len(v) for v in self.bags], np.int64)
        self.bag_slots = np.array([sum(feats[f].max_len for f in v) for v in self.bags], np.int64)
        self.slot_of = {f: (self.host_of[f], j) for hh, fs in enumerate(self.bags) for j, f in enumerate(fs)}
        # weighted bags: their weights travel with their ids, to the entry and on to
        # the owner (unweighted bags then carry weights of 1)
        self.bag_weighted = np.array([[j < len(fs) and feats[fs[j]].weighted for j in range(self.jmax)]
                                      for fs in self.bags], bool).reshape(h, self.jmax)
        self.weighted = bool(self.bag_weighted.any())

        # ---- inside the host, per width ------------------------------------------------------
        self.widths = sorted({layout.pieces[self.piece[f]].width for f in self.hosted})
        self.local_bags = {}
        self.local_row = {}
        self.ret = {}
        self.host_row = {}
        for w in self.widths:
            self._inside(layout, w)
        self._maps = {}  # `_bag_items`' and `_entry_map`'s static tables, by (kind, width, batch)
        self.peer_host_host = np.arange(h, dtype=np.int32)  # peers over `host`
        self.peer_host_local = None  # peers over `local`: all on this host

    # ---- static tables ---------------------------------------------------------------------------

    def _inside(self, layout: Layout, w: int) -> None:
        h, ln = self.hosts, self.local
        feats = self.features.sparse
        # bags of table-wise pieces, per host sorted by (owner, feature): owner pools
        tw = [[] for _ in range(h)]
        trw = [[] for _ in range(h)]
        for hh, fs in enumerate(self.bags):
            for j, f in enumerate(fs):
                p = layout.pieces[self.piece[f]]
                if p.width != w:
                    continue
                if p.stride == 1:
                    tw[hh].append((p.devices[0] % ln, f, j, p.offsets[0]))
                else:
                    trw[hh].append((j, p.offsets))
        for v in tw:
            v.sort()
        cnt = np.zeros((h, ln), np.int64)
        maxlen = np.zeros((h, ln), np.int64)
        slots = np.zeros((h, ln), np.int64)
        kd = [[] for _ in range(h)]
        for hh, v in enumerate(tw):
            for (l, f, j, off) in v:
                kd[hh].append(cnt[hh, l])
                cnt[hh, l] += 1
                maxlen[hh, l] = max(maxlen[hh, l], feats[f].max_len)
                slots[hh, l] += feats[f].max_len
        self.local_bags[w] = dict(tw=tw, kd=kd, cnt=cnt, maxlen=maxlen, slots=slots)
        self.local_row[w] = dict(trw=trw, jmax=max(1, max(len(v) for v in trw)))
        # what the entry returns to the requesters (identity): per host, the bag
        # slots of this width, in slot order
        ret = [[j for j, f in enumerate(fs) if layout.pieces[self.piece[f]].width == w] for fs in self.bags]
        self.ret[w] = dict(slots=ret, jmax=max(1, max(len(v) for v in ret)))
        # host rows (identity): pieces of this width not travelling as bags
        rows = [f for f in sorted(self.hosted - self.bag_set) if layout.pieces[self.piece[f]].width == w]
        c = max(1, layout.rows.get(w, 1))
        smax = max([layout.pieces[self.piece[f]].stride for f in rows], default=1)
        dev = np.zeros((max(1, len(rows)), smax), np.int32)
        key = np.zeros((max(1, len(rows)), smax), np.int32)
        stride = np.ones(max(1, len(rows)), np.int32)
        col_list, piece_of_col, pos = [], [], []
        offsets = self.features.offsets
        for k, f in enumerate(rows):
            p = layout.pieces[self.piece[f]]
            stride[k] = p.stride
            for s, (d, off) in enumerate(zip(p.devices, p.offsets)):
                dev[k, s] = d // ln
                key[k, s] = (d % ln) * c + off
            m = feats[f].max_len
            pos.append(np.arange(len(col_list), len(col_list) + m))
            col_list += list(offsets[f] + np.arange(m))
            piece_of_col += [k] * m
        self.host_row[w] = dict(features=rows, dev=dev, key=key, stride=stride, c=c,
                                cols=np.array(col_list, np.int64), piece_of_col=np.array(piece_of_col, np.int32),
                                pos=pos, pooled=[feats[f].pooled for f in rows],
                                weighted=[feats[f].weighted for f in rows])

    # ---- capacities -----------------------------------------------------------------------------

    def bound(self, b: int) -> HostCaps:
        """Capacities that can never overflow (every bag full, every id unique)."""
        h = self.hosts
        lb, lr, hr, fr = {}, {}, {}, {}
        for w in self.widths:
            lb[w] = max(1, int(self.local_bags[w]["slots"].max(initial=0)) * h * b)
            trw = self.local_row[w]["trw"]
            lr[w] = max(1, max((sum(self.features.sparse[self.bags[hh][j]].max_len for j, _ in v)
                                for hh, v in enumerate(trw)), default=0) * h * b)
            hr[w] = max(1, len(self.host_row[w]["cols"]) * b)
            fr[w] = max(1, hr[w] * h)
        return HostCaps(max(1, int(self.bag_slots.max(initial=0)) * b), lb, lr, hr, fr)

    def default_caps(self, b: int) -> HostCaps:
        """Exact bounds for bags (they never overflow); for unique rows 1.5 times
        an even spread plus slack (de-duplication only lowers the counts)."""
        bd = self.bound(b)
        h, ln = self.hosts, self.local

        def est(x, bound):
            return int(min(bound, -(-(int(np.ceil(1.5 * x)) + 32) // 8) * 8))

        lr = {w: est(bd.local_rows[w] / ln, bd.local_rows[w]) for w in self.widths}
        hr, fr = {}, {}
        for w in self.widths:
            hrw = self.host_row[w]
            per_host = np.zeros(h)
            per_dev = np.zeros((h, ln))
            for k, f in enumerate(hrw["features"]):
                m = self.features.sparse[f].max_len * b
                s = hrw["stride"][k]
                for j in range(s):
                    per_host[hrw["dev"][k, j]] += m / s
                    per_dev[hrw["dev"][k, j], hrw["key"][k, j] // hrw["c"]] += m / s
            hr[w] = est(per_host.max(initial=0), bd.host_rows[w])
            fr[w] = est(per_dev.max(initial=0) * h, bd.fwd_rows[w])
        return HostCaps(bd.bag_ids, bd.local_bag_ids, lr, hr, fr)

    def measure(self, canon: np.ndarray) -> dict[str, int]:
        """What the host path's exchanges need for one global batch (host
        numpy; the keys and meaning of a step's `stats["need"]`).

        Args:
          canon: i32[N, B, slots + 1] each device's table rows (-1: none).
        """
        h, ln = self.hosts, self.local
        feats = self.features.sparse
        offsets = self.features.offsets
        n, b = canon.shape[:2]
        out = {}

        def rows_of(d, f):  # [B, P] table rows of feature f on device d
            return canon[d][:, offsets[f] : offsets[f] + feats[f].max_len]

        if self.bag_set:
            header = (self.bag_count * b).astype(np.int64)
            most = 0
            for d in range(n):
                ids = np.array([sum(int((rows_of(d, f) >= 0).sum()) for f in self.bags[x]) for x in range(h)])
                most = max(most, int((ids + header).max() - header.max()))
            out["host/bag_ids"] = most
        for w in self.widths:
            lb, lr = self.local_bags[w], self.local_row[w]
            if any(lb["tw"]):
                imax = int((lb["cnt"] * h * b).max())
                most = 0
                for x in range(h):
                    for l in range(ln):
                        per = np.zeros(ln, np.int64)
                        for (o, f, _j, _off) in lb["tw"][x]:
                            per[o] += sum(int((rows_of(s * ln + l, f) >= 0).sum()) for s in range(h))
                        most = max(most, int((per + lb["cnt"][x] * h * b).max() - imax))
                out[f"host/local_bag_ids_{w}"] = most
            if any(lr["trw"]):
                most = 0
                for x in range(h):
                    for l in range(ln):
                        keys = []
                        for t, (j, offs) in enumerate(lr["trw"][x]):
                            f = self.bags[x][j]
                            r = np.concatenate([rows_of(s * ln + l, f).reshape(-1) for s in range(h)])
                            r = r[r >= 0].astype(np.int64)
                            keys.append((r % ln) * (1 << 40) + np.asarray(offs)[r % ln] + r // ln)
                        k = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
                        if k.size:
                            most = max(most, int(np.bincount(k >> 40).max()))
                out[f"host/local_rows_{w}"] = most
            hr = self.host_row[w]
            if hr["features"]:
                c = hr["c"]
                host_most = 0
                keys_of = {}
                for d in range(n):
                    rows = canon[d][:, hr["cols"]].reshape(-1)
                    piece = np.tile(hr["piece_of_col"], b)
                    ok = rows >= 0
                    r, k = rows[ok].astype(np.int64), piece[ok]
                    stride = hr["stride"][k]
                    s = r % stride
                    dst = hr["dev"][k, s].astype(np.int64)
                    key = np.unique(dst * (ln * c) + hr["key"][k, s] + r // stride)
                    keys_of[d] = key
                    if key.size:
                        host_most = max(host_most, int(np.bincount(key // (ln * c)).max()))
                out[f"host/host_rows_{w}"] = host_most
                fwd = 0
                for x in range(h):
                    for l in range(ln):
                        per = np.zeros(ln, np.int64)
                        for sh in range(h):
                            key = keys_of[sh * ln + l]
                            mine = key[key // (ln * c) == x] % (ln * c)
                            per += np.bincount(mine // c, minlength=ln)[:ln]
                        fwd = max(fwd, int(per.max()))
                out[f"host/fwd_rows_{w}"] = fwd
        return out

    # ---- static per-host tables of the in-host requests -------------------------------------------

    def _bag_items(self, w: int, b: int):
        """The entry's bags of table-wise pieces of width w, per host, as items
        sorted by (owner l, source host s, the owner's piece kd, sample b):
        i32[H, 6, n] (per host: slot j, s, b, owner, rank in the owner's
        header, storage base), bool[H, n] (real item), i32[H, L] headers.
        Built once per (width, batch)."""
        key = ("items", w, b)
        if key in self._maps:
            return self._maps[key]
        h, ln = self.hosts, self.local
        lb = self.local_bags[w]
        nmax = max(1, max(len(v) for v in lb["tw"])) * h * b
        q = np.zeros((6, h, nmax), np.int32)
        q[3] = ln - 1
        q[4] = 1 << 30
        ok = np.zeros((h, nmax), bool)
        for hh, v in enumerate(lb["tw"]):
            i = 0
            order = sorted(range(len(v)), key=lambda t: (v[t][0], lb["kd"][hh][t]))
            for l in range(ln):
                mine = [t for t in order if v[t][0] == l]
                for s_ in range(h):
                    for t in mine:
                        _, _, j, off = v[t]
                        kd = lb["kd"][hh][t]
                        sl = slice(i, i + b)
                        q[0, hh, sl], q[1, hh, sl], q[2, hh, sl] = j, s_, np.arange(b)
                        q[3, hh, sl] = l
                        q[4, hh, sl] = (s_ * lb["cnt"][hh, l] + kd) * b + np.arange(b)
                        q[5, hh, sl] = off
                        ok[hh, sl] = True
                        i += b
        self._maps[key] = q.transpose(1, 0, 2), ok, (lb["cnt"] * h * b).astype(np.int32)
        return self._maps[key]

    def _entry_map(self, kind: str, w: int, b: int) -> np.ndarray:
        """Where each of the entry's pooled bags f32[H(source), B, J, D] of
        width w comes from, per host: i32[H, H * B * J], the row of the flat
        block the owners returned (`bags`: [L, imax], `rows`: the pooled row
        requests [H, T, B]), -1 where another kind (or none) fills the slot.
        `_entry_map("grads", ...)` is the inverse of the bags' map: i32[H,
        L * imax], each returned row's place among the entry's bags (-1:
        padding), the path of the gradients back to the owners."""
        key = (kind, w, b)
        if key in self._maps:
            return self._maps[key]
        h, ln, jm = self.hosts, self.local, self.jmax
        if kind == "rows":
            t_j, t_ok, _ = self._row_pieces(w)
            tmax = t_j.shape[1]
            out = np.full((h, h * b * jm), -1, np.int32)
            s_, t_, b_ = np.meshgrid(np.arange(h), np.arange(tmax), np.arange(b), indexing="ij")
            for hh in range(h):
                ok = t_ok[hh][t_]
                at = (s_ * b + b_) * jm + t_j[hh][t_]
                out[hh, at[ok]] = ((s_ * tmax + t_) * b + b_)[ok]
            self._maps[key] = out
        else:
            q, ok, header_all = self._bag_items(w, b)
            imax = int(header_all.max())
            src = q[:, 3] * imax + q[:, 4]  # [H, n] row of the owners' returned block
            at = (q[:, 1] * b + q[:, 2]) * jm + q[:, 0]  # [H, n] place among the entry's bags
            bags = np.full((h, h * b * jm), -1, np.int32)
            for hh in range(h):
                bags[hh, at[hh][ok[hh]]] = src[hh][ok[hh]]
            grads = routing.inverse_index(bags, ln * imax)
            self._maps[("bags", w, b)] = bags
            self._maps[("grads", w, b)] = np.where(grads < bags.shape[1], grads, -1).astype(np.int32)
        return self._maps[key]

    def _row_pieces(self, w: int):
        """Per host its row-spread pieces of width w: i32[H, T] slot j, bool[H, T]
        real, i32[H, T, L] storage offset of each row shard."""
        h, ln = self.hosts, self.local
        lr = self.local_row[w]
        tmax = lr["jmax"]
        t_j = np.zeros((h, tmax), np.int32)
        t_off = np.zeros((h, tmax, ln), np.int32)
        t_ok = np.zeros((h, tmax), bool)
        for hh, v in enumerate(lr["trw"]):
            for t, (j, offs) in enumerate(v):
                t_j[hh, t], t_off[hh, t], t_ok[hh, t] = j, offs, True
        return t_j, t_ok, t_off

    # ---- forward (inside shard_map) ---------------------------------------------------------------

    def forward(self, tables: dict, canon, caps: HostCaps, mode: str, impl, wcanon=None):
        """The hosted features' lookups, in four exchanges: requests over `host`
        (bags and host rows, every width at once), requests inside the host
        (every width at once), rows back inside the host and, for the
        identity, rows back over `host` (one of each per width).

        Args:
          tables: {width: this device's storage of the width}.
          canon: i32[B, slots + 1] table rows of the local batch (-1: none).
          wcanon: f32[B, slots + 1] per-sample weights at canon's columns, or
            None. Weighted bags take their weights along to the entry and the
            owner (a part of each block of their own, the floats' bits).

        Returns:
          (out, ctx, stats): `out` is, with towers, the entry's pooled bags
          f32[H(source host), B, J, D] (mean-combined features and sequence
          features averaged over their ids: the Tower Modules' inputs), else
          {feature: f32[B, D] pooled (sums) or f32[B, S, D]} at the requester.
        """
        b = canon.shape[0]
        h, ln = self.hosts, self.local
        me_h = lax.axis_index(HOST)
        me_l = lax.axis_index(LOCAL)
        pick = lambda a: jnp.asarray(a)[me_h]  # noqa: E731
        stats = Stats()
        ctx = {}
        local_peers = np.zeros(ln, np.int32)  # every local peer is on this host
        zero = jnp.int32(0)
        hr_widths = [w for w in self.widths if self.host_row[w]["features"]]

        # ---- A: requests over `host`: [bags | their weights | host rows of each width] ----------------
        sends, sizes, parts = [], [], []
        if self.weighted and wcanon is None:
            raise ValueError("the host path carries weighted bags: it needs the batch's weights (wcanon)")
        if self.bag_set:
            header = (self.bag_count * b).astype(np.int32)
            hmax = int(header.max())
            rows = routing.take_columns(canon, self.bag_cols.reshape(h, -1))  # [B, H, J * P]
            rows = rows.reshape(b, h, self.jmax, self.bag_pool)
            rows = jnp.transpose(rows, (1, 2, 0, 3)).reshape(-1, self.bag_pool)  # items (h, j, b)
            wts = None
            if self.weighted:  # laid out as `rows`; 1 for unweighted bags
                wts = routing.take_columns(wcanon, self.bag_cols.reshape(h, -1))
                wts = jnp.where(jnp.asarray(self.bag_weighted)[None, :, :, None],
                                wts.reshape(b, h, self.jmax, self.bag_pool), 1.0)
                wts = jnp.transpose(wts, (1, 2, 0, 3)).reshape(-1, self.bag_pool)
            hh = np.repeat(np.arange(h), self.jmax * b)
            rank = np.tile(np.arange(self.jmax * b), h)
            keep = rank < header[hh]
            rows = jnp.where(jnp.asarray(keep)[:, None], rows, -1)
            cap = hmax + caps.bag_ids
            send, sz, _, wsend = routing.bag_send(rows, jnp.asarray(hh.astype(np.int32)),
                                                  jnp.asarray(np.where(keep, rank, 1 << 30).astype(np.int32)),
                                                  jnp.zeros((hh.size,), jnp.int32), jnp.asarray(header), cap,
                                                  wts)
            stats.need("host/bag_ids", jnp.max(sz) - hmax)
            stats.over(overflow(sz, cap))
            stats.payload(jnp.minimum(sz, cap), 4, self.peer_host_host, me_h, me_h)
            sends.append(send), sizes.append(sz), parts.append(cap)
            if self.weighted:  # the weights, laid out as the ids (the header slots are not payload)
                stats.payload(jnp.minimum(sz, cap) - jnp.asarray(header), 4, self.peer_host_host, me_h, me_h)
                sends.append(wsend), sizes.append(sz)
                parts.append(cap)
        hrq = {}
        for w in hr_widths:
            hr = self.host_row[w]
            c = hr["c"]
            rows = routing.take_columns(canon, hr["cols"]).reshape(-1)
            piece = jnp.asarray(np.tile(hr["piece_of_col"], b))
            send, sz, inv, unique = routing.row_send(
                rows, piece, jnp.asarray(hr["stride"]), jnp.asarray(hr["dev"]), jnp.asarray(hr["key"]),
                ln * c, h, caps.host_rows[w], impl)
            stats.need(f"host/host_rows_{w}", jnp.max(sz))
            stats.over(overflow(sz, caps.host_rows[w]))
            stats.payload(jnp.minimum(sz, caps.host_rows[w]), 4, self.peer_host_host, me_h, me_h)
            stats.dedup(jnp.sum(rows >= 0, dtype=jnp.int32), unique)
            hrq[w] = dict(index=len(parts), sizes=sz, inv=inv.reshape(b, -1))
            sends.append(send), sizes.append(sz), parts.append(caps.host_rows[w])
        recv_a = rsz_a = None
        if parts:
            recv_a, rsz_a = exchange(jnp.concatenate(sends, axis=1), jnp.stack(sizes, axis=1), (HOST,),
                                     parts=parts, mode=mode, fill=-1)
        starts_a = np.concatenate([[0], np.cumsum(parts)]).astype(int)

        # ---- B: requests inside the host, at the entry: per width [bags | row shards | forwarded] -----
        sends, sizes, parts, meta = [], [], [], []
        raw = raw_w = counts = None
        if self.bag_set:
            items = jnp.asarray(header)[me_h]
            wrecv = recv_a[:, starts_a[1] : starts_a[2]] if self.weighted else None
            raw, raw_w = routing.bag_ids_at_owner(recv_a[:, : starts_a[1]], items, hmax, self.bag_pool, wrecv)
            raw = raw.reshape(h, self.jmax, b, self.bag_pool)  # [H(source), J, B, P] table rows
            if raw_w is not None:
                raw_w = raw_w.reshape(raw.shape)
            counts = jnp.sum(raw >= 0, axis=-1, dtype=jnp.int32).transpose(0, 2, 1)  # [H, B, J]
        for w in self.widths:
            if self.bag_set and any(self.local_bags[w]["tw"]):
                q, ok, header_all = self._bag_items(w, b)
                q, ok = pick(q), pick(ok)
                rows = jnp.where(ok[:, None], raw[q[1], q[0], q[2]], -1)  # [n, P]
                imax = int(header_all.max())
                cap = imax + caps.local_bag_ids[w]
                wts = None if raw_w is None else raw_w[q[1], q[0], q[2]]
                send, sz, _, wsend = routing.bag_send(rows, q[3], q[4], q[5], pick(header_all), cap, wts)
                stats.need(f"host/local_bag_ids_{w}", jnp.max(sz) - imax)
                stats.over(overflow(sz, cap))
                stats.payload(jnp.minimum(sz, cap), 4, local_peers, zero, me_l)
                meta.append(("bags", w, dict(header=pick(header_all), imax=imax)))
                sends.append(send), sizes.append(sz), parts.append(cap)
                if self.weighted:  # the bags' weights: a slice of their own (`_kinds`), laid out as the ids
                    stats.payload(jnp.minimum(sz, cap) - pick(header_all), 4, local_peers, zero, me_l)
                    meta.append(("bagw", w, {}))
                    sends.append(wsend), sizes.append(sz)
                    parts.append(cap)
            if self.bag_set and any(self.local_row[w]["trw"]):
                t_j, t_ok, t_off = (pick(x) for x in self._row_pieces(w))
                tmax = t_j.shape[0]
                rows = jnp.where(t_ok[None, :, None, None], raw[:, t_j], -1)  # [H, T, B, P]
                piece = jnp.broadcast_to(jnp.arange(tmax, dtype=jnp.int32)[None, :, None, None], rows.shape)
                devs = jnp.broadcast_to(jnp.arange(ln, dtype=jnp.int32)[None, :], (tmax, ln))
                send, sz, inv, unique = routing.row_send(
                    rows.reshape(-1), piece.reshape(-1), jnp.full((tmax,), ln, jnp.int32), devs, t_off,
                    max(1, self.rows_per_device.get(w, 1)), ln, caps.local_rows[w], impl)
                stats.need(f"host/local_rows_{w}", jnp.max(sz))
                stats.over(overflow(sz, caps.local_rows[w]))
                stats.payload(jnp.minimum(sz, caps.local_rows[w]), 4, local_peers, zero, me_l)
                stats.dedup(jnp.sum(rows >= 0, dtype=jnp.int32), unique)
                m = dict(inv=inv.reshape(rows.shape), sizes=sz)
                if raw_w is not None:  # the entry pools these bags: their weights stay here
                    m["wts"] = jnp.where(rows >= 0, raw_w[:, t_j], 0.0)
                meta.append(("rows", w, m))
                sends.append(send), sizes.append(sz), parts.append(caps.local_rows[w])
            if w in hrq:
                c = self.host_row[w]["c"]
                i = hrq[w]["index"]
                keys = recv_a[:, starts_a[i] : starts_a[i + 1]]  # [H(src), cap] (owner, row) keys
                cap_h = keys.shape[1]
                valid = keys >= 0
                owner = jnp.where(valid, keys // c, ln)
                cnt = jax.vmap(lambda o: jax.ops.segment_sum(jnp.ones_like(o), o, num_segments=ln + 1))(owner)
                cnt = cnt[:, :ln]  # [H, L]
                before_src = jnp.cumsum(cnt, axis=0) - cnt  # earlier sources' keys per owner
                first_in_block = jnp.cumsum(cnt, axis=1) - cnt  # where owner o starts in block s
                j = jnp.arange(cap_h, dtype=jnp.int32)[None, :]
                o_safe = jnp.minimum(owner, ln - 1)
                pos = (jnp.take_along_axis(before_src, o_safe, axis=1) + j
                       - jnp.take_along_axis(first_in_block, o_safe, axis=1))
                fcap = caps.fwd_rows[w]
                fits = valid & (pos < fcap)
                send = jnp.full((ln, fcap), -1, jnp.int32)
                send = send.at[jnp.where(fits, owner, ln), pos].set(keys % c, mode="drop")
                sz = jnp.sum(cnt, axis=0).astype(jnp.int32)
                stats.need(f"host/fwd_rows_{w}", jnp.max(sz))
                stats.over(overflow(sz, fcap))
                stats.payload(jnp.minimum(sz, fcap), 4, local_peers, zero, me_l)
                meta.append(("fwd", w, dict(at=jnp.where(fits, o_safe * fcap + pos, -1), sizes=sz,
                                            hrecv=rsz_a[:, i])))
                sends.append(send), sizes.append(sz), parts.append(fcap)
        recv_b = rsz_b = None
        if parts:
            recv_b, rsz_b = exchange(jnp.concatenate(sends, axis=1), jnp.stack(sizes, axis=1), (LOCAL,),
                                     parts=parts, mode=mode, fill=-1)
        starts_b = np.concatenate([[0], np.cumsum(parts)]).astype(int)

        # ---- C: the owners look the rows up; back inside the host, one exchange per width --------------
        reads = []
        back = {}
        for w in self.widths:
            outs, osz, orecv, idx = [], [], [], []
            for k, (kind, ww, m) in enumerate(meta):
                if ww != w:
                    continue
                if kind == "bagw":  # read with its bags
                    continue
                got = recv_b[:, starts_b[k] : starts_b[k + 1]]
                if kind == "bags":
                    items = m["header"][me_l]
                    wrecv = recv_b[:, starts_b[k + 1] : starts_b[k + 2]] if self.weighted else None
                    ids, bw = routing.bag_ids_at_owner(got, items, m["imax"], self.bag_pool, wrecv)
                    m["ids"] = ids
                    if bw is not None:
                        m["w"] = bw
                    outs.append(owner_pool(tables[w], ids, pick(self.local_bags[w]["maxlen"])[me_l], impl, bw))
                    osz.append(jnp.full((ln,), items, jnp.int32))
                    orecv.append(m["header"])
                else:
                    m["ids"], m["recv"] = got, rsz_b[:, k]
                    outs.append(owner_rows(tables[w], got, impl))
                    osz.append(rsz_b[:, k])
                    orecv.append(m["sizes"])
                idx.append(k)
            if not outs:
                continue
            reads += outs
            # the entry reads the rows each owner sent, nothing past them: no mask
            y, st = _send_rows(outs, osz, orecv, (LOCAL,), mode, stats, 4 * w, (local_peers, zero, me_l),
                               fill=None)
            for i, k in enumerate(idx):
                back[k] = y[:, st[i] : st[i + 1]]

        # ---- D: the entry pools; identity: rows back over `host`, one exchange per width -----------
        entry = {}
        out = {}
        for w in self.widths:
            # Every slot of the entry's bags [H, B, J, D] has a static source: a
            # gather of rows (a scatter into zeros is, on CPU, a memset and a
            # scatter of the whole block), sample-major so that a host's tower
            # takes its slots without a transpose
            e = None
            hr_back = None
            for k, (kind, ww, m) in enumerate(meta):
                if ww != w or kind == "bagw":
                    continue
                if kind == "fwd":  # forwarded host rows, back into the blocks they came in
                    hr_back = take_rows(back[k].reshape(-1, w), m["at"], impl)  # [H(src), cap_h, D]
                    continue
                if kind == "bags":
                    src = back[k].reshape(-1, w)  # [L * imax, D] the owners' pooled bags
                else:  # [H * T * B, D] bags pooled at the entry from the row shards' rows
                    src = pool_received(back[k].reshape(-1, w), m["inv"], impl, m.get("wts")).reshape(-1, w)
                at = pick(self._entry_map(kind, w, b))
                got = routing.gather_rows(src, at)  # XLA fuses it with its sources' slices
                e = got if e is None else jnp.where((at >= 0)[:, None], got, e)
            e = jnp.zeros((h * b * self.jmax, w), jnp.float32) if e is None else e
            e = e.reshape(h, b, self.jmax, w)
            entry[w] = e
            if self.towers:
                continue
            sends, osz, orecv, kinds = [], [], [], []
            r = self.ret[w]
            if self.bag_set and any(r["slots"]):
                jm = r["jmax"]
                take = np.full((h, jm), self.jmax, np.int32)
                for x, v in enumerate(r["slots"]):
                    take[x, : len(v)] = v
                sizes_all = np.array([len(v) * b for v in r["slots"]], np.int32)
                # [H(source), J_w * B, D]: feature after feature (the exchange sends each
                # block's first rows, the features the host has)
                mine = jnp.take(e, pick(take), axis=2, mode="fill", fill_value=0)  # [H, B, J_w, D]
                sends.append(jnp.swapaxes(mine, 1, 2).reshape(h, jm * b, w))
                osz.append(jnp.full((h,), pick(sizes_all), jnp.int32))
                orecv.append(jnp.asarray(sizes_all))
                kinds.append("ret")
            if w in hrq:
                i = hrq[w]["index"]
                sends.append(hr_back)
                osz.append(rsz_a[:, i])
                orecv.append(hrq[w]["sizes"])
                kinds.append("hr")
            if not sends:
                continue
            y, st = _send_rows(sends, osz, orecv, (HOST,), mode, stats, 4 * w,
                               (self.peer_host_host, me_h, me_h))
            for i, kind in enumerate(kinds):
                part = y[:, st[i] : st[i + 1]]
                if kind == "ret":
                    for x, v in enumerate(r["slots"]):
                        for n_, j in enumerate(v):
                            out[self.bags[x][j]] = part[x, n_ * b : (n_ + 1) * b]
                else:
                    hr = self.host_row[w]
                    flat = part.reshape(-1, w)
                    inv = hrq[w]["inv"]
                    hw = piece_weights(wcanon, hr["cols"], hr["pos"], hr["weighted"])
                    for kk, f in enumerate(hr["features"]):
                        a = inv[:, hr["pos"][kk]]
                        out[f] = (pool_received(flat, a, impl, hw.get(kk)) if hr["pooled"][kk]
                                  else take_rows(flat, a, impl))
        # what the backward needs
        assert [(kind, w) for kind, w, _ in meta] == self._kinds()
        ctx["meta"] = [{kk: v for kk, v in m.items() if kk in ("ids", "inv", "sizes", "recv", "at", "w", "wts")}
                       for _, _, m in meta]
        ctx["hrq"] = {w: dict(sizes=v["sizes"], inv=v["inv"], recv=rsz_a[:, v["index"]]) for w, v in hrq.items()}
        ctx["read"] = _token(reads)
        if self.towers:
            scale = self._mean_scale(counts)
            ctx["scale"] = scale
            return entry[self.widths[0]] * scale[..., None], ctx, stats
        return out, ctx, stats

    def _mean_scale(self, counts):
        """f32[H, B, J]: 1 / count for averaged slots (mean pooled, or a
        sequence: a Tower Module's input is its mean), 1 for sums."""
        feats = self.features.sparse
        mean = np.zeros((self.hosts, self.jmax), bool)
        for x, fs in enumerate(self.bags):
            for j, f in enumerate(fs):
                mean[x, j] = feats[f].combiner.value == "mean" or not feats[f].pooled
        m = jnp.asarray(mean)[lax.axis_index(HOST)]  # [J]
        return jnp.where(m[None, None, :], 1.0 / jnp.maximum(counts, 1).astype(jnp.float32), 1.0)

    # ---- backward (inside shard_map) ---------------------------------------------------------------

    def backward(self, ctx, grads, b: int, mode: str, impl, wcanon=None):
        """Gradients back to the owners: for the identity one exchange over
        `host` per width, then one inside the host per width.

        Args:
          grads: with towers, the entry's f32[H, B, J, D] (of the averaged
            bags); else {feature: f32[B, D] or f32[B, S, D]} at the requester.
          b: the local batch.
          impl: the forward's kernels (a gather of rows in C++ where they run).
          wcanon: the forward's per-sample weights (or None).

        Returns:
          ({width: (rows i32[n], src i32[n], grads f32[M, D], scale f32[n] or
          None: each id's weight where weighted bags were pooled at their
          owner)}, stats).
        """
        h, ln = self.hosts, self.local
        me_h = lax.axis_index(HOST)
        me_l = lax.axis_index(LOCAL)
        pick = lambda a: jnp.asarray(a)[me_h]  # noqa: E731
        stats = Stats()
        local_peers = np.zeros(ln, np.int32)
        zero = jnp.int32(0)
        token = ctx["read"][0] if ctx["read"].ndim else ctx["read"]
        out = {}
        for w in self.widths:
            # D': the requesters' gradients to the entries (identity)
            eg, hr_g = None, None
            if self.towers:
                eg = grads * ctx["scale"][..., None]  # d(mean) / d(sum)
            else:
                sends, osz, orecv, kinds = [], [], [], []
                r = self.ret[w]
                if self.bag_set and any(r["slots"]):
                    jm = r["jmax"]
                    pad = jnp.zeros((b, w), jnp.float32)
                    send = jnp.stack([jnp.concatenate([grads[self.bags[x][j]] for j in v] + [pad] * (jm - len(v)))
                                      for x, v in enumerate(r["slots"])])  # [H, J_w * B, D]
                    sizes_all = np.array([len(v) * b for v in r["slots"]], np.int32)
                    sends.append(send)
                    osz.append(jnp.asarray(sizes_all))
                    orecv.append(jnp.full((h,), pick(sizes_all), jnp.int32))
                    kinds.append("ret")
                if w in ctx["hrq"]:
                    q = ctx["hrq"][w]
                    hr = self.host_row[w]
                    parts_ = []
                    hw = piece_weights(wcanon, hr["cols"], hr["pos"], hr["weighted"])
                    for kk, f in enumerate(hr["features"]):
                        gk = grads[f]
                        parts_.append(position_grads(gk, len(hr["pos"][kk]), hw.get(kk)) if hr["pooled"][kk]
                                      else gk)
                    gpos = jnp.concatenate(parts_, axis=1).reshape(-1, w)
                    cap_h = self.host_caps_of(w, ctx)
                    at = jnp.where(q["inv"] >= 0, q["inv"], h * cap_h).reshape(-1)
                    sends.append(jnp.zeros((h * cap_h, w), gpos.dtype).at[at].add(gpos, mode="drop")
                                 .reshape(h, cap_h, w))
                    osz.append(jnp.minimum(q["sizes"], cap_h))
                    orecv.append(q["recv"])
                    kinds.append("hr")
                if sends:
                    y, st = _send_rows(sends, osz, orecv, (HOST,), mode, stats, 4 * w,
                                       (self.peer_host_host, me_h, me_h))
                    for i, kind in enumerate(kinds):
                        part = y[:, st[i] : st[i + 1]]
                        if kind == "ret":
                            jm = r["jmax"]
                            take = np.full((h, self.jmax), jm, np.int32)
                            for x, v in enumerate(r["slots"]):
                                for n_, j in enumerate(v):
                                    take[x, j] = n_
                            part = part.reshape(h, jm, b, w)
                            eg = jnp.take(part, pick(take), axis=1, mode="fill", fill_value=0)
                            eg = jnp.swapaxes(eg, 1, 2)  # [H, B, J, D]
                        else:
                            hr_g = part  # [H(src), cap_h, D] at the entry
            # C': the entry's gradients to the owners, one exchange inside the host
            sends, osz, orecv, owners = [], [], [], []
            for (kind, ww), m in zip(self._kinds(), ctx["meta"]):
                if ww != w or kind == "bagw":
                    continue
                if kind == "bags":  # each block row's gradient: a gather (no scatter into zeros)
                    _, _, header_all = self._bag_items(w, b)
                    header = pick(header_all)
                    imax = int(header_all.max())
                    at = pick(self._entry_map("grads", w, b))
                    sends.append(take_rows(eg.reshape(-1, w), at, impl).reshape(ln, imax, w))
                    osz.append(header)
                    orecv.append(jnp.full((ln,), header[me_l], jnp.int32))
                    owners.append(("bags", m["ids"], m.get("w")))
                elif kind == "rows":
                    t_j, _, _ = (pick(x) for x in self._row_pieces(w))
                    inv = m["inv"]  # [H, T, B, P]
                    g = jnp.swapaxes(eg[:, :, t_j], 1, 2)  # [H, T, B, D]
                    gpos = position_grads(g, inv.shape[-1], m.get("wts")).reshape(-1, w)  # weighted: pooled here
                    cap = m["ids"].shape[1]
                    at = jnp.where(inv >= 0, inv, ln * cap).reshape(-1)
                    sends.append(jnp.zeros((ln * cap, w), jnp.float32).at[at].add(gpos, mode="drop")
                                 .reshape(ln, cap, w))
                    osz.append(jnp.minimum(m["sizes"], cap))
                    orecv.append(m["recv"])
                    owners.append(("rows", m["ids"], None))
                else:
                    fcap = m["ids"].shape[1]
                    fsend = jnp.zeros((ln * fcap, w), jnp.float32)
                    fsend = fsend.at[jnp.where(m["at"] >= 0, m["at"], ln * fcap).reshape(-1)].set(
                        hr_g.reshape(-1, w), mode="drop")
                    sends.append(fsend.reshape(ln, fcap, w))
                    osz.append(jnp.minimum(m["sizes"], fcap))
                    orecv.append(m["recv"])
                    owners.append(("rows", m["ids"], None))
            if not sends:
                continue
            got, st = _send_rows(sends, osz, orecv, (LOCAL,), mode, stats, 4 * w, (local_peers, zero, me_l))
            bp = list(np.diff(st))
            total = int(st[-1])
            rows, srcs, scales = [], [], []
            for i, (kind, ids, wt) in enumerate(owners):
                rows.append(ids.reshape(-1))
                scales.append(wt)
                if kind == "bags":
                    item = (np.arange(ln)[:, None, None] * total + st[i] + np.arange(bp[i])[None, :, None])
                    srcs.append(jnp.broadcast_to(jnp.asarray(item.astype(np.int32)), ids.shape).reshape(-1))
                else:
                    srcs.append(jnp.asarray((np.arange(ln)[:, None] * total + st[i]
                                             + np.arange(bp[i])[None, :]).reshape(-1).astype(np.int32)))
            scale = None
            if any(x is not None for x in scales):  # weighted bags: each id's weight, 1 for the rest
                scale = jnp.concatenate([x.reshape(-1) if x is not None else jnp.ones(r.shape, jnp.float32)
                                         for x, r in zip(scales, rows)])
            out[w] = (jnp.concatenate(rows) + token, jnp.concatenate(srcs), got.reshape(-1, w), scale)
        return out, stats

    def host_caps_of(self, w: int, ctx) -> int:
        """The host-row block capacity the forward used (from its context)."""
        for (kind, ww), m in zip(self._kinds(), ctx["meta"]):
            if kind == "fwd" and ww == w:
                return m["at"].shape[1]
        raise KeyError(w)

    def _kinds(self) -> list[tuple[str, int]]:
        """The in-host requests, in the order of the exchange's slices."""
        out = []
        for w in self.widths:
            if self.bag_set and any(self.local_bags[w]["tw"]):
                out.append(("bags", w))
                if self.weighted:
                    out.append(("bagw", w))
            if self.bag_set and any(self.local_row[w]["trw"]):
                out.append(("rows", w))
            if self.host_row[w]["features"]:
                out.append(("fwd", w))
        return out


def _send_rows(sends, sizes, recv_sizes, axis, mode, stats, row_bytes, where, fill=0):
    """One exchange of several row blocks side by side (`parts`), their payload
    counted; returns (received [G, sum(caps), ...], the parts' start offsets)."""
    caps = [x.shape[1] for x in sends]
    got, _ = exchange(jnp.concatenate(sends, axis=1), jnp.stack(sizes, axis=1), axis, parts=caps,
                      recv_sizes=jnp.stack(recv_sizes, axis=1), mode=mode, fill=fill)
    for sz in sizes:
        stats.payload(sz, row_bytes, *where)
    return got, np.concatenate([[0], np.cumsum(caps)]).astype(int)


def _token(reads) -> jax.Array:
    from jdmt.embeddings.flat import _read_token

    return _read_token(reads)[None]
