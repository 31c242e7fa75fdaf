"""The corpus through Ray Data from a real S3-protocol server on loopback: identical values,
torch batches on per-worker split iterators, the stage-2 reader, and named errors for corrupt
shards and wrong-shape rows."""

import threading
import time
import uuid

import numpy as np
import pytest
import torch

from mdt_ray.data import synthetic
from mdt_ray.data.corpus import build_synthetic
from mdt_ray.data.pipeline import load_local, make_dataset, slat_batches, torch_batches
from mdt_ray.data.schema import CorpusError, read_manifest
from mdt_ray.data.storage import StorageError, StorageTarget
from tests.test_data_corpus import damage_column_pages, replace_with_wrong_shape_row, truncate

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def bucket(s3_server):
    # A module-wide bucket (s3_bucket is per test): the corpora below are shared by several tests.
    from tests.s3_server import create_bucket, delete_bucket

    name = create_bucket(s3_server, f"pipe-{uuid.uuid4().hex[:12]}")
    yield name
    delete_bucket(s3_server, name)


@pytest.fixture(scope="module")
def s3_corpus(ray_local, bucket):
    uri = f"s3://{bucket}/corpus"
    # Ray is up, so the four shards are written by four Ray tasks.
    build_synthetic(uri, 40, seed=3, num_shards=4, progress=False)
    return uri


def _key(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype=np.float32).tobytes()


def test_s3_corpus_reads_back_identical_through_ray_data(s3_corpus):
    m = read_manifest(s3_corpus)
    assert m.num_rows == 40 and len(m.shards) == 4 and m.source["seed"] == 3
    ref = load_local(s3_corpus)
    assert ref["asset_id"] == [synthetic.asset_id(3, i) for i in range(40)]
    rows = make_dataset(s3_corpus, keep_asset_id=True, shuffle=False).take_all()
    assert sorted(r["asset_id"] for r in rows) == ref["asset_id"]
    index = {a: i for i, a in enumerate(ref["asset_id"])}
    for r in rows:
        i = index[r["asset_id"]]
        assert r["x0"].shape == (8, 16, 16, 16) and r["x0"].dtype == np.float32
        assert r["cond"].shape == (64, 64) and r["cond"].dtype == np.float32
        assert np.array_equal(r["x0"], ref["x0"][i]) and np.array_equal(r["cond"], ref["cond"][i])
    asset = synthetic.make_asset(3, 21)
    r = next(r for r in rows if r["asset_id"] == asset.asset_id)
    assert np.array_equal(synthetic.decode_ss(r["x0"]), asset.occupancy)
    np.testing.assert_array_equal(r["cond"], asset.cond.astype(np.float16).astype(np.float32))


def test_torch_batches_on_per_worker_split_iterators(s3_corpus):
    # streaming_split gives the same DataIterator objects that ray.train.get_dataset_shard hands
    # each training worker; both must be consumed at once, as workers do.
    ds = make_dataset(s3_corpus, shuffle=True, seed=1)
    iterators = ds.streaming_split(2, equal=True)
    got: dict[int, list] = {0: [], 1: []}
    errors = []

    def consume(rank: int) -> None:
        try:
            for batch in torch_batches(iterators[rank], 4, local_shuffle_buffer=8, seed=rank):
                got[rank].append(batch)
        except Exception as e:  # surfaced below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=consume, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert all(len(got[r]) == 5 for r in (0, 1))  # 20 rows each, batches of 4
    for batch in got[0] + got[1]:
        assert set(batch) == {"x0", "cond"}
        assert batch["x0"].shape == (4, 8, 16, 16, 16) and batch["x0"].dtype == torch.float32
        assert batch["cond"].shape == (4, 64, 64) and batch["cond"].dtype == torch.float32
    seen = sorted(_key(x.numpy()) for b in got[0] + got[1] for x in b["x0"])
    ref = load_local(s3_corpus)
    assert seen == sorted(_key(x) for x in ref["x0"])  # every asset exactly once
    with pytest.raises(ValueError, match=r"local_shuffle_buffer \(2\) must be 0 or at least batch_size \(4\)"):
        torch_batches(ds, 4, local_shuffle_buffer=2)
    # decode="collate": the same tensors, decoded in the consumer from the stored rows
    raw = make_dataset(s3_corpus, decode="collate", shuffle=False)
    batches = list(torch_batches(raw, 8, manifest=read_manifest(s3_corpus)))
    assert len(batches) == 5 and all(b["x0"].dtype == torch.float32 and b["cond"].shape == (8, 64, 64) for b in batches)
    assert sorted(_key(x.numpy()) for b in batches for x in b["x0"]) == sorted(_key(x) for x in ref["x0"])


