"""Synthetic click data with Zipf ids and a planted teacher (host side, numpy).

`SyntheticData` makes batches for any `FeatureSet`:

* ids of each feature follow a truncated Zipf law over the table's rows
  (rank r drawn with weight `(r + 1) ** -alpha`), then a fixed bijection per
  table scrambles ranks to ids so the hot rows are spread over the table;
* every example has its own length per feature: pooled features in
  `[0, max_len]`, sequence features in `[1, max_len]`, with mean about
  `mean_len_frac * max_len`; padding positions hold id 0;
* dense features are `log(1 + lognormal)`, like transformed Criteo counts;
* labels come from a planted teacher: features fall into `num_groups` groups
  that interact only within a group (see `SyntheticData.groups`), so a model,
  or a tower partitioner, has real structure to find.

Everything is counter-based: each random number is a splitmix64 hash of
(seed, stream, step, example index in the global batch, column), never a
sequential generator. Batch `k` is therefore the same whether it is made
first or after a restart, and each process makes exactly its own rows of
the global batch without making the others.
"""

from __future__ import annotations

import math

import numpy as np

from jdmt.data.specs import Batch, FeatureSet, Kind
from jdmt.metrics import auc, logloss

__all__ = ["SyntheticData", "splitmix64", "LATENT_DIM", "TEACHERS", "ZIPF_HEAD"]

TEACHERS = ("dlrm", "deep")
"""`dlrm`: pairwise dot products of mean-pooled latents inside planted groups
(DLRM-shaped: a DLRM can represent it exactly). `deep`: a random two-layer
tanh network over the sum-pooled latents of all features (interactions
across every feature and of every order; no model here is shaped like it)."""

DEEP_HIDDEN = (64, 32)
"""Widths of the `deep` teacher's hidden layers."""

LATENT_DIM = 4
"""Width of the teacher's latent vector per (table, id)."""

ZIPF_HEAD = 1 << 22
"""Ranks below this have an exact Zipf CDF; rarer ranks use a continuous tail."""

_LATENT_SCALE = np.float32(math.sqrt(12.0) / 65536.0)  # int16 code + 0.5 -> unit variance
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_U53 = 1.0 / (1 << 53)

# Stream constants: independent random streams of one seed.
_TRAIN, _EVAL, _CALIBRATION, _TABLES, _TEACHER, _WEIGHTS = 1, 2, 3, 4, 5, 6
_CALIBRATION_EXAMPLES = 8192
_MAX_ROWS = (1 << 31) - 1  # ids are int32
_QUANTILE_BITS = 18  # 1 MiB quantile table per feature


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, a bijection on 64-bit integers.

    Args:
      x: u64[...] (anything castable; arithmetic wraps modulo 2**64).
    Returns:
      u64[...] well-mixed hashes of `x`.
    """
    z = np.array(x, dtype=np.uint64, ndmin=1, order="C")
    z += np.uint64(_GOLDEN)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z.reshape(np.shape(x))


def _mix(x: int) -> int:
    """splitmix64 of one Python int (no numpy scalar overflow warnings)."""
    z = (x + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _key(*parts: int) -> int:
    """A 64-bit key for a tuple of non-negative ints."""
    k = 0
    for p in parts:
        k = _mix(k ^ _mix(p & _M64))
    return k


def _uniform(h: np.ndarray) -> np.ndarray:
    """u64[...] hashes -> f64[...] uniform in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * _U53


def _zipf_head_cdf(head: int, alpha: float) -> np.ndarray:
    """f64[head]: unnormalised cumulative weights of ranks 0..head-1."""
    return np.cumsum(np.arange(1, head + 1, dtype=np.float64) ** -alpha)


def _tail_mass(a: float, b: float, alpha: float) -> float:
    """Integral of t**-alpha over [a, b]."""
    if abs(alpha - 1.0) < 1e-12:
        return math.log(b / a)
    return (a ** (1.0 - alpha) - b ** (1.0 - alpha)) / (alpha - 1.0)


