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

__all__ = ["HOT", "WARM", "COLD", "TIERS", "RowTiers", "tier_name"]

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
