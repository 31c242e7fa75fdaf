"""Flow-matching pre-training of the small teachers that the CPU benchmarks distil (both stages).

TRELLIS's own teachers are trained with plain conditional flow matching: logit-normal times,
the image condition replaced by the zero ("negative") condition for a fraction of the samples so
that the same network also learns the unconditional velocity that classifier-free guidance needs.
This module does the same on the synthetic corpus with the optimizer step of mdt_ray.engine
(objective `fm`, AdamW, gradient clipping, EMA), a linear warm-up followed by a cosine decay of
the learning rate, and exports the EMA weights. The stage (`model.stage`) decides the batches:
dense latents for stage 1 (`ss-demo`), for stage 2 (`slat-tiny`) each asset's stored voxels with
their normalised features, so the network learns to fill the features of given voxels, which is
all stage 2 does in TRELLIS.

It is a single-process loop: on a 2-core CPU one process with both cores' BLAS threads is faster
than Ray workers splitting the cores, and there is no teacher to colocate.

Reproduce the committed stage-1 teacher (`mdt_ray/assets/teacher_ss_demo.{json,safetensors}`, the
EMA weights after 1500 steps of batch 16 with every setting in PRETRAIN_DEFAULTS):

    mdt-ray corpus build --kind synthetic --num-assets 8192 --seed 0 --out data/teacher-corpus
    mdt-ray corpus build --kind synthetic --num-assets 512 --seed 1 --out data/bench-eval
    python jobs/pretrain_teacher.py --threads 1 --out mdt_ray/assets --name teacher_ss_demo

`--threads 1`: on cores busy with other jobs a second BLAS thread only spin-waits; the result does
not depend on it beyond float summation order. docs/benchmark.md has the run time and the
held-out eval. The held-out corpus (seed 1) is never trained on. A stage-2 teacher:

    mdt-ray pretrain-slat-teacher --threads 1 --out runs/slat-teacher --name teacher_slat_tiny

`--config` / `--set` change any setting that pre-training reads (READ_KEYS); setting any other
key is refused, since it would have no effect.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from mdt_ray.config import Config, ConfigError, from_dict, load_config, merge

# The settings of the committed stage-1 teacher. `distill.*` holds the flow-matching knobs (method
# `fm`, CFG dropout p_uncond 0.1 as in TRELLIS's image-conditioned training, logit-normal(1, 1) times).
PRETRAIN_DEFAULTS: dict[str, Any] = {
    "model": {"teacher": "ss-demo", "stage": "ss"},
    "distill": {"method": "fm", "p_uncond": 0.1, "t_schedule": "logit_normal", "t_mean": 1.0, "t_std": 1.0},
    "train": {
        "steps": 1500, "batch_size": 16, "lr": 1.0e-3, "weight_decay": 0.01, "betas": [0.9, 0.99],
        "ema": 0.995, "grad_clip": 1.0, "log_every": 25, "eval_assets": 64, "seed": 0,
        # The committed teachers were trained before the EMA warm-up existed; off, their recipes
        # still reproduce them bit for bit (from scratch, 0.995^1500 leaves nothing to warm up).
        "ema_warmup": False,
    },
    "data": {"uri": "data/teacher-corpus", "eval_uri": "data/bench-eval"},
    "tracking": {"experiment": "mdt-ray-pretrain"},
    "run": {"name": "teacher_ss_demo"},
}
# The stage-1 recipe with the stage-2 model, at the size (slat-tiny) and batch that a 2-core CPU
# trains in minutes.
SLAT_PRETRAIN_DEFAULTS: dict[str, Any] = merge(PRETRAIN_DEFAULTS, {
    "model": {"teacher": "slat-tiny", "stage": "slat"},
    "train": {"steps": 600, "batch_size": 8, "eval_assets": 32},
    "run": {"name": "teacher_slat_tiny"},
})
DEFAULTS = {"ss": PRETRAIN_DEFAULTS, "slat": SLAT_PRETRAIN_DEFAULTS}

# The config keys pre-training reads; a block name stands for all its keys. The objective `fm`
# reads only the time distribution and the CFG dropout of `distill`, and there is no Ray run
# (`scale`), no checkpoint or in-training eval, and no device but the CPU (`mixed_precision`).
READ_KEYS = frozenset({
    "model.teacher", "model.stage",
    "distill.method", "distill.p_uncond", "distill.t_schedule", "distill.t_mean", "distill.t_std", "distill.sigma_min",
    "train.steps", "train.batch_size", "train.batch_split", "train.lr", "train.weight_decay", "train.betas",
    "train.ema", "train.ema_warmup", "train.grad_clip", "train.grad_clip_percentile", "train.grad_clip_window",
    "train.log_every",
    "train.eval_assets", "train.seed",
    "data.uri", "data.eval_uri", "data.storage_endpoint", "data.storage_region",
    "tracking", "run.name",
})

# Fraction of the steps spent warming the learning rate up linearly from 0 (a fresh transformer
# with a 1e-3 step size diverges without it); the rest decays it along a cosine to FINAL_LR_FRAC.
WARMUP_FRAC = 0.05
FINAL_LR_FRAC = 0.05


def load_pretrain_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, *,
                         stage: str = "ss") -> Config:
    """The stage's defaults (PRETRAIN_DEFAULTS or SLAT_PRETRAIN_DEFAULTS), then the YAML file on
    top (block by block), then `--set` overrides; refuses what pre-training cannot do."""
    if stage not in DEFAULTS:
        raise ConfigError(f"model.stage: pre-training knows stages {sorted(DEFAULTS)}, got {stage!r}")
    cfg = load_config(path, overrides, defaults=DEFAULTS[stage], defaults_name=f"stage-{stage} pretrain defaults")
    if cfg.distill.method != "fm":
        raise ConfigError(f"distill.method: pre-training is plain flow matching ('fm'), got {cfg.distill.method!r}")
    if cfg.model.stage != stage:
        raise ConfigError(f"model.stage: these are the stage-{stage!r} pre-training defaults, got "
                          f"{cfg.model.stage!r} (pre-train stage {cfg.model.stage!r} with its own command, "
                          f"`--stage {cfg.model.stage}`)")
    _refuse_unread(cfg, from_dict(DEFAULTS[stage]))
    return cfg


def _refuse_unread(cfg: Config, defaults: Config) -> None:
    base = defaults.flat()
    for key, value in cfg.flat().items():
        if key not in READ_KEYS and key.split(".")[0] not in READ_KEYS and value != base[key]:
            raise ConfigError(f"{key}: pre-training does not read this key (it would have no effect); "
                              f"leave it at {base[key]!r}")


def lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up over WARMUP_FRAC of the run, then a cosine from `base` to FINAL_LR_FRAC·base."""
    warm = max(1, int(round(WARMUP_FRAC * total)))
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return base * (FINAL_LR_FRAC + (1 - FINAL_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# The data order and the steps (also what the benchmarks' in-process loops run)


def epoch_batches(n: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches of asset indices: a permutation of the `n` assets drawn from
    `generator`, cut into full batches (the ragged tail is dropped)."""
    perm = torch.randperm(n, generator=generator)
    return [perm[start : start + batch] for start in range(0, n - batch + 1, batch)]


def batch_order(n: int, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(asset indices, epoch) per step, epoch after epoch, from one generator seeded by `seed`."""
    if n < batch:
        raise ValueError(f"{n} assets hold no full batch of {batch}")
    order, epoch = torch.Generator().manual_seed(seed), 0
    while True:
        for idx in epoch_batches(n, batch, order):
            yield idx, epoch
        epoch += 1


def train_steps(engine, split, *, device: torch.device | str = "cpu") -> Iterator[tuple[int, int, float, float]]:
    """`engine.train.steps` optimizer steps on `split` in `batch_order` (batch size and seed from
    `engine.train`); yields (step, epoch, loss, grad norm) after each update."""
    tc = engine.train
    order = batch_order(len(split), tc.batch_size, tc.seed)
    for step in range(tc.steps):
        idx, epoch = next(order)
        measured, grad_norm = engine.step(split.batch(idx, device), step)
        yield step, epoch, measured.terms["loss"], grad_norm


# ---------------------------------------------------------------------------------------------
# Pre-training


def pretrain(cfg: Config, out_dir: str, name: str, *, eval_steps: int = 25, snapshot_every: int = 0,
             limit: Optional[int] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train on (the first `limit` assets of) data.uri, export the EMA weights as
    `<out_dir>/<name>.{json,safetensors}`, return a summary (paths, final loss, wall and CPU time,
    parameters, and the held-out eval of the teacher when data.eval_uri is set).

    `snapshot_every` > 0 also exports the EMA weights every that many steps to
    `<out_dir>/snapshots/<name>_<step>`, so a long run can be evaluated while it continues."""
    from mdt_ray.engine import Engine
    from mdt_ray.models import export_trellis
    from mdt_ray.stages import get_stage

    from mdt_ray.data.schema import read_manifest
    from mdt_ray.data.storage import StorageTarget
    from mdt_ray.train.launch import naming

    tc, stage = cfg.train, get_stage(cfg.model.stage)
    if cfg.data.eval_uri:  # read at the end, checked now: a typo must not cost the whole training
        with naming("data.eval_uri"):
            read_manifest(StorageTarget.from_data_config(cfg.data, cfg.data.eval_uri))
    with naming("data.uri"):
        split = _load_training_data(cfg, stage, limit, log)
    torch.manual_seed(tc.seed)
    model = _fresh_model(cfg, stage, split.manifest).train()
    engine = Engine(model, None, stage=stage, distill=cfg.distill, train=tc, keep_ema=True,
                    lr_at=lambda s: lr_at(s, tc.steps, tc.lr))
    params = sum(p.numel() for p in model.parameters())
    log(f"[pretrain] {cfg.model.teacher} (stage {stage.name}): {params / 1e6:.2f}M parameters; {tc.steps} steps × "
        f"batch {tc.batch_size}, lr {tc.lr:g} (warm-up {WARMUP_FRAC:.0%}, cosine), EMA {tc.ema}, "
        f"p_uncond {cfg.distill.p_uncond}, t ~ {cfg.distill.t_schedule}({cfg.distill.t_mean}, {cfg.distill.t_std})")
    tracker = _Tracker.start(cfg, name)
    progress = _Progress(tc.steps, tc.batch_size, log, tracker)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    loss = float("nan")
    try:
        for step, epoch, loss, grad_norm in train_steps(engine, split):
            done = step + 1
            progress.add(loss)
            if done % tc.log_every == 0 or done == tc.steps:
                progress.report(done, grad_norm, engine.lr, epoch)
            if snapshot_every and done % snapshot_every == 0 and done < tc.steps:
                export_trellis(engine.averaged_model(), Path(out_dir) / "snapshots", f"{name}_{done:06d}", fp16=False)
    except FloatingPointError as e:
        raise FloatingPointError(f"{e}; lower train.lr or keep train.grad_clip set") from None
    train_s, cpu_s = time.perf_counter() - t_start, time.process_time() - cpu_start

    final = engine.averaged_model().eval().requires_grad_(False)
    json_path, st_path = export_trellis(final, out_dir, name, fp16=False)
    log(f"[pretrain] {tc.steps} steps in {_fmt_time(train_s)} ({cpu_s:.0f} s of CPU time); EMA weights -> "
        f"{json_path} (+ .safetensors)")
    summary: dict[str, Any] = {"json": str(json_path), "safetensors": str(st_path), "train_s": train_s, "cpu_s": cpu_s,
                               "final_loss": loss, "steps": tc.steps, "params": params}
    if cfg.data.eval_uri:
        summary["eval"] = _eval_teacher(final, stage, cfg, eval_steps, log)
    tracker.finish(summary, (json_path, st_path), log)
    return summary


def _load_training_data(cfg: Config, stage, limit: Optional[int], log):
    from mdt_ray.data.storage import StorageTarget

    t_load = time.perf_counter()
    split = stage.load(StorageTarget.from_data_config(cfg.data, cfg.data.uri), limit=limit)
    if len(split) < cfg.train.batch_size:
        raise ValueError(f"data.uri {cfg.data.uri!r} holds {len(split)} assets, fewer than "
                         f"train.batch_size={cfg.train.batch_size}")
    log(f"[pretrain] {len(split)} assets from {cfg.data.uri} in {time.perf_counter() - t_load:.1f}s")
    return split


def _fresh_model(cfg: Config, stage, manifest) -> torch.nn.Module:
    """A named size built for the corpus, or a TRELLIS json to continue from (fine-tuning)."""
    from mdt_ray.models import NAMED_CONFIGS, load_trellis
    from mdt_ray.models.teachers import from_root
    from mdt_ray.stages import stage_of_model

    name = cfg.model.teacher
    model = stage.build_named(name, manifest) if name in NAMED_CONFIGS else load_trellis(from_root(name))
    if stage_of_model(model) is not stage:
        raise ConfigError(f"model.teacher {name!r} is a {type(model).__name__}, not a model of model.stage "
                          f"{stage.name!r} ({', '.join(stage.model_classes)})")
    problems = stage.fit_problems(model.config_args, manifest)
    if problems:
        raise ConfigError(f"model.teacher {name!r} does not fit data.uri {cfg.data.uri!r}: " + "; ".join(problems))
    return model.float()


def _eval_teacher(model: torch.nn.Module, stage, cfg: Config, steps: int, log) -> dict[str, Any]:
    """The new teacher on held-out conditions with the stage's teacher sampler, and without
    guidance (to show what the guidance adds)."""
    from mdt_ray.data.storage import StorageTarget

    from mdt_ray.train.launch import naming

    with naming("data.eval_uri"):
        held = stage.load(StorageTarget.from_data_config(cfg.data, cfg.data.eval_uri), limit=cfg.train.eval_assets)
    noise = stage.noise(held, cfg.train.seed)
    result: dict[str, Any] = {"assets": len(held)}
    for label, strength in (("guided", stage.teacher_sampler["cfg_strength"]), ("unguided", 0.0)):
        sampler = {**stage.teacher_sampler, "cfg_strength": strength}
        samples = stage.generate(model, held, noise, steps=steps, sampler=sampler)
        result.update({f"{label}_{k}": float(v) for k, v in stage.score(samples, held, full=True).items()})
    log(f"[pretrain] held-out eval ({len(held)} assets, {steps} steps): "
        + " ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))
    return result


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Progress:
    """The mean loss and the speed over the steps since the last progress line."""

    def __init__(self, steps: int, batch: int, log, tracker: "_Tracker"):
        self.steps, self.batch, self.log, self.tracker = steps, batch, log, tracker
        self.t_start = self.t_window = time.perf_counter()
        self.losses: list[float] = []

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def report(self, done: int, grad_norm: float, lr: float, epoch: int) -> None:
        now = time.perf_counter()
        its = len(self.losses) / max(now - self.t_window, 1e-9)
        mean_loss = sum(self.losses) / len(self.losses)
        eta = (self.steps - done) * (now - self.t_start) / done
        self.log(f"[pretrain] step {done}/{self.steps} loss {mean_loss:.4f} grad {grad_norm:.3g} lr {lr:.3g} "
                 f"{its:.2f} it/s ({its * self.batch:.1f} assets/s) epoch {epoch} ETA {_fmt_time(eta)}")
        self.tracker.metrics({"loss": mean_loss, "grad_norm": grad_norm, "it_per_s": its, "lr": lr}, done)
        self.t_window, self.losses = now, []


@dataclasses.dataclass
class _Tracker:
    """The run's MLflow run when tracking is enabled; every method is a no-op otherwise."""

    uri: Optional[str] = None
    run_id: Optional[str] = None
    logger: Any = None
    steps: int = 0

    @classmethod
    def start(cls, cfg: Config, name: str) -> "_Tracker":
        if not cfg.tracking.enabled:
            return cls()
        from mdt_ray.tracking import RunLogger, resolve_uri, start_run

        uri = resolve_uri(cfg.tracking.resolved_uri())
        run_id = start_run(uri, cfg.tracking.experiment, f"pretrain-{name}", cfg.flat(), tags={"kind": "pretrain"})
        return cls(uri, run_id, RunLogger(uri, run_id), cfg.train.steps)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.logger is not None:
            self.logger.log_metrics(values, step=step)

    def finish(self, summary: dict[str, Any], files: tuple[Path, ...], log) -> None:
        if self.logger is None:
            return
        from mdt_ray.tracking import end_run

        values = {"train_s": summary["train_s"], "cpu_s": summary["cpu_s"]}
        values.update({f"eval_{k}": v for k, v in summary.get("eval", {}).items() if isinstance(v, float)})
        self.logger.log_metrics(values, step=self.steps)
        for path in files:
            self.logger.log_artifact(path, "teacher")
        end_run(self.uri, self.run_id)
        log(f"[pretrain] MLflow run {self.run_id} in {self.uri}")
