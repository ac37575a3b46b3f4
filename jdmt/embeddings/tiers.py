"""FlexShard row tiers: one table's rows placed by how often they are looked up.

A `flexshard` placement cuts a table's rows into three tiers, each a real
placement with its own communication:

- *hot* rows are replicated on every device: looked up locally (no id or row
  leaves the device); their gradients are summed over all devices;
- *warm* rows are replicated once per host and sharded over its devices
  (`host_replicated`): ids and rows travel only inside the host; their
  gradients are summed over hosts;
- *cold* rows (the rest, and every row no sample saw) are row-wise over all
  devices, routed like any row-wise table.

The layout (`jdmt.embeddings.layout`) turns a flexshard table into three
*tier tables*, ordinary tables of the hot, warm and cold rows with those
placements; `RowTiers` maps a raw row to its tier and slot, and back. The
maps hold the sorted hot and warm rows only (no array of the table's size):
a hot or warm row's slot is its rank in its sorted set (`searchsorted`), a
cold row's slot is the row minus the hot and warm rows below it, so the
cold tier has exactly the remaining rows.

A tier table is the same model as the whole table: every row starts from the
value it would have in any other plan (`Layout.init_local` hashes the raw
row), the pooled sum of a bag is the sum of its tiers' partial sums, and
every replica applies the same update to the same summed gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["HOT", "WARM", "COLD", "TIERS", "RowTiers", "TierFold", "tier_name"]

HOT, WARM, COLD = "hot", "warm", "cold"
TIERS = (HOT, WARM, COLD)


def tier_name(feature: str, tier: str) -> str:
    """The tier table's name: `feature#tier`."""
    return f"{feature}#{tier}"


