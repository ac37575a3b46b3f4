"""The Mosaic TPU kernels (`jdmt.pallas_kernels.tpu`) against their XLA references.

On this CPU-only machine the kernels run in Pallas interpret mode
(`interpret=True`, small shapes), a few under the DMA / semaphore simulator
with race detection (`pltpu.InterpretParams(detect_races=True)`, tiny
shapes: it is slow), and are lowered for TPU with `jax.export` at realistic
shapes (Python lowering only: Mosaic's own compiler runs on a TPU).

`JDMT_KERNELS_ON_DEVICE=1` runs the same numeric tests compiled on a TPU
(Mosaic) instead of interpreted; the simulator tests are skipped then.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jdmt.pallas_kernels import (
    pooled_lookup,
    row_gradients,
    sequence_lookup,
    sparse_update,
    tpu,
)
from jdmt.pallas_kernels.export import export_for
from jdmt.pallas_kernels.pooled_lookup import pooled_gather_xla
from jdmt.pallas_kernels.row_gradients import segment_sum_xla
from jdmt.pallas_kernels.sequence_lookup import sequence_gather_xla
from jdmt.pallas_kernels.sparse_update import row_update_xla
from jdmt.pallas_kernels.tpu import tuning

F32, BF16 = jnp.float32, jnp.bfloat16
# the one tolerance table: kernels and references accumulate in f32 in the
# same order, so f32 agrees to rounding; bf16 outputs may differ by one ulp
TOL = {
    jnp.dtype(F32): dict(rtol=1e-5, atol=1e-6),
    jnp.dtype(BF16): dict(rtol=2**-7, atol=2**-7),
}
KINDS = ["rowwise_adagrad", "adagrad", "sgd"]
ON_DEVICE = os.environ.get("JDMT_KERNELS_ON_DEVICE") == "1"
if ON_DEVICE and jax.default_backend() != "tpu":
    pytest.skip("JDMT_KERNELS_ON_DEVICE=1 runs the TPU kernels compiled: this backend is "
                f"{jax.default_backend()}", allow_module_level=True)
INTERPRET = not ON_DEVICE  # compiled on a TPU with JDMT_KERNELS_ON_DEVICE=1
PALLAS = dict(kernel="pallas", target="tpu", interpret=INTERPRET)


def close(out, ref):
    """Same shape and dtype, values within the dtype's tolerance."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    tol = TOL[jnp.dtype(ref.dtype)]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), **tol)


def bag_ids(rng, num_rows, n, ln):
    """Random ids in [-1, R) with the edge cases in the first bags: an empty
    bag, a bag of one repeated row, rows 0 and R-1, a full bag."""
    ids = rng.integers(-1, num_rows, size=(n, ln)).astype(np.int32)
    ids[0] = -1
    if n > 1:
        ids[1] = num_rows - 1
    if n > 2:
        ids[2, :2] = [0, num_rows - 1][: ln]
    if n > 3:
        ids[3] = rng.integers(0, num_rows, size=ln)
    return jnp.asarray(ids)


# ---- pooled gather ----------------------------------------------------------------------

POOLED = [
    # R, D, N, L, dtype, weighted
    (64, 16, 13, 7, F32, False),
    (64, 100, 13, 7, BF16, True),
    (33, 4, 5, 600, F32, True),  # L > tuning.POOL_POSITIONS: two position blocks
    (40, 60, 130, 3, F32, False),  # N > one bag block, the last one partial
    (17, 128, 9, 1, BF16, False),
]


@pytest.mark.parametrize("r,d,n,ln,dtype,weighted", POOLED)
def test_pooled_gather(r, d, n, ln, dtype, weighted):
    rng = np.random.default_rng(r + d + n + ln)
    table = jnp.asarray(rng.normal(size=(r, d)), dtype)
    ids = bag_ids(rng, r, n, ln)
    w = jnp.asarray(rng.normal(size=(n, ln)), F32) if weighted else None
    out = tpu.pooled_gather(table, ids, w, interpret=INTERPRET)
    close(out, pooled_gather_xla(table, ids, w))
    assert not np.asarray(out[0], np.float32).any()  # the empty bag


