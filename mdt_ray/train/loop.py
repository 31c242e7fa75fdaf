"""The Ray Train worker: the function each worker runs (Ray's `train_loop_per_worker`).

Per worker: a frozen teacher and a (DDP) student on the same device (on an image corpus also the
frozen image encoder, which turns each batch's drawn view into its cond tokens inside the step),
the worker's shard of the corpus, and the optimizer step of mdt_ray.engine; a report every
`log_every` steps, a checkpoint every `checkpoint_every`, the in-training eval on rank 0, and at
the end the EMA student in TRELLIS's format. Every rank runs the same fixed steps and calls `ray.train.report` at the same
steps, so Ray's report barrier cannot deadlock; a non-finite loss on any rank, or non-finite
weights after an update (or, before a checkpoint, weights whose outputs are non-finite), stops all
ranks at the same step, and no checkpoint is written from such weights.

A restarted or resumed worker takes the newest complete checkpoint of the run directory (see
mdt_ray/train/state.py); a worker that waits too long for a batch stops with an error saying
where it waits (train.batch_timeout_s); and an error that a restart would only repeat (a corrupt
shard, a checkpoint that does not fit) ends the run at once through `StopOnDeterministicError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from ray.train import UserCallback

from mdt_ray.conditioning import ViewConditioner
from mdt_ray.config import Config
from mdt_ray.data.storage import StorageTarget
from mdt_ray.engine import Engine, StepTerms
from mdt_ray.models import export_trellis
from mdt_ray.models.teachers import build_image_encoder, build_teacher, freeze, student_from
from mdt_ray.objectives import NUM_T_BINS
from mdt_ray.stages import Split, Stage, get_stage
from mdt_ray.train.position import Batches, Position, ShardTooSmallError
from mdt_ray.train.state import (STOP_NOTE, CheckpointDamagedError, Restored, RunDir, latest_complete, load_checkpoint,
                                 DeferredCheckpoint, new_scratch_dir, remove_orphaned_scratch, save_checkpoint)


@dataclass
class Upload:
    """A checkpoint upload that Ray Train runs in its background thread (`train.async_upload`)."""

    step: int
    where: str
    finished: threading.Event = field(default_factory=threading.Event)
    seconds: Optional[float] = None  # how long the successful attempt took
    deferred: Optional[DeferredCheckpoint] = None  # the files, written in the upload thread first


@dataclass
class Worker:
    """What one worker knows of its run: the config, its place in the group, where to write."""

    cfg: Config
    stage: Stage
    rank: int
    world: int
    device: torch.device
    run_dir: RunDir
    manifest: Any  # data.uri's manifest without its shard list: shapes and stats for decoding
    mlflow_run_id: Optional[str]
    logger: Any  # rank 0's RunLogger when the run is tracked, else None
    eval_split: Optional[Split]  # rank 0's held-out split, else None
    taken: set[str] = field(default_factory=set)  # checkpoint folder names in use (see _checkpoint_name)
    upload: Optional[Upload] = None  # the latest checkpoint upload of this worker


class DeterministicFailure(RuntimeError):
    """A worker failed in a way that a restart would repeat; raised on Ray Train's controller."""


class StopOnDeterministicError(UserCallback):
    """Ends a run at a worker error that a restart would only repeat (`deterministic_errors`).

    Ray Train 2.60 retries every worker error up to FailureConfig.max_failures and has no way to
    mark one as final, but its controller calls `after_exception` before its failure policy
    decides, and an error raised there becomes a ControllerError that the default policy does not
    retry: `fit()` then raises that ControllerError, whose `controller_failure` is the
    DeterministicFailure raised here, naming the rank and the cause."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            cause = deterministic_cause(error)
            if cause is not None:
                first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
                raise DeterministicFailure(f"rank {rank}: {type(cause).__name__}: {first} (not retried: a restart "
                                           "would fail the same way)")


def deterministic_errors() -> tuple[type[BaseException], ...]:
    """The project's errors that a restart would repeat: bad input, not a lost process or store."""
    from mdt_ray.config import ConfigError
    from mdt_ray.data.schema import CorpusError
    from mdt_ray.models.checkpoint import CheckpointMismatchError
    from mdt_ray.models.teachers import ModelPathError
    from mdt_ray.train.launch import InputError

    return (ConfigError, CorpusError, CheckpointMismatchError, ModelPathError, CheckpointDamagedError,
            ShardTooSmallError, InputError)


