"""Streaming reader of Criteo Kaggle / Terabyte click logs (TSV, optionally gzip).

One example a line, 40 tab-separated fields: the label (0 or 1), 13 integer
features I1..I13 and 26 categorical features C1..C26 written as hex strings
(8 digits in the public data sets). Any field but the label may be empty,
meaning missing.

Conversions (vectorised per batch):

* integers -> `log(1 + max(x, 0))`, missing -> 0;
* categories -> `hash_category(int(hex), table) % rows`: a splitmix64 hash
  per table, so ids use the whole table whatever the raw values look like;
  a missing category has length 0 (no id).

Malformed lines are counted and skipped (or raise, with `strict=True`), so a
corrupt line never silently shifts the data. Iteration yields fixed-shape
`Batch`es; the last partial batch is dropped and counted in `stats`.

`CriteoReader` is one pass over a file; `CriteoData` makes a file a trainer
data source: a held-out evaluation set, epochs, and resumable positions.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import os
import threading
from collections.abc import Iterator, Sequence
from typing import IO

import numpy as np

from jdmt.data.specs import Batch, FeatureSet, make_features
from jdmt.data.synthetic import _mix, splitmix64

__all__ = [
    "NUM_INT",
    "NUM_CAT",
    "CriteoData",
    "CriteoFormatError",
    "CriteoReader",
    "CriteoStats",
    "criteo_features",
    "hash_category",
]

NUM_INT = 13
NUM_CAT = 26
_NUM_FIELDS = 1 + NUM_INT + NUM_CAT
_MAX_DIGITS = 18  # integer fields: at most 18 digits (fits int64)
_WIDTH = 20  # bytes kept per field: enough to see a too-long integer
_MAX_HEX = 8  # categories: 1 to 8 hex digits (fits 32 bits)
_REPORTED = 10  # bad lines kept in stats with their reasons

_HEX = np.full(256, -1, np.int16)
for _c in b"0123456789":
    _HEX[_c] = _c - ord("0")
for _c in b"abcdef":
    _HEX[_c] = _c - ord("a") + 10
for _c in b"ABCDEF":
    _HEX[_c] = _c - ord("A") + 10


class CriteoFormatError(ValueError):
    """A malformed Criteo file or line; `line` is 1-based (None: the whole file)."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path, self.line, self.reason = path, line, reason
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")


@dataclasses.dataclass
class CriteoStats:
    """What one pass of a `CriteoReader` saw (updated while it runs).

    Attributes:
      lines: lines read in this pass (after `start`), malformed ones included.
      examples: valid examples delivered in batches (whole global batches,
        counted once, whatever the process).
      skipped_lines: malformed lines skipped.
      dropped_examples: valid examples of the final partial batch, not
        delivered.
      bad_lines: (line number, reason) of the first malformed lines.
    """

    lines: int = 0
    examples: int = 0
    skipped_lines: int = 0
    dropped_examples: int = 0
    bad_lines: list[tuple[int, str]] = dataclasses.field(default_factory=list)


def criteo_features(
    rows_per_table: int | Sequence[int], dim: int, *, prefix: str = "cat"
) -> FeatureSet:
    """The Criteo feature set: 26 one-hot features `cat_0 .. cat_25`, 13 dense.

    Args:
      rows_per_table: rows of every table, or one entry per table (C1..C26).
      dim: embedding width.
    """
    return make_features(NUM_CAT, rows_per_table, dim, 1, num_dense=NUM_INT, prefix=prefix)


def hash_category(
    values: np.ndarray, table: int | np.ndarray, rows: int | np.ndarray, seed: int = 0
) -> np.ndarray:
    """Map raw category values to table rows.

    Args:
      values: u64[...] raw values (the hex strings as integers).
      table: table index (broadcast against `values`), so equal values in
        different tables land on unrelated rows.
      rows: rows of the table(s), broadcast like `table`.
      seed: changes the whole mapping.
    Returns:
      i64[...] ids in `[0, rows)`: splitmix64(value ^ key(seed, table)) % rows.
    """
    salt = splitmix64(splitmix64(np.asarray(table, np.uint64)) ^ np.uint64(_mix(seed)))
    h = splitmix64(np.asarray(values, np.uint64) ^ salt)
    return (h % np.asarray(rows, np.uint64)).astype(np.int64)


