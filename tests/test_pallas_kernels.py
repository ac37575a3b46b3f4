"""The kernel wrappers and their XLA references (jdmt/pallas_kernels): the
choice of implementation, input validation, and the references against plain
numpy. The kernels themselves are checked against these references in
test_kernels_tpu.py and test_kernels_gpu.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdmt.pallas_kernels import (
    Impl,
    pooled_lookup,
    pooled_lookup_reference,
    resolve,
    row_gradients_reference,
    segment_sum_reference,
    sequence_lookup,
    sparse_update_reference,
)

R, D, N, L = 40, 6, 11, 5


@pytest.fixture(scope="module")
def bags():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((R, D)).astype(np.float32)
    ids = rng.integers(-3, R + 3, (N, L)).astype(np.int32)  # some negative, some >= R
    ids[0] = 7  # one row everywhere in a bag
    ids[1, 0], ids[1, 1] = 0, R - 1  # both ends of the table
    lengths = rng.integers(0, L + 1, N).astype(np.int32)
    lengths[0], lengths[2] = L, 0  # a full and an empty bag
    weights = rng.standard_normal((N, L)).astype(np.float32)
    valid = (ids >= 0) & (ids < R) & (np.arange(L)[None] < lengths[:, None])
    return table, ids, lengths, weights, valid


def test_resolve():
    assert resolve("auto", platform="cpu") == Impl()
    # 'auto' is XLA everywhere until the kernels have run on the hardware
    assert resolve("auto", platform="tpu") == Impl()
    assert resolve("auto", platform="gpu") == Impl()
    assert resolve("pallas", platform="tpu") == Impl("pallas", "tpu", False)
    assert resolve("pallas", platform="cpu") == Impl("pallas", "tpu", True)
    assert resolve("pallas", target="gpu", platform="cpu") == Impl("pallas", "gpu", True)
    assert resolve("pallas", target="tpu", interpret=False, platform="cpu").interpret is False
    assert resolve("xla", platform="tpu") == Impl()
    with pytest.raises(ValueError, match="kernel must be one of"):
        resolve("triton")
    with pytest.raises(ValueError, match="target must be one of"):
        resolve("pallas", target="rocm")


def test_mosaic_gpu_needs_hopper():
    from types import SimpleNamespace as NS

    from jdmt.pallas_kernels.common import check_mosaic_gpu

    client = NS(platform_version="cuda 12090")
    check_mosaic_gpu([NS(platform="gpu", client=client, device_kind="H100", compute_capability="9.0")])
    with pytest.raises(ValueError, match="compute capability 9.0.*A100 has 8.0.*kernel='xla'"):
        check_mosaic_gpu([NS(platform="gpu", client=client, device_kind="A100", compute_capability="8.0")])
    with pytest.raises(ValueError, match="ROCm device"):
        check_mosaic_gpu([NS(platform="rocm", client=NS(platform_version="rocm 6"),
                             device_kind="MI300X", compute_capability="gfx942")])


def test_validation_errors(bags):
    table, ids, lengths, weights, _ = bags
    with pytest.raises(ValueError, match="table must be"):
        pooled_lookup(table[0], ids, kernel="xla")
    with pytest.raises(ValueError, match="ids must be integer"):
        pooled_lookup(table, ids.astype(np.float32), kernel="xla")
    with pytest.raises(ValueError, match="lengths must be"):
        pooled_lookup(table, ids, lengths[:3], kernel="xla")
    with pytest.raises(ValueError, match="weights must have"):
        pooled_lookup(table, ids, None, weights[:, :2], kernel="xla")
    with pytest.raises(ValueError, match="combiner must be"):
        pooled_lookup(table, ids, combiner="max", kernel="xla")
    with pytest.raises(ValueError, match="needs an accumulator"):
        sparse_update_reference(table, None, ids[0], np.zeros((L, D), np.float32), 0.1)
    with pytest.raises(ValueError, match="grads must be"):
        row_gradients_reference(ids, np.zeros((N + 1, D), np.float32), num_rows=R)


@pytest.mark.parametrize("combiner", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_pooled_reference_and_gradients(bags, combiner, weighted):
    table, ids, lengths, weights, valid = bags
    w = weights if weighted else None
    scale = np.where(valid, weights if weighted else 1.0, 0.0)
    if combiner == "mean":
        scale = scale / np.maximum(valid.sum(1), 1)[:, None]

    def dense(t, w_):  # the same function by plain autodiff
        s = jnp.where(valid, 1.0 if w_ is None else w_, 0.0)
        if combiner == "mean":
            s = s / np.maximum(valid.sum(1), 1)[:, None]
        return jnp.einsum("nld,nl->nd", jnp.take(t, np.clip(ids, 0, R - 1), axis=0), s)

    want = np.einsum("nld,nl->nd", table[np.clip(ids, 0, R - 1)], scale)
    got = pooled_lookup_reference(table, ids, lengths, w, combiner=combiner)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[2] == 0)  # the empty bag

    f = lambda t, w_: jnp.sum(jnp.sin(pooled_lookup(t, ids, lengths, w_, combiner=combiner,  # noqa: E731
                                                       kernel="xla")))
    g = lambda t, w_: jnp.sum(jnp.sin(dense(t, w_)))  # noqa: E731
    argnums = (0, 1) if weighted else 0
    for a, b in zip(jax.tree.leaves(jax.grad(f, argnums)(table, w)),
                    jax.tree.leaves(jax.grad(g, argnums)(table, w))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sequence_gradient_is_the_rows_summed_gradients(bags):
    table, ids, lengths, _, valid = bags
    g = np.random.default_rng(1).standard_normal((N, L, D)).astype(np.float32)
    _, vjp = jax.vjp(lambda t: sequence_lookup(t, ids, lengths, kernel="xla"), table)
    (got,) = vjp(g)
    want = np.zeros_like(table)
    np.add.at(want, ids[valid], g[valid])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_row_gradients_reference_in_chunks(bags):
    """Unique rows ascending, summed gradients, the total count, and chunks
    (`capacity`, `first`) that together hold every row once."""
    table, ids, lengths, weights, valid = bags
    g = np.random.default_rng(2).standard_normal((N, D)).astype(np.float32)
    want = {}
    for n, pos in zip(*np.nonzero(valid)):
        want[ids[n, pos]] = want.get(ids[n, pos], 0) + weights[n, pos] * g[n]
    rows_all, got = [], {}
    for first in range(0, 64, 8):
        rows, summed, unique = row_gradients_reference(ids, g, lengths, weights, num_rows=R,
                                                       capacity=8, first=first)
        assert int(unique) == len(want)
        for r, s in zip(np.asarray(rows), np.asarray(summed)):
            if r < R:
                got[int(r)] = s
                rows_all.append(int(r))
            else:
                assert r == R and not s.any()  # padding: the sentinel row, zero gradient
    assert rows_all == sorted(want)
    for r, s in want.items():
        np.testing.assert_allclose(got[r], s, rtol=1e-5, atol=1e-6)


def test_segment_sum_reference_with_any_runs():
    """Runs in any order, empty and reversed ones anywhere (also inside or at
    the start of another run): each output sums exactly its own run."""
    rng = np.random.default_rng(3)
    n, u = 60, 25
    grads = rng.standard_normal((9, D)).astype(np.float32)
    src = rng.integers(0, 9, n).astype(np.int32)
    scale = rng.standard_normal(n).astype(np.float32)
    cuts = np.sort(rng.choice(np.arange(1, n), 14, replace=False))
    runs = list(zip(np.r_[0, cuts], np.r_[cuts, n]))  # 15 disjoint runs covering [0, n)
    runs += [(b, b) for b in rng.integers(0, n, 6)] + [(b, b - 2) for b in rng.integers(2, n, 4)]
    order = rng.permutation(len(runs))
    begin = np.array([runs[i][0] for i in order], np.int32)
    end = np.array([runs[i][1] for i in order], np.int32)
    want = np.stack([(scale[b:e, None] * grads[src[b:e]]).sum(0) if e > b else np.zeros(D)
                     for b, e in zip(begin, end)])
    got = segment_sum_reference(grads, src, begin, end, scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert u == len(runs)


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "adagrad", "sgd"])
def test_sparse_update_reference_is_fbgemms_rule(kind):
    rng = np.random.default_rng(4)
    table = rng.standard_normal((R, D)).astype(np.float32)
    acc = {"rowwise_adagrad": rng.random(R), "adagrad": rng.random((R, D)), "sgd": None}[kind]
    acc = None if acc is None else acc.astype(np.float32)
    rows = np.array([3, 0, R - 1, R, -1], np.int32)  # the last two: skipped
    g = rng.standard_normal((5, D)).astype(np.float32)
    t2, a2 = sparse_update_reference(table, acc, rows, g, 0.1, kind=kind, eps=1e-8)
    t2 = np.asarray(t2)
    for i, r in enumerate(rows[:3]):
        if kind == "rowwise_adagrad":
            m = acc[r] + np.mean(g[i] ** 2)
            np.testing.assert_allclose(a2[r], m, rtol=1e-6)
            np.testing.assert_allclose(t2[r], table[r] - 0.1 * g[i] / (np.sqrt(m) + 1e-8), rtol=1e-5)
        elif kind == "adagrad":
            m = acc[r] + g[i] ** 2
            np.testing.assert_allclose(t2[r], table[r] - 0.1 * g[i] / (np.sqrt(m) + 1e-8), rtol=1e-5)
        else:
            np.testing.assert_allclose(t2[r], table[r] - 0.1 * g[i], rtol=1e-6)
    untouched = np.setdiff1d(np.arange(R), rows[:3])
    assert np.array_equal(t2[untouched], table[untouched])