def _chain(error: Optional[BaseException]):
    """`error` and every error it carries: its causes, a RayTaskError's `cause` (a Ray Data
    task's own exception) and a Ray Train ControllerError's `controller_failure`, outermost first."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, getattr(e, "cause", None), getattr(e, "controller_failure", None)]


def deterministic_cause(error: Optional[BaseException]) -> Optional[BaseException]:
    """The deterministic error in `error`'s chain, the innermost one; None when there is none."""
    found = [e for e in _chain(error) if isinstance(e, deterministic_errors())]
    return found[-1] if found else None


def is_deterministic(error: Optional[BaseException]) -> bool:
    """Whether a restart would repeat `error`: a deterministic error in its chain, raised on the
    driver or (as a DeterministicFailure on Ray Train's controller) in a worker."""
    return deterministic_cause(error) is not None or any(isinstance(e, DeterministicFailure) for e in _chain(error))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    _quiet_report_log()
    # A worker whose asynchronous upload failed is replaced by a new process; its scratch copy stays.
    remove_orphaned_scratch()
    w = _worker(loop_config)
    engine, teacher, conditioner = _build(w)
    start_step, start = _restore(w, engine)
    # An injected failure fires only in an attempt started without a checkpoint: the restored one finishes.
    fail_at = w.cfg.run.inject_failure_at_step if start_step == 0 else None
    with _node_metrics(loop_config):
        _train(w, engine, teacher, _batches(w, start), start_step, fail_at, conditioner)
    if w.logger is not None:
        w.logger.flush()


def _node_metrics(loop_config: dict[str, Any]):
    """MLflow system metrics from one worker per node (local rank 0), named by its node rank."""
    import contextlib

    import ray.train

    from mdt_ray.tracking import system_metrics

    ctx = ray.train.get_context()
    if ctx.get_local_rank() != 0:
        return contextlib.nullcontext()
    return system_metrics(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"),
                          node_id=f"node{ctx.get_node_rank()}")


def _worker(loop_config: dict[str, Any]) -> Worker:
    import ray
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    run_id, uri = loop_config.get("mlflow_run_id"), loop_config.get("tracking_uri")
    logger = None
    if rank == 0 and run_id and uri:
        from mdt_ray.tracking import RunLogger

        logger = RunLogger(uri, run_id)
    split = loop_config.get("eval_split") if rank == 0 else None
    if isinstance(split, ray.ObjectRef):
        split = ray.get(split)
    return Worker(cfg, get_stage(cfg.model.stage), rank, ctx.get_world_size(), device, loop_config["run_dir"],
                  loop_config.get("manifest"), run_id, logger, split)


def _build(w: Worker) -> tuple[Engine, torch.nn.Module, Optional[ViewConditioner]]:
    """The engine (student, its optimizer, EMA on rank 0), the frozen teacher and, on an image
    corpus, the view conditioner around the frozen image encoder (outside DDP and the optimizer)."""
    import ray.train.torch

    from mdt_ray.config import ConfigError

    teacher = build_teacher(w.cfg.model.teacher, seed=w.cfg.train.seed, stage=w.cfg.model.stage)
    student = student_from(teacher).to(w.device)
    teacher = freeze(teacher, w.device, w.cfg.model.teacher_bf16)
    conditioner = None
    if getattr(w.manifest, "views", 0):
        encoder = build_image_encoder(w.cfg.model, w.device)
        if encoder is None:
            raise ConfigError(f"data.uri {w.cfg.data.uri!r} holds condition images but model.image_encoder is not set")
        conditioner = ViewConditioner(encoder, seed=w.cfg.train.seed, rank=w.rank)
        if w.eval_split is not None:
            w.eval_split.encode_views(conditioner)
    ddp = None
    if w.world > 1:
        ddp = ray.train.torch.prepare_model(student, parallel_strategy_kwargs={"find_unused_parameters": False})
    engine = Engine(student, teacher, stage=w.stage, distill=w.cfg.distill, train=w.cfg.train, rank=w.rank,
                    forward_model=ddp, keep_ema=(w.rank == 0))
    return engine, teacher, conditioner


