"""Flow-matching pre-training of the small stage-1 teacher that the CPU benchmark distils.

TRELLIS's own teachers are trained with plain conditional flow matching: logit-normal times,
the image condition replaced by the zero ("negative") condition for a fraction of the samples so
that the same network also learns the unconditional velocity that classifier-free guidance needs.
This module does the same for the `ss-demo` size on the synthetic corpus, with `fm_loss` as the
objective (through `compute_loss`, method `fm`), AdamW, a linear warm-up followed by a cosine
decay of the learning rate, gradient clipping and an EMA copy whose weights are exported.

It is a plain single-process PyTorch loop: on a 2-core CPU one process with both cores' BLAS
threads is faster than Ray workers splitting the cores, and there is no teacher to colocate.

Reproduce the committed teacher (`mdt_ray/assets/teacher_ss_demo.{json,safetensors}`, the EMA
weights after 1500 steps of batch 16 with every setting in PRETRAIN_DEFAULTS):

    mdt-ray corpus build --kind synthetic --num-assets 8192 --seed 0 --out data/teacher-corpus
    mdt-ray corpus build --kind synthetic --num-assets 512 --seed 1 --out data/bench-eval
    python jobs/pretrain_teacher.py --threads 1 --out mdt_ray/assets --name teacher_ss_demo

It took 1 h 17 min on a 2-core CPU shared with other jobs (`--threads 1`: with the cores busy,
a second BLAS thread only spin-waits; the result does not depend on it beyond float summation
order). Held-out eval at 25 steps (64 assets of data/bench-eval): unguided
FD 2.24, IoU 0.358, 1-NNA 0.547; docs/benchmark.md has the full numbers. `--config`/`--set`
change any setting. The held-out corpus (seed 1) is never trained on.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mdt_ray.config import Config, ConfigError, add_config_args, apply_overrides, from_dict

# The settings of the committed teacher. `distill.*` holds the flow-matching knobs (method `fm`,
# CFG dropout p_uncond 0.1 as in TRELLIS's image-conditioned training, logit-normal(1, 1) times).
PRETRAIN_DEFAULTS: dict[str, Any] = {
    "model": {"teacher": "ss-demo", "stage": "ss"},
    "distill": {"method": "fm", "p_uncond": 0.1, "t_schedule": "logit_normal", "t_mean": 1.0, "t_std": 1.0},
    "train": {
        "steps": 1500, "batch_size": 16, "lr": 1.0e-3, "weight_decay": 0.01, "betas": [0.9, 0.99],
        "ema": 0.995, "grad_clip": 1.0, "log_every": 25, "eval_assets": 64, "seed": 0,
    },
    "data": {"uri": "data/teacher-corpus", "eval_uri": "data/bench-eval"},
    "tracking": {"experiment": "mdt-ray-pretrain"},
    "run": {"name": "teacher_ss_demo"},
}

# Fraction of the steps spent warming the learning rate up linearly from 0 (a fresh transformer
# with a 1e-3 step size diverges without it); the rest decays it along a cosine to FINAL_LR_FRAC.
WARMUP_FRAC = 0.05
FINAL_LR_FRAC = 0.05


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_pretrain_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """PRETRAIN_DEFAULTS, then the YAML file on top (block by block), then `--set` overrides."""
    import yaml

    tree = copy.deepcopy(PRETRAIN_DEFAULTS)
    source = "pretrain defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of blocks, got {type(loaded).__name__}")
        tree = _merge(tree, loaded)
        source = f"{p} over the pretrain defaults"
    if overrides:
        tree = apply_overrides(tree, overrides)
        source += " with --set overrides"
    cfg = from_dict(tree, source)
    if cfg.distill.method != "fm":
        raise ConfigError(f"distill.method: pre-training is plain flow matching ('fm'), got {cfg.distill.method!r}")
    if cfg.model.stage != "ss":
        raise ConfigError(f"model.stage: the benchmark teacher is a stage-1 ('ss') model, got {cfg.model.stage!r}")
    return cfg


def lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up over WARMUP_FRAC of the run, then a cosine from `base` to FINAL_LR_FRAC·base."""
    warm = max(1, int(round(WARMUP_FRAC * total)))
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return base * (FINAL_LR_FRAC + (1 - FINAL_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * progress)))


