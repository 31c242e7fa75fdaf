"""A sweep on a local multi-node cluster shaped like the shipped ones (cluster/*.yaml): a head
with 0 CPUs that offers the trial-driver resource, and two CPU worker nodes, each a `ray start`
on loopback. Every trial's driver runs on the head (sweep.driver_resource); a worker node that
dies mid-run (its raylet killed) takes its Ray Train worker with it, the trial restores from its
last checkpoint on the node that remains and finishes, and the sweep loses no trial."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.conftest import BIN, REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_ports(manager: int) -> list[str]:
    agent, agent_grpc, metrics, rt_env, objects = _free_ports(5)
    # Each node of its own ports: several raylets share this host (and the test session's Ray).
    return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
            f"--node-manager-port={manager}", f"--object-manager-port={objects}"]


class LocalCluster:
    def __init__(self, root: Path, env: dict):
        self.root, self.env, self.procs, self.managers = root, env, {}, {}
        self.gcs, self.dash = _free_ports(2)

    def start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "a")
        (self.managers[name],) = _free_ports(1)
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", *args,
               *_node_ports(self.managers[name])]
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        try:
            return [n.__dict__ if hasattr(n, "__dict__") else dict(n)
                    for n in list_nodes(address=f"http://127.0.0.1:{self.dash}", detail=True, timeout=30)]
        except Exception:  # the dashboard is not up yet
            return []

    def actors(self, cls: str) -> list[dict]:
        from ray.util.state import list_actors

        found = list_actors(address=f"http://127.0.0.1:{self.dash}", timeout=30,
                            filters=[("class_name", "=", cls), ("state", "=", "ALIVE")])
        return [a.__dict__ if hasattr(a, "__dict__") else dict(a) for a in found]

    def kill(self, name: str) -> None:
        """SIGKILL the node's raylet (found by its own node-manager port; Ray starts it in a
        session of its own) and its `ray start`: what a lost machine looks like to the cluster."""
        port = f"--node_manager_port={self.managers[name]}"
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and port in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
        os.killpg(self.procs[name].pid, signal.SIGKILL)

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def cluster(fault_env, tmp_path):
    env = {**fault_env, "RAY_AUTH_MODE": "disabled"}
    c = LocalCluster(tmp_path, env)
    c.start("head", "--head", f"--port={c.gcs}", f"--dashboard-port={c.dash}", "--dashboard-host=127.0.0.1",
            "--include-dashboard=true", "--num-cpus=0", '--resources={"mdt_trial_driver": 4}',
            f"--temp-dir={env['RAY_TMPDIR']}")
    try:
        deadline = time.monotonic() + 120
        while not c.nodes():
            assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(2)
        workers = {name: ["--address=127.0.0.1:" + str(c.gcs), "--num-cpus=2", f'--resources={{"{name}": 1}}']
                   for name in ("w1", "w2")}
        for name, args in workers.items():
            c.start(name, *args)
        while len([n for n in c.nodes() if n["state"] == "ALIVE"]) < 3:
            logs = "\n".join((tmp_path / f"{w}.log").read_text()[-1500:] for w in workers)
            assert time.monotonic() < deadline + 600, f"worker nodes did not join:\n{logs}"
            for name, args in workers.items():
                # Ray 2.60 gives a raylet a fixed 30 s to register; a loaded 2-core machine can miss
                # it (as conftest.py's session cluster notes): start that node again.
                if c.procs[name].poll() is not None:
                    c.start(name, *args)
            time.sleep(2)
        yield c
    finally:
        c.stop()


def test_trial_drivers_run_on_the_head_and_a_lost_node_loses_no_trial(cluster, fault_corpus, tmp_path):
    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, "jobs/sweep.py", "--config", "jobs/configs/sweep.yaml"]
    for s in (f"data.uri={fault_corpus}", "data.eval_uri=null", "model.teacher=ss-tiny", "train.steps=14",
              "train.batch_size=4", "train.log_every=2", "train.checkpoint_every=2", "train.eval_every=0",
              f"tracking.uri=sqlite:///{db}", f"sweep.storage_path={tmp_path}/sweeps", "sweep.metric=loss",
              "sweep.scheduler.type=none", 'sweep.space={"distill.lambda_vd": {"grid": [0.5, 1.0]}}'):
        cmd += ["--set", s]
    # No log deduplication: Ray folds "step 4/14 ..." into an earlier "step 2/14 ..." line
    # ("[repeated 3x across cluster]"), and the test waits for that step.
    env = {**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs}", "RAY_DEDUP_LOGS": "0"}
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        sweep = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        nodes = {n["node_id"]: n for n in cluster.nodes()}
        head = next(i for i, n in nodes.items() if n["resources_total"].get("mdt_trial_driver"))
        by_name = {name: i for i, n in nodes.items() for name in ("w1", "w2") if n["resources_total"].get(name)}
        deadline = time.monotonic() + 400
        while "[mdt-ray] step 4/14 " not in log.read_text():
            assert sweep.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(1)
        workers = cluster.actors("RayTrainWorker")
        assert workers, "no Ray Train worker alive"
        victim = next(name for name, i in by_name.items() if i == workers[0]["node_id"])
        cluster.kill(victim)
        code = sweep.wait(600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    text = log.read_text()
    assert code == 0, text[-4000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2, [(r.info.status, r.data.params.get("trial"), r.data.params.get("distill.dt"),
                                 r.data.tags.get("mdt_ray.trial_id")) for r in children] + [text[-3000:]]
    assert {r.data.tags["mdt_ray.driver_node"] for r in children} == {head}
    assert {r.info.status for r in children} == {"FINISHED"}, [(r.info.status, r.data.tags) for r in children]
    assert all(r.data.metrics["step"] == 14 for r in children)
    assert "resumed from checkpoint" in text or "Restoring" in text or "restor" in text.lower()
