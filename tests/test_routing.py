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


def test_one_to_one_take_and_its_gradient_are_jnp_takes():
    """Value and gradient equal `jnp.take`'s (out-of-range indices: zeros);
    the gradient is a gather through the inverse, no scatter."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 6, 2)), jnp.float32)
    idx = np.array([[4, 0, 9], [2, 6, 5]])  # 9 and 6: out of range; 1 and 3 never taken
    inv = routing.inverse_index(idx.reshape(1, -1), 6)[0]
    np.testing.assert_array_equal(inv, [1, 6, 3, 6, 0, 5])  # 6 = idx.size: not taken
    w = jnp.arange(3 * 6 * 2, dtype=jnp.float32).reshape(3, 2, 3, 2)

    def ours(x):
        return jnp.sum(routing.one_to_one_take(x, jnp.asarray(idx), jnp.asarray(inv), 1) * w)

    def ref(x):
        y = jnp.take(x, idx.reshape(-1), axis=1, mode="fill", fill_value=0).reshape(3, 2, 3, 2)
        return jnp.sum(y * w)

    assert float(ours(x)) == float(ref(x))
    np.testing.assert_array_equal(jax.grad(ours)(x), jax.grad(ref)(x))
    text = jax.jit(jax.grad(ours)).lower(x).compile().as_text()
    assert "scatter" not in text
    with pytest.raises(ValueError, match="more than once"):
        routing.inverse_index(np.array([[1, 2, 1]]), 4)
