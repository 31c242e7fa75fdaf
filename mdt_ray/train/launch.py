"""The one way a distillation run starts, used by `mdt-ray distill` and by every sweep trial.

`launch` first checks, before Ray starts, what the user can get wrong: the store of
run.storage_path, an existing run (refused unless resumed: Ray Train V2 would otherwise restore
it from its latest checkpoint and mix two runs), the corpus, the teacher against the stage and the
corpus, the held-out corpus (read here). Then, on the cluster, that the workers leave Ray Data a
CPU to read with (train/resources.py). Only then does it write: it opens the MLflow run, records
the run's metadata in its directory, builds the TorchTrainer, fits it and turns a worker's stop
note or failure into a RunError; a new run that fails before its first checkpoint ends its MLflow
run FAILED and leaves no directory that would refuse the corrected rerun. What a sweep trial does
differently is given as arguments: its MLflow run hangs under the sweep's parent and stays open
for the sweep's driver to close, Tune hears its reports through a callback, and its driver's
CPUs count in the resource check.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from mdt_ray.config import Config
from mdt_ray.interrupts import ray_train_sigint, signal_name
from mdt_ray.train.state import RUN_META, STOP_NOTE, RunDir
from mdt_ray.train.trainer import build_trainer, ensure_ray, run_dir_of


class RunError(RuntimeError):
    """A run cannot start or did not finish; the message says why and what to do."""


class InputError(RunError):
    """A run's input does not fit (teacher, corpus, batch): a restart would fail the same way."""


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


def launch(cfg: Config, *, resume: bool, tracking: Tracking, callbacks: Optional[list] = None,
           driver_cpus: float = 0.0) -> DistillResult:
    """Check, record and fit one run (see the module docstring). What the user can get wrong is
    checked before Ray starts, and the cluster's room before anything is written; a new run that
    fails before its first checkpoint leaves no run directory behind. `driver_cpus`: what the
    caller's own process holds of the cluster (a sweep trial's driver)."""
    from mdt_ray.data.schema import read_manifest
    from mdt_ray.data.storage import StorageTarget

    with naming("run.storage_path"):
        StorageTarget.from_data_config(cfg.data, cfg.run.storage_path).check_bucket()
    run_dir = run_dir_of(cfg)
    existing = refuse_existing(cfg, run_dir, resume)
    with naming("data.uri"):
        manifest = read_manifest(StorageTarget.from_data_config(cfg.data))
    check_compatible(cfg, manifest)
    check_batch_fits(cfg, manifest.num_rows)
    with naming("data.eval_uri"):
        held_out = load_eval_split(cfg)
    ensure_ray()
    check_resources(cfg, driver_cpus=driver_cpus)
    run_id = open_mlflow_run(cfg, tracking, existing, manifest.num_rows)
    with _undone_on_failure(run_dir, run_id, tracking, new=existing is None):
        run_dir.write(RUN_META, {"mlflow_run_id": run_id, "tracking_uri": tracking.uri, "name": cfg.run.name,
                                 "config": cfg.model_dump(mode="json")})
        trainer = build_trainer(cfg, manifest, mlflow_run_id=run_id, tracking_uri=tracking.uri, callbacks=callbacks,
                                eval_split=_in_object_store(held_out))
        return fit(trainer, cfg, run_dir, run_id, tracking)


@contextlib.contextmanager
def naming(key: str):
    """Corpus and storage errors raised inside name the config key whose value they are about."""
    from mdt_ray.data.schema import CorpusError
    from mdt_ray.data.storage import StorageError

    try:
        yield
    except (CorpusError, StorageError) as e:
        raise type(e)(f"{key}: {e}") from e


def check_resources(cfg: Config, *, driver_cpus: float = 0.0) -> None:
    """Refuse, with the numbers, a run whose workers leave Ray Data no CPU to read with (a run
    that would otherwise wait forever at 0 rows; see mdt_ray/train/resources.py)."""
    from mdt_ray.train.resources import cluster_capacity, plan_of

    problem = plan_of(cfg.scale, cluster_capacity(), driver_cpus=driver_cpus).problem()
    if problem:
        raise RunError(f"run {cfg.run.name!r} cannot start: {problem}")


def refuse_existing(cfg: Config, run_dir: RunDir, resume: bool) -> Optional[dict[str, Any]]:
    """The metadata of the run already in `run_dir` (None when there is no run there, {} when its
    metadata is missing); an existing run not asked to resume is refused."""
    if not run_dir.has_files():
        return None
    if not resume:
        raise RunError(f"run {cfg.run.name!r} already exists in {cfg.run.storage_path}: pass --resume to continue "
                       "it from its latest checkpoint, or set run.name to start a new one")
    return run_dir.read(RUN_META) or {}


