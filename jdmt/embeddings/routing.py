"""Requests for rows, packed for the exchange, and served at the owners.

Two kinds of request travel through `exchange.exchange` (all functions here
run inside `shard_map`, on one device's data; G = peers of the exchange):

*Bags to their owner* (`bag_send` / `bag_ids_at_owner`): a pooled bag whose
piece lives whole on one device (table-wise, a column shard, or a table-wise
table inside a host) goes to that device as one *item*: its ids, compacted
(only real ids travel), behind a header of every item's length. The owner
pools the bag and returns one row per item; the gradient comes back as one
row per item. Each peer's block is `[lengths of its items | their ids]`,
items in a fixed order (`rank`), so both sides know where every item is.

*Unique rows to the requester* (`row_send`): ids whose row lives on another
device (row-wise shards), or sequence positions, or bags where de-duplication
pays, are de-duplicated per destination: each unique (owner, row) is asked
for once, the owner returns its row once, and the requester keeps the
inverse (`inv`: for each id, where its row comes back) to pool or place
rows, and to sum each unique row's gradients before they return.

Both report what a destination would need beyond its block's capacity
(`need`): the caller turns that into an overflow, never a silent loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdmt import precision

__all__ = [
    "bag_ids_at_owner",
    "bag_send",
    "exclusive_cumsum",
    "gather_rows",
    "inverse_index",
    "one_to_one_take",
    "pool_rows",
    "row_send",
    "send_keys",
    "take_columns",
]

_BIG = jnp.iinfo(jnp.int32).max


def exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def take_columns(x: jax.Array, cols, max_runs: int = 64) -> jax.Array:
    """`x[:, cols]` for a static index array `cols` (numpy indexing: -1 is
    the last column), built from slices where the indices run in order or
    repeat one column: XLA:CPU fuses those into the consumer, where a gather
    of columns is laid out column-major and copied back (measured: 1-4 ms for
    the [4096, 260] ids of the lookup benchmark, a quarter of its forward).
    Falls back to the gather past `max_runs` runs."""
    idx = np.asarray(cols, np.int64)
    flat = np.where(idx < 0, idx + x.shape[1], idx).reshape(-1)
    if flat.size == 0:
        return x[:, flat].reshape(x.shape[:1] + idx.shape)
    # each of a run of consecutive columns repeated r times: one slice, broadcast
    r = int(np.argmax(flat != flat[0])) or flat.size  # how often the first column repeats
    if r > 1 and flat.size % r == 0:
        u = flat[::r]
        if np.all(np.diff(u) == 1) and np.array_equal(flat, np.repeat(u, r)):
            part = lax.slice_in_dim(x, int(u[0]), int(u[0]) + len(u), axis=1)
            part = jnp.broadcast_to(part[:, :, None], (x.shape[0], len(u), r))
            return part.reshape(x.shape[:1] + idx.shape)
    runs = []  # (start, length, consecutive?)
    i = 0
    while i < flat.size:
        j = i + 1
        step = flat[j] - flat[i] if j < flat.size else 1
        if step not in (0, 1):
            step = 1
        while j < flat.size and flat[j] - flat[j - 1] == step:
            j += 1
        runs.append((int(flat[i]), j - i, step == 1 or j - i == 1))
        i = j
    if len(runs) > max_runs:
        return x[:, flat].reshape(x.shape[:1] + idx.shape)
    parts = [lax.slice_in_dim(x, c, c + n, axis=1) if seq
             else jnp.broadcast_to(lax.slice_in_dim(x, c, c + 1, axis=1), (x.shape[0], n))
             for c, n, seq in runs]
    out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return out.reshape(x.shape[:1] + idx.shape)


def bag_send(rows: jax.Array, dst: jax.Array, rank: jax.Array, base: jax.Array,
             header: jax.Array, cap: int,
             weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Pack bags for their owners.

    Args:
      rows: i32[n, P] table rows of each item's ids, -1 where there is none
        (items sorted by destination, then `rank`).
      dst: i32[n] each item's peer; rank: i32[n] its place in that peer's
        header; base: i32[n] the storage row of its piece at the peer.
      header: i32[G] items each peer gets (its header's length).
      cap: a block's capacity (header plus ids).
      weights: f32[n, P] per-sample weights of the ids, or None.

    Returns:
      send: i32[G, cap] blocks `[lengths | ids (storage rows)]`, -1 after.
      sizes: i32[G] each block's length (header + ids), possibly > cap.
      lens: i32[n] ids per item.
      wsend: i32[G, cap] the bits of the ids' f32 weights, each at its id's
        place in `send` (0 in the header and after), ready to travel beside
        the ids; or None. Laid out as the ids, so that the owner takes both
        in one gather (`bag_ids_at_owner`); the header slots are wire bytes,
        not payload.
    """
    g = header.shape[0]
    ok = rows >= 0
    lens = jnp.sum(ok, axis=1, dtype=jnp.int32)
    before = exclusive_cumsum(lens)
    first = jnp.searchsorted(dst, jnp.arange(g, dtype=dst.dtype), side="left")
    start = before - before[jnp.minimum(first, dst.shape[0] - 1)][dst]
    pos = header[dst][:, None] + start[:, None] + jnp.cumsum(ok, axis=1, dtype=jnp.int32) - 1
    pos = jnp.where(ok, pos, cap)  # dropped
    send = jnp.full((g, cap), -1, jnp.int32)
    send = send.at[dst, rank].set(lens, mode="drop")
    to = jnp.broadcast_to(dst[:, None], pos.shape)
    send = send.at[to, pos].set(rows + base[:, None], mode="drop")
    sizes = header + jax.ops.segment_sum(lens, dst, num_segments=g)
    wsend = None
    if weights is not None:
        wsend = jnp.zeros((g, cap), jnp.int32).at[to, pos].set(
            lax.bitcast_convert_type(weights.astype(jnp.float32), jnp.int32), mode="drop")
    return send, sizes.astype(jnp.int32), lens, wsend


