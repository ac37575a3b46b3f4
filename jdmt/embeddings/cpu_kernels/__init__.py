"""C++ XLA FFI kernels for CPU: the fused sparse optimizer step, in place,
the pooled lookup, the packing of bags for their owners, the de-duplicated
row requests per owner (`row_send`, `send_keys`), and the DLRM dot
interaction (forward and backward).

`sparse_update` does what `optimizers.sparse_step` does for one device's
storage buffer (sort the ids by row, sum each row's gradients in ascending
position order, apply the optimizer once per touched row), in one pass over
the ids, with the table and accumulator updated in place. `pooled_lookup`
sums each bag's rows in position order, as `routing.pool_rows` does. Tables
may be f32, bf16 or f16 (`jdmt.precision`): 16-bit rows are widened to f32 as they
are read, and an update writes them back rounded stochastically, bit for bit
as `precision.stochastic_round` with `precision.sr_bits(seed, row, col)`. Both
are CPU-only custom calls: use it inside `jax.jit` / `jax.shard_map` bodies that
run on CPU; it is not vmappable and has no gradient.

The library is compiled on first use (see `build.py`). `available()` says
whether that worked; when it is False, `unavailable_reason()` says why,
callers fall back to the XLA path, and a failed build warns once per
process (RuntimeWarning) naming the cause. Set `JDMT_CPU_KERNELS=0` to turn the
kernels off. The library is built for this CPU's instruction set where the
compiler allows (`isa()` says which build runs; `JDMT_CPU_KERNELS_NATIVE=0`
asks for the portable one).
"""

from __future__ import annotations

import ctypes
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jdmt.embeddings.types import OptimizerKind

_TARGET = "jdmt_sparse_update"
_TARGET_SGD = "jdmt_sparse_update_sgd"
_TARGET_POOL = "jdmt_pooled_lookup"
_TARGET_POOL_W = "jdmt_weighted_pooled_lookup"
_TARGET_DOT = "jdmt_dot_interaction"
_TARGET_DOT_GRAD = "jdmt_dot_interaction_grad"
_TARGET_PACK = "jdmt_bag_pack"
_TARGET_PACK_W = "jdmt_weighted_bag_pack"
_TARGET_KEYS = "jdmt_send_keys"
_TARGET_ROWS = "jdmt_row_send"
_ABI = 11
_KIND = {
    OptimizerKind.ROWWISE_ADAGRAD: 0,
    OptimizerKind.ADAGRAD: 1,
    OptimizerKind.SGD: 2,
}

# f32, bf16, f16, and the stored bit patterns of bf16 (uint16) and f16 (int16)
# that jdmt's state holds (`jdmt.precision.storage_dtype`)
_TABLE_DTYPES = tuple(jnp.dtype(t) for t in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.uint16, jnp.int16))

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str | None, "lib": CDLL, "path": str


def _load() -> None:
    if os.environ.get("JDMT_CPU_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
        _state.update(ok=False, reason="disabled by JDMT_CPU_KERNELS=0")
        return
    from jdmt.embeddings.cpu_kernels import build

    path, why = build.build()
    if path is None:
        _state.update(ok=False, reason=why)
        _warn_fallback(why)
        return
    try:
        lib = ctypes.CDLL(path)
        if lib.jdmt_cpu_kernels_abi_version() != _ABI:
            _state.update(ok=False, reason=f"{path}: ABI version mismatch")
            return
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.JdmtSparseUpdate), platform="cpu")
        jax.ffi.register_ffi_target(_TARGET_SGD, jax.ffi.pycapsule(lib.JdmtSparseUpdateSgd), platform="cpu")
        jax.ffi.register_ffi_target(_TARGET_POOL, jax.ffi.pycapsule(lib.JdmtPooledLookup), platform="cpu")
        jax.ffi.register_ffi_target(_TARGET_POOL_W, jax.ffi.pycapsule(lib.JdmtWeightedPooledLookup),
                                    platform="cpu")
        jax.ffi.register_ffi_target(_TARGET_DOT, jax.ffi.pycapsule(lib.JdmtDotInteraction), platform="cpu")
        jax.ffi.register_ffi_target(_TARGET_DOT_GRAD, jax.ffi.pycapsule(lib.JdmtDotInteractionGrad),
                                    platform="cpu")
        jax.ffi.register_ffi_target(_TARGET_PACK, jax.ffi.pycapsule(lib.JdmtBagPack), platform="cpu")
        jax.ffi.register_ffi_target(_TARGET_PACK_W, jax.ffi.pycapsule(lib.JdmtWeightedBagPack),
                                    platform="cpu")
        jax.ffi.register_ffi_target(_TARGET_KEYS, jax.ffi.pycapsule(lib.JdmtSendKeys), platform="cpu")
        jax.ffi.register_ffi_target(_TARGET_ROWS, jax.ffi.pycapsule(lib.JdmtRowSend), platform="cpu")
    except Exception as e:  # noqa: BLE001
        _state.update(ok=False, reason=f"loading {path} failed: {e!r}")
        return
    _state.update(ok=True, reason=None, lib=lib, path=path)