def test_stage2_rows_and_sparse_batches(s3_corpus):
    m = read_manifest(s3_corpus)
    ref = load_local(s3_corpus, stage="slat")
    ds = make_dataset(s3_corpus, stage="slat", keep_asset_id=True, shuffle=False)
    rows = ds.take_all()
    index = {a: i for i, a in enumerate(ref["asset_id"])}
    for r in rows:
        i = index[r["asset_id"]]
        assert r["slat_coords"].shape == ref["slat_coords"][i].shape and r["slat_coords"].shape[1] == 3
        assert np.array_equal(r["slat_coords"], ref["slat_coords"][i])
        assert r["slat_feats"].dtype == np.float32 and r["slat_feats"].shape[1] == m.slat_channels
        np.testing.assert_allclose(r["slat_feats"], ref["slat_feats"][i], rtol=0, atol=1e-6)
    total = 0
    # the stored rows, decoded batch by batch in the consumer
    for batch in slat_batches(make_dataset(s3_corpus, stage="slat", decode="collate"), 8, manifest=m):
        coords, feats, counts = batch["coords"], batch["feats"], batch["counts"]
        assert coords.shape[1] == 4 and coords.dtype == torch.int32 and feats.shape == (len(coords), 8)
        assert batch["cond"].shape == (8, 64, 64) and int(counts.sum()) == len(coords)
        assert torch.equal(coords[:, 0], torch.repeat_interleave(torch.arange(8, dtype=torch.int32), counts))
        total += 8
    assert total == 40
    # torch_batches' collate step refuses stage-2 rows by name (checked on a batch, no extra run)
    from mdt_ray.data.pipeline import _collate

    with pytest.raises(CorpusError, match="torch_batches needs stage-'ss' rows"):
        _collate(None)({"slat_coords": np.empty(2, object), "cond": np.zeros((2, 64, 64), np.float32)})
    with pytest.raises(CorpusError, match=r"rows hold the stored columns .*manifest="):
        _collate(None)({"ss_latent": np.empty(2, object), "cond": np.empty(2, object)})


def _small_corpus(bucket: str, name: str, shards: int) -> str:
    uri = f"s3://{bucket}/{name}"
    build_synthetic(uri, 12, seed=9, num_shards=shards, use_ray=False, workers=1, progress=False)
    return uri


def test_corrupt_shards_are_named(ray_local, bucket):
    uri = _small_corpus(bucket, "truncated", 3)
    truncate(f"{uri}/part-00001.parquet")
    with pytest.raises(CorpusError, match=rf"shard {uri}/part-00001.parquet \(at http://127\.0\.0\.1:\d+\) is corrupt"):
        make_dataset(uri)
    # damaged pages behind an intact footer pass the footer check and fail in the read task
    uri = _small_corpus(bucket, "damaged", 3)
    damage_column_pages(f"{uri}/part-00002.parquet", "ss_latent")
    ds = make_dataset(uri)
    with pytest.raises(CorpusError, match=rf"shard {uri}/part-00002.parquet could not be read"):
        for _ in torch_batches(ds, 4):
            pass


def test_wrong_shape_row_is_named_before_and_during_the_read(ray_local, bucket):
    uri = _small_corpus(bucket, "wrongshape", 1)
    m = read_manifest(uri)
    bad_id = replace_with_wrong_shape_row(m, f"{uri}/part-00000.parquet", row=5)
    expected = (rf"shard {uri}/part-00000.parquet.*asset '{bad_id}': column 'ss_latent' holds 32256 values, "
                r"the manifest says 8×16×16×16 = 32768")
    with pytest.raises(CorpusError, match=expected):
        make_dataset(uri)
    # without the footer check, the decode step inside Ray Data finds the same row ...
    ds = make_dataset(uri, verify=False, shuffle=False)
    with pytest.raises(CorpusError, match=rf"shard {uri}/part-00000.parquet, asset '{bad_id}': column 'ss_latent' holds 32256"):
        for _ in torch_batches(ds, 4):
            pass
    # ... and so does the consumer's collate when it decodes
    raw = make_dataset(uri, verify=False, shuffle=False, decode="collate")
    with pytest.raises(CorpusError, match=rf"shard {uri}/part-00000.parquet, asset '{bad_id}': column 'ss_latent' holds 32256"):
        for _ in torch_batches(raw, 8, manifest=m):
            pass


def test_dataset_errors_are_quick_and_clear(ray_local, s3_server, s3_corpus):
    start = time.monotonic()
    with pytest.raises(StorageError, match="bucket 'missing-bucket-abc' does not exist"):
        make_dataset("s3://missing-bucket-abc/corpus")
    with pytest.raises(StorageError, match=r"http://127\.0\.0\.1:1 \(bucket 'x-bucket'\) is unreachable"):
        make_dataset(StorageTarget("s3://x-bucket/corpus", endpoint_url="http://127.0.0.1:1"))
    assert time.monotonic() - start < 15
    with pytest.raises(ValueError, match="stage must be one of"):
        make_dataset(s3_corpus, stage="mesh")


def test_build_job_script_under_ray(ray_local, bucket):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "build_corpus_job", Path(__file__).resolve().parents[1] / "jobs" / "build_corpus.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    uri = f"s3://{bucket}/job"
    assert job.main(["--kind", "synthetic", "--num-assets", "10", "--seed", "3", "--out", uri,
                     "--shards", "2", "--ray", "--quiet"]) == 0
    got = load_local(uri)
    assert got["asset_id"] == [synthetic.asset_id(3, i) for i in range(10)]
    assert np.array_equal(got["x0"], load_local(f"s3://{bucket}/corpus", limit=10)["x0"])
    # a bad option value is one line and exit status 2
    assert job.main(["--kind", "synthetic", "--num-assets", "0", "--out", f"s3://{bucket}/job0", "--quiet"]) == 2
