"""Half-precision tables: 16-bit rows, f32 optimizer math, stochastic rounding.

With `table_dtype="bf16"` or `"f16"` the storage buffers hold 16-bit rows
(half the bytes per lookup and per table); the optimizer state stays f32.
A lookup widens each row to f32 as it is read (pooled sums and the rows
that travel are f32). An update reads the row, applies the optimizer in
f32 exactly as for an f32 table, and writes the result rounded
*stochastically* to 16 bits, as FBGEMM does for its FP16 weights: the value
goes to one of its two 16-bit neighbours with probabilities that make the
rounding unbiased, so updates smaller than half a 16-bit ulp still move the
row on average instead of being lost.

The state stores 16-bit rows as their bit patterns, bf16 as uint16 and f16
as int16 (`storage_dtype`): XLA:CPU has no 16-bit gather or scatter and
would widen the whole table around each. `widen` reads stored rows as f32,
`round_stored` writes f32 values back, `decode_host` / `encode_host` convert
host copies (checkpoints, `to_dense`).

The random bits are a counter-based hash of (seed, row, column): the same
bits in XLA (`stochastic_round`) and in the C++ kernel
(`cpu_kernels/sparse_update.cc`), so both paths write the same bits. The
caller passes a new seed every step (the trainer passes the step count
mixed with the storage and device, `update_seed`); a fixed seed would give
every element the same threshold each step and bias it.

The rounding, for an f32 value x and 32 random bits h:

- bf16: add the top 16 bits of h to x's bit pattern and truncate the low 16
  bits (a carry moves x to the upper neighbour).
- f16: the f16 ulp at |x| is 2^k, k = max(e, -14) - 10 (e: |x|'s binary
  exponent; below 2^-14 the subnormal ulp 2^-24); q = |x| / 2^k is exact,
  and |x| rounds to 2^k * (floor(q) + [u < q - floor(q)]) with
  u = (h >> 8) / 2^24, x's sign kept. |x| above the largest f16 (65504)
  saturates there; inf and NaN stay as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["TABLE_DTYPES", "decode_host", "dtype_name", "encode", "encode_host", "is_half", "is_stored_half",
           "logical_dtype", "mix32", "resolve_dtype", "round_stored", "sr_bits", "stochastic_round", "storage_dtype",
           "update_seed", "widen"]

TABLE_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
"""The storage types a table may have (`--table-dtype`)."""

_F16_MAX = 65504.0


def resolve_dtype(name) -> jnp.dtype:
    """The numpy dtype of a table type name ("f32", "bf16", "f16") or dtype."""
    if isinstance(name, str):
        if name not in TABLE_DTYPES:
            raise ValueError(f"table dtype must be one of {sorted(TABLE_DTYPES)}, got {name!r}")
        return jnp.dtype(TABLE_DTYPES[name])
    dt = jnp.dtype(name)
    if dt not in [jnp.dtype(v) for v in TABLE_DTYPES.values()]:
        raise ValueError(f"table dtype must be f32, bf16 or f16, got {dt}")
    return dt


def dtype_name(dtype) -> str:
    """"f32", "bf16" or "f16" (of a logical or a stored type)."""
    dt = logical_dtype(dtype)
    return {jnp.dtype(v): k for k, v in TABLE_DTYPES.items()}[dt]


def is_half(dtype) -> bool:
    """A 16-bit table type, logical (bf16, f16) or stored (uint16, int16)."""
    return jnp.dtype(dtype) in _STORAGE or jnp.dtype(dtype) in _LOGICAL


def is_stored_half(dtype) -> bool:
    """A table stored as 16-bit bit patterns (uint16, int16): updated with
    stochastic rounding. (A bf16- or f16-typed array is not: the Pallas
    kernels and their references update those with round-to-nearest.)"""
    return jnp.dtype(dtype) in _LOGICAL


_STORAGE = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16), jnp.dtype(jnp.float16): jnp.dtype(jnp.int16)}
_LOGICAL = {v: k for k, v in _STORAGE.items()}


def _u32(v) -> jax.Array:
    return jnp.asarray(v).astype(jnp.uint32)


def mix32(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a fast, well-mixing bijection on uint32
    (the random bits here and `layout.hash_uniform`'s initial values)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def sr_bits(seed, row, col) -> jax.Array:
    """u32 random bits of element (row, col) under `seed` (broadcasting)."""
    h = mix32(_u32(seed) ^ (_u32(row) * jnp.uint32(0x632BE5AB)))
    return mix32(h + _u32(col) * jnp.uint32(0x85157AF5))


def update_seed(step, storage: int, device) -> jax.Array:
    """The seed of one storage buffer's update in one step: distinct per
    step, per storage buffer and per device (replicated buffers pass the same
    `device` on every replica, so replicas round alike)."""
    h = mix32(_u32(step) * jnp.uint32(0x9E3779B9) + _u32(storage))
    return mix32(h ^ (_u32(device) * jnp.uint32(0x27D4EB2F)))


def storage_dtype(dtype) -> jnp.dtype:
    """What a table of `dtype` is stored as: f32, or the bit patterns of a
    16-bit type (bf16 as uint16, f16 as int16).

    XLA:CPU has no bf16/f16 gather or scatter: on a bf16 table it widens the
    whole table to f32 and back around each one (a table-sized copy every
    step), and a bitcast to u16 around them is a copy too. Integer gathers
    and scatters run in place, so 16-bit tables live as integers, and the
    integer type says which 16-bit format the bits are (one array carries
    its own meaning through every route and kernel)."""
    dt = resolve_dtype(dtype) if isinstance(dtype, str) else jnp.dtype(dtype)
    if dt in _STORAGE:
        return _STORAGE[dt]
    if dt in _LOGICAL or dt == jnp.dtype(jnp.float32):
        return dt
    raise ValueError(f"no table storage for {dt}")


def logical_dtype(dtype) -> jnp.dtype:
    """The value type of a table stored as `dtype` (the inverse of `storage_dtype`)."""
    dt = jnp.dtype(dtype)
    return _LOGICAL.get(dt, dt)


def encode(x: jax.Array, dtype) -> jax.Array:
    """f32 values as a table of logical `dtype` stores them (round to nearest)."""
    dt = resolve_dtype(dtype) if isinstance(dtype, str) else jnp.dtype(dtype)
    if not is_half(dt):
        return x.astype(jnp.float32)
    return lax.bitcast_convert_type(x.astype(logical_dtype(dt)), storage_dtype(dt))


def widen(stored: jax.Array) -> jax.Array:
    """f32 values of stored table rows (exact; f32 rows pass through)."""
    dt = jnp.dtype(stored.dtype)
    if dt == jnp.dtype(jnp.uint16):  # bf16 bits: the top half of an f32
        return lax.bitcast_convert_type(stored.astype(jnp.uint32) << 16, jnp.float32)
    if dt == jnp.dtype(jnp.int16):
        return lax.bitcast_convert_type(stored, jnp.float16).astype(jnp.float32)
    return stored.astype(jnp.float32)


def round_stored(x: jax.Array, dtype, bits: jax.Array) -> jax.Array:
    """`stochastic_round` of f32 `x` into a table stored as `dtype`."""
    dt = jnp.dtype(dtype)
    if not is_stored_half(dt):
        return x.astype(dt)
    return lax.bitcast_convert_type(stochastic_round(x, logical_dtype(dt), bits), storage_dtype(dt))


def decode_host(a: np.ndarray) -> np.ndarray:
    """Host f32 values of a host copy of a stored table (any storage type)."""
    a = np.asarray(a)
    dt = jnp.dtype(a.dtype)
    if dt in _LOGICAL:
        return a.view(_LOGICAL[dt]).astype(np.float32)
    return a.astype(np.float32)


def encode_host(a: np.ndarray, dtype) -> np.ndarray:
    """Host f32 values as a table of logical `dtype` stores them (round to nearest)."""
    dt = resolve_dtype(dtype) if isinstance(dtype, str) else jnp.dtype(dtype)
    if not is_half(dt):
        return np.asarray(a, np.float32)
    return np.asarray(a, np.float32).astype(logical_dtype(dt)).view(storage_dtype(dt))


def _pow2(k: jax.Array) -> jax.Array:
    """2.0 ** k as f32 for integer k in the normal range, built from bits."""
    return lax.bitcast_convert_type(((k + 127).astype(jnp.uint32) << 23), jnp.float32)


def stochastic_round(x: jax.Array, dtype, bits: jax.Array) -> jax.Array:
    """x (f32) rounded stochastically to `dtype` with random u32 `bits` of x's
    shape (see the module docstring); an f32 `dtype` returns x."""
    dtype = jnp.dtype(dtype)
    x = x.astype(jnp.float32)
    if dtype == jnp.dtype(jnp.float32):
        return x
    if dtype == jnp.dtype(jnp.bfloat16):
        b = lax.bitcast_convert_type(x, jnp.uint32)
        b = (b + (bits >> 16)) & jnp.uint32(0xFFFF0000)
        y = lax.bitcast_convert_type(b, jnp.float32)
        y = jnp.where(jnp.isfinite(x), y, x)  # no carry out of inf or NaN
        return y.astype(jnp.bfloat16)
    if dtype != jnp.dtype(jnp.float16):
        raise ValueError(f"stochastic rounding is to bf16 or f16, not {dtype}")
    a = jnp.minimum(jnp.abs(x), jnp.float32(_F16_MAX))
    e = (lax.bitcast_convert_type(a, jnp.uint32) >> 23).astype(jnp.int32) - 127
    k = jnp.maximum(e, -14) - 10
    q = a * _pow2(-k)
    fl = jnp.floor(q)
    u = (bits >> 8).astype(jnp.float32) * jnp.float32(1.0 / (1 << 24))
    r = fl + jnp.where(u < q - fl, jnp.float32(1.0), jnp.float32(0.0))
    y = r * _pow2(k)
    y = jnp.where(x < 0, -y, y)
    y = jnp.where(jnp.isfinite(x), y, x)
    return y.astype(jnp.float16)