def test_pooled_gather_all_duplicates():
    table = jnp.asarray(np.random.default_rng(0).normal(size=(8, 24)), F32)
    ids = jnp.full((20, 9), 3, jnp.int32)
    out = tpu.pooled_gather(table, ids, None, interpret=INTERPRET)
    close(out, pooled_gather_xla(table, ids, None))


# ---- sequence gather --------------------------------------------------------------------

SEQUENCE = [
    (50, 16, 5, 7, F32),
    (30, 100, 3, 300, BF16),  # wraps the DMA ring many times
    (20, 128, 1, 40, BF16),
]


@pytest.mark.parametrize("r,d,n,s,dtype", SEQUENCE)
def test_sequence_gather(r, d, n, s, dtype):
    rng = np.random.default_rng(r + d + n + s)
    table = jnp.asarray(rng.normal(size=(r, d)), dtype)
    ids = bag_ids(rng, r, n, s)
    out = tpu.sequence_gather(table, ids, interpret=INTERPRET)
    ref = sequence_gather_xla(table, ids)
    assert out.dtype == ref.dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))  # a copy: exact


# ---- segment sum ------------------------------------------------------------------------


def contiguous_runs(rng, n, runs, u, long_run=None):
    """`runs` sorted, contiguous runs covering [0, n) as `run_bounds` makes
    them (with `long_run` = (a, b) one of them: a hot row), then empty runs
    (begin = end = n) up to `u` rows."""
    cuts = set(rng.choice(np.arange(1, n), size=runs - 1, replace=False).tolist())
    if long_run is not None:
        a, b = long_run
        cuts = {c for c in cuts if not a < c < b} | {a, b}
    edges = [0, *sorted(cuts), n]
    pad = [n] * (u - len(edges) + 1)
    begin, end = edges[:-1] + pad, edges[1:] + pad
    return jnp.asarray(begin, jnp.int32), jnp.asarray(end, jnp.int32)


def segment_sum_np(grads, src, begin, end, scale):
    """The contract, literally (any non-overlapping runs, any order)."""
    g, src, begin, end = (np.asarray(x) for x in (grads.astype(F32), src, begin, end))
    sc = np.ones(src.shape, np.float32) if scale is None else np.asarray(scale)
    out = np.zeros((len(begin), g.shape[1]), np.float32)
    for u, (b, e) in enumerate(zip(begin, end)):
        for j in range(b, e):
            out[u] += sc[j] * g[src[j]]
    return out


SEGMENTS = [
    # G, D, n, U, runs, dtype, scaled, long run
    (20, 16, 50, 9, 7, F32, True, None),
    (7, 100, 900, 6, 4, BF16, False, (10, 890)),  # a hot row: one run across 4 SMEM windows
    (11, 4, 800, 700, 600, F32, True, None),  # U > one row block, the last one partial
    (5, 128, 300, 40, 10, BF16, True, None),  # mostly empty (padding) runs
]


@pytest.mark.parametrize("g,d,n,u,runs,dtype,scaled,long_run", SEGMENTS)
def test_segment_sum(monkeypatch, g, d, n, u, runs, dtype, scaled, long_run):
    monkeypatch.setattr(tuning, "WINDOW", 256)  # SMEM windows of src / scale: move often
    rng = np.random.default_rng(g + d + n + u)
    grads = jnp.asarray(rng.normal(size=(g, d)), dtype)
    src = jnp.asarray(rng.integers(0, g, size=n), jnp.int32)
    begin, end = contiguous_runs(rng, n, runs, u, long_run)
    scale = jnp.asarray(rng.normal(size=n), F32) if scaled else None
    out = tpu.segment_sum(grads, src, begin, end, scale, interpret=INTERPRET)
    close(out, segment_sum_xla(grads, src, begin, end, scale))


