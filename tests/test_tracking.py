"""MLflow records as users expect them, on a real sqlite store: context tags and the git commit,
the resolved config as an artifact, queued metrics that arrive, registered model versions and
system metrics."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from mdt_ray import tracking
from mdt_ray.config import load_config


@pytest.fixture
def store(tmp_path):
    return tracking.resolve_uri(f"sqlite:///{tmp_path}/mlflow.db")


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_run_has_context_tags_git_commit_params_and_config_yaml(store):
    cfg = load_config(None, ["train.steps=7"])
    run_id = tracking.start_run(store, "exp", "r1", cfg.flat(), tags={"k": "v"}, config_yaml=cfg.to_yaml())
    run = _client(store).get_run(run_id)
    tags = run.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.type"] and tags["mlflow.runName"] == "r1"
    assert tags["k"] == "v"
    head = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    if head:  # the suite runs from a checkout; a source tarball has no commit to record
        assert tags["mlflow.source.git.commit"] == head
    assert run.data.params["train.steps"] == "7"
    assert len(run.data.params) == len(cfg.flat())  # over MLflow's 100-per-batch limit when the config grows
    local = _client(store).download_artifacts(run_id, "config.yaml")
    assert load_config(local).train.steps == 7


def test_queued_metrics_arrive_after_flush(store):
    run_id = tracking.start_run(store, "exp", "r2", {})
    logger = tracking.RunLogger(store, run_id)
    for step in range(1, 4):
        logger.log_metrics({"loss": 1.0 / step, "skip_nan": float("nan")}, step=step)
    logger.flush()
    history = _client(store).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert not _client(store).get_metric_history(run_id, "skip_nan")


def test_registered_model_versions_point_at_the_safetensors_export(store, tmp_path):
    run_id = tracking.start_run(store, "exp", "r3", {})
    export = tmp_path / "trellis"
    export.mkdir()
    (export / "s.json").write_text("{}")
    (export / "s.safetensors").write_bytes(b"\0" * 8)
    tracking.RunLogger(store, run_id).log_artifacts(export, "student")
    v1 = tracking.register_model(store, run_id, "mdt-student", "student", {"eval_fd_1step": 1.25})
    v2 = tracking.register_model(store, run_id, "mdt-student", "student")
    assert (v1, v2) == ("1", "2")
    mv = _client(store).get_model_version("mdt-student", v1)
    assert mv.run_id == run_id and mv.source.endswith("/student") and mv.tags["eval_fd_1step"] == "1.25"
    files = sorted(Path(p).name for p in Path(_client(store).download_artifacts(run_id, "student")).iterdir())
    assert files == ["s.json", "s.safetensors"]


def test_system_metrics_are_sampled_into_the_run(store, monkeypatch):
    pytest.importorskip("psutil")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    run_id = tracking.start_run(store, "exp", "r4", {})
    with tracking.system_metrics(store, run_id, node_id="node0"):
        deadline = time.time() + 60
        while time.time() < deadline:
            keys = _client(store).get_run(run_id).data.metrics
            if any(k.startswith("system/node0/cpu") or "cpu_utilization" in k for k in keys):
                break
            time.sleep(1)
    keys = _client(store).get_run(run_id).data.metrics
    assert any("cpu_utilization" in k for k in keys), sorted(keys)
    assert any("node0" in k for k in keys), sorted(keys)


def test_system_metrics_without_a_run_is_a_no_op():
    with tracking.system_metrics(None, None) as monitor:
        assert monitor is None
