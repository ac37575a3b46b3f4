"""The C++ FFI kernels against the XLA path: the sparse update (`optimizers.sparse_step`)
and the pooled lookup (`routing.pool_rows`)."""

import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jdmt.embeddings import cpu_kernels, optimizers
from jdmt.embeddings.cpu_kernels import build
from jdmt.embeddings.types import OptimizerKind, SparseOptimizer
from jdmt.mesh import DEVICES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KINDS = ["rowwise_adagrad", "adagrad", "sgd"]


@pytest.fixture(autouse=True)
def _kernels(request):
    if request.node.name.startswith("test_build"):
        return  # needs no kernel
    if not cpu_kernels.available():
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")


def _opt(kind):
    return SparseOptimizer(kind=kind, lr=0.05, eps=1e-8, initial_accumulator=0.1)


def _state(rng, opt, rows, dim):
    table = rng.normal(size=(rows, dim)).astype(np.float32)
    acc = optimizers.init_accumulator(opt, rows, dim)
    if acc is not None:  # non-uniform state, so every row's step differs
        acc = np.asarray(acc) + rng.random(acc.shape).astype(np.float32)
    return table, acc


def _flat(ids, grads):
    """Slot-layout ids i32[K, M, L] and gradients f32[K, M, D] (a bag's ids
    share its row) or f32[K, M, L, D] -> (rows i32[n], src i32[n], f32[n', D])."""
    k, m, ln = ids.shape
    if grads.ndim == 3:
        src, g = np.repeat(np.arange(k * m), ln), grads.reshape(k * m, -1)
    else:
        src, g = np.arange(k * m * ln), grads.reshape(k * m * ln, -1)
    return ids.reshape(-1), src.astype(np.int32), g


def _slots(ids, grads):
    """The same as K independent slots: (rows i32[K, n], src i32[K, n], f32[K, G, D])."""
    k, m, ln = ids.shape
    if grads.ndim == 3:
        src, g = np.tile(np.repeat(np.arange(m), ln), (k, 1)), grads
    else:
        src, g = np.tile(np.arange(m * ln), (k, 1)), grads.reshape(k, m * ln, -1)
    return ids.reshape(k, -1), src.astype(np.int32), g


def _xla(opt, table, acc, ids, grads, base=None, max_rows=None, lr=0.05):
    f = jax.jit(lambda t, a, i, s, g, lr: optimizers.sparse_step(opt, t, a, i, s, g, lr=lr)[:2])
    return f(table, acc, *_flat(np.asarray(ids), np.asarray(grads)), lr)


def _ffi(opt, table, acc, ids, grads, base=None, max_rows=None, lr=0.05, threads=1):
    f = jax.jit(lambda t, a, i, s, g, lr: cpu_kernels.sparse_update(
        opt.kind, t, a, i, s, g, lr, eps=opt.eps, threads=threads))
    return f(table, acc, *_slots(np.asarray(ids), np.asarray(grads)), lr)


def _compare(ref, out, table, acc):
    """allclose to the XLA path; untouched rows bit-identical; returns bit-exact."""
    exact = True
    for r, o, before in zip(ref, out, (table, acc)):
        if r is None:
            assert o is None
            continue
        r, o = np.asarray(r), np.asarray(o)
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=1e-7)
        same = np.all(r == before, axis=tuple(range(1, r.ndim))) if r.ndim > 1 else r == before
        np.testing.assert_array_equal(o[same], np.asarray(before)[same])  # untouched rows
        exact &= bool(np.array_equal(r, o))
    return exact


def _ids(rng, k, m, ln, rows, base, p_none=0.2):
    ids = rng.integers(0, rows, size=(k, m, ln)) + np.asarray(base)[:, None, None]
    ids[rng.random(ids.shape) < p_none] = -1
    return ids.astype(np.int32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "sequence"])
@pytest.mark.parametrize("dim", [13, 64])
def test_matches_xla(kind, pooled, dim):
    rng = np.random.default_rng([KINDS.index(kind), pooled, dim])
    k, m, ln, rows = 3, 48, 5, 40  # few rows: many duplicates
    base = np.array([0, rows + 3, 2 * rows + 9], np.int32)  # gaps between tables
    total = 3 * rows + 11
    opt = _opt(kind)
    table, acc = _state(rng, opt, total, dim)
    ids = _ids(rng, k, m, ln, rows, base)
    ids[0, 0, 0], ids[2, -1, -1] = 0, total - 1  # both ends of the shard
    ids[2, 0, :] = base[2] + rows - 1
    grads = rng.normal(size=(k, m, dim) if pooled else (k, m, ln, dim)).astype(np.float32)
    ref = _xla(opt, table, acc, ids, grads, base, rows + 2)
    out = _ffi(opt, table, acc, ids, grads, base, rows + 2)
    exact = _compare(ref, out, table, acc)
    if kind == "sgd":
        assert exact  # plain sums in the same order: identical