def test_segment_sum_any_runs(monkeypatch):
    """Runs in random order with gaps, empty and reversed runs anywhere (the
    full contract; checked against the literal loop): the SMEM window jumps."""
    monkeypatch.setattr(tuning, "WINDOW", 256)
    rng = np.random.default_rng(7)
    n, u = 1000, 150
    cuts = np.sort(rng.choice(np.arange(n + 1), size=2 * u))
    begin, end = cuts[0::2].copy(), cuts[1::2].copy()
    begin[5], end[5] = end[5], begin[5]  # reversed: empty
    end[6] = begin[6]  # empty
    perm = rng.permutation(u)
    grads = jnp.asarray(rng.normal(size=(13, 8)), F32)
    src = jnp.asarray(rng.integers(0, 13, size=n), jnp.int32)
    scale = jnp.asarray(rng.normal(size=n), F32)
    begin, end = jnp.asarray(begin[perm], jnp.int32), jnp.asarray(end[perm], jnp.int32)
    out = tpu.segment_sum(grads, src, begin, end, scale, interpret=INTERPRET)
    ref = segment_sum_np(grads, src, begin, end, scale)
    np.testing.assert_allclose(np.asarray(out), ref, **TOL[jnp.dtype(F32)])


# ---- row update -------------------------------------------------------------------------


def update_case(rng, kind, r, d, u, dtype):
    table = jnp.asarray(rng.normal(size=(r, d)), dtype)
    accum = {
        "rowwise_adagrad": jnp.asarray(rng.uniform(0.1, 1, size=r), F32),
        "adagrad": jnp.asarray(rng.uniform(0.1, 1, size=(r, d)), F32),
        "sgd": None,
    }[kind]
    rows = (1 + rng.permutation(r - 2)[: u - 5]).astype(np.int32)
    rows = np.concatenate([[0, r - 1], rows[:2], [-3], rows[2:], [r, r]])  # ends, a negative, sentinels
    grads = jnp.asarray(rng.normal(size=(len(rows), d)), F32)
    return table, accum, jnp.asarray(rows, jnp.int32), grads


def check_update(out, ref, before, rows):
    """Touched rows close to the reference, untouched rows bit-identical."""
    r = before[0].shape[0]
    touched = np.zeros(r, bool)
    rows = np.asarray(rows)
    touched[rows[(rows >= 0) & (rows < r)]] = True
    for o, x, b in zip(out, ref, before):
        if b is None:
            assert o is None and x is None
            continue
        close(o, x)
        np.testing.assert_array_equal(np.asarray(o)[~touched], np.asarray(b)[~touched])


UPDATES = [
    # kind, row_mean_sq given, dtype, R, D, U
    ("rowwise_adagrad", False, F32, 40, 100, 17),
    ("rowwise_adagrad", True, BF16, 40, 16, 17),
    ("adagrad", False, F32, 40, 60, 17),
    ("adagrad", False, BF16, 700, 4, 600),  # U > one row block, the last one partial
    ("sgd", False, BF16, 30, 128, 12),  # (f32 SGD: test_sparse_update)
]


@pytest.mark.parametrize("kind,given,dtype,r,d,u", UPDATES)
def test_row_update(kind, given, dtype, r, d, u):
    rng = np.random.default_rng(r + d + u)
    table, accum, rows, grads = update_case(rng, kind, r, d, u, dtype)
    msq = jnp.asarray(rng.uniform(size=rows.shape[0]), F32) if given else None
    lr = jnp.float32(0.1)
    out = tpu.row_update(table, accum, rows, grads, lr, msq, kind=kind, eps=1e-8, interpret=INTERPRET)
    ref = row_update_xla(table, accum, rows, grads, lr, msq, kind=kind, eps=1e-8)
    check_update(out, ref, (table, accum), rows)


# ---- the public wrappers with kernel="pallas", target="tpu" -----------------------------


