"""`ray job submit` to a head started with `ray start --head` on loopback, with Ray 2.60's token
authentication on, exactly as the README tells users to submit."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mdt_ray.data.corpus import build_synthetic

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # answering (401 without a token is still an answer)
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head node in its own process group (`--block`), so the test stops exactly this cluster
    and not other Ray instances on the machine (`ray stop` would kill them all)."""
    log = tmp_path_factory.mktemp("head") / "head.log"
    gcs, dash, agent, agent_grpc, metrics, rt_env = (_free_port() for _ in range(6))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4", "--include-dashboard=true",
         # Own agent ports: another local cluster (the session's ray.init) already holds the defaults,
         # and a head whose job agent cannot bind answers "No available agent to submit job".
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
         f"--temp-dir={os.environ['RAY_TMPDIR']}"],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_ray_job_submit_runs_distillation_and_tracks_it(head, tmp_path):
    address, env = head
    build_synthetic(str(tmp_path / "train"), 24, seed=0, progress=False)
    db = tmp_path / "mlflow.db"
    sets = [f"data.uri={tmp_path}/train", "data.eval_uri=null", "model.teacher=ss-tiny", "train.steps=4",
            "train.batch_size=4", "train.checkpoint_every=2", "train.log_every=2", "scale.num_workers=2",
            f"run.storage_path={tmp_path}/runs", "run.name=submitted", f"tracking.uri=sqlite:///{db}"]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
           sys.executable, "jobs/distill.py", "--config", "jobs/configs/demo.yaml"]
    for s in sets:
        cmd += ["--set", s]
    for _ in range(10):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        # A fresh head answers HTTP before its job agent registers; Ray says to try again later.
        if "No available agent" not in out:
            break
        time.sleep(5)
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower(), out[-2000:]
    assert "[mdt-ray] step 4/4" in out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("mdt-ray-demo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["distill.lambda_vd"] == "1.0" and run.data.params["train.steps"] == "4"
    assert run.data.params["run.name"] == "submitted"
    assert {"loss", "loss_vm", "loss_vd", "grad_norm", "lr", "assets_per_s_per_worker"} <= set(run.data.metrics)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "student")]
    assert "student/submitted_student.safetensors" in artifacts and "student/submitted_student.json" in artifacts


def test_job_submit_without_a_token_is_refused(head):
    address, env = head
    no_token = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/nonexistent/token"}
    proc = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=no_token,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    # The job API itself, asked without the token, and with it (what the README's head serves).
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=30)
    assert refused.value.code == 401
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    assert urllib.request.urlopen(request, timeout=30).status == 200


def test_the_dashboard_listens_on_loopback_only(head):
    """--dashboard-host=127.0.0.1, as the README starts the head: another interface of this
    machine does not reach the job API."""
    address, _ = head
    port = int(address.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outward interface
        outward = s.getsockname()[0]
    if outward.startswith("127."):
        pytest.skip("this machine has no interface besides loopback")
    with pytest.raises(OSError):
        socket.create_connection((outward, port), timeout=5).close()