@pytest.mark.parametrize("kind", KINDS)
def test_all_duplicates_and_empty(kind):
    rng = np.random.default_rng(1)
    opt = _opt(kind)
    table, acc = _state(rng, opt, 30, 10)
    base = np.array([0, 10, 20], np.int32)
    ids = np.full((3, 16, 4), -1, np.int32)
    ids[0] = 7  # one row, every id
    ids[2, :, 1] = 29  # last row of the shard, a quarter of the ids
    grads = rng.normal(size=(3, 16, 10)).astype(np.float32)
    ref = _xla(opt, table, acc, ids, grads, base, 10)
    out = _ffi(opt, table, acc, ids, grads, base, 10)
    _compare(ref, out, table, acc)
    t = np.asarray(out[0])
    np.testing.assert_array_equal(t[10:20], table[10:20])  # slot 1 empty
    assert not np.array_equal(t[7], table[7]) and not np.array_equal(t[29], table[29])

    # nothing at all: bit-identical state
    none = np.full_like(ids, -1)
    out = _ffi(opt, table, acc, none, grads, base, 10)
    np.testing.assert_array_equal(np.asarray(out[0]), table)
    if acc is not None:
        np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(acc))


def test_out_of_range_ids_never_write():
    rng = np.random.default_rng(2)
    opt = _opt("rowwise_adagrad")
    table, acc = _state(rng, opt, 20, 8)
    ids = np.array([[[20, 25, 2**31 - 1, -5]]], np.int32)
    grads = rng.normal(size=(1, 1, 8)).astype(np.float32)
    out = _ffi(opt, table, acc, ids, grads, np.zeros(1, np.int32), 20)
    np.testing.assert_array_equal(np.asarray(out[0]), table)
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(acc))
    ids = np.array([[[20, 3, 99, 3]]], np.int32)  # valid ones still apply
    ref = _xla(opt, table, acc, ids, grads, np.zeros(1, np.int32), 20)
    _compare(ref, _ffi(opt, table, acc, ids, grads, np.zeros(1, np.int32), 20), table, acc)


