"""16-bit (bf16 / f16) tables in the C++ CPU kernels: the sparse update is the
f32 kernel's step on the widened row, rounded back exactly as
`precision.stochastic_round` with `precision.sr_bits` (bit for bit), and the
pooled lookup is the f32 sum of the widened rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jdmt import precision
from jdmt.embeddings import cpu_kernels, routing

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")

KINDS = ["rowwise_adagrad", "adagrad", "sgd"]
DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16}
EPS = 1e-8


@functools.cache
def _kernel(kind, threads):
    return jax.jit(lambda t, a, i, s, g, lr, seed: cpu_kernels.sparse_update(
        kind, t, a, i, s, g, lr, eps=EPS, threads=threads, seed=seed))


@functools.cache
def _rounding(dtype):
    def f(new32, rows, seed):
        bits = precision.sr_bits(seed, rows[:, None], jnp.arange(new32.shape[1])[None, :])
        return precision.stochastic_round(new32[rows], dtype, bits)
    return jax.jit(f)


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _accum(rng, kind, rows, dim):
    if kind == "sgd":
        return None
    shape = (rows,) if kind == "rowwise_adagrad" else (rows, dim)
    return (0.1 + rng.random(shape)).astype(np.float32)


def _check(kind, table, acc, ids, src, grads, lr, seed, threads):
    """The kernel on the 16-bit `table` against the f32 kernel on the widened
    table followed by `precision.stochastic_round` of the touched rows."""
    dtype = table.dtype
    seed = np.uint32(seed)
    got_t, got_a = _kernel(kind, threads)(table, acc, ids, src, grads, lr, seed)
    wide = jnp.asarray(table).astype(jnp.float32)
    new32, ref_a = _kernel(kind, 1)(wide, acc, ids, src, grads, lr, None)
    ids2, src2 = np.asarray(ids).reshape(-1), np.asarray(src).reshape(-1)
    ok = (ids2 >= 0) & (ids2 < table.shape[0]) & (src2 >= 0) & (src2 < grads.shape[-2])
    rows = np.unique(ids2[ok]).astype(np.int32)
    want = np.array(table)
    want[rows] = np.asarray(_rounding(dtype)(new32, rows, seed))
    got_t = np.asarray(got_t)
    assert got_t.dtype == dtype
    bad = np.argwhere(_bits(got_t) != _bits(want))
    assert bad.size == 0, (f"{bad.shape[0]} elements differ, first {bad[:3].tolist()}: "
                           f"got {got_t[tuple(bad[0])]} want {want[tuple(bad[0])]} "
                           f"(f32 {np.asarray(new32)[tuple(bad[0])]!r})")
    if acc is None:
        assert got_a is None
    else:
        np.testing.assert_array_equal(_bits(got_a), _bits(ref_a))
    return rows, got_t


def _table(rng, dtype, rows, dim):
    """Rows of very different scales (f16: subnormal to near the largest
    finite), a few inf / NaN."""
    scale = 2.0 ** rng.integers(-22, 13, size=(rows, 1))
    t = (rng.normal(size=(rows, dim)) * scale).astype(np.float32)
    t[3, :3] = [np.inf, -np.inf, np.nan]
    return t.astype(dtype)


def _grads(rng, k, g, dim):
    scale = 2.0 ** rng.integers(-20, 6, size=(k, g, 1))
    out = (rng.normal(size=(k, g, dim)) * scale).astype(np.float32)
    out[:, 1] *= 1e5  # past the largest f16 (saturates)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_update_matches_reference_bit_for_bit(dtype, kind):
    dtype = DTYPES[dtype]
    rng = np.random.default_rng([KINDS.index(kind), dtype == jnp.float16])
    rows, dim, n = 64, 19, 300
    for k in (1, 2):
        table = _table(rng, dtype, rows, dim)
        acc = _accum(rng, kind, rows, dim)
        # each slot its own rows (few: many duplicates), plus ids outside [0, R) and -1
        per = rows // k
        ids = (rng.integers(0, per // 2, size=(k, n)) + per * np.arange(k)[:, None]).astype(np.int32)
        ids[:, 0] = per * np.arange(k) + 3  # the row with inf / NaN (slot 0)
        ids[:, 1:6] = [-1, rows, rows + 7, 2**31 - 1, -5]
        ids[rng.random(ids.shape) < 0.1] = -1
        g = n // 2
        src = rng.integers(0, g, size=(k, n)).astype(np.int32)
        src[:, 7] = -1  # a gradient row outside [0, G): skipped
        src[:, 8] = g
        grads = _grads(rng, k, g, dim)
        for threads in (1, 3):
            for seed in (0, 0xDEADBEEF):
                touched, _ = _check(kind, table, acc, ids, src, grads, 0.05, seed, threads)
        assert touched.size > 10 and 3 in touched


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_update_split_over_threads(dtype, kind):
    """One slot of enough ids to be split by row range over the threads."""
    dtype = DTYPES[dtype]
    rng = np.random.default_rng([7, KINDS.index(kind), dtype == jnp.float16])
    rows, dim, n = 6000, 8, 40_000
    table = _table(rng, dtype, rows, dim)
    acc = _accum(rng, kind, rows, dim)
    ids = rng.integers(-1, rows + 2, size=(1, n)).astype(np.int32)
    ids[0, ::4] = rng.integers(0, 40, size=ids[0, ::4].shape)  # hot rows
    src = np.arange(n, dtype=np.int32)[None]
    grads = (rng.normal(size=(1, n, dim)) * 1e-3).astype(np.float32)
    _check(kind, table, acc, ids, src, grads, 0.05, 12345, 3)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rounding_of_special_values(dtype):
    """SGD with lr 1 from a zero row writes -grad exactly (new32 = x), so the
    rounding of chosen f32 values is checked: ties to neighbours, f16
    subnormals and their boundary, values past the largest f16, inf, NaN
    payloads, signed zeros, f32 subnormals."""
    dtype = DTYPES[dtype]
    rng = np.random.default_rng(5)
    special = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.0, 65520.0, 65536.0, -7e4, 1e30,
                        2.0**-14, 2.0**-14 * 1.5, 2.0**-15, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                        -2.0**-24 * 0.75, 1e-40, -1e-40, 2.0**-126, 3e38, -3.4e38,
                        np.inf, -np.inf, np.nan], np.float32)
    nans = np.array([0x7F800001, 0xFFC00000, 0x7FA00001, 0xFF812345, 0x7FFFFFFF],
                    np.uint32).view(np.float32)
    # random mantissas, exponents 2^-30 .. 2^17, both signs
    e = rng.integers(127 - 30, 127 + 18, size=600).astype(np.uint32)
    r = (e << 23) | rng.integers(0, 1 << 23, size=600).astype(np.uint32)
    r |= (rng.random(600) < 0.5).astype(np.uint32) << 31
    x = np.concatenate([special, nans, r.view(np.float32)])
    rows = 4
    table = np.zeros((rows, x.size), dtype)
    grads = np.stack([-x, -x[::-1], -np.roll(x, 7), -np.roll(x, 100)])[None].astype(np.float32)
    ids = np.arange(rows, dtype=np.int32)[None]
    for seed in (1, 2, 3):
        _check("sgd", table, None, ids, ids, grads, 1.0, seed, 1)
    # inf, NaN (payload) kept; above the largest f16: saturated
    got = _bits(_check("sgd", table, None, ids, ids, grads, 1.0, 4, 1)[1])[0].copy()
    got[24] &= 0x7FFF  # (a NaN's sign is the arithmetic's)
    want = ([0x7C00, 0xFC00, 0x7E00, 0x7BFF, 0xFBFF, 0x7BFF] if dtype == jnp.float16
            else [0x7F80, 0xFF80, 0x7FC0, None, None, None])
    for i, w in zip([22, 23, 24, 7, 8, 9], want):
        if w is not None:
            assert got[i] == w, (i, hex(got[i]), hex(w))


def _write(dtype, x, seed, threads=1):
    """SGD (lr 1) of -x into zero rows: new32 = x; the kernel's rows, checked
    against the reference."""
    rows = x.shape[0]
    ids = np.arange(rows, dtype=np.int32)[None]
    grads = (-x)[None].astype(np.float32)
    return _check("sgd", np.zeros(x.shape, dtype), None, ids, ids, grads, 1.0, seed, threads)[1]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rounding_thresholds(dtype):
    """Values exactly on each element's random threshold and just past it:
    f16 rounds up only where u < q - floor(q) (strictly), bf16 where the
    added bits carry."""
    dtype = DTYPES[dtype]
    rng = np.random.default_rng(13)
    rows, dim, seed = 8, 256, np.uint32(99)
    h = np.asarray(precision.sr_bits(seed, np.arange(rows)[:, None], np.arange(dim)[None, :]))
    above = rng.random((rows, dim)) < 0.5
    neg = rng.random((rows, dim)) < 0.5
    if dtype == jnp.float16:
        u = (h >> 8).astype(np.float64)
        x = (u + above) * 2.0**-48  # q = x * 2^24 = u / 2^24 (+ 2^-24 above): below 2^-24, exact
        want = above.astype(np.uint16)  # 2^-24 or 0
    else:
        t = (h >> 16).astype(np.uint32)
        hi = rng.integers(0x0080, 0x7F7F, size=(rows, dim)).astype(np.uint32)
        low = np.where(above, (0x10000 - t) & 0xFFFF, 0xFFFF - t)
        x = ((hi << 16) | low).view(np.float32).astype(np.float64)
        want = (hi + (above & (t > 0))).astype(np.uint16)
    x = np.where(neg, -x, x).astype(np.float32)
    want = want | np.where(neg & (x != 0), 0x8000, 0).astype(np.uint16)
    got = _write(dtype, x, seed)
    np.testing.assert_array_equal(_bits(got), want)
    assert 0.4 < above.mean() < 0.6


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rounding_is_unbiased(dtype):
    """Steps below half a 16-bit ulp, a new seed each step: the row moves on
    average by the sum of the steps (round-to-nearest would not move it)."""
    dtype = DTYPES[dtype]
    ulp = 2.0**-7 if dtype == jnp.bfloat16 else 2.0**-10  # in [1, 2)
    dim, steps, frac = 512, 200, 0.1
    delta = np.float32(frac * ulp)
    table = jnp.full((2, dim), 1.5, dtype)
    ids = jnp.array([[1]], jnp.int32)
    grads = jnp.full((1, 1, dim), -delta, jnp.float32)  # w += -(lr * g) = delta

    @jax.jit
    def walk(t):
        def body(i, t):
            seed = precision.update_seed(i, 0, 0)
            return cpu_kernels.sparse_update("sgd", t, None, ids, ids * 0, grads, 1.0, seed=seed)[0]
        return lax.fori_loop(0, steps, body, t)

    out = np.asarray(walk(table)).astype(np.float64)
    np.testing.assert_array_equal(out[0], 1.5)  # untouched
    moved = (out[1] - 1.5) / ulp  # in ulps; expected steps * frac = 20
    # each step's rounding error has mean 0 and variance <= ulp^2 / 4
    std = np.sqrt(steps / 4 / dim)
    assert abs(moved.mean() - steps * frac) < 5 * std, (moved.mean(), std)
    assert np.all(np.abs(moved - steps * frac) < 6 * np.sqrt(steps / 4) + 1)
    assert len(np.unique(moved)) > 3  # columns round differently


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_pooled_lookup(dtype):
    dtype = DTYPES[dtype]
    rng = np.random.default_rng(9)
    rows, dim = 3000, 24
    table = jnp.asarray(rng.normal(size=(rows, dim)).astype(np.float32) * 10, dtype)
    wide = table.astype(jnp.float32)
    ids = rng.integers(0, rows, (8192, 9)).astype(np.int32)
    ids[rng.random(ids.shape) < 0.2] = -1
    ids[rng.random(ids.shape) < 0.02] = rows + 5
    ids[:, 0][rng.random(ids.shape[0]) < 0.1] = 2**31 - 1
    ids[5] = -1  # an empty bag
    want = np.asarray(jax.jit(routing.pool_rows)(wide, ids))
    f32 = np.asarray(cpu_kernels.pooled_lookup(wide, ids))
    for threads in (1, 4):  # 4: split over threads
        got = jax.jit(lambda t, i, n=threads: cpu_kernels.pooled_lookup(t, i, threads=n))(table, ids)
        assert got.dtype == jnp.float32 and got.shape == (8192, dim)
        np.testing.assert_array_equal(_bits(got), _bits(want))
        np.testing.assert_array_equal(_bits(got), _bits(f32))
    assert not np.asarray(got)[5].any()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_widening_every_16_bit_pattern(dtype):
    """Each of the 65536 16-bit values (subnormals, inf, NaN payloads) widens
    as XLA widens it."""
    dtype = DTYPES[dtype]
    table = jnp.asarray(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)[:, None])
    ids = np.arange(1 << 16, dtype=np.int32)[:, None]
    got = cpu_kernels.pooled_lookup(table, ids, threads=2)
    want = jax.jit(lambda t: t.astype(jnp.float32))(table)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_f32_tables_ignore_the_seed():
    rng = np.random.default_rng(3)
    table = rng.normal(size=(20, 8)).astype(np.float32)
    ids = rng.integers(0, 20, (1, 50)).astype(np.int32)
    src = np.arange(50, dtype=np.int32)[None]
    grads = rng.normal(size=(1, 50, 8)).astype(np.float32)
    a = _kernel("sgd", 1)(table, None, ids, src, grads, 0.1, None)[0]
    b = _kernel("sgd", 1)(table, None, ids, src, grads, 0.1, 77)[0]
    np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_half_table_without_seed_raises(dtype):
    t = jnp.zeros((10, 4), DTYPES[dtype])
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(TypeError, match="seed"):
        cpu_kernels.sparse_update("sgd", t, None, ids, ids, jnp.zeros((1, 4, 4)), 0.1)
    with pytest.raises(TypeError, match="seed"):
        cpu_kernels.sparse_update("adagrad", t, jnp.zeros((10, 4)), ids, ids, jnp.zeros((1, 4, 4)),
                                  0.1, eps=1e-8)
    with pytest.raises(TypeError):  # f64 / int tables are not storage types
        cpu_kernels.pooled_lookup(jnp.zeros((10, 4), jnp.int32), ids)
