"""The one exchange primitive: every device sends every peer its own number of rows.

Every id, row and gradient that travels between devices in jdmt goes through
`exchange` (inside `shard_map`). A device's data for its G peers is laid out
in *blocks*: `x[g, :sizes[g]]` is what peer g gets (block layout, `[G, cap,
...]`); the result has the same layout, block s holding what peer s sent.

On GPU and TPU the rows travel by `lax.ragged_all_to_all`: each peer gets
exactly `sizes[g]` rows, so the wire carries the payload. XLA:CPU has no
ragged all-to-all, so on CPU the same call, with the same ragged arguments
(input offsets, send sizes, output offsets, receive sizes), is carried out
by a padded `all_to_all` of each block at its full capacity: the CPU tests
run the offsets and sizes logic that accelerators run, and `mode="emulated"`
checks it against the ragged op's definition (`ragged_all_to_all`'s
docstring) on any backend. The backward of an exchange is the exchange back
(`exchange(y, recv_sizes, ...)`, with the receive sizes known).

A block holds at most `cap` rows. The caller detects a destination with more
(`overflow`) and never loses them silently: `exchange` sends the first `cap`
and the caller reports the step as overflowed (see `ShardedEmbeddings`).

Payload: `payload_bytes` counts the rows really sent to other devices, split
into peers on other hosts and peers on the same host (a device's rows to
itself never touch a link). Beside it, `jdmt.comm` reads the wire bytes of
the compiled program: on CPU the padded blocks, on GPU/TPU (ragged) an upper
bound it flags.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "MODES",
    "broadcast",
    "exchange",
    "group_index",
    "overflow",
    "payload_bytes",
    "ragged_args",
]

MODES = ("auto", "ragged", "padded", "emulated")


def group_index(axis: Sequence[str]) -> jax.Array:
    """This device's position in the exchange group over `axis` (inside `shard_map`);
    the first axis name is the most significant digit."""
    return lax.axis_index(tuple(axis))


def ragged_args(sizes: jax.Array, recv_sizes: jax.Array, parts: Sequence[int], me: jax.Array):
    """The arguments of `lax.ragged_all_to_all` for block layout: blocks of
    `sum(parts)` rows per peer, each cut into K slices of `parts[j]` rows
    (slice j starts at `sum(parts[:j])`). `sizes`, `recv_sizes`: i32[G, K].

    Returns (input_offsets, send_sizes, output_offsets, recv_sizes), each
    i32[G * K], entry g * K + j for slice j of peer g (K slices per peer):
    slice j of block g starts at g * cap + start_j; what this device sends
    lands in every receiver's block `me`, at me * cap + start_j.
    """
    g, k = sizes.shape
    cap = int(sum(parts))
    start = np.concatenate([[0], np.cumsum(parts)[:-1]]).astype(np.int32)
    inp = (jnp.arange(g, dtype=jnp.int32)[:, None] * cap + start[None, :]).reshape(-1)
    out = jnp.broadcast_to(me * cap + jnp.asarray(start)[None, :], (g, k)).reshape(-1)
    return inp, sizes.reshape(-1), out.astype(jnp.int32), recv_sizes.reshape(-1)


def _emulated_ragged(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                     axis, parts):
    """`lax.ragged_all_to_all`'s definition carried out with an all_to_all of
    `sum(parts)` rows per peer: slice, send, write each received slice at the
    offset its sender chose (rows past a slice's size are left as they were)."""
    k = len(parts)
    g = send_sizes.shape[0] // k
    rest = operand.shape[1:]
    sent = []
    for j, cap_j in enumerate(parts):
        t = input_offsets[j::k][:, None] + jnp.arange(cap_j, dtype=jnp.int32)[None, :]  # [G, cap_j]
        sent.append(jnp.take(operand, jnp.minimum(t, operand.shape[0] - 1).reshape(-1), axis=0)
                    .reshape((g, cap_j) + rest))
    got = lax.all_to_all(jnp.concatenate(sent, axis=1), tuple(axis), 0, 0, tiled=True)
    where = lax.all_to_all(output_offsets.reshape(g, k), tuple(axis), 0, 0, tiled=True)  # [G(src), K]
    recv = recv_sizes.reshape(g, k)
    start = 0
    for j, cap_j in enumerate(parts):
        t = jnp.arange(cap_j, dtype=jnp.int32)[None, :]
        put = jnp.where(t < recv[:, j : j + 1], where[:, j : j + 1] + t, output.shape[0])
        output = output.at[put.reshape(-1)].set(
            got[:, start : start + cap_j].reshape((g * cap_j,) + rest), mode="drop")
        start += cap_j
    return output


def exchange(
    x: jax.Array,
    sizes: jax.Array,
    axis: Sequence[str],
    *,
    parts: Sequence[int] | None = None,
    recv_sizes: jax.Array | None = None,
    mode: str = "auto",
    fill=0,
) -> tuple[jax.Array, jax.Array]:
    """Send block g of `x` to peer g of the group over `axis` (inside `shard_map`).

    Args:
      x: [G, cap, ...] block layout: `x[g, :sizes[g]]` goes to peer g.
      sizes: i32[G] rows for each peer, at most `cap`; or, with `parts`,
        i32[G, K]: rows of each of the block's K slices (larger sizes are cut
        to their slice: check `overflow` first).
      axis: mesh axis names of the group, most significant first.
      parts: the block cut into K slices of these many rows (one collective
        carries several requests); default one slice of `cap`.
      recv_sizes: like `sizes`, the rows each peer sends here, if known (the
        reverse of an earlier exchange); else found by an all_to_all.
      mode: "ragged" (`lax.ragged_all_to_all`), "padded" (all_to_all of whole
        blocks; CPU), "emulated" (the ragged op's definition, padded), or
        "auto" (ragged on GPU/TPU, padded on CPU, picked when lowered).
      fill: the value of received rows past each slice's size; None: any
        value (the caller never reads them: no pass over the block to mask).

    Returns:
      (y [G, cap, ...] with block s = the rows peer s sent, then `fill`;
       recv_sizes like `sizes`).
    """
    if mode not in MODES:
        raise ValueError(f"exchange mode must be one of {MODES}, got {mode!r}")
    axis = tuple(axis)
    g, cap = x.shape[0], x.shape[1]
    single = parts is None
    parts = (cap,) if single else tuple(int(p) for p in parts)
    if sum(parts) != cap:
        raise ValueError(f"parts {parts} do not add up to the block's {cap} rows")
    sizes = sizes.astype(jnp.int32).reshape(g, len(parts))
    sizes = jnp.minimum(sizes, jnp.asarray(parts, jnp.int32)[None, :])
    if recv_sizes is None:
        recv_sizes = lax.all_to_all(sizes, axis, 0, 0, tiled=True)
    recv_sizes = recv_sizes.astype(jnp.int32).reshape(g, len(parts))
    rest = x.shape[2:]
    start = np.concatenate([[0], np.cumsum(parts)[:-1]])
    part_of = np.repeat(np.arange(len(parts)), parts)  # slice of each row of a block
    offset = np.arange(cap) - start[part_of]  # row within its slice

    def padded(x, sizes, recv_sizes):
        y = lax.all_to_all(x, axis, 0, 0, tiled=True)
        if fill is None:
            return y
        keep = jnp.asarray(offset)[None, :] < recv_sizes[:, part_of]
        return jnp.where(keep.reshape(keep.shape + (1,) * len(rest)), y, jnp.asarray(fill, x.dtype))

    def ragged(x, sizes, recv_sizes, emulate=False):
        flat = x.reshape((g * cap,) + rest)
        out = jnp.full_like(flat, 0 if fill is None else fill)
        args = ragged_args(sizes, recv_sizes, parts, group_index(axis))
        if emulate:
            y = _emulated_ragged(flat, out, *args, axis=axis, parts=parts)
        else:
            y = lax.ragged_all_to_all(flat, out, *args, axis_name=axis)
        return y.reshape(x.shape)

    y = _by_mode(mode, padded, ragged, x, sizes, recv_sizes)
    return y, (recv_sizes[:, 0] if single else recv_sizes)


def broadcast(x: jax.Array, size: jax.Array, axis: Sequence[str], *, mode: str = "auto",
              fill=0) -> tuple[jax.Array, jax.Array]:
    """Send the same `size` rows of `x` ([cap, ...]) to every peer over `axis`.

    Returns (y [G, cap, ...] with block s = the rows peer s sent, then
    `fill`; recv_sizes i32[G]). Ragged: one `ragged_all_to_all` whose
    input offsets all point at the same rows (nothing is copied G times);
    padded (CPU): an all_gather of the whole buffer.
    """
    if mode not in MODES:
        raise ValueError(f"exchange mode must be one of {MODES}, got {mode!r}")
    axis = tuple(axis)
    cap = x.shape[0]
    rest = x.shape[1:]
    size = jnp.minimum(jnp.asarray(size, jnp.int32), cap)
    recv_sizes = lax.all_gather(size, axis, tiled=False)
    g = recv_sizes.shape[0]

    def padded(x, size, recv_sizes):
        y = lax.all_gather(x, axis, tiled=False)  # [G, cap, ...]
        keep = jnp.arange(cap, dtype=jnp.int32)[None, :] < recv_sizes[:, None]
        return jnp.where(keep.reshape(keep.shape + (1,) * len(rest)), y, jnp.asarray(fill, x.dtype))

    def ragged(x, size, recv_sizes, emulate=False):
        out = jnp.full((g * cap,) + rest, fill, x.dtype)
        me = group_index(axis)
        args = (jnp.zeros((g,), jnp.int32), jnp.full((g,), size, jnp.int32),
                jnp.full((g,), me * cap, jnp.int32), recv_sizes)
        if emulate:
            y = _emulated_ragged(x, out, *args, axis=axis, parts=(cap,))
        else:
            y = lax.ragged_all_to_all(x, out, *args, axis_name=axis)
        return y.reshape((g, cap) + rest)

    return _by_mode(mode, padded, ragged, x, size, recv_sizes), recv_sizes


def _by_mode(mode: str, padded, ragged, *args):
    """Run the exchange's padded or ragged form (or the ragged one emulated);
    "auto": ragged on accelerators, padded on CPU, chosen at lowering."""
    if mode == "padded":
        return padded(*args)
    if mode == "ragged":
        return ragged(*args)
    if mode == "emulated":
        return ragged(*args, emulate=True)
    return lax.platform_dependent(*args, cpu=padded, default=ragged)


def overflow(sizes: jax.Array, cap: int) -> jax.Array:
    """i32[]: the most rows any peer was meant to get beyond `cap` (0: none)."""
    return jnp.maximum(jnp.max(sizes) - cap, 0).astype(jnp.int32)


def payload_bytes(sizes: jax.Array, row_bytes: float, peer_host: np.ndarray, my_host: jax.Array,
                  me: jax.Array) -> tuple[jax.Array, jax.Array]:
    """f32 (cross-host, intra-host) bytes of the rows really sent: `sizes[g]`
    rows of `row_bytes` to each peer g other than this device itself.

    Args:
      peer_host: i32[G] (static) the host of each peer of the group.
      my_host, me: this device's host and position in the group.
    """
    b = sizes.astype(jnp.float32) * jnp.float32(row_bytes)
    peers = jnp.arange(sizes.shape[0], dtype=jnp.int32)
    other = jnp.asarray(peer_host, jnp.int32) != my_host
    cross = jnp.sum(jnp.where(other, b, 0.0))
    intra = jnp.sum(jnp.where(~other & (peers != me), b, 0.0))
    return cross, intra
