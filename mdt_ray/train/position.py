"""Where a worker is in its data: epoch after epoch of full batches, resumable mid-epoch.

Every rank must take the same number of steps (Ray's report barrier and DDP's all-reduce wait
for all of them), so only full batches count (drop_last) and an epoch's shuffle depends on the
epoch alone. A checkpoint stores the epoch and the batches consumed in it; a resumed worker reads
and drops those batches again, which puts it exactly where the original run was.

A stalled input pipeline would otherwise wait forever inside `next()` (Ray Data waiting for CPUs
that never free up, a store that stopped answering), so with a timeout the batches are fetched
on a helper thread and a batch that does not arrive in time is an error saying where it waited.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional


class ShardTooSmallError(RuntimeError):
    """A worker's shard holds no full batch: the same on every try, so not worth a restart."""


class BatchTimeoutError(TimeoutError):
    """No batch arrived within train.batch_timeout_s."""


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    index: int = -1  # index in the epoch of the last batch taken; -1: none yet

    def meta(self, world: int) -> dict[str, Any]:
        """Checkpoint fields. The count is replicated per rank (equal on all: drop_last and equal
        shards) so that a resume with more workers still finds one."""
        return {"epoch": self.epoch, "batches_in_epoch": [self.index + 1] * world}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], rank: int) -> "Position":
        taken = meta["batches_in_epoch"]
        return cls(meta["epoch"], (taken[rank] if rank < len(taken) else taken[0]) - 1)


class Batches:
    """Batches forever from `batches_of(epoch)` (one epoch's full batches), starting after
    `start`; `position` is where the last batch handed out came from. With `timeout_s` > 0 a
    batch that takes longer raises BatchTimeoutError, whose message ends with `describe()`
    (what the caller can tell about the wait, e.g. the cluster's free resources)."""

    def __init__(self, batches_of: Callable[[int], Iterable[Any]], *, batch_size: int, start: Position = Position(),
                 timeout_s: float = 0, describe: Optional[Callable[[], str]] = None):
        self.position = start
        self._batch_size = batch_size
        self._batches = self._epochs(batches_of, start)
        self._timeout_s = timeout_s
        self._describe = describe
        self._fetcher: Optional[_Fetcher] = None

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> Any:
        if self._timeout_s and self._timeout_s > 0:
            if self._fetcher is None:
                self._fetcher = _Fetcher(self._batches)
            item = self._fetcher.next(self._timeout_s)
            if item is _Fetcher.LATE:
                raise BatchTimeoutError(self._stall_message())
            epoch, index, batch = item
        else:
            epoch, index, batch = next(self._batches)
        self.position = Position(epoch, index)
        return batch

    def close(self) -> None:
        """Let the helper thread end (it is a daemon, so this only tidies up)."""
        if self._fetcher is not None:
            self._fetcher.close()

    def _stall_message(self) -> str:
        p = self.position
        where = (f"the first batch after epoch {p.epoch} batch {p.index}" if p.index >= 0
                 else f"the first batch of epoch {p.epoch}")
        msg = (f"no batch of {self._batch_size} arrived for {self._timeout_s:g} s (train.batch_timeout_s) while "
               f"waiting for {where}: the input pipeline is stalled")
        if self._describe is not None:
            try:
                extra = self._describe()
            except Exception as e:  # a diagnostic must not hide the stall it reports
                extra = f"(no more detail: {type(e).__name__}: {e})"
            if extra:
                msg += f"; {extra}"
        return msg

    def _epochs(self, batches_of, start: Position) -> Iterator[tuple[int, int, Any]]:
        epoch, skip = start.epoch, start.index + 1
        while True:
            n = 0
            for i, batch in enumerate(batches_of(epoch)):
                if epoch == start.epoch and i < skip:
                    continue
                n += 1
                yield epoch, i, batch
            # A resumed epoch may have nothing left; a fresh one must yield something.
            if n == 0 and not (epoch == start.epoch and skip):
                raise ShardTooSmallError(
                    f"this worker's shard yields no full batch of {self._batch_size}: the corpus is smaller "
                    "than train.batch_size × scale.num_workers")
            epoch += 1


class _Fetcher:
    """`next(iterator)` on a helper thread, one item per request, waited for with a timeout.
    Items are fetched only when asked for, so the data order and memory use are those of a
    plain `next()`. After a timeout the thread is left blocked where it was, and the fetcher
    answers LATE from then on: a late item must not be mistaken for the next one."""

    LATE = object()

    def __init__(self, iterator: Iterator[Any]):
        self._iterator = iterator
        self._asks: queue.SimpleQueue = queue.SimpleQueue()
        self._answers: queue.SimpleQueue = queue.SimpleQueue()
        self._broken = False
        self._thread = threading.Thread(target=self._serve, name="mdt-batches", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._asks.get():
            try:
                self._answers.put((True, next(self._iterator)))
            except BaseException as e:  # re-raised in the consumer's thread
                self._answers.put((False, e))

    def next(self, timeout_s: float) -> Any:
        if self._broken:
            return self.LATE
        self._asks.put(True)
        try:
            ok, value = self._answers.get(timeout=timeout_s)
        except queue.Empty:
            self._broken = True
            return self.LATE
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._asks.put(False)
