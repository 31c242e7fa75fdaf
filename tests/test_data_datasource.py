"""The manifest-planned Ray Data read (mdt_ray/data/datasource.py): how shards are packed into
read tasks, what a task carries, the per-epoch shard order, big shards read in pieces, and the
errors that name a shard. The read functions run here as Ray runs them in a worker (a ReadTask
is called); one test runs real Ray executions on the loopback S3 server."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from mdt_ray.data import datasource
from mdt_ray.data.corpus import build_synthetic
from mdt_ray.data.datasource import ManifestDatasource, pack, shuffle_seed
from mdt_ray.data.schema import CorpusError, ShardInfo, read_manifest
from mdt_ray.data.storage import StorageTarget

COLUMNS = ["asset_id", "ss_latent", "cond"]


def _shards(n: int, size: int = 20_000) -> list[ShardInfo]:
    # Statistics sums the size of a real manifest's (8 channels each, four lists).
    sums = [0.123456789] * 8
    return [ShardInfo(path=f"part-{i:05d}.parquet", num_rows=1, num_bytes=size, ss_sum=sums, ss_sumsq=sums,
                      slat_assets=1, slat_sum=sums, slat_sumsq=sums, num_voxels=100) for i in range(n)]


def test_pack_bounds_each_task_by_shard_count_and_bytes():
    assert pack([1] * 10, 3, 100) == [range(0, 4), range(4, 8), range(8, 10)]
    # bytes: a group closes before it would pass the budget; a shard bigger than it stays alone
    assert pack([50, 60, 10, 10, 200, 5], 1, 100) == [range(0, 1), range(1, 4), range(4, 5), range(5, 6)]
    assert pack([], 4, 10) == []
    groups = pack([7] * 6000, 200, 32 * 2**20)
    assert len(groups) == 200 and all(len(g) == 30 for g in groups)
    assert [i for g in groups for i in g] == list(range(6000))  # consecutive: the order survives


def test_read_tasks_carry_only_their_own_shards(tmp_path):
    sizes = {}
    for n in (600, 6000):
        src = ManifestDatasource(StorageTarget(str(tmp_path)), _shards(n), COLUMNS, seed=0)
        tasks = src.get_read_tasks(200)
        assert sum(t.metadata.num_rows for t in tasks) == n
        assert sum(t.metadata.size_bytes for t in tasks) == src.estimate_inmemory_data_size() == n * 20_000
        sizes[n] = max(len(pickle.dumps(t)) for t in tasks)
        shards = [name for t in tasks for name in t.read_fn.names]
        assert sorted(shards) == [f"part-{i:05d}.parquet" for i in range(n)]
    # 10x the shards, 10x the shards per task (200 tasks asked for), no statistics on board:
    # a task is a few KiB where the manifest is ~1.5 KiB a shard.
    assert sizes[6000] < 12 * 1024
    assert sizes[6000] < 12 * sizes[600]


def test_shard_order_is_reshuffled_each_execution_as_ray_does():
    import ray.data

    src = ManifestDatasource(StorageTarget("/tmp/x"), _shards(50), COLUMNS, seed=7)
    first, second = src.order(0), src.order(1)
    assert sorted(first) == sorted(second) == list(range(50)) and first != second
    assert src.order(0) == first  # the same orders in every run
    # the seed of each execution is the one Ray 2.60's FileShuffleConfig(seed) draws
    for idx in range(3):
        assert shuffle_seed(7, idx) == ray.data.FileShuffleConfig(seed=7).get_seed(idx)
    assert ManifestDatasource(StorageTarget("/tmp/x"), _shards(50), COLUMNS).order(3) == list(range(50))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("ds") / "c")
    build_synthetic(uri, 12, seed=4, num_shards=3, use_ray=False, workers=1, progress=False)
    return uri


def _rows(tasks) -> list[str]:
    return [a for t in tasks for table in t() for a in table.column("asset_id").to_pylist()]


def test_a_big_shard_is_read_in_blocks_near_the_budget(corpus, monkeypatch):
    m = read_manifest(corpus)
    src = ManifestDatasource(StorageTarget(m.uri), m.shards, COLUMNS)
    whole = _rows(src.get_read_tasks(1))
    monkeypatch.setattr(datasource, "WHOLE_FILE_BYTES", 0)  # every shard counts as big
    per_row = m.shards[0].num_bytes // m.shards[0].num_rows
    (task,) = ManifestDatasource(StorageTarget(m.uri), m.shards[:1], COLUMNS).get_read_tasks(1)
    task.read_fn.block_bytes = 2 * per_row
    tables = list(task())
    assert [t.num_rows for t in tables] == [2, 2]
    assert tables[0].column_names == [*COLUMNS, "path"]
    assert tables[0].column("path")[0].as_py() == f"{m.uri}/part-00000.parquet"
    assert _rows(src.get_read_tasks(1)) == whole  # the same rows, in the same order


def test_a_missing_or_damaged_shard_is_named(corpus, tmp_path):
    import shutil

    from tests.test_data_corpus import truncate

    copy = tmp_path / "c"
    shutil.copytree(corpus, copy)
    m = read_manifest(str(copy))
    (copy / "part-00001.parquet").unlink()
    truncate(str(copy / "part-00002.parquet"))
    src = ManifestDatasource(StorageTarget(m.uri), m.shards, COLUMNS)
    tasks = src.get_read_tasks(3)
    assert len(tasks) == 3
    assert len(list(tasks[0]())) == 1
    with pytest.raises(CorpusError, match=rf"^shard {copy}/part-00001.parquet is listed in the manifest but missing$"):
        list(tasks[1]())
    with pytest.raises(CorpusError, match=rf"^shard {copy}/part-00002.parquet could not be read \(Arrow"):
        list(tasks[2]())


@pytest.mark.ray
def test_epochs_through_ray_data_reshuffle_and_keep_every_row(ray_local, s3_bucket):
    from mdt_ray.data.pipeline import make_dataset

    uri = f"s3://{s3_bucket}/c"
    build_synthetic(uri, 16, seed=2, num_shards=8, use_ray=False, workers=1, progress=False)
    ds = make_dataset(uri, keep_asset_id=True, decode="collate", seed=3, shuffle=True)
    ds.context.execution_options.preserve_order = True

    def epoch(d) -> list[str]:
        return [r["asset_id"] for r in d.iter_rows()]

    a, b = epoch(ds), epoch(ds)
    assert sorted(a) == sorted(b) and len(set(a)) == 16 and a != b
    again = make_dataset(uri, keep_asset_id=True, decode="collate", seed=3, shuffle=True)
    again.context.execution_options.preserve_order = True
    assert epoch(again) == a  # a new run replays the first epoch's order
    fixed = make_dataset(uri, keep_asset_id=True, decode="collate", shuffle=False)
    fixed.context.execution_options.preserve_order = True
    m = read_manifest(uri)
    want = [p for s in m.shards for p in [s.path] * s.num_rows]
    assert [r["path"].rsplit("/", 1)[1] for r in fixed.iter_rows()] == want
    assert np.all([r["path"].startswith(f"{s3_bucket}/c/") for r in fixed.take(2)])
