"""What limits the few-step students (issue #26), driven by benchmarks/students.py.

A study run trains one student with the comparison's optimizer step (mdt_ray.engine) from the
learned teacher's weights, distilling either the learned teacher or the exact field
(`teacher: exact`: the closed-form velocity, a few matrix products, so it separates the
teacher's error from the method's and costs almost nothing per call). It scores the student on
the held-out test corpus at 1, 2 and 4 steps at every `eval_at` step of one run: with a constant
learning rate and no EMA, the weights at step k of a longer run are those of a k-step run, so one
run gives the whole budget curve. Each run logs what its loss sees (`train.diagnostics`: residual
sizes, each term's gradient norm, per-t-bin losses) and writes one JSON file.

Recipes are named sets of dotted config overrides on top of the comparison's COMMON settings
(RECIPES below); a run is (recipe, seed, steps).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from mdt_ray.benchmark.compare import COMMON, Bench, Budget, mean_ci, score_student
from mdt_ray.benchmark.corpus import distribution

# The comparison's selected MDT-dist setting (docs/benchmark.md): lr 1e-3, λ 0.25, Δt 0.05, no
# guidance, d_norm on, t ~ logit-normal(0, 1.2). Every other recipe changes one thing from it.
BASE = {"distill.method": "mdt", "distill.lambda_vd": 0.25, "distill.dt": 0.05, "train.lr": 1e-3}
RECIPES: dict[str, dict[str, Any]] = {
    # The ceiling: plain regression onto the teacher's own 25-step ODE endpoints (Luhman & Luhman).
    "ceiling": {"distill.method": "traj", "train.lr": 1e-3},
    "mdt": dict(BASE),
    "vm": {**BASE, "distill.method": "vm"},
    "pcm": {"distill.method": "pcm", "distill.phases": 4, "distill.dt": 0.05, "train.lr": 3e-4},
    # The official recipe's knobs, one at a time.
    "mdt-dnorm-off": {**BASE, "distill.d_norm": False},
    "vm-dnorm-off": {**BASE, "distill.method": "vm", "distill.d_norm": False},
    "mdt-lambda1": {**BASE, "distill.lambda_vd": 1.0},
    "mdt-dt0.01": {**BASE, "distill.dt": 0.01},
    "mdt-t11": {**BASE, "distill.t_mean": 1.0, "distill.t_std": 1.0},
    "mdt-cfg40-100": {**BASE, "distill.cfg_vm": 40.0, "distill.cfg_vd": 100.0},
    "mdt-cfg0-3": {**BASE, "distill.cfg_vd": 3.0},
    "mdt-cfg3-3": {**BASE, "distill.cfg_vm": 3.0, "distill.cfg_vd": 3.0},
    "mdt-lr3e-4": {**BASE, "train.lr": 3e-4},
    "mdt-ema": {**BASE, "train.ema": 0.99},
    # Remedies for the collapse onto one mode per condition: DMD's regression term on ODE pairs.
    "mdt-reg1": {**BASE, "distill.lambda_reg": 1.0},
    "mdt-reg0.1": {**BASE, "distill.lambda_reg": 0.1},
}
EVAL_AT = (200, 400, 800, 1600, 3200)
STEPS = (1, 2, 4)


def settings_of(recipe: str) -> dict[str, Any]:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    return dict(RECIPES[recipe])


def _configs(settings: dict[str, Any], steps: int, seed: int, batch_size: int):
    from mdt_ray.config import DistillConfig, TrainConfig

    distill: dict[str, Any] = {}
    train: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "seed": seed, "ema": 0.0,
                             "mixed_precision": "fp32", "grad_clip": 1.0, "diagnostics": True}
    for key, value in {**COMMON, **settings}.items():
        block, name = key.split(".", 1)
        (distill if block == "distill" else train)[name] = value
    return DistillConfig(**distill), TrainConfig(**train)


def study_run(bench: Bench, recipe: str, *, teacher: str, steps: int, seed: int, eval_at=EVAL_AT,
              batch_size: int = 8, log_every: int = 10, log: Callable[[str], None] = print,
              settings: Optional[dict[str, Any]] = None,
              on_eval: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Train `recipe` for `steps` and score it at each of `eval_at` (≤ steps) and at the end;
    `on_eval` gets the result so far after each score (a long run keeps what it has measured)."""
    from mdt_ray.engine import Engine
    from mdt_ray.models.teachers import student_from
    from mdt_ray.objectives import NUM_T_BINS
    from mdt_ray.pretrain import batch_order
    from mdt_ray.stages import get_stage

    if teacher not in ("exact", "learned"):
        raise ValueError(f"teacher must be 'exact' or 'learned', got {teacher!r}")
    settings = settings_of(recipe) if settings is None else settings
    dc, tc = _configs(settings, steps, seed, batch_size)
    torch.manual_seed(seed)
    student = student_from(bench.teacher)
    field = distribution().exact_teacher() if teacher == "exact" else bench.teacher
    engine = Engine(student, field, stage=get_stage("ss"), distill=dc, train=tc)
    points = sorted({k for k in eval_at if k <= steps} | {steps})
    order = batch_order(len(bench.train), tc.batch_size, tc.seed)
    curve: list[dict[str, float]] = []
    window: dict[str, float] = {}
    bins = torch.zeros(2, NUM_T_BINS)
    evals: dict[str, Any] = {}
    t0, n = time.perf_counter(), 0
    def result(done: int) -> dict[str, Any]:
        return {"recipe": recipe, "teacher": teacher, "seed": seed, "steps": steps, "batch_size": batch_size,
                "settings": {**COMMON, **settings}, "evals": dict(evals), "curve": list(curve),
                "seconds": time.perf_counter() - t0, "test_assets": len(bench.test),
                "weights": "the trained weights (no EMA)" if engine.ema is None else engine.ema.describe(),
                **({} if done == steps else {"partial": f"stopped at step {done} of {steps}"})}

    for step in range(steps):
        idx, _epoch = next(order)
        measured, grad_norm = engine.step(bench.train.batch(idx), step)
        for k, v in {**measured.terms, "grad_norm": grad_norm}.items():
            window[k] = window.get(k, 0.0) + v
        bins += measured.t_bins.cpu()
        n += 1
        done = step + 1
        if done % log_every == 0 or done == steps:
            row = {"step": done, **{k: v / n for k, v in window.items()}}
            row.update({f"loss_t{b}": float(bins[0, b] / bins[1, b]) for b in range(NUM_T_BINS) if bins[1, b] > 0})
            curve.append(row)
            window, bins, n = {}, torch.zeros(2, NUM_T_BINS), 0
        if done in points:
            scores = score_student(engine.averaged_model().eval(), bench)
            evals[str(done)] = {str(k): v for k, v in scores.items()}
            elapsed = time.perf_counter() - t0
            log(f"[study] {recipe} ({teacher} teacher) seed {seed} step {done}/{steps} ({elapsed / 60:.1f} min, ETA "
                f"{elapsed / done * (steps - done) / 60:.1f} min): "
                + " | ".join(f"{k} step p={v['precision']:.3f} c={v['coverage']:.3f} iou={v['iou']:.3f}"
                             for k, v in scores.items()))
            if on_eval is not None:
                on_eval(result(done))
    return result(steps)


