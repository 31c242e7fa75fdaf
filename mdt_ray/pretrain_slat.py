"""Flow-matching pre-training of a small stage-2 (SLAT) teacher on the synthetic corpus.

The recipe of mdt_ray.pretrain (TRELLIS's: plain conditional flow matching, logit-normal times,
CFG dropout, AdamW, linear warm-up then cosine decay, gradient clipping, EMA weights exported),
on sparse batches: each step draws assets, and their stored voxels with their normalised
features (`load_local(stage="slat")`) form one SparseBatch, so the network learns to fill the
features of given voxels, which is all stage 2 does in TRELLIS.

    python -m mdt_ray.pretrain_slat --threads 1 --out runs/slat-teacher --name teacher_slat_tiny

`--config` / `--set` change any setting of SLAT_PRETRAIN_DEFAULTS.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from mdt_ray.config import Config, ConfigError, apply_overrides, from_dict
from mdt_ray.pretrain import PRETRAIN_DEFAULTS, _ema_copy, _fmt_time, _merge, _start_tracking, add_arguments, lr_at
from mdt_ray.pretrain import run as pretrain_run

# The stage-1 recipe with the stage-2 model. slat-tiny (0.46M parameters) is the size a 2-core
# CPU trains in minutes; batch 8 holds ~4,000 voxels.
SLAT_PRETRAIN_DEFAULTS: dict[str, Any] = _merge(PRETRAIN_DEFAULTS, {
    "model": {"teacher": "slat-tiny", "stage": "slat"},
    "train": {"steps": 600, "batch_size": 8, "eval_assets": 32},
    "run": {"name": "teacher_slat_tiny"},
})


def load_slat_pretrain_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """SLAT_PRETRAIN_DEFAULTS, the YAML file on top (block by block), then `--set` overrides."""
    import yaml

    tree = copy.deepcopy(SLAT_PRETRAIN_DEFAULTS)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        tree = _merge(tree, yaml.safe_load(p.read_text()) or {})
    if overrides:
        tree = apply_overrides(tree, overrides)
    cfg = from_dict(tree, "stage-2 pretrain defaults")
    if cfg.distill.method != "fm":
        raise ConfigError(f"distill.method: pre-training is plain flow matching ('fm'), got {cfg.distill.method!r}")
    if cfg.model.stage != "slat":
        raise ConfigError(f"model.stage: this pre-trains a stage-2 ('slat') model, got {cfg.model.stage!r}")
    return cfg


def fresh_slat_model(name: str, resolution: int) -> torch.nn.Module:
    """A named size built for the corpus's voxel grid, or a TRELLIS json to continue from."""
    from mdt_ray.models import NAMED_CONFIGS, build_model, load_trellis
    from mdt_ray.models.slat_flow import SLatFlowModel

    model = build_model(name, resolution=resolution) if name in NAMED_CONFIGS else load_trellis(name)
    if not isinstance(model, SLatFlowModel):
        raise ConfigError(f"model.teacher {name!r} is a {type(model).__name__}, not a stage-2 SLatFlowModel")
    return model.float()


def load_slat_split(uri: str, limit: Optional[int] = None) -> dict[str, Any]:
    """{"x0": SparseBank, "cond": (N, T, C) float32 tensor, "resolution": voxel grid size}."""
    from mdt_ray.data.pipeline import load_local
    from mdt_ray.data.schema import read_manifest
    from mdt_ray.evaluate_slat import SparseBank

    data = load_local(uri, stage="slat", limit=limit)
    return {"x0": SparseBank(data["slat_coords"], data["slat_feats"]),
            "cond": torch.from_numpy(data["cond"]).float(), "resolution": read_manifest(uri).slat_resolution}