class _ZipfRanks:
    """Exact truncated-Zipf ranks of one table size: 64-bit hashes -> ranks.

    Rank r in [0, rows) has weight (r + 1) ** -alpha. A hash h stands for the
    uniform u = (h >> 11) / 2**53 and its rank is the inverse CDF at u:

    * the CDF is exact for the first `head = min(rows, ZIPF_HEAD)` ranks (a
      cumulative array shared by tables with the same head); the rarer tail,
      present only in tables bigger than `ZIPF_HEAD` rows, follows the
      continuous law t ** -alpha on [head + 0.5, rows + 0.5], inverted in
      closed form and rounded to a rank (t in [r + 0.5, r + 1.5) -> r, the
      midpoint rule). The tail's mass matches the discrete sum to rounding
      (1e-16 for 40M rows), and memory stays at 32 MiB for the CDF per
      distinct (head, alpha), 4 MiB of bucket ranks per distinct row count
      and 1 MiB of quantile ids per table, however big the table;
    * speed: the top `_QUANTILE_BITS` bits of h pick a bucket of u whose
      first and last ranks are precomputed; most buckets (all hot ranks)
      hold a single rank, and the others are finished by a short bisection
      between those two ranks. `ranks` equals `ranks_of_uniforms(u)`
      exactly; it is just faster than a full binary search.
    """

    def __init__(self, rows: int, alpha: float, head_cdf: np.ndarray):
        self.rows = rows
        self.alpha = alpha
        self.head = head_cdf.size
        self.head_cdf = head_cdf
        self.head_mass = float(head_cdf[-1])
        self.has_tail = rows > self.head
        self.tail_start = self.head + 0.5
        tail = _tail_mass(self.tail_start, rows + 0.5, alpha) if self.has_tail else 0.0
        self.total = self.head_mass + tail
        # Bucket j holds the hashes [j, j+1) << (64 - bits), i.e. a range of u.
        shift = np.uint64(64 - _QUANTILE_BITS)
        edges = np.arange(1 << _QUANTILE_BITS, dtype=np.uint64) << shift
        self.first = self.ranks_of_uniforms(_uniform(edges))
        self.last = self.ranks_of_uniforms(
            _uniform(edges | ((np.uint64(1) << shift) - np.uint64(1)))
        )

    def probability(self, rank: int) -> float:
        """P(rank), for a rank in the exact head."""
        return (rank + 1) ** -self.alpha / self.total

    def _tail_ranks(self, x: np.ndarray) -> np.ndarray:
        """Ranks of the continuous tail for x >= head_mass (x in CDF units)."""
        y = x - self.head_mass
        a, alpha = self.tail_start, self.alpha
        if abs(alpha - 1.0) < 1e-12:
            t = a * np.exp(y)
        else:
            t = np.maximum(a ** (1.0 - alpha) - y * (alpha - 1.0), 1e-300) ** (1.0 / (1.0 - alpha))
        return np.floor(t - 0.5).astype(np.int64)

    def ranks_of_uniforms(self, u: np.ndarray) -> np.ndarray:
        """Reference inverse CDF: f64[n] uniforms in [0, 1) -> i64[n] ranks."""
        x = u * self.total
        r = np.searchsorted(self.head_cdf, x, side="right").astype(np.int64)
        if self.has_tail:
            tail = x >= self.head_mass
            r[tail] = self._tail_ranks(x[tail])
        return np.clip(r, 0, self.rows - 1)

    def ranks(self, h: np.ndarray) -> np.ndarray:
        """u64[n] hashes -> i64[n] ranks, equal to `ranks_of_uniforms(uniform(h))`."""
        j = h >> np.uint64(64 - _QUANTILE_BITS)
        r = self.first[j]
        open_ = np.flatnonzero(r != self.last[j])
        if open_.size:
            r[open_] = self._finish(_uniform(h[open_]) * self.total, r[open_], self.last[j[open_]])
        return r

    def _finish(self, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Ranks of x (CDF units) known to lie in [lo, hi]: the tail, or bisection."""
        if not self.has_tail:
            return self._bisect(x, lo, hi)
        tail = x >= self.head_mass
        out = np.empty_like(lo)
        out[tail] = np.clip(self._tail_ranks(x[tail]), 0, self.rows - 1)
        head = ~tail
        out[head] = self._bisect(x[head], lo[head], np.minimum(hi[head], self.head - 1))
        return out

    def _bisect(self, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Smallest r in [lo, hi] with cdf[r] > x (searchsorted 'right'), else hi."""
        while True:
            active = lo < hi
            if not active.any():
                return lo
            mid = (lo + hi) >> 1
            go = self.head_cdf[mid] <= x
            lo = np.where(active & go, mid + 1, lo)
            hi = np.where(active & ~go, mid, hi)


class _ZipfTable:
    """Zipf ids of one table: shared ranks, then the table's own scramble.

    Ranks map to ids by `id = (rank * mult + offset) % rows`, a bijection
    because gcd(mult, rows) = 1, so the hot ids are spread over the table.
    A quantile table gives the id directly for hashes whose bucket holds a
    single rank.
    """

    def __init__(self, ranks: _ZipfRanks, key: int):
        rows = ranks.rows
        self.rows = rows
        self.sampler = ranks
        if rows <= 2:
            mult = 1
        else:
            mult = 2 + _mix(key) % (rows - 2)
            while math.gcd(mult, rows) != 1:
                mult += 1
        self.mult = mult
        self.offset = _mix(key ^ 1) % rows
        single = ranks.first == ranks.last
        self.quantile_ids = np.where(single, self.ids_of_ranks(ranks.first), -1).astype(np.int32)

    def ids_of_ranks(self, ranks: np.ndarray) -> np.ndarray:
        """i64[...] ranks -> i64[...] ids."""
        return (ranks * self.mult + self.offset) % self.rows

    def ids(self, h: np.ndarray) -> np.ndarray:
        """u64[n] hashes -> i32[n] Zipf-distributed ids."""
        out = self.quantile_ids[h >> np.uint64(64 - _QUANTILE_BITS)]
        miss = np.flatnonzero(out < 0)
        if miss.size:
            out[miss] = self.ids_of_ranks(self.sampler.ranks(h[miss]))
        return out


class SyntheticData:
    """Deterministic synthetic click data for a feature set, with a known teacher.

    Args:
      features: the feature set to generate for (any mix of pooled and
        sequence features; ids stay in `[0, rows)`).
      alpha: Zipf exponent of the ids (0 = uniform; 1.05 is Criteo-like).
      seed: everything (ids, scrambles, teacher, groups) follows from it.
      num_groups: teacher interaction groups; default about F / 4 (at least
        1, and at most F / 2 so that groups have pairs). Features of a
        one-feature group do not affect the labels.
      mean_len_frac: mean length as a fraction of `max_len`, in (0, 1].
      label_rate: mean click probability the teacher is calibrated to.
      interaction_std: standard deviation of the teacher's interaction
        logit; sets how much the sparse features decide the label.
      dense_std: standard deviation of the teacher's dense logit.
      teacher: 'dlrm' (below) or 'deep': the interaction term is a random
        network `w3 . tanh(W2 tanh(W1 x))` over x, the concatenation of every
        feature's *sum* of its ids' latents (widths `DEEP_HIDDEN`, weights
        N(0, 1/fan-in) from the seed), scaled like the dlrm term. It mixes
        all features nonlinearly, across groups; `groups` is then one group
        of every feature. The Bayes figures are exact for either.

    Weighted features (`SparseFeature.weighted`) get a per-sample weight per
    id, `(0.5 + u) / n` with u uniform in [0, 1) and n the bag's length (0 at
    padding positions), so a bag's weights sum to about 1 but vary threefold.

    Teacher: each (table, id) has a latent `f32[LATENT_DIM]` vector, derived
    by hashing (seed, table, id), so no table-sized arrays exist. A feature's
    vector `v_f` for one example is the mean of its valid ids' latents (zero
    when it has none; for a weighted feature the weighted sum, which is what
    its weighted sum pooling can represent), and

        logit = bias + dense @ dense_weights
                + interaction_scale * sum_groups sum_{i<j in group} <v_i, v_j>

    with `interaction_scale`, `dense_weights` and `bias` calibrated on a
    fixed batch so the logit parts have the requested spreads and the mean
    click probability is `label_rate`.
    """

    def __init__(
        self,
        features: FeatureSet,
        *,
        alpha: float = 1.05,
        seed: int = 0,
        num_groups: int | None = None,
        mean_len_frac: float = 0.5,
        label_rate: float = 0.25,
        interaction_std: float = 1.25,
        dense_std: float = 0.5,
        teacher: str = "dlrm",
    ):
        nf = len(features.sparse)
        if nf == 0:
            raise ValueError("SyntheticData needs at least one sparse feature")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not 0.0 < mean_len_frac <= 1.0:
            raise ValueError(f"mean_len_frac must lie in (0, 1], got {mean_len_frac}")
        if not 0.0 < label_rate < 1.0:
            raise ValueError(f"label_rate must lie in (0, 1), got {label_rate}")
        if interaction_std < 0 or dense_std < 0:
            raise ValueError("interaction_std and dense_std must be >= 0")
        if teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {teacher!r}; available: {', '.join(TEACHERS)}")
        if teacher == "deep":
            num_groups = 1
        for f in features.sparse:
            if f.rows > _MAX_ROWS:
                raise ValueError(f"feature {f.name!r}: {f.rows} rows do not fit int32 ids")
        if num_groups is None:
            num_groups = max(1, min(round(nf / 4), nf // 2))
        if not 1 <= num_groups <= nf:
            raise ValueError(f"num_groups must lie in [1, {nf}], got {num_groups}")

        self.features = features
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.mean_len_frac = float(mean_len_frac)
        self.label_rate = float(label_rate)
        self.teacher = teacher

        self._tables = self._make_tables()
        self._make_lengths()
        self._make_columns()
        self._make_dense()
        self._make_groups(num_groups)
        if teacher == "deep":
            self._make_deep()
        self._calibrate(interaction_std, dense_std)

    # ----------------------------------------------------------------- set-up

    def _make_tables(self) -> list[_ZipfTable]:
        cdfs: dict[int, np.ndarray] = {}
        samplers: dict[int, _ZipfRanks] = {}
        tables = []
        for t, f in enumerate(self.features.sparse):
            if f.rows not in samplers:
                head = min(f.rows, ZIPF_HEAD)
                if head not in cdfs:
                    cdfs[head] = _zipf_head_cdf(head, self.alpha)
                samplers[f.rows] = _ZipfRanks(f.rows, self.alpha, cdfs[head])
            tables.append(_ZipfTable(samplers[f.rows], _key(self.seed, _TABLES, t)))
        return tables

    def _make_lengths(self) -> None:
        """Per feature: length = lo + min(floor(u**gamma * (n+1)), n), n = max_len - lo.

        E[floor(u**gamma * (n+1))] is about (n+1)/(gamma+1) - 1/2, so gamma is
        set from the target mean; every length in [lo, max_len] keeps a
        positive probability.
        """
        lo, n, gamma = [], [], []
        for f in self.features.sparse:
            low = 0 if f.kind is Kind.POOLED else 1
            span = f.max_len - low
            target = self.mean_len_frac * f.max_len - low
            g = (span + 1) / max(target + 0.5, 1e-3) - 1.0 if span > 0 else 1.0
            lo.append(low)
            n.append(span)
            gamma.append(min(max(g, 0.02), 50.0))
        self._len_lo = np.array(lo, np.int64)
        self._len_n = np.array(n, np.int64)
        self._len_gamma = np.array(gamma, np.float64)

    def _make_columns(self) -> None:
        """Hash salts per column of an example: ids, lengths, dense (two each), label."""
        fs = self.features
        nf, d = len(fs.sparse), fs.num_dense
        salts = (
            np.arange(fs.total_slots + nf + 2 * d + 1, dtype=np.uint64) + np.uint64(1)
        ) * np.uint64(_GOLDEN)
        self._salt_ids = salts[: fs.total_slots]
        self._salt_len = salts[fs.total_slots : fs.total_slots + nf]
        self._salt_dense = salts[fs.total_slots + nf : -1]
        self._salt_label = salts[-1]
        # The teacher's latent key of each id column (its table's key).
        table_keys = np.array([_key(self.seed, _TEACHER, 0, t) for t in range(nf)], np.uint64)
        self._col_table_key = np.repeat(table_keys, [f.max_len for f in fs.sparse])
        self._pos = np.concatenate([np.arange(f.max_len) for f in fs.sparse])
        self._col_feature = np.repeat(np.arange(nf), [f.max_len for f in fs.sparse])
        # weighted features: a salt per column of the weights (their own stream,
        # so that adding weights changes nothing else of the data)
        self._salt_w = (np.arange(fs.weight_slots, dtype=np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN) \
            ^ np.uint64(_key(self.seed, _WEIGHTS))

    def _make_dense(self) -> None:
        """Dense column j is log(1 + exp(mu_j + sigma_j * z)), z ~ N(0, 1)."""
        d = self.features.num_dense
        keys = np.array([_key(self.seed, _TEACHER, 1, j) for j in range(3 * d)], np.uint64)
        u = _uniform(splitmix64(keys))
        self._dense_mu = (-1.0 + 4.0 * u[:d])[:, None]
        self._dense_sigma = (0.5 + u[d : 2 * d])[:, None]
        self._dense_raw_w = np.sqrt(-2.0 * np.log1p(-u[2 * d :])) * np.sign(u[2 * d :] - 0.5)

    def _make_groups(self, num_groups: int) -> None:
        nf = len(self.features.sparse)
        keys = np.array([_key(self.seed, _TEACHER, 2, t) for t in range(nf)], np.uint64)
        order = np.argsort(splitmix64(keys), kind="stable")
        chunks = [sorted(int(i) for i in c) for c in np.array_split(order, num_groups)]
        chunks.sort(key=lambda c: c[0])
        names = self.features.names
        self.groups: tuple[tuple[str, ...], ...] = tuple(tuple(names[i] for i in c) for c in chunks)
        self._assign = np.zeros((num_groups, nf), np.float32)
        for g, c in enumerate(chunks):
            self._assign[g, c] = 1.0

    def _make_deep(self) -> None:
        """The `deep` teacher's weights: N(0, 1/fan-in), from hashes of the seed."""
        sizes = (len(self.features.sparse) * LATENT_DIM, *DEEP_HIDDEN, 1)
        self._deep = []
        for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            n = fan_in * fan_out
            keys = np.uint64(_key(self.seed, _TEACHER, 3, layer)) + np.arange(2 * n, dtype=np.uint64)
            u = _uniform(splitmix64(keys))
            z = np.sqrt(-2.0 * np.log1p(-u[:n])) * np.cos(2.0 * np.pi * u[n:])  # Box-Muller
            self._deep.append((z / math.sqrt(fan_in)).reshape(fan_out, fan_in).astype(np.float32))

    def _calibrate(self, interaction_std: float, dense_std: float) -> None:
        rows = np.arange(_CALIBRATION_EXAMPLES, dtype=np.int64)
        dense_t, ids_t, lengths_t, _, weights_t = self._inputs(_CALIBRATION, 0, rows)
        inter = self._signal(ids_t, lengths_t, weights_t)
        s_i = float(inter.std())
        self.interaction_scale = interaction_std / s_i if s_i > 0 else 0.0
        raw = self._dense_raw_w @ dense_t
        s_d = float(raw.std()) if raw.size else 0.0
        self.dense_weights = self._dense_raw_w * (dense_std / s_d if s_d > 0 else 0.0)
        z = self.interaction_scale * inter + self.dense_weights @ dense_t
        lo, hi = -30.0 - float(z.max()), 30.0 - float(z.min())
        for _ in range(100):  # bisection: the mean probability increases with the bias
            mid = 0.5 * (lo + hi)
            if np.mean(_sigmoid(mid + z)) < self.label_rate:
                lo = mid
            else:
                hi = mid
        self.bias = 0.5 * (lo + hi)

    # --------------------------------------------------------------- sampling
    # Internally arrays are feature-major (transposed: [slots, B], [F, B]),
    # so each feature's columns are contiguous rows.

    def _inputs(self, stream: int, step: int, rows: np.ndarray):
        """Inputs of the examples `rows` (indices in the global batch) of one step.

        Returns (transposed) dense f64[D, B], ids i32[slots, B], lengths
        i32[F, B], the label uniforms f64[B] and the weights f32[W, B] (None
        without weighted features).
        """
        fs = self.features
        base = np.uint64(_key(self.seed, stream, step))
        ex = splitmix64(base + rows.astype(np.uint64) * np.uint64(_GOLDEN))  # u64[B]

        u_len = _uniform(splitmix64(self._salt_len[:, None] + ex[None, :]))  # [F, B]
        steps = np.floor(u_len ** self._len_gamma[:, None] * (self._len_n[:, None] + 1))
        lengths = (
            self._len_lo[:, None] + np.minimum(steps.astype(np.int64), self._len_n[:, None])
        ).astype(np.int32)

        ids = np.zeros((fs.total_slots, rows.size), np.int32)
        for t, (f, off) in enumerate(zip(fs.sparse, fs.offsets, strict=True)):
            cols = slice(off, off + f.max_len)
            valid = np.arange(f.max_len)[:, None] < lengths[t][None, :]  # [P, B]
            keys = (self._salt_ids[cols, None] + ex[None, :])[valid]
            ids[cols][valid] = self._tables[t].ids(splitmix64(keys))

        hd = splitmix64(self._salt_dense[:, None] + ex[None, :])  # [2D, B]
        d = fs.num_dense
        u1 = 1.0 - _uniform(hd[:d])  # (0, 1]
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * _uniform(hd[d:]))
        dense = np.logaddexp(0.0, self._dense_mu + self._dense_sigma * z)
        weights = None
        if fs.weighted_idx:
            weights = np.zeros((fs.weight_slots, rows.size), np.float32)
            for t in fs.weighted_idx:
                f = fs.sparse[t]
                wc = fs.weight_columns(f.name)
                valid = np.arange(f.max_len)[:, None] < lengths[t][None, :]
                u = _uniform(splitmix64(self._salt_w[wc, None] + ex[None, :]))
                w = (0.5 + u) / np.maximum(lengths[t], 1)[None, :]
                weights[wc] = np.where(valid, w, 0.0)
        return dense, ids, lengths, _uniform(splitmix64(ex + self._salt_label)), weights

    def _signal(self, ids_t: np.ndarray, lengths_t: np.ndarray, weights_t=None) -> np.ndarray:
        """The teacher's interaction term before scaling, f64[B]."""
        if self.teacher == "deep":
            return self._deep_term(ids_t, lengths_t, weights_t)
        return self._interactions(ids_t, lengths_t, weights_t)

    def _slot_hashes(self, ids_t: np.ndarray, lengths_t: np.ndarray):
        """u64[slots, B] latent hashes of the id slots (four int16 latent codes
        each) and bool[slots, B]: the slot holds a valid id."""
        h = splitmix64(ids_t.astype(np.uint64) ^ self._col_table_key[:, None])
        return h, self._pos[:, None] < lengths_t[self._col_feature]

    def _latent_sums(self, ids_t: np.ndarray, lengths_t: np.ndarray, weights_t=None) -> np.ndarray:
        """f32[F, B, k]: each feature's sum of its valid ids' latent codes plus
        half their count; times `_LATENT_SCALE` that is the sum of the latents
        (each of mean 0 and variance about 1). A weighted feature's is n times
        the weighted sum (n: its length), which the mean of the dlrm teacher
        turns into the weighted sum."""
        fs = self.features
        b = ids_t.shape[1]
        h, valid = self._slot_hashes(ids_t, lengths_t)
        h *= valid  # padding -> latent code 0
        codes = h.view(np.int16).reshape(fs.total_slots, b, LATENT_DIM)
        sums = np.stack(
            [
                codes[off : off + f.max_len].sum(0, dtype=np.int32)
                for f, off in zip(fs.sparse, fs.offsets, strict=True)
            ]
        ).astype(np.float32)  # [F, B, k]
        sums = sums + 0.5 * lengths_t.astype(np.float32)[..., None]
        if fs.weighted_idx and weights_t is None:
            raise ValueError(f"features {[fs.sparse[t].name for t in fs.weighted_idx]} are weighted: "
                             "the teacher needs the batch's weights")
        for t in fs.weighted_idx:
            f = fs.sparse[t]
            c = codes[fs.columns(f.name)].astype(np.float32) + 0.5  # [P, B, k] (padding: weight 0)
            m = weights_t[fs.weight_columns(f.name)] * lengths_t[t].astype(np.float32)[None, :]
            sums[t] = (c * m[..., None]).sum(0)
        return sums

    def _deep_term(self, ids_t: np.ndarray, lengths_t: np.ndarray, weights_t=None) -> np.ndarray:
        """The `deep` teacher: w3 . tanh(W2 tanh(W1 x)), x = sum-pooled latents of all features."""
        return self._deep_net(self._latent_sums(ids_t, lengths_t, weights_t) * _LATENT_SCALE)

    def _deep_net(self, v: np.ndarray) -> np.ndarray:
        """The `deep` teacher's network on sum-pooled latents v [F, B, k]: f64[B]."""
        x = np.transpose(v, (0, 2, 1)).reshape(-1, v.shape[1])  # [F*k, B]
        w1, w2, w3 = self._deep
        return (w3 @ np.tanh(w2 @ np.tanh(w1 @ x)))[0].astype(np.float64)

    def _interactions(self, ids_t: np.ndarray, lengths_t: np.ndarray, weights_t=None) -> np.ndarray:
        """The `dlrm` teacher's interaction term before scaling.

        Args:
          ids_t: i32[slots, B] (transposed ids).
          lengths_t: i32[F, B] (transposed lengths).
        Returns:
          f64[B]: sum over groups of sum over pairs i<j of <v_i, v_j>.
        """
        # Each hash is 4 int16 codes c; the latent is (c + 0.5) * scale: mean 0, var ~1.
        n = lengths_t.astype(np.float32)[..., None]
        v = self._latent_sums(ids_t, lengths_t, weights_t) * (_LATENT_SCALE / np.maximum(n, 1.0))
        return self._group_pairs(v)

    def _group_pairs(self, v: np.ndarray) -> np.ndarray:
        """Sum over groups of sum over pairs i<j of <v_i, v_j>, v [F, B, k]: f64[B]."""
        b = v.shape[1]
        s = (self._assign @ v.reshape(len(self.features.sparse), -1)).reshape(-1, b, LATENT_DIM)
        sq = np.square(s).sum((0, 2), dtype=np.float64) - np.square(v).sum((0, 2), dtype=np.float64)
        return 0.5 * sq

    def _logits(self, dense_t, ids_t, lengths_t, weights_t=None) -> np.ndarray:
        """Teacher logits f64[B] from transposed inputs ([D, B], [slots, B], [F, B], [W, B])."""
        z = self.bias + self.interaction_scale * self._signal(ids_t, lengths_t, weights_t)
        return z + self.dense_weights @ dense_t

    @staticmethod
    def _local_rows(global_batch: int, process_index: int, num_processes: int) -> np.ndarray:
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        if num_processes < 1 or not 0 <= process_index < num_processes:
            raise ValueError(
                f"process_index {process_index} is outside [0, num_processes={num_processes})"
            )
        if global_batch % num_processes:
            raise ValueError(
                f"global_batch {global_batch} is not divisible by num_processes {num_processes}"
            )
        b = global_batch // num_processes
        return np.arange(process_index * b, (process_index + 1) * b, dtype=np.int64)

    def _batch(
        self, stream: int, step: int, global_batch: int, process_index: int, num_processes: int
    ) -> Batch:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rows = self._local_rows(global_batch, process_index, num_processes)
        dense_t, ids_t, lengths_t, u_label, weights_t = self._inputs(stream, int(step), rows)
        dense_t = dense_t.astype(np.float32)
        probs = _sigmoid(self._logits(dense_t, ids_t, lengths_t, weights_t))
        return Batch(
            dense=np.ascontiguousarray(dense_t.T),
            ids=np.ascontiguousarray(ids_t.T),
            lengths=np.ascontiguousarray(lengths_t.T),
            labels=(u_label < probs).astype(np.float32),
            weights=None if weights_t is None else np.ascontiguousarray(weights_t.T),
        )

    # ----------------------------------------------------------------- public

    def batch(
        self, step: int, global_batch: int, *, process_index: int = 0, num_processes: int = 1
    ) -> Batch:
        """This process's rows of training batch `step`.

        Returns a numpy `Batch` of `global_batch // num_processes` examples:
        rows `[p*B/P, (p+1)*B/P)` of the global batch, identical to those rows
        of `batch(step, global_batch)`. dense f32[b, D], ids i32[b, slots],
        lengths i32[b, F], labels f32[b].
        """
        return self._batch(_TRAIN, step, global_batch, process_index, num_processes)

    def eval_batch(
        self, index: int, batch_size: int, *, process_index: int = 0, num_processes: int = 1
    ) -> Batch:
        """Like `batch`, from the held-out evaluation stream (never seen in training)."""
        return self._batch(_EVAL, index, batch_size, process_index, num_processes)

    def logits(self, batch: Batch) -> np.ndarray:
        """Teacher logits of a (host) batch: f64[B]."""
        return self._logits(
            np.ascontiguousarray(np.asarray(batch.dense, np.float32).T),
            np.ascontiguousarray(np.asarray(batch.ids, np.int32).T),
            np.ascontiguousarray(np.asarray(batch.lengths, np.int32).T),
            None if batch.weights is None else np.ascontiguousarray(np.asarray(batch.weights, np.float32).T),
        )

    def slot_latents(self, batch: Batch) -> np.ndarray:
        """The teacher's latent vector of every id slot of a (host) batch.

        Returns f32[slots, B, LATENT_DIM] (slot-major, columns as in
        `FeatureSet.offsets`), zero at padding positions.
        """
        ids_t = np.ascontiguousarray(np.asarray(batch.ids, np.int32).T)
        h, valid = self._slot_hashes(ids_t, np.asarray(batch.lengths, np.int32).T)
        codes = h.view(np.int16).reshape(*ids_t.shape, LATENT_DIM).astype(np.float32)
        return (codes + 0.5) * _LATENT_SCALE * valid[..., None]

    def logits_of_latents(self, batch: Batch, latents: np.ndarray) -> np.ndarray:
        """The teacher's logits f64[B] with `latents` (f32[slots, B, LATENT_DIM],
        e.g. estimates of `slot_latents(batch)`) in place of its own.

        With `latents = slot_latents(batch)` this is `logits(batch)` up to
        float rounding. Padding slots must hold zero.
        """
        fs = self.features
        lengths_t = np.asarray(batch.lengths, np.int32).T
        if fs.weighted_idx:  # a weighted slot counts n x its weight (`_latent_sums`)
            latents = np.array(latents, np.float64)
            weights_t = np.asarray(batch.weights, np.float32).T
            for t in fs.weighted_idx:
                f = fs.sparse[t]
                m = weights_t[fs.weight_columns(f.name)] * lengths_t[t][None, :]
                latents[fs.columns(f.name)] *= m[..., None]
        sums = np.stack([latents[off : off + f.max_len].sum(0, dtype=np.float64)
                         for f, off in zip(fs.sparse, fs.offsets, strict=True)])  # [F, B, k]
        if self.teacher == "deep":
            signal = self._deep_net(sums)
        else:
            signal = self._group_pairs(sums / np.maximum(lengths_t, 1)[..., None])
        dense_t = np.asarray(batch.dense, np.float32).T
        return self.bias + self.interaction_scale * signal + self.dense_weights @ dense_t

    def probabilities(self, batch: Batch) -> np.ndarray:
        """Teacher click probabilities of a (host) batch: f32[B]."""
        return _sigmoid(self.logits(batch)).astype(np.float32)

    def bayes_metrics(self, num_batches: int, batch_size: int) -> dict[str, float]:
        """The teacher's (Bayes-optimal) metrics on eval batches `0..num_batches-1`.

        Returns {'auc', 'logloss', 'label_rate', 'examples'}: the best a model
        can reach on that evaluation set, in expectation.
        """
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        probs, labels = [], []
        for i in range(num_batches):
            b = self.eval_batch(i, batch_size)
            probs.append(self.probabilities(b))
            labels.append(b.labels)
        p, y = np.concatenate(probs), np.concatenate(labels)
        return {
            "auc": auc(p, y),
            "logloss": logloss(p, y),
            "label_rate": float(y.mean()),
            "examples": int(y.size),
        }

    def top_ids(self, name: str, n: int = 1) -> np.ndarray:
        """The `n` most frequent ids of a feature, hottest first: i64[n]."""
        t = self.features.index(name)
        table = self._tables[t]
        return table.ids_of_ranks(np.arange(min(n, table.rows), dtype=np.int64))

    def id_probability(self, name: str, rank: int) -> float:
        """Probability that one sampled id of `name` is its `rank`-th hottest id."""
        sampler = self._tables[self.features.index(name)].sampler
        if not 0 <= rank < sampler.head:
            raise ValueError(f"rank must lie in [0, {sampler.head}), got {rank}")
        return sampler.probability(rank)

    def __repr__(self) -> str:
        return (
            f"SyntheticData({len(self.features.sparse)} features, alpha={self.alpha}, "
            f"seed={self.seed}, teacher={self.teacher}, groups={len(self.groups)}, "
            f"label_rate={self.label_rate})"
        )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))