@dataclasses.dataclass(frozen=True, eq=False)
class RowTiers:
    """The hot and warm rows of one table of `rows` rows (the rest are cold).

    Raises ValueError for rows out of range, unsorted or repeated rows, or a
    row in both tiers.
    """

    rows: int
    hot: np.ndarray
    warm: np.ndarray

    def __init__(self, rows: int, hot=(), warm=()):
        hot = np.asarray(hot, np.int64).reshape(-1)
        warm = np.asarray(warm, np.int64).reshape(-1)
        for what, a in (("hot", hot), ("warm", warm)):
            if a.size and (a[0] < 0 or a[-1] >= rows):
                raise ValueError(f"{what} rows must lie in [0, {rows})")
            if a.size > 1 and np.any(np.diff(a) <= 0):
                raise ValueError(f"{what} rows must be sorted and distinct")
        both = np.union1d(hot, warm)
        if both.size != hot.size + warm.size:
            raise ValueError("a row is both hot and warm")
        if rows >= 2**31:
            raise ValueError(f"flexshard tables need fewer than 2**31 rows, got {rows}")
        object.__setattr__(self, "rows", int(rows))
        object.__setattr__(self, "hot", hot)
        object.__setattr__(self, "warm", warm)
        object.__setattr__(self, "_both", both)
        # gaps[j] = cold rows below the j-th hot-or-warm row (non-decreasing)
        object.__setattr__(self, "_gaps", both - np.arange(both.size))

    @property
    def sizes(self) -> dict[str, int]:
        """Rows per tier."""
        return {HOT: int(self.hot.size), WARM: int(self.warm.size),
                COLD: self.rows - int(self.hot.size) - int(self.warm.size)}

    # ---- host numpy ------------------------------------------------------------------------------

    def split_np(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Each id's slot in each tier (-1 where it is not in that tier, or < 0)."""
        ids = np.asarray(ids, np.int64)
        out = {}
        for name, a in ((HOT, self.hot), (WARM, self.warm)):
            j = np.searchsorted(a, ids)
            hit = (j < a.size) & (a[np.minimum(j, max(a.size - 1, 0))] == ids) if a.size else ids < -1
            out[name] = np.where(hit & (ids >= 0), j, -1)
        below = np.searchsorted(self._both, ids)
        cold = (out[HOT] < 0) & (out[WARM] < 0) & (ids >= 0)
        out[COLD] = np.where(cold, ids - below, -1)
        return out

    def rows_of(self, tier: str) -> np.ndarray:
        """The raw rows of a tier, in slot order (host numpy)."""
        if tier == HOT:
            return self.hot
        if tier == WARM:
            return self.warm
        cold = getattr(self, "_cold", None)
        if cold is None:
            keep = np.ones(self.rows, bool)
            keep[self._both] = False
            cold = np.flatnonzero(keep)
            object.__setattr__(self, "_cold", cold)
        return cold

    # ---- on the device ---------------------------------------------------------------------------

    def split(self, ids: jax.Array) -> dict[str, jax.Array]:
        """`split_np` in jnp (ids i32, -1: none)."""
        out = {}
        for name, a in ((HOT, self.hot), (WARM, self.warm)):
            if not a.size:
                out[name] = jnp.full(ids.shape, -1, jnp.int32)
                continue
            arr = jnp.asarray(a.astype(np.int32))
            j = jnp.searchsorted(arr, ids).astype(jnp.int32)
            hit = (arr[jnp.minimum(j, a.size - 1)] == ids) & (ids >= 0)
            out[name] = jnp.where(hit, j, -1)
        if self._both.size:
            below = jnp.searchsorted(jnp.asarray(self._both.astype(np.int32)), ids).astype(jnp.int32)
        else:
            below = jnp.zeros(ids.shape, jnp.int32)
        cold = (out[HOT] < 0) & (out[WARM] < 0) & (ids >= 0)
        out[COLD] = jnp.where(cold, ids - below, -1)
        return out

    def raw(self, tier: str, slots: jax.Array) -> jax.Array:
        """The raw rows of a tier's slots i32[...] (in range)."""
        if tier in (HOT, WARM):
            a = self.hot if tier == HOT else self.warm
            if not a.size:
                return slots
            return jnp.asarray(a.astype(np.int32))[jnp.clip(slots, 0, a.size - 1)]
        if not self._both.size:
            return slots
        gaps = jnp.asarray(self._gaps.astype(np.int32))
        return slots + jnp.searchsorted(gaps, slots, side="right").astype(jnp.int32)


class TierFold:
    """A model's features and a layout's tables, where a flexshard feature is
    cut into tier tables (`Layout.source` maps each table to its feature).

    `ShardedEmbeddings` takes the model's ids and gives the model's
    embeddings; in between it works on the layout's tables. This is the map
    both ways: ids to the tier tables' slots (`to_tiers`), lengths
    (`lengths`), the tables' outputs summed back into the features' (`fold`:
    pooled partial sums of the tiers added, a mean applied after the sum; a
    sequence position takes its row from the one tier that holds it), and
    the transpose for gradients (`unfold`). Without tiers each is the identity.

    Args:
      features: the model's `FeatureSet`.
      layout: the `Layout` (its `features` are the tables).
    """

    def __init__(self, features, layout):
        from jdmt.data.specs import Combiner

        self.features = features
        self.layout = layout
        self.active = bool(layout.row_tiers)
        ufeats, feats = features.sparse, layout.features.sparse
        self.user_pooled_idx = [i for i, f in enumerate(ufeats) if f.pooled]
        self.pooled_idx = [i for i, f in enumerate(feats) if f.pooled]
        self.seq_idx = [i for i, f in enumerate(feats) if not f.pooled]
        src = layout.source
        ustart, vstart, start = {}, {}, 0
        for i in self.user_pooled_idx:
            ustart[i] = start
            start += ufeats[i].dim
        start = 0
        for i in self.pooled_idx:
            vstart[i] = start
            start += feats[i].dim
        # each model pooled feature's blocks among the tables' pooled columns
        self._fold_blocks = {u: [vstart[v] for v in self.pooled_idx if src[v] == u] for u in self.user_pooled_idx}
        self._user_mean_tiered = {u for u in layout.row_tiers if ufeats[u].combiner is Combiner.MEAN}
        self._unfold_blocks = [(ustart[int(src[v])], feats[v].dim, layout.tier_of[v] is not None
                                and ufeats[int(src[v])].combiner is Combiner.MEAN) for v in self.pooled_idx]

    def to_tiers(self, canon, xp=jnp):
        """i32[B, model slots + 1] rows of the model's tables -> rows of the
        layout's tables (a flexshard table's ids split into its tiers' slots)."""
        if not self.active:
            return canon
        uoff = self.features.offsets
        blocks, split = [], {}
        for v, u in enumerate(self.layout.source):
            f = self.features.sparse[u]
            x = canon[:, uoff[u] : uoff[u] + f.max_len]
            t = self.layout.tier_of[v]
            if t is not None:
                if u not in split:
                    split[u] = t[1].split(x) if xp is jnp else t[1].split_np(x)
                x = split[u][t[0]].astype(xp.int32)
            blocks.append(x)
        blocks.append(canon[:, -1:])
        return xp.concatenate(blocks, axis=1)

    def lengths(self, lengths):
        """i32[B, model features] -> i32[B, tables]."""
        return lengths[:, self.layout.source] if self.active else lengths

    @staticmethod
    def _mean(lengths, u):
        return 1.0 / jnp.maximum(lengths[:, u : u + 1], 1).astype(jnp.float32)

    def fold(self, pooled, seqs, lengths):
        """The tables' outputs -> the model's features' (a flexshard
        feature's tiers summed; mean applied after the sum)."""
        if not self.active:
            return pooled, seqs
        ufeats = self.features.sparse
        out_pooled = None
        if self.user_pooled_idx:
            cols = []
            for u in self.user_pooled_idx:
                d = ufeats[u].dim
                starts = self._fold_blocks[u]
                x = pooled[:, starts[0] : starts[0] + d]
                for c in starts[1:]:
                    x = x + pooled[:, c : c + d]
                if u in self._user_mean_tiered:
                    x = x * self._mean(lengths, u)  # (untiered tables: applied in `_assemble`)
                cols.append(x)
            out_pooled = jnp.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]
        out_seqs = {}
        tables = self.layout.features.sparse
        for v, u in enumerate(self.layout.source):
            f = tables[v]
            if f.pooled:
                continue
            name = ufeats[u].name
            out_seqs[name] = seqs[f.name] if name not in out_seqs else out_seqs[name] + seqs[f.name]
        return out_pooled, out_seqs

    def unfold(self, g_pooled, g_seqs, lengths):
        """The model's features' gradients -> the tables' (`fold`'s transpose)."""
        if not self.active:
            return g_pooled, g_seqs
        src = self.layout.source
        out_pooled = None
        if self.pooled_idx:
            cols = []
            for v, (c, d, mean) in zip(self.pooled_idx, self._unfold_blocks):
                x = g_pooled[:, c : c + d]
                cols.append(x * self._mean(lengths, int(src[v])) if mean else x)
            out_pooled = jnp.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]
        ufeats, tables = self.features.sparse, self.layout.features.sparse
        out_seqs = {tables[v].name: g_seqs[ufeats[int(src[v])].name] for v in self.seq_idx}
        return out_pooled, out_seqs

