"""Shared test set-up: a private temp dir for Ray and friends, a real S3 server on loopback
(moto, tests/s3_server.py), fresh buckets, and one local Ray session for the whole test run.

The environment is set at import, before any test module imports Ray: Ray reads RAY_TMPDIR and
the auth-token path when it starts, and its unix socket paths must stay under ~107 characters,
hence a short /tmp/mdt-XXXX root rather than pytest's long tmp_path.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import tempfile
import uuid

import pytest

_ROOT = tempfile.mkdtemp(prefix="mdt-", dir="/tmp")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow samples system metrics every 10 s by default; test runs last seconds. Ray workers
# inherit this from the environment of the moment the session cluster starts.
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
os.environ["RAY_TMPDIR"] = os.path.join(_ROOT, "ray")
os.environ["TMPDIR"] = os.path.join(_ROOT, "tmp")
os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.join(_ROOT, "auth_token")
# No stray AWS profile or credentials file from the machine may leak into the tests.
os.environ["AWS_CONFIG_FILE"] = os.path.join(_ROOT, "aws_config")
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(_ROOT, "aws_credentials")
for _d in ("ray", "tmp"):
    os.makedirs(os.path.join(_ROOT, _d), exist_ok=True)
tempfile.tempdir = None  # let tempfile pick up the new TMPDIR
# Ray 2.60 turns token authentication on by default and refuses to start when
# RAY_AUTH_TOKEN_PATH names a missing file; a random hex token is what `ray get-auth-token
# --generate` writes.
with open(os.open(os.environ["RAY_AUTH_TOKEN_PATH"], os.O_WRONLY | os.O_CREAT, 0o600), "w") as _f:
    _f.write(secrets.token_hex(32))


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free loopback port; AWS_* point at it for the whole session."""
    from tests.s3_server import LocalS3, apply_env, restore_env

    server = LocalS3().start()
    old = apply_env(server.env())
    try:
        yield server.endpoint
    finally:
        restore_env(old)
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, uniquely named bucket on the session's S3 server; emptied and removed after."""
    from tests.s3_server import create_bucket, delete_bucket

    name = create_bucket(s3_server, f"t-{uuid.uuid4().hex[:16]}")
    yield name
    try:
        delete_bucket(s3_server, name)
    except Exception:  # a test may have removed it on purpose; the server goes at session end
        pass


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray session (4 logical CPUs) shared by every test that needs Ray.

    It depends on s3_server so that the AWS_* variables exist before Ray starts: Ray's worker
    processes inherit the environment of the moment the cluster starts, not of later changes.
    Four logical CPUs on a 2-core machine leave room for Ray Data's read tasks beside training
    workers (see the Ray stack notes: otherwise the run waits forever for resources).
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    for attempt in range(3):
        try:
            ray.init(
                num_cpus=4,
                # Train V2 polls the State API and warns every second without the dashboard.
                include_dashboard=True,
                logging_level=logging.WARNING,
                configure_logging=True,
            )
            break
        except Exception as e:
            # Ray 2.60 gives its raylet a fixed 30 s to register; on a 2-core machine busy with
            # other jobs that is sometimes not enough. Another try usually is.
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()
