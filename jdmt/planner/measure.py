"""Measured cost of one device's fused embedding work: lookup + update of a set of pieces.

A *piece* is what one device does for one table (or one shard of it): it
owns `rows` rows of width `width` and serves `bags` requests of up to
`pooling` ids each per step. A table-wise pooled table is one piece with the
global batch's bags; a column shard is a piece of width D / k; a row-wise
table is a piece of R / N rows on every device that serves unique-row
requests (`pooling` 1). Ids are drawn from a truncated Zipf law over the
piece's rows (exponent `alpha`), with the hot rows scattered over the table
as real hashed ids are.

`Bench.run` times the pieces as the library's owner runs them on this
backend, with the library's own functions, in two programs as a training
step does:

    forward:  flat.owner_pool of every bag (C++ pooled lookup on CPU)
    update:   optimizers.sparse_step of every id with its bag's gradient
              (the fused C++ sparse optimizer on CPU), table donated

The pieces of one width share one storage buffer (rows back to back), as in
`embeddings.layout`, and one fused update. To compile few programs, bags
are looked up in blocks by power-of-two pooling, bag and id counts are
rounded up to powers of two (padded ids are -1, which the kernels skip),
and each width keeps one buffer (`Bench`).

Table features for a cost model (AutoShard's): rows, width, pooling, size,
and a 17-bin histogram of index reuse computed from the drawn ids (`reuse_histogram`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdmt.embeddings import flat, optimizers
from jdmt.embeddings.types import ShardingType as T
from jdmt.embeddings.types import SparseOptimizer
from jdmt.pallas_kernels.common import Impl

REUSE_BINS = 17
"""Bins of `reuse_histogram`: lookups of rows used 1, 2-3, 4-7, ... 2**16+ times."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """One device's share of one table for one step.

    Attributes:
      rows: rows the device owns of it.
      width: columns (the table's dim, or a column shard's).
      bags: requests per step (bags of the global batch, or unique rows asked).
      pooling: mean ids per request (1: unique-row requests); 0: never looked up.
      alpha: Zipf exponent of the ids over the rows (0: uniform).
      seed: seed of the ids.
    """

    rows: int
    width: int
    bags: int
    pooling: float
    alpha: float = 1.05
    seed: int = 0

    def __post_init__(self):
        if self.rows < 1 or self.width < 1 or self.bags < 0 or self.pooling < 0:
            raise ValueError(f"bad piece {self}")

    @property
    def max_len(self) -> int:
        """Ids per bag in the program: lengths are uniform on 1..round(2p)-1
        (mean about p); 1 for unique rows."""
        return max(1, int(round(2 * self.pooling)) - 1)

    @property
    def ids(self) -> float:
        return self.bags * self.pooling

    def bag_lengths(self, rng: np.random.Generator) -> np.ndarray:
        if self.pooling == 0 or self.bags == 0:
            return np.zeros(self.bags, np.int64)
        if self.max_len == 1:
            return np.ones(self.bags, np.int64)
        lo, hi = 1, self.max_len  # uniform on [lo, hi] has mean (1 + 2p - 1) / 2 = p
        return rng.integers(lo, hi + 1, self.bags)

    def sample_ids(self, cap: int = 1 << 14) -> tuple[np.ndarray, float]:
        """(ids, scale): at most `cap` of the piece's ids, drawn from its
        law, and how many times more ids a step has."""
        n = int(round(self.bags * self.pooling))
        if n == 0:
            return np.zeros(0, np.int32), 1.0
        m = min(n, cap)
        return zipf_rows(self.rows, self.alpha, m, np.random.default_rng(self.seed)), n / m

    def draw(self) -> np.ndarray:
        """i32[bags, max_len] ids (-1: no id), deterministic in `seed`."""
        rng = np.random.default_rng(self.seed)
        lengths = self.bag_lengths(rng)
        total = int(lengths.sum())
        rows = zipf_rows(self.rows, self.alpha, total, rng)
        out = np.full((self.bags, self.max_len), -1, np.int32)
        mask = np.arange(self.max_len)[None, :] < lengths[:, None]
        out[mask] = rows
        return out


def zipf_rows(rows: int, alpha: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """i32[n] rows of a truncated Zipf law over `rows` (continuous inverse CDF,
    rank -> row by a multiplicative scramble so hot rows spread over the table)."""
    u = rng.random(n)
    if alpha == 0:
        ranks = np.floor(u * rows)
    elif abs(alpha - 1.0) < 1e-6:
        ranks = np.floor(np.exp(u * math.log(rows + 1.0))) - 1
    else:
        a = 1.0 - alpha
        ranks = np.floor(((((rows + 1.0) ** a - 1.0) * u + 1.0)) ** (1.0 / a)) - 1
    ranks = np.clip(ranks, 0, rows - 1).astype(np.int64)
    mult = _coprime(rows)
    return ((ranks * mult + rows // 3) % rows).astype(np.int32)


def _coprime(rows: int) -> int:
    m = max(1, int(rows * 0.6180339887)) | 1
    while math.gcd(m, rows) != 1:
        m += 2
    return m % rows if rows > 1 else 1


def reuse_histogram(ids: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """f32[17]: the fraction of lookups whose row is used c times in `ids`,
    by bin floor(log2 c) (the last bin: 2**16 or more). Ids < 0 are ignored;
    all zeros when there are none. `scale`: ids are a sample of `scale`
    times as many, and counts are scaled up to estimate the whole's."""
    ids = np.asarray(ids).ravel()
    ids = ids[ids >= 0]
    out = np.zeros(REUSE_BINS, np.float32)
    if ids.size == 0:
        return out
    _, counts = np.unique(ids, return_counts=True)
    bins = np.floor(np.log2(np.maximum(1.0, counts * scale))).astype(np.int64)
    bins = np.minimum(bins, REUSE_BINS - 1)
    np.add.at(out, bins, counts.astype(np.float32))
    return out / ids.size


