"""routing.pool_rows: the pooled lookup of the XLA path, at every bag length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdmt.embeddings import routing


def _sequential_f32(table, idx):
    """Position after position in float32, -1 (and any id < 0) skipped."""
    out = np.zeros(idx.shape[:-1] + table.shape[1:], np.float32)
    for p in range(idx.shape[-1]):
        ids = idx[..., p]
        out = out + np.where((ids >= 0)[..., None], table[np.maximum(ids, 0)], np.float32(0))
    return out


@pytest.mark.parametrize("pooling", [3, 16, 17, 40, 200])
def test_pool_rows_sums_positions_in_order_bit_for_bit(pooling):
    rng = np.random.default_rng(pooling)
    table = rng.standard_normal((500, 8)).astype(np.float32)
    idx = rng.integers(-1, 500, (2, 30, pooling)).astype(np.int32)  # -1: no id
    got = np.asarray(jax.jit(routing.pool_rows)(table, idx))
    np.testing.assert_array_equal(got, _sequential_f32(table, idx))
    # a bound on the positions, static and traced
    got_static = np.asarray(jax.jit(lambda t, i: routing.pool_rows(t, i, pooling // 2 + 1))(table, idx))
    np.testing.assert_array_equal(got_static, _sequential_f32(table, idx[..., : pooling // 2 + 1]))
    got_traced = np.asarray(jax.jit(routing.pool_rows)(table, idx, jnp.int32(pooling // 2 + 1)))
    np.testing.assert_array_equal(got_traced, got_static)


def test_pool_rows_program_does_not_grow_with_the_pooling_factor():
    table = jnp.zeros((100, 4))

    def size(pooling):
        idx = jnp.zeros((8, pooling), jnp.int32)
        return len(jax.make_jaxpr(routing.pool_rows)(table, idx).eqns)

    assert size(40) == size(400) <= size(routing._UNROLL) + 4


@pytest.mark.parametrize("cols", [
    np.arange(12).reshape(3, 4),                      # one run: a slice
    np.repeat(np.arange(2, 8), 3),                    # each column repeated: a broadcast
    np.array([[0, 1, 2, -1], [5, 6, -1, -1], [9, 10, 11, -1]]),  # runs and the last column
    np.array([3, 3, 3, 1, 1, 0, 2, 4]),               # constant and rising runs
    np.concatenate([[i] * k for i, k in enumerate([3, 1, 2, 5])]),  # uneven repeats
    np.random.default_rng(1).integers(-1, 12, (7, 5)),  # anything: runs or the gather
    np.array([], np.int64),
])
def test_take_columns_is_numpy_indexing(cols):
    x = np.random.default_rng(0).integers(0, 100, (5, 12)).astype(np.int32)
    want = x[:, cols]
    for max_runs in (64, 1):  # slices, and the gather it falls back to
        got = np.asarray(jax.jit(lambda a: routing.take_columns(a, cols, max_runs=max_runs))(x))
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_take_columns_of_the_lookup_ids_is_not_a_gather():
    """The ids' column selection compiles to slices XLA fuses, not a gather."""
    cols = np.arange(260).reshape(26, 10)
    text = jax.jit(lambda a: routing.take_columns(a, cols) + 1).lower(
        jax.ShapeDtypeStruct((64, 261), jnp.int32)).compile().as_text()
    assert "gather(" not in text