def _restore(w: Worker, engine: Engine) -> tuple[int, Position]:
    """The step and data position to start from: the newest complete checkpoint of the run
    directory (Ray's latest unless that one is damaged, or Ray's snapshot predates it), else the
    start. Every rank must pick the same one."""
    import ray.train

    offered = ray.train.get_checkpoint()
    # A restart after the store went silent fails here in seconds instead of hanging on the list.
    StorageTarget.from_data_config(w.cfg.data, w.cfg.run.storage_path).probe(fresh=True)
    w.taken.update(w.run_dir.checkpoint_names())
    found = latest_complete(w.run_dir, w.device)
    if found is None and offered is not None:
        # Ray's checkpoint lies outside the directory listed (not expected): verify it all the same.
        with offered.as_directory() as d:
            found = Restored(Path(offered.path).name, load_checkpoint(d, w.device, label=offered.path))
    step = found.state["meta"]["step"] if found is not None else 0
    extremes = _all_reduce(torch.tensor([step, -step], dtype=torch.float64, device=w.device), dist.ReduceOp.MAX)
    if int(extremes[0]) != -int(extremes[1]):
        raise CheckpointDamagedError(f"the ranks found different checkpoints to resume from in {w.run_dir.path} "
                                     f"(steps {-int(extremes[1])} to {int(extremes[0])})")
    if found is None:
        return 0, Position()
    _load_state(w, engine, found)
    if w.rank == 0:
        for reason in found.skipped:
            _say(f"skipping a damaged checkpoint: {reason}")
        offered_name = Path(offered.path).name if offered is not None else None
        if offered_name != found.name:
            _say(f"Ray's latest checkpoint is {offered_name or 'none'}; resuming from {found.name}, the newest "
                 "complete one")
        _say(f"resumed from checkpoint at step {step}")
    return step, Position.from_meta(found.state["meta"], w.rank)


def _load_state(w: Worker, engine: Engine, found: Restored) -> None:
    from mdt_ray.models.checkpoint import CheckpointMismatchError

    state, meta = found.state, found.state["meta"]
    try:
        engine.student.load_state_dict(state["student"])
        engine.load_optimizer(state["optimizer"], meta["param_groups"])
        if engine.ema is not None and "ema" in state:
            engine.ema.load_state_dict(state["ema"])
            engine.ema.updates = int(meta["step"])  # the warm-up continues where it stopped
    except (RuntimeError, KeyError, ValueError) as e:
        detail = " ".join(str(e).split())
        raise CheckpointMismatchError(
            f"checkpoint {found.name} in {w.run_dir.path} does not fit this run's model (model.teacher "
            f"{w.cfg.model.teacher!r}): {detail[:600]}") from None
    engine.clipper.load(meta.get("clip_history", []))


def _batches(w: Worker, start: Position) -> Batches:
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    tc, data = w.cfg.train, w.cfg.data
    seed = tc.seed * 1000 + w.rank

    def batches_of(epoch: int):
        return w.stage.batches(shard, tc.batch_size, device=w.device, manifest=w.manifest, seed=seed + epoch,
                               shuffle_buffer=data.shuffle_buffer if data.shuffle else 0)

    return Batches(batches_of, batch_size=tc.batch_size, start=start, timeout_s=tc.batch_timeout_s,
                   describe=lambda: _where_it_waits(w, shard))


def _where_it_waits(w: Worker, shard: Any) -> str:
    """What a stalled worker can tell cheaply: its rank, the cluster's free CPUs, the tasks that
    wait for resources (Ray's State API, when the dashboard runs), Ray Data's operators so far."""
    import ray

    free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
    parts = [f"rank {w.rank} of {w.world}", f"{free:g} of the cluster's {total:g} CPUs are free",
             f"this run's workers hold {w.world * w.cfg.scale.cpus_per_worker:g} (scale.cpus_per_worker)"]
    try:
        from ray.util.state import list_tasks

        waiting = list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], detail=True, timeout=10,
                             limit=100, raise_on_missing_output=False)
    except Exception:  # the State API needs the dashboard; the CPU counts say enough without it
        waiting = []
    if waiting:
        kinds = Counter(f"{t.name} {t.required_resources or {}}" for t in waiting)
        parts.append("tasks waiting for resources: " + ", ".join(f"{n}× {k}" for k, n in kinds.most_common(5)))
    parts.append(_data_progress(shard))
    if free < 1:
        parts.append("Ray Data's read tasks need a CPU that no one holds: lower scale.cpus_per_worker or "
                     "scale.num_workers, or give the cluster more CPUs")
    else:
        parts.append("CPUs are free, so the wait is in reading (is data.uri's store answering?) or in Ray Data")
    return "; ".join(p for p in parts if p)


