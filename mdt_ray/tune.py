"""Sweeps: Ray Tune over any config keys (λ, Δt, CFG scales, lr, ...), ASHA early stopping.

Ray 2.60 runs Ray Train V2, where `Tuner(TorchTrainer(...))` is no longer supported. The pattern
used here is the recommended one: a Tune *function trainable* per trial that builds and fits a
`TorchTrainer`, whose reports reach Tune through `TuneReportCallback`. Each trial is a full
distillation run with its own workers, its own MLflow child run under the sweep's parent run,
and its checkpoints under the sweep's storage path.

Sweep file (jobs/configs/sweep.yaml):

    base: demo.yaml                # job config the trials start from (relative to this file)
    overrides: {train.steps: 40}   # applied to every trial
    sweep:
      name: mdt-sweep
      storage_path: runs/sweeps
      metric: eval_fd_1step        # reported by the in-training eval
      mode: min
      search: grid                 # grid | random | optuna
      num_samples: 1               # grid: repeats of the grid; random/optuna: trials
      max_concurrent_trials: auto  # or a number
      max_failures: 1              # Tune's retries of a trial (it resumes from its checkpoint)
      driver_resource: mdt_trial_driver   # where the cluster has it, trial drivers run there
      scheduler: {type: asha, grace_period: 20, reduction_factor: 2}
      space:
        distill.lambda_vd: {grid: [0.5, 1.0]}
        distill.dt: {choice: [0.01, 0.05]}
        train.lr: {loguniform: [1.0e-5, 1.0e-3]}
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mdt_ray.config import Config, ConfigError, _format_errors, apply_overrides, from_dict, read_yaml
from mdt_ray.config_paths import PATH_KEYS, is_local, resolve_path, resolve_tree
from mdt_ray.interrupts import Interrupted, tune_interrupts

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Sweep configuration


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Domain(_Block):
    grid: Optional[list[Any]] = None
    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Domain":
        given = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint (got {given or 'none'})")
        for k in ("grid", "choice"):
            if getattr(self, k) is not None and not getattr(self, k):
                raise ValueError(f"{k} must list at least one value")
        if self.loguniform is not None and min(self.loguniform) <= 0:
            raise ValueError("loguniform bounds must be > 0")
        return self

    def candidates(self) -> list[Any]:
        """Values to validate against the config: every listed value, or a range's ends."""
        for k in ("grid", "choice"):
            if getattr(self, k) is not None:
                return list(getattr(self, k))
        lo, hi = self.uniform or self.loguniform or self.randint
        if lo >= hi:
            raise ValueError(f"range [{lo}, {hi}] is empty")
        return [lo, hi]


class SchedulerSpec(_Block):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(10, gt=0)  # in training steps
    reduction_factor: float = Field(2.0, gt=1)


class SweepSpec(_Block):
    name: str = "mdt-sweep"
    storage_path: str = "runs/sweeps"
    metric: str = "eval_fd_1step"
    mode: Literal["min", "max"] = "min"
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, gt=0)
    max_concurrent_trials: Union[int, Literal["auto"]] = "auto"
    # Tune retries a trial whose driver or workers died (a preempted node) this many times; the
    # retry resumes the trial's run from its latest checkpoint.
    max_failures: int = Field(1, ge=0)
    # A custom resource that marks the nodes trial drivers may run on (the shipped cluster files
    # give it to the head, which is never preempted). Where the cluster has it, each driver takes
    # one unit and no CPU; where it has none (a local cluster), a driver takes 0.01 CPU anywhere.
    driver_resource: Optional[str] = "mdt_trial_driver"
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    space: dict[str, Domain]
    seed: int = 0

    @model_validator(mode="after")
    def _grid_only_for_grid(self) -> "SweepSpec":
        if self.search != "grid" and any(d.grid is not None for d in self.space.values()):
            raise ValueError("grid domains need search: grid (use choice for random/optuna)")
        if not self.space:
            raise ValueError("space is empty")
        return self


class SweepFile(_Block):
    base: Optional[str] = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    sweep: SweepSpec


