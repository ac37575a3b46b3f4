"""The Mosaic GPU kernels (`jdmt.pallas_kernels.gpu`) against their XLA references.

Numerics run in the Mosaic GPU interpreter on CPU (it simulates shared
memory, TMA copies and barriers; uninitialised shared memory reads as NaN,
so a stale row that leaks into a result shows). It is slow (milliseconds
per copy), so numeric shapes are small; realistic shapes are only lowered:
`jax.export` for CUDA from this CPU-only machine (compute capability 9.0).

`JDMT_KERNELS_ON_DEVICE=1` runs the same numeric tests compiled on an
NVIDIA GPU of compute capability >= 9.0 instead of interpreted.
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdmt.pallas_kernels import (
    pooled_lookup,
    row_gradients,
    sequence_lookup,
    sparse_update,
)
from jdmt.pallas_kernels import gpu
from jdmt.pallas_kernels.export import export_for
from jdmt.pallas_kernels.gpu import rows as gpu_rows
from jdmt.pallas_kernels.pooled_lookup import pooled_gather_xla
from jdmt.pallas_kernels.row_gradients import segment_sum_xla
from jdmt.pallas_kernels.sequence_lookup import sequence_gather_xla
from jdmt.pallas_kernels.sparse_update import row_update_xla

ON_DEVICE = os.environ.get("JDMT_KERNELS_ON_DEVICE") == "1"
if ON_DEVICE and jax.default_backend() != "gpu":
    pytest.skip("JDMT_KERNELS_ON_DEVICE=1 runs the GPU kernels compiled: this backend is "
                f"{jax.default_backend()}", allow_module_level=True)
INTERPRET = not ON_DEVICE  # else the Mosaic GPU interpreter (gpu.rows.interpret_params)
GPU = dict(kernel="pallas", target="gpu", interpret=INTERPRET)
XLA = dict(kernel="xla")
CUSTOM_CALL = "mosaic_gpu_v2"

# One tolerance per result dtype. Pooled sums accumulate in the reference's
# order (f32 FMA contraction aside); segment sums add a run in a different
# order; bf16 results may round the same f32 value one ulp apart.
TOL = {
    jnp.dtype(jnp.float32): dict(rtol=2e-5, atol=2e-5),
    jnp.dtype(jnp.bfloat16): dict(rtol=1e-2, atol=1e-2),
}


def assert_close(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), **TOL[jnp.dtype(ref.dtype)])


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    yield
    if ON_DEVICE:
        return
    # After a failed kernel the interpreter must be reset before the next one.
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    interpret_pallas_call.reset_gpu_interpret_mode_state()


def _table(rng, rows, dim, dtype):
    return jnp.asarray(rng.normal(size=(rows, dim)), dtype)


def _bags(rng, n, length, rows, invalid=0.25):
    """Canonical ids i32[n, length] with the edge cases in the first bags:
    an empty bag, an all-duplicate bag, rows 0 and R - 1, a full bag."""
    ids = rng.integers(0, rows, size=(n, length))
    ids = np.where(rng.random((n, length)) < invalid, -1, ids)
    assert n >= 4
    ids[0] = -1                     # empty bag
    ids[1] = rows - 1               # all duplicates, the last row
    ids[2] = rng.integers(0, rows, size=length)  # maximum length: no -1
    ids[3, 0] = 0                   # the first row
    return jnp.asarray(ids, jnp.int32)


# ---- the kernels, interpreted -------------------------------------------------------------

POOLED = [  # rows, dim, n, length, dtype, weighted
    (37, 64, 70, 3, jnp.float32, True),   # two bag tiles (70 = 64 + 6)
    (40, 100, 5, 4, jnp.bfloat16, False),  # flat rows (200 bytes), one tail row
    (3, 4, 9, 2, jnp.float32, False),      # 16-byte rows: every row from the tail
    (29, 16, 6, 3, jnp.bfloat16, True),
]


@pytest.mark.parametrize("rows,dim,n,length,dtype,weighted", POOLED)
def test_pooled_gather(rows, dim, n, length, dtype, weighted):
    rng = np.random.default_rng(dim + n)
    table = _table(rng, rows, dim, dtype)
    ids = _bags(rng, n, length, rows)
    w = jnp.asarray(rng.normal(size=(n, length)), jnp.float32) if weighted else None
    out = jax.jit(functools.partial(gpu.pooled_gather, interpret=INTERPRET))(table, ids, w)
    assert_close(out, pooled_gather_xla(table, ids, w))
    assert not np.any(np.asarray(out[0], np.float32))  # the empty bag


SEQUENCE = [  # rows, dim, n, s, dtype
    (23, 60, 4, 4, jnp.float32),     # flat rows (240 bytes)
    (50, 64, 4, 35, jnp.bfloat16),   # 140 positions: three tiles streamed by one program
    (9, 256, 4, 2, jnp.float32),     # two column blocks
]


@pytest.mark.parametrize("rows,dim,n,s,dtype", SEQUENCE)
def test_sequence_gather(rows, dim, n, s, dtype):
    rng = np.random.default_rng(dim + s)
    table = _table(rng, rows, dim, dtype)
    ids = _bags(rng, n, s, rows)
    out = jax.jit(functools.partial(gpu.sequence_gather, interpret=INTERPRET))(table, ids)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(sequence_gather_xla(table, ids), np.float32))


def _segment_ref(grads, src, begin, end, scale):
    """The definition, in float64 (independent of segment_sum_xla)."""
    g = np.asarray(grads, np.float64)
    out = np.zeros((len(begin), g.shape[1]))
    for u, (b, e) in enumerate(zip(np.asarray(begin), np.asarray(end))):
        for j in range(b, e):
            out[u] += (1.0 if scale is None else float(scale[j])) * g[src[j]]
    return out


SEGMENTS = [  # sources, dim, run lengths, dtype, scaled, shuffled
    (20, 64, [1, 0, 3, 2, 0, 400, 1, 1], jnp.float32, True, False),  # a hot row: 6 whole chunks
    (20, 192, [2, 5, 1, 0, 70, 3, 0, 0], jnp.float32, False, True),  # runs out of order, two column blocks
    (9, 100, [0] * 3 + [2] * 66, jnp.bfloat16, True, False),         # 69 outputs: two tiles; flat rows
]


@pytest.mark.parametrize("num_src,dim,lengths,dtype,scaled,shuffled", SEGMENTS)
def test_segment_sum(num_src, dim, lengths, dtype, scaled, shuffled):
    rng = np.random.default_rng(len(lengths))
    lengths = np.asarray(lengths)
    end = np.cumsum(lengths)
    begin = end - lengths
    n = int(end[-1])
    empty = lengths == 0
    begin[empty] = end[empty] = n  # as run_bounds pads (see the report on other empty runs)
    if shuffled:
        order = rng.permutation(len(lengths))
        begin, end = begin[order], end[order]
    grads = _table(rng, num_src, dim, dtype)
    src = jnp.asarray(rng.integers(0, num_src, size=n), jnp.int32)
    scale = jnp.asarray(rng.normal(size=n), jnp.float32) if scaled else None
    begin, end = jnp.asarray(begin, jnp.int32), jnp.asarray(end, jnp.int32)
    out = jax.jit(functools.partial(gpu.segment_sum, interpret=INTERPRET))(grads, src, begin, end, scale)
    ref = segment_sum_xla(grads, src, begin, end, scale)
    assert_close(out, ref)
    np.testing.assert_allclose(out, _segment_ref(grads, np.asarray(src), begin, end, scale), rtol=2e-5, atol=2e-5)
    assert not np.any(np.asarray(out)[np.asarray(end <= begin)])


UPDATES = [  # rows, dim, updates, table dtype, kind, row_mean_sq
    (50, 256, 10, jnp.float32, "rowwise_adagrad", False),  # in place, two column blocks
    (50, 60, 10, jnp.bfloat16, "rowwise_adagrad", True),   # 120-byte rows: XLA writes them
    (40, 300, 9, jnp.float32, "adagrad", False),           # in place via the 1-D view, three column blocks
    (90, 4, 70, jnp.float32, "sgd", False),                # two row tiles, 16-byte rows
    (30, 64, 7, jnp.bfloat16, "sgd", False),               # in place, bf16
]


def _update_case(rng, rows, dim, n, dtype, kind, with_msq):
    table = _table(rng, rows, dim, dtype)
    accum = {
        "rowwise_adagrad": jnp.asarray(rng.uniform(0.1, 1, size=(rows,)), jnp.float32),
        "adagrad": jnp.asarray(rng.uniform(0.1, 1, size=(rows, dim)), jnp.float32),
        "sgd": None,
    }[kind]
    touched = np.concatenate([[0], 1 + rng.permutation(rows - 2)[: n - 4], [rows - 1]])  # unique
    ids = jnp.asarray(np.concatenate([touched, [rows, -1]]), jnp.int32)  # sentinel rows, skipped
    grads = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    msq = jnp.asarray(rng.uniform(size=(n,)), jnp.float32) if with_msq else None
    return table, accum, ids, grads, msq, touched


@pytest.mark.parametrize("rows,dim,n,dtype,kind,with_msq", UPDATES)
def test_row_update(rows, dim, n, dtype, kind, with_msq):
    rng = np.random.default_rng(dim + n)
    table, accum, ids, grads, msq, touched = _update_case(rng, rows, dim, n, dtype, kind, with_msq)
    lr = jnp.float32(0.05)
    got = gpu.row_update(table, accum, ids, grads, lr, msq, kind=kind, eps=1e-8, interpret=INTERPRET)
    want = row_update_xla(table, accum, ids, grads, lr, msq, kind=kind, eps=1e-8)
    untouched = np.setdiff1d(np.arange(rows), touched)
    for out, ref, before in zip(got, want, (table, accum)):
        if ref is None:
            assert out is None
            continue
        assert_close(out, ref)
        np.testing.assert_array_equal(np.asarray(out)[untouched], np.asarray(before)[untouched])


def test_interpret_settings():
    assert gpu_rows.interpret_params(False) is False
    assert isinstance(gpu_rows.interpret_params(True), gpu_rows.InterpretGPUParams)
    with pytest.raises(TypeError):
        gpu_rows.interpret_params("tpu")


@pytest.mark.parametrize("rows,dim,dtype,flat,block,blocks", [
    (100, 64, jnp.float32, False, 64, 1),
    (100, 192, jnp.float32, False, 96, 2),
    (100, 64, jnp.bfloat16, False, 64, 1),
    (100, 100, jnp.float32, True, 128, 1),
    (100, 4, jnp.bfloat16, True, 64, 1),
    (100, 300, jnp.float32, True, 128, 3),
])
def test_row_plans(rows, dim, dtype, flat, block, blocks):
    plan = gpu_rows.plan_rows(rows, dim, dtype)
    assert (plan.flat, plan.block, plan.num_blocks) == (flat, block, blocks)
    assert plan.block * jnp.dtype(dtype).itemsize % 128 == 0 and plan.width >= dim
    if flat:  # the tail holds exactly the rows whose last window would pass the end
        first_tail = rows - plan.tail_rows
        assert (first_tail - 1) * dim + plan.width <= rows * dim
        assert first_tail * dim + plan.width > rows * dim


# ---- the public wrappers with target="gpu" ------------------------------------------------


@pytest.mark.parametrize("combiner,weighted", [("sum", True), ("mean", False)])
def test_pooled_lookup(combiner, weighted):
    rng = np.random.default_rng(7)
    rows, dim, n, length = 30, 64, 5, 3
    table = _table(rng, rows, dim, jnp.float32)
    ids = jnp.asarray(rng.integers(-2, rows + 2, size=(n, length)), jnp.int32)  # some out of range
    lengths = jnp.asarray([0, 3, 2, 3, 1], jnp.int32)
    weights = jnp.asarray(rng.normal(size=(n, length)), jnp.float32) if weighted else None

    def run(impl):
        def f(t, w):
            return pooled_lookup(t, ids, lengths, w, combiner=combiner, **impl)

        out, vjp = jax.vjp(f, table, weights)
        return out, vjp(jnp.asarray(rng_g, jnp.float32))

    rng_g = np.random.default_rng(1).normal(size=(n, dim))
    out, (d_table, d_w) = jax.jit(lambda: run(GPU))()  # one program: eager XLA ops compile one by one
    ref, (r_table, r_w) = run(XLA)
    assert_close(out, ref)
    assert_close(d_table, r_table)
    if weighted:
        assert_close(d_w, r_w)


def test_sequence_lookup():
    rng = np.random.default_rng(8)
    rows, dim, n, s = 25, 100, 3, 4
    table = _table(rng, rows, dim, jnp.float32)
    ids = jnp.asarray(rng.integers(-1, rows + 1, size=(n, s)), jnp.int32)
    lengths = jnp.asarray([4, 0, 3], jnp.int32)
    g = jnp.asarray(rng.normal(size=(n, s, dim)), jnp.float32)

    def run(impl):
        out, vjp = jax.vjp(lambda t: sequence_lookup(t, ids, lengths, **impl), table)
        return out, vjp(g)[0]

    out, d_table = jax.jit(lambda: run(GPU))()
    ref, r_table = run(XLA)
    np.testing.assert_array_equal(out, ref)
    assert_close(d_table, r_table)


def test_row_gradients():
    rng = np.random.default_rng(9)
    n, length, dim, num_rows = 10, 4, 64, 6  # many duplicates: runs of ~6
    ids = jnp.asarray(rng.integers(-1, num_rows, size=(n, length)), jnp.int32)
    grads = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(n, length)), jnp.float32)
    kw = dict(num_rows=num_rows, combiner="mean", capacity=16)
    got = jax.jit(lambda: row_gradients(ids, grads, None, weights, **kw, **GPU))()
    want = row_gradients(ids, grads, None, weights, **kw, **XLA)
    np.testing.assert_array_equal(got[0], want[0])
    assert_close(got[1], want[1])
    assert int(got[2]) == int(want[2])


def test_sparse_update(kind="rowwise_adagrad"):  # every kind: test_row_update
    rng = np.random.default_rng(10)
    table, accum, ids, grads, _, _ = _update_case(rng, 40, 64, 8, jnp.float32, kind, False)
    got = jax.jit(lambda: sparse_update(table, accum, ids, grads, 0.1, kind=kind, **GPU))()
    want = sparse_update(table, accum, ids, grads, 0.1, kind=kind, **XLA)
    for out, ref in zip(got, want):
        if ref is not None:
            assert_close(out, ref)


# ---- lowering for CUDA at realistic shapes (no GPU needed) --------------------------------

ROWS = 100_003


def _export(fn, *args, donate=()):
    exported = export_for("cuda", fn, *[jax.ShapeDtypeStruct(a.shape, a.dtype)
                                        if a is not None else None for a in args],
                          donate_argnums=donate)
    text = exported.mlir_module()
    assert re.search(rf"stablehlo\.custom_call @{CUSTOM_CALL}\(", text), "no Mosaic GPU kernel in the module"
    return exported, text


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("dim", [64, 128, 100])
@pytest.mark.parametrize("length", [1, 10, 100])
def test_export_pooled_gather(dim, length):
    dtype = jnp.bfloat16 if length == 10 else jnp.float32
    weighted = length != 1
    args = [_sds((ROWS, dim), dtype), _sds((4096, length), jnp.int32)]
    if weighted:
        args.append(_sds((4096, length), jnp.float32))
        fn = lambda t, i, w: gpu.pooled_gather(t, i, w, interpret=False)  # noqa: E731
    else:
        fn = lambda t, i: gpu.pooled_gather(t, i, None, interpret=False)  # noqa: E731
    exported, _ = _export(fn, *args)
    assert exported.out_avals[0].shape == (4096, dim) and exported.out_avals[0].dtype == dtype


@pytest.mark.parametrize("dim", [64, 128, 100])
def test_export_sequence_gather(dim):
    exported, _ = _export(lambda t, i: gpu.sequence_gather(t, i, interpret=False),
                          _sds((ROWS, dim), jnp.float32), _sds((512, 256), jnp.int32))
    assert exported.out_avals[0].shape == (512, 256, dim)


@pytest.mark.parametrize("dim,scaled", [(64, True), (128, False), (100, True)])
def test_export_segment_sum(dim, scaled):
    n = 40960
    args = [_sds((4096, dim), jnp.float32), _sds((n,), jnp.int32), _sds((n,), jnp.int32), _sds((n,), jnp.int32)]
    if scaled:
        args.append(_sds((n,), jnp.float32))
        fn = lambda g, s, b, e, c: gpu.segment_sum(g, s, b, e, c, interpret=False)  # noqa: E731
    else:
        fn = lambda g, s, b, e: gpu.segment_sum(g, s, b, e, None, interpret=False)  # noqa: E731
    exported, _ = _export(fn, *args)
    assert exported.out_avals[0].shape == (n, dim)


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "adagrad", "sgd"])
@pytest.mark.parametrize("dim,dtype", [(64, jnp.float32), (128, jnp.bfloat16), (100, jnp.float32), (100, jnp.bfloat16)])
def test_export_row_update(kind, dim, dtype):
    u = 40960
    acc = {"rowwise_adagrad": _sds((ROWS,), jnp.float32), "adagrad": _sds((ROWS, dim), jnp.float32), "sgd": None}[kind]

    def fn(t, a, r, g, lr):
        return gpu.row_update(t, a, r, g, lr, None, kind=kind, eps=1e-8, interpret=False)

    args = [_sds((ROWS, dim), dtype), acc, _sds((u,), jnp.int32), _sds((u, dim), jnp.float32), _sds((), jnp.float32)]
    exported, text = _export(fn, *args, donate=(0, 1))
    in_place = gpu_rows.writable(dim, dtype)
    # Donated state is aliased to the results; in place, no scatter of the rows.
    assert text.count("tf.aliasing_output") == (1 if kind == "sgd" else 2)
    assert ("stablehlo.scatter" in text) != in_place


def test_export_serializes():
    # Exported.serialize() needs flatbuffers (a test dependency)
    exported, _ = _export(lambda t, i: gpu.sequence_gather(t, i, interpret=False),
                          _sds((ROWS, 64), jnp.float32), _sds((512, 256), jnp.int32))
    blob = exported.serialize()
    assert jax.export.deserialize(blob).out_avals == exported.out_avals


@pytest.mark.parametrize("op", ["pooled_gather", "row_update"])
def test_odd_dim_tables_past_the_int32_view_are_refused(op):
    """Rows that are not a multiple of 128 bytes are fetched from the operand's
    1-D view, indexed in int32: a table of R * D >= 2**31 such elements is
    refused with a ValueError that names the limit (no silent wrap-around)."""
    rows, dim = 2**31 // 100 + 1, 100  # 400-byte rows
    table = _sds((rows, dim), jnp.float32)
    if op == "pooled_gather":
        fn = lambda t, i: gpu.pooled_gather(t, i, None, interpret=False)  # noqa: E731
        args = (table, _sds((64, 4), jnp.int32))
    else:
        fn = lambda t, r, g: gpu.row_update(t, None, r, g, jnp.float32(0.1), None, kind="sgd",  # noqa: E731
                                            eps=1e-8, interpret=False)
        args = (table, _sds((64,), jnp.int32), _sds((64, dim), jnp.float32))
    with pytest.raises(ValueError, match=r"int32 \(rows \* dim < 2\*\*31\)"):
        jax.eval_shape(fn, *args)