def _fresh_model(cfg: Config) -> torch.nn.Module:
    from mdt_ray.models import NAMED_CONFIGS, build_model, load_trellis

    name = cfg.model.teacher
    if name in NAMED_CONFIGS:
        return build_model(name).float()
    # A TRELLIS json continues training from those weights (fine-tuning a committed teacher).
    return load_trellis(name).float()


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def pretrain(cfg: Config, out_dir: str, name: str, *, eval_steps: int = 25, snapshot_every: int = 0,
             log=print) -> dict[str, Any]:
    """Train, export the EMA weights as `<out_dir>/<name>.{json,safetensors}`, return a summary
    (paths, final loss, wall time, and the held-out eval of the teacher when data.eval_uri is set).

    `snapshot_every` > 0 also exports the EMA weights every that many steps to
    `<out_dir>/snapshots/<name>_<step>`, so a long run can be evaluated while it continues."""
    from mdt_ray.data.pipeline import load_local
    from mdt_ray.models import export_trellis
    from mdt_ray.objectives import compute_loss, draw_inputs
    from mdt_ray.train.loop import step_seed
    from mdt_ray.train.optim import GradClipper, ema_init, ema_update

    tc, dc = cfg.train, cfg.distill
    t_load = time.perf_counter()
    data = load_local(cfg.data.uri, stage="ss")
    n = len(data["asset_id"])
    if n < tc.batch_size:
        raise ValueError(f"data.uri {cfg.data.uri!r} holds {n} assets, fewer than train.batch_size={tc.batch_size}")
    # The synthetic latents are exactly ±1, so float16 holds them losslessly at half the memory.
    x0_all = torch.from_numpy(np.ascontiguousarray(data["x0"])).to(torch.float16)
    cond_all = torch.from_numpy(np.ascontiguousarray(data["cond"])).to(torch.float16)
    del data
    log(f"[pretrain] {n} assets from {cfg.data.uri} in {time.perf_counter() - t_load:.1f}s")

    torch.manual_seed(tc.seed)
    model = _fresh_model(cfg).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    clipper = GradClipper(tc.grad_clip, tc.grad_clip_percentile, tc.grad_clip_window)
    ema = ema_init(model) if tc.ema > 0 else None
    log(f"[pretrain] {cfg.model.teacher}: {params / 1e6:.2f}M parameters; {tc.steps} steps × batch "
        f"{tc.batch_size}, lr {tc.lr:g} (warm-up {WARMUP_FRAC:.0%}, cosine), EMA {tc.ema}, "
        f"p_uncond {dc.p_uncond}, t ~ {dc.t_schedule}({dc.t_mean}, {dc.t_std})")

    logger, run_id = _start_tracking(cfg, name)
    order_gen = torch.Generator().manual_seed(tc.seed)
    perm, cursor, epoch = torch.randperm(n, generator=order_gen), 0, 0
    t_start, cpu_start = time.perf_counter(), time.process_time()
    t_window, window_loss, window_n = t_start, 0.0, 0
    loss_value = float("nan")
    for step in range(tc.steps):
        if cursor + tc.batch_size > n:  # a new epoch: reshuffle, drop the ragged tail
            perm, cursor, epoch = torch.randperm(n, generator=order_gen), 0, epoch + 1
        idx = perm[cursor : cursor + tc.batch_size]
        cursor += tc.batch_size
        x0, cond = x0_all[idx].float(), cond_all[idx].float()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tc.steps, tc.lr)
        gen = torch.Generator().manual_seed(step_seed(tc.seed, 0, step, 0))
        draws = draw_inputs(x0, dc, gen)
        out = compute_loss(dc, model, None, x0, cond, draws, gen)
        loss_value = float(out["loss"].detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"non-finite flow-matching loss at step {step} (lr {optimizer.param_groups[0]['lr']:.3g}); "
                "lower train.lr or keep train.grad_clip set")
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        grad_norm = clipper(model.parameters())
        optimizer.step()
        if ema is not None:
            ema_update(ema, model, tc.ema)
        window_loss += loss_value
        window_n += 1

        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            now = time.perf_counter()
            its = window_n / max(now - t_window, 1e-9)
            eta = (tc.steps - done) * (now - t_start) / done
            mean_loss = window_loss / window_n
            log(f"[pretrain] step {done}/{tc.steps} loss {mean_loss:.4f} grad {grad_norm:.3g} "
                f"lr {optimizer.param_groups[0]['lr']:.3g} {its:.2f} it/s ({its * tc.batch_size:.1f} assets/s) "
                f"epoch {epoch} ETA {_fmt_time(eta)}")
            if logger is not None:
                logger.log_metrics({"loss": mean_loss, "grad_norm": grad_norm, "it_per_s": its,
                                    "lr": optimizer.param_groups[0]["lr"]}, step=done)
            t_window, window_loss, window_n = now, 0.0, 0
        if snapshot_every and done % snapshot_every == 0 and done < tc.steps:
            export_trellis(_ema_copy(model, ema), Path(out_dir) / "snapshots", f"{name}_{done:06d}", fp16=False)
    train_s, cpu_s = time.perf_counter() - t_start, time.process_time() - cpu_start

    final = _ema_copy(model, ema).eval()
    json_path, st_path = export_trellis(final, out_dir, name, fp16=False)
    log(f"[pretrain] {tc.steps} steps in {_fmt_time(train_s)} ({cpu_s:.0f} s of CPU time); EMA weights -> "
        f"{json_path} (+ .safetensors)")
    summary: dict[str, Any] = {"json": str(json_path), "safetensors": str(st_path), "train_s": train_s, "cpu_s": cpu_s,
                               "final_loss": loss_value, "steps": tc.steps, "params": params}
    if cfg.data.eval_uri:
        summary["eval"] = _eval_teacher(final, cfg, eval_steps, log)
    if logger is not None:
        metrics = {"train_s": train_s, "cpu_s": cpu_s}
        metrics.update({f"eval_{k}": v for k, v in summary.get("eval", {}).items() if isinstance(v, float)})
        logger.log_metrics(metrics, step=tc.steps)
        logger.log_artifact(json_path, "teacher")
        logger.log_artifact(st_path, "teacher")
        from mdt_ray.tracking import end_run

        end_run(logger_uri(cfg), run_id)
        log(f"[pretrain] MLflow run {run_id} in {logger_uri(cfg)}")
    return summary


