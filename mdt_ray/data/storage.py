"""One way to reach corpus storage: local paths and `s3://` URIs, for pyarrow, s3fs and Ray.

Endpoint, region and credentials come from the arguments or else the standard AWS_* environment
variables (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for S3-compatible stores such as MinIO, Ceph or
moto). Nothing here hard-codes an endpoint or a key.

Two failure modes matter on a cluster: a store that is briefly unavailable (throttling, a dropped
connection) should be retried with backoff, and a store that is wrong (bad endpoint, missing
bucket, no such key) should fail at once with a message that names it. The AWS SDK inside pyarrow
ignores its request timeout on Linux, so before the first real request to a custom endpoint we
probe it with a socket that has a timeout: a silent endpoint then errors in seconds instead of
hanging a training job.
"""

from __future__ import annotations

import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

T = TypeVar("T")

# Seconds: connect timeout per attempt, and the SDK's own attempts before our retry layer sees
# an error. Small on purpose: our `retry` adds the backoff, so a dead endpoint costs
# (attempts × connect timeout) plus a few seconds of backoff in total.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 30.0
SDK_MAX_ATTEMPTS = 2
PROBE_TIMEOUT_S = 5.0

# Substrings of error messages (pyarrow's AWS SDK errors and botocore's) that mean "try again";
# anything else is a real error and is raised at once.
TRANSIENT_MARKERS = (
    "AWS Error INTERNAL_FAILURE",
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SLOW_DOWN",
    "AWS Error SERVICE_UNAVAILABLE",
    "AWS Error THROTTLING",
    "AWS Error REQUEST_TIMEOUT",
    "HTTP status 500",
    "HTTP status 502",
    "HTTP status 503",
    "HTTP status 504",
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttl",
    "Connection reset",
    "Connection was closed",
    "timed out",
)


class StorageError(OSError):
    """Corpus storage could not be reached or used; the message names the URI and endpoint."""


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: Optional[str]  # None: AWS's own endpoint for the region
    region: Optional[str]

    @property
    def where(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region or 'default region'})"


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b"); the bucket must be there."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://"):].rstrip("/")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI with '/' (never os.sep for S3)."""
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def s3_settings(endpoint_url: Optional[str] = None, region: Optional[str] = None) -> S3Settings:
    endpoint = (
        endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"S3 endpoint {endpoint!r} is not a URL like http://host:port "
                "(from the endpoint argument or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)"
            )
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return S3Settings(endpoint_url=endpoint.rstrip("/") if endpoint else None, region=region)


def _credentials() -> dict[str, Optional[str]]:
    # Resolved here rather than left to each process's SDK: the filesystem object is pickled into
    # Ray tasks, and a worker started before the variables were set would otherwise see none.
    return {
        "access_key": os.environ.get("AWS_ACCESS_KEY_ID") or None,
        "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
        "session_token": os.environ.get("AWS_SESSION_TOKEN") or None,
    }