def _open(path: str) -> IO[bytes]:
    """Open a plain or gzip file (detected by its magic bytes) for binary reading."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb", buffering=1 << 20)


def _show(field: bytes) -> str:
    text = field.decode("utf-8", "replace")
    return repr(text if len(text) <= 24 else text[:21] + "...")


@dataclasses.dataclass
class _Chunk:
    """Valid examples parsed from a run of lines (n of them)."""

    labels: np.ndarray  # f32[n]
    dense: np.ndarray  # f32[n, 13]
    cats: np.ndarray  # u64[n, 26] raw values
    present: np.ndarray  # bool[n, 26]
    bad: list[tuple[int, str]]  # (line number, reason) of the malformed lines
    num_bad: int


def _hex_values(cats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode categories: S[n, 26] -> (u64[n, 26] values, bool[n, 26] well formed).

    Well formed: empty, or 1-8 hex digits. Eight bytes are decoded at once
    as one little-endian word (SWAR): each byte's nibble is `(b & 15) + 9 *
    (b >> 6)` (letters have bit 6 set), then nibbles are packed pairwise, and
    a string shorter than 8 digits is shifted right by its missing nibbles.
    """
    length = np.strings.str_len(cats)
    c8 = np.ascontiguousarray(cats.astype("S8"))
    raw = c8.view(np.uint8).reshape(*c8.shape, 8)
    bad_byte = (_HEX[raw] < 0) & (raw != 0)  # non-hex; NUL is only padding
    no_bad = bad_byte.view(np.uint64)[..., 0] == 0
    nonzero = np.bitwise_count((raw != 0).view(np.uint64)[..., 0])  # non-NUL bytes
    ok = (length <= _MAX_HEX) & no_bad & (nonzero == length)

    w = c8.view(np.uint64)
    m = np.uint64
    w = (w & m(0x0F0F0F0F0F0F0F0F)) + m(9) * ((w >> m(6)) & m(0x0101010101010101))
    w = ((w << m(4)) | (w >> m(8))) & m(0x00FF00FF00FF00FF)
    w = ((w << m(8)) | (w >> m(16))) & m(0x0000FFFF0000FFFF)
    w = ((w << m(16)) | (w >> m(32))) & m(0x00000000FFFFFFFF)
    shift = (4 * (_MAX_HEX - np.minimum(length, _MAX_HEX))).astype(np.uint64)
    return w >> shift, ok


def _parse(lines: list[bytes], first_line: int, reasons_wanted: int) -> _Chunk:
    """Parse and validate lines; line `i` of the list has number `first_line + i`."""
    fields = [line.rstrip(b"\r\n").split(b"\t") for line in lines]
    count_ok = np.fromiter(map(len, fields), np.int64, len(fields)) == _NUM_FIELDS
    rows = np.flatnonzero(count_ok)
    arr = np.array([fields[i] for i in rows], dtype=f"S{_WIDTH}").reshape(rows.size, _NUM_FIELDS)

    label = arr[:, 0]
    label_ok = (label == b"0") | (label == b"1")

    # Integers: empty, or an optional '-' and 1-18 digits.
    ints = arr[:, 1 : 1 + NUM_INT]
    neg = np.strings.startswith(ints, b"-")
    digits = np.strings.lstrip(ints, b"-")  # numpy < 2.3 has no np.strings.slice
    int_ok = (ints == b"") | (
        np.strings.isdigit(digits)
        & (np.strings.str_len(digits) <= _MAX_DIGITS)
        & ~np.strings.startswith(ints, b"--")
    )

    cats, cat_ok = _hex_values(arr[:, 1 + NUM_INT :])

    good = label_ok & int_ok.all(1) & cat_ok.all(1)
    num_bad = len(lines) - int(good.sum())
    bad: list[tuple[int, str]] = []
    if num_bad and reasons_wanted > 0:
        pos = {int(r): k for k, r in enumerate(rows)}
        for r in np.union1d(np.flatnonzero(~count_ok), rows[~good])[:reasons_wanted]:
            bad.append(
                (first_line + int(r), _reason(fields[r], pos.get(int(r)), label_ok, int_ok, cat_ok))
            )

    positive = good[:, None] & ~neg & (ints != b"")
    values = np.where(positive, ints, b"0")[good].astype(np.int64)
    return _Chunk(
        labels=(label[good] == b"1").astype(np.float32),
        dense=np.log1p(values.astype(np.float64)).astype(np.float32),
        cats=cats[good],
        present=arr[good][:, 1 + NUM_INT :] != b"",
        bad=bad,
        num_bad=num_bad,
    )