def test_wide_keys_and_threads():
    """Rows x positions beyond 32 bits (the uint64 sort) and 2 threads."""
    rng = np.random.default_rng(3)
    opt = _opt("rowwise_adagrad")
    rows, n = 150_000, 1 << 16
    table, acc = _state(rng, opt, 2 * rows, 3)
    base = np.array([0, rows], np.int32)
    ids = (rng.integers(0, rows, size=(2, 1, n)) + base[:, None, None]).astype(np.int32)
    ids[:, 0, :50] = base[:, None] + rows - 1
    grads = rng.normal(size=(2, 1, n, 3)).astype(np.float32)
    ref = _xla(opt, table, acc, ids, grads, base, rows)
    one = _ffi(opt, table, acc, ids, grads, base, rows)
    _compare(ref, one, table, acc)
    two = _ffi(opt, table, acc, ids, grads, base, rows, threads=2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", KINDS)
def test_one_slot_split_over_threads(kind):
    """One slot of enough ids (one storage buffer, as a device has per width)
    is split by row range over the threads: the same bits as one thread."""
    rng = np.random.default_rng(11)
    opt = _opt(kind)
    rows, n = 40_000, 1 << 16
    table, acc = _state(rng, opt, rows, 16)
    ids = rng.integers(0, rows, size=(1, 1, n)).astype(np.int32)
    ids[0, 0, ::5] = rng.integers(0, 50, size=ids[0, 0, ::5].shape)  # hot rows, many duplicates
    ids[0, 0, 7::97] = -1
    grads = rng.normal(size=(1, 1, n, 16)).astype(np.float32)
    one = _ffi(opt, table, acc, ids, grads)
    _compare(_xla(opt, table, acc, ids, grads), one, table, acc)
    for threads in (2, 3):
        for a, b in zip(one, _ffi(opt, table, acc, ids, grads, threads=threads)):
            if a is not None:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_in_place_no_table_copy():
    rows, dim = 1000, 24
    opt = _opt("adagrad")
    f = jax.jit(lambda t, a, i, g, b: cpu_kernels.sparse_update(
        opt.kind, t, a, i, b, g, 0.1, eps=opt.eps), donate_argnums=(0, 1))
    t = jnp.zeros((rows, dim))
    a = jnp.zeros((rows, dim))
    i = jnp.arange(64, dtype=jnp.int32)
    g = jnp.ones((16, dim))
    b = jnp.arange(64, dtype=jnp.int32) // 4  # src: four ids share a gradient row
    hlo = f.lower(t, a, i, g, b).compile().as_text()
    assert "custom-call" in hlo
    assert not re.search(rf"f32\[{rows},{dim}\][^\n]*\bcopy\(", hlo), "table copied"
    before = (t.unsafe_buffer_pointer(), a.unsafe_buffer_pointer())
    t2, a2 = f(t, a, i, g, b)
    assert (t2.unsafe_buffer_pointer(), a2.unsafe_buffer_pointer()) == before
    assert float(t2[0, 0]) != 0.0 and float(t2[999, 0]) == 0.0

    # A step that also reads the table (the lookup) stays in place when the
    # update depends on the reads, as `ShardedEmbeddings.update` arranges.
    def step(t, a, i, g, b):
        out = jnp.take(t, jnp.maximum(i, 0), axis=0).reshape(16, 4, dim).sum(axis=1)
        g = g + (jnp.sum(out) * 0)
        return (*cpu_kernels.sparse_update(opt.kind, t, a, i, b, g, 0.1, eps=opt.eps), out)

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(t2, a2, i, g, b).compile().as_text()
    assert not re.search(rf"f32\[{rows},{dim}\][^\n]*\bcopy\(", hlo), "table copied"


def test_shard_map(mesh24):
    """Inside shard_map on 8 devices: each device updates its own row block."""
    rng = np.random.default_rng(4)
    nd = mesh24.devices.size
    opt = _opt("rowwise_adagrad")
    k, rows, dim, m, ln = 2, 30, 16, 12, 3
    local = k * rows
    table, acc = _state(rng, opt, nd * local, dim)
    base = np.arange(k, dtype=np.int32) * rows
    ids = np.stack([_ids(rng, k, m, ln, rows, base) for _ in range(nd)])  # local ids
    grads = rng.normal(size=(nd, k, m, dim)).astype(np.float32)

    def run(update):
        def body(t, a, i, g):
            return update(t, a, i[0], g[0])

        f = jax.jit(jax.shard_map(body, mesh=mesh24, in_specs=(P(DEVICES),) * 4,
                                  out_specs=(P(DEVICES), P(DEVICES))))
        sh = NamedSharding(mesh24, P(DEVICES))
        args = [jax.device_put(x, sh) for x in (table, acc, ids, grads)]
        return f(*args)

    src = jnp.asarray(np.repeat(np.arange(k * m), ln).astype(np.int32))
    ref = run(lambda t, a, i, g: optimizers.sparse_step(
        opt, t, a, i.reshape(-1), src, g.reshape(k * m, dim), lr=opt.lr)[:2])
    out = run(lambda t, a, i, g: cpu_kernels.sparse_update(
        opt.kind, t, a, i.reshape(-1), src, g.reshape(k * m, dim), opt.lr, eps=opt.eps))
    _compare(ref, out, table, acc)
    assert out[0].sharding.spec == P(DEVICES)


def test_bad_inputs_raise():
    opt = _opt("rowwise_adagrad")
    t = jnp.zeros((10, 4))
    with pytest.raises(TypeError):
        cpu_kernels.sparse_update(opt.kind, t, jnp.zeros((10, 4)), jnp.zeros((1, 4), jnp.int32),
                                  jnp.zeros(1, jnp.int32), jnp.zeros((1, 4, 4)), 0.1, eps=1e-8)
    with pytest.raises(TypeError):  # ids and src of different lengths
        cpu_kernels.sparse_update(opt.kind, t, jnp.zeros(10), jnp.zeros((6,), jnp.int32),
                                  jnp.zeros(4, jnp.int32), jnp.zeros((4, 4)), 0.1, eps=1e-8)
    assert OptimizerKind("sgd") is OptimizerKind.SGD


def test_build_failures_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("JDMT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "_compiler", lambda: None)
    path, why = build.build()
    assert path is None and "no C++ compiler" in why
    monkeypatch.setattr(build, "_compiler", lambda: "/bin/false")
    monkeypatch.setattr(build, "_cache_dirs", lambda: [tmp_path])
    path, why = build.build()
    assert path is None and "compile failed" in why
    assert not list(tmp_path.iterdir())  # no partial library left behind


def test_a_refused_native_build_falls_back_to_the_portable_one(tmp_path, monkeypatch):
    """A compiler that refuses -march=native: the portable library is built,
    and the refusal is remembered (the native build is not tried again)."""
    calls = tmp_path / "calls"
    fake = tmp_path / "fake-c++"
    fake.write_text("#!/bin/sh\n"
                    f"echo \"$*\" >> {calls}\n"
                    "for a in \"$@\"; do [ \"$a\" = -march=native ] && "
                    "{ echo 'error: unknown -march=native' >&2; exit 1; }; done\n"
                    "while [ $# -gt 1 ]; do [ \"$1\" = -o ] && echo lib > \"$2\"; shift; done\n")
    fake.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setattr(build, "_compiler", lambda: str(fake))
    monkeypatch.setattr(build, "_cache_dirs", lambda: [cache])
    path, why = build.build()
    assert why is None and path is not None and "-native-" not in path
    def compiles():
        return [c for c in calls.read_text().splitlines() if " -o " in c] if calls.exists() else []

    assert ["-march=native" in c for c in compiles()] == [True, False]  # refused, then portable
    assert [p.name for p in cache.iterdir() if p.name.endswith(".refused")]
    calls.unlink()
    assert build.build() == (path, None) and not compiles()  # cached, nothing compiled
    # JDMT_CPU_KERNELS_NATIVE=0: the portable build only
    monkeypatch.setenv("JDMT_CPU_KERNELS_NATIVE", "0")
    assert build.build() == (path, None)


def test_native_build_names_the_cpu():
    """The native library's cache name depends on the CPU (a cache shared
    between machines builds one per CPU); the kernels in use say which build."""
    ident = build.cpu_identity()
    assert ident and ident.split(";")[0]
    assert cpu_kernels.isa() in ("native", "portable")
    assert ("-native-" in os.path.basename(cpu_kernels.library_path())) == (cpu_kernels.isa() == "native")


_PORTABLE_CHECK = """
import sys
import numpy as np, jax
from jdmt.embeddings import cpu_kernels
from jdmt.embeddings.types import OptimizerKind
assert cpu_kernels.isa() == "portable", cpu_kernels.isa()
rng = np.random.default_rng(0)
t = rng.normal(size=(300, 24)).astype(np.float32)
acc = rng.random(300).astype(np.float32)
ids = rng.integers(-1, 300, (2000, 5)).astype(np.int32)
g = rng.normal(size=(2000, 24)).astype(np.float32)
src = np.repeat(np.arange(2000), 5).astype(np.int32)
pooled = jax.jit(lambda a, b: cpu_kernels.pooled_lookup(a, b, visit=4))(t, ids)
upd = jax.jit(lambda a, c, i, s, gr: cpu_kernels.sparse_update(
    OptimizerKind.ROWWISE_ADAGRAD, a, c, i, s, gr, 0.05, eps=1e-8))(t, acc, ids.reshape(1, -1), src[None], g[None])
np.savez(sys.argv[1], t=t, acc=acc, ids=ids, g=g, src=src,
         pooled=np.asarray(pooled), table=np.asarray(upd[0]), accum=np.asarray(upd[1]))
"""


def test_the_portable_build_gives_the_same_bits(tmp_path):
    """JDMT_CPU_KERNELS_NATIVE=0 builds the portable library; its lookup and
    row-wise Adagrad update equal those of the build in use (native where the
    compiler allows) bit for bit."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JDMT_CPU_KERNELS_NATIVE="0")
    out = tmp_path / "portable.npz"
    r = subprocess.run([sys.executable, "-c", _PORTABLE_CHECK, str(out)], capture_output=True, text=True,
                       env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(out)
    t, acc, ids, g, src = (got[k] for k in ("t", "acc", "ids", "g", "src"))  # the portable run's inputs
    np.testing.assert_array_equal(got["pooled"], np.asarray(jax.jit(cpu_kernels.pooled_lookup)(t, ids)))
    table, accum = jax.jit(lambda a, c, i, s, gr: cpu_kernels.sparse_update(
        OptimizerKind.ROWWISE_ADAGRAD, a, c, i, s, gr, 0.05, eps=1e-8))(t, acc, ids.reshape(1, -1), src[None], g[None])
    np.testing.assert_array_equal(got["table"], np.asarray(table))
    np.testing.assert_array_equal(got["accum"], np.asarray(accum))


def test_a_failed_build_warns_once_and_the_run_uses_xla(tmp_path):
    """No working compiler: train.py warns once naming the cause, says
    `kernels xla` and trains."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JDMT_CACHE_DIR=str(tmp_path), CXX="false",
               PATH=str(tmp_path))  # `false` is found (below), g++/c++/clang++ are not
    (tmp_path / "false").write_text("#!/bin/sh\necho 'cc1plus: fatal error: no space left' >&2\nexit 1\n")
    (tmp_path / "false").chmod(0o755)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--mesh=1x2", "--steps=2",
                        "--batch-size=64", "--eval-batches=1", "--embedding-dim=4", "--bottom-mlp=8",
                        "--top-mlp=8", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if "could not be built" in ln]
    assert len(warned) == 1 and "compile failed" in warned[0], r.stderr
    assert "kernels xla" in r.stderr and "cpu_update" not in r.stderr


