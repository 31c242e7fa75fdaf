"""The Ray Train worker: the function each worker runs (Ray's `train_loop_per_worker`).

Per worker: a frozen teacher and a (DDP) student on the same device, the worker's shard of the
corpus, and the optimizer step of mdt_ray.engine; a report every `log_every` steps, a checkpoint
every `checkpoint_every`, the in-training eval on rank 0, and at the end the EMA student in
TRELLIS's format. Every rank runs the same fixed steps and calls `ray.train.report` at the same
steps, so Ray's report barrier cannot deadlock; a non-finite loss on any rank stops all ranks at
the same step.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from mdt_ray.config import Config
from mdt_ray.engine import Engine, StepTerms
from mdt_ray.models import export_trellis
from mdt_ray.models.teachers import build_teacher, freeze, student_from
from mdt_ray.objectives import NUM_T_BINS
from mdt_ray.stages import Split, Stage, get_stage
from mdt_ray.train.position import Batches, Position
from mdt_ray.train.state import STOP_NOTE, RunDir, load_checkpoint, save_checkpoint


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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    _quiet_report_log()
    w = _worker(loop_config)
    engine, teacher = _build(w)
    start_step, start = _restore(w, engine)
    # An injected failure fires only in an attempt started without a checkpoint: the restored one finishes.
    fail_at = w.cfg.run.inject_failure_at_step if start_step == 0 else None
    _train(w, engine, teacher, _batches(w, start), start_step, fail_at)


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


def _build(w: Worker) -> tuple[Engine, torch.nn.Module]:
    """The engine (student, its optimizer, EMA on rank 0) and the frozen teacher."""
    import ray.train.torch

    teacher = build_teacher(w.cfg.model.teacher, seed=w.cfg.train.seed)
    student = student_from(teacher).to(w.device)
    teacher = freeze(teacher, w.device, w.cfg.model.teacher_bf16)
    ddp = None
    if w.world > 1:
        ddp = ray.train.torch.prepare_model(student, parallel_strategy_kwargs={"find_unused_parameters": False})
    engine = Engine(student, teacher, stage=w.stage, distill=w.cfg.distill, train=w.cfg.train, rank=w.rank,
                    forward_model=ddp, keep_ema=(w.rank == 0))
    return engine, teacher


def _restore(w: Worker, engine: Engine) -> tuple[int, Position]:
    """The step and data position to start from: Ray's latest checkpoint's, else the start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, Position()
    with checkpoint.as_directory() as d:
        state = load_checkpoint(d, w.device)
    meta = state["meta"]
    engine.student.load_state_dict(state["student"])
    engine.load_optimizer(state["optimizer"], meta["param_groups"])
    if engine.ema is not None and "ema" in state:
        engine.ema.load_state_dict(state["ema"])
    engine.clipper.load(meta.get("clip_history", []))
    if w.rank == 0:
        _say(f"resumed from checkpoint at step {meta['step']}")
    return meta["step"], Position.from_meta(meta, w.rank)


def _batches(w: Worker, start: Position) -> Batches:
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    tc, data = w.cfg.train, w.cfg.data
    seed = tc.seed * 1000 + w.rank

    def batches_of(epoch: int):
        return w.stage.batches(shard, tc.batch_size, device=w.device, manifest=w.manifest, seed=seed + epoch,
                               shuffle_buffer=data.shuffle_buffer if data.shuffle else 0)

    return Batches(batches_of, batch_size=tc.batch_size, start=start)


def _train(w: Worker, engine: Engine, teacher: torch.nn.Module, batches: Batches, start_step: int,
           fail_at: Optional[int]) -> None:
    tc = w.cfg.train
    window = _Window(w.device)
    last_eval: dict[str, float] = {}
    for step in range(start_step, tc.steps):
        batch = next(batches)
        if step == fail_at and w.rank == w.world - 1:
            raise RuntimeError(f"injected failure at step {step} (run.inject_failure_at_step)")
        measured = engine.forward_backward(batch, step)
        if not _all_finite(w, engine, measured, step):
            return
        window.add(measured, engine.apply(step))
        done = step + 1
        if done % tc.log_every == 0 or done % tc.checkpoint_every == 0 or done == tc.steps:
            last_eval = _report(w, engine, teacher, window, batches.position, done, last_eval)
            window.reset()


