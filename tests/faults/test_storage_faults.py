"""The S3 store going away under a run (the moto server stopped): while a checkpoint is being
uploaded, and while the corpus is being read. The run ends with one line that names the store,
within a bounded time, and the previous checkpoint stays intact and loadable."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.faults.conftest import REPO, job_cmd
from tests.s3_server import LocalS3

pytestmark = [pytest.mark.ray, pytest.mark.slow]
# What the fault must be detected within (docs/reliability.md states it): the SDK's attempts and
# our retries of each storage call, then Ray Train's restarts of the worker group.
DETECT_LIMIT_S = 240


def _run_until(cmd, env, log, marker: str) -> subprocess.Popen:
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while marker not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)
    return proc


def _last_error(text: str) -> str:
    lines = [line for line in text.splitlines() if ": error: " in line]
    assert lines, text[-4000:]
    return lines[-1]


def _stop_store_and_wait(server: LocalS3, proc: subprocess.Popen, log, run: str) -> tuple[float, str]:
    """Stop the S3 server under the running job; (seconds until it failed, its error line)."""
    server.stop()
    t0 = time.monotonic()
    code = proc.wait(DETECT_LIMIT_S + 120)
    took = time.monotonic() - t0
    text = log.read_text()
    assert code == 1, text[-4000:]
    error = _last_error(text)
    assert run in error and "failed" in error, error
    assert took < DETECT_LIMIT_S, f"{took:.0f} s: {error}"
    return took, error


@pytest.fixture
def own_s3(monkeypatch):
    """A moto server of the test's own (so it can be stopped), and AWS_* pointing at it here too."""
    server = LocalS3().start()
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    yield server
    server.stop()


def test_the_store_stopped_during_checkpoint_uploads(fault_env, fault_corpus, own_s3, tmp_path):
    bucket = own_s3.create_bucket()
    env = {**fault_env, **own_s3.env()}
    cmd = job_cmd(fault_corpus, tmp_path, "upload-fault", f"run.storage_path=s3://{bucket}/runs")
    proc = _run_until(cmd, env, tmp_path / "run.log", "checkpoint_00000004")
    port = int(own_s3.endpoint.rsplit(":", 1)[1])
    took, error = _stop_store_and_wait(own_s3, proc, tmp_path / "run.log", "upload-fault")
    # The store comes back: the checkpoint written before it went is whole and loadable.
    restarted = LocalS3(port=port).start()
    try:
        from mdt_ray.data.storage import StorageTarget
        from mdt_ray.train.state import RunDir, latest_complete

        fs, path = StorageTarget(f"s3://{bucket}/runs/upload-fault", endpoint_url=restarted.endpoint).pyarrow_fs()
        restored = latest_complete(RunDir(fs, path))
        assert restored is not None and restored.state["meta"]["step"] >= 4
    finally:
        restarted.stop()
    print(f"[fault] store stopped during uploads: detected in {took:.0f} s: {error}")


def test_the_store_stopped_while_the_corpus_is_read(fault_env, own_s3, tmp_path):
    from mdt_ray.data.corpus import build_synthetic
    from mdt_ray.data.storage import StorageTarget

    bucket = own_s3.create_bucket()
    env = {**fault_env, **own_s3.env()}
    build_synthetic(StorageTarget(f"s3://{bucket}/corpus"), 32, seed=0, rows_per_shard=4, progress=False)
    cmd = job_cmd(f"s3://{bucket}/corpus", tmp_path, "read-fault")
    proc = _run_until(cmd, env, tmp_path / "run.log", "checkpoint_00000004")
    took, error = _stop_store_and_wait(own_s3, proc, tmp_path / "run.log", "read-fault")
    assert f"in bucket '{bucket}'" in error and "NETWORK_CONNECTION" in error, error  # what failed, not advice
    from mdt_ray.train.state import load_checkpoint

    assert load_checkpoint(tmp_path / "runs" / "read-fault" / "checkpoint_00000004")["meta"]["step"] == 4
    print(f"[fault] store stopped while reading: detected in {took:.0f} s: {error}")