def _reason(fields: list[bytes], k: int | None, label_ok, int_ok, cat_ok) -> str:
    """Why a line is malformed; k: its row among the lines with 40 fields."""
    if k is None:
        if fields == [b""]:
            return "empty line"
        return f"expected {_NUM_FIELDS} tab-separated fields, found {len(fields)}"
    if not label_ok[k]:
        return f"label {_show(fields[0])} is not 0 or 1"
    if not int_ok[k].all():
        j = int(np.argmin(int_ok[k]))
        field = _show(fields[1 + j])
        return f"integer field I{j + 1} {field} is not an integer of at most {_MAX_DIGITS} digits"
    j = int(np.argmin(cat_ok[k]))
    field = _show(fields[1 + NUM_INT + j])
    return f"categorical field C{j + 1} {field} is not 1-{_MAX_HEX} hex digits"


class CriteoReader:
    """Iterate fixed-shape batches of a Criteo TSV file (plain or gzip).

    Args:
      path: the file; gzip is detected from its contents.
      features: 26 sparse features and 13 dense (see `criteo_features`);
        category C(k+1) goes to feature k (its first column).
      batch_size: the global batch size; every process reads the whole file
        and keeps rows `[p*b, (p+1)*b)` of each global batch, b = batch_size
        / num_processes.
      strict: raise `CriteoFormatError` on the first malformed line instead
        of skipping it.
      start: lines to skip first (a `position` saved earlier), to resume.
      hash_seed: seed of `hash_category`.

    Each pass (`iter(reader)`) starts at `start`. While it runs, `position`
    is the number of lines consumed up to the end of the last batch yielded:
    `CriteoReader(..., start=reader.position)` continues with the next
    batch. `stats` describes the pass (see `CriteoStats`).

    Batches: dense f32[b, 13], ids i32[b, slots], lengths i32[b, 26] (1, or 0
    for a missing category), labels f32[b].

    Raises (on iteration): `CriteoFormatError` when the file is empty or,
    reading from the start, holds no valid example or fewer than one batch.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        features: FeatureSet,
        batch_size: int,
        *,
        strict: bool = False,
        process_index: int = 0,
        num_processes: int = 1,
        start: int = 0,
        hash_seed: int = 0,
    ):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"Criteo file not found: {self.path!r}")
        if len(features.sparse) != NUM_CAT or features.num_dense != NUM_INT:
            raise ValueError(
                f"a Criteo reader needs {NUM_CAT} sparse and {NUM_INT} dense features "
                f"(see criteo_features); got {len(features.sparse)} and {features.num_dense}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_processes < 1 or not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is outside [0, {num_processes})")
        if batch_size % num_processes:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by num_processes {num_processes}"
            )
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.features = features
        self.batch_size = batch_size
        self.strict = strict
        self.process_index = process_index
        self.num_processes = num_processes
        self.start = start
        self.hash_seed = hash_seed
        self.position = start
        self.stats = CriteoStats()
        self._rows = np.array([f.rows for f in features.sparse], np.uint64)
        self._cols = np.array(features.offsets, np.int64)
        self._local = slice(
            process_index * (batch_size // num_processes),
            (process_index + 1) * (batch_size // num_processes),
        )

    def __iter__(self) -> Iterator[Batch]:
        stats = self.stats = CriteoStats()
        self.position = self.start
        with _open(self.path) as f:
            skipped = sum(1 for _ in itertools.islice(f, self.start))
            if skipped < self.start:
                raise CriteoFormatError(
                    self.path,
                    None,
                    f"start position {self.start} is past the end of the file ({skipped} lines)",
                )
            line_no = self.start  # lines consumed so far
            pending: list[_Chunk] = []
            have = 0
            batches = 0
            while True:
                lines = list(itertools.islice(f, self.batch_size - have))
                if not lines:
                    break
                chunk = _parse(
                    lines, line_no + 1, _REPORTED - len(stats.bad_lines) if not self.strict else 1
                )
                line_no += len(lines)
                stats.lines += len(lines)
                if chunk.num_bad:
                    if self.strict:
                        raise CriteoFormatError(self.path, *chunk.bad[0])
                    stats.skipped_lines += chunk.num_bad
                    stats.bad_lines.extend(chunk.bad)
                if chunk.labels.size:
                    pending.append(chunk)
                    have += chunk.labels.size
                if have == self.batch_size:
                    batch = self._assemble(pending)
                    pending, have = [], 0
                    batches += 1
                    stats.examples += self.batch_size
                    self.position = line_no
                    yield batch
        stats.dropped_examples = have
        if batches == 0:
            self._explain_no_batch(stats, have)

    def _explain_no_batch(self, stats: CriteoStats, valid: int) -> None:
        """Raise why a pass from the start of the file gave no batch (resumed: none is due)."""
        if self.start:
            return  # resumed: the rest of the file holds no whole batch
        if stats.lines == 0:
            raise CriteoFormatError(self.path, None, "the file is empty")
        if valid == 0:
            first = "; ".join(f"line {n}: {r}" for n, r in stats.bad_lines[:3])
            raise CriteoFormatError(
                self.path, None, f"no valid example in {stats.lines} lines (all malformed; {first})"
            )
        raise CriteoFormatError(
            self.path,
            None,
            f"only {valid} valid examples ({stats.skipped_lines} malformed lines skipped), "
            f"fewer than one batch of {self.batch_size}",
        )

    def _assemble(self, chunks: list[_Chunk]) -> Batch:
        """Concatenate chunks into the global batch and keep this process's rows."""
        take = self._local
        labels = np.concatenate([c.labels for c in chunks])[take]
        dense = np.concatenate([c.dense for c in chunks])[take]
        cats = np.concatenate([c.cats for c in chunks])[take]
        present = np.concatenate([c.present for c in chunks])[take]
        b = labels.size
        table = np.arange(NUM_CAT, dtype=np.uint64)[None, :]
        ids_one = hash_category(cats, table, self._rows[None, :], self.hash_seed)
        ids = np.zeros((b, self.features.total_slots), np.int32)
        ids[:, self._cols] = np.where(present, ids_one, 0)
        return Batch(dense=dense, ids=ids, lengths=present.astype(np.int32), labels=labels)