@pytest.mark.parametrize("combiner,with_lengths,weighted,dtype", [
    ("sum", False, False, F32),
    ("mean", True, True, BF16),
])
def test_pooled_lookup_fwd_grad(combiner, with_lengths, weighted, dtype):
    rng = np.random.default_rng(3)
    r, d, n, ln = 30, 20, 11, 6
    table = jnp.asarray(rng.normal(size=(r, d)), dtype)
    ids = jnp.asarray(rng.integers(-2, r + 2, size=(n, ln)), jnp.int32)  # some out of range
    ids = ids.at[1].set(r - 1).at[2, 0].set(0)
    lengths = jnp.asarray(rng.integers(0, ln + 1, size=n), jnp.int32) if with_lengths else None
    w = jnp.asarray(rng.uniform(size=(n, ln)), F32) if weighted else None
    cot = jnp.asarray(rng.normal(size=(n, d)), dtype)

    def run(table, w, kernel):
        kw = PALLAS if kernel == "pallas" else dict(kernel="xla")
        if weighted:  # gradients w.r.t. the table and the weights
            f = lambda t, w: pooled_lookup(t, ids, lengths, w, combiner=combiner, **kw)
            out, vjp = jax.vjp(f, table, w)
        else:
            out, vjp = jax.vjp(lambda t: pooled_lookup(t, ids, lengths, None, combiner=combiner, **kw), table)
        return out, vjp(cot)

    out, grads = run(table, w, "pallas")
    ref, ref_grads = run(table, w, "xla")
    close(out, ref)
    for g, x in zip(grads, ref_grads):
        close(g, x)


def test_sequence_lookup_fwd_grad():
    rng = np.random.default_rng(4)
    r, d, n, s = 25, 12, 4, 9
    table = jnp.asarray(rng.normal(size=(r, d)), F32)
    ids = jnp.asarray(rng.integers(-1, r + 1, size=(n, s)), jnp.int32).at[0].set(3)
    lengths = jnp.asarray([9, 0, 5, 2], jnp.int32)
    cot = jnp.asarray(rng.normal(size=(n, s, d)), F32)

    def run(kw):
        out, vjp = jax.vjp(lambda t: sequence_lookup(t, ids, lengths, **kw), table)
        return out, vjp(cot)[0]

    out, grad = jax.jit(lambda: run(PALLAS))()
    ref, ref_grad = jax.jit(lambda: run(dict(kernel="xla")))()
    close(out, ref)
    close(grad, ref_grad)


@pytest.mark.parametrize("capacity,first", [(7, 7), (5, 100)])  # (None, 0): the VJP tests
def test_row_gradients(capacity, first):
    rng = np.random.default_rng(5)
    r, d, n, ln = 40, 10, 9, 5
    ids = jnp.asarray(rng.integers(-1, r, size=(n, ln)), jnp.int32).at[0].set(2)
    grads = jnp.asarray(rng.normal(size=(n, d)), F32)
    w = jnp.asarray(rng.uniform(size=(n, ln)), F32)
    kw = dict(num_rows=r, combiner="mean", capacity=capacity, first=first)
    out = jax.jit(lambda: row_gradients(ids, grads, None, w, **kw, **PALLAS))()
    ref = jax.jit(lambda: row_gradients(ids, grads, None, w, **kw, kernel="xla"))()
    np.testing.assert_array_equal(out[0], ref[0])
    close(out[1], ref[1])
    assert int(out[2]) == int(ref[2])


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_update(kind):
    rng = np.random.default_rng(6)
    table, accum, rows, grads = update_case(rng, kind, 50, 24, 20, F32)
    kw = dict(kind=kind, eps=1e-6)
    out = jax.jit(lambda: sparse_update(table, accum, rows, grads, 0.05, **kw, **PALLAS))()
    ref = jax.jit(lambda: sparse_update(table, accum, rows, grads, 0.05, **kw, kernel="xla"))()
    check_update(out, ref, (table, accum), rows)


# ---- DMA / semaphore simulation with race detection -------------------------------------


class RaceCheck:
    """`params` to pass as `interpret`; `expect_race` what the detector must report."""

    def __init__(self):
        self.params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
        self.expect_race = False


@pytest.fixture
def races(monkeypatch):
    """Interpret params that simulate DMAs and semaphores on two TensorCores
    (a "parallel" grid axis is split between them, as on a megacore chip)
    and detect races. Small blocks and a DMA ring of 2 slots (plain
    double-buffering: the tightest slot reuse) make tiny inputs span two
    programs and wrap the ring many times. After the test the detector must
    have seen no race (unless the test expects one)."""
    if ON_DEVICE:
        pytest.skip("the DMA / semaphore simulator runs on the CPU only")
    for name, value in [("RING_DEPTH", 2), ("MIN_RING_DEPTH", 2), ("POOL_MAX_BAGS", 8), ("ROW_BLOCK", 128)]:
        monkeypatch.setattr(tuning, name, value)
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as mosaic_interpret
    except ImportError:  # a private module (JAX's own tests read it): without it, check results only
        mosaic_interpret = None
    if mosaic_interpret is not None:
        mosaic_interpret.reset_tpu_interpret_mode_state()
    check = RaceCheck()
    yield check
    if mosaic_interpret is not None:
        found = mosaic_interpret.races is not None and mosaic_interpret.races.races_found
        mosaic_interpret.reset_tpu_interpret_mode_state()
        assert found == check.expect_race


