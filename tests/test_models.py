"""Dense models with sequence features: SequencePooling, and DLRM / DCN around it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdmt.models import (
    DCN,
    DLRM,
    SEQUENCE_POOLING,
    SequencePooling,
    init_dcn,
    init_dlrm,
    stack_sequences,
)

B, FS, S, D = 5, 3, 6, 4
LENGTHS = np.array([[0, 6, 1], [3, 0, 6], [6, 6, 6], [2, 5, 0], [1, 1, 4]], np.int32)


def sequences(seed=0, garbage=0.0):
    """seq f32[B, FS, S, D] with `garbage` added past each length."""
    rng = np.random.default_rng(seed)
    seq = rng.normal(size=(B, FS, S, D)).astype(np.float32)
    pad = np.arange(S)[None, None, :] >= LENGTHS[..., None]
    return np.where(pad[..., None], np.float32(garbage), seq)


def random_attention_params(seed=1, dq=D):
    """Attention parameters away from their zero initialisation."""
    rng = np.random.default_rng(seed)
    return {
        "query_bias": jnp.asarray(rng.normal(size=(FS, D)), jnp.float32),
        "query_kernel": jnp.asarray(rng.normal(size=(FS, dq, D)), jnp.float32),
    }


def numpy_attention(params, seq, lengths, query):
    q = params["query_bias"][None] + np.einsum("bq,fqd->bfd", query, params["query_kernel"])
    out = np.zeros((B, FS, D))
    for b in range(B):
        for f in range(FS):
            n = lengths[b, f]
            if n == 0:
                continue
            a = seq[b, f, :n] @ q[b, f] / np.sqrt(D)
            w = np.exp(a - a.max())
            out[b, f] = (w / w.sum()) @ seq[b, f, :n]
    return out


# -------------------------------------------------------------------- pooling


def test_mean_pooling_matches_numpy_and_ignores_padding():
    pool = SequencePooling("mean")
    assert pool.init(jax.random.key(0), sequences(), LENGTHS) == {}  # no parameters
    out = np.asarray(pool.apply({}, sequences(garbage=1e6), LENGTHS))
    seq = sequences()
    want = np.zeros((B, FS, D))
    for b in range(B):
        for f in range(FS):
            if LENGTHS[b, f]:
                want[b, f] = seq[b, f, : LENGTHS[b, f]].mean(0)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert np.all(out[LENGTHS == 0] == 0)  # length 0: zeros, not NaN
    np.testing.assert_allclose(out[2], seq[2].mean(1), rtol=1e-5)  # full length


def test_attention_matches_numpy_and_starts_as_mean():
    pool = SequencePooling("attention")
    query = np.random.default_rng(2).normal(size=(B, 7)).astype(np.float32)
    params = pool.init(jax.random.key(0), sequences(), LENGTHS, query)["params"]
    assert jax.tree.map(jnp.shape, params) == {"query_bias": (FS, D), "query_kernel": (FS, 7, D)}
    mean = SequencePooling("mean").apply({}, sequences(), LENGTHS)
    np.testing.assert_allclose(
        pool.apply({"params": params}, sequences(), LENGTHS, query), mean, rtol=1e-5, atol=1e-6
    )
    params = random_attention_params(dq=7)
    out = np.asarray(pool.apply({"params": params}, sequences(), LENGTHS, query))
    want = numpy_attention(jax.tree.map(np.asarray, params), sequences(), LENGTHS, query)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    assert np.abs(out - np.asarray(mean)).max() > 0.1  # it really weights the positions
    # without a query only the learned per-feature query is used
    alone = pool.apply({"params": {"query_bias": params["query_bias"]}}, sequences(), LENGTHS)
    zero = dict(params, query_kernel=jnp.zeros_like(params["query_kernel"]))
    np.testing.assert_allclose(
        alone, pool.apply({"params": zero}, sequences(), LENGTHS, query), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("mode", SEQUENCE_POOLING)
def test_padding_and_order_do_not_matter(mode):
    pool = SequencePooling(mode)
    query = np.random.default_rng(3).normal(size=(B, D)).astype(np.float32)
    params = {"params": random_attention_params()} if mode == "attention" else {}
    out = np.asarray(pool.apply(params, sequences(), LENGTHS, query))
    assert np.all(np.isfinite(out)) and np.all(out[LENGTHS == 0] == 0)
    for garbage in (1e4, -1e30, np.nan):  # whatever lies past the length
        np.testing.assert_array_equal(
            pool.apply(params, sequences(garbage=garbage), LENGTHS, query), out
        )
    # reversing the valid positions of every sequence gives the same result
    rev = sequences().copy()
    for b in range(B):
        for f in range(FS):
            n = LENGTHS[b, f]
            rev[b, f, :n] = rev[b, f, :n][::-1]
    np.testing.assert_allclose(pool.apply(params, rev, LENGTHS, query), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", SEQUENCE_POOLING)
def test_pooling_gradients_are_finite_and_skip_padding(mode):
    pool = SequencePooling(mode)
    query = np.random.default_rng(4).normal(size=(B, D)).astype(np.float32)
    params = random_attention_params() if mode == "attention" else {}

    def loss(params, seq, query):
        return jnp.sum(pool.apply({"params": params}, seq, LENGTHS, query) ** 2)

    g_params, g_seq, g_query = jax.grad(loss, argnums=(0, 1, 2))(params, sequences(), query)
    for g in (*jax.tree.leaves(g_params), g_seq, g_query):
        assert np.all(np.isfinite(g))
    pad = np.arange(S)[None, None, :] >= LENGTHS[..., None]
    assert np.all(np.asarray(g_seq)[pad] == 0)  # padding gets no gradient
    assert np.all(np.abs(np.asarray(g_seq)).sum(-1)[~pad] > 0)  # every valid position does
    if mode == "attention":
        assert all(np.any(g) for g in jax.tree.leaves(g_params))


def test_stack_sequences_pads_to_the_longest():
    a, b = jnp.ones((2, 3, 4)), 2 * jnp.ones((2, 5, 4))
    s = np.asarray(stack_sequences([a, b]))
    assert s.shape == (2, 2, 5, 4)
    assert np.all(s[:, 0, :3] == 1) and np.all(s[:, 0, 3:] == 0) and np.all(s[:, 1] == 2)
    with pytest.raises(ValueError, match="at least one"):
        stack_sequences([])


def test_pooling_errors():
    with pytest.raises(ValueError, match="sequence pooling 'max'; available: mean, attention"):
        SequencePooling("max")
    with pytest.raises(ValueError, match="unknown sequence pooling"):
        DLRM(4, sequence_pooling="sum")
    with pytest.raises(ValueError, match="unknown sequence pooling"):
        DCN(4, sequence_pooling="sum")
    with pytest.raises(ValueError, match=r"lengths i32\[B, Fs\]"):
        SequencePooling().init(jax.random.key(0), sequences(), LENGTHS[:, :2])


# --------------------------------------------------------------------- models


def make_model(kind, mode="mean"):
    if kind == "dlrm":
        return DLRM(D, bottom=(8,), top=(8,), sequence_pooling=mode), init_dlrm
    model = DCN(D, bottom=(8,), cross_layers=2, low_rank=3, top=(8,), sequence_pooling=mode)
    return model, init_dcn


@pytest.mark.parametrize("kind", ["dlrm", "dcn"])
def test_without_sequences_nothing_changes(kind):
    """No sequence features: the parameters and outputs of the pooled-only model."""
    rng = np.random.default_rng(5)
    dense = rng.normal(size=(B, 3)).astype(np.float32)
    embs = rng.normal(size=(B, 2, D)).astype(np.float32)
    model, init = make_model(kind)
    params = init(model, 7, 3, 2)
    shapes = jax.tree.map(jnp.shape, params)
    n = 2 * D + D  # [x, e_1, e_2] flattened (DCN); DLRM: x and 3 pairs
    if kind == "dlrm":
        assert shapes["top"]["dense_0"]["kernel"] == (D + 3, 8)
        assert sorted(shapes) == ["bottom", "top"]
    else:
        assert shapes["cross_0"]["V"]["kernel"] == (n, 3)
        assert sorted(shapes) == ["bottom", "cross_0", "cross_1", "top"]
    out = model.apply({"params": params}, dense, embs)
    attention, _ = make_model(kind, "attention")
    p_att = init(attention, 7, 3, 2, num_sequence=0, sequence_len=9)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, p_att))
    np.testing.assert_array_equal(attention.apply({"params": params}, dense, embs), out)
    # adding sequence features leaves the other modules' initialisation alone
    with_seq = init(attention, 7, 3, 2, num_sequence=FS, sequence_len=S)
    assert jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params["bottom"], with_seq["bottom"])
    )
    assert jax.tree.map(jnp.shape, with_seq["sequence_pooling"]) == {
        "query_bias": (FS, D), "query_kernel": (FS, D, D),
    }


@pytest.mark.parametrize("kind", ["dlrm", "dcn"])
def test_pooled_sequences_join_the_interaction(kind):
    """With mean pooling, sequence features act exactly like pooled features appended to embs."""
    rng = np.random.default_rng(6)
    dense = rng.normal(size=(B, 3)).astype(np.float32)
    embs = rng.normal(size=(B, 2, D)).astype(np.float32)
    model, init = make_model(kind)
    params = init(model, 0, 3, 2, num_sequence=FS, sequence_len=S)
    assert jax.tree.structure(params) == jax.tree.structure(init(model, 0, 3, 2 + FS))
    pooled = SequencePooling("mean").apply({}, sequences(), LENGTHS)
    np.testing.assert_allclose(
        model.apply({"params": params}, dense, embs, sequences(garbage=5.0), LENGTHS),
        model.apply({"params": params}, dense, np.concatenate([embs, pooled], 1)),
        rtol=1e-5, atol=1e-6,
    )
    with pytest.raises(ValueError, match="both seq and seq_lengths"):
        model.apply({"params": params}, dense, embs, sequences())
    with pytest.raises(ValueError, match=r"sequence embeddings f32\[B, Fs, S, 4\]"):
        model.apply({"params": params}, dense, embs, sequences()[..., :3], LENGTHS)


@pytest.mark.parametrize("mode", SEQUENCE_POOLING)
@pytest.mark.parametrize("kind", ["dlrm", "dcn"])
def test_models_with_sequences_learn(kind, mode):
    """A label that depends only on the sequences: a few Adam steps lower the loss."""
    rng = np.random.default_rng(7)
    n = 128
    dense = rng.normal(size=(n, 3)).astype(np.float32)
    embs = rng.normal(size=(n, 1, D)).astype(np.float32)
    seq = rng.normal(size=(n, 2, S, D)).astype(np.float32)
    lengths = rng.integers(0, S + 1, size=(n, 2)).astype(np.int32)
    valid = np.arange(S)[None, None, :] < lengths[..., None]
    seq = np.where(valid[..., None], seq, 0)
    labels = (seq[:, 0, :, 0].sum(1) - seq[:, 1, :, 1].sum(1) > 0).astype(np.float32)

    model, init = make_model(kind, mode)
    params = init(model, 0, 3, 1, num_sequence=2, sequence_len=S)
    tx = optax.adam(0.02)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = model.apply({"params": p}, dense, embs, seq, lengths)
            return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, g

    losses = []
    for _ in range(40):
        params, opt_state, loss, g = step(params, opt_state)
        losses.append(float(loss))
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
    assert losses[-1] < 0.7 * losses[0], losses
    if mode == "attention":  # the attention parameters moved off their zero start
        assert np.any(params["sequence_pooling"]["query_kernel"] != 0)