def _warn_fallback(why: str) -> None:
    """One warning per process: the kernels could not be built, XLA runs instead."""
    import warnings

    first = why.splitlines()[0] if why else "unknown cause"
    more = " (the compiler's output: jdmt.embeddings.cpu_kernels.unavailable_reason())" if "\n" in why else ""
    warnings.warn(f"jdmt: the C++ CPU kernels could not be built: {first}{more}; the XLA path "
                  "runs instead (slower; JDMT_CPU_KERNELS=0 turns them off without this warning)",
                  RuntimeWarning, stacklevel=3)


def _ensure() -> bool:
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                try:
                    _load()
                except Exception as e:  # noqa: BLE001 - never crash the caller
                    _state.update(ok=False, reason=f"unexpected error: {e!r}")
    return _state["ok"]


def available() -> bool:
    """Whether the CPU kernels are built and registered (builds on first call)."""
    return _ensure()


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    _ensure()
    return _state.get("reason")


def library_path() -> str | None:
    _ensure()
    return _state.get("path")


def sparse_update(
    kind,
    table: jax.Array,
    accum: jax.Array | None,
    ids: jax.Array,
    src: jax.Array,
    grads: jax.Array,
    lr,
    *,
    eps: float = 0.0,
    dim: int | None = None,
    threads: int = 1,
    seed=None,
    scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """The fused sparse optimizer step of one storage buffer, in place (CPU).

    Args:
      kind: an `OptimizerKind` (or its string value).
      table: f32, bf16 or f16 [R, D] the buffer (or bf16 / f16 stored as
        uint16 / int16 bit patterns, as `jdmt.precision.storage_dtype`);
        updated in place (donate it in the caller's jit to avoid a copy). A 16-bit table's touched rows
        are widened to f32, updated with the same f32 arithmetic as an f32
        table, and written back as `precision.stochastic_round` does with
        the bits `precision.sr_bits(seed, row, col)` (row: the row of this
        buffer) -- the same bits.
      accum: f32[R] (row-wise Adagrad), f32[R, D] (Adagrad), None (SGD).
      ids: i32[n] (or i32[K, n]: K independent slots) rows of the ids;
        ids outside [0, R) are skipped.
      src: i32 like `ids`: the row of `grads` holding each id's gradient
        (ids whose `src` is outside [0, M) are skipped).
      grads: f32[M, D] (or f32[K, M, D]) gradient rows.
      lr: learning rate, a runtime scalar.
      eps: Adagrad epsilon (static).
      dim: divisor of the row-wise mean of g**2 (static; default D).
      threads: host threads to split the slots over (static; default 1).
      seed: u32 scalar (may be traced) of the stochastic rounding; required
        for a 16-bit table (pass a new one every step, e.g.
        `precision.update_seed`), ignored for an f32 table.
      scale: f32 like `ids`, or None: each id's gradient is its `src` row
        times its scale (per-sample weights: a weighted bag's ids share the
        bag's gradient row, each scaled by its weight).

    Returns:
      (table, accum) with the touched rows updated (accum None for SGD).
    """
    if not _ensure():
        raise RuntimeError(f"jdmt CPU kernels unavailable: {_state.get('reason')}")
    kind = OptimizerKind(getattr(kind, "value", kind))
    d = table.shape[-1]
    ids = jnp.asarray(ids, jnp.int32)
    k = ids.shape[0] if ids.ndim == 2 else 1
    ids = ids.reshape(k, -1)
    src = jnp.asarray(src, jnp.int32)
    if src.size != ids.size:
        raise TypeError(f"src must have one entry per id: ids {ids.shape}, src {src.shape}")
    src = src.reshape(ids.shape)
    if scale is None:
        scale = jnp.zeros((0,), jnp.float32)
    elif scale.size != ids.size:
        raise TypeError(f"scale must have one entry per id: ids {ids.shape}, scale {scale.shape}")
    else:
        scale = jnp.asarray(scale, jnp.float32).reshape(ids.shape)
    grads = jnp.asarray(grads, jnp.float32).reshape(k, -1, d)
    if table.dtype not in _TABLE_DTYPES or table.ndim != 2:
        raise TypeError(f"table must be f32, bf16 or f16 [R, D] (or u16 / i16 bits of bf16 / f16), "
                        f"got {table.dtype}{list(table.shape)}")
    if seed is None and table.dtype != jnp.float32:
        raise TypeError(f"a {table.dtype} table needs a `seed` (u32 scalar) for its stochastic rounding")
    lr = jnp.asarray(lr, jnp.float32).reshape(())
    seed = jnp.asarray(0 if seed is None else seed, jnp.uint32).reshape(())
    threads = np.int64(max(1, int(threads)))
    if kind is OptimizerKind.SGD:
        (table,) = jax.ffi.ffi_call(
            _TARGET_SGD, (jax.ShapeDtypeStruct(table.shape, table.dtype),),
            input_output_aliases={0: 0},
        )(table, ids, src, grads, scale, lr, seed, threads=threads)
        return table, accum
    want = (table.shape[0],) if kind is OptimizerKind.ROWWISE_ADAGRAD else tuple(table.shape)
    if accum is None or tuple(accum.shape) != want or accum.dtype != jnp.float32:
        raise TypeError(f"{kind.value} needs an f32{list(want)} accumulator, got "
                        f"{None if accum is None else (accum.dtype, accum.shape)}")
    table, accum = jax.ffi.ffi_call(
        _TARGET,
        (jax.ShapeDtypeStruct(table.shape, table.dtype), jax.ShapeDtypeStruct(accum.shape, accum.dtype)),
        input_output_aliases={0: 0, 1: 1},
    )(table, accum, ids, src, grads, scale, lr, seed, kind=np.int32(_KIND[kind]), eps=np.float32(eps),
      dim=np.float32(d if dim is None else dim), threads=threads)
    return table, accum


def isa() -> str | None:
    """'native' (built for this CPU's instruction set) or 'portable' (the
    architecture's baseline); None when the kernels are unavailable."""
    if not _ensure():
        return None
    return "native" if "-native-" in os.path.basename(_state["path"]) else "portable"


def host_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def pooled_lookup(table: jax.Array, ids: jax.Array, *, threads: int = 1, visit: int = 1,
                  weights: jax.Array | None = None) -> jax.Array:
    """Pooled rows f32[..., D]: the sum of `table[ids[..., p]]` over the last
    axis in position order, ids outside [0, R) skipped (CPU); a 16-bit
    table's rows are widened to f32 as they are added. With `weights`
    (f32[..., P], the ids' shape) each row is multiplied by its weight
    before it is added, as `routing.pool_rows` with weights.

    Args:
      table: f32, bf16 or f16 [R, D] (or bf16 / f16 stored as uint16 /
        int16 bit patterns).
      ids: i32[..., P] rows (-1: no id).
      threads: host threads to split the bags over (static; bags are split
        only where each thread gets at least ~16k ids).
      visit: K (static): the bags (`ids` flattened to [N, P]) are N / K
        samples of K tables each (bag j * K + k); they are visited table by
        table, so each table's hot rows stay in cache while the output keeps
        the samples' order (no transpose before or after). The result is the
        same for every K; 1 visits the bags in order.
    """
    if not _ensure():
        raise RuntimeError(f"jdmt CPU kernels unavailable: {_state.get('reason')}")
    if table.dtype not in _TABLE_DTYPES or table.ndim != 2:
        raise TypeError(f"table must be f32, bf16 or f16 [R, D] (or u16 / i16 bits of bf16 / f16), "
                        f"got {table.dtype}{list(table.shape)}")
    ids = jnp.asarray(ids, jnp.int32)
    lead, p = ids.shape[:-1], ids.shape[-1]
    flat = ids.reshape(-1, p)
    if visit < 1 or flat.shape[0] % visit:
        raise ValueError(f"visit {visit} must divide the {flat.shape[0]} bags")
    out_t = (jax.ShapeDtypeStruct((flat.shape[0], table.shape[1]), jnp.float32),)
    attrs = dict(threads=np.int64(max(1, int(threads))), visit=np.int64(visit))
    if weights is None:
        (out,) = jax.ffi.ffi_call(_TARGET_POOL, out_t)(table, flat, **attrs)
    else:
        if weights.shape != ids.shape:
            raise ValueError(f"weights {list(weights.shape)} must have the ids' shape {list(ids.shape)}")
        (out,) = jax.ffi.ffi_call(_TARGET_POOL_W, out_t)(table, flat, jnp.asarray(weights, jnp.float32)
                                                         .reshape(-1, p), **attrs)
    return out.reshape(*lead, table.shape[1])


def bag_pack(canon: jax.Array, cols: np.ndarray, dst: np.ndarray, kd: np.ndarray, base: np.ndarray,
             header: np.ndarray, cap: int, *, wcanon: jax.Array | None = None,
             weighted: np.ndarray | None = None, threads: int = 1):
    """The bags of a batch packed for their owners, as `routing.bag_send`
    packs them, from the batch's table rows in one pass (CPU).

    Args:
      canon: i32[B, C] the batch's table rows (-1: no id).
      cols: [K, P] (static) canon's column of each piece's positions (-1: none).
      dst, kd, base: [K] (static) each piece's peer, its place among that
        peer's pieces, and its storage offset there; item (k, b) is header
        slot kd[k] * B + b of peer dst[k].
      header: [G] (static) items each peer gets.
      cap: a block's capacity (header plus ids).
      wcanon: f32[B, C] the ids' weights, and weighted: bool[K] (static)
        which pieces send theirs (the others' ids get weight 1); or None.

    Returns:
      (send i32[G, cap], sizes i32[G] header + ids, possibly > cap,
       wsend i32[G, cap] the weights' bits at their ids' slots, or None).
    """
    if not _ensure():
        raise RuntimeError(f"jdmt CPU kernels unavailable: {_state.get('reason')}")
    g = len(header)
    consts = [jnp.asarray(np.asarray(x, np.int32)) for x in (cols, dst, kd, base, header)]
    outs = [jax.ShapeDtypeStruct((g, cap), jnp.int32), jax.ShapeDtypeStruct((g,), jnp.int32)]
    attrs = dict(threads=np.int64(max(1, int(threads))))
    canon = jnp.asarray(canon, jnp.int32)
    if wcanon is None:
        send, sizes = jax.ffi.ffi_call(_TARGET_PACK, outs)(canon, *consts, **attrs)
        return send, sizes, None
    w = jnp.asarray(np.asarray(weighted, np.uint8))
    send, sizes, wsend = jax.ffi.ffi_call(_TARGET_PACK_W, outs + outs[:1])(
        canon, jnp.asarray(wcanon, jnp.float32), *consts[:5], w, **attrs)
    return send, sizes, wsend


def _row_send_outs(n: int, peers: int, cap: int):
    if not _ensure():
        raise RuntimeError(f"jdmt CPU kernels unavailable: {_state.get('reason')}")
    i32 = jnp.int32
    return (jax.ShapeDtypeStruct((peers, cap), i32), jax.ShapeDtypeStruct((peers,), i32),
            jax.ShapeDtypeStruct((n,), i32), jax.ShapeDtypeStruct((), i32))


def send_keys(key: jax.Array, rows_per_peer: int, peers: int, cap: int):
    """`routing.send_keys` in C++ (CPU): the same four outputs, bit for bit,
    from one radix sort of the keys with their positions and one walk."""
    key = jnp.asarray(key, jnp.int32).reshape(-1)
    return tuple(jax.ffi.ffi_call(_TARGET_KEYS, _row_send_outs(key.shape[0], peers, cap))(
        key, rows_per_peer=np.int64(rows_per_peer)))


def row_send(rows: jax.Array, piece: jax.Array, stride: jax.Array, devices: jax.Array,
             offsets: jax.Array, rows_per_peer: int, peers: int, cap: int):
    """`routing.row_send` in C++ (CPU): the keys (owner, storage row) are
    computed, de-duplicated and packed in one kernel; the same outputs, bit
    for bit, with keys of any width (no int32 limit on peers x rows)."""
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    rows, piece = i32(rows).reshape(-1), i32(piece).reshape(-1)
    return tuple(jax.ffi.ffi_call(_TARGET_ROWS, _row_send_outs(rows.shape[0], peers, cap))(
        rows, piece, i32(stride).reshape(-1), i32(devices), i32(offsets),
        rows_per_peer=np.int64(rows_per_peer)))


def _interaction_input(t: jax.Array) -> jax.Array:
    if not _ensure():
        raise RuntimeError(f"jdmt CPU kernels unavailable: {_state.get('reason')}")
    if t.ndim != 3:
        raise TypeError(f"t must be f32[B, N, D], got {t.dtype}{list(t.shape)}")
    return jnp.asarray(t, jnp.float32)


def dot_interaction(t: jax.Array, *, threads: int = 1) -> jax.Array:
    """f32[B, N(N-1)/2]: `<t_i, t_j>` of each sample's rows for i < j in
    row-major order (the DLRM interaction; `jdmt.models.dlrm.dot_interaction`
    is its XLA form). Each dot product sums over d in order (CPU; not
    differentiable by itself: `dot_interaction_grad` is its backward).

    Args:
      t: f32[B, N, D].
      threads: host threads to split the samples over (static).
    """
    t = _interaction_input(t)
    b, n, _ = t.shape
    (z,) = jax.ffi.ffi_call(_TARGET_DOT, (jax.ShapeDtypeStruct((b, n * (n - 1) // 2), jnp.float32),))(
        t, threads=np.int64(max(1, int(threads))))
    return z


def dot_interaction_grad(t: jax.Array, g: jax.Array, *, threads: int = 1) -> jax.Array:
    """f32[B, N, D]: the gradient of `sum(dot_interaction(t) * g)` with respect
    to t: row i gets `sum_{j != i} g[p(i, j)] t_j`, summed over j in order."""
    t = _interaction_input(t)
    b, n, _ = t.shape
    if g.shape != (b, n * (n - 1) // 2):
        raise TypeError(f"g must be f32[{b}, {n * (n - 1) // 2}], got {list(g.shape)}")
    (dt,) = jax.ffi.ffi_call(_TARGET_DOT_GRAD, (jax.ShapeDtypeStruct(t.shape, jnp.float32),))(
        t, jnp.asarray(g, jnp.float32), threads=np.int64(max(1, int(threads))))
    return dt


__all__ = ["available", "dot_interaction", "dot_interaction_grad", "host_cores", "isa", "unavailable_reason", "library_path", "pooled_lookup",
           "row_send", "send_keys", "sparse_update"]