def test_races_pooled_gather(races):
    rng = np.random.default_rng(8)
    table = jnp.asarray(rng.normal(size=(6, 8)), F32)
    ids = bag_ids(rng, 6, 12, 3)  # two bag blocks of 8, on the two cores
    w = jnp.asarray(rng.normal(size=(12, 3)), F32)
    close(tpu.pooled_gather(table, ids, w, interpret=races.params), pooled_gather_xla(table, ids, w))


def test_races_sequence_gather(races):
    rng = np.random.default_rng(9)
    table = jnp.asarray(rng.normal(size=(6, 8)), BF16)
    ids = bag_ids(rng, 6, 2, 4)
    close(tpu.sequence_gather(table, ids, interpret=races.params), sequence_gather_xla(table, ids))


def test_races_segment_sum(races):
    rng = np.random.default_rng(10)
    grads = jnp.asarray(rng.normal(size=(4, 8)), F32)
    src = jnp.asarray(rng.integers(0, 4, size=9), jnp.int32)
    begin = np.full(130, 9, np.int32)  # two row blocks: [0, 128), [128, 130)
    end = np.full(130, 9, np.int32)
    begin[[0, 1, 127, 128, 129]] = [0, 2, 3, 4, 8]  # long and short runs, in both blocks
    end[[0, 1, 127, 128, 129]] = [2, 3, 4, 8, 9]
    begin, end = jnp.asarray(begin), jnp.asarray(end)
    scale = jnp.asarray(rng.normal(size=9), F32)
    out = tpu.segment_sum(grads, src, begin, end, scale, interpret=races.params)
    close(out, segment_sum_xla(grads, src, begin, end, scale))


def sparse_rows(r, u, picks):
    """i32[u]: the sentinel r everywhere but at `picks` (position -> row)."""
    rows = np.full(u, r, np.int32)
    for pos, row in picks.items():
        rows[pos] = row
    return jnp.asarray(rows)


@pytest.mark.parametrize("kind", ["rowwise_adagrad"])  # its f32[R] accumulator: 1-element DMAs
def test_races_row_update(races, kind):
    rng = np.random.default_rng(11)
    table, accum, _, _ = update_case(rng, kind, 9, 8, 6, F32)
    rows = sparse_rows(9, 130, {0: 0, 1: 4, 2: 5, 127: 8, 128: 2, 129: 3})  # both row blocks
    grads = jnp.asarray(rng.normal(size=(130, 8)), F32)
    out = tpu.row_update(table, accum, rows, grads, jnp.float32(0.1), None, kind=kind, eps=1e-8,
                         interpret=races.params)
    ref = row_update_xla(table, accum, rows, grads, jnp.float32(0.1), None, kind=kind, eps=1e-8)
    check_update(out, ref, (table, accum), rows)


def test_race_detector_sees_duplicate_rows(races):
    """The control: a row listed in both row blocks (breaking the uniqueness
    that makes the "parallel" axis safe) is a race between the two cores."""
    races.expect_race = True
    table = jnp.zeros((9, 8), F32)
    rows = sparse_rows(9, 130, {0: 1, 129: 1})
    tpu.row_update(table, None, rows, jnp.ones((130, 8), F32), jnp.float32(0.1), None, kind="sgd", eps=1e-8,
                   interpret=races.params)[0].block_until_ready()


# ---- lowering for TPU from this CPU machine ---------------------------------------------

S = jax.ShapeDtypeStruct
ROWS = 100_000


