"""Storage access against a real S3-protocol server on loopback: round trips, retries, and clear,
bounded-time errors for a missing bucket, a closed port and an endpoint that never answers."""

import socket
import time

import pyarrow.fs as pafs
import pytest

from mdt_ray.data import storage
from mdt_ray.data.schema import CorpusError, read_manifest


def test_uri_helpers():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x") and not storage.is_s3("data/x")
    assert storage.split_s3("s3://bucket/a/b/") == ("bucket", "a/b")
    assert storage.join("s3://b/c/", "part-0.parquet") == "s3://b/c/part-0.parquet"
    with pytest.raises(ValueError, match="without a bucket"):
        storage.split_s3("s3:///key")
    with pytest.raises(ValueError, match="unsupported storage URI"):
        storage.pyarrow_fs("gs://bucket/x")


def test_settings_come_from_arguments_then_environment(monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    assert storage.s3_settings() == storage.S3Settings(None, None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert storage.s3_settings() == storage.S3Settings("http://generic:1", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2/")
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    assert storage.s3_settings() == storage.S3Settings("http://s3-specific:2", "eu-north-1")
    assert storage.s3_settings("https://arg:3", "ap-south-1") == storage.S3Settings("https://arg:3", "ap-south-1")
    with pytest.raises(ValueError, match="not a URL"):
        storage.s3_settings("localhost:9000")
    fs, path = storage.pyarrow_fs("s3://bkt/some/prefix/", "http://127.0.0.1:9")
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
    fs, path = storage.pyarrow_fs(uri)
    with fs.open_output_stream(path) as f:
        f.write(b"written by pyarrow")
    s3, key = storage.s3fs_fs(uri)
    assert key == path
    assert s3.cat_file(key) == b"written by pyarrow"
    with s3.open(f"{s3_bucket}/dir/other.bin", "wb") as f:
        f.write(b"written by s3fs")
    with fs.open_input_stream(f"{s3_bucket}/dir/other.bin") as f:
        assert f.read() == b"written by s3fs"
    storage.check_bucket(uri)  # exists: no error


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
        read_manifest("s3://somebucket/corpus", endpoint_url=endpoint)
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
            storage.probe_endpoint("s3://quiet/x", endpoint, timeout=1.5)
        assert time.monotonic() - start < 5
    finally:
        listener.close()


def test_local_paths_need_no_server(tmp_path):
    fs, path = storage.pyarrow_fs(str(tmp_path / "c"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "c")
    with pytest.raises(CorpusError, match="no corpus at .*does not exist"):
        read_manifest(str(tmp_path / "c"))