def _data_progress(shard: Any, wait_s: float = 10.0) -> str:
    """Ray Data's operators and what each has done, from the shard's stats. Ray 2.60 asks its
    split coordinator for them without a timeout, so the question runs on a thread that may be
    left behind."""
    answer: dict[str, str] = {}

    def ask() -> None:
        with contextlib.suppress(Exception):
            answer["stats"] = shard.stats()

    asking = threading.Thread(target=ask, name="mdt-data-stats", daemon=True)
    asking.start()
    asking.join(wait_s)
    if "stats" not in answer:
        return f"Ray Data's stats gave no answer within {wait_s:g} s"
    ops = re.findall(r"^Operator \d+ (.+?): (.*)$", answer["stats"], re.MULTILINE)
    if not ops:
        return ""
    return "Ray Data operators: " + "; ".join(f"{name} {done.strip() or 'nothing done yet'}" for name, done in ops)


def _train(w: Worker, engine: Engine, teacher: torch.nn.Module, batches: Batches, start_step: int,
           fail_at: Optional[int], conditioner: Optional[ViewConditioner] = None) -> None:
    tc = w.cfg.train
    window = _Window(w.device)
    last_eval: dict[str, float] = {}
    try:
        for step in range(start_step, tc.steps):
            batch = next(batches)
            if conditioner is not None:
                # The view of each sample is drawn from (seed, rank, step): a resumed run redraws it.
                batch = conditioner(batch, step)
            if step == fail_at and w.rank == w.world - 1:
                # A real process death, as an OOM kill or a lost machine gives: no exception to
                # catch, no clean-up; Ray Train finds it by its health check.
                _say(f"run.inject_failure_at_step: SIGKILL of this worker (rank {w.rank}) at step {step}")
                os.kill(os.getpid(), signal.SIGKILL)
            measured = engine.forward_backward(batch, step)
            if not _all_finite(w, engine, measured, step):
                return
            grad_norm = engine.apply(step)
            done = step + 1
            saving = done % tc.checkpoint_every == 0 or done == tc.steps
            if not _weights_finite(w, engine, batch if saving else None, measured, grad_norm, step):
                return
            window.add(measured, grad_norm)
            if done % tc.log_every == 0 or saving:
                last_eval = _report(w, engine, teacher, window, batches.position, done, last_eval)
                window.reset()
    finally:
        batches.close()


def _all_finite(w: Worker, engine: Engine, measured: StepTerms, step: int) -> bool:
    """Whether every rank's loss is finite; all ranks learn it, so all stop at the same step."""
    flag = _all_reduce(torch.tensor([0.0 if measured.finite else 1.0], device=w.device))
    if float(flag) == 0:
        return True
    engine.discard()
    lo, hi = measured.t_range
    _stop(w, step, f"non-finite loss at step {step} on {int(flag)} rank(s); this rank: "
          + ", ".join(f"{k}={v:.4g}" for k, v in measured.terms.items())
          + f", lr={w.cfg.train.lr}, t=[{lo:.3f}, {hi:.3f}]. "
          "The last good checkpoint is kept; lower train.lr or distill.cfg_* and resume.", measured.terms)
    return False


def _weights_finite(w: Worker, engine: Engine, probe: Optional[dict[str, Any]], measured: StepTerms,
                    grad_norm: float, step: int) -> bool:
    """Whether every rank's weights are finite after the update of `step` and, when `probe` (the
    step's batch, given before a checkpoint), rank 0's weights give finite outputs on it."""
    ok = engine.weights_finite()
    if probe is not None and w.rank == 0:
        ok = ok & engine.outputs_finite(probe)
    # Kept on the device up to the all-reduce: one synchronisation per step, as for the loss.
    flag = _all_reduce((~ok).float().reshape(1))
    if float(flag) == 0:
        return True
    what = ("weights" if not bool(engine.weights_finite()) else "outputs (on this step's batch)" if not bool(ok)
            else "weights on another rank")
    tc = w.cfg.train
    fixes = ["lower train.lr"] + (["set train.grad_clip"] if tc.grad_clip is None else [])
    if engine.lr * tc.weight_decay >= 1:
        fixes.append("lower train.weight_decay (lr × weight_decay ≥ 1 makes the decay grow the weights)")
    _stop(w, step, f"non-finite {what} after the update at step {step} on {int(flag)} rank(s); this rank: loss "
          f"before the update {measured.terms.get('loss', float('nan')):.4g}, grad norm {grad_norm:.4g} before "
          f"clipping (train.grad_clip={tc.grad_clip}), lr={engine.lr:g}. No checkpoint is written from these weights: "
          f"the last good checkpoint is kept; {', or '.join(fixes)}, and resume.",
          {**measured.terms, "grad_norm": grad_norm})
    return False