def export_tpu(fn, *args, abstract_tpu=False):
    """Lower `fn` for TPU with the kernels compiled (interpret=False); the
    Mosaic kernels appear as `tpu_custom_call`s (`export_for` checks). Every
    export runs under an abstract TPU device (`abstract_tpu` is kept to mark
    the kernels that need one: a 1-D operand in HBM)."""
    del abstract_tpu
    return export_for("tpu", fn, *args)


@pytest.mark.parametrize("d,dtype", [(64, F32), (128, BF16), (100, F32)])
@pytest.mark.parametrize("ln", [1, 10, 100, 1000])  # 1000: two position blocks
def test_export_pooled_gather(d, dtype, ln):
    n = 4096
    export_tpu(lambda t, i: tpu.pooled_gather(t, i, None, interpret=False),
               S((ROWS, d), dtype), S((n, ln), jnp.int32))
    export_tpu(lambda t, i, w: tpu.pooled_gather(t, i, w, interpret=False),
               S((ROWS, d), dtype), S((n, ln), jnp.int32), S((n, ln), F32))


@pytest.mark.parametrize("d,dtype", [(64, F32), (128, BF16), (100, F32)])
def test_export_sequence_gather(d, dtype):
    export_tpu(lambda t, i: tpu.sequence_gather(t, i, interpret=False),
               S((ROWS, d), dtype), S((512, 256), jnp.int32))


@pytest.mark.parametrize("d,dtype", [(64, F32), (128, F32), (100, BF16)])
@pytest.mark.parametrize("scaled", [False, True])
def test_export_segment_sum(d, dtype, scaled):
    n = 4096 * 10
    fn = lambda g, s, b, e, *sc: tpu.segment_sum(g, s, b, e, *sc, interpret=False)
    args = [S((4096, d), dtype), S((n,), jnp.int32), S((n,), jnp.int32), S((n,), jnp.int32)]
    export_tpu(fn, *args, *([S((n,), F32)] if scaled else []))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d,dtype", [(64, F32), (128, BF16), (100, F32)])
def test_export_row_update(kind, d, dtype):
    u = 40960
    accum = {"rowwise_adagrad": S((ROWS,), F32), "adagrad": S((ROWS, d), F32), "sgd": None}[kind]
    given = kind == "rowwise_adagrad" and dtype == F32  # with and without row_mean_sq

    def fn(table, accum, rows, grads, lr, *msq):
        return tpu.row_update(table, accum, rows, grads, lr, *msq, kind=kind, eps=1e-8, interpret=False)

    exported = export_tpu(fn, S((ROWS, d), dtype), accum, S((u,), jnp.int32), S((u, d), F32), S((), F32),
                          *([S((u,), F32)] if given else []), abstract_tpu=kind == "rowwise_adagrad")
    # in place: the table (and accumulator) are aliased to the kernel's outputs
    assert "output_operand_aliases" in exported.mlir_module()


def test_export_wrappers_tpu():
    """The public wrappers, forward and backward, lowered for TPU."""
    d, n, ln = 64, 4096, 10
    table, ids = S((ROWS, d), F32), S((n, ln), jnp.int32)
    kw = dict(kernel="pallas", target="tpu", interpret=False)

    def loss(t, i):
        return jnp.sum(pooled_lookup(t, i, combiner="mean", **kw) ** 2)

    export_tpu(jax.grad(loss), table, ids)
    export_tpu(lambda t, i: sequence_lookup(t, i, **kw), table, ids)
    export_tpu(lambda i, g: row_gradients(i, g, num_rows=ROWS, capacity=n * ln, **kw), ids, S((n, d), F32))
    export_tpu(lambda t, a, r, g: sparse_update(t, a, r, g, 0.1, **kw), table, S((ROWS,), F32),
               S((n,), jnp.int32), S((n, d), F32), abstract_tpu=True)


def test_export_serializes():
    """An exported kernel round-trips through `Exported.serialize()` (which
    needs `flatbuffers`, a test dependency)."""
    exported = export_tpu(lambda t, i: tpu.sequence_gather(t, i, interpret=False),
                          S((ROWS, 64), F32), S((512, 256), jnp.int32))
    again = jax.export.deserialize(exported.serialize())
    assert again.platforms == ("tpu",) and "tpu_custom_call" in again.mlir_module()
