"""16-bit tables (bf16, f16): lookups of the widened rows, f32 optimizer math,
stochastic rounding on write (unbiased, identical on every replica and in the
XLA and C++ paths), halved memory, checkpoints across table types, and the
trainer's flag."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_embeddings import FEATURES, TYPES, make_batch, random_grads

from jdmt import precision
from jdmt.embeddings import ShardedEmbeddings, SparseOptimizer, cpu_kernels
from jdmt.pallas_kernels.sparse_update import row_update_xla
from jdmt.train import TrainConfig, Trainer, train_and_evaluate
from jdmt.train.checkpoint import Checkpointer

HALF = ["bf16", "f16"]


def _ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of `dtype`'s values around f32 `x` (the larger neighbour gap)."""
    e = np.floor(np.log2(np.maximum(np.abs(x), 1e-30)))
    if dtype == "bf16":
        return 2.0 ** (e - 7)
    return 2.0 ** (np.maximum(e, -14) - 10)


def _steps(emb, state, batch, grads, seeds):
    """Jitted sparse steps with loss sum(emb * grads); returns (state, the
    first step's embeddings)."""
    pooled = [f.name for f in emb.features.sparse if f.pooled]
    wp = jnp.concatenate([grads[n] for n in pooled], axis=1)
    seq = {n: grads[n] for n in grads if n not in pooled}

    @jax.jit
    def step(state, ids, lengths, seed):
        embs, ctx, stats = emb.forward(state, ids, lengths)
        g = jax.grad(lambda e: jnp.sum(e.pooled * wp) + sum(jnp.sum(e.sequence[k] * seq[k]) for k in seq))(embs)
        new, _ = emb.update(state, ctx, g, ids, lengths, skip=emb.must_skip(stats), seed=seed)
        return new, embs

    first = None
    for s in seeds:
        state, embs = step(state, *batch, jnp.uint32(s))
        first = embs if first is None else first
    return state, first


# every route with bf16; f16 differs only in the rounding, which every route shares
@pytest.mark.parametrize("dtype,sharding", [("bf16", t) for t in TYPES] + [("f16", "table_wise"), ("f16", "row_wise")])
def test_a_half_table_reads_its_widened_rows_and_rounds_each_update_to_a_neighbour(mesh24, dtype, sharding):
    """The same step on the 16-bit table and on an f32 table holding its
    widened values: the lookups are bit-identical, the optimizer state is
    bit-identical, every touched element lands on one of the two 16-bit
    neighbours of the f32 result, and untouched rows keep their bits."""
    batch = make_batch(FEATURES, id_range=20)
    opt = SparseOptimizer(lr=0.05)
    half = ShardedEmbeddings(FEATURES, mesh24, sharding, opt, table_dtype=dtype, cpu_kernels=False)
    full = ShardedEmbeddings(FEATURES, mesh24, sharding, opt, cpu_kernels=False)
    s16 = half.init(seed=3)
    assert all(t.weights.dtype == precision.storage_dtype(dtype) for t in s16.values())
    tables, accs = half.to_dense(s16)
    s32 = full.from_dense(tables, accs)
    grads = random_grads(FEATURES, {f.name: (16, f.dim) if f.pooled else (16, f.max_len, f.dim)
                                    for f in FEATURES.sparse})
    n16, e16 = _steps(half, s16, batch, grads, [7])
    n32, e32 = _steps(full, s32, batch, grads, [7])
    np.testing.assert_array_equal(np.asarray(e16.pooled), np.asarray(e32.pooled))
    for k in e32.sequence:
        np.testing.assert_array_equal(np.asarray(e16.sequence[k]), np.asarray(e32.sequence[k]))
    got, got_a = half.to_dense(n16)
    want, want_a = full.to_dense(n32)
    moved = 0
    for f in FEATURES.sparse:
        np.testing.assert_array_equal(got_a[f.name], want_a[f.name])
        touched = want[f.name] != tables[f.name]
        g, w = got[f.name][touched], want[f.name][touched]
        assert np.all(np.abs(g - w) < _ulp(w, dtype)), f.name
        assert np.array_equal(got[f.name][~touched], tables[f.name][~touched]), f.name
        moved += int(np.sum(g != tables[f.name][touched]))
    assert moved > 0


