"""MLflow set-up and logging: one run per distillation job, params under the config's dotted names.

The driver creates (or, on resume, reopens) the run and hands its id to the workers; rank 0 logs
step metrics and artifacts into that run through an `MlflowClient`, so no worker ever starts a
second run. Credentials never reach MLflow: the config holds none, and storage keys are read
from the environment only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

_SQLITE = "sqlite:///"


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite path absolute, so workers with another cwd reach the same store."""
    if uri.startswith(_SQLITE) and not uri.startswith(_SQLITE + "/"):
        return _SQLITE + str(Path(uri[len(_SQLITE):]).resolve())
    if "://" not in uri:  # a bare folder: MLflow's file store, refused by default in MLflow 3.17
        raise ValueError(
            f"tracking.uri {uri!r}: use sqlite:///path/mlflow.db or an http(s):// tracking server"
        )
    return uri


def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith(_SQLITE):
        # Artifacts beside the database, as an absolute path: MLflow's default is relative to the
        # creating process's cwd, which differs between the driver and Ray workers.
        artifact_location = Path(uri[len(_SQLITE):]).parent.joinpath("mlartifacts", name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it between our get and create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


_PARAM_KEY = re.compile(r"[^0-9A-Za-z_\-. /]")


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any],
              tags: Optional[dict[str, str]] = None, parent_run_id: Optional[str] = None) -> str:
    """Create a run with the resolved config as params; returns its id."""
    from mlflow.entities import Param, RunTag

    client = _client(uri)
    exp_id = _experiment_id(client, experiment, uri)
    all_tags = {"mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    items = [Param(_PARAM_KEY.sub("_", k), _param_value(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # MLflow's batch limit for params
        client.log_batch(run.info.run_id, params=items[i : i + 100], tags=[RunTag("mdt_ray", "1")] if i == 0 else [])
    return run.info.run_id


def reopen_run(uri: str, run_id: str) -> None:
    client = _client(uri)
    client.update_run(run_id, status="RUNNING")


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client = _client(uri)
    client.set_terminated(run_id, status=status)


class RunLogger:
    """Logs metrics/artifacts into an existing run (used by rank 0 and by the driver)."""

    def __init__(self, uri: Optional[str], run_id: Optional[str]):
        self.enabled = bool(uri and run_id)
        self.run_id = run_id
        self._client = _client(uri) if self.enabled else None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(_PARAM_KEY.sub("_", k), float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self._client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self._client.log_text(self.run_id, text, name)