def _stop(w: Worker, step: int, msg: str, terms: dict[str, float]) -> None:
    """Every rank stops at `step`: rank 0 leaves why in the stop note the driver turns into its error."""
    import ray.train

    if w.rank == 0:
        _say(msg)
        w.run_dir.write(STOP_NOTE, {"step": step, "message": msg, **terms})
    ray.train.report({"step": step, "stopped_nonfinite": 1.0})


def _report(w: Worker, engine: Engine, teacher: torch.nn.Module, window: "_Window", position: Position, done: int,
            last_eval: dict[str, float]) -> dict[str, float]:
    """Metrics, eval, checkpoint, progress line and MLflow at step `done`; returns the latest eval."""
    tc = w.cfg.train
    is_last = done == tc.steps
    metrics = window.metrics(w.world, tc.batch_size)
    metrics.update(step=done, lr=engine.lr, epoch=position.epoch)
    # eval_every 0 means only at the end, as documented (sweep trials set it to log_every).
    evaluate = w.eval_split is not None and (is_last or (tc.eval_every > 0 and done % tc.eval_every == 0))
    if evaluate:
        last_eval = w.stage.quick_eval(engine.averaged_model(), w.eval_split, steps=tc.eval_steps, device=w.device)
    # The latest eval rides along in every report: a sweep's scheduler compares trials on it.
    metrics.update(last_eval)
    save = w.rank == 0 and (done % tc.checkpoint_every == 0 or is_last)
    if save:
        _await_upload(w, done)
        remove_orphaned_scratch()
    ckpt_dir = new_scratch_dir() if save else None
    deferred = None
    try:
        if save:
            deferred = _save(w, engine, teacher, position, metrics, done, ckpt_dir,
                             defer=tc.async_upload and not is_last)
        if w.rank == 0:
            weights = (engine.ema.describe() if engine.ema is not None else "the trained weights (no EMA)") if evaluate else ""
            _say(_progress_line(done, tc.steps, metrics, window.eta(tc.steps - done), evaluate, weights))
            if w.logger is not None:
                w.logger.log_metrics(metrics, step=done)
    except BaseException:
        _remove(ckpt_dir)
        raise
    _send(w, metrics, ckpt_dir, done, last_eval, deferred)
    return last_eval


def _save(w: Worker, engine: Engine, teacher: torch.nn.Module, position: Position, metrics: dict[str, float],
          done: int, ckpt_dir: Path, *, defer: bool = False) -> Optional[DeferredCheckpoint]:
    """A checkpoint of step `done` in `ckpt_dir` (with the TRELLIS export at the end, written
    first so that state.json lists its files too); with `defer`, a host-memory copy of it that
    the upload thread writes there (returned)."""
    if done == w.cfg.train.steps:
        # TRELLIS's dtype layout follows the teacher's: fp16 torso when the teacher has one.
        fp16 = bool(getattr(teacher, "config_args", {}).get("use_fp16", False))
        export_trellis(engine.averaged_model().cpu(), ckpt_dir / "trellis", f"{w.cfg.run.name}_student", fp16=fp16)
    meta = {"step": done, **position.meta(w.world), "seed": w.cfg.train.seed, "mlflow_run_id": w.mlflow_run_id,
            "clip_history": engine.clipper.state(), "metrics": metrics, "config": w.cfg.model_dump(mode="json"),
            "world_size": w.world}
    state = dict(student=engine.student.state_dict(), ema=engine.ema.state_dict() if engine.ema is not None else None,
                 optimizer=engine.optimizer_tensors(), meta=meta)
    if defer:
        return DeferredCheckpoint(ckpt_dir, **state)
    save_checkpoint(ckpt_dir, **state)
    return None