def check_compatible(cfg: Config, manifest) -> None:
    """The teacher must be a model of `model.stage` whose input and cond sizes are the corpus's."""
    from mdt_ray.models.teachers import ModelPathError, teacher_spec
    from mdt_ray.stages import get_stage, stage_of_class

    try:
        spec = teacher_spec(cfg.model.teacher, cfg.model.stage)
    except ModelPathError as e:
        raise InputError(str(e)) from None
    check_teacher_weights(cfg.model.teacher, cfg.model.stage)
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
            problems = stage.fit_problems(spec["args"], manifest, cfg.model)
    if problems:
        raise InputError(f"model.teacher {cfg.model.teacher!r} (model.stage {stage.name!r}) does not fit the corpus "
                         f"data.uri {cfg.data.uri!r}: " + "; ".join(problems))


def check_batch_fits(cfg: Config, corpus_rows: int) -> None:
    """Every worker must get at least one full batch of the corpus (streaming_split(equal=True)
    gives each rows // num_workers); otherwise each worker would stop with ShardTooSmallError."""
    per_worker = corpus_rows // cfg.scale.num_workers
    if per_worker < cfg.train.batch_size:
        raise InputError(f"data.uri {cfg.data.uri!r} holds {corpus_rows} assets: {per_worker} per worker for "
                         f"scale.num_workers={cfg.scale.num_workers}, fewer than train.batch_size="
                         f"{cfg.train.batch_size}; lower one of those or use a larger corpus")


def check_teacher_weights(teacher: str, stage: str = "ss") -> None:
    """A teacher checkpoint whose weights do not fit its json (wrong shapes, missing keys) is
    refused here, from the safetensors header, instead of on every worker after Ray starts."""
    from mdt_ray.models import NAMED_CONFIGS
    from mdt_ray.models.checkpoint import check_trellis
    from mdt_ray.models.pipeline import resolve_teacher
    from mdt_ray.models.teachers import from_root

    if teacher in NAMED_CONFIGS:
        return
    path = from_root(resolve_teacher(teacher, stage))
    if path.is_file():
        with naming_model("model.teacher"):
            check_trellis(path)


@contextlib.contextmanager
def naming_model(key: str):
    """A checkpoint error raised inside names the config key whose file it is about."""
    from mdt_ray.models.checkpoint import CheckpointMismatchError

    try:
        yield
    except (CheckpointMismatchError, ValueError, FileNotFoundError) as e:
        raise type(e)(f"{key}: {e}") from e


def open_mlflow_run(cfg: Config, tracking: Tracking, existing: Optional[dict[str, Any]],
                    corpus_rows: int) -> Optional[str]:
    """The run's MLflow run id: a resumed run reopens its own (same store), else a new one."""
    from mdt_ray import tracking as mlflow_runs

    if not tracking.uri:
        return None
    if existing and existing.get("mlflow_run_id") and existing.get("tracking_uri") == tracking.uri:
        run_id = existing["mlflow_run_id"]
        mlflow_runs.reopen_run(tracking.uri, run_id)
        changed = config_changes(existing.get("config"), cfg)
        if changed:
            # MLflow params cannot change once logged: what the resume changed is said in a tag.
            mlflow_runs.set_tag(tracking.uri, run_id, "mdt_ray.resumed_with", changed)
        return run_id
    return mlflow_runs.start_run(tracking.uri, tracking.experiment, cfg.run.name, {**cfg.flat(), **tracking.params},
                                 tags={"mdt_ray.corpus_rows": str(corpus_rows), **tracking.tags},
                                 parent_run_id=tracking.parent_run_id, config_yaml=cfg.to_yaml())


def config_changes(before: Optional[dict[str, Any]], cfg: Config) -> str:
    """`key: old -> new; ...` for the config keys a resume changed (empty when none or unknown)."""
    if not before:
        return ""
    from mdt_ray.config import flatten

    old, new = flatten(before), cfg.flat()
    keys = [k for k in sorted(new) if k != "run.resume" and old.get(k) != new[k]]
    return "; ".join(f"{k}: {old.get(k)} -> {new[k]}" for k in keys)


def load_eval_split(cfg: Config):
    """data.eval_uri's first train.eval_assets assets (the held-out Split for rank 0's in-training
    eval), read on the driver before Ray starts; None without an eval corpus."""
    if not cfg.data.eval_uri:
        return None
    from mdt_ray.data.storage import StorageTarget
    from mdt_ray.stages import get_stage

    held = StorageTarget.from_data_config(cfg.data, cfg.data.eval_uri)
    return get_stage(cfg.model.stage).load(held, limit=cfg.train.eval_assets)


def _in_object_store(split):
    if split is None:
        return None
    import ray

    return ray.put(split)


