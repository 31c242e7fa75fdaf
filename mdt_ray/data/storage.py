"""One way to reach corpus storage: local paths and `s3://` URIs, for pyarrow, s3fs and Ray.

A `StorageTarget` is a location together with the store that holds it: the URI plus the S3
endpoint and region, passed whole wherever a corpus or run folder is read or written. Whatever
it leaves unset, and the credentials, come from the standard AWS_* environment variables
(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for S3-compatible stores such as MinIO, Ceph or moto).
Nothing here hard-codes an endpoint or a key.

Two failure modes matter on a cluster: a store that is briefly unavailable (throttling, a dropped
connection) should be retried with backoff, and a store that is wrong (bad endpoint, missing
bucket, no such key) should fail at once with a message that names it. The AWS SDK inside pyarrow
ignores its request timeout on Linux, so before the first real request to a custom endpoint we
probe it with an HTTP request that has a timeout: a silent endpoint then errors in seconds
instead of hanging a training job.
"""

from __future__ import annotations

import http.client
import os
import socket
from dataclasses import dataclass, replace
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
    """Call `fn`; on a transient error wait (exponential backoff with jitter, tenacity's) and try
    again.

    After `attempts` tries, raise StorageError naming `what` and the last error. A non-transient
    error is raised as it is, at once: retrying a missing key or a denied request only delays
    the message the user needs. This sits above the SDK's own retries (SDK_MAX_ATTEMPTS) because
    pyarrow surfaces an exhausted SDK retry as a plain OSError, which only its text tells apart
    from a real error (TRANSIENT_MARKERS).
    """
    import tenacity

    if attempts < 1:
        raise ValueError(f"retry attempts must be >= 1, got {attempts}")
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential_jitter(initial=base_delay, max=max_delay, jitter=base_delay),
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, Exception) and transient(e)),
        reraise=False,
    )
    try:
        return retrying(fn)
    except tenacity.RetryError as exc:
        last = exc.last_attempt.exception()
        raise StorageError(f"{what}: still failing after {attempts} attempts: {last}") from last


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b"); the bucket must be there."""
    if not str(uri).startswith("s3://"):
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


def bare_path(uri: str) -> str:
    """The path a target's filesystem uses for `uri`: bucket/key for S3, absolute for local."""
    uri = str(uri)
    if uri.startswith("s3://"):
        bucket, key = split_s3(uri)
        return f"{bucket}/{key}".rstrip("/")
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def _credentials() -> dict[str, Optional[str]]:
    # Resolved here rather than left to each process's SDK: the filesystem object is pickled into
    # Ray tasks, and a worker started before the variables were set would otherwise see none.
    return {
        "access_key": os.environ.get("AWS_ACCESS_KEY_ID") or None,
        "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
        "session_token": os.environ.get("AWS_SESSION_TOKEN") or None,
    }


_probed: set[str] = set()