def pyarrow_fs(
    uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None
) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for `uri` and the path to use with it (no scheme, no trailing '/')."""
    uri = str(uri)
    if not is_s3(uri):
        if "://" in uri and not uri.startswith("file://"):
            raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/key")
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(path)
    bucket, key = split_s3(uri)
    settings = s3_settings(endpoint_url, region)
    kwargs: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": READ_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=SDK_MAX_ATTEMPTS),
        "region": settings.region or "us-east-1",
    }
    creds = _credentials()
    if creds["access_key"] and creds["secret_key"]:
        kwargs.update({k: v for k, v in creds.items() if v})
    if settings.endpoint_url:
        parts = urlsplit(settings.endpoint_url)
        kwargs["endpoint_override"] = parts.netloc
        kwargs["scheme"] = parts.scheme
    fs = pafs.S3FileSystem(**kwargs)
    return fs, f"{bucket}/{key}".rstrip("/")


def bare_path(uri: str) -> str:
    """The path pyarrow_fs's filesystem uses for `uri`: bucket/key for S3, absolute for local."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return f"{bucket}/{key}".rstrip("/")
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def s3fs_fs(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None):
    """An s3fs filesystem for `uri` and the path to use with it (bucket/key, no scheme).

    Local paths get fsspec's local filesystem, so callers can use one code path.
    """
    import fsspec

    uri = str(uri)
    if not is_s3(uri):
        return fsspec.filesystem("file"), os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)
    import s3fs

    bucket, key = split_s3(uri)
    settings = s3_settings(endpoint_url, region)
    client_kwargs: dict[str, Any] = {}
    if settings.endpoint_url:
        client_kwargs["endpoint_url"] = settings.endpoint_url
    # Region is left out for custom endpoints: s3fs then sends no LocationConstraint, which
    # S3-compatible stores (moto, MinIO) reject for us-east-1 when a bucket is created.
    if settings.region and not settings.endpoint_url:
        client_kwargs["region_name"] = settings.region
    config_kwargs = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "read_timeout": READ_TIMEOUT_S,
        "retries": {"max_attempts": SDK_MAX_ATTEMPTS, "mode": "standard"},
    }
    creds = _credentials()
    fs = s3fs.S3FileSystem(
        key=creds["access_key"],
        secret=creds["secret_key"],
        token=creds["session_token"],
        client_kwargs=client_kwargs,
        config_kwargs=config_kwargs,
        # The listing cache would hide shards written by another process during a build.
        use_listings_cache=False,
    )
    return fs, f"{bucket}/{key}".rstrip("/")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    text = str(exc)
    return any(marker in text for marker in TRANSIENT_MARKERS)


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 4,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Call `fn`; on a transient error wait (exponential backoff with jitter) and try again.

    After `attempts` tries, raise StorageError naming `what` and the last error. A non-transient
    error is raised as it is, at once: retrying a missing key or a denied request only delays
    the message the user needs.
    """
    if attempts < 1:
        raise ValueError(f"retry attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not transient(exc):
                raise
            if attempt == attempts:
                raise StorageError(f"{what}: still failing after {attempts} attempts: {exc}") from exc
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            time.sleep(delay * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


_probed: set[str] = set()


def probe_endpoint(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None,
                   *, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, naming the endpoint, when a custom S3 endpoint does not answer HTTP.

    Only custom endpoints are probed (AWS itself is assumed up), once per process and endpoint.
    """
    if not is_s3(uri):
        return
    settings = s3_settings(endpoint_url, region)
    if not settings.endpoint_url or settings.endpoint_url in _probed:
        return
    bucket, _ = split_s3(uri)
    parts = urlsplit(settings.endpoint_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    hint = "check AWS_ENDPOINT_URL (or the storage endpoint setting) and that the server is running"
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            request = f"HEAD / HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
            sock.sendall(request.encode("ascii"))
            if not sock.recv(16):
                raise ConnectionError("closed the connection without answering")
    except socket.timeout:
        raise StorageError(
            f"S3 endpoint {settings.endpoint_url} (bucket {bucket!r}) did not answer within "
            f"{timeout:g} s; {hint}"
        ) from None
    except OSError as exc:
        raise StorageError(
            f"S3 endpoint {settings.endpoint_url} (bucket {bucket!r}) is unreachable: {exc}; {hint}"
        ) from None
    _probed.add(settings.endpoint_url)


def check_bucket(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> None:
    """Probe the endpoint and make sure the bucket of an s3:// URI exists (no-op for local paths)."""
    if not is_s3(uri):
        return
    probe_endpoint(uri, endpoint_url, region)
    bucket, _ = split_s3(uri)
    fs, _ = pyarrow_fs(uri, endpoint_url, region)
    where = s3_settings(endpoint_url, region).where
    info = retry(lambda: fs.get_file_info(bucket), what=f"checking bucket {bucket!r} at {where}")
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"S3 bucket {bucket!r} does not exist at {where} (URI {uri})")


def describe(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> str:
    """`uri`, plus the endpoint for S3 URIs: the text error messages should carry."""
    if not is_s3(uri):
        return str(uri)
    return f"{uri} (at {s3_settings(endpoint_url, region).where})"