@contextlib.contextmanager
def _undone_on_failure(run_dir: RunDir, run_id: Optional[str], tracking: Tracking, *, new: bool):
    """On a failure: the run's MLflow run ends FAILED (when this process closes it), and a new
    run's directory goes when no checkpoint reached it. Its metadata would refuse the corrected
    rerun ("already exists ... pass --resume") and nothing in it is worth resuming."""
    from mdt_ray import tracking as mlflow_runs

    try:
        yield
    except BaseException as exc:
        # Clean-up must not hide the failure being reported, so its own errors are dropped. An
        # interrupt (Ctrl-C, SIGTERM: KeyboardInterrupt) ends the run KILLED; `--resume` reopens it.
        if tracking.close and tracking.uri and run_id:
            with contextlib.suppress(Exception):
                mlflow_runs.end_run(tracking.uri, run_id, *end_status(exc))
        if new:
            with contextlib.suppress(Exception):
                discard_unstarted(run_dir)
        raise


def end_status(exc: BaseException) -> tuple[str, str]:
    """(MLflow status, reason) of a run that `exc` stopped: KILLED for an interrupt, else FAILED."""
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", f"interrupted by {signal_name(exc)}"
    return "FAILED", failure_line(exc)


def discard_unstarted(run_dir: RunDir) -> bool:
    """Remove `run_dir` unless it holds a checkpoint; True when it was removed."""
    import pyarrow.fs as pafs

    fs = run_dir.fs or pafs.LocalFileSystem()
    entries = fs.get_file_info(pafs.FileSelector(run_dir.path, allow_not_found=True))
    if any(e.base_name.startswith("checkpoint_") for e in entries):
        return False
    fs.delete_dir(run_dir.path)
    return True


# Lines Ray Data 2.60 adds to an I/O error it re-raises: its retry count and its advice.
_RAY_ADVICE = ("To change retry attempts", "To ignore this exception", "Failed to apply UDF transform after")


def failure_line(error: BaseException) -> str:
    """Why a run failed, in one line, without Ray's wrapping: a worker's own exception (Ray Train
    2.60's WorkerGroupError keeps it per rank, a ControllerError its cause, a RayTaskError's
    `cause` is the task's own exception), as `Type: last line of its message` (a RunError's
    message alone)."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        rank = min(failures)
        return f"rank {rank}: {failure_line(failures[rank])}"
    inner = getattr(error, "controller_failure", None) or getattr(error, "cause", None)
    if inner is not None and inner is not error:
        return failure_line(inner)
    # A wrapper raised from the error that says what failed (Ray Data's "Failed to apply UDF
    # transform after 1/1 attempts" from a store's OSError): the innermost cause is the story.
    if isinstance(error.__cause__, Exception) and not isinstance(error, RunError):
        return failure_line(error.__cause__)
    # Ray Data appends its retry count and advice to the I/O error it re-raises (_RAY_ADVICE):
    # the line that says what failed comes before them.
    every = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in every if not line.startswith(_RAY_ADVICE)] or every
    if not lines:
        return type(error).__name__
    return lines[-1] if isinstance(error, RunError) else f"{type(error).__name__}: {lines[-1]}"


def fit(trainer, cfg: Config, run_dir: RunDir, run_id: Optional[str], tracking: Tracking) -> DistillResult:
    """Fit; a worker's stop note or any failure becomes a RunError (the caller's
    `_undone_on_failure` ends the MLflow run FAILED)."""
    from mdt_ray import tracking as mlflow_runs

    run_dir.take(STOP_NOTE)  # a stale note from an earlier stop must not fail this run
    try:
        with ray_train_sigint():
            result = trainer.fit()
    except Exception as e:
        raise RunError(f"run {cfg.run.name!r} failed: {failure_line(e)}") from e
    note = run_dir.take(STOP_NOTE)
    if note:
        raise RunError(note.get("message", "non-finite loss"))
    metrics = dict(result.metrics or {})
    if tracking.close and tracking.uri and run_id:
        _register_student(cfg, tracking.uri, run_id, metrics)
        mlflow_runs.end_run(tracking.uri, run_id, "FINISHED")
    return DistillResult(run_dir=str(result.path), checkpoint=result.checkpoint.path if result.checkpoint else None,
                         metrics=metrics, mlflow_run_id=run_id, result=result)


def _register_student(cfg: Config, uri: str, run_id: str, metrics: dict[str, Any]) -> None:
    """The final student (the TRELLIS export rank 0 logged as the `student` artifact) as a new
    version of the registered model `<experiment>-<stage>-student`, tagged with its eval metrics."""
    from mdt_ray import tracking as mlflow_runs

    name = f"{cfg.tracking.experiment}-{cfg.model.stage}-student"
    evals = {k: v for k, v in metrics.items() if k.startswith("eval_")}
    log = logging.getLogger(__name__)
    try:
        version = mlflow_runs.register_model(uri, run_id, name, "student", evals)
    except Exception as e:  # a tracking server without a model registry: the run itself succeeded
        log.warning("the student was not registered as model %r: %s", name, str(e).splitlines()[0] if str(e) else e)
        return
    log.info("registered model %r version %s", name, version)