CROSS = shutil.which("aarch64-linux-gnu-g++")


@pytest.mark.skipif(CROSS is None, reason="no aarch64 cross compiler (Debian: g++-aarch64-linux-gnu)")
def test_the_kernels_build_for_aarch64(tmp_path):
    """The same source and flags build for aarch64 (x86-only code is behind
    the preprocessor; FMA is in aarch64's base ISA)."""
    out = tmp_path / "k.so"
    r = subprocess.run([CROSS, *build.FLAGS, "-I", jax.ffi.include_dir(), str(build.SOURCE), "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes()[:4] == b"\x7fELF" and out.read_bytes()[18] == 183  # e_machine EM_AARCH64


@pytest.mark.parametrize("pooling,dim", [(1, 4), (5, 64), (17, 100), (40, 16)])
def test_pooled_lookup_matches_xla_bit_for_bit(pooling, dim):
    from jdmt.embeddings import routing

    rng = np.random.default_rng(pooling * dim)
    rows = 3000
    table = rng.normal(size=(rows, dim)).astype(np.float32)
    ids = rng.integers(0, rows, (3, 700, pooling)).astype(np.int32)
    ids[rng.random(ids.shape) < 0.2] = -1  # no id
    ids[1, 7] = -1  # an empty bag: zeros
    got = np.asarray(jax.jit(lambda t, i: cpu_kernels.pooled_lookup(t, i))(table, ids))
    want = np.asarray(jax.jit(routing.pool_rows)(table, ids))
    np.testing.assert_array_equal(got, want)
    assert got.shape == (3, 700, dim) and not got[1, 7].any()
    # split over threads (enough ids per thread to split): the same bits
    big = rng.integers(-1, rows, (40_000, pooling)).astype(np.int32)
    one = np.asarray(jax.jit(lambda t, i: cpu_kernels.pooled_lookup(t, i, threads=1))(table, big))
    two = np.asarray(jax.jit(lambda t, i: cpu_kernels.pooled_lookup(t, i, threads=3))(table, big))
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, np.asarray(jax.jit(routing.pool_rows)(table, big)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_update_with_per_id_scales(kind, threads):
    """Weighted bags: each id's gradient is its bag's row times its own scale.
    The C++ update equals the XLA path (and numpy); scales of 1 give the
    unscaled update bit for bit."""
    rng = np.random.default_rng(5)
    opt = _opt(kind)
    table, acc = _state(rng, opt, 400, 8)
    ids = _ids(rng, 1, 20_000, 4, 400, [0])  # [1, M, L]: enough ids to split over threads
    grads = rng.normal(size=(1, 20_000, 8)).astype(np.float32)
    rows, src, g = _flat(ids, grads)
    scale = rng.normal(size=rows.shape).astype(np.float32)
    xla = jax.jit(lambda t, a, c: optimizers.sparse_step(opt, t, a, jnp.asarray(rows), jnp.asarray(src),
                                                         jnp.asarray(g), lr=0.05, scale=c)[:2])
    cpu = jax.jit(lambda t, a, c: cpu_kernels.sparse_update(opt.kind, t, a, rows, src, g, 0.05, eps=opt.eps,
                                                            threads=threads, scale=c))
    _compare(xla(table, acc, scale), cpu(table, acc, scale), table, acc)
    # against numpy's sum of scaled gradients (SGD: the update is the sum)
    if kind == "sgd":
        want = table.astype(np.float64).copy()
        ok = rows >= 0
        np.add.at(want, rows[ok], -0.05 * g[src[ok]] * scale[ok, None])
        np.testing.assert_allclose(np.asarray(cpu(table, acc, scale)[0]), want, rtol=1e-5, atol=1e-5)
    ones = jnp.ones(rows.shape, jnp.float32)
    plain = jax.jit(lambda t, a: cpu_kernels.sparse_update(opt.kind, t, a, rows, src, g, 0.05, eps=opt.eps,
                                                           threads=threads))
    for x, y in zip(cpu(table, acc, ones), plain(table, acc)):
        if x is not None:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(TypeError, match="scale"):
        cpu_kernels.sparse_update(opt.kind, jnp.asarray(table), None if acc is None else jnp.asarray(acc),
                                  rows, src, g, 0.05, scale=ones[:5])


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_weighted_pooled_lookup_matches_xla_and_numpy(dtype):
    """Per-sample weights: each row times its weight, summed in position
    order; the C++ kernel equals numpy's float32 sum exactly (multiply, then
    add) and XLA's within rounding; threads and visit order change nothing."""
    from jdmt import precision
    from jdmt.embeddings import routing

    rng = np.random.default_rng(11)
    table = rng.normal(size=(900, 24)).astype(np.float32)
    ids = rng.integers(-1, 900, (30_000, 6)).astype(np.int32)
    w = np.where(ids >= 0, rng.normal(size=ids.shape), 0).astype(np.float32)
    stored = table
    if dtype == "bf16":
        stored = precision.encode_host(table, "bf16")
        table = precision.decode_host(stored)
    rows = np.where(ids[..., None] >= 0, table[np.maximum(ids, 0)], 0)
    want = np.zeros((ids.shape[0], 24), np.float32)
    for p in range(ids.shape[1]):  # in order, each product rounded to f32
        want = want + (rows[:, p] * w[:, p, None]).astype(np.float32)
    got = np.asarray(jax.jit(lambda t, i, w: cpu_kernels.pooled_lookup(t, i, weights=w, threads=3))(
        stored, ids, w))
    np.testing.assert_array_equal(got, want)
    seen = np.asarray(jax.jit(lambda t, i, w: cpu_kernels.pooled_lookup(t, i, weights=w, visit=5))(
        stored, ids, w))
    np.testing.assert_array_equal(seen, got)
    xla = np.asarray(jax.jit(lambda t, i, w: routing.pool_rows(t, i, weights=w))(jnp.asarray(table), ids, w))
    np.testing.assert_allclose(xla, got, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        cpu_kernels.pooled_lookup(jnp.asarray(stored), ids, weights=w[:, :3])


@pytest.mark.parametrize("threads", [1, 3])
def test_pooled_lookup_visits_table_by_table(threads):
    """visit=K: bags of N samples x K tables (bag j * K + k) visited table by
    table give the in-order lookup's rows, bit for bit, in the same places."""
    from jdmt.embeddings import routing

    rng = np.random.default_rng(3)
    table = rng.normal(size=(500, 16)).astype(np.float32)
    k, n = 5, 8000
    ids = rng.integers(-1, 500, (n * k, 4)).astype(np.int32)
    plain = np.asarray(jax.jit(lambda t, i: cpu_kernels.pooled_lookup(t, i, threads=threads))(table, ids))
    seen = np.asarray(jax.jit(lambda t, i: cpu_kernels.pooled_lookup(t, i, threads=threads, visit=k))(
        table, ids))
    np.testing.assert_array_equal(seen, plain)
    np.testing.assert_array_equal(plain, np.asarray(jax.jit(routing.pool_rows)(table, ids)))
    with pytest.raises(ValueError, match="visit"):
        cpu_kernels.pooled_lookup(jnp.asarray(table), ids[:7], visit=2)


def test_pooled_lookup_skips_ids_outside_the_table():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids = np.array([[0, 4, -1, 3], [99, -7, 2, 2], [-1, -1, -1, -1]], np.int32)
    got = np.asarray(cpu_kernels.pooled_lookup(jnp.asarray(table), ids))
    np.testing.assert_array_equal(got, [table[0] + table[3], 2 * table[2], np.zeros(3)])


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_sequence_rows_are_taken_by_the_kernel(mesh24, sharding):
    """Sequence features: the owners' rows and the requesters' positions are
    gathered by the C++ kernel; the embeddings and one training step equal
    the XLA path's bit for bit."""
    from jdmt.data import FeatureSet, make_features
    from jdmt.embeddings import ShardedEmbeddings

    seq = make_features(2, 60, 8, 5, kind="sequence", prefix="seq")
    pooled = make_features(2, 40, 8, 3)
    feats = FeatureSet(pooled.sparse + seq.sparse, num_dense=13)
    opt = SparseOptimizer("rowwise_adagrad", lr=0.1)
    rng = np.random.default_rng(1)
    ids = np.concatenate([rng.integers(0, 40, (16, 6)), rng.integers(0, 60, (16, 10))], axis=1).astype(np.int32)
    lengths = rng.integers(0, 6, (16, 4)).astype(np.int32)
    lengths[:, :2] = np.minimum(lengths[:, :2], 3)
    got = {}
    for ck in (True, False):
        emb = ShardedEmbeddings(feats, mesh24, sharding, opt, cpu_kernels=ck)
        emb.fit_caps(2, emb.measure(ids, lengths))
        fwd = jax.jit(lambda s, i, n, e=emb: e.forward(s, i, n)[0].sequence)
        text = fwd.lower(emb.init(seed=0), ids, lengths).compile().as_text()  # the pooled part is dead
        assert ("jdmt_pooled_lookup" in text) == ck
        step = jax.jit(lambda s, i, n, e=emb: e.step(
            s, i, n, lambda x, w: sum(jnp.sum(v * w) for v in x.sequence.values()), 1.0)[1])
        tables, accs = emb.to_dense(step(emb.init(seed=0), ids, lengths))
        got[ck] = (jax.tree.map(np.asarray, fwd(emb.init(seed=0), ids, lengths)), tables, accs)
    for a, b in zip(jax.tree.leaves(got[True]), jax.tree.leaves(got[False])):
        np.testing.assert_array_equal(a, b)


def test_the_embeddings_run_the_pooled_lookup_kernel(mesh24):
    from jdmt.data import make_features
    from jdmt.embeddings import ShardedEmbeddings

    feats = make_features(3, 50, 8, 4)
    opt = SparseOptimizer("rowwise_adagrad", lr=0.1)
    ids = np.random.default_rng(0).integers(0, 50, (16, 12)).astype(np.int32)
    lengths = np.full((16, 3), 4, np.int32)
    outs = {}
    for ck in (True, False):
        emb = ShardedEmbeddings(feats, mesh24, "table_wise", opt, cpu_kernels=ck)
        # this process's cores shared by its 8 devices
        assert emb.impl.cpu_threads == (max(1, cpu_kernels.host_cores() // 8) if ck else 0)
        emb.fit_caps(2, emb.measure(ids, lengths))
        fwd = jax.jit(lambda s, i, n, e=emb: e.forward(s, i, n)[0].pooled)
        text = fwd.lower(emb.init(seed=0), ids, lengths).as_text()
        assert ("jdmt_pooled_lookup" in text) == ck
        assert ("jdmt_bag_pack" in text) == ck  # the bags packed for their owners in C++
        if ck:  # one lookup per peer's block (WidthRoute.split_blocks): 8 devices, 8 calls
            assert len(re.findall(r"custom_call @jdmt_pooled_lookup\b", text)) == 8
        outs[ck] = np.asarray(fwd(emb.init(seed=0), ids, lengths))
    np.testing.assert_array_equal(outs[True], outs[False])


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("room", [10_000, 30], ids=["fits", "overflows"])
def test_bag_pack_is_routing_bag_send(weighted, room):
    """`cpu_kernels.bag_pack` from the batch's table rows gives `routing.bag_send`'s
    blocks, sizes and weight bits (ids past the capacity dropped, sizes beyond it)."""
    from jdmt.embeddings import routing

    rng = np.random.default_rng(0)
    b, c, g = 37, 20, 3
    canon = rng.integers(-1, 50, (b, c)).astype(np.int32)
    canon[:, -1] = -1  # the batch's all -1 column, where a missing position points
    wcanon = (rng.random((b, c)) * (canon >= 0)).astype(np.float32)
    cols = rng.integers(-1, c - 1, (5, 4))
    dst, kd = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 0, 0, 1])
    base, which = np.array([0, 50, 0, 0, 50]), np.array([1, 0, 1, 1, 0], bool)
    header = np.bincount(dst, minlength=g) * b
    cap = int(header.max()) + room
    send, sizes, wsend = jax.jit(lambda x, w: cpu_kernels.bag_pack(
        x, cols, dst, kd, base, header, cap, wcanon=w if weighted else None, weighted=which, threads=2))(
        canon, wcanon)
    kk = np.repeat(np.arange(5), b)
    rank = kd[kk] * b + np.tile(np.arange(b), 5)
    at = np.where(cols[kk] >= 0, cols[kk], c - 1)
    rows = canon[np.tile(np.arange(b), 5)[:, None], at]
    w = np.where(which[kk][:, None], wcanon[np.tile(np.arange(b), 5)[:, None], at], 1.0).astype(np.float32)
    ref = routing.bag_send(jnp.asarray(rows), jnp.asarray(dst[kk]), jnp.asarray(rank),
                           jnp.asarray(base[kk]), jnp.asarray(header), cap, jnp.asarray(w) if weighted else None)
    np.testing.assert_array_equal(send, ref[0])
    np.testing.assert_array_equal(sizes, ref[1])
    assert (np.asarray(sizes) > cap).any() == (room == 30)
    if weighted:
        np.testing.assert_array_equal(wsend, ref[3])
    else:
        assert wsend is None


@pytest.mark.parametrize("room", [10_000, 9], ids=["fits", "overflows"])
@pytest.mark.parametrize("wide", [False, True], ids=["int32_keys", "wide_keys"])
def test_row_send_is_routing_row_send(room, wide):
    """`cpu_kernels.row_send` and `send_keys` give the XLA functions' blocks,
    sizes, inverse and unique count bit for bit: duplicates, ids of no row
    (-1), rows of several pieces and row shards, rows past the capacity
    (dropped, sizes beyond it, inverse -1), and keys past int32 (the XLA
    function's pair sort)."""
    from jdmt.embeddings import routing
    from jdmt.pallas_kernels.common import Impl

    rng = np.random.default_rng(1)
    n, k, g = 3000, 3, 4
    rpp = (1 << 30) if wide else 500  # peers * rows_per_peer past int32 with wide
    rows = rng.integers(-1, 400, n).astype(np.int32)
    piece = rng.integers(0, k, n).astype(np.int32)
    stride = np.array([1, 2, 4], np.int32)
    devices = np.array([[3, 0, 0, 0], [0, 2, 0, 0], [0, 1, 2, 3]], np.int32)
    offsets = np.array([[0, 0, 0, 0], [200, 300, 0, 0], [10, 20, 30, 40]], np.int32)
    cap = 60 + room
    args = [jnp.asarray(x) for x in (rows, piece, stride, devices, offsets)]
    cpp = jax.jit(lambda *a: routing.row_send(*a, rpp, g, cap, impl=Impl(cpu_threads=1)))(*args)
    ref = jax.jit(lambda *a: routing.row_send(*a, rpp, g, cap))(*args)
    for got, want in zip(cpp, ref):
        np.testing.assert_array_equal(got, want)
    assert (np.asarray(ref[1]) > cap).any() == (room == 9)
    ok = rows >= 0
    sh = rows[ok] % stride[piece[ok]]
    keys = devices[piece[ok], sh].astype(np.int64) * rpp + offsets[piece[ok], sh] + rows[ok] // stride[piece[ok]]
    assert int(ref[3]) == len(np.unique(keys))
    if not wide:  # the same keys sent as they are
        key = jnp.asarray(np.where(rows >= 0, rng.integers(0, g * rpp, n), -1).astype(np.int32))
        got = jax.jit(lambda x: routing.send_keys(x, rpp, g, cap, impl=Impl(cpu_threads=1)))(key)
        want = jax.jit(lambda x: routing.send_keys(x, rpp, g, cap))(key)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def _interaction_ref(t):
    """float64 reference of the strict-upper-triangle dot products and of the
    gradient of sum(z * g)."""
    t64 = np.asarray(t, np.float64)
    n = t64.shape[1]
    i, j = np.triu_indices(n, 1)
    z = np.einsum("bid,bjd->bij", t64, t64)[:, i, j]

    def grad(g):
        G = np.zeros((t64.shape[0], n, n))
        G[:, i, j] = g
        return np.einsum("bij,bjd->bid", G + G.transpose(0, 2, 1), t64)

    return z, grad


@pytest.mark.parametrize("shape", [(300, 27, 64), (50, 5, 13), (7, 1, 4), (0, 4, 8)])
def test_dot_interaction_kernel_matches_the_reference(shape):
    rng = np.random.default_rng(0)
    t = rng.standard_normal(shape).astype(np.float32)
    n = shape[1]
    g = rng.standard_normal((shape[0], n * (n - 1) // 2)).astype(np.float32)
    z_ref, grad = _interaction_ref(t)
    z = np.asarray(jax.jit(lambda a: cpu_kernels.dot_interaction(a, threads=1))(t))
    dt = np.asarray(jax.jit(lambda a, b: cpu_kernels.dot_interaction_grad(a, b, threads=1))(t, g))
    np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dt, grad(g), rtol=1e-5, atol=1e-4)
    # threads split the samples: the same bits
    z3 = np.asarray(jax.jit(lambda a: cpu_kernels.dot_interaction(a, threads=3))(t))
    dt3 = np.asarray(jax.jit(lambda a, b: cpu_kernels.dot_interaction_grad(a, b, threads=3))(t, g))
    np.testing.assert_array_equal(z3, z)
    np.testing.assert_array_equal(dt3, dt)


def test_dot_interaction_kernel_is_the_models_interaction(mesh24):
    """`dot_interaction(..., cpu_threads=N, mesh=...)` under jit on a batch
    sharded over 8 devices: values and gradients equal the XLA form to f32
    rounding, each device runs the kernel on its own samples (no all-gather),
    and a batch the mesh does not divide takes the XLA ops."""
    from jax.sharding import NamedSharding

    from jdmt.models.dlrm import dot_interaction

    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    e = rng.standard_normal((64, 6, 16)).astype(np.float32)
    w = rng.standard_normal((64, 21)).astype(np.float32)
    sh = NamedSharding(mesh24, P(DEVICES))
    x, e, w = (jax.device_put(a, sh) for a in (x, e, w))

    def loss(x, e, w, threads):
        return jnp.sum(dot_interaction(x, e, cpu_threads=threads, mesh=mesh24) * w)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=3)
    (lk, gk), (lx, gx) = f(x, e, w, 2), f(x, e, w, 0)
    np.testing.assert_allclose(lk, lx, rtol=1e-5)
    for a, b in zip(gk, gx):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    text = f.lower(x, e, w, 2).compile().as_text()
    assert "jdmt_dot_interaction_grad" in text and "all-gather" not in text
    assert re.search(r"f32\[8,21\]\{[0-9,]*\} custom-call\(.*jdmt_dot_interaction\"", text)
    odd = jax.jit(lambda x, e: dot_interaction(x, e, cpu_threads=2, mesh=mesh24))
    assert "jdmt_dot_interaction" not in odd.lower(x[:12], e[:12]).compile().as_text()
    with pytest.raises(TypeError):
        cpu_kernels.dot_interaction_grad(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4)))