def _send(w: Worker, metrics: dict[str, float], ckpt_dir: Optional[Path], done: int,
          last_eval: dict[str, float], deferred: Optional[DeferredCheckpoint] = None) -> None:
    """`ray.train.report` (with rank 0's checkpoint, whose scratch directory `_send` removes or
    hands to the upload); the final student goes to MLflow once Ray has it.

    With `train.async_upload` every checkpoint but the final one is uploaded in Ray's background
    thread while training goes on. Ray delivers reports strictly in call order, so the reports in
    between (metrics only) are made asynchronous too: a synchronous one would wait for the upload.
    A `deferred` checkpoint is written to `ckpt_dir` in the upload thread, before the upload.
    The final checkpoint stays synchronous: its TRELLIS export goes to MLflow from the local copy."""
    import ray.train

    asynchronous = w.cfg.train.async_upload and done != w.cfg.train.steps
    mode = ray.train.CheckpointUploadMode.ASYNC if asynchronous else ray.train.CheckpointUploadMode.SYNC
    if ckpt_dir is None:
        ray.train.report(metrics, checkpoint_upload_mode=mode)
        return
    try:
        store = StorageTarget.from_data_config(w.cfg.data, w.cfg.run.storage_path)
        # A store that went silent since the last upload is found here in seconds (a bounded HTTP
        # request), not by an upload that never ends; one that goes silent mid-upload, by the watchdog.
        store.probe(fresh=True)
        w.upload = Upload(done, store.describe(), deferred=deferred)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)),
                         checkpoint_dir_name=_checkpoint_name(w, done), checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=False,
                         checkpoint_upload_fn=_uploader(w.upload, ckpt_dir, w.cfg.train.upload_timeout_s,
                                                        remove=asynchronous))
    except BaseException:
        _remove(ckpt_dir)
        raise
    if asynchronous:
        return
    try:
        if w.logger is not None:
            w.logger.flush()
            w.logger.log_artifacts(ckpt_dir / "trellis", "student")
            if last_eval:
                w.logger.log_text(json.dumps({"step": done, **last_eval}, indent=1), "eval/final_eval.json")
    finally:
        _remove(ckpt_dir)


def _uploader(upload: Upload, ckpt_dir: Path, timeout_s: float, *, remove: bool):
    """Ray Train's `checkpoint_upload_fn`: the deferred checkpoint's files written, then its own
    upload (to the run directory), bounded by the watchdog in whichever thread runs it, and
    (`remove`) the scratch copy removed once it has succeeded. A failed attempt leaves the copy
    for Ray's next attempt; after the last one, the worker fails, Ray Train replaces it and the
    new process removes the copy (`remove_orphaned_scratch`)."""
    import ray.train

    storage = ray.train.get_context().get_storage()

    def upload_fn(checkpoint, checkpoint_dir_name: str):
        if upload.deferred is not None:
            upload.deferred.write()
        t0 = time.perf_counter()
        with _upload_watchdog(upload.step, upload.where, timeout_s):
            persisted = storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
        upload.seconds = time.perf_counter() - t0
        if remove:
            _remove(ckpt_dir)
        upload.finished.set()
        written = f"written in {upload.deferred.seconds:.1f} s and " if upload.deferred is not None else ""
        _say(f"checkpoint of step {upload.step} {written}uploaded in {upload.seconds:.1f} s")
        return persisted

    return upload_fn


def _await_upload(w: Worker, step: int) -> None:
    """Before the checkpoint of `step` is written, the previous upload must have finished: else,
    with uploads slower than `train.checkpoint_every` steps, scratch copies would pile up."""
    pending = w.upload
    if pending is None or pending.finished.is_set():
        return
    timeout_s = w.cfg.train.upload_timeout_s
    # Ray tries an upload up to three times, each bounded by the watchdog.
    limit = 3 * timeout_s + 60 if timeout_s else None
    t0 = time.perf_counter()
    if not pending.finished.wait(limit):
        raise RuntimeError(f"the checkpoint upload of step {pending.step} to {pending.where} did not finish within "
                           f"{limit:g} s (3 × train.upload_timeout_s + 60 s) and is not failing either: stopping "
                           f"before the checkpoint of step {step}")
    _say(f"waited {time.perf_counter() - t0:.1f} s at step {step} for the upload of step {pending.step}: uploads "
         "take longer than train.checkpoint_every steps")


