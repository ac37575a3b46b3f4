"""Numerics: a non-finite row stays in its table, and a failing step writes nothing.

* An inf or a NaN in one table's rows (and so in its looked-up bags and, by
  the loss below, in their gradients) must not reach any other table: the
  tables of its width share a storage buffer with it (`layout.py`), their
  requests and gradients share its exchange blocks, and the update's write
  is ordered after the reads by an integer token derived from the read
  values (`flat._read_token`, used by `hosted.py` too), which must not turn
  a NaN into a changed row index. Every other table, and every row of the
  poisoned table outside the poisoned bags, must come out of the step bit
  for bit as they do from the same step on clean tables.
* A trainer step that cannot be applied (an id outside its table that
  skipped the host-side check, or an exchange overflow) must leave every
  leaf of the state bit-identical: tables, accumulators, dense parameters
  and the dense optimizer state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdmt.data import Batch
from jdmt.data.specs import FeatureSet, SparseFeature
from jdmt.embeddings import Placement, ShardedEmbeddings
from jdmt.embeddings.flat import Caps
from jdmt.embeddings.two_hop import HopCaps
from jdmt.towers.sptt import SPTT

B = 16  # global batch: 2 examples per device on 2x4

# Tables of width 8 take every route of the flat path in table_wise (p, q:
# bags to the owner; o, s: unique rows) and share the w8 storage buffer;
# r is another width (another buffer, another exchange).
FEATURES = FeatureSet(
    (
        SparseFeature("p", 40, 8, 3),  # the poisoned table
        SparseFeature("q", 30, 8, 2),
        SparseFeature("o", 20, 8, 1),
        SparseFeature("s", 25, 8, 3, kind="sequence"),
        SparseFeature("r", 30, 4, 2),
    ),
    num_dense=1,
)
ONE_WIDTH = FeatureSet(FEATURES.sparse[:4], num_dense=1)  # SPTT: one width
POISONED = (0, 39)  # rows of p: storage row 0 of a device, and the row before q's (table_wise)
# The bags of p that read a poisoned row: (sample, positions); samples 0 and 9
# sit on devices 0 and 4 (two hosts).
POISON_BAGS = {0: [0, 3, 7], 9: [39, 5]}


def _paths(mesh):
    """name -> (embeddings, features) for each path of the first test."""
    # p, q, s and r on device 5 (p's rows first in the w8 buffer, q's row 0
    # right after p's row 39); o on device 2.
    tw = {n: Placement("table_wise", (5,)) for n in "pqsr"} | {"o": Placement("table_wise", (2,))}
    return {
        "table_wise": lambda: (ShardedEmbeddings(FEATURES, mesh, tw), FEATURES),
        "row_wise": lambda: (ShardedEmbeddings(FEATURES, mesh, "row_wise"), FEATURES),
        # SPTT with identity towers: the host path (p and q on host 1, p
        # table-row-wise over its devices, q table-wise on one of them)
        "sptt": lambda: (SPTT(ONE_WIDTH, mesh, [["p", "q"], ["o", "s"]], [1, 0],
                              row_wise=("p",)).emb, ONE_WIDTH),
    }


def _batch(features, seed=0):
    """Random ids; p's poisoned rows only in POISON_BAGS; every other table
    also reads its row 0 (beside p's rows in storage)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((B, features.total_slots), np.int32)
    lengths = np.zeros((B, len(features.sparse)), np.int32)
    for i, f in enumerate(features.sparse):
        lengths[:, i] = rng.integers(1, f.max_len + 1, B)
        cols = rng.integers(0, f.rows, (B, f.max_len))
        if f.name == "p":
            cols = np.where(np.isin(cols, POISONED), 1, cols)
            for b, bag in POISON_BAGS.items():
                cols[b, : len(bag)] = bag
                lengths[b, i] = len(bag)
        else:
            cols[[1, 12], 0] = 0
        ids[:, features.columns(f.name)] = cols
    return ids, lengths


def _step_fn(emb, features, seed=1):
    """A jitted sparse step (state donated). The loss is linear in every
    table's embeddings, plus p's squared: p's poisoned bags get non-finite
    gradients, the other gradients are fixed finite numbers."""
    rng = np.random.default_rng(seed)
    coef = {f.name: jnp.asarray(rng.standard_normal((B, f.dim) if f.pooled else (B, f.max_len, f.dim)),
                                jnp.float32) for f in features.sparse}

    def step(state, ids, lengths):
        embs, ctx, stats = emb.forward(state, ids, lengths)

        def loss(e):
            return sum(jnp.sum(e[n] * c) for n, c in coef.items()) + jnp.sum(e["p"] * e["p"])

        g = jax.grad(loss)(embs)
        new, _ = emb.update(state, ctx, g, ids, lengths, skip=emb.must_skip(stats))
        return embs.to_dict(), new, stats

    return jax.jit(step, donate_argnums=0)


@pytest.mark.parametrize("path", ["table_wise", "row_wise", "sptt"])
def test_a_non_finite_row_stays_in_its_table(mesh24, path):
    emb, features = _paths(mesh24)[path]()
    init = emb.init(seed=2)
    tables, accs = emb.to_dense(init)
    del init
    ids, lengths = _batch(features)
    step = _step_fn(emb, features)

    def run(value):
        t = {n: v.copy() for n, v in tables.items()}
        if value is not None:
            t["p"][list(POISONED)] = value
        embs, new, stats = step(emb.from_dense(t, accs), ids, lengths)
        assert int(stats["overflow"]) == 0 and int(stats["out_of_range"]) == 0
        got_t, got_a = emb.to_dense(new)
        return jax.device_get(embs), got_t, got_a

    clean_e, clean_t, clean_a = run(None)
    # The step does something to every table (else equality proves nothing).
    for f in features.sparse:
        assert not np.array_equal(clean_t[f.name], tables[f.name]), f.name
        assert not np.array_equal(clean_a[f.name], accs[f.name]), f.name
    p_cols = ids[:, features.columns("p")]
    bad_bags = np.array(sorted(POISON_BAGS))
    # rows of p that share a bag with a poisoned row (their gradient is non-finite)
    mixed = np.unique(np.concatenate([p_cols[b, : lengths[b, 0]] for b in bad_bags]))
    good_bags = np.setdiff1d(np.arange(B), bad_bags)
    good_rows = np.setdiff1d(np.arange(features.sparse[0].rows), mixed)
    for value in (np.inf, np.nan):
        e, t, a = run(value)
        for f in features.sparse:
            n = f.name
            if n == "p":
                # the poisoned bags are non-finite, the others exact
                assert not np.isfinite(e[n][bad_bags]).any(), value
                assert np.array_equal(e[n][good_bags], clean_e[n][good_bags]), value
                assert not np.isfinite(t[n][list(POISONED)]).any(), value
                assert not np.isfinite(a[n][mixed]).any(), value
                assert np.array_equal(t[n][good_rows], clean_t[n][good_rows]), value
                assert np.array_equal(a[n][good_rows], clean_a[n][good_rows]), value
            else:
                assert np.array_equal(e[n], clean_e[n]), (n, value)
                assert np.array_equal(t[n], clean_t[n]), (n, value)
                assert np.array_equal(a[n], clean_a[n]), (n, value)


# ---- a step that cannot be applied writes nothing --------------------------------------------

TRAIN_FEATURES = FeatureSet(
    (
        SparseFeature("a", 40, 8, 3, combiner="mean"),
        SparseFeature("b", 30, 8, 2),
        SparseFeature("c", 20, 8, 1),
        SparseFeature("d", 50, 8, 2, combiner="mean"),
    ),
    num_dense=2,
)
GLOBAL_BATCH = 64


def _trainer(mesh, **kw):
    from jdmt.train import TrainConfig, Trainer

    cfg = TrainConfig(features=TRAIN_FEATURES, embedding_dim=8, global_batch=GLOBAL_BATCH,
                      eval_batches=1, bottom_mlp=(8,), top_mlp=(8,), progress=False, **kw)
    return Trainer(cfg, mesh)


def _host_copy(state) -> list[tuple[str, np.ndarray]]:
    """Every leaf of a state (tables, accumulators, dense parameters, dense
    optimizer state) as a host copy, by its path."""
    return [(jax.tree_util.keystr(p), np.array(x)) for p, x in jax.tree_util.tree_leaves_with_path(state)]


def _changed(before, state) -> list[str]:
    """The paths of the leaves of `state` that differ from `before` in any bit."""
    after = _host_copy(state)
    assert [k for k, _ in after] == [k for k, _ in before]
    return [k for (k, a), (_, b) in zip(after, before)
            if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes()]


def _train_batch(trainer, step=0) -> Batch:
    b = trainer.data.batch(step, GLOBAL_BATCH)
    return Batch(*(np.array(x) for x in (b.dense, b.ids, b.lengths, b.labels)))


def test_a_step_with_out_of_range_ids_changes_no_bit_of_the_state(mesh24):
    trainer = _trainer(mesh24)
    state = trainer.init_state()
    good = _train_batch(trainer)
    bad = _train_batch(trainer)
    fs = TRAIN_FEATURES
    for sample, feature, value in ((5, "a", 40), (37, "c", -1)):  # rows, and below 0
        i = fs.index(feature)
        bad.lengths[sample, i] = max(1, bad.lengths[sample, i])
        bad.ids[sample, fs.columns(feature).start] = value
    before = _host_copy(state)
    step = trainer.compiled_step(state)
    # device_batch does not run check_batch: the ids reach the device path
    state, stats = step(state, trainer.device_batch(bad), trainer.no_halt())
    assert int(stats["out_of_range"]) == 2 and int(stats["overflow"]) == 0
    assert _changed(before, state) == []
    # The same compiled step on a good batch changes every leaf (the check can fail).
    state, stats = step(state, trainer.device_batch(good), trainer.no_halt())
    assert int(stats["out_of_range"]) == 0 and np.isfinite(float(stats["loss"]))
    assert len(_changed(before, state)) == len(before), _changed(before, state)


def test_a_halted_or_non_finite_step_changes_no_bit_of_the_state(mesh24):
    """`halt` (the previous step's `halted`) and a non-finite loss (an inf
    dense value; `device_batch` does not check) each leave every bit as it
    was, and say so in `halted`; a clean step after them changes every leaf."""
    trainer = _trainer(mesh24)
    state = trainer.init_state()
    step = trainer.compiled_step(state)
    good = trainer.device_batch(_train_batch(trainer))
    inf = _train_batch(trainer)
    inf.dense[3, 1] = np.inf
    before = _host_copy(state)
    halt = jax.device_put(np.ones((), np.bool_), trainer.replicated)
    state, stats = step(state, good, halt)
    assert bool(stats["halted"]) and int(stats["overflow"]) == 0 and np.isfinite(float(stats["loss"]))
    assert _changed(before, state) == []
    state, stats = step(state, trainer.device_batch(inf), trainer.no_halt())
    assert bool(stats["halted"]) and not np.isfinite(float(stats["loss"]))
    assert _changed(before, state) == []
    state, stats = step(state, good, trainer.no_halt())
    assert not bool(stats["halted"])
    assert len(_changed(before, state)) == len(before)


def test_an_overflowing_step_changes_no_bit_of_the_state(mesh24):
    trainer = _trainer(mesh24, sharding="row_wise")
    emb = trainer.emb
    b = GLOBAL_BATCH // emb.num_devices
    caps = emb.caps(b)
    emb.set_caps(b, {"flat": {w: Caps(c.bag_ids, 1) for w, c in caps["flat"].items()}, "host": None,
                     "hop": {w: HopCaps(1, 1) for w in caps["hop"]}})
    state = trainer.init_state()
    batch = trainer.device_batch(_train_batch(trainer))
    before = _host_copy(state)
    state, stats = trainer.compiled_step(state)(state, batch, trainer.no_halt())
    assert int(stats["overflow"]) > 0 and int(stats["out_of_range"]) == 0
    assert max(int(v) for v in jax.device_get(stats["need"]).values()) > 1
    assert _changed(before, state) == []
    # (Growing the capacities and repeating the step, as the trainer does, is
    # exact: tests/test_embeddings.py; a second compile here would double the time.)
