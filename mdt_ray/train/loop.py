"""The Ray Train worker: one function that each worker runs (Ray's `train_loop_per_worker`).

Per worker: a frozen teacher and a DDP student on the same device, the worker's shard of the
corpus, the chosen objective, AdamW + EMA + clipping + accumulation + autocast, and a report
every `log_every` steps (with a checkpoint every `checkpoint_every`). Every rank runs the same
fixed steps and calls `ray.train.report` at the same steps, so Ray's report barrier cannot
deadlock; a non-finite loss on any rank stops all ranks at the same step.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from mdt_ray.config import Config
from mdt_ray.models import NAMED_CONFIGS, build_model, export_trellis, load_trellis
from mdt_ray.models.modules import convert_torso
from mdt_ray.objectives import NUM_T_BINS, compute_loss, draw_inputs
from mdt_ray.train.batches import micro_batches
from mdt_ray.train.optim import GradClipper, ema_init, ema_update
from mdt_ray.train.state import load_checkpoint, load_optimizer, optimizer_tensors, save_checkpoint

# ---------------------------------------------------------------------------------------------
# Models


def teacher_path(spec: str) -> Path:
    """A TRELLIS json path from `model.teacher`: as given when it exists from the cwd, else, for a
    relative path, from the repository root (the packaged `mdt_ray/assets/...` teacher then
    resolves from any cwd, including a Ray worker's)."""
    path = Path(spec)
    if not path.exists() and not path.is_absolute():
        root_relative = Path(__file__).resolve().parents[2] / path
        if root_relative.exists():
            return root_relative
    return path


def build_teacher(model_cfg, seed: int = 0) -> torch.nn.Module:
    """The frozen teacher on CPU: a TRELLIS checkpoint pair, or a built-in size.

    A built-in size has no trained weights; it gets a seeded random init with the zero-initialised
    layers (adaLN, output) perturbed too, so that smoke runs and tests distil a non-trivial field.
    """
    if model_cfg.teacher in NAMED_CONFIGS:
        torch.manual_seed(seed)
        model = build_model(model_cfg.teacher)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 1 and not p.any():
                    p.normal_(0.0, 0.02)
        return model
    return load_trellis(teacher_path(model_cfg.teacher))


def student_from(teacher: torch.nn.Module) -> torch.nn.Module:
    """A copy of the teacher's weights with fp32 master parameters."""
    student = copy.deepcopy(teacher).float()
    student.requires_grad_(True)
    return student.train()


def freeze(teacher: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    teacher = teacher.to(device).eval().requires_grad_(False)
    if bf16 and device.type == "cuda":
        convert_torso(teacher, torch.bfloat16)
    return teacher


def autocast_for(mode: str, device: torch.device):
    if device.type != "cuda" or mode == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast(device_type="cuda", dtype=dtype)


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """Seed of the random draws of (rank, step, micro-batch): the whole RNG state is (seed, step)."""
    h = hashlib.blake2b(f"{seed}/{rank}/{step}/{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------
# Data


def _epochs(shard, batch_size: int, device, start_epoch: int, skip: int, shuffle_buffer: int, seed: int,
            stage: str = "ss", manifest=None) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """(epoch, index in epoch, batch) forever; the first `skip` batches of `start_epoch` are
    read and dropped (resume), full batches only (drop_last), so every rank steps alike.
    `manifest` is given when the rows arrive as stored (make_dataset(decode="collate"))."""
    from mdt_ray.data.pipeline import slat_batches, torch_batches

    batches_of = torch_batches if stage == "ss" else slat_batches
    epoch = start_epoch
    while True:
        n = 0
        for i, batch in enumerate(batches_of(shard, batch_size, device=device, drop_last=True,
                                             local_shuffle_buffer=shuffle_buffer, seed=seed + epoch,
                                             manifest=manifest)):
            if epoch == start_epoch and i < skip:
                continue
            n += 1
            yield epoch, i, batch
        if n == 0 and not (epoch == start_epoch and skip):
            raise RuntimeError(
                f"this worker's shard yields no full batch of {batch_size}: the corpus is smaller than "
                "train.batch_size × scale.num_workers"
            )
        epoch += 1


# ---------------------------------------------------------------------------------------------
# The loop


def _all_reduce(values: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values


STOP_NOTE = "stopped_nonfinite.json"


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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    _quiet_report_log()
    cfg = Config.model_validate(loop_config["config"])
    run_id: Optional[str] = loop_config.get("mlflow_run_id")
    tracking_uri: Optional[str] = loop_config.get("tracking_uri")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    tc, dc = cfg.train, cfg.distill

    teacher_cpu = build_teacher(cfg.model, seed=tc.seed)
    student = student_from(teacher_cpu).to(device)
    teacher = freeze(teacher_cpu, device, cfg.model.teacher_bf16)
    names = {i: n for i, (n, _) in enumerate(student.named_parameters())}
    optimizer = torch.optim.AdamW(student.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    clipper = GradClipper(tc.grad_clip, tc.grad_clip_percentile, tc.grad_clip_window)
    ema = ema_init(student) if rank == 0 and tc.ema > 0 else None

    start_step, epoch, skip = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, device)
        student.load_state_dict(state["student"])
        load_optimizer(optimizer, names, state["optimizer"], state["meta"]["param_groups"])
        if ema is not None and "ema" in state:
            ema = {k: v.float() for k, v in state["ema"].items()}
        meta = state["meta"]
        start_step, epoch, skip = meta["step"], meta["epoch"], meta["batches_in_epoch"][rank] if rank < len(meta["batches_in_epoch"]) else meta["batches_in_epoch"][0]
        clipper.load(meta.get("clip_history", []))
        if rank == 0:
            _say(f"resumed from checkpoint at step {start_step}")
    fail_at = cfg.run.inject_failure_at_step if not checkpoint else None

    ddp_student = ray.train.torch.prepare_model(student, parallel_strategy_kwargs={"find_unused_parameters": False}) \
        if world > 1 else student
    shard = ray.train.get_dataset_shard("train")
    batches = _epochs(shard, tc.batch_size, device, epoch, skip, cfg.data.shuffle_buffer if cfg.data.shuffle else 0,
                      tc.seed * 1000 + rank, cfg.model.stage, loop_config.get("manifest"))

    logger = None
    if rank == 0 and run_id and tracking_uri:
        from mdt_ray.tracking import RunLogger

        logger = RunLogger(tracking_uri, run_id)
    eval_data = loop_config.get("eval_data")
    window: dict[str, float] = {}
    bins = torch.zeros(2, NUM_T_BINS, device=device)
    t_window, n_window = time.perf_counter(), 0
    t_start, steps_done = time.perf_counter(), 0
    pos = {"epoch": epoch, "index": skip - 1}
    last_eval: dict[str, float] = {}

    for step in range(start_step, tc.steps):
        ep, idx, batch = next(batches)
        pos = {"epoch": ep, "index": idx}
        if fail_at is not None and step == fail_at and rank == world - 1:
            raise RuntimeError(f"injected failure at step {step} (run.inject_failure_at_step)")
        terms: dict[str, float] = {}
        for m, (x0, cond) in enumerate(micro_batches(batch, tc.batch_split, cfg.model.stage)):
            last = m == tc.batch_split - 1
            sync = contextlib.nullcontext() if last or ddp_student is student else ddp_student.no_sync()
            gen = torch.Generator(device=device).manual_seed(step_seed(tc.seed, rank, step, m))
            with sync, autocast_for(tc.mixed_precision, device):
                draws = draw_inputs(x0, dc, gen)
                out = compute_loss(dc, ddp_student, teacher, x0, cond, draws, gen)
                (out["loss"] / tc.batch_split).backward()
            for k, v in out.items():
                if k.startswith("loss"):
                    terms[k] = terms.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / tc.batch_split
            if "t_bin_sum" in out:
                bins[0] += out["t_bin_sum"]
                bins[1] += out["t_bin_count"]

        # Every rank learns whether any rank saw a non-finite loss, so all stop at this step.
        flag = _all_reduce(torch.tensor([0.0 if math.isfinite(terms["loss"]) else 1.0], device=device))
        if float(flag) > 0:
            optimizer.zero_grad(set_to_none=True)
            diag = {k: v for k, v in terms.items()}
            msg = (f"non-finite loss at step {step} on {int(flag)} rank(s); this rank: "
                   + ", ".join(f"{k}={v:.4g}" for k, v in diag.items())
                   + f", lr={tc.lr}, t=[{float(draws['t'].min()):.3f}, {float(draws['t'].max()):.3f}]. "
                   "The last good checkpoint is kept; lower train.lr or distill.cfg_* and resume.")
            if rank == 0:
                _say(msg)
                _write_stop_note(loop_config, {"step": step, "message": msg, **diag})
            ray.train.report({"step": step, "stopped_nonfinite": 1.0})
            return

        grad_norm = clipper(student.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(ema, student, tc.ema)
        for k, v in terms.items():
            window[k] = window.get(k, 0.0) + v
        window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
        n_window += 1
        steps_done += 1

        done = step + 1
        is_last = done == tc.steps
        if done % tc.log_every and done % tc.checkpoint_every and not is_last:
            continue
        # ---- report (every rank reaches this at the same steps) ----
        elapsed = time.perf_counter() - t_window
        assets_s = n_window * tc.batch_size / max(elapsed, 1e-9)
        reduced = _all_reduce(torch.tensor([window.get(k, 0.0) for k in sorted(window)] + [assets_s], device=device,
                                           dtype=torch.float64))
        _all_reduce(bins)
        keys = sorted(window)
        metrics = {k: float(reduced[i]) / (world * n_window) for i, k in enumerate(keys)}
        metrics.update(step=done, lr=optimizer.param_groups[0]["lr"], epoch=ep,
                       assets_per_s_per_worker=float(reduced[-1]) / world,
                       assets_per_s=float(reduced[-1]))
        for b in range(NUM_T_BINS):
            if bins[1, b] > 0:
                metrics[f"loss_t{b}"] = float(bins[0, b] / bins[1, b])
        remaining = (tc.steps - done) * (time.perf_counter() - t_start) / max(steps_done, 1)

        do_eval = eval_data is not None and (is_last or not last_eval or (tc.eval_every and done % tc.eval_every == 0))
        if do_eval and rank == 0:
            last_eval = _evaluate(student, ema, eval_data, tc.eval_steps, device)
        # The latest eval rides along in every report: a sweep's scheduler compares trials on it.
        metrics.update(last_eval)

        ckpt_dir = None
        want_ckpt = done % tc.checkpoint_every == 0 or is_last
        if rank == 0:
            if want_ckpt:
                ckpt_dir = tempfile.mkdtemp(prefix="mdt-ckpt-")
                meta = {
                    "step": done, "epoch": pos["epoch"], "seed": tc.seed,
                    # Per-rank batches consumed in the current epoch (equal on all ranks: drop_last
                    # and equal shards), replicated so a resume with more workers still finds one.
                    "batches_in_epoch": [pos["index"] + 1] * world,
                    "mlflow_run_id": run_id, "clip_history": clipper.state(), "metrics": metrics,
                    "config": cfg.model_dump(mode="json"), "world_size": world,
                }
                save_checkpoint(ckpt_dir, student=student.state_dict(), ema=ema,
                                optimizer=optimizer_tensors(optimizer, names), meta=meta)
                if is_last:
                    _export_final(student, ema, teacher_cpu, Path(ckpt_dir) / "trellis", cfg)
            eta = f"{int(remaining // 3600)}:{int(remaining % 3600 // 60):02d}:{int(remaining % 60):02d}"
            _say(f"step {done}/{tc.steps} loss {metrics['loss']:.4g}"
                 + (f" (vm {metrics['loss_vm']:.4g} vd {metrics['loss_vd']:.4g})" if "loss_vd" in metrics else "")
                 + f" grad {metrics['grad_norm']:.3g} {metrics['assets_per_s_per_worker']:.1f} assets/s/worker"
                 + f" ETA {eta}" + (f" eval {_fmt_eval(metrics)}" if do_eval else ""))
            if logger is not None:
                logger.log_metrics(metrics, step=done)
        if ckpt_dir:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir),
                             checkpoint_dir_name=f"checkpoint_{done:08d}")
            if is_last and logger is not None:
                logger.log_artifacts(Path(ckpt_dir) / "trellis", "student")
                if last_eval:
                    logger.log_text(json.dumps({"step": done, **last_eval}, indent=1), "eval/final_eval.json")
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # uploaded; the local copy is scratch
        else:
            ray.train.report(metrics)
        window, n_window, t_window = {}, 0, time.perf_counter()
        bins.zero_()


def _write_stop_note(loop_config: dict[str, Any], note: dict[str, Any]) -> None:
    """Tell the driver why the run stopped. Ray's Result carries the metrics of the latest
    checkpoint only, and a stop must not write a checkpoint, so the note goes to the run dir."""
    import pyarrow.fs as pafs

    fs = loop_config.get("storage_fs") or pafs.LocalFileSystem()
    with fs.open_output_stream(f"{loop_config['run_dir']}/{STOP_NOTE}") as f:
        f.write(json.dumps(note, indent=1).encode())


def _fmt_eval(metrics: dict[str, float]) -> str:
    return " ".join(f"{k[5:]}={v:.4g}" for k, v in metrics.items() if k.startswith("eval_"))


def _ema_model(student: torch.nn.Module, ema: Optional[dict[str, torch.Tensor]]) -> torch.nn.Module:
    if ema is None:
        return student
    model = copy.deepcopy(student)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ema[name])
    return model


def _evaluate(student, ema, eval_data, steps, device) -> dict[str, float]:
    import ray

    data = ray.get(eval_data) if isinstance(eval_data, ray.ObjectRef) else eval_data
    model = _ema_model(student, ema)
    if "slat_coords" in data:
        return _evaluate_slat(model, data, steps, device)
    from mdt_ray.evaluate import quick_eval, synthetic_decoder

    return quick_eval(model, data["x0"], data["cond"], steps=steps, device=device,
                      decode=synthetic_decoder(data.get("source") or {}))


@torch.no_grad()
def _evaluate_slat(model, data, steps, device) -> dict[str, float]:
    """Stage 2 samples features on given voxels; scored in normalised units by the mean squared
    error against the held-out asset's own features ("eval_feat_mse_<k>step") and the Fréchet
    distance of the per-voxel feature distributions ("eval_fd_<k>step", the name stage 1 uses,
    so a sweep's default metric serves both stages). A mean-like prediction lowers the MSE; the
    FD is what catches the lost spread (docs/benchmark.md), so it is the one to select on."""
    from mdt_ray.flow import sample
    from mdt_ray.metrics import frechet_distance
    from mdt_ray.models.sparse import SparseBatch

    coords = [torch.as_tensor(c, device=device) for c in data["slat_coords"]]
    feats = [torch.as_tensor(f, dtype=torch.float32, device=device) for f in data["slat_feats"]]
    target = SparseBatch.from_list(coords, feats)
    cond = torch.as_tensor(data["cond"], dtype=torch.float32, device=device)
    g = torch.Generator().manual_seed(0)
    noise = target.replace(torch.randn(target.feats.shape, generator=g).to(device))
    was = model.training
    model.eval()
    out = {}
    for k in steps:
        x = sample(model, noise, cond, steps=k)
        out[f"eval_feat_mse_{k}step"] = float((x.feats - target.feats).pow(2).mean())
        out[f"eval_fd_{k}step"] = frechet_distance(x.feats.float().cpu(), target.feats.float().cpu())
    model.train(was)
    return out


def _export_final(student, ema, teacher_cpu, out_dir: Path, cfg: Config) -> None:
    """The student (EMA weights when kept) in TRELLIS's format and its teacher's dtype layout."""
    model = _ema_model(student, ema).cpu()
    fp16 = bool(getattr(teacher_cpu, "config_args", {}).get("use_fp16", False))
    name = f"{cfg.run.name}_student"
    export_trellis(model, out_dir, name, fp16=fp16)