def _remove(path: Optional[Path]) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def _checkpoint_name(w: Worker, done: int) -> str:
    """`checkpoint_<done>`, or with a `.<n>` suffix when a folder of that name exists (a damaged
    one that the resume passed over: see CHECKPOINT_NAME in mdt_ray/train/state.py)."""
    base = name = f"checkpoint_{done:08d}"
    again = 0
    while name in w.taken:
        again += 1
        name = f"{base}.{again}"
    w.taken.add(name)
    return name


class _Window:
    """Loss terms, grad norms and per-t-bin losses summed over the steps since the last report."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t_start, self.steps_done = time.perf_counter(), 0
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.bins = torch.zeros(2, NUM_T_BINS, device=self.device)
        self.t0 = time.perf_counter()

    def add(self, measured: StepTerms, grad_norm: float) -> None:
        for k, v in {**measured.terms, "grad_norm": grad_norm}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.bins += measured.t_bins
        self.n += 1
        self.steps_done += 1

    def metrics(self, world: int, batch_size: int) -> dict[str, float]:
        """Means over the window and all ranks (every rank must call this at the same step)."""
        assets_s = self.n * batch_size / max(time.perf_counter() - self.t0, 1e-9)
        keys = sorted(self.sums)
        reduced = _all_reduce(torch.tensor([self.sums[k] for k in keys] + [assets_s], device=self.device,
                                           dtype=torch.float64))
        _all_reduce(self.bins)
        out = {k: float(reduced[i]) / (world * self.n) for i, k in enumerate(keys)}
        out.update(assets_per_s_per_worker=float(reduced[-1]) / world, assets_per_s=float(reduced[-1]))
        for b in range(NUM_T_BINS):
            if self.bins[1, b] > 0:
                out[f"loss_t{b}"] = float(self.bins[0, b] / self.bins[1, b])
        return out

    def eta(self, steps_left: int) -> str:
        remaining = steps_left * (time.perf_counter() - self.t_start) / max(self.steps_done, 1)
        return f"{int(remaining // 3600)}:{int(remaining % 3600 // 60):02d}:{int(remaining % 60):02d}"


def _progress_line(done: int, steps: int, metrics: dict[str, float], eta: str, evaluated: bool,
                   weights: str = "") -> str:
    line = f"step {done}/{steps} loss {metrics['loss']:.4g}"
    if "loss_vd" in metrics:
        line += f" (vm {metrics['loss_vm']:.4g} vd {metrics['loss_vd']:.4g})"
    line += f" grad {metrics['grad_norm']:.3g} {metrics['assets_per_s_per_worker']:.1f} assets/s/worker ETA {eta}"
    if evaluated:
        line += " eval " + " ".join(f"{k[5:]}={v:.4g}" for k, v in metrics.items() if k.startswith("eval_"))
        if weights:
            line += f" [{weights}]"
    return line


def _all_reduce(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=op)
    return values


@contextlib.contextmanager
def _upload_watchdog(step: int, where: str, timeout_s: float):
    """Stop this worker process when the block (a checkpoint upload) outlasts `timeout_s`: an
    upload into a store that stopped answering blocks inside the AWS SDK for many minutes, and
    no exception can interrupt it. Ray Train then restarts the workers from the last complete
    checkpoint (train/state.py); an upload cut short this way is never taken as complete. It
    works in any thread, also in Ray Train's background upload thread."""
    if not timeout_s:
        yield
        return

    def fire() -> None:
        _say(f"checkpoint upload of step {step} to {where} has not finished after {timeout_s:g} s "
             "(train.upload_timeout_s): the store stopped answering; stopping this worker so that the run "
             "restarts from its last complete checkpoint")
        sys.stderr.flush()
        os._exit(70)

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _say(line: str) -> None:
    """A progress line to the driver. Ray Train 2.60 patches `print` in workers to tee into its
    logger as well, which shows every line twice once MLflow has wrapped stdout; write directly."""
    sys.stdout.write(f"[mdt-ray] {line}\n")
    sys.stdout.flush()


def _quiet_report_log() -> None:
    """Ray 2.60's worker context logs every `ray.train.report` at INFO with the whole metrics dict
    (a ~1 kB line per report, per worker); our own progress line already says it. Its logger is
    named after the module's file path, so it is looked up through the module."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray version: leave its logging alone
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