def _resolved(value: str) -> str:
    """A local path absolute against the command's cwd (see mdt_ray.config_paths); URIs as given."""
    from mdt_ray.models.registry import NAMED_CONFIGS

    return value if not is_local(value) or value in NAMED_CONFIGS else resolve_path(value, Path.cwd())


def _dotted_set(tree: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return apply_overrides(tree, [f"{key}={json.dumps(value)}"])


def load_sweep(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> tuple[Config, SweepSpec, dict]:
    """Parse a sweep file; validate every value the search space can produce *before* any trial.

    Returns (base config, sweep spec, base config tree). `overrides` (`--set`) apply to the base
    config with dotted keys, or to the sweep block with a `sweep.` prefix.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {p}")
    raw = read_yaml(p)
    sweep_over = [o for o in (overrides or []) if o.startswith("sweep.")]
    cfg_over = [o for o in (overrides or []) if not o.startswith("sweep.")]
    if sweep_over:
        raw = apply_overrides(raw, sweep_over)
    try:
        spec_file = SweepFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(p))) from None
    tree: dict[str, Any] = {}
    if spec_file.base:
        base_path = (p.parent / spec_file.base) if not Path(spec_file.base).is_absolute() else Path(spec_file.base)
        if not base_path.is_file():
            raise ConfigError(f"{p}: base config not found: {base_path}")
        tree = read_yaml(base_path)
    for key, value in spec_file.overrides.items():
        tree = _dotted_set(tree, key, value)
    if cfg_over:
        tree = apply_overrides(tree, cfg_over)
    tree = resolve_tree(tree)
    spec_file.sweep.storage_path = _resolved(spec_file.sweep.storage_path)
    for key, domain in spec_file.sweep.space.items():
        if key in PATH_KEYS:
            for k in ("grid", "choice"):
                if getattr(domain, k) is not None:
                    setattr(domain, k, [_resolved(v) if isinstance(v, str) else v for v in getattr(domain, k)])
    base = from_dict(tree, f"{p} (base)")
    flat = base.flat()
    for key, domain in spec_file.sweep.space.items():
        if key not in flat:
            raise ConfigError(f"{p}: sweep.space.{key}: not a config key")
        for value in domain.candidates():
            try:
                from_dict(_dotted_set(tree, key, value), f"{p}")
            except ConfigError as e:
                raise ConfigError(f"sweep.space.{key}: value {value!r} is invalid:\n{e}") from None
    spec = spec_file.sweep
    return base, spec, tree


# ---------------------------------------------------------------------------------------------
# Tune wiring


def _tune_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, d in spec.space.items():
        if d.grid is not None:
            out[key] = tune.grid_search(d.grid)
        elif d.choice is not None:
            out[key] = tune.choice(d.choice)
        elif d.uniform is not None:
            out[key] = tune.uniform(*d.uniform)
        elif d.loguniform is not None:
            out[key] = tune.loguniform(*d.loguniform)
        else:
            out[key] = tune.randint(*d.randint)
    return out


def trial_count(spec: SweepSpec) -> int:
    """Trials the sweep runs in all: Tune repeats the whole grid `num_samples` times."""
    grid = math.prod(len(d.grid) for d in spec.space.values() if d.grid is not None)
    return grid * spec.num_samples


def driver_resources(spec: SweepSpec, cluster: dict[str, float]) -> dict[str, float]:
    """What each trial's driver asks of the cluster: one unit of sweep.driver_resource where the
    cluster has that resource (and no CPU), else a sliver of CPU anywhere (Ray 2.60 rejects a
    trainable that asks for nothing at all)."""
    from mdt_ray.train.resources import TRIAL_DRIVER_CPUS

    if spec.driver_resource and cluster.get(spec.driver_resource, 0) >= 1:
        return {"CPU": 0.0, spec.driver_resource: 1.0}
    return {"CPU": TRIAL_DRIVER_CPUS}


def fit_concurrency(cfg: Config, spec: SweepSpec, cluster: dict[str, float]) -> int:
    """Trials at once on a cluster of `cluster` resources (the most it may grow to, where its
    autoscaler says: train/resources.py `cluster_capacity`): sweep.max_concurrent_trials, or
    (auto) as many as fit, each with its workers, its driver and one CPU for its Ray Data read
    tasks, and no more than there are driver slots. Raises RunError, naming the numbers, when
    that many do not fit."""
    from mdt_ray.train.launch import RunError
    from mdt_ray.train.resources import fitting_runs, plan_of

    driver = driver_resources(spec, cluster)
    driver_cpus = driver["CPU"]
    if spec.max_concurrent_trials == "auto":
        wanted = max(1, fitting_runs(cfg.scale, cluster, driver_cpus=driver_cpus))
        if len(driver) > 1:
            wanted = min(wanted, int(cluster[spec.driver_resource]))
    else:
        wanted = int(spec.max_concurrent_trials)
    runs = min(wanted, trial_count(spec))
    problem = plan_of(cfg.scale, cluster, runs=runs, driver_cpus=driver_cpus).problem(sweep=True)
    if problem:
        raise RunError(f"sweep {spec.name!r} cannot start: {problem}")
    return runs


def _trial(params: dict[str, Any], *, tree: dict[str, Any], parent_run_id: Optional[str],
           tracking_uri: Optional[str], experiment: str, sweep_name: str, storage_path: str,
           driver_cpus: float) -> None:
    """One trial: a distillation run launched as `distill` launches one, under the sweep's MLflow
    parent run, reported to Tune through TuneReportCallback."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mdt_ray.train.launch import RunError, Tracking, failure_line, launch
    from mdt_ray.train.loop import is_deterministic

    context = tune.get_context()
    name, trial_id = context.get_trial_name(), context.get_trial_id()
    cfg = trial_config(tree, params, name, storage_path.rstrip("/") + f"/{sweep_name}-trials")
    # The trial leaves its MLflow run open: the driver closes every child run from the status Tune
    # reports (_close_children). In Ray 2.60 a trial the scheduler stops can still be running
    # here, raising or returning, after tuner.fit() has returned, so a status written from here
    # would race the driver's (CI saw a stopped trial's late FAILED overwrite its KILLED).
    tracking = Tracking(tracking_uri, experiment, parent_run_id=parent_run_id, params={"trial": name},
                        tags={"mdt_ray.sweep": sweep_name, "mdt_ray.trial_id": trial_id,
                              "mdt_ray.driver_node": ray.get_runtime_context().get_node_id()}, close=False)
    # Tune 2.60 retries every trial error up to max_failures and has no public way to mark one
    # final; an attempt that failed on bad input leaves a note, and Tune's retry of it ends at once.
    final_note = Path(context.get_trial_dir()) / FINAL_ERROR_NOTE
    if final_note.is_file():
        raise RunError(f"trial {name}: not retried, a restart would fail the same way: "
                       f"{final_note.read_text().strip()}")
    try:
        # Always resumable: a trial Tune retries (sweep.max_failures) finds its own run directory
        # and continues it from its latest checkpoint; a new trial has none and starts fresh.
        launch(cfg, resume=True, tracking=tracking, callbacks=[TuneReportCallback()], driver_cpus=driver_cpus)
    except Exception as e:
        if is_deterministic(e):
            final_note.write_text(failure_line(e) + "\n")
        raise


FINAL_ERROR_NOTE = "mdt_ray_final_error.txt"


def trial_config(tree: dict[str, Any], params: dict[str, Any], name: str, storage_path: str) -> Config:
    """The config of the trial `name`: the sweep's base tree with the trial's values."""
    trial_tree = copy.deepcopy(tree)
    for key, value in {**params, "run.name": name, "run.storage_path": storage_path}.items():
        trial_tree = _dotted_set(trial_tree, key, value)
    cfg = from_dict(trial_tree, f"trial {name}")
    if cfg.train.eval_every == 0:
        # ASHA compares trials at every report: have the eval metric in each one.
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"eval_every": cfg.train.log_every})})
    return cfg


