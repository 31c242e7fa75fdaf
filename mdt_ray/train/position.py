"""Where a worker is in its data: epoch after epoch of full batches, resumable mid-epoch.

Every rank must take the same number of steps (Ray's report barrier and DDP's all-reduce wait
for all of them), so only full batches count (drop_last) and an epoch's shuffle depends on the
epoch alone. A checkpoint stores the epoch and the batches consumed in it; a resumed worker reads
and drops those batches again, which puts it exactly where the original run was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator


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
    `start`; `position` is where the last batch handed out came from."""

    def __init__(self, batches_of: Callable[[int], Iterable[Any]], *, batch_size: int, start: Position = Position()):
        self.position = start
        self._batch_size = batch_size
        self._batches = self._epochs(batches_of, start)

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> Any:
        epoch, index, batch = next(self._batches)
        self.position = Position(epoch, index)
        return batch

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
                raise RuntimeError(
                    f"this worker's shard yields no full batch of {self._batch_size}: the corpus is smaller "
                    "than train.batch_size × scale.num_workers")
            epoch += 1
