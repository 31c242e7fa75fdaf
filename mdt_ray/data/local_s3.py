"""A real S3-protocol server on loopback (moto_server), for tests, benchmarks and offline demos.

It speaks the S3 HTTP API, so pyarrow, s3fs, boto3 and Ray read and write it exactly as they
would a remote store; only the objects live in the server's memory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server_binary() -> str:
    # The one installed beside this interpreter first: PATH may hold another venv's.
    here = Path(sys.executable).parent / "moto_server"
    if here.exists():
        return str(here)
    found = shutil.which("moto_server")
    if found is None:
        raise FileNotFoundError(
            "moto_server not found beside the Python interpreter or on PATH; install moto[server] "
            "(requirements-test.txt)"
        )
    return found


class LocalS3:
    """Starts `moto_server -H 127.0.0.1 -p PORT`; stop() (or the context manager) ends it."""

    def __init__(self, *, port: Optional[int] = None, log_path: Optional[str] = None,
                 start_timeout: float = 30.0):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    def start(self) -> "LocalS3":
        # Its request log goes to a file: a pipe nobody reads would fill and stall the server.
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [moto_server_binary(), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with code {self.proc.returncode} while starting on port "
                    f"{self.port} (log: {self.log_path or 'discarded'})"
                )
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=1.0):
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {self.start_timeout:g} s")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point clients at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1", **TEST_CREDENTIALS}

    def create_bucket(self, name: Optional[str] = None) -> str:
        return create_bucket(self.endpoint, name)

    def delete_bucket(self, name: str) -> None:
        delete_bucket(self.endpoint, name)


def client(endpoint: str):
    """A boto3 S3 client for a local server, with the test credentials."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
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
