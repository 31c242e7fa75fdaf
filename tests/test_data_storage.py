"""Storage access against a real S3-protocol server on loopback: round trips, retries, and clear,
bounded-time errors for a missing bucket, a closed port and an endpoint that never answers."""

import dataclasses
import pickle
import socket
import time

import pyarrow.fs as pafs
import pytest

from mdt_ray.config import DataConfig
from mdt_ray.data import storage
from mdt_ray.data.schema import CorpusError, read_manifest
from mdt_ray.data.storage import S3Settings, StorageTarget


def test_uri_helpers():
    assert StorageTarget("s3://b/k").is_s3 and not StorageTarget("/tmp/x").is_s3 and not StorageTarget("data/x").is_s3
    assert storage.split_s3("s3://bucket/a/b/") == ("bucket", "a/b")
    assert storage.join("s3://b/c/", "part-0.parquet") == "s3://b/c/part-0.parquet"
    with pytest.raises(ValueError, match="without a bucket"):
        storage.split_s3("s3:///key")
    with pytest.raises(ValueError, match="unsupported storage URI"):
        StorageTarget("gs://bucket/x").pyarrow_fs()


def test_target_keeps_its_store_on_every_derived_uri():
    target = StorageTarget("s3://b/corpus/", "http://store:9000", "eu-west-1")
    assert target.uri == "s3://b/corpus"
    shard = target.join("part-00000.parquet")
    assert shard == StorageTarget("s3://b/corpus/part-00000.parquet", "http://store:9000", "eu-west-1")
    assert target.with_uri("s3://b/eval") == StorageTarget("s3://b/eval", "http://store:9000", "eu-west-1")
    assert shard.describe() == "s3://b/corpus/part-00000.parquet (at http://store:9000)"
    assert StorageTarget("data/x", "http://store:9000").describe() == "data/x"
    assert storage.as_target(target) is target and storage.as_target("data/x") == StorageTarget("data/x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.uri = "s3://b/other"

    data = DataConfig(uri="s3://b/train", eval_uri="s3://b/held", storage_endpoint="http://store:9000",
                      storage_region="eu-west-1")
    assert StorageTarget.from_data_config(data) == StorageTarget("s3://b/train", "http://store:9000", "eu-west-1")
    held = StorageTarget.from_data_config(data, data.eval_uri)
    assert (held.uri, held.endpoint_url, held.region) == ("s3://b/held", "http://store:9000", "eu-west-1")
    # Ray tasks and spawned build processes receive the target by pickling.
    assert pickle.loads(pickle.dumps(held)) == held


def test_settings_come_from_the_target_then_environment(monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    bare = StorageTarget("s3://bkt/x")
    assert bare.settings() == S3Settings(None, None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert bare.settings() == S3Settings("http://generic:1", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2/")
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    assert bare.settings() == S3Settings("http://s3-specific:2", "eu-north-1")
    assert StorageTarget("s3://bkt/x", "https://arg:3", "ap-south-1").settings() == S3Settings("https://arg:3", "ap-south-1")
    with pytest.raises(ValueError, match="not a URL"):
        StorageTarget("s3://bkt/x", "localhost:9000").settings()
    fs, path = StorageTarget("s3://bkt/some/prefix/", "http://127.0.0.1:9").pyarrow_fs()
    assert isinstance(fs, pafs.S3FileSystem) and path == "bkt/some/prefix"


def test_retry_backs_off_on_transient_errors_only():
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate")
        return "ok"

    assert storage.retry(flaky, what="reading x", base_delay=0.05) == "ok"
    assert len(calls) == 3
    # exponential backoff with jitter in [0.5, 1]: the waits are >= 0.025 s, then >= 0.05 s
    assert calls[1] - calls[0] >= 0.025 and calls[2] - calls[1] >= 0.05

    def missing():
        calls.append(0)
        raise FileNotFoundError("no such key")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retry(missing, what="reading y", base_delay=0.01)
    assert len(calls) == 1  # a missing key is not retried

    def always_down():
        raise ConnectionResetError("Connection reset by peer")

    with pytest.raises(storage.StorageError, match=r"reading z: still failing after 3 attempts"):
        storage.retry(always_down, what="reading z", attempts=3, base_delay=0.01)


def test_pyarrow_and_s3fs_round_trip(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/dir/blob.bin"
    target = StorageTarget(uri)
    fs, path = target.pyarrow_fs()
    with fs.open_output_stream(path) as f:
        f.write(b"written by pyarrow")
    s3, key = target.s3fs()
    assert key == path
    assert s3.cat_file(key) == b"written by pyarrow"
    with s3.open(f"{s3_bucket}/dir/other.bin", "wb") as f:
        f.write(b"written by s3fs")
    with fs.open_input_stream(f"{s3_bucket}/dir/other.bin") as f:
        assert f.read() == b"written by s3fs"
    target.check_bucket()  # exists: no error


def test_missing_bucket_is_named(s3_server):
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"bucket 'no-such-bucket-here' does not exist at http://127\.0\.0\.1"):
        read_manifest("s3://no-such-bucket-here/corpus")
    assert time.monotonic() - start < 10


def test_closed_port_fails_fast_naming_endpoint_and_bucket(s3_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    endpoint = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match=rf"{endpoint} \(bucket 'somebucket'\) is unreachable"):
        read_manifest(StorageTarget("s3://somebucket/corpus", endpoint))
    assert time.monotonic() - start < 10


def test_silent_endpoint_times_out_instead_of_hanging(s3_server):
    # A socket that accepts connections (the kernel completes the handshake) but never answers.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        start = time.monotonic()
        with pytest.raises(storage.StorageError, match=rf"{endpoint} \(bucket 'quiet'\) did not answer within"):
            StorageTarget("s3://quiet/x", endpoint).probe(timeout=1.5)
        assert time.monotonic() - start < 5
    finally:
        listener.close()


def test_local_paths_need_no_server(tmp_path):
    fs, path = StorageTarget(tmp_path / "c").pyarrow_fs()
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "c")
    with pytest.raises(CorpusError, match="no corpus at .*does not exist"):
        read_manifest(str(tmp_path / "c"))
