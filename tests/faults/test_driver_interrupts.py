"""The driver of a run stopped by Ctrl-C (SIGINT), by SIGTERM (`kill`, Kubernetes, `ray job stop`)
or killed outright (SIGKILL): the first two end with one line and the shell's status for the
signal, the MLflow run KILLED with the reason; after any of them `--resume` continues the same
MLflow run from the newest complete checkpoint to exactly `train.steps` optimizer steps."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.faults.conftest import REPO, job_cmd

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _mlflow_run(tmp_path, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                f"attributes.run_name = '{name}'")
    return client, run


def _start_and_signal(cmd, env, log, sig) -> tuple[int, float]:
    """Start the job, wait for its second checkpoint, send `sig`; (exit status, seconds to exit)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "checkpoint_00000004" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(120)
    return code, time.monotonic() - t0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_stopped_driver_closes_its_run_and_resume_finishes_it(fault_env, fault_corpus, tmp_path, sig):
    name = f"stop-{sig.name.lower()}"
    log = tmp_path / "first.log"
    code, took = _start_and_signal(job_cmd(fault_corpus, tmp_path, name), fault_env, log, sig)
    text = log.read_text()
    client, run = _mlflow_run(tmp_path, name)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL and run.info.status == "RUNNING"  # nothing can run on SIGKILL
    else:
        assert code == 128 + sig, text[-3000:]
        assert f"distill: error: interrupted by {sig.name}" in text
        assert "Traceback" not in text, text[-3000:]
        assert run.info.status == "KILLED" and run.data.tags["mdt_ray.end_reason"] == f"interrupted by {sig.name}"
        assert took < 60
    resumed = subprocess.run(job_cmd(fault_corpus, tmp_path, name, steps=8) + ["--resume"], cwd=REPO, env=fault_env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "resumed from checkpoint at step" in resumed.stdout + resumed.stderr
    client, again = _mlflow_run(tmp_path, name)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert "mdt_ray.end_reason" not in again.data.tags
    assert again.data.tags["mdt_ray.resumed_with"] == "train.steps: 200 -> 8"  # params cannot change
    from mdt_ray.train.state import load_checkpoint

    final = load_checkpoint(tmp_path / "runs" / name / "checkpoint_00000008")
    steps = [float(v) for k, v in final["optimizer"].items() if k.endswith(".step")]
    assert steps and all(s == 8 for s in steps)
