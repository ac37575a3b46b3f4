"""Host batches: what a data source provides, the checks, and the prefetch thread."""


import queue
import threading
from typing import Callable, Iterator, Protocol

import numpy as np

from jdmt.data import (
    Batch,
    FeatureSet,
    check_batch,
)

__all__ = ["DataSource", "checked_batch"]


class DataSource(Protocol):
    """What the trainer needs from a data set (SyntheticData provides it)."""

    features: FeatureSet

    def batch(self, step: int, global_batch: int, *, process_index: int, num_processes: int) -> Batch: ...

    def eval_batch(self, index: int, batch_size: int, *, process_index: int, num_processes: int) -> Batch: ...


def checked_batch(features: FeatureSet, batch: Batch, where: str) -> Batch:
    """`batch` as float32/int32 numpy arrays after `check_batch`; errors say `where`.

    Raises:
      BadBatchError: the batch violates the feature specs (NaN dense values,
        ids out of range, bad lengths or shapes), prefixed with `where`.
    """
    from jdmt.data import BadBatchError

    try:
        check_batch(features, batch)
    except BadBatchError as e:
        raise BadBatchError(f"{where}: {e}") from None
    return Batch(
        dense=np.asarray(batch.dense, np.float32),
        ids=np.asarray(batch.ids, np.int32),
        lengths=np.asarray(batch.lengths, np.int32),
        labels=np.asarray(batch.labels, np.float32),
        weights=None if batch.weights is None else np.asarray(batch.weights, np.float32),
    )


class _Prefetch:
    """Makes (and checks) host batches on a background thread, `depth` ahead."""

    def __init__(self, make: Callable[[int], Batch], steps: range, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def put(item) -> bool:
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            for s in steps:
                try:
                    item = (s, make(s), None)
                except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                    item = (s, None, e)
                if not put(item) or item[2] is not None:
                    return
            put(None)  # end of the steps

        self._thread = threading.Thread(target=work, daemon=True, name="jdmt-prefetch")
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        return self

    def __next__(self) -> tuple[int, Batch]:
        item = self._q.get()
        if item is None:
            raise StopIteration
        s, batch, err = item
        if err is not None:
            raise err
        return s, batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