def batch_indices(n: int, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(asset indices, epoch) per step: a fresh permutation each epoch, ragged tail dropped."""
    order = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=order)
        for start in range(0, n - batch + 1, batch):
            yield perm[start : start + batch], epoch
        epoch += 1


def pretrain_slat(cfg: Config, out_dir: str, name: str, *, eval_steps: int = 25, snapshot_every: int = 0,
                  limit: Optional[int] = None, log=print) -> dict[str, Any]:
    """Train on (the first `limit` assets of) data.uri, export the EMA weights as
    `<out_dir>/<name>.{json,safetensors}`, return a summary (paths, final loss, wall time, and the
    held-out eval when data.eval_uri is set)."""
    from mdt_ray.models import export_trellis
    from mdt_ray.objectives import compute_loss, draw_inputs
    from mdt_ray.train.loop import step_seed
    from mdt_ray.train.optim import GradClipper, ema_init, ema_update

    tc, dc = cfg.train, cfg.distill
    train = load_slat_split(cfg.data.uri, limit)
    n = len(train["x0"])
    if n < tc.batch_size:
        raise ValueError(f"data.uri {cfg.data.uri!r} holds {n} assets, fewer than train.batch_size={tc.batch_size}")
    torch.manual_seed(tc.seed)
    model = fresh_slat_model(cfg.model.teacher, train["resolution"]).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    clipper = GradClipper(tc.grad_clip, tc.grad_clip_percentile, tc.grad_clip_window)
    ema = ema_init(model) if tc.ema > 0 else None
    log(f"[pretrain-slat] {cfg.model.teacher}: {params / 1e6:.2f}M parameters on {n} assets of {cfg.data.uri}; "
        f"{tc.steps} steps × batch {tc.batch_size}, lr {tc.lr:g}, EMA {tc.ema}, p_uncond {dc.p_uncond}")
    logger, run_id = _start_tracking(cfg, name)
    batches = batch_indices(n, tc.batch_size, tc.seed)
    t_start, window, loss_value = time.perf_counter(), [], float("nan")
    for step in range(tc.steps):
        idx, epoch = next(batches)
        x0, cond = train["x0"][idx], train["cond"][idx]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tc.steps, tc.lr)
        gen = torch.Generator().manual_seed(step_seed(tc.seed, 0, step, 0))
        loss = compute_loss(dc, model, None, x0, cond, draw_inputs(x0, dc, gen), gen)["loss"]
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite flow-matching loss at step {step}; lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clipper(model.parameters())
        optimizer.step()
        if ema is not None:
            ema_update(ema, model, tc.ema)
        window.append(loss_value)
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            elapsed = time.perf_counter() - t_start
            log(f"[pretrain-slat] step {done}/{tc.steps} loss {sum(window) / len(window):.4f} grad {grad_norm:.3g} "
                f"lr {optimizer.param_groups[0]['lr']:.3g} epoch {epoch} "
                f"ETA {_fmt_time((tc.steps - done) * elapsed / done)}")
            if logger is not None:
                logger.log_metrics({"loss": sum(window) / len(window), "grad_norm": grad_norm}, step=done)
            window = []
        if snapshot_every and done % snapshot_every == 0 and done < tc.steps:
            export_trellis(_ema_copy(model, ema), Path(out_dir) / "snapshots", f"{name}_{done:06d}", fp16=False)
    train_s = time.perf_counter() - t_start

    final = _ema_copy(model, ema).eval().requires_grad_(False)
    json_path, st_path = export_trellis(final, out_dir, name, fp16=False)
    log(f"[pretrain-slat] {tc.steps} steps in {_fmt_time(train_s)}; EMA weights -> {json_path}")
    summary: dict[str, Any] = {"json": str(json_path), "safetensors": str(st_path), "train_s": train_s,
                               "final_loss": loss_value, "steps": tc.steps, "params": params}
    if cfg.data.eval_uri:
        summary["eval"] = eval_slat_teacher(final, cfg.data.eval_uri, cfg.train.eval_assets, eval_steps,
                                            cfg.train.seed, log)
    if logger is not None:
        logger.log_metrics({"train_s": train_s, **{f"eval_{k}": v for k, v in summary.get("eval", {}).items()}},
                           step=tc.steps)
        logger.log_artifact(json_path, "teacher")
        logger.log_artifact(st_path, "teacher")
        from mdt_ray.pretrain import logger_uri
        from mdt_ray.tracking import end_run

        end_run(logger_uri(cfg), run_id)
    return summary


def eval_slat_teacher(model: torch.nn.Module, uri: str, assets: int, steps: int, seed: int, log) -> dict[str, float]:
    """feat_mse and FD on held-out voxels with the stage-2 teacher sampler, guided and unguided
    (to show what the guidance adds)."""
    from mdt_ray.data.pipeline import load_local
    from mdt_ray.evaluate_slat import SLAT_TEACHER_SAMPLER, generate_slat, held_noise, score_slat

    held = load_local(uri, stage="slat", limit=assets)
    noise, reference = held_noise(held, seed), np.concatenate(held["slat_feats"])
    result: dict[str, float] = {}
    for label, w in (("guided", SLAT_TEACHER_SAMPLER["cfg_strength"]), ("unguided", 0.0)):
        sampler = {**SLAT_TEACHER_SAMPLER, "cfg_strength": w}
        gen = generate_slat(model, held, noise, steps=steps, sampler=sampler)
        result.update({f"{label}_{k}": v for k, v in score_slat(gen, reference).items()})
    log(f"[pretrain-slat] held-out eval ({len(noise)} assets, {steps} steps): "
        + " ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return result


def run(args: argparse.Namespace) -> int:
    return pretrain_run(args, load_config=load_slat_pretrain_config, train=pretrain_slat)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pretrain_slat", description="flow-matching pre-training of a small "
                                     "stage-2 (SLAT) teacher")
    add_arguments(parser)
    parser.set_defaults(out="runs/slat-teacher")  # the packaged assets are stage-1 only
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