def _all_finite(w: Worker, engine: Engine, measured: StepTerms, step: int) -> bool:
    """Whether every rank's loss is finite; all ranks learn it, so all stop at the same step."""
    import ray.train

    flag = _all_reduce(torch.tensor([0.0 if measured.finite else 1.0], device=w.device))
    if float(flag) == 0:
        return True
    engine.discard()
    lo, hi = measured.t_range
    msg = (f"non-finite loss at step {step} on {int(flag)} rank(s); this rank: "
           + ", ".join(f"{k}={v:.4g}" for k, v in measured.terms.items())
           + f", lr={w.cfg.train.lr}, t=[{lo:.3f}, {hi:.3f}]. "
           "The last good checkpoint is kept; lower train.lr or distill.cfg_* and resume.")
    if w.rank == 0:
        _say(msg)
        w.run_dir.write(STOP_NOTE, {"step": step, "message": msg, **measured.terms})
    ray.train.report({"step": step, "stopped_nonfinite": 1.0})
    return False


def _report(w: Worker, engine: Engine, teacher: torch.nn.Module, window: "_Window", position: Position, done: int,
            last_eval: dict[str, float]) -> dict[str, float]:
    """Metrics, eval, checkpoint, progress line and MLflow at step `done`; returns the latest eval."""
    tc = w.cfg.train
    is_last = done == tc.steps
    metrics = window.metrics(w.world, tc.batch_size)
    metrics.update(step=done, lr=engine.lr, epoch=position.epoch)
    evaluate = w.eval_split is not None and (is_last or not last_eval or (tc.eval_every and done % tc.eval_every == 0))
    if evaluate:
        last_eval = w.stage.quick_eval(engine.averaged_model(), w.eval_split, steps=tc.eval_steps, device=w.device)
    # The latest eval rides along in every report: a sweep's scheduler compares trials on it.
    metrics.update(last_eval)
    ckpt_dir = None
    if w.rank == 0:
        if done % tc.checkpoint_every == 0 or is_last:
            ckpt_dir = _save(w, engine, teacher, position, metrics, done)
        _say(_progress_line(done, tc.steps, metrics, window.eta(tc.steps - done), evaluate))
        if w.logger is not None:
            w.logger.log_metrics(metrics, step=done)
    _send(w, metrics, ckpt_dir, done, last_eval)
    return last_eval


def _save(w: Worker, engine: Engine, teacher: torch.nn.Module, position: Position, metrics: dict[str, float],
          done: int) -> str:
    """A checkpoint of step `done` in a scratch directory (with the TRELLIS export at the end)."""
    ckpt_dir = tempfile.mkdtemp(prefix="mdt-ckpt-")
    meta = {"step": done, **position.meta(w.world), "seed": w.cfg.train.seed, "mlflow_run_id": w.mlflow_run_id,
            "clip_history": engine.clipper.state(), "metrics": metrics, "config": w.cfg.model_dump(mode="json"),
            "world_size": w.world}
    save_checkpoint(ckpt_dir, student=engine.student.state_dict(),
                    ema=engine.ema.state_dict() if engine.ema is not None else None,
                    optimizer=engine.optimizer_tensors(), meta=meta)
    if done == w.cfg.train.steps:
        # TRELLIS's dtype layout follows the teacher's: fp16 torso when the teacher has one.
        fp16 = bool(getattr(teacher, "config_args", {}).get("use_fp16", False))
        export_trellis(engine.averaged_model().cpu(), Path(ckpt_dir) / "trellis", f"{w.cfg.run.name}_student",
                       fp16=fp16)
    return ckpt_dir


def _send(w: Worker, metrics: dict[str, float], ckpt_dir: Optional[str], done: int,
          last_eval: dict[str, float]) -> None:
    """`ray.train.report` (with rank 0's checkpoint); the final student goes to MLflow once Ray has it."""
    import ray.train

    if ckpt_dir is None:
        ray.train.report(metrics)
        return
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir),
                     checkpoint_dir_name=f"checkpoint_{done:08d}")
    if done == w.cfg.train.steps and w.logger is not None:
        w.logger.log_artifacts(Path(ckpt_dir) / "trellis", "student")
        if last_eval:
            w.logger.log_text(json.dumps({"step": done, **last_eval}, indent=1), "eval/final_eval.json")
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # uploaded; the local copy is scratch


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


def _progress_line(done: int, steps: int, metrics: dict[str, float], eta: str, evaluated: bool) -> str:
    line = f"step {done}/{steps} loss {metrics['loss']:.4g}"
    if "loss_vd" in metrics:
        line += f" (vm {metrics['loss_vm']:.4g} vd {metrics['loss_vd']:.4g})"
    line += f" grad {metrics['grad_norm']:.3g} {metrics['assets_per_s_per_worker']:.1f} assets/s/worker ETA {eta}"
    if evaluated:
        line += " eval " + " ".join(f"{k[5:]}={v:.4g}" for k, v in metrics.items() if k.startswith("eval_"))
    return line


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


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
