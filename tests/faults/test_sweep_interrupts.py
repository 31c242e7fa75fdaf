"""A sweep stopped by Ctrl-C (SIGINT) or SIGTERM ends as an interrupted `distill` does: one line,
the shell's status for the signal, no "best" line, its MLflow parent and running child runs KILLED
with the reason, the project's `--resume` hint (not Tune's `Tuner.restore`), and `--resume`
finishes it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.faults.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _sweep_cmd(corpus, tmp_path, steps: int) -> list[str]:
    cmd = [sys.executable, "jobs/sweep.py", "--config", "jobs/configs/sweep.yaml"]
    for s in (f"data.uri={corpus}", "data.eval_uri=null", "model.teacher=ss-tiny", f"train.steps={steps}",
              "train.batch_size=4", "train.checkpoint_every=2", "train.log_every=2", "train.eval_every=2",
              "train.eval_assets=4", "sweep.scheduler.type=none", "sweep.name=stop-me",
              'sweep.space={"train.lr": {"grid": [3.0e-4, 1.0e-4]}}', f"sweep.storage_path={tmp_path}/sweeps",
              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"):
        cmd += ["--set", s]
    return cmd


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_an_interrupted_sweep_is_killed_and_resume_finishes_it(fault_env, fault_corpus, tmp_path, sig):
    from mlflow.tracking import MlflowClient

    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_sweep_cmd(fault_corpus, tmp_path, 200), cwd=REPO, env=fault_env, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 400
    while "checkpoint_00000004" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    proc.send_signal(sig)
    code = proc.wait(180)
    text = log.read_text()
    assert code == 128 + sig, text[-3000:]
    assert f"sweep: error: interrupted by {sig.name}" in text and "--resume" in text
    assert "best trial" not in text and "best checkpoint" not in text and "Tuner.restore" not in text, text[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if not r.data.tags.get("mlflow.parentRunId")]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "KILLED" and parent.data.tags["mdt_ray.end_reason"] == f"interrupted by {sig.name}"
    assert children and all(c.info.status == "KILLED" for c in children)
    assert all(c.data.tags.get("mdt_ray.end_reason") == f"interrupted by {sig.name}" for c in children)
    assert not any(c.data.tags.get("mdt_ray.stopped_early") for c in children)

    again = subprocess.run(_sweep_cmd(fault_corpus, tmp_path, 6), cwd=REPO, env=fault_env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 1 and "already ran" in again.stderr and "--resume" in again.stderr, again.stderr[-2000:]
    resumed = subprocess.run(_sweep_cmd(fault_corpus, tmp_path, 6) + ["--resume"], cwd=REPO, env=fault_env,
                             capture_output=True, text=True, timeout=600)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "best trial" in out and "resumed from checkpoint at step" in out, out[-3000:]