# Tune's view of a trial -> the status of its MLflow run.
_RUN_STATUS = {"DONE": "FINISHED", "STOPPED": "KILLED", "ERROR": "FAILED"}


def _close_children(uri: str, parent_run_id: str, trials: list[dict[str, Any]], reason: Optional[str] = None) -> None:
    """Set every child run's final status from its trial's outcome (matched on the trial id tag);
    a run with no reported trial that is still RUNNING is closed as KILLED, with `reason` (why the
    sweep ended) in its `mdt_ray.end_reason` tag."""
    from mlflow.tracking import MlflowClient

    outcome = {t["trial"]: t["status"] for t in trials}
    client = MlflowClient(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    for run in client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        status = outcome.get(run.data.tags.get("mdt_ray.trial_id", ""))
        if status is None and run.info.status != "RUNNING":
            continue
        if status is None and reason:
            client.set_tag(run.info.run_id, "mdt_ray.end_reason", reason[:5000])
        client.set_terminated(run.info.run_id, _RUN_STATUS.get(status, "KILLED"))
        if status == "STOPPED":
            client.set_tag(run.info.run_id, "mdt_ray.stopped_early", "true")


def _trial_id(result) -> str:
    """Tune's trial id ("f7f9b_00001"): in every reported result, else in the trial folder's name."""
    m = result.metrics or {}
    if m.get("trial_id"):
        return str(m["trial_id"])
    name = result.path.rsplit("/", 1)[-1] if result.path else ""
    found = re.search(r"([0-9a-f]{5}_\d{5})", name)
    return found.group(1) if found else name or "?"


def run_sweep(cfg: Config, spec: SweepSpec, tree: dict[str, Any], *, resume: bool = False) -> dict[str, Any]:
    """Run the sweep; returns {"best": {...}, "trials": [...], "parent_run_id": ..., "table": ...}.
    What every trial would fail on is checked before Ray starts, and the trials at once against
    the cluster before anything is written (a RunError says what does not fit)."""
    from mdt_ray import tracking
    from mdt_ray.train.launch import Tracking
    from mdt_ray.train.resources import cluster_capacity
    from mdt_ray.train.trainer import ensure_ray

    check_inputs(cfg, spec)
    if not resume:
        refuse_existing(cfg, spec)
    ensure_ray()
    cluster = cluster_capacity(extra=[spec.driver_resource] if spec.driver_resource else [])
    concurrency = fit_concurrency(cfg, spec, cluster)
    uri = Tracking.of(cfg).uri
    parent = _start_parent(uri, cfg, spec) if uri else None
    trials: list[dict[str, Any]] = []
    try:
        tuner = _tuner(cfg, spec, tree, uri, parent, resume, concurrency, driver_resources(spec, cluster))
        with tune_interrupts() as interrupted:
            results = tuner.fit()
        trials = [_outcome(r, spec, cfg.train.steps) for r in results]
        if interrupted:
            # Tune 2.60 ends an interrupted sweep by returning its results: its unfinished trials
            # look STOPPED (ASHA's word), which the sweep must not report as an outcome.
            raise Interrupted(interrupted[0])
    except BaseException as exc:
        if parent:  # a sweep that could not finish (or was interrupted) must not leave its runs RUNNING
            from mdt_ray.train.launch import end_status

            status, reason = end_status(exc)
            done = [t for t in trials if t["status"] in ("DONE", "ERROR")]
            with contextlib.suppress(Exception):
                _close_children(uri, parent, done, reason=reason)
                tracking.end_run(uri, parent, status, reason)
        raise
    ok = [t for t in trials if t["metric"] is not None and t["status"] != "ERROR"]
    best = _best(results, spec, trials) if ok else None
    table = format_table(trials, spec)
    print(table, flush=True)
    for t in trials:
        if t["error"]:
            log.warning("trial %s failed: %s", t["trial"], t["error"])
    if best:
        log.info("best trial %s: %s=%.4g params %s", best["trial"], spec.metric, best["metric"], best["params"])
        log.info("best checkpoint: %s", best["checkpoint"])
    if parent:
        _log_to_parent(uri, parent, spec, trials, best, table, results.get_dataframe())
        tracking.end_run(uri, parent, "FINISHED" if ok else "FAILED")
    return {"best": best, "trials": trials, "parent_run_id": parent, "table": table}


def _best(results, spec: SweepSpec, trials: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The row of the best trial, as ResultGrid.get_best_result picks it from the last result of
    every trial that did not fail (NaN and inf left out)."""
    ok = {t["trial"] for t in trials if t["status"] != "ERROR"}
    try:
        result = results.get_best_result(metric=spec.metric, mode=spec.mode, scope="last", filter_nan_and_inf=True)
    except RuntimeError:  # no trial reported a finite value of the metric
        return None
    trial = _trial_id(result)
    if trial not in ok:  # the best last result came from a trial that then failed
        candidates = [t for t in trials if t["trial"] in ok and t["metric"] is not None and math.isfinite(t["metric"])]
        if not candidates:
            return None
        pick = min if spec.mode == "min" else max
        return pick(candidates, key=lambda t: t["metric"])
    return next(t for t in trials if t["trial"] == trial)


def check_inputs(cfg: Config, spec: SweepSpec) -> None:
    """What every trial would fail on, found on the driver before Ray starts: the sweep's store
    and the corpora, the base config's and each one the search space lists."""
    from mdt_ray.data.schema import read_manifest
    from mdt_ray.data.storage import StorageTarget
    from mdt_ray.train.launch import naming

    with naming("sweep.storage_path"):
        StorageTarget.from_data_config(cfg.data, spec.storage_path).check_bucket()
    for key, uri in (("data.uri", cfg.data.uri), ("data.eval_uri", cfg.data.eval_uri)):
        domain = spec.space.get(key)
        listed = domain.candidates() if domain is not None and (domain.grid or domain.choice) else [uri]
        for i, value in enumerate(listed):
            if value:
                with naming(f"sweep.space.{key}[{i}]" if domain is not None else key):
                    read_manifest(StorageTarget.from_data_config(cfg.data, value))


def _start_parent(uri: str, cfg: Config, spec: SweepSpec) -> str:
    """The sweep's parent MLflow run: the space, metric and the base config as params."""
    from mdt_ray import tracking

    space = json.dumps({k: v.model_dump(exclude_none=True) for k, v in spec.space.items()})
    return tracking.start_run(uri, cfg.tracking.experiment, spec.name,
                              {"sweep.space": space, "sweep.metric": spec.metric, "sweep.mode": spec.mode,
                               "sweep.search": spec.search, **cfg.flat()},
                              tags={"mdt_ray.sweep": spec.name})


def _sweep_storage(cfg: Config, spec: SweepSpec):
    """(store, pyarrow filesystem or None, path) of the sweep's storage_path."""
    from mdt_ray.data.storage import StorageTarget

    sweep_store = StorageTarget.from_data_config(cfg.data, spec.storage_path)
    if sweep_store.is_s3:
        return (sweep_store, *sweep_store.pyarrow_fs())
    return sweep_store, None, str(Path(spec.storage_path).expanduser().resolve())


def refuse_existing(cfg: Config, spec: SweepSpec) -> None:
    """A sweep that already ran under this name is continued with --resume or renamed: Tune would
    otherwise start it again beside the old trials' folders, under the same experiment path."""
    from ray import tune

    _, fs, path = _sweep_storage(cfg, spec)
    exp_path = f"{path.rstrip('/')}/{spec.name}"
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        from mdt_ray.train.launch import RunError

        raise RunError(f"sweep {spec.name!r} already ran in {path}; continue it with --resume, "
                          "or set another sweep.name (--set sweep.name=...)")


def _tuner(cfg: Config, spec: SweepSpec, tree: dict[str, Any], uri: Optional[str], parent: Optional[str],
           resume: bool, concurrency: int, driver: dict[str, float]):
    """The Tuner of the sweep (restored from its experiment folder when resuming one); each
    trial's driver asks for `driver` (driver_resources)."""
    from ray import tune

    sweep_store, storage_fs, storage_path = _sweep_storage(cfg, spec)
    trainable = tune.with_parameters(
        _trial, tree=tree, parent_run_id=parent, tracking_uri=uri, experiment=cfg.tracking.experiment,
        sweep_name=spec.name, storage_path=spec.storage_path if sweep_store.is_s3 else storage_path,
        driver_cpus=driver["CPU"],
    )
    # The trial function only drives a TorchTrainer; its workers hold the real resources.
    trainable = tune.with_resources(trainable, driver)
    exp_path = f"{storage_path.rstrip('/')}/{spec.name}"
    log.info("sweep %s: %s search over %s, metric %s (%s), %d trial(s) at a time -> %s", spec.name, spec.search,
             sorted(spec.space), spec.metric, spec.mode, concurrency, exp_path)
    if resume and tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs):
        return tune.Tuner.restore(exp_path, trainable, resume_errored=True, storage_filesystem=storage_fs)
    tune_config = tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=_scheduler(cfg, spec),
                                  search_alg=_search_alg(spec), num_samples=spec.num_samples,
                                  max_concurrent_trials=concurrency)
    run_config = tune.RunConfig(name=spec.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                failure_config=tune.FailureConfig(max_failures=spec.max_failures))
    return tune.Tuner(trainable, param_space=_tune_space(spec), tune_config=tune_config, run_config=run_config)