@pytest.mark.parametrize("dtype", HALF)
def test_stochastic_rounding_is_unbiased_where_nearest_would_lose_the_update(dtype):
    """400 SGD steps of 1e-4 on 1.0 (half a bf16 ulp is 0.0039, of f16
    0.00049): round-to-nearest would never move; the stochastic rounding
    moves the row by the steps' sum on average."""
    d, steps, lr = 512, 400, 1e-4
    table = precision.encode(jnp.ones((2, d)), dtype)
    rows = jnp.array([0], jnp.int32)
    g = jnp.ones((1, d), jnp.float32)
    step = jax.jit(lambda t, s: row_update_xla(t, None, rows, g, lr, None, kind="sgd", eps=0.0, seed=s)[0])
    for s in range(steps):
        table = step(table, jnp.uint32(s))
    out = np.asarray(precision.widen(table))
    assert np.all(out[1] == 1.0)  # the untouched row
    mean = out[0].mean()
    # each element's error is at most one ulp per step, independent over columns
    ulp = 2.0 ** -8 if dtype == "bf16" else 2.0 ** -11  # just below 1.0
    assert abs(mean - (1.0 - steps * lr)) < 6 * ulp * np.sqrt(steps) / np.sqrt(d) + 1e-6, mean
    assert np.float32(1.0 - steps * lr).astype(precision.resolve_dtype(dtype)) != 1.0  # visible at 16 bits


def test_replicas_of_a_half_table_stay_bit_identical(mesh24):
    """Data-parallel 16-bit tables: every device rounds its replica alike."""
    batch = make_batch(FEATURES, id_range=20)
    emb = ShardedEmbeddings(FEATURES, mesh24, "data_parallel", SparseOptimizer(lr=0.05),
                            table_dtype="bf16", cpu_kernels=False)
    grads = random_grads(FEATURES, {f.name: (16, f.dim) if f.pooled else (16, f.max_len, f.dim)
                                    for f in FEATURES.sparse})
    state, _ = _steps(emb, emb.init(), batch, grads, [1, 2, 3])
    for name, t in state.items():
        shards = [np.asarray(s.data).view(np.uint16) for s in t.weights.addressable_shards]
        assert len(shards) == 8
        for s in shards[1:]:
            np.testing.assert_array_equal(s, shards[0], err_msg=name)


def test_half_tables_need_a_seed_and_no_pallas(mesh24):
    emb = ShardedEmbeddings(FEATURES, mesh24, "table_wise", table_dtype="f16", cpu_kernels=False)
    state = emb.init()
    ids, lengths = make_batch(FEATURES)
    embs, ctx, _ = jax.jit(emb.forward)(state, ids, lengths)
    g = jax.tree.map(jnp.ones_like, embs)
    with pytest.raises(TypeError, match="seed"):
        emb.update(state, ctx, g, ids, lengths)
    with pytest.raises(ValueError, match="Pallas"):
        ShardedEmbeddings(FEATURES, mesh24, "table_wise", table_dtype="bf16", kernel="pallas")
    with pytest.raises(ValueError, match="table dtype"):
        ShardedEmbeddings(FEATURES, mesh24, "table_wise", table_dtype="f8")
    with pytest.raises(ValueError, match="Pallas"):
        TrainConfig(table_dtype="bf16", kernel="pallas")
    with pytest.raises(ValueError, match="table_dtype"):
        TrainConfig(table_dtype="fp16")


def test_half_tables_halve_the_table_bytes(mesh24):
    f32 = ShardedEmbeddings(FEATURES, mesh24, "row_wise", SparseOptimizer("sgd"))
    bf16 = ShardedEmbeddings(FEATURES, mesh24, "row_wise", SparseOptimizer("sgd"), table_dtype="bf16")
    assert bf16.memory().owned == f32.memory().owned / 2
    assert bf16.memory().allocated == f32.memory().allocated / 2


@pytest.mark.skipif(not cpu_kernels.available(),
                    reason=f"the C++ CPU kernels are unavailable: {cpu_kernels.unavailable_reason()}")
@pytest.mark.parametrize("dtype,sharding", [("bf16", "table_wise"), ("bf16", "row_wise"), ("bf16", "data_parallel"),
                                            ("f16", "row_wise")])