def bag_ids_at_owner(recv: jax.Array, items: jax.Array, max_items: int, pooling: int,
                     wrecv: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """The bags a peer sent, as i32[G, max_items, pooling] storage rows (-1: none).

    Args:
      recv: i32[G, cap] received blocks `[lengths | ids]`.
      items: i32[] this device's header length (items per peer).
      max_items: static bound on `items` over the devices.
      pooling: static bound on any item's length.
      wrecv: i32[G, cap] the bits of the ids' weights (`bag_send`'s
        `wsend`, received), or None.

    Returns:
      (ids, their weights f32[G, max_items, pooling], 0 where there is no
      id; None without `wrecv`).
    """
    j = jnp.arange(max_items, dtype=jnp.int32)
    lens = jnp.where(j[None, :] < items, recv[:, :max_items], 0)
    lens = jnp.maximum(lens, 0)
    starts = items + exclusive_cumsum(lens, axis=1)  # [G, max_items]
    p = jnp.arange(pooling, dtype=jnp.int32)
    idx = starts[..., None] + p  # [G, max_items, P]
    cap = recv.shape[1]
    at = jnp.minimum(idx, cap - 1).reshape(recv.shape[0], -1)
    ok = (p < lens[..., None]) & (idx < cap)
    if wrecv is None:
        got = jnp.take_along_axis(recv, at, axis=1).reshape(idx.shape)
        return jnp.where(ok, got, -1), None
    # ids and weights side by side: one gather of pairs
    both = jnp.stack([recv, wrecv], axis=-1)  # [G, cap, 2]
    got = jnp.take_along_axis(both, at[..., None], axis=1).reshape(idx.shape + (2,))
    ids = jnp.where(ok, got[..., 0], -1)
    w = jnp.where(ok, lax.bitcast_convert_type(got[..., 1], jnp.float32), 0.0)
    return ids, w


def row_send(rows: jax.Array, piece: jax.Array, stride: jax.Array, devices: jax.Array,
             offsets: jax.Array, rows_per_peer: int, peers: int, cap: int, impl=None):
    """De-duplicate row requests per owner and pack them.

    Args:
      rows: i32[n] table rows of the ids (-1: none).
      piece: i32[n] each id's piece; stride: i32[K] its row shards; devices,
        offsets: i32[K, S] each row shard's peer and storage offset (row r
        is in shard r % stride at local row offset + r // stride).
      rows_per_peer: storage rows per device (bounds a local row).
      peers: G; cap: a block's capacity.
      impl: the kernels that run (`pallas_kernels.common.Impl`): where the
        C++ CPU kernels do (`impl.cpu`), `cpu_kernels.row_send` computes the
        same outputs in one pass (no XLA sort and binary search).

    Returns:
      send: i32[G, cap] unique storage rows asked of each peer (ascending),
        -1 after.
      sizes: i32[G] unique rows per peer (possibly > cap).
      inv: i32[n] where each id's row comes back in the `[G * cap]` rows
        returned (-1: no id, or beyond the capacity).
      unique: i32[] unique (owner, row) pairs asked for.

    The (owner, row) keys are sorted alone (a sort with a payload costs
    several times more) and each id finds its key among the unique ones by
    binary search.
    """
    if impl is not None and impl.cpu:
        from jdmt.embeddings import cpu_kernels

        return cpu_kernels.row_send(rows, piece, stride, devices, offsets, rows_per_peer, peers, cap)
    ok = rows >= 0
    r = jnp.maximum(rows, 0)
    k = stride[piece]
    s = r % k
    dst = devices[piece, s]
    local = offsets[piece, s] + r // k
    if peers * rows_per_peer >= _BIG:  # keys do not fit in int32: sort the pairs
        return _row_send_pairs(dst, local, ok, rows_per_peer, peers, cap)
    return send_keys(jnp.where(ok, dst * rows_per_peer + local, -1), rows_per_peer, peers, cap)


def send_keys(key: jax.Array, rows_per_peer: int, peers: int, cap: int, impl=None):
    """`row_send` of ready keys: i32[n] `peer * rows_per_peer + local row`
    (-1: none), `peers * rows_per_peer` within int32. Same returns (and
    `impl` as there)."""
    if impl is not None and impl.cpu:
        from jdmt.embeddings import cpu_kernels

        return cpu_kernels.send_keys(key, rows_per_peer, peers, cap)
    n = key.shape[0]
    ok = key >= 0
    key = jnp.where(ok, key, _BIG)
    skey = lax.sort(key)
    valid = skey != _BIG
    new = jnp.concatenate([jnp.ones((1,), bool), skey[1:] != skey[:-1]]) & valid
    uid = jnp.cumsum(new, dtype=jnp.int32) - 1
    ukey = jnp.full((n,), _BIG, jnp.int32).at[jnp.where(new, uid, n)].set(skey, mode="drop")
    unique = jnp.sum(new, dtype=jnp.int32)
    uvalid = ukey != _BIG
    udst = jnp.where(uvalid, ukey // rows_per_peer, peers)
    counts = jax.ops.segment_sum(uvalid.astype(jnp.int32), udst, num_segments=peers + 1)[:peers]
    start = jnp.concatenate([exclusive_cumsum(counts), jnp.zeros((1,), jnp.int32)])
    urank = jnp.arange(n, dtype=jnp.int32) - start[udst]
    fits = uvalid & (urank < cap)
    send = jnp.full((peers, cap), -1, jnp.int32)
    send = send.at[jnp.where(fits, udst, peers), urank].set(ukey % rows_per_peer, mode="drop")
    back = jnp.where(fits, udst * cap + urank, -1)
    u = jnp.searchsorted(ukey, key).astype(jnp.int32)
    inv = jnp.where(ok, back[jnp.minimum(u, n - 1)], -1)
    return send, counts.astype(jnp.int32), inv, unique


def _row_send_pairs(dst, local, ok, rows_per_peer, peers, cap):
    """`row_send` for keys past int32: sort (dst, local, position) together."""
    n = dst.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32)
    sdst, slocal, spos = lax.sort((jnp.where(ok, dst, _BIG), jnp.where(ok, local, _BIG), pos), num_keys=2)
    svalid = sdst != _BIG
    new = jnp.concatenate([jnp.ones((1,), bool), (sdst[1:] != sdst[:-1]) | (slocal[1:] != slocal[:-1])])
    uid = jnp.cumsum(new, dtype=jnp.int32) - 1
    first = new & svalid
    counts = jax.ops.segment_sum(first.astype(jnp.int32), jnp.where(svalid, sdst, 0), num_segments=peers)
    start = exclusive_cumsum(counts)
    rank = uid - start[jnp.where(svalid, sdst, 0)]
    fits = svalid & (rank < cap)
    send = jnp.full((peers, cap), -1, jnp.int32)
    send = send.at[jnp.where(first & fits, sdst, peers), rank].set(slocal, mode="drop")
    back = jnp.where(fits, sdst * cap + rank, -1)
    inv = jnp.full((n,), -1, jnp.int32).at[spos].set(back)
    return send, counts.astype(jnp.int32), inv, jnp.sum(first, dtype=jnp.int32)


def gather_rows(table: jax.Array, idx: jax.Array) -> jax.Array:
    """`table[idx]` with zeros where idx < 0 (or past the end), as f32 (a
    16-bit table's stored rows are widened as they are read: `precision.widen`)."""
    idx = jnp.where(idx >= 0, idx, table.shape[0])
    if precision.is_half(table.dtype):
        return precision.widen(table.at[idx].get(mode="fill", fill_value=0))
    return table.at[idx].get(mode="fill", fill_value=0).astype(jnp.float32)


_UNROLL = 16  # positions unrolled in Python (bags longer than this loop in blocks of it)


def pool_rows(table: jax.Array, idx: jax.Array, count: jax.Array | int | None = None,
              weights: jax.Array | None = None) -> jax.Array:
    """Sum of `table[idx[..., p]]` over the last axis, skipping idx < 0, one
    position after another, in order, starting from the first position's
    row (nothing of size [ids, D] is formed). `count`: a bound on the
    positions to visit (a traced value runs a loop of that many positions).
    `weights`: f32[..., P] per-sample weights (each row is multiplied by
    its weight before it is added; zero where idx < 0).

    Bags of up to `_UNROLL` positions are unrolled (XLA fuses the gathers
    into one sum); longer ones loop over blocks of `_UNROLL` positions, so
    the program (and its trace and compile time) does not grow with the
    pooling factor. `cpu_kernels.pooled_lookup` is the same sum in C++."""
    pmax = idx.shape[-1]
    static = count is None or isinstance(count, int)
    n = min(count, pmax) if static and count is not None else pmax
    if n == 0:
        return jnp.zeros(idx.shape[:-1] + table.shape[1:], jnp.float32)

    def row(c, w):  # one position's rows f32[..., D], weighted
        r = gather_rows(table, c)
        return r if w is None else r * w[..., None]

    w_at = (lambda p: None) if weights is None else (lambda p: weights[..., p])  # noqa: E731
    if static:
        if n <= _UNROLL:
            out = row(idx[..., 0], w_at(0))
            for p in range(1, n):
                out = out + row(idx[..., p], w_at(p))
            return out
        cols = jnp.moveaxis(idx[..., :n], -1, 0)  # [n, ...]: one position per loop step
        if weights is None:
            return lax.scan(lambda o, c: (o + row(c, None), None), row(cols[0], None), cols[1:],
                            unroll=_UNROLL)[0]
        ws = jnp.moveaxis(weights[..., :n], -1, 0)
        return lax.scan(lambda o, cw: (o + row(*cw), None), row(cols[0], ws[0]), (cols[1:], ws[1:]),
                        unroll=_UNROLL)[0]
    first = row(jnp.where(count > 0, idx[..., 0], -1), w_at(0))

    def body(p, o):
        w = None if weights is None else lax.dynamic_index_in_dim(weights, p, weights.ndim - 1, False)
        return o + row(lax.dynamic_index_in_dim(idx, p, idx.ndim - 1, False), w)

    return lax.fori_loop(1, jnp.minimum(count, pmax), body, first)


def inverse_index(idx: np.ndarray, n: int) -> np.ndarray:
    """For a static index `idx` (last axis: the positions it takes, any
    leading axes: one index each, e.g. per host) into n positions, each
    taken at most once: i32[..., n], for each position the flat place in
    idx's last axes that takes it, or `idx`'s size (out of range) if none.
    Indices outside [0, n) take nothing."""
    idx = np.asarray(idx)
    lead = idx.shape[:-1] if idx.ndim > 1 else ()
    flat = idx.reshape(int(np.prod(lead, dtype=np.int64)) if lead else 1, -1)
    out = np.full((flat.shape[0], n), flat.shape[1], np.int32)
    for r, row in enumerate(flat):
        ok = (row >= 0) & (row < n)
        taken = row[ok]
        if np.unique(taken).size != taken.size:
            raise ValueError("the index takes a position more than once")
        out[r, taken] = np.nonzero(ok)[0]
    return out.reshape(lead + (n,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def one_to_one_take(x: jax.Array, idx: jax.Array, inv: jax.Array, axis: int) -> jax.Array:
    """`jnp.take(x, idx, axis)` with zeros for indices out of range, where no
    position of x is taken twice (`inv`: `inverse_index` of idx over
    x.shape[axis]). Its gradient gathers through `inv`: autodiff's own
    would scatter-add into a zero buffer of x's size (on CPU a memset and a
    scatter, each a pass over the buffer)."""
    flat = jnp.take(x, idx.reshape(-1), axis=axis, mode="fill", fill_value=0)
    return flat.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1 :])


def _one_to_one_fwd(x, idx, inv, axis):
    return one_to_one_take(x, idx, inv, axis), (idx, inv)


def _one_to_one_bwd(axis, res, g):
    idx, inv = res
    g = g.reshape(g.shape[:axis] + (idx.size,) + g.shape[axis + idx.ndim :])
    return jnp.take(g, inv, axis=axis, mode="fill", fill_value=0), None, None


one_to_one_take.defvjp(_one_to_one_fwd, _one_to_one_bwd)
