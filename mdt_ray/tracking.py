"""MLflow set-up and logging: one run per distillation job, params under the config's dotted names.

The driver creates (or, on resume, reopens) the run and hands its id to the workers; rank 0 logs
step metrics and artifacts into that run through an `MlflowClient`, so no worker ever starts a
second run. Credentials never reach MLflow: the config holds none, and storage keys are read
from the environment only.
"""

from __future__ import annotations

import contextlib
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
_REPO = Path(__file__).resolve().parents[1]


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def context_tags() -> dict[str, str]:
    """MLflow's standard context tags (user, source name and type, ...) plus the git commit of
    the checkout mdt-ray runs from. MLflow's own git provider needs GitPython, which mdt-ray
    does not install, so the commit is asked of git directly; none outside a checkout."""
    import subprocess

    from mlflow.tracking.context.registry import resolve_tags

    tags = dict(resolve_tags())
    if "mlflow.source.git.commit" not in tags and (_REPO / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            commit = ""
        if commit:
            tags["mlflow.source.git.commit"] = commit
    return tags


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any],
              tags: Optional[dict[str, str]] = None, parent_run_id: Optional[str] = None,
              config_yaml: Optional[str] = None) -> str:
    """Create a run with the resolved config as params (and, given, as the `config.yaml`
    artifact) and MLflow's context tags; returns its id."""
    from mlflow.entities import Param

    client = _client(uri)
    exp_id = _experiment_id(client, experiment, uri)
    all_tags = {**context_tags(), "mlflow.runName": run_name, "mdt_ray": "1", **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    # MlflowClient.log_batch splits into MLflow's per-request limits itself.
    client.log_batch(run.info.run_id, params=[Param(_PARAM_KEY.sub("_", k), _param_value(v))
                                              for k, v in sorted(params.items())])
    if config_yaml is not None:
        client.log_text(run.info.run_id, config_yaml, "config.yaml")
    return run.info.run_id


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a resumed run RUNNING again; why it stopped last time no longer describes it."""
    client = _client(uri)
    client.update_run(run_id, status="RUNNING")
    if "mdt_ray.end_reason" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, "mdt_ray.end_reason")


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    _client(uri).set_tag(run_id, key, value[:5000])


def end_run(uri: str, run_id: str, status: str = "FINISHED", reason: Optional[str] = None) -> None:
    """Close the run with `status`; `reason` (why it did not finish) goes in the `mdt_ray.end_reason` tag."""
    client = _client(uri)
    if reason:
        client.set_tag(run_id, "mdt_ray.end_reason", reason[:5000])
    client.set_terminated(run_id, status=status)


def register_model(uri: str, run_id: str, name: str, artifact_path: str,
                   metrics: Optional[dict[str, float]] = None) -> str:
    """Register the run's artifact folder `artifact_path` (the TRELLIS safetensors export, no
    pickle) as a new version of model `name`, tagged with its eval metrics; returns the version."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if "already exists" not in str(e).lower() and getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    tags = {k: f"{float(v):.6g}" for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
    return str(client.create_model_version(name, source=source, run_id=run_id, tags=tags).version)


@contextlib.contextmanager
def system_metrics(uri: Optional[str], run_id: Optional[str], node_id: Optional[str] = None):
    """MLflow's system metrics (CPU, memory, disk, network; GPU through NVML when pynvml is
    installed) sampled into the run while the block runs, prefixed by `node_id` so that every
    node of a cluster logs its own. A no-op without a run, or when psutil is missing."""
    monitor = None
    if uri and run_id:
        try:
            import psutil  # noqa: F401  (MLflow's CPU monitor needs it)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:
            pass
        else:
            monitor = SystemMetricsMonitor(run_id, node_id=node_id, tracking_uri=uri, resume_logging=True)
            monitor.start()
    try:
        yield monitor
    finally:
        if monitor is not None:
            monitor.finish()


class RunLogger:
    """Logs metrics/artifacts into an existing run (used by rank 0 and by the driver)."""

    def __init__(self, uri: Optional[str], run_id: Optional[str]):
        self.enabled = bool(uri and run_id)
        self.run_id = run_id
        self._client = _client(uri) if self.enabled else None
        self._pending: list[Any] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued, not waited for: on rank 0 this sits right before Ray Train's report barrier,
        where a slow tracking server would stall every rank. `flush` waits for the queue."""
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
        if items:
            self._pending.append(self._client.log_batch(self.run_id, metrics=items, synchronous=False))

    def flush(self) -> None:
        """Wait until every queued metric is stored (raises what the store raised)."""
        pending, self._pending = self._pending, []
        for ops in pending:
            if ops is not None:
                ops.wait()

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self._client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self._client.log_text(self.run_id, text, name)