def _ema_copy(model: torch.nn.Module, ema: Optional[dict[str, torch.Tensor]]) -> torch.nn.Module:
    out = copy.deepcopy(model)
    if ema is not None:
        with torch.no_grad():
            for pname, p in out.named_parameters():
                p.copy_(ema[pname])
    return out


def logger_uri(cfg: Config) -> str:
    from mdt_ray.tracking import resolve_uri

    return resolve_uri(cfg.tracking.resolved_uri())


def _start_tracking(cfg: Config, name: str):
    if not cfg.tracking.enabled:
        return None, None
    from mdt_ray.tracking import RunLogger, start_run

    uri = logger_uri(cfg)
    run_id = start_run(uri, cfg.tracking.experiment, f"pretrain-{name}", cfg.flat(), tags={"kind": "pretrain"})
    return RunLogger(uri, run_id), run_id


def _eval_teacher(model: torch.nn.Module, cfg: Config, steps: int, log) -> dict[str, Any]:
    """The new teacher on held-out conditions with the benchmark's teacher sampler (and without
    guidance, to show what the guidance adds)."""
    from mdt_ray.data.pipeline import load_local
    from mdt_ray.evaluate import TEACHER_SAMPLER, generate, score, synthetic_decoder
    from mdt_ray.data.schema import read_manifest

    held = load_local(cfg.data.eval_uri, stage="ss", limit=cfg.train.eval_assets)
    decode = synthetic_decoder(read_manifest(cfg.data.eval_uri).source)
    cond = torch.as_tensor(held["cond"], dtype=torch.float32)
    result: dict[str, Any] = {"assets": len(held["asset_id"])}
    for label, cfg_strength in (("guided", TEACHER_SAMPLER["cfg_strength"]), ("unguided", 0.0)):
        kw = {**TEACHER_SAMPLER, "steps": steps, "cfg_strength": cfg_strength}
        samples = generate(model, cond, seed=cfg.train.seed, **kw).numpy()
        for key, value in score(samples, held["x0"], decode, shape_metrics=decode is not None).items():
            result[f"{label}_{key}"] = float(value)
    log("[pretrain] held-out eval (" + str(result["assets"]) + f" assets, {steps} steps): "
        + " ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--out", default="mdt_ray/assets", help="folder for <name>.json + <name>.safetensors")
    parser.add_argument("--name", default=None, help="checkpoint name (default: run.name)")
    parser.add_argument("--eval-steps", type=int, default=25, help="sampler steps of the final held-out eval")
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="also export the EMA weights every N steps to <out>/snapshots/ (0: only at the end)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a machine whose cores are "
                             "busy with other work, 1 is faster than 2: idle BLAS threads spin-wait")


def run(args: argparse.Namespace, *, load_config=None, train=None) -> int:
    """The command: stage 1 by default; mdt_ray.pretrain_slat passes its own config loader and loop."""
    load_config, train = load_config or load_pretrain_config, train or pretrain
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.name or cfg.run.name
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        train(cfg, args.out, name, eval_steps=args.eval_steps, snapshot_every=args.snapshot_every,
              log=lambda m: print(m, flush=True))
    except (FileNotFoundError, ValueError, FloatingPointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pretrain_teacher", description="flow-matching pre-training of the "
                                     "small stage-1 benchmark teacher")
    add_arguments(parser)
    return run(parser.parse_args(argv))
