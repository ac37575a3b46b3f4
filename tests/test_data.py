import dataclasses
import functools
import gzip
import json

import numpy as np
import pytest

from jdmt.data import (
    BadBatchError,
    Batch,
    CriteoData,
    CriteoFormatError,
    CriteoReader,
    FeatureSet,
    Kind,
    SparseFeature,
    SyntheticData,
    check_batch,
    criteo_features,
    hash_category,
    make_features,
    mlperf_dcnv2_features,
    synthetic_default_features,
)
from jdmt.data.presets import SYNTHETIC_SEQUENCE_ROWS
from jdmt.train import TrainConfig
from jdmt.data.synthetic import ZIPF_HEAD, _uniform, _zipf_head_cdf, _ZipfRanks, splitmix64


def assert_batches_equal(a, b):
    for name in ("dense", "ids", "lengths", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# ------------------------------------------------------------------ synthetic


@pytest.fixture(scope="module")
def default_data():
    return SyntheticData(synthetic_default_features(), seed=0)


@pytest.fixture(scope="module")
def small_features():
    return FeatureSet(
        (
            SparseFeature("user", 1000, 8, max_len=1),
            SparseFeature("item", 50_000, 8, max_len=8),
            SparseFeature("hist", 20_000, 8, max_len=12, kind=Kind.SEQUENCE),
            SparseFeature("ctx", 300, 8, max_len=4, combiner="mean"),
            SparseFeature("hashed", 7, 8, max_len=3, hashed=True),
        ),
        num_dense=5,
    )


def test_batch_is_deterministic_per_seed_and_step(small_features):
    a = SyntheticData(small_features, seed=3)
    b = SyntheticData(small_features, seed=3)
    assert_batches_equal(a.batch(7, 256), b.batch(7, 256))
    # resuming at step 7 does not depend on what was generated before
    a.batch(0, 256)
    assert_batches_equal(a.batch(7, 256), b.batch(7, 256))
    assert not np.array_equal(a.batch(7, 256).ids, a.batch(8, 256).ids)
    assert not np.array_equal(
        a.batch(7, 256).ids, SyntheticData(small_features, seed=4).batch(7, 256).ids
    )
    # the eval stream is not the training stream
    assert not np.array_equal(a.batch(0, 256).ids, a.eval_batch(0, 256).ids)
    assert_batches_equal(a.eval_batch(2, 64), b.eval_batch(2, 64))


@pytest.mark.parametrize("procs", [2, 4])
def test_process_slices_equal_the_global_batch(small_features, procs):
    data = SyntheticData(small_features, seed=1)
    whole = data.batch(5, 512)
    parts = [data.batch(5, 512, process_index=p, num_processes=procs) for p in range(procs)]
    b = 512 // procs
    for p, part in enumerate(parts):
        assert part.size == b
        for name in ("dense", "ids", "lengths", "labels"):
            np.testing.assert_array_equal(
                getattr(part, name), getattr(whole, name)[p * b : (p + 1) * b]
            )
    ev = data.eval_batch(1, 512)
    np.testing.assert_array_equal(
        data.eval_batch(1, 512, process_index=1, num_processes=2).ids, ev.ids[256:]
    )


def test_batch_argument_errors(small_features):
    data = SyntheticData(small_features)
    with pytest.raises(ValueError, match="not divisible"):
        data.batch(0, 10, num_processes=4)
    with pytest.raises(ValueError, match="process_index"):
        data.batch(0, 8, process_index=2, num_processes=2)
    with pytest.raises(ValueError, match="step"):
        data.batch(-1, 8)
    with pytest.raises(ValueError, match="num_groups"):
        SyntheticData(small_features, num_groups=6)
    with pytest.raises(ValueError, match="mean_len_frac"):
        SyntheticData(small_features, mean_len_frac=0.0)
    with pytest.raises(ValueError, match="alpha"):
        SyntheticData(small_features, alpha=-1.0)


def test_batches_pass_check_batch(default_data, small_features):
    check_batch(default_data.features, default_data.batch(0, 1024))
    data = SyntheticData(small_features)
    b = data.batch(0, 1024)
    check_batch(small_features, b)
    assert b.ids.dtype == np.int32 and b.lengths.dtype == np.int32
    assert b.dense.dtype == np.float32 and b.labels.dtype == np.float32
    assert b.ids.shape == (1024, small_features.total_slots)
    assert b.dense.shape == (1024, 5) and np.all(np.isfinite(b.dense)) and b.dense.min() >= 0
    assert set(np.unique(b.labels)) == {0.0, 1.0}


def test_lengths_cover_the_range_and_padding_is_zero(small_features):
    data = SyntheticData(small_features, seed=2)
    b = data.batch(0, 4096)
    for i, f in enumerate(small_features.sparse):
        ln = b.lengths[:, i]
        lo = 1 if f.kind is Kind.SEQUENCE else 0
        assert ln.min() == lo and ln.max() == f.max_len, f.name
        assert abs(ln.mean() - 0.5 * f.max_len) < 0.1 * f.max_len + 0.05, f.name
        cols = b.ids[:, small_features.columns(f.name)]
        pad = np.arange(f.max_len)[None, :] >= ln[:, None]
        assert np.all(cols[pad] == 0), f.name
    short = SyntheticData(small_features, mean_len_frac=0.25).batch(0, 4096)
    item = small_features.index("item")
    assert abs(short.lengths[:, item].mean() - 2.0) < 0.3
    assert short.lengths[:, item].max() == 8


def test_ids_are_zipf_and_scrambled():
    alpha, rows = 1.05, 1000
    fs = make_features(1, rows, 8, 8)
    data = SyntheticData(fs, alpha=alpha, seed=5)
    ids = []
    for step in range(4):
        b = data.batch(step, 4096)
        ids.append(b.ids[np.arange(8)[None, :] < b.lengths[:, :1]])
    ids = np.concatenate(ids)
    counts = np.bincount(ids, minlength=rows)
    p0 = 1.0 / np.sum(np.arange(1, rows + 1, dtype=np.float64) ** -alpha)
    top = data.top_ids("cat_0", 3)
    assert counts.argmax() == top[0]
    assert counts[top[0]] / ids.size == pytest.approx(p0, rel=0.05)
    assert counts[top[0]] / counts[top[1]] == pytest.approx(2.0**alpha, rel=0.12)
    assert data.id_probability("cat_0", 0) == pytest.approx(p0, rel=1e-9)
    assert set(top) != {0, 1, 2}  # hot ids are scrambled over the table
    # alpha = 0 is uniform
    flat = SyntheticData(fs, alpha=0.0).batch(0, 4096)
    ids0 = flat.ids[np.arange(8)[None, :] < flat.lengths[:, :1]]
    assert np.bincount(ids0, minlength=rows).max() / ids0.size < 5.0 / rows


@pytest.mark.parametrize(
    "rows,alpha",
    [(100_000, 1.05), (3, 1.05), (1000, 0.0), (1, 1.2), (3_000_000, 2.0), (40_000_000, 1.05)],
)
def test_fast_zipf_ranks_equal_the_exact_inverse_cdf(rows, alpha):
    z = _ZipfRanks(rows, alpha, _zipf_head_cdf(min(rows, ZIPF_HEAD), alpha))
    h = splitmix64(np.arange(200_000, dtype=np.uint64))
    h[:3] = [0, 2**64 - 1, 2**63]
    r = z.ranks(h)
    np.testing.assert_array_equal(r, z.ranks_of_uniforms(_uniform(h)))
    assert r.min() >= 0 and r.max() < rows
    if rows > ZIPF_HEAD:  # the continuous tail carries its share of the mass
        want = 1.0 - z.head_mass / z.total
        assert np.mean(r >= ZIPF_HEAD) == pytest.approx(want, rel=0.05)


def test_huge_table_batches():
    fs = make_features(2, [40_000_000, 2**31 - 1], 8, 4)
    b = SyntheticData(fs).batch(0, 512)
    check_batch(fs, b)
    assert b.ids.max() > 2**30  # ids reach the whole table


def test_teacher_groups_and_bayes_metrics(default_data):
    names = default_data.features.names
    groups = default_data.groups
    assert len(groups) == round(len(names) / 4)
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(names)  # a partition
    assert all(len(g) >= 2 for g in groups)
    m = default_data.bayes_metrics(4, 4096)
    assert 0.75 < m["auc"] < 0.85
    assert 0.2 < m["label_rate"] < 0.35
    assert 0.3 < m["logloss"] < 0.55
    assert m == default_data.bayes_metrics(4, 4096)  # deterministic
    b = default_data.batch(0, 4096)
    p = default_data.probabilities(b)
    assert p.shape == (4096,) and abs(p.mean() - b.labels.mean()) < 0.03
    assert SyntheticData(synthetic_default_features(), num_groups=3).groups != groups


def _moved(fs, base, *names):
    """`base` with the ids of features `names` shifted by 17 (mod 500 rows)."""
    ids = base.ids.copy()
    for n in names:
        cols = fs.columns(n)
        ids[:, cols] = (ids[:, cols] + 17) % 500
    return type(base)(dense=base.dense, ids=ids, lengths=base.lengths, labels=base.labels)


def test_teacher_interacts_only_within_groups():
    fs = make_features(6, 500, 8, 3)
    data = SyntheticData(fs, num_groups=2, seed=7)
    (a, b, _), (c, _, _) = data.groups[0], data.groups[1]
    base = data.batch(0, 2048)
    moved = functools.partial(_moved, fs, base)
    z0 = data.logits(base)
    d_a = data.logits(moved(a)) - z0
    d_b = data.logits(moved(b)) - z0
    d_c = data.logits(moved(c)) - z0
    # across groups effects add up exactly; within a group they do not
    np.testing.assert_allclose(data.logits(moved(a, c)) - z0, d_a + d_c, atol=1e-4)
    assert np.abs(data.logits(moved(a, b)) - z0 - (d_a + d_b)).max() > 1e-2
    assert np.abs(d_a).max() > 1e-2


def test_deep_teacher_mixes_every_feature_nonlinearly():
    """The second teacher: calibrated like the first, deterministic, and its
    effects do not add up across any two features (no planted groups)."""
    fs = make_features(6, 500, 8, 3)
    data = SyntheticData(fs, seed=7, teacher="deep")
    assert data.groups == (tuple(fs.names),) and "teacher=deep" in repr(data)
    m = data.bayes_metrics(2, 4096)
    assert 0.7 < m["auc"] < 0.9 and 0.2 < m["label_rate"] < 0.3
    assert m == SyntheticData(fs, seed=7, teacher="deep").bayes_metrics(2, 4096)
    assert SyntheticData(fs, seed=8, teacher="deep").bayes_metrics(2, 4096) != m
    base = data.batch(0, 2048)
    moved = functools.partial(_moved, fs, base)
    z0 = data.logits(base)
    a, c = fs.names[0], fs.names[5]
    d_a, d_c = data.logits(moved(a)) - z0, data.logits(moved(c)) - z0
    assert np.abs(d_a).max() > 1e-2 and np.abs(d_c).max() > 1e-2
    assert np.abs(data.logits(moved(a, c)) - z0 - (d_a + d_c)).max() > 1e-2
    with pytest.raises(ValueError, match="unknown teacher 'wide'"):
        SyntheticData(fs, teacher="wide")


def test_check_batch_errors_name_the_culprit(small_features):
    b = SyntheticData(small_features).batch(0, 64)
    cols = small_features.columns("item")
    row = int(np.argmax(b.lengths[:, small_features.index("item")] > 0))
    b.ids[row, cols.start] = 50_000
    with pytest.raises(BadBatchError, match="'item'"):
        check_batch(small_features, b)
    b = SyntheticData(small_features).batch(0, 64)
    b.dense[3, 2] = np.nan
    with pytest.raises(BadBatchError, match="dense feature 2 of example 3"):
        check_batch(small_features, b)


# -------------------------------------------------------------------- presets


def test_presets():
    full = mlperf_dcnv2_features(None)
    assert len(full.sparse) == 26 and full.num_dense == 13
    assert sum(f.rows for f in full.sparse) == 204_184_588
    assert [f.max_len for f in full.sparse][:3] == [3, 2, 1] and full["cat_20"].max_len == 100
    assert full.sparse[0].dim == 128 and all(f.combiner.value == "sum" for f in full.sparse)
    capped = mlperf_dcnv2_features(1_000_000, dim=64)
    assert max(f.rows for f in capped.sparse) == 1_000_000 and capped["cat_5"].rows == 3
    d = synthetic_default_features()
    assert len(d.sparse) == 26 and d.total_slots == 121 and d.sparse[0].dim == 16
    assert all(1000 <= f.rows <= 100_000 and 1 <= f.max_len <= 10 for f in d.sparse)


def test_default_features_with_sequences():
    base = synthetic_default_features(8)
    assert synthetic_default_features(8, num_sequence=0, sequence_len=5) == base
    fs = synthetic_default_features(8, num_sequence=3, sequence_len=12)
    assert fs.sparse[:26] == base.sparse and fs.num_dense == 13
    assert fs.names[26:] == ("seq_0", "seq_1", "seq_2") and fs.total_slots == 121 + 3 * 12
    for f in fs.sparse[26:]:
        assert f.kind is Kind.SEQUENCE and f.max_len == 12 and f.dim == 8
        assert f.rows == SYNTHETIC_SEQUENCE_ROWS
    with pytest.raises(ValueError, match="num_sequence"):
        synthetic_default_features(num_sequence=-1)
    with pytest.raises(ValueError, match="sequence_len"):
        synthetic_default_features(num_sequence=1, sequence_len=0)

    data = SyntheticData(fs, seed=1)
    b = data.batch(3, 2048)
    assert_batches_equal(b, SyntheticData(fs, seed=1).batch(3, 2048))  # deterministic
    check_batch(fs, b)
    seq_len = b.lengths[:, 26:]
    assert seq_len.min() == 1 and seq_len.max() == 12  # sequences are never empty
    z0 = data.logits(b)
    for name in fs.names[26:]:
        assert any(name in g and len(g) > 1 for g in data.groups)  # an interacting group
        cols = fs.columns(name)
        valid = np.arange(12)[None, :] < b.lengths[:, [fs.index(name)]]
        moved = b.ids.copy()
        moved[:, cols] = np.where(valid, (b.ids[:, cols] + 1) % SYNTHETIC_SEQUENCE_ROWS, 0)
        changed = data.logits(Batch(b.dense, moved, b.lengths, b.labels)) - z0
        # the ids move the logit (unless every partner feature of the example is empty)
        assert np.mean(np.abs(changed) > 1e-6) > 0.5
        padding = b.ids.copy()
        padding[:, cols] = np.where(valid, b.ids[:, cols], 7)
        np.testing.assert_array_equal(
            data.logits(Batch(b.dense, padding, b.lengths, b.labels)), z0
        )  # ids past the length do not


# --------------------------------------------------------------------- criteo


def criteo_line(label="1", ints=None, cats=None):
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label] + ints + cats)