def run_file(out: Path, recipe: str, teacher: str, seed: int) -> Path:
    return out / f"{recipe}__{teacher}__s{seed}.json"


# ---------------------------------------------------------------------------------------------
# Reading the results back: tables and figures


def load_runs(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*__*__s*.json"))]


def group(runs: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["recipe"], r["teacher"]), []).append(r)
    return groups


def table(runs: list[dict[str, Any]], at: Optional[int] = None) -> str:
    """Precision / coverage / mode TV at 1, 2, 4 steps, mean ± 95 % CI over seeds, at step `at`
    (default: each group's last eval)."""
    lines = ["| recipe | teacher | train steps | seeds | " + " | ".join(
        f"{k}-step precision | {k}-step coverage" for k in STEPS) + " |",
        "|---|---|---:|---:|" + "---:|---:|" * len(STEPS)]
    for (recipe, teacher), rs in group(runs).items():
        step = str(at) if at is not None else max(rs[0]["evals"], key=int)
        rs = [r for r in rs if step in r["evals"]]
        if not rs:
            continue
        cells = []
        for k in STEPS:
            for m in ("precision", "coverage"):
                mean, ci = mean_ci([r["evals"][step][str(k)][m] for r in rs])
                cells.append(f"{mean:.3f}" + (f" ± {ci:.3f}" if len(rs) > 1 else ""))
        lines.append(f"| {recipe} | {teacher} | {step} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def budget_figure(runs: list[dict[str, Any]], path: Path, recipes: Optional[list[str]] = None) -> Path:
    """Precision and coverage against training steps, one panel per sampler step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(STEPS), figsize=(4.2 * len(STEPS), 6.4), sharex=True, sharey=True)
    for (recipe, teacher), rs in group(runs).items():
        if recipes and recipe not in recipes:
            continue
        points = sorted({int(s) for r in rs for s in r["evals"]})
        for row, metric in enumerate(("precision", "coverage")):
            for col, k in enumerate(STEPS):
                means, cis, xs = [], [], []
                for s in points:
                    vals = [r["evals"][str(s)][str(k)][metric] for r in rs if str(s) in r["evals"]]
                    mean, ci = mean_ci(vals)
                    xs.append(s), means.append(mean), cis.append(ci)
                axes[row, col].errorbar(xs, means, yerr=cis, marker="o", capsize=3, label=f"{recipe} ({teacher})",
                                        linestyle="-" if teacher == "exact" else "--")
                axes[row, col].set_title(f"{k}-step {metric}")
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.axhline(0.81 if ax in axes[0] else 0.75, color="k", lw=0.6, ls=":")
    for ax in axes[1]:
        ax.set_xlabel("training steps (batch 8)")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def diagnostics_figure(runs: list[dict[str, Any]], path: Path) -> Path:
    """For seed 0 of each group: each term's gradient norm, the residual sizes, and the size of the
    correction t·D against the teacher velocity, per training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("diag_grad_vm", "diag_grad_vd", "grad norm of the VM / VD term"),
              ("diag_resid_vm", "diag_resid_vd", "RMS residual, VM / VD"),
              ("diag_correction_vm", "diag_v_teacher_vm", "RMS of t·D (solid) and of v_T (dotted), VM"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for (recipe, teacher), rs in group(runs).items():
        r = min(rs, key=lambda x: x["seed"])
        steps = [c["step"] for c in r["curve"]]
        for ax, (a, b, title) in zip(axes, panels):
            if a in r["curve"][0]:
                line, = ax.plot(steps, [c[a] for c in r["curve"]], label=f"{recipe} ({teacher})")
                if b in r["curve"][0]:
                    ax.plot(steps, [c[b] for c in r["curve"]], color=line.get_color(),
                            ls=":" if "v_teacher" in b else "--")
            ax.set_title(title, fontsize=9)
            ax.set_yscale("log")
            ax.set_xlabel("training step")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def t_bin_table(runs: list[dict[str, Any]], last: int = 20) -> str:
    """Mean per-t-bin loss over each group's last `last` logged windows (seed 0)."""
    lines = ["| recipe | teacher | " + " | ".join(f"t∈[{b / 10:.1f},{(b + 1) / 10:.1f})" for b in range(10)) + " |",
             "|---|---|" + "---:|" * 10]
    for (recipe, teacher), rs in group(runs).items():
        r = min(rs, key=lambda x: x["seed"])
        rows = r["curve"][-last:]
        cells = []
        for b in range(10):
            vals = [c[f"loss_t{b}"] for c in rows if f"loss_t{b}" in c]
            cells.append(f"{np.mean(vals):.3g}" if vals else "")
        lines.append(f"| {recipe} | {teacher} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def default_budget() -> Budget:
    return Budget(test_assets=256, val_assets=64)