def test_the_cpp_and_xla_paths_write_the_same_bits(mesh24, dtype, sharding):
    """Three steps of the C++ kernels and of the XLA path on a 16-bit table:
    the same lookups and the same table bits (the rounding's random bits
    are one function of (seed, row, column) in both)."""
    batch = make_batch(FEATURES, id_range=20)
    grads = random_grads(FEATURES, {f.name: (16, f.dim) if f.pooled else (16, f.max_len, f.dim)
                                    for f in FEATURES.sparse})
    out = []
    for ck in (True, False):
        emb = ShardedEmbeddings(FEATURES, mesh24, sharding, SparseOptimizer(lr=0.05), table_dtype=dtype,
                                cpu_kernels=ck)
        assert emb.cpu_kernels is ck
        state, embs = _steps(emb, emb.init(seed=1), batch, grads, [11, 12, 13])
        out.append((emb.to_dense(state)[0], np.asarray(embs.pooled)))
    np.testing.assert_array_equal(out[0][1], out[1][1])
    for f in FEATURES.sparse:
        np.testing.assert_array_equal(out[0][0][f.name], out[1][0][f.name], err_msg=f.name)


def _tiny(**kw) -> TrainConfig:
    base = dict(num_tables=4, rows_per_table=300, pooling=3, embedding_dim=8, global_batch=128,
                eval_batches=1, bottom_mlp=(16,), top_mlp=(16,), progress=False)
    return TrainConfig(**{**base, **kw})


def test_trainer_runs_half_tables_and_checkpoints_cross_table_types(mesh24, tmp_path):
    """A bf16 run's losses follow the f32 run's, it says what ran, and its
    checkpoint restores into an f32 run (the widened values) and an f32
    checkpoint into a bf16 run (the nearest bf16 values)."""
    ck16, ck32 = tmp_path / "bf16", tmp_path / "f32"
    s16 = train_and_evaluate(_tiny(steps=30, table_dtype="bf16", checkpoint_dir=str(ck16),
                                   checkpoint_every=30), mesh24)
    s32 = train_and_evaluate(_tiny(steps=30, checkpoint_dir=str(ck32), checkpoint_every=30), mesh24)
    assert s16["table_dtype"] == "bf16" and "tables bf16" in s16["path"]
    assert s16["table_bytes"] < 0.6 * s32["table_bytes"]
    assert s16["train_loss"][0] == pytest.approx(s32["train_loss"][0], rel=1e-3)
    # (AUC parity is measured on the default run: benchmarks/half_tables.py)
    assert s16["train_loss"][-1] == pytest.approx(s32["train_loss"][-1], abs=0.01)
    for src, dst in (("bf16", "f32"), ("f32", "bf16")):
        ck = Checkpointer(ck16 if src == "bf16" else ck32)
        try:
            saved = Trainer(_tiny(steps=30, table_dtype=src), mesh24)
            state_src, _ = saved.restore(ck, 30)
            trainer = Trainer(_tiny(steps=30, table_dtype=dst), mesh24)
            state, meta = trainer.restore(ck, 30)
        finally:
            ck.close()
        assert meta["layout"]["table_dtype"] == src
        assert all(t.weights.dtype == precision.storage_dtype(dst) for t in state.tables.values())
        a, _ = saved.emb.to_dense(state_src.tables)
        b, _ = trainer.emb.to_dense(state.tables)
        for name in a:
            want = a[name] if src == "bf16" else a[name].astype(jnp.bfloat16).astype(np.float32)
            np.testing.assert_array_equal(b[name], want)


def test_a_dense_optimizer_without_a_step_count_gets_one_for_the_rounding(mesh24):
    """SGD at a constant rate keeps no step count; with 16-bit tables the
    trainer adds one (updates times 1.0), so each step rounds with new bits,
    and the checkpoint layout says so."""
    cfg = _tiny(steps=2, optimizer="sgd", table_dtype="f16")
    trainer = Trainer(cfg, mesh24)
    assert trainer.step_counter and trainer.layout()["dense_optimizer_chain"]["step_counter"]
    assert not Trainer(_tiny(steps=2, optimizer="sgd"), mesh24).step_counter
    assert not Trainer(_tiny(steps=2, table_dtype="f16"), mesh24).step_counter  # Adam counts
    state = trainer.init_state()
    step = trainer.compiled_step(state)
    for i in range(2):
        batch = trainer.device_batch(trainer._host_train_batch(i))
        state, stats = step(state, batch, trainer.no_halt())
        assert not bool(stats["halted"])
    counts = [x for x in jax.tree.leaves(state.opt_state) if x.dtype == jnp.int32]
    assert [int(c) for c in counts] == [2]
