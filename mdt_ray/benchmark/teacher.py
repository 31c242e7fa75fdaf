"""The learned teacher: a TRELLIS SparseStructureFlowModel trained to regress the exact velocity.

Flow matching on samples regresses (1 − σ_min)·ε − x0, whose conditional mean is the velocity
field; here the target is that mean itself (mdt_ray.benchmark.exact), so the loss has no target
noise and the network converges in a fraction of the steps. The condition is replaced by the zero
(negative) condition for `p_uncond` of the samples, and then the target is the *unconditional*
exact velocity, so the network learns what classifier-free guidance needs as TRELLIS teachers do.

The optimizer step is mdt_ray.engine's (AdamW, clipping, EMA) with pre-training's warm-up + cosine
schedule and data order (mdt_ray.pretrain); the objective is registered as `exact` in
mdt_ray.objectives.METHODS by this module. Reproduce the committed teacher with the command in
docs/benchmark.md (`python benchmarks/methods.py teacher`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from mdt_ray import objectives
from mdt_ray.flow import batch_size, diffuse

# Patch size 2 (512 tokens of 8·2³ = 64 values) and width 96: the network has to pass the noise
# through (v* ≈ ε − x0 at small t, (1 − σ_min)·x − μ̄ at t = 1), which a token narrower than its
# patch cannot do; patch 4 at width 96 keeps only 96 of 512 directions and never samples a shape.
TEACHER_CONFIG: dict[str, Any] = {"name": "SparseStructureFlowModel", "args": {
    "resolution": 16, "in_channels": 8, "out_channels": 8, "model_channels": 96, "cond_channels": 64,
    "num_blocks": 2, "num_heads": 4, "mlp_ratio": 4, "patch_size": 2, "pe_mode": "ape", "qk_rms_norm": True,
    "use_fp16": False,
}}
TEACHER_NAME = "teacher_ss_multimodal"


@dataclass
class ExactRegression:
    """The `distill` settings the Engine hands the `exact` objective (draw_inputs reads the times)."""

    method: str = "exact"
    t_schedule: str = "logit_normal"
    t_mean: float = 0.0
    t_std: float = 1.2
    sigma_min: float = 1e-5
    dt: float = 0.0
    derivative: str = "discrete"
    p_uncond: float = 0.1
    p_mix: float = 0.0  # the share of samples moved off the data toward another mode (see exact_regression_loss)
    # States of the network's own sampler added to every batch (OwnTrajectories); None: data only.
    own: Optional["OwnTrajectories"] = field(default=None, repr=False, compare=False)

    def settings(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "own"}
        if self.own is not None:
            out["own"] = self.own.settings()
        return out


class OwnTrajectories:
    """States the network's own sampler visits, to train it there.

    A network fitted on x_t = diffuse(x0, ε, t) alone is accurate on the data's noisy path but
    not where its own sampler goes once it has drifted a little: there the exact field pulls
    hard back to a mode, and the network, never shown those points, keeps the drift (the
    diagnosis in docs/benchmark.md measured it). Every `every` draws this rolls out `rollouts` fresh
    `steps`-step trajectories of the current network (TRELLIS's grid, no guidance: the sampler
    the benchmark scores) and keeps all their states; each draw returns `per_step` of them.
    The exact target is known at any point, so these need no data."""

    def __init__(self, per_step: int, *, every: int = 50, rollouts: int = 16, steps: int = 25, rescale_t: float = 3.0):
        if per_step < 1 or every < 1 or rollouts < 1:
            raise ValueError(f"OwnTrajectories: per_step {per_step}, every {every} and rollouts {rollouts} must be >= 1")
        self.per_step, self.every, self.rollouts, self.steps, self.rescale_t = per_step, every, rollouts, steps, rescale_t
        self.draws = 0
        self.x = self.t = self.cond = None

    def settings(self) -> dict[str, Any]:
        return {"per_step": self.per_step, "every": self.every, "rollouts": self.rollouts, "steps": self.steps,
                "rescale_t": self.rescale_t}

    def rollout(self, model: torch.nn.Module, exact: torch.nn.Module, generator: torch.Generator) -> None:
        from mdt_ray.flow import time_grid

        tokens = exact.cond_tokens
        cond = tokens[torch.randint(tokens.shape[0], (self.rollouts,), generator=generator, device=tokens.device)]
        x = torch.randn((self.rollouts, *exact.means.shape[1:]), generator=generator, device=tokens.device)
        xs, ts = [], []
        grid = time_grid(self.steps, self.rescale_t)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for t_cur, t_next in zip(grid[:-1], grid[1:]):
                t = torch.full((self.rollouts,), float(t_cur), device=x.device)
                xs.append(x)
                ts.append(t)
                x = x - (t_cur - t_next) * model(x, 1000 * t, cond)
        model.train(was_training)
        self.x, self.t, self.cond = torch.cat(xs), torch.cat(ts), cond.repeat(len(xs), 1, 1)

    def draw(self, model: torch.nn.Module, exact: torch.nn.Module,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.draws % self.every == 0:
            self.rollout(model, exact, generator)
        self.draws += 1
        idx = torch.randint(self.x.shape[0], (self.per_step,), generator=generator, device=self.x.device)
        return self.x[idx], self.t[idx], self.cond[idx]


def exact_regression_loss(model: torch.nn.Module, exact: torch.nn.Module, x0: torch.Tensor, cond: torch.Tensor, *,
                          noise: torch.Tensor, t: torch.Tensor, drop: Optional[torch.Tensor] = None,
                          partner: Optional[torch.Tensor] = None, mix: Optional[torch.Tensor] = None,
                          own: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                          sigma_min: float = 1e-5) -> dict[str, Any]:
    """mean‖f(x_t, t, c) − v*(x_t, t, c)‖² at x_t = diffuse(x0 + mix·(partner − x0), noise, t);
    `drop` (B,) bool gives those samples the zero condition and the unconditional target;
    `own` = (x_t, t, cond) are further points (OwnTrajectories) appended to the batch as they are.

    The exact field is known everywhere, not only near the data, so the network can be taught
    where its own sampler goes: a sampler whose estimate is a blend of two modes (a blurred shape)
    lands between them, where a network trained on data + noise alone has never been and keeps
    the blur. `partner` (B, *S) and `mix` (B,) in [0, 0.5) put x_t there; the target is still v*."""
    if drop is not None:
        cond = torch.where(drop.reshape(-1, 1, 1), torch.zeros_like(cond), cond)
    if partner is not None and mix is not None:
        x0 = x0 + mix.reshape(-1, *([1] * (x0.dim() - 1))) * (partner - x0)
    x_t = diffuse(x0, noise, t, sigma_min)
    if own is not None:
        x_t, t, cond = (torch.cat([a, b.to(a.dtype)]) for a, b in zip((x_t, t, cond), own))
    with torch.no_grad():
        target = exact(x_t, 1000 * t, cond)
    pred = model(x_t, 1000 * t, cond)
    loss = (pred - target).pow(2).mean()
    return {"loss": loss, "loss_exact": loss.detach(), "batch": batch_size(x_t)}


def _exact_objective(distill, student, teacher, x0, cond, neg_cond, draws, generator):
    drop = None
    if distill.p_uncond > 0:
        drop = torch.rand(batch_size(x0), generator=generator, device=x0.device) < distill.p_uncond
    partner = mix = None
    if distill.p_mix > 0:
        # A mode of the sample's own condition (drawn by its weight), so the blend stays on the
        # condition's side; mix < 0.5 keeps the sample's own mode the nearer one.
        weights = teacher.weight_table[teacher.condition_index(cond)]
        partner = teacher.means[torch.multinomial(weights, 1, generator=generator).squeeze(1)].to(x0.dtype)
        n = batch_size(x0)
        moved = torch.rand(n, generator=generator, device=x0.device) < distill.p_mix
        mix = 0.5 * torch.rand(n, generator=generator, device=x0.device) * moved
    own = distill.own.draw(student, teacher, generator) if distill.own is not None else None
    return exact_regression_loss(student, teacher, x0, cond, noise=draws["noise"], t=draws["t"], drop=drop,
                                 partner=partner, mix=mix, own=own, sigma_min=distill.sigma_min)


objectives.METHODS.setdefault("exact", _exact_objective)


@dataclass
class TeacherRecipe:
    steps: int = 600
    batch_size: int = 16
    lr: float = 1.5e-3
    weight_decay: float = 0.0
    # 0.99: a 0.999 average still holds 0.999^600 ≈ 55 % of the initial weights after 600 steps.
    ema: float = 0.99
    grad_clip: float = 1.0
    seed: int = 0
    # Training times ~ logit-normal(t_mean, t_std): the modes separate at t ≈ 0.95 (see
    # docs/benchmark.md), so the network must see many high-t samples.
    t_mean: float = 0.0
    t_std: float = 1.2
    p_mix: float = 0.0  # ExactRegression.p_mix
    own_per_step: int = 0  # > 0: that many states of the network's own sampler in every batch (OwnTrajectories)
    own_every: int = 50

    def check(self, where: str = "teacher recipe") -> None:
        """ValueError naming the first setting that cannot train."""
        for key in ("steps", "batch_size", "own_every"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{where}: {key} must be an integer >= 1, got {getattr(self, key)!r}")
        if not self.lr > 0:
            raise ValueError(f"{where}: lr must be > 0, got {self.lr!r}")
        if not self.t_std > 0:
            raise ValueError(f"{where}: t_std must be > 0, got {self.t_std!r}")
        if not 0 <= self.p_mix <= 1:
            raise ValueError(f"{where}: p_mix must be in [0, 1], got {self.p_mix!r}")
        if not isinstance(self.own_per_step, int) or self.own_per_step < 0:
            raise ValueError(f"{where}: own_per_step must be an integer >= 0 (0: data only), got {self.own_per_step!r}")


def _train_config(r: TeacherRecipe):
    from mdt_ray.config import TrainConfig

    return TrainConfig(steps=r.steps, batch_size=r.batch_size, lr=r.lr, weight_decay=r.weight_decay, betas=(0.9, 0.99),
                       ema=r.ema, ema_warmup=False, grad_clip=r.grad_clip, seed=r.seed, mixed_precision="fp32")


def pretrain_teacher(train_uri: str, out_dir: str | Path, *, name: str = TEACHER_NAME,
                     recipe: Optional[TeacherRecipe] = None, config: Optional[dict[str, Any]] = None,
                     log: Callable[[str], None] = print, log_every: int = 100, snapshot_every: int = 0,
                     on_log: Optional[Callable[[int, dict[str, float]], None]] = None,
                     init: Optional[str] = None) -> dict[str, Any]:
    """Train (from scratch, or continue from the TRELLIS json `init`) on the corpus at `train_uri`, export the EMA weights to `<out_dir>/<name>.{json,safetensors}`
    and a `<name>.train.json` with the recipe, timings and loss curve; returns that summary."""
    from mdt_ray.benchmark.corpus import distribution
    from mdt_ray.data.storage import StorageTarget
    from mdt_ray.engine import Engine
    from mdt_ray.models import build_model, export_trellis
    from mdt_ray.pretrain import lr_at, train_steps
    from mdt_ray.stages import get_stage

    recipe = recipe or TeacherRecipe()
    recipe.check()
    stage = get_stage("ss")
    split = stage.load(StorageTarget(train_uri))
    torch.manual_seed(recipe.seed)
    if init is not None:
        from mdt_ray.models import load_trellis

        model = load_trellis(init).float().train().requires_grad_(True)
    else:
        model = build_model(config or TEACHER_CONFIG).float().train()
    exact = distribution().exact_teacher()
    tc = _train_config(recipe)
    own = OwnTrajectories(recipe.own_per_step, every=recipe.own_every) if recipe.own_per_step > 0 else None
    objective = ExactRegression(t_mean=recipe.t_mean, t_std=recipe.t_std, p_mix=recipe.p_mix, own=own)
    engine = Engine(model, exact, stage=stage, distill=objective, train=tc, keep_ema=True,
                    lr_at=lambda s: lr_at(s, tc.steps, tc.lr))
    params = sum(p.numel() for p in model.parameters())
    log(f"[teacher] {params / 1e6:.2f}M parameters, {recipe.steps} steps × batch {recipe.batch_size} on "
        f"{len(split)} assets of {train_uri}")
    curve, window, t0, cpu0 = [], [], time.perf_counter(), time.process_time()
    for step, _epoch, loss, grad_norm in train_steps(engine, split):
        window.append(loss)
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            mean = sum(window) / len(window)
            curve.append([step + 1, mean])
            elapsed = time.perf_counter() - t0
            log(f"[teacher] step {step + 1}/{recipe.steps} loss {mean:.5f} grad {grad_norm:.3g} lr {engine.lr:.3g} "
                f"{elapsed / (step + 1):.3f} s/step")
            if on_log is not None:
                on_log(step + 1, {"loss": mean, "grad_norm": grad_norm, "lr": engine.lr})
            window = []
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < recipe.steps:
            export_trellis(engine.averaged_model(), Path(out_dir) / "snapshots", f"{name}_{step + 1:06d}", fp16=False)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    final = engine.averaged_model().eval().requires_grad_(False)
    json_path, st_path = export_trellis(final, out_dir, name, fp16=False)
    summary = {"json": str(json_path), "safetensors": str(st_path), "params": params, "train_s": train_s,
               "cpu_s": cpu_s, "recipe": recipe.__dict__, "objective": objective.settings(),
               "train_uri": train_uri, "init": init, "curve": curve}
    Path(out_dir, f"{name}.train.json").write_text(json.dumps(summary, indent=1))
    log(f"[teacher] done in {train_s / 60:.1f} min ({cpu_s:.0f} s CPU) -> {json_path}")
    return summary


def field_error(model: torch.nn.Module, split, *, n: int = 256, seed: int = 0,
                times=(0.05, 0.25, 0.5, 0.75, 0.95, 1.0)) -> dict[str, float]:
    """Relative error ‖f − v*‖² / ‖v*‖² of a model against the exact field, at fixed times on
    held-out (x0, cond) pairs of `split`, conditional and unconditional."""
    from mdt_ray.benchmark.corpus import distribution

    exact = distribution().exact_teacher()
    g = torch.Generator().manual_seed(seed)
    x0, cond = split.x0[:n], split.cond[:n]
    out = {}
    with torch.no_grad():
        for t_val in times:
            noise = torch.randn(x0.shape, generator=g)
            t = torch.full((x0.shape[0],), float(t_val))
            x_t = diffuse(x0, noise, t)
            for label, c in (("cond", cond), ("uncond", torch.zeros_like(cond))):
                v = exact(x_t, 1000 * t, c)
                f = model(x_t, 1000 * t, c)
                out[f"rel_err_{label}_t{t_val:g}"] = float((f - v).pow(2).sum() / v.pow(2).sum())
    return out


def trajectory_diagnosis(model: torch.nn.Module, *, per_condition: int = 8, steps: int = 25, rescale_t: float = 3.0,
                         seed: int = 0) -> list[dict[str, float]]:
    """Where a learned teacher's own sampler goes wrong: along its `steps`-step trajectory from
    fixed noise, at each grid time t, how close its one-step estimate x̂0 = x_t − t·f(x_t) is to
    a mode (best-mode IoU, and whether that mode is the condition's) and how close the exact
    field's estimate at the same point is, with the relative field error there. The exact
    estimate reaching IoU 1 while the learned one does not marks the times where the network
    fails to separate the modes."""
    from mdt_ray.benchmark.corpus import distribution
    from mdt_ray.benchmark.score import match_modes
    from mdt_ray.data.synthetic import decode_ss
    from mdt_ray.flow import time_grid

    dist = distribution()
    exact = dist.exact_teacher()
    of_mode = dist.condition_of_mode()
    conditions = torch.arange(len(dist.components)).repeat(per_condition)
    cond = torch.tensor(dist.cond, dtype=torch.float32)[conditions]
    x = torch.randn(len(conditions), *dist.latents.shape[1:], generator=torch.Generator().manual_seed(seed))

    def closeness(x0_hat: torch.Tensor) -> tuple[float, float]:
        best, iou = match_modes(np.asarray(decode_ss(x0_hat.numpy())), dist.occupancy)
        return float(iou.mean()), float((of_mode[best] == conditions.numpy()).mean())

    rows = []
    grid = time_grid(steps, rescale_t)
    with torch.no_grad():
        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            t = torch.full((len(conditions),), float(t_cur))
            f, v = model(x, 1000 * t, cond), exact(x, 1000 * t, cond)
            iou, right = closeness(x - t_cur * f)
            exact_iou, _ = closeness(x - t_cur * v)
            rows.append({"t": float(t_cur), "iou": iou, "right_condition": right, "exact_iou": exact_iou,
                         "rel_err": float((f - v).pow(2).sum() / v.pow(2).sum())})
            x = x - (t_cur - t_next) * f
    iou, right = closeness(x)
    rows.append({"t": 0.0, "iou": iou, "right_condition": right, "exact_iou": float("nan"), "rel_err": float("nan")})
    return rows