def _bucket(x: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(x - 1).bit_length()))


def default_impl() -> Impl:
    """What the library's owner runs on this backend with one thread: the C++
    kernels on CPU where they are built, else XLA."""
    if jax.default_backend() == "cpu":
        from jdmt.embeddings import cpu_kernels

        if cpu_kernels.available():
            return Impl(cpu_threads=1)
    return Impl()


class Bench:
    """Runs sets of pieces on one device and times them.

    One storage buffer per width is kept and reused (donated to each
    update), grown when a set needs more rows (up to `max_bytes`): a set's
    pieces of that width use its first rows, back to back, so the rows
    touched are those of a buffer of exactly their size, and programs
    compile once per (buffer, bags, pooling) bucket.
    """

    def __init__(self, optimizer: SparseOptimizer = SparseOptimizer(), *, impl: Impl | None = None,
                 iters: int = 5, max_bytes: int = 4 << 30, device=None):
        self.opt = optimizer
        self.impl = default_impl() if impl is None else impl
        self.iters = iters
        self.device = device or jax.devices()[0]
        self.max_bytes = int(max_bytes)
        self._buffers: dict[int, tuple[jax.Array, jax.Array | None]] = {}
        cpu_kernel = bool(self.impl.cpu_threads)
        impl_ = self.impl
        opt = optimizer

        def forward(table, ids):
            pooled = flat.owner_pool(table, ids, ids.shape[-1], impl_)
            return pooled.sum(axis=0)  # keep the lookup; a step's dense input

        def update(table, accum, rows, src, grads):
            table, accum, _ = optimizers.sparse_step(opt, table, accum, rows, src, grads, lr=0.01,
                                                     cpu_kernel=cpu_kernel, impl=impl_)
            return table, accum

        self._forward = jax.jit(forward)
        self._update = jax.jit(update, donate_argnums=(0, 1))

    @property
    def kernel(self) -> str:
        return "cpu-ffi" if self.impl.cpu_threads else self.impl.kernel

    def _buffer(self, width: int, need: int):
        if width not in self._buffers or self._buffers[width][0].shape[0] < need:
            self._buffers.pop(width, None)
            rows = min(self.max_rows(width), max(1 << 16, int(need * 1.25)))
            table = jax.device_put(jnp.zeros((rows, width), jnp.float32), self.device)
            acc_shape = optimizers.accumulator_shape(self.opt, rows, width)
            accum = None if acc_shape is None else jax.device_put(
                jnp.full(acc_shape, self.opt.initial_accumulator, jnp.float32), self.device)
            self._buffers[width] = (table, accum)
        return self._buffers[width]

    def max_rows(self, width: int) -> int:
        """Rows of the width's buffer: what a set's pieces of that width may hold."""
        return max(1, self.max_bytes // (4 * width))

    def programs(self, pieces: Sequence[Piece]) -> list[tuple[int, list[np.ndarray], np.ndarray, np.ndarray]]:
        """Per width: (width, i32[bags, P] bags per pooling bucket, i32[n]
        storage rows of every id, i32[n] the bag (gradient row) of each).

        The pieces of a width sit back to back in its buffer; their bags are
        looked up in one block per power-of-two pooling (bags padded to a
        power of two, ids to the block's pooling with -1), and updated in
        one fused step over every id of the width (padded with -1)."""
        out = []
        for w in sorted({p.width for p in pieces}):
            group = [p for p in pieces if p.width == w and p.bags and p.pooling]
            if not group:
                continue
            rows = sum(p.rows for p in group)
            if rows > self.max_rows(w):
                raise ValueError(f"pieces of width {w} hold {rows:,} rows, over this bench's "
                                 f"{self.max_rows(w):,} (max_bytes={self.max_bytes:,})")
            base = np.cumsum([0] + [p.rows for p in group])[:-1]
            by_len: dict[int, list[int]] = {}
            for i, p in enumerate(group):
                by_len.setdefault(_bucket(p.max_len), []).append(i)
            blocks, flat_rows, flat_bag, bag0 = [], [], [], 0
            for plen, idx in sorted(by_len.items()):
                ids = np.full((_bucket(sum(group[i].bags for i in idx), 8), plen), -1, np.int32)
                at = 0
                for i in idx:
                    x = group[i].draw()
                    ids[at:at + group[i].bags, :x.shape[1]] = np.where(x >= 0, x + base[i], -1)
                    at += group[i].bags
                blocks.append(ids)
                bag, _ = np.nonzero(ids >= 0)
                flat_rows.append(ids[ids >= 0])
                flat_bag.append(bag + bag0)
                bag0 += ids.shape[0]
            n = sum(r.size for r in flat_rows)
            upd_rows = np.full(_bucket(n, 8), -1, np.int32)
            upd_bag = np.zeros(upd_rows.shape, np.int32)
            upd_rows[:n] = np.concatenate(flat_rows)
            upd_bag[:n] = np.concatenate(flat_bag)
            out.append((w, blocks, upd_rows, upd_bag))
        return out

    def run(self, pieces: Sequence[Piece]) -> float:
        """Seconds of one step (forward + update of every width) of `pieces`:
        the fastest of `iters` timed steps after one warm-up (the least
        disturbed by other work on the machine)."""
        progs = []
        for w, blocks, rows, bag in self.programs(pieces):
            nbags = _bucket(int(bag.max()) + 1, 8)
            progs.append((w, [jax.device_put(b, self.device) for b in blocks],
                          jax.device_put(rows, self.device), jax.device_put(bag, self.device),
                          jax.device_put(jnp.full((nbags, w), 1e-3, jnp.float32), self.device),
                          int(rows.max()) + 1))
        if not progs:
            return 0.0

        def step():
            outs = []
            for w, blocks, rows, bag, grads, need in progs:
                table, accum = self._buffer(w, need)
                outs += [self._forward(table, b) for b in blocks]
                self._buffers[w] = self._update(table, accum, rows, bag, grads)
            jax.block_until_ready((outs, [self._buffers[p[0]] for p in progs]))

        step()  # compile and warm up
        times = []
        for _ in range(self.iters):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        return float(np.min(times))


def unique_count(t, n: int, seed: int = 0) -> int:
    """Distinct rows among `n` ids of table `t` (a `TableSpec`), drawn."""
    if n <= 0 or t.pooling == 0:
        return 0
    rows = zipf_rows(t.rows, t.alpha, int(n), np.random.default_rng(seed))
    return int(np.unique(rows).size)


def device_pieces(tables, placements, hosts: int, local: int, global_batch: int,
                  *, row_dedup: str = "host") -> list[list[Piece]]:
    """What each device does for a plan: its pieces, by flat device.

    Args:
      tables: `TableSpec`s (`jdmt.planner.tablesets`) by name order.
      placements: `{name: Placement}`.
      row_dedup: the row-wise route, as `ShardedEmbeddings`' (two hops when
        "host" and the mesh has H > 1 and L > 1).

    Routes as `embeddings.flat`/`.two_hop`/`.hosted` run them: a table-wise or
    column-wise pooled table gets every bag of the global batch at its
    owner(s) (width D / shards); one-id features and row-wise shards serve
    unique rows (pooling 1): per shard, each requester's distinct rows (or,
    in two hops, each host's) that live there, counted from drawn ids;
    table-row-wise shards serve their host's entries' distinct rows. A
    data-parallel table is measured as a lookup and update of the global
    batch's bags on every device (its update applies every device's rows;
    its lookup is counted N times over: an upper bound).
    """
    n = hosts * local
    b = global_batch // n
    two_hop = row_dedup == "host" and hosts > 1 and local > 1
    out: list[list[Piece]] = [[] for _ in range(n)]
    for i, t in enumerate(tables):
        pl = placements[t.name]
        seed = 7919 * i + 1
        if t.pooling == 0:
            continue
        if pl.type in (T.TABLE_WISE, T.COLUMN_WISE):
            w = t.dim // len(pl.devices)
            if t.max_len > 1:
                piece = Piece(t.rows, w, global_batch, t.pooling, t.alpha, seed)
            else:
                u = unique_count(t, round(b * t.pooling), seed)
                piece = Piece(t.rows, w, n * u, 1.0, t.alpha, seed)
            for d in pl.devices:
                out[d].append(piece)
        elif pl.type is T.ROW_WISE:
            s = min(t.rows, n)
            if two_hop:
                asked = hosts * unique_count(t, round(local * b * t.pooling), seed) / s
            else:
                asked = n * unique_count(t, round(b * t.pooling), seed) / s
            piece = Piece(-(-t.rows // s), t.dim, max(1, round(asked)), 1.0, t.alpha, seed)
            for d in pl.devices[:s]:
                out[d].append(piece)
        elif pl.type is T.TABLE_ROW_WISE:
            s = min(t.rows, len(pl.devices))
            asked = unique_count(t, round(hosts * b * t.pooling), seed) * local / s
            piece = Piece(-(-t.rows // s), t.dim, max(1, round(asked)), 1.0, t.alpha, seed)
            for d in pl.devices[:s]:
                out[d].append(piece)
        elif pl.type is T.DATA_PARALLEL:
            piece = Piece(t.rows, t.dim, global_batch, t.pooling, t.alpha, seed)
            for d in range(n):
                out[d].append(piece)
        else:
            raise ValueError(f"{t.name}: no measured pieces for {pl.type.value}")
    return out


def backend_name() -> str:
    d = jax.devices()[0]
    return f"{jax.default_backend()}:{getattr(d, 'device_kind', d.platform)}"


__all__ = ["REUSE_BINS", "Bench", "Piece", "backend_name", "default_impl", "device_pieces",
           "reuse_histogram", "unique_count", "zipf_rows"]
