"""A real S3-protocol server on loopback (moto's ThreadedMotoServer), for the tests and benchmarks.

It speaks the S3 HTTP API, so pyarrow, s3fs, boto3 and Ray workers read and write it exactly as
they would a remote store; the objects live in the memory of the process that started it, and a
thread of that process answers the requests.

moto keeps its buckets in process-wide state: a `moto.mock_aws()` block entered in the same
process resets it, and with it this server's buckets.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Optional

# A secret no other string in a log, record or file would contain by chance, so that
# tests/faults/test_security.py can look for it everywhere a run writes.
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "mdt-test-key-id", "AWS_SECRET_ACCESS_KEY": "mdt-test-secret-6c1f0e9b27"}
REGION = "us-east-1"


class LocalS3:
    """A moto server on a free loopback port; stop() (or leaving the `with` block) ends it."""

    def __init__(self, port: int = 0) -> None:
        self.endpoint: Optional[str] = None
        self._server = None
        self._port = port  # 0: a free port; a given one restarts a stopped server where it was

    def start(self) -> "LocalS3":
        from moto.server import ThreadedMotoServer

        # werkzeug would print a line to stderr for every request; its errors still come through.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # Port 0: the kernel picks a free port when the server binds, so two runs never collide.
        # The buckets live in this process's moto backend, so a server restarted here has them.
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self._port, verbose=False)
        server.start()  # returns once the socket is bound and listening
        host, port = server.get_host_and_port()
        self._server, self.endpoint = server, f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._server = None

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point clients at this server."""
        if self.endpoint is None:
            raise RuntimeError("the S3 server is not running: call start() first")
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": REGION, **TEST_CREDENTIALS}

    def create_bucket(self, name: Optional[str] = None) -> str:
        return create_bucket(self.endpoint, name)

    def delete_bucket(self, name: str) -> None:
        delete_bucket(self.endpoint, name)


def client(endpoint: str):
    """A boto3 S3 client for a local server, with the test credentials."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


def create_bucket(endpoint: str, name: Optional[str] = None) -> str:
    # No CreateBucketConfiguration: for us-east-1, S3 (and moto) reject a LocationConstraint.
    name = name or f"mdt-{uuid.uuid4().hex[:12]}"
    client(endpoint).create_bucket(Bucket=name)
    return name


def delete_bucket(endpoint: str, name: str) -> None:
    """Empty and remove a bucket."""
    s3 = client(endpoint)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=name, Delete={"Objects": keys})
    s3.delete_bucket(Bucket=name)


def apply_env(env: dict[str, str]) -> dict[str, Optional[str]]:
    """Set variables; returns the previous values for restore_env."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def restore_env(old: dict[str, Optional[str]]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