def write(path, lines, gz=False, newline="\n"):
    data = "".join(line + newline for line in lines).encode()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def random_lines(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ints = [str(int(x)) if rng.random() > 0.2 else "" for x in rng.integers(-3, 5000, 13)]
        cats = [f"{int(x):08x}" if rng.random() > 0.1 else "" for x in rng.integers(0, 2**32, 26)]
        out.append(criteo_line(str(int(rng.random() < 0.3)), ints, cats))
    return out


ROWS = [1000 + 37 * i for i in range(26)]


def test_criteo_values_and_hashing(tmp_path):
    ints = ["5", "", "-2", "0", "123456789012"] + ["1"] * 8
    cats = ["0000000a", "", "DEADBEEF", "ff", "7fffffff"] + [f"{i:08x}" for i in range(21)]
    lines = [criteo_line("1", ints, cats), criteo_line("0"), criteo_line("0"), criteo_line("1")]
    fs = criteo_features(ROWS, 8)
    reader = CriteoReader(write(tmp_path / "day_0", lines, newline="\r\n"), fs, 2)
    batches = list(reader)
    assert len(batches) == 2
    b = batches[0]
    check_batch(fs, b)
    np.testing.assert_array_equal(b.labels, [1, 0])
    np.testing.assert_allclose(b.dense[0, :5], np.log1p([5, 0, 0, 0, 123456789012]), rtol=1e-6)
    np.testing.assert_allclose(b.dense[1], np.log1p(np.arange(13)), rtol=1e-6)
    np.testing.assert_array_equal(b.lengths[0, :3], [1, 0, 1])
    assert b.ids[0, 1] == 0  # missing -> padding
    raw = [int(c, 16) if c else 0 for c in cats]
    want = [int(hash_category(np.uint64(v), t, ROWS[t])) for t, v in enumerate(raw)]
    got = b.ids[0]
    assert [got[t] for t in range(26) if cats[t]] == [want[t] for t in range(26) if cats[t]]
    assert reader.stats.examples == 4 and reader.stats.skipped_lines == 0
    assert reader.stats.dropped_examples == 0 and reader.position == 4


def test_hash_category_spreads_values():
    values = np.arange(100_000, dtype=np.uint64)
    ids = hash_category(values, 3, 1000)
    assert ids.min() >= 0 and ids.max() < 1000
    counts = np.bincount(ids, minlength=1000)
    assert counts.min() > 50 and counts.max() < 160  # about 100 each
    assert not np.array_equal(ids[:1000], np.arange(1000))  # not value % rows
    assert not np.array_equal(ids, hash_category(values, 4, 1000))  # per table
    assert not np.array_equal(ids, hash_category(values, 3, 1000, seed=1))
    # structured values (all multiples of the row count) still use every row
    strided = hash_category(np.arange(0, 1024 * 5000, 1024, dtype=np.uint64), 0, 1024)
    assert np.unique(strided).size > 950


def test_criteo_drops_the_partial_batch_and_matches_gzip(tmp_path):
    lines = random_lines(37)
    fs = criteo_features(5000, 8)
    plain = CriteoReader(write(tmp_path / "a.tsv", lines), fs, 8)
    zipped = CriteoReader(write(tmp_path / "a.tsv.gz", lines, gz=True), fs, 8)
    pb, zb = list(plain), list(zipped)
    assert len(pb) == len(zb) == 4
    for x, y in zip(pb, zb, strict=True):
        assert_batches_equal(x, y)
        check_batch(fs, x)
    assert plain.stats.dropped_examples == 5 and plain.stats.examples == 32
    assert plain.stats.lines == 37 and plain.position == 32


def test_criteo_malformed_lines(tmp_path):
    good = random_lines(12, seed=1)
    bad = [
        criteo_line("2"),  # bad label
        "1\t2\t3",  # wrong field count
        criteo_line("0", ints=["x"] + ["1"] * 12),  # non-integer
        criteo_line("0", ints=["1"] * 12 + ["--3"]),  # non-integer
        criteo_line("0", cats=["zz000000"] + ["0"] * 25),  # non-hex
        criteo_line("0", cats=["123456789"] + ["0"] * 25),  # too long
        "",  # empty line
    ]
    lines = good[:3] + bad[:2] + good[3:7] + bad[2:] + good[7:]
    path = write(tmp_path / "bad.tsv", lines)
    fs = criteo_features(100, 4)
    reader = CriteoReader(path, fs, 4)
    batches = list(reader)
    assert len(batches) == 3
    st = reader.stats
    assert st.lines == 19 and st.skipped_lines == 7 and st.examples == 12
    assert [n for n, _ in st.bad_lines] == [4, 5, 10, 11, 12, 13, 14]
    reasons = dict(st.bad_lines)
    assert "label '2'" in reasons[4]
    assert "40 tab-separated fields, found 3" in reasons[5]
    assert "I1 'x'" in reasons[10]
    assert "I13 '--3'" in reasons[11]
    assert "C1 'zz000000'" in reasons[12] and "hex" in reasons[12]
    assert "C1 '123456789'" in reasons[13]
    assert "empty line" in reasons[14]
    # the valid lines are exactly the good ones, in order
    clean = list(CriteoReader(write(tmp_path / "clean.tsv", good), fs, 4))
    for x, y in zip(batches, clean, strict=True):
        assert_batches_equal(x, y)

    strict = CriteoReader(path, fs, 4, strict=True)
    with pytest.raises(CriteoFormatError, match=r"bad\.tsv:4: label '2' is not 0 or 1") as err:
        list(strict)
    assert err.value.line == 4


def test_criteo_empty_missing_and_useless_files(tmp_path):
    fs = criteo_features(100, 4)
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        CriteoReader(tmp_path / "nope.tsv", fs, 4)
    with pytest.raises(CriteoFormatError, match="empty"):
        list(CriteoReader(write(tmp_path / "empty.tsv", []), fs, 4))
    with pytest.raises(CriteoFormatError, match="empty"):
        list(CriteoReader(write(tmp_path / "empty.gz", [], gz=True), fs, 4))
    with pytest.raises(CriteoFormatError, match="no valid example.*line 1: label"):
        list(CriteoReader(write(tmp_path / "junk.tsv", ["2\t" * 39 + "x", "hello"]), fs, 4))
    with pytest.raises(CriteoFormatError, match="only 3 valid examples.*batch of 4"):
        list(CriteoReader(write(tmp_path / "few.tsv", random_lines(3)), fs, 4))
    with pytest.raises(ValueError, match="26 sparse and 13 dense"):
        CriteoReader(write(tmp_path / "x.tsv", random_lines(3)), make_features(3, 10, 4, 1), 4)
    with pytest.raises(ValueError, match="divisible"):
        CriteoReader(tmp_path / "x.tsv", fs, 5, num_processes=2)


def test_criteo_resume_from_position(tmp_path):
    lines = random_lines(30, seed=2)
    lines[5] = "broken"
    lines[17] = "broken too"
    path = write(tmp_path / "r.tsv", lines)
    fs = criteo_features(1000, 4)
    reader = CriteoReader(path, fs, 6)
    all_batches, positions = [], []
    for b in reader:
        all_batches.append(b)
        positions.append(reader.position)
    assert len(all_batches) == 4 and positions == [7, 13, 20, 26]
    resumed = CriteoReader(path, fs, 6, start=positions[1])
    rest = list(resumed)
    assert len(rest) == 2
    for x, y in zip(rest, all_batches[2:], strict=True):
        assert_batches_equal(x, y)
    assert resumed.position == 26
    # resuming at the end yields nothing; past it is an error
    assert list(CriteoReader(path, fs, 6, start=30)) == []
    with pytest.raises(CriteoFormatError, match="past the end"):
        list(CriteoReader(path, fs, 6, start=31))


def test_criteo_process_slices(tmp_path):
    path = write(tmp_path / "p.tsv", random_lines(40, seed=3))
    fs = criteo_features(1000, 4)
    whole = list(CriteoReader(path, fs, 8))
    for p in range(2):
        part = list(CriteoReader(path, fs, 8, process_index=p, num_processes=2))
        assert len(part) == len(whole) == 5
        for x, y in zip(part, whole, strict=True):
            np.testing.assert_array_equal(x.ids, y.ids[4 * p : 4 * p + 4])
            np.testing.assert_array_equal(x.dense, y.dense[4 * p : 4 * p + 4])
            np.testing.assert_array_equal(x.labels, y.labels[4 * p : 4 * p + 4])


# ---------------------------------------------------------------- CriteoData


def numbered_lines(n, broken=(), seed=5):
    """Valid lines whose I1 is the line's index (dense[:, 0] = log1p(index)),
    with the given 0-based lines malformed."""
    lines = random_lines(n, seed)
    for i in range(n):
        fields = lines[i].split("\t")
        fields[1] = str(i)
        lines[i] = "1234" if i in broken else "\t".join(fields)
    return lines


def line_indices(batch):
    return set(np.rint(np.expm1(batch.dense[:, 0].astype(np.float64))).astype(int))


# 62 lines: the eval set (2 x 4 examples) spans lines 1-9 (line 3 broken);
# training reads 6 batches of 8 from lines 10-58 (line 21 broken), and the
# broken lines 59-62 end every epoch.
BROKEN = (2, 20, 58, 59, 60, 61)


@pytest.fixture(params=[False, True], ids=["plain", "gzip"])
def criteo_file(tmp_path, request):
    name = "day.tsv.gz" if request.param else "day.tsv"
    return write(tmp_path / name, numbered_lines(62, BROKEN), gz=request.param)


def criteo_data(path, **kw):
    kw = {"global_batch": 8, "eval_batches": 2, "eval_batch_size": 4, **kw}
    return CriteoData(path, criteo_features(1000, 4), **kw)


def test_criteo_data_split_epochs_and_skipped_lines(criteo_file):
    data = criteo_data(criteo_file)
    fs = data.features
    assert data.train_start == 9 and data.skipped_lines == 1  # line 3
    reader = CriteoReader(criteo_file, fs, 4)
    for i, want in zip(range(2), reader):
        assert_batches_equal(data.eval_batch(i, 4), want)
    eval_lines = set().union(*(line_indices(data.eval_batch(i, 4)) for i in range(2)))
    assert eval_lines == {0, 1, 3, 4, 5, 6, 7, 8}

    epoch = list(CriteoReader(criteo_file, fs, 8, start=9))
    assert len(epoch) == 6
    other = criteo_data(criteo_file)
    train_lines = set()
    for step in range(15):
        b = data.batch(step, 8)
        assert_batches_equal(b, epoch[step % 6])
        assert_batches_equal(b, other.batch(step, 8))  # deterministic
        assert data.epoch == step // 6
        train_lines |= line_indices(b)
        if step < 6:
            assert data.skipped_lines == 1 + (step >= 1)  # line 21 lies in batch 1
    assert train_lines.isdisjoint(eval_lines)
    assert train_lines == set(range(9, 58)) - {20}
    # the eval set's line once, two whole passes of 5, and line 21 of the third
    assert data.skipped_lines == 1 + 5 + 5 + 1
    with pytest.raises(ValueError, match="next training batch is step 15, not 17"):
        data.batch(17, 8)
    with pytest.raises(ValueError, match="global batches of 8, not 16"):
        data.batch(15, 16)
    with pytest.raises(ValueError, match="eval batches of 4"):
        data.eval_batch(0, 8)
    with pytest.raises(ValueError, match=r"eval batch 2 is outside \[0, 2\)"):
        data.eval_batch(2, 4)


def test_criteo_data_with_a_separate_eval_file(tmp_path, criteo_file):
    """`eval_path`: the eval set is the head of another file (a held-out
    day), and training reads the whole training file from its first line."""
    held_out = write(tmp_path / "day_23.tsv", numbered_lines(20, (1,)))
    data = criteo_data(criteo_file, eval_path=held_out)
    fs = data.features
    assert data.train_start == 0
    for i, want in zip(range(2), CriteoReader(held_out, fs, 4)):
        assert_batches_equal(data.eval_batch(i, 4), want)
    first = next(iter(CriteoReader(criteo_file, fs, 8)))
    assert_batches_equal(data.batch(0, 8), first)
    assert line_indices(data.batch(1, 8)) == set(range(9, 17))  # its next 8 valid lines (2 is broken)
    with pytest.raises(FileNotFoundError, match="evaluation file"):
        criteo_data(criteo_file, eval_path=tmp_path / "missing.tsv")
    tiny = write(tmp_path / "tiny.tsv", numbered_lines(5, ()))
    with pytest.raises(CriteoFormatError, match=r"tiny.tsv.*fewer than the 2 x 4 held-out"):
        criteo_data(criteo_file, eval_path=tiny)
    with pytest.raises(ValueError, match="needs data='criteo:PATH'"):
        TrainConfig(eval_data=str(held_out))


def test_criteo_data_resumes_bit_for_bit(criteo_file):
    data = criteo_data(criteo_file)
    batches, positions = [], []
    for step in range(16):
        batches.append(data.batch(step, 8))
        positions.append(data.position_after(step))
    assert positions[0] == {"step": 0, "epoch": 0, "line": 17, "train_start": 9, "skipped_lines": 0}
    assert positions[5] == {"step": 5, "epoch": 0, "line": 58, "train_start": 9, "skipped_lines": 1}
    assert positions[6] == {"step": 6, "epoch": 1, "line": 17, "train_start": 9, "skipped_lines": 5}
    for step in (0, 4, 5, 6, 11, 12):  # 5 and 11 end an epoch
        saved = json.loads(json.dumps(data.position_after(step)))
        resumed = criteo_data(criteo_file)
        resumed.resume(saved)
        assert resumed.epoch == saved["epoch"] and resumed.position_after(step) == saved
        with pytest.raises(ValueError, match=f"next training batch is step {step + 1}, not 0"):
            resumed.batch(0, 8)
        for s in range(step + 1, step + 4):
            assert_batches_equal(resumed.batch(s, 8), batches[s])
            assert resumed.position_after(s) == positions[s]
            assert resumed.skipped_lines == 1 + positions[s]["skipped_lines"]
    # a source can be rewound, also to the start (step -1)
    start = criteo_data(criteo_file).position_after(-1)
    assert start == {"step": -1, "epoch": 0, "line": 9, "train_start": 9, "skipped_lines": 0}
    resumed.resume(positions[2])
    assert_batches_equal(resumed.batch(3, 8), batches[3])
    resumed.resume(start)
    assert_batches_equal(resumed.batch(0, 8), batches[0])
    # only the last 16 steps are remembered
    data.batch(16, 8)
    with pytest.raises(KeyError, match=r"no data position for step 0: kept only steps 1\.\.16"):
        data.position_after(0)
    with pytest.raises(KeyError, match="step 17"):
        data.position_after(17)


def test_criteo_data_process_rows(criteo_file):
    whole = criteo_data(criteo_file)
    parts = [criteo_data(criteo_file) for _ in range(2)]
    for step in range(8):
        w = whole.batch(step, 8)
        for p, part in enumerate(parts):
            b = part.batch(step, 8, process_index=p, num_processes=2)
            for name in ("dense", "ids", "lengths", "labels"):
                np.testing.assert_array_equal(getattr(b, name), getattr(w, name)[4 * p : 4 * p + 4])
            e = part.eval_batch(1, 4, process_index=p, num_processes=2)
            np.testing.assert_array_equal(e.ids, whole.eval_batch(1, 4).ids[2 * p : 2 * p + 2])
        assert parts[0].position_after(step) == parts[1].position_after(step)
        assert parts[0].position_after(step) == whole.position_after(step)
    with pytest.raises(ValueError, match="differs from the first call"):
        parts[0].batch(8, 8)


def test_criteo_data_errors(tmp_path, criteo_file):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        criteo_data(tmp_path / "nope.tsv")
    with pytest.raises(CriteoFormatError, match="empty.tsv: the file is empty"):
        criteo_data(write(tmp_path / "empty.tsv", []))
    with pytest.raises(CriteoFormatError, match="junk.tsv: no valid example"):
        criteo_data(write(tmp_path / "junk.tsv", ["junk"] * 20))
    few = r"few.tsv: only 7 valid examples \(1 malformed lines skipped\), fewer than the 2 x 4"
    with pytest.raises(CriteoFormatError, match=few + ".*plus one training batch of 8"):
        criteo_data(write(tmp_path / "few.tsv", numbered_lines(8, broken=(5,))))
    with pytest.raises(CriteoFormatError, match=r"few.tsv: only 3 valid examples \(0 malformed "
                       r"lines skipped\), fewer than the 2 x 4"):
        criteo_data(write(tmp_path / "few.tsv", numbered_lines(3)))
    with pytest.raises(CriteoFormatError, match=r"short.tsv: only 7 valid examples after the 8 "
                       r"held-out evaluation examples \(lines 1-8; 0 malformed"):
        criteo_data(write(tmp_path / "short.tsv", numbered_lines(15)))
    with pytest.raises(CriteoFormatError, match=r"day.tsv(.gz)?:3: expected 40"):
        criteo_data(criteo_file, strict=True)
    with pytest.raises(ValueError, match="eval_batches must be >= 1"):
        criteo_data(criteo_file, eval_batches=0)

    data = criteo_data(criteo_file)
    good = {"step": 3, "epoch": 0, "line": 40, "train_start": 9, "skipped_lines": 1}
    data.resume(good)
    with pytest.raises(ValueError, match="has the keys"):
        data.resume({"step": 3})
    with pytest.raises(ValueError, match=r"integers >= 0 \(step >= -1\)"):
        data.resume({**good, "line": -1})
    with pytest.raises(ValueError, match="lies in the evaluation set"):
        data.resume({**good, "line": 4})
    with pytest.raises(ValueError, match="training starting at line 9 .* ends at line 17"):
        criteo_data(criteo_file, eval_batches=4).resume(good)
    data.resume({**good, "line": 63})
    with pytest.raises(CriteoFormatError, match="past the end"):
        data.batch(4, 8)
    with pytest.raises(KeyError, match="no data position for step 0: kept only step -1"):
        criteo_data(criteo_file).position_after(0)


@pytest.mark.parametrize("teacher", ["dlrm", "deep"])
def test_teacher_logits_from_its_slot_latents(teacher):
    """`slot_latents` and `logits_of_latents` rebuild the teacher's logits
    (what `benchmarks/quality_ceiling.py` perturbs), and other latents move them."""
    fs = make_features(6, 500, 8, 3)
    data = SyntheticData(fs, seed=7, teacher=teacher)
    b = data.batch(0, 1024)
    lat = data.slot_latents(b)
    assert lat.shape == (fs.total_slots, 1024, 4)
    pad = np.arange(3)[None, :] >= b.lengths[:, :1]  # feature 0's padding slots
    assert not lat[:3][pad.T].any() and lat[:3][~pad.T].std() > 0.5
    np.testing.assert_allclose(data.logits_of_latents(b, lat), data.logits(b), rtol=1e-5, atol=1e-5)
    assert np.abs(data.logits_of_latents(b, 0.5 * lat) - data.logits(b)).max() > 1e-2


# -------------------------------------------------------------- weighted features


def _weighted(features, names):
    return dataclasses.replace(features, sparse=tuple(
        dataclasses.replace(f, weighted=True, combiner="sum") if f.name in names else f for f in features.sparse))


def test_weighted_features_get_weights_and_nothing_else_changes(small_features):
    fs = _weighted(small_features, {"item", "ctx"})
    assert fs.weighted_idx == (1, 3) and fs.weight_slots == 12
    assert fs.weight_columns("ctx") == slice(8, 12)
    wmap = fs.weight_map()
    assert list(wmap[fs.columns("item")]) == list(range(8)) and (wmap[fs.columns("hist")] == 12).all()
    plain, data = SyntheticData(small_features, seed=3), SyntheticData(fs, seed=3)
    a, b = plain.batch(5, 512), data.batch(5, 512)
    assert a.weights is None and b.weights.shape == (512, 12) and b.weights.dtype == np.float32
    for name in ("dense", "ids", "lengths"):  # the weights are a stream of their own
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    check_batch(fs, b)
    for f in ("item", "ctx"):
        w = b.weights[:, fs.weight_columns(f)]
        n = b.lengths[:, fs.index(f)]
        valid = np.arange(w.shape[1])[None, :] < n[:, None]
        assert not w[~valid].any()  # padding: 0
        scaled = (w * np.maximum(n, 1)[:, None])[valid]
        assert scaled.min() >= 0.5 and scaled.max() < 1.5 and scaled.std() > 0.2
    # deterministic per (seed, step), and process slices are the global batch's rows
    np.testing.assert_array_equal(data.batch(5, 512).weights, b.weights)
    np.testing.assert_array_equal(data.batch(5, 512, process_index=1, num_processes=2).weights, b.weights[256:])
    assert not np.array_equal(data.batch(6, 512).weights, b.weights)
    # the teacher reads the weights: other weights, other logits; its latents rebuild them
    c = dataclasses.replace(b, weights=b.weights[::-1].copy())
    assert np.abs(data.logits(c) - data.logits(b)).max() > 1e-2
    np.testing.assert_allclose(data.logits_of_latents(b, data.slot_latents(b)), data.logits(b), rtol=1e-5, atol=1e-5)


def test_check_batch_weight_errors(small_features):
    fs = _weighted(small_features, {"item"})
    b = SyntheticData(fs).batch(0, 64)
    with pytest.raises(BadBatchError, match="needs weights"):
        check_batch(fs, dataclasses.replace(b, weights=None))
    with pytest.raises(BadBatchError, match=r"batch.weights has shape \(64, 3\)"):
        check_batch(fs, dataclasses.replace(b, weights=b.weights[:, :3]))
    with pytest.raises(BadBatchError, match="no feature is weighted"):
        check_batch(small_features, b)
    w = b.weights.copy()
    n = b.lengths[:, fs.index("item")]
    row = int(np.argmax(n > 0))
    w[row, 0] = np.nan
    with pytest.raises(BadBatchError, match=f"'item': weight nan at example {row} position 0"):
        check_batch(fs, dataclasses.replace(b, weights=w))
    w = b.weights.copy()
    short = int(np.argmax(n < 8))
    w[short, 7] = np.inf  # past the bag's length: ignored
    check_batch(fs, dataclasses.replace(b, weights=w))
    with pytest.raises(ValueError, match="combiner sum"):
        SparseFeature("x", 10, 4, 2, combiner="mean", weighted=True)
