"""A Ray Data read planned from the corpus manifest: no listing, no footer indexing, and many
small shards per read task.

`ray.data.read_parquet` (Ray 2.60) learns about its files at execution start: it lists them and
reads every footer again with footer-reading actors to plan its tasks, then runs one read task
per file. The manifest already names every shard with its row count and byte size, and
`verify_shards` has already read the footers, so that work grew with the shard count for nothing
(docs/performance.md, section 4). Here the read tasks come straight from the manifest's shard
list: consecutive shards of the (shuffled) order are packed into one task up to a byte budget,
and each task carries only its own shards' names and sizes.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from mdt_ray.data import storage
from mdt_ray.data.schema import CorpusError, ShardInfo
from mdt_ray.data.storage import StorageTarget

PATH_COLUMN = "path"  # the shard a row came from, as the filesystem names it (bucket/key)
# A shard up to this size is fetched whole in one request and parsed from memory; a larger one
# is read row group by row group, only the wanted columns, so memory stays near the block size.
WHOLE_FILE_BYTES = 8 * 2**20
PREFETCH = 4  # small shards fetched ahead, in order, by threads of the read task
DEFAULT_BLOCK_BYTES = 128 * 2**20  # Ray Data 2.60's target_max_block_size default


def shuffle_seed(seed: int, execution_idx: int) -> int:
    """The seed of one execution's shard order, as Ray 2.60's FileShuffleConfig(seed) draws it
    (reseed_after_execution=True): a new order every epoch, the same orders in every run."""
    return hash((seed, execution_idx)) % (2**32)


def pack(sizes: Sequence[int], parallelism: int, budget: int) -> list[range]:
    """Split positions 0..n-1 into consecutive groups: at most ceil(n / parallelism) shards and
    (unless one shard alone is bigger) at most `budget` bytes each."""
    n = len(sizes)
    per_task = max(1, -(-n // max(1, parallelism)))
    groups, start, held = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= per_task or held + size > budget):
            groups.append(range(start, i))
            start, held = i, 0
        held += size
    if n:
        groups.append(range(start, n))
    return groups


class _ReadShards:
    """One read task: the shards it reads (names, row counts, sizes) and how to reach them.

    A plain object rather than a closure over the datasource, so that the task pickles with its
    own few shards, never the whole list."""

    def __init__(self, corpus: StorageTarget, fs, names: list[str], rows: list[int], sizes: list[int],
                 columns: Sequence[str], block_bytes: int):
        self.corpus = corpus
        self.fs = fs
        self.names = names
        self.rows = rows
        self.sizes = sizes
        self.columns = list(columns)
        self.block_bytes = block_bytes

    def __call__(self) -> Iterator[pa.Table]:
        with cf.ThreadPoolExecutor(max_workers=min(PREFETCH, len(self.names))) as pool:
            pending: collections.deque = collections.deque()
            todo = iter(range(len(self.names)))

            def fill() -> None:
                while len(pending) < PREFETCH:
                    i = next(todo, None)
                    if i is None:
                        return
                    small = self.sizes[i] <= WHOLE_FILE_BYTES
                    pending.append((i, pool.submit(self._read_whole, i) if small else None))
                    if not small:  # read in place when its turn comes, not ahead
                        return

            fill()
            while pending:
                i, future = pending.popleft()
                if future is None:
                    yield from self._read_streamed(i)
                else:
                    yield future.result()
                fill()

    # -- one shard -------------------------------------------------------------------------------
    def _uri(self, i: int) -> str:
        return storage.join(self.corpus.uri, self.names[i])

    def _read_whole(self, i: int) -> pa.Table:
        import pyarrow.parquet as pq

        path = storage.bare_path(self._uri(i))

        def fetch() -> pa.Buffer:
            with self.fs.open_input_stream(path) as f:
                return f.read_buffer()

        data = self._guard(i, lambda: storage.retry(fetch, what=f"reading shard {self._where(i)}"))

        def parse() -> pa.Table:
            pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
            return pf.read(columns=self._present(pf))

        return self._path_column(self._guard(i, parse), i)

    def _read_streamed(self, i: int) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        path = storage.bare_path(self._uri(i))
        f = self._guard(i, lambda: storage.retry(lambda: self.fs.open_input_file(path),
                                                 what=f"opening shard {self._where(i)}"))
        with f:
            pf = self._guard(i, lambda: pq.ParquetFile(f, page_checksum_verification=True))
            per_row = max(1, self.sizes[i] // max(1, self.rows[i]))
            batch_rows = max(1, self.block_bytes // per_row)
            batches = self._guard(i, lambda: pf.iter_batches(batch_size=batch_rows, columns=self._present(pf)))
            while True:
                batch = self._guard(i, lambda: next(batches, None))
                if batch is None:
                    return
                yield self._path_column(pa.Table.from_batches([batch]), i)

    def _present(self, pf) -> list[str]:
        # A column the shard lacks is left out here, so that the decode step names it and the
        # shard ("column 'x' is missing") rather than the read failing on an unknown field.
        names = set(pf.schema_arrow.names)
        return [c for c in self.columns if c in names]

    def _path_column(self, table: pa.Table, i: int) -> pa.Table:
        path = storage.bare_path(self._uri(i))
        return table.append_column(PATH_COLUMN, pa.array([path] * table.num_rows, pa.string()))

    def _where(self, i: int) -> str:
        return self.corpus.with_uri(self._uri(i)).describe()

    def _guard(self, i: int, fn):
        """`fn()`, its errors as one line naming the shard (and the store, for storage errors)."""
        try:
            return fn()
        except (CorpusError, storage.StorageError):
            raise
        except FileNotFoundError:
            raise CorpusError(f"shard {self._where(i)} is listed in the manifest but missing") from None
        except (pa.ArrowException, OSError) as e:
            if storage.is_transient(e):  # the store, not the shard: a restart may get through
                raise storage.StorageError(f"reading shard {self._where(i)}: {e}") from None
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CorpusError(f"shard {self._uri(i)} could not be read ({type(e).__name__}: {detail}); it is "
                              "damaged or was rewritten during the run: rebuild or re-import it") from None


class ManifestDatasource(Datasource):
    """The corpus's shards as a Ray Data source: read tasks from the manifest's shard list.

    `columns`: the stored columns to read (a `path` column naming the shard is added).
    `seed`: shuffle the shard order, anew for each execution (epoch) as Ray 2.60's
    FileShuffleConfig(seed) does; None keeps the manifest's order.
    """

    def __init__(self, corpus: StorageTarget, shards: Sequence[ShardInfo], columns: Sequence[str], *,
                 seed: Optional[int] = None):
        super().__init__()
        self._corpus = corpus
        self._fs, _ = corpus.pyarrow_fs()  # one client, pickled into every task
        # Three flat lists, not the ShardInfo objects: those carry per-shard statistics sums
        # (~1.5 KiB each), which no read needs.
        self._names = [s.path for s in shards]
        self._rows = [int(s.num_rows) for s in shards]
        self._sizes = [int(s.num_bytes) for s in shards]
        self._columns = list(columns)
        self._seed = seed

    def get_name(self) -> str:
        return "ReadCorpusShards"

    def estimate_inmemory_data_size(self) -> Optional[int]:
        # Bytes on storage, every column: an upper bound for the columns one stage reads (the
        # float16 lists are stored uncompressed-sized, and decode happens after the read).
        return sum(self._sizes)

    def order(self, execution_idx: int) -> list[int]:
        """Positions of the shards in the order this execution reads them."""
        order = list(range(len(self._names)))
        if self._seed is not None:
            np.random.default_rng(shuffle_seed(self._seed, execution_idx)).shuffle(order)
        return order

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context: Optional["ray.data.DataContext"] = None) -> list[ReadTask]:
        # Ray 2.60 calls this while planning (no data_context: execution 0) and again at each
        # execution's start with the dataset's context, whose private _execution_idx counts the
        # executions done; its own Parquet reader reseeds its file shuffle from the same counter.
        ctx = data_context or ray.data.DataContext.get_current()
        execution_idx = getattr(data_context, "_execution_idx", 0) if data_context is not None else 0
        budget = ctx.target_max_block_size or DEFAULT_BLOCK_BYTES
        order = self.order(execution_idx)
        tasks = []
        for group in pack([self._sizes[k] for k in order], parallelism, budget):
            picked = [order[j] for j in group]
            names = [self._names[k] for k in picked]
            rows = [self._rows[k] for k in picked]
            sizes = [self._sizes[k] for k in picked]
            meta = BlockMetadata(num_rows=sum(rows), size_bytes=sum(sizes), input_files=None, exec_stats=None)
            read = _ReadShards(self._corpus, self._fs, names, rows, sizes, self._columns, budget)
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks
