"""The one way a distillation run starts, used by `mdt-ray distill` and by every sweep trial.

`launch` checks that the run may start (an existing run is refused unless resumed, Ray Train V2
would otherwise restore it from its latest checkpoint and mix two runs; the teacher must fit the
stage and the corpus), opens its MLflow run, records the run's metadata in its directory, loads
the held-out split, builds the TorchTrainer, fits it and turns a worker's stop note or failure
into a RunError. What a sweep trial does differently is given as arguments: its MLflow run hangs
under the sweep's parent and stays open for the sweep's driver to close, and Tune hears its
reports through a callback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mdt_ray.config import Config
from mdt_ray.train.state import RUN_META, STOP_NOTE, RunDir
from mdt_ray.train.trainer import build_trainer, ensure_ray, run_dir_of


class RunError(RuntimeError):
    """A run cannot start or did not finish; the message says why and what to do."""


@dataclass
class DistillResult:
    run_dir: str
    checkpoint: Optional[str]
    metrics: dict[str, Any]
    mlflow_run_id: Optional[str]
    result: Any  # the ray.train.Result


@dataclass(frozen=True)
class Tracking:
    """How a run is tracked in MLflow. `uri` is resolved (None: not tracked); `close`: end the
    MLflow run when the fit returns (a sweep's driver closes its trials' runs itself)."""

    uri: Optional[str]
    experiment: str
    parent_run_id: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    close: bool = True

    @classmethod
    def of(cls, cfg: Config, **kwargs) -> "Tracking":
        """The config's tracking section (its URI resolved from this process's directory)."""
        from mdt_ray import tracking

        uri = tracking.resolve_uri(cfg.tracking.resolved_uri()) if cfg.tracking.enabled else None
        return cls(uri, cfg.tracking.experiment, **kwargs)


def distill(cfg: Config, *, resume: bool = False) -> DistillResult:
    """Run (or resume) one distillation job end to end; raises RunError when it cannot finish."""
    return launch(cfg, resume=resume or cfg.run.resume, tracking=Tracking.of(cfg))


def launch(cfg: Config, *, resume: bool, tracking: Tracking, callbacks: Optional[list] = None) -> DistillResult:
    """Check, record and fit one run (see the module docstring)."""
    from mdt_ray.data.schema import read_manifest
    from mdt_ray.data.storage import StorageTarget

    ensure_ray()
    run_dir = run_dir_of(cfg)
    existing = refuse_existing(cfg, run_dir, resume)
    manifest = read_manifest(StorageTarget.from_data_config(cfg.data))
    check_compatible(cfg, manifest)
    run_id = open_mlflow_run(cfg, tracking, existing, manifest.num_rows)
    run_dir.write(RUN_META, {"mlflow_run_id": run_id, "tracking_uri": tracking.uri, "name": cfg.run.name,
                             "config": cfg.model_dump(mode="json")})
    trainer = build_trainer(cfg, manifest, mlflow_run_id=run_id, tracking_uri=tracking.uri, callbacks=callbacks,
                            eval_split=_eval_split(cfg))
    return fit(trainer, cfg, run_dir, run_id, tracking)


def refuse_existing(cfg: Config, run_dir: RunDir, resume: bool) -> Optional[dict[str, Any]]:
    """The metadata of the run already in `run_dir` (None when there is none); an existing run
    not asked to resume is refused."""
    if not run_dir.has_files():
        return None
    if not resume:
        raise RunError(f"run {cfg.run.name!r} already exists in {cfg.run.storage_path}: pass --resume to continue "
                       "it from its latest checkpoint, or set run.name to start a new one")
    return run_dir.read(RUN_META)


def check_compatible(cfg: Config, manifest) -> None:
    """The teacher must be a model of `model.stage` whose input and cond sizes are the corpus's."""
    from mdt_ray.models.teachers import ModelPathError, teacher_spec
    from mdt_ray.stages import get_stage, stage_of_class

    try:
        spec = teacher_spec(cfg.model.teacher)
    except ModelPathError as e:
        raise RunError(str(e)) from None
    stage = get_stage(cfg.model.stage)
    try:
        teacher_stage = stage_of_class(spec["name"])
    except ValueError as e:
        problems = [f"the teacher is no stage's model ({e})"]
    else:
        if teacher_stage.name != stage.name:
            problems = [f"the teacher is a {spec['name']} (stage {teacher_stage.name!r}) but model.stage is "
                        f"{stage.name!r}"]
        else:
            problems = stage.fit_problems(spec["args"], manifest)
    if problems:
        raise RunError(f"model.teacher {cfg.model.teacher!r} (model.stage {stage.name!r}) does not fit the corpus "
                       f"data.uri {cfg.data.uri!r}: " + "; ".join(problems))


def open_mlflow_run(cfg: Config, tracking: Tracking, existing: Optional[dict[str, Any]],
                    corpus_rows: int) -> Optional[str]:
    """The run's MLflow run id: a resumed run reopens its own (same store), else a new one."""
    from mdt_ray import tracking as mlflow_runs

    if not tracking.uri:
        return None
    if existing and existing.get("mlflow_run_id") and existing.get("tracking_uri") == tracking.uri:
        mlflow_runs.reopen_run(tracking.uri, existing["mlflow_run_id"])
        return existing["mlflow_run_id"]
    return mlflow_runs.start_run(tracking.uri, tracking.experiment, cfg.run.name, {**cfg.flat(), **tracking.params},
                                 tags={"mdt_ray.corpus_rows": str(corpus_rows), **tracking.tags},
                                 parent_run_id=tracking.parent_run_id)


def _eval_split(cfg: Config):
    """data.eval_uri's first train.eval_assets assets, in the object store for rank 0; None without one."""
    if not cfg.data.eval_uri:
        return None
    import ray

    from mdt_ray.data.storage import StorageTarget
    from mdt_ray.stages import get_stage

    held = StorageTarget.from_data_config(cfg.data, cfg.data.eval_uri)
    return ray.put(get_stage(cfg.model.stage).load(held, limit=cfg.train.eval_assets))


def fit(trainer, cfg: Config, run_dir: RunDir, run_id: Optional[str], tracking: Tracking) -> DistillResult:
    """Fit; a worker's stop note or any failure becomes a RunError (and a FAILED MLflow run)."""
    from mdt_ray import tracking as mlflow_runs

    run_dir.take(STOP_NOTE)  # a stale note from an earlier stop must not fail this run
    closing = tracking.close and tracking.uri and run_id
    try:
        result = trainer.fit()
        note = run_dir.take(STOP_NOTE)
        if note:
            raise RunError(note.get("message", "non-finite loss"))
    except Exception as e:
        if closing:
            mlflow_runs.end_run(tracking.uri, run_id, "FAILED")
        if isinstance(e, RunError):
            raise
        raise RunError(f"run {cfg.run.name!r} failed: {e}") from e
    if closing:
        mlflow_runs.end_run(tracking.uri, run_id, "FINISHED")
    return DistillResult(run_dir=str(result.path), checkpoint=result.checkpoint.path if result.checkpoint else None,
                         metrics=dict(result.metrics or {}), mlflow_run_id=run_id, result=result)