_POSITIONS_KEPT = 16  # recent steps whose data position `CriteoData.position_after` keeps
_POSITION_KEYS = ("step", "epoch", "line", "train_start", "skipped_lines")


class CriteoData:
    """A Criteo file as a trainer data source (`batch` / `eval_batch`), resumable.

    Split: the first `eval_batches * eval_batch_size` valid examples of the
    file are the held-out evaluation set (read once, kept in memory, eval
    batch `i` is its `i`-th run of `eval_batch_size` examples); training
    reads the lines after them, in order, in global batches of
    `global_batch`. At the end of the file training starts again at its
    first line: a new epoch (`epoch` counts from 0); each epoch drops its
    final partial batch.

    Training batches are made in order: `batch(step, ...)` must be called for
    steps 0, 1, 2, ... (after `resume`, from the step after the saved one),
    as the trainer's prefetch thread does. `position_after(step)` is the
    data position right after training batch `step` (kept for the last 16
    steps, so a trainer that prefetches a few steps ahead can still ask for
    the step it checkpoints; step -1, before any batch, until then): a
    small JSON-able dict

        {"step", "epoch", "line" (lines of the file consumed),
         "train_start" (first training line), "skipped_lines" (training's so far)}

    `resume(saved)` then makes the next batch exactly the one that followed
    `saved["step"]`, bit for bit, across epoch boundaries too. The next
    batch re-reads the file up to `line` (gzip cannot seek).

    Args:
      path: the file (plain or gzip).
      features: 26 sparse and 13 dense features (see `criteo_features`).
      global_batch: examples per training step over all processes.
      eval_batches, eval_batch_size: the held-out evaluation set's size.
      eval_path: a separate held-out file (e.g. day 23): the evaluation set
        is its first examples, and training reads all of `path` (from line
        0). None: the head of `path` is held out.
      strict: raise `CriteoFormatError` on the first malformed line instead
        of skipping it.
      hash_seed: seed of `hash_category`.

    Each process keeps rows `[p*b, (p+1)*b)`, b = batch / num_processes, of
    every global batch (training and evaluation), as `CriteoReader` does.

    Attributes:
      train_start: lines of the file the evaluation set spans (training
        starts after them).
      epoch: the epoch of the latest training batch.
      skipped_lines: malformed lines skipped so far (see the property).

    Raises (on construction): FileNotFoundError for a missing file;
    `CriteoFormatError` naming the file when it is empty, holds no valid
    example, or fewer valid examples than the evaluation set plus one
    training batch.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        features: FeatureSet,
        *,
        global_batch: int,
        eval_batches: int,
        eval_batch_size: int,
        eval_path: str | os.PathLike | None = None,
        strict: bool = False,
        hash_seed: int = 0,
    ):
        for name, v in (
            ("global_batch", global_batch),
            ("eval_batches", eval_batches),
            ("eval_batch_size", eval_batch_size),
        ):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.path = os.fspath(path)
        self.eval_path = None if eval_path is None else os.fspath(eval_path)
        if self.eval_path is not None and not os.path.isfile(self.eval_path):
            raise FileNotFoundError(f"Criteo evaluation file {self.eval_path} does not exist")
        self.features = features
        self.global_batch = global_batch
        self.eval_batches = eval_batches
        self.eval_batch_size = eval_batch_size
        self.strict = strict
        self.hash_seed = hash_seed
        self._read_eval_set()
        self._check_training_part()

        self._processes: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.resume(
            {"step": -1, "epoch": 0, "line": self.train_start, "train_start": self.train_start,
             "skipped_lines": 0}
        )  # fmt: skip

    def resume(self, position: dict[str, int]) -> None:
        """Continue after a `position_after(step)` saved earlier: the next
        training batch is `step + 1`, the one that followed it.

        Raises:
          ValueError: `position` is malformed or does not fit this file's split
            (another evaluation set size).
        """
        pos = self._checked_position(position)
        # Training stream state (advanced by `batch`, on the prefetch thread).
        self.epoch = pos["epoch"]
        self._next_step = pos["step"] + 1
        self._start_line, self._start_epoch = pos["line"], pos["epoch"]
        self._train_skipped = pos["skipped_lines"]
        self._stream: Iterator[tuple[Batch, dict[str, int]]] | None = None
        with self._lock:
            self._positions = {pos["step"]: pos}

    def _reader(self, batch_size: int, start: int = 0, *, path: str | None = None,
                **processes) -> CriteoReader:
        return CriteoReader(
            path or self.path, self.features, batch_size, strict=self.strict, start=start,
            hash_seed=self.hash_seed, **processes,
        )  # fmt: skip

    def _read_eval_set(self) -> None:
        """Read the evaluation set (global batches); set `train_start`."""
        reader = self._reader(self.eval_batch_size, path=self.eval_path)
        batches = iter(reader)
        try:
            self._eval = list(itertools.islice(batches, self.eval_batches))
        except CriteoFormatError as e:
            # Fewer valid examples than one eval batch: said below, with the split.
            if e.line is not None or reader.stats.dropped_examples == 0:
                raise
            self._eval = []
        finally:
            batches.close()
        if len(self._eval) < self.eval_batches:
            valid = len(self._eval) * self.eval_batch_size + reader.stats.dropped_examples
            need = "" if self.eval_path else f" plus one training batch of {self.global_batch}"
            raise CriteoFormatError(
                self.eval_path or self.path,
                None,
                f"only {valid} valid examples ({reader.stats.skipped_lines} malformed lines "
                f"skipped), fewer than the {self.eval_batches} x {self.eval_batch_size} held-out "
                f"evaluation examples{need}",
            )
        self.train_start = 0 if self.eval_path else reader.position
        self._eval_skipped = reader.stats.skipped_lines

    def _check_training_part(self) -> None:
        """Fail now, not in the first step, when no training batch follows the eval set."""
        reader = self._reader(self.global_batch, self.train_start)
        batches = iter(reader)
        try:
            first = next(batches, None)
        finally:
            batches.close()
        if first is None:
            where = (f" ({reader.stats.skipped_lines} malformed lines skipped)" if self.eval_path else
                     f" after the {self.eval_batches * self.eval_batch_size} held-out evaluation "
                     f"examples (lines 1-{self.train_start}; {reader.stats.skipped_lines} "
                     "malformed lines skipped after them)")
            raise CriteoFormatError(
                self.path,
                None,
                f"only {reader.stats.dropped_examples} valid examples{where}, fewer than one "
                f"training batch of {self.global_batch}",
            )

    def _checked_position(self, position: dict[str, int]) -> dict[str, int]:
        if set(position) != set(_POSITION_KEYS):
            raise ValueError(
                f"a CriteoData position has the keys {list(_POSITION_KEYS)}; got {sorted(position)}"
            )
        pos = {k: position[k] for k in _POSITION_KEYS}
        lowest = {"step": -1}  # -1: before the first batch
        if not all(isinstance(v, int) and v >= lowest.get(k, 0) for k, v in pos.items()):
            raise ValueError(
                f"a CriteoData position holds integers >= 0 (step >= -1); got {position}"
            )
        if pos["train_start"] != self.train_start:
            raise ValueError(
                f"the position was saved with training starting at line {pos['train_start']} of "
                f"{self.path!r}, but this evaluation set ({self.eval_batches} x "
                f"{self.eval_batch_size} examples) ends at line {self.train_start}"
            )
        if pos["line"] < self.train_start:
            raise ValueError(
                f"position line {pos['line']} lies in the evaluation set (lines "
                f"1-{self.train_start}) of {self.path!r}"
            )
        return pos

    @property
    def skipped_lines(self) -> int:
        """Malformed lines skipped so far: in the evaluation set (once) and by
        training (every time a pass reads them)."""
        return self._eval_skipped + self._train_skipped

    def _train_batches(
        self, process_index: int, num_processes: int
    ) -> Iterator[tuple[Batch, dict[str, int]]]:
        """(batch, position without the step) of every training batch, epoch after epoch."""
        start, epoch = self._start_line, self._start_epoch
        while True:
            reader = self._reader(
                self.global_batch, start, process_index=process_index, num_processes=num_processes
            )
            done = self._train_skipped
            made = 0
            for batch in reader:
                made += 1
                self._train_skipped = done + reader.stats.skipped_lines
                yield batch, {
                    "epoch": epoch,
                    "line": reader.position,
                    "train_start": self.train_start,
                    "skipped_lines": self._train_skipped,
                }
            self._train_skipped = done + reader.stats.skipped_lines
            if not made and start == self.train_start:
                raise CriteoFormatError(
                    self.path,
                    None,
                    "no training batch after the evaluation set (has the file changed?)",
                )
            epoch, start = epoch + 1, self.train_start

    def batch(
        self, step: int, global_batch: int, *, process_index: int = 0, num_processes: int = 1
    ) -> Batch:
        """This process's rows of training batch `step` (the next one in the file).

        Raises:
          ValueError: `step` is not the next step, or `global_batch` or the
            process split differs from earlier calls.
        """
        if global_batch != self.global_batch:
            raise ValueError(
                f"CriteoData of {self.path!r} makes global batches of {self.global_batch}, "
                f"not {global_batch}"
            )
        if step != self._next_step:
            raise ValueError(
                f"CriteoData reads {self.path!r} in order: the next training batch is step "
                f"{self._next_step}, not {step}"
            )
        if self._stream is None:
            self._stream = self._train_batches(process_index, num_processes)
            self._processes = (process_index, num_processes)
        elif self._processes != (process_index, num_processes):
            raise ValueError(
                f"process {process_index} of {num_processes} differs from the first call's "
                f"{self._processes[0]} of {self._processes[1]}"
            )
        batch, pos = next(self._stream)
        self._next_step = step + 1
        self.epoch = pos["epoch"]
        with self._lock:
            self._positions[step] = {"step": step, **pos}
            while len(self._positions) > _POSITIONS_KEPT:
                del self._positions[min(self._positions)]
        return batch

    def position_after(self, step: int) -> dict[str, int]:
        """The data position right after training batch `step` (see the class docstring).

        Raises:
          KeyError: batch `step` has not been made, or was made more than
            16 batches ago (-1, the start, is kept until then).
        """
        with self._lock:
            if step not in self._positions:
                lo, hi = min(self._positions), max(self._positions)
                kept = f"step {lo}" if lo == hi else f"steps {lo}..{hi}"
                raise KeyError(f"no data position for step {step}: kept only {kept}")
            return dict(self._positions[step])

    def eval_batch(
        self, index: int, batch_size: int, *, process_index: int = 0, num_processes: int = 1
    ) -> Batch:
        """This process's rows of evaluation batch `index` (of the held-out start of the file)."""
        if batch_size != self.eval_batch_size:
            raise ValueError(
                f"CriteoData of {self.path!r} has eval batches of {self.eval_batch_size}, "
                f"not {batch_size}"
            )
        if not 0 <= index < self.eval_batches:
            raise ValueError(f"eval batch {index} is outside [0, {self.eval_batches})")
        if num_processes < 1 or not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is outside [0, {num_processes})")
        if batch_size % num_processes:
            raise ValueError(
                f"eval batch size {batch_size} is not divisible by num_processes {num_processes}"
            )
        b = batch_size // num_processes
        rows = slice(process_index * b, (process_index + 1) * b)
        whole = self._eval[index]
        return Batch(
            dense=whole.dense[rows].copy(),
            ids=whole.ids[rows].copy(),
            lengths=whole.lengths[rows].copy(),
            labels=whole.labels[rows].copy(),
        )