@dataclass(frozen=True)
class StorageTarget:
    """A local path or `s3://` URI together with the S3 endpoint and region that reach it.

    An endpoint or region left None is taken from the AWS_* environment of the process that uses
    the target, when it is used. Every URI of a run is built from one configured target (`join`,
    `with_uri`, `from_data_config`), so a store named in the config is never dropped on the way.
    The target is small and pickles, so it travels to Ray tasks and spawned processes as it is.
    """

    uri: str
    endpoint_url: Optional[str] = None
    region: Optional[str] = None

    def __post_init__(self) -> None:
        uri = str(self.uri)
        # One spelling per folder: "s3://b/c/" and "s3://b/c" name the same corpus.
        object.__setattr__(self, "uri", uri.rstrip("/") or uri)

    @classmethod
    def from_data_config(cls, data_cfg: Any, uri: Optional[str] = None) -> "StorageTarget":
        """`uri` (default data.uri) with the config's storage endpoint and region."""
        return cls(data_cfg.uri if uri is None else uri, data_cfg.storage_endpoint, data_cfg.storage_region)

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def with_uri(self, uri: str) -> "StorageTarget":
        """Another location on the same store."""
        return replace(self, uri=str(uri))

    def join(self, *parts: str) -> "StorageTarget":
        return self.with_uri(join(self.uri, *parts))

    def settings(self) -> S3Settings:
        """Endpoint and region: this target's, else the AWS_* environment's."""
        endpoint = (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        if endpoint is not None:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"S3 endpoint {endpoint!r} is not a URL like http://host:port "
                    "(from the storage endpoint setting or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)"
                )
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return S3Settings(endpoint_url=endpoint.rstrip("/") if endpoint else None, region=region)

    def describe(self) -> str:
        """The URI, plus the endpoint for S3: the text error messages should carry."""
        if not self.is_s3:
            return self.uri
        return f"{self.uri} (at {self.settings().where})"

    def pyarrow_fs(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem for the target and the path to use with it (no scheme, no '/' at the end)."""
        if not self.is_s3:
            if "://" in self.uri and not self.uri.startswith("file://"):
                raise ValueError(f"unsupported storage URI {self.uri!r}: use a local path or s3://bucket/key")
            return pafs.LocalFileSystem(), bare_path(self.uri)
        settings = self.settings()
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
        return pafs.S3FileSystem(**kwargs), bare_path(self.uri)

    def s3fs(self):
        """An s3fs filesystem for the target and the path to use with it (bucket/key, no scheme).

        Local paths get fsspec's local filesystem, so callers can use one code path.
        """
        import fsspec

        if not self.is_s3:
            return fsspec.filesystem("file"), bare_path(self.uri)
        import s3fs

        settings = self.settings()
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
        return fs, bare_path(self.uri)

    def probe(self, *, timeout: float = PROBE_TIMEOUT_S, fresh: bool = False) -> None:
        """Fail fast, naming the endpoint, when a custom S3 endpoint does not answer HTTP.

        Only custom endpoints are probed (AWS itself is assumed up), once per process and endpoint
        unless `fresh` (before each checkpoint upload: the store may have gone away since).
        """
        if not self.is_s3:
            return
        settings = self.settings()
        if not settings.endpoint_url or (settings.endpoint_url in _probed and not fresh):
            return
        bucket, _ = split_s3(self.uri)
        parts = urlsplit(settings.endpoint_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        hint = "check AWS_ENDPOINT_URL (or the storage endpoint setting) and that the server is running"
        connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = connection_type(parts.hostname, port, timeout=timeout)
        try:
            # Any HTTP answer will do (S3 answers an anonymous HEAD / with 200, 403 or 405).
            conn.request("HEAD", "/")
            conn.getresponse()
        except socket.timeout:
            raise StorageError(
                f"S3 endpoint {settings.endpoint_url} (bucket {bucket!r}) did not answer within "
                f"{timeout:g} s; {hint}"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise StorageError(
                f"S3 endpoint {settings.endpoint_url} (bucket {bucket!r}) is unreachable: {exc or type(exc).__name__}; "
                f"{hint}"
            ) from None
        finally:
            conn.close()
        _probed.add(settings.endpoint_url)

    def check_bucket(self) -> None:
        """Probe the endpoint and make sure the target's bucket exists (no-op for local paths)."""
        if not self.is_s3:
            return
        self.probe()
        bucket, _ = split_s3(self.uri)
        fs, _ = self.pyarrow_fs()
        where = self.settings().where
        info = retry(lambda: fs.get_file_info(bucket), what=f"checking bucket {bucket!r} at {where}")
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"S3 bucket {bucket!r} does not exist at {where} (URI {self.uri})")


def as_target(target: "str | os.PathLike[str] | StorageTarget") -> StorageTarget:
    """`target` as it is, or a plain path or URI with the environment's S3 settings."""
    return target if isinstance(target, StorageTarget) else StorageTarget(str(target))