def _scheduler(cfg: Config, spec: SweepSpec):
    if spec.scheduler.type != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="step", max_t=cfg.train.steps + 1, grace_period=spec.scheduler.grace_period,
                         reduction_factor=spec.scheduler.reduction_factor)


def _search_alg(spec: SweepSpec):
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.seed)
    if spec.search == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=spec.seed)
    return None


def _outcome(result, spec: SweepSpec, steps: int) -> dict[str, Any]:
    """One row of the sweep's report from Tune's result of a trial."""
    from mdt_ray.train.launch import failure_line

    m = result.metrics or {}
    return {
        "trial": _trial_id(result),
        "params": {k: (result.config or {}).get(k) for k in spec.space},
        "metric": m.get(spec.metric),
        "step": m.get("step"),
        "status": "ERROR" if result.error else ("STOPPED" if m.get("step", 0) < steps else "DONE"),
        "checkpoint": m.get("checkpoint_path"),
        "error": failure_line(result.error) if result.error else None,
    }


def _log_to_parent(uri: str, parent: str, spec: SweepSpec, trials: list[dict[str, Any]], best: Optional[dict],
                   table: str, frame=None) -> None:
    """The trial table (and Tune's own, ResultGrid.get_dataframe, as trials.csv) and the best
    trial on the parent run; every child run closed."""
    from mlflow.tracking import MlflowClient

    from mdt_ray import tracking

    logger = tracking.RunLogger(uri, parent)
    logger.log_text(table, "trials.txt")
    logger.log_text(json.dumps(trials, indent=1, default=str), "trials.json")
    if frame is not None and len(frame):
        logger.log_text(frame.to_csv(index=False), "trials.csv")
    if best:
        logger.log_metrics({f"best_{spec.metric}": best["metric"]}, step=0)
        logger.log_text(json.dumps(best, indent=1, default=str), "best_trial.json")
        client = MlflowClient(uri)
        client.set_tag(parent, "best_trial", best["trial"])
        client.set_tag(parent, "best_checkpoint", str(best["checkpoint"]))
        for k, v in best["params"].items():
            client.set_tag(parent, f"best.{k}", str(v))
    _close_children(uri, parent, trials)


def format_table(trials: list[dict[str, Any]], spec: SweepSpec) -> str:
    keys = list(spec.space)
    head = ["trial", *keys, spec.metric, "step", "status"]
    rows = [[t["trial"], *[_fmt(t["params"].get(k)) for k in keys], _fmt(t["metric"]), _fmt(t["step"]), t["status"]]
            for t in trials]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
