"""The report of `mdt-ray eval`, for either stage.

A checkpoint is sampled at several step counts next to its teacher on its stage's TRELLIS
sampler, every sampler from the same noise for the same held-out condition, and scored by the
stage (`Stage.score`: FD, IoU, COV / MMD / 1-NNA for stage 1; feature MSE and FD for stage 2),
with the network evaluations per sample, the latency per sample and the speed-up over the
teacher; stage-1 corpora that decode exactly get a PNG grid of renders too.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from mdt_ray import flow
from mdt_ray.eval.latency import hms, measure_latency, nfe_ratios, sampler_nfe, speedups
from mdt_ray.eval.render import render_grid
from mdt_ray.stages import STUDENT_SAMPLER, Split, Stage, get_stage, stage_of_model

Log = Callable[[str], None]
# How far a measured speed-up may exceed the ratio of network evaluations before it is flagged.
SPEEDUP_TOLERANCE = 1.1

# Without a terminal (a Ray job's log, CI) a long sampler reports its progress and ETA at most this
# often, so that the log shows it is alive without a line per network call.
PROGRESS_EVERY_S = 30.0
# Seconds the latency timing may take, warm-up included, before it stops starting new rounds. By
# the README's timings (teacher 0.8-1.0 s a sample at 25 steps, batch 8) a round of the demo's
# three samplers takes about 25 s, so the default 3 rounds fit on an idle 2-core machine.
LATENCY_BUDGET_S = 120.0


@dataclass
class _Run:
    """One sampler of the report: `name` is its key ("<k>" or "teacher")."""

    name: str
    model: Any
    steps: int
    sampler: dict[str, Any]

    @property
    def label(self) -> str:
        return f"teacher {self.steps} steps" if self.name == "teacher" else f"{self.steps} step(s)"

    @property
    def row(self) -> str:
        return f"teacher {self.steps} steps" if self.name == "teacher" else (
            f"{self.steps} step" + ("s" if self.steps > 1 else ""))


class _Progress:
    """A sampler's network that counts the samples it evaluates: a tqdm bar over Euler steps when
    stderr is a terminal, else a line with the share done and an ETA at most every
    PROGRESS_EVERY_S. Guided steps evaluate twice the rows, so the share counts rows, not calls."""

    def __init__(self, net: Any, run: _Run, assets: int, batch_size: int, log: Optional[Log]):
        self.net, self.label, self.log = net, run.label, log
        self.total = assets * sampler_nfe(run.steps, run.sampler)
        self.rows, self.start = 0, time.perf_counter()
        self.last = self.start
        self.bar = None
        if log is not None and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=-(-assets // batch_size) * run.steps, desc=f"[eval] {run.label}", unit="step",
                            leave=False, dynamic_ncols=True, file=sys.stderr)

    def __call__(self, x, t, cond):
        out = self.net(x, t, cond)
        self.rows += flow.batch_size(x)
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
        elif self.log is not None and self.rows < self.total and now - self.last >= PROGRESS_EVERY_S:
            self.last, elapsed = now, now - self.start
            self.log(f"[eval] {self.label}: {100 * self.rows / self.total:.0f} % ({elapsed:.0f}s, ETA "
                     f"{hms(elapsed * (self.total - self.rows) / self.rows)})")
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def stage_label(stage: Stage) -> str:
    """"stage-1", "stage-2": TRELLIS's numbering."""
    return f"stage-{stage.number}"


def _require_stage(stage: Stage, net: torch.nn.Module, what: str, hint: str) -> None:
    if stage_of_model(net) is not stage:
        raise ValueError(f"the {what} is a {type(net).__name__}, not a {stage_label(stage)} "
                         f"{'/'.join(stage.model_classes)}; {hint}")


def _runs(split: Split, model, teacher, steps: Sequence[int], sampler, teacher_sampler) -> list[_Run]:
    stage = split.stage
    steps = [int(k) for k in steps]
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be a non-empty list of positive step counts, got {steps}")
    if len(split) < 2:
        raise ValueError(f"the held-out set needs at least 2 assets (FD compares two sets), got {len(split)}")
    label = stage_label(stage)
    _require_stage(stage, model, "checkpoint", f"the held-out split is {label} data")
    runs = [_Run(str(k), model, k, sampler) for k in steps]
    if teacher is not None:
        _require_stage(stage, teacher, "teacher", f"a {label} checkpoint needs a {label} teacher "
                       f"(--teacher <{stage.name}>.json)")
        runs.append(_Run("teacher", teacher, int(teacher_sampler["steps"]), teacher_sampler))
    return runs


def _sample_and_score(split: Split, noise: Any, run: _Run, batch_size: int, device: torch.device,
                      log: Optional[Log]) -> tuple[np.ndarray, dict[str, Any]]:
    stage = split.stage
    t0 = time.perf_counter()
    net = _Progress(run.model, run, len(split), batch_size, log)
    try:
        samples = stage.generate(net, split, noise, steps=run.steps, sampler=run.sampler, batch_size=batch_size,
                                 device=device)
    finally:
        net.close()
    scores = stage.score(samples, split, full=True)
    if log is not None:
        log(f"[eval] {run.label}: " + " ".join(f"{m}={scores[m]:.4g}" for m in stage.metrics if m in scores)
            + f" ({time.perf_counter() - t0:.0f}s)")
    return samples, {**scores, "nfe": sampler_nfe(run.steps, run.sampler)}


def _add_latency(scored: dict[str, dict[str, Any]], runs: list[_Run], split: Split, noise: Any, m: int,
                 device: torch.device, repeats: int, budget_s: Optional[float], log: Optional[Log]) -> int:
    """Time every run on the first `m` assets into scored[name]["latency_s"] (and the speed-up
    over the teacher); returns the rounds each median is of."""
    x, cond = split.stage.sampler_input(split, noise, 0, m, device)
    entries = {r.name: (r.model, r.steps, r.sampler) for r in runs}
    if log is not None:
        budget = "no time budget" if budget_s is None else f"budget {budget_s:g} s"
        log(f"[eval] latency: timing {len(runs)} sampler(s) on a batch of {m}, up to {repeats} round(s), {budget}")
    latency = measure_latency(entries, x, cond, repeats=repeats, budget_s=budget_s,
                              log=None if log is None else lambda line: log(f"[eval] {line}"))
    for run in runs:
        entry = scored[run.name]
        entry["latency_s"], entry["latency_rounds"] = latency[run.name], latency.rounds
        entry["latency_calls_per_round"] = latency.calls[run.name]
        # Interleaved, every sampler ends its last round together: a line each, in run order.
        if log is not None:
            log(f"[eval] latency: {run.label}: {latency[run.name] * 1e3:.2f} ms/sample, median of {latency.rounds} "
                f"round(s) of {latency.calls[run.name]} call(s)")
    if "teacher" not in latency:
        return latency.rounds
    ups, bounds = speedups(latency, "teacher"), nfe_ratios(entries, "teacher")
    for name, entry in scored.items():
        entry["speedup"] = ups[name]
        # Same network size, device and batch: no sampler can beat the ratio of evaluations by
        # more than timing noise, so a speed-up above it says the timing is not to be trusted.
        entry["speedup_suspect"] = bool(ups[name] > SPEEDUP_TOLERANCE * bounds[name])
        if entry["speedup_suspect"] and log is not None:
            log(f"[eval] warning: the {name}-step speed-up {ups[name]:.1f}x exceeds the ratio of network "
                f"evaluations ({bounds[name]:.1f}x); the latency timing was disturbed (machine load?), rerun "
                "with more --latency-repeats (and --latency-budget) on an idle machine")
    return latency.rounds


def _render(split: Split, generated: dict[str, np.ndarray], runs: list[_Run], path: str | Path, assets: int) -> Path:
    decode = split.stage.decoder(split)
    m = min(assets, len(split))
    rows = [("ground truth", decode(np.asarray(split.x0[:m])))]
    ordered = [r for r in runs if r.name == "teacher"] + [r for r in runs if r.name != "teacher"]
    rows += [(r.row, decode(generated[r.name][:m])) for r in ordered]
    ids = [str(a)[-6:] for a in split.asset_id[:m]] or None
    return render_grid(rows, path, column_labels=ids)


def _jsonable(sampler: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sampler.items()}


def evaluate(
    model: torch.nn.Module,
    split: Split,
    *,
    teacher: Optional[torch.nn.Module] = None,
    steps: Sequence[int] = (1, 2, 4, 25),
    sampler: Optional[dict[str, Any]] = None,
    teacher_sampler: Optional[dict[str, Any]] = None,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    latency_batch: int = 8,
    latency_repeats: int = 3,
    latency_budget_s: Optional[float] = LATENCY_BUDGET_S,
    render_path: Optional[str | Path] = None,
    render_assets: int = 8,
    log: Optional[Log] = None,
) -> dict[str, Any]:
    """{"steps": {"<k>": metrics}, "teacher": metrics | None, "settings": {..., "stage": name}}.

    `sampler` and `teacher_sampler` override STUDENT_SAMPLER and the stage's teacher sampler.
    Latency is timed on the first `latency_batch` assets, every sampler interleaved on the same
    device (`measure_latency`), in up to `latency_repeats` rounds while `latency_budget_s` lasts
    (None: no bound); each entry says how many rounds its median is of. The speed-up of each is
    the teacher's latency over its own.
    Renders are written to `render_path` when the split's stage decodes it to voxels.
    """
    stage, device = split.stage, torch.device(device)
    sampler = {**STUDENT_SAMPLER, **(sampler or {})}
    teacher_sampler = {**stage.teacher_sampler, **(teacher_sampler or {})}
    model = model.to(device).eval()
    teacher = teacher.to(device).eval() if teacher is not None else None
    runs = _runs(split, model, teacher, steps, sampler, teacher_sampler)
    render = render_path is not None and stage.decoder(split) is not None
    noise = stage.noise(split, seed)
    scored: dict[str, dict[str, Any]] = {}
    generated: dict[str, np.ndarray] = {}
    for run in runs:
        samples, scored[run.name] = _sample_and_score(split, noise, run, batch_size, device, log)
        if render:
            generated[run.name] = samples
    if teacher is not None:
        scored["teacher"]["steps"] = int(teacher_sampler["steps"])
    m = max(1, min(latency_batch, len(split)))
    rounds = _add_latency(scored, runs, split, noise, m, device, latency_repeats, latency_budget_s, log)
    result: dict[str, Any] = {"steps": {r.name: scored[r.name] for r in runs if r.name != "teacher"},
                              "teacher": scored.get("teacher")}
    if render:
        result["render"] = str(_render(split, generated, runs, render_path, render_assets))
    result["settings"] = {
        "stage": stage.name, "assets": len(split), **split.stage.report_settings(split), "seed": seed, "device": str(device),
        "latency_batch": m, "latency_repeats": latency_repeats, "latency_budget_s": latency_budget_s,
        "latency_rounds": rounds, "sampler": _jsonable(sampler),
        "teacher_sampler": _jsonable(teacher_sampler) if teacher is not None else None,
    }
    return result


def report_stage(result: dict[str, Any]) -> Stage:
    """The stage a report of `evaluate` was made for (its settings.stage)."""
    name = (result.get("settings") or {}).get("stage")
    if name is None:
        raise ValueError("the eval report has no settings.stage (reports of mdt_ray.eval.evaluate name their stage)")
    return get_stage(name)


def format_table(result: dict[str, Any]) -> str:
    """The report as a fixed-width text table, teacher first, with its stage's quality columns."""
    columns = report_stage(result).columns
    head = (f"{'sampler':<22}{'NFE':>5}" + "".join(f"{title:>{width}}" for _, title, width, _ in columns)
            + f"{'ms/sample':>11}{'speed-up':>10}")
    lines = [head, "-" * len(head)]
    settings = result.get("settings") or {}

    def row(label: str, e: dict[str, Any]) -> str:
        cells = [f"{label:<22}", f"{e.get('nfe', 0):>5d}"]
        for key, _, width, fmt in columns:
            cells.append(f"{e[key]:>{width}{fmt}}" if key in e else f"{'-':>{width}}")
        cells.append(f"{e['latency_s'] * 1e3:>11.2f}" if "latency_s" in e else f"{'-':>11}")
        mark = "?" if e.get("speedup_suspect") else "x"
        cells.append(f"{e['speedup']:>9.1f}{mark}" if "speedup" in e else f"{'-':>10}")
        return "".join(cells)

    if result.get("teacher"):
        t = result["teacher"]
        w = settings.get("teacher_sampler") or {}
        lines.append(row(f"teacher {t.get('steps', '')} (cfg {w.get('cfg_strength', '?')})", t))
    for k, e in result["steps"].items():
        lines.append(row(f"checkpoint {k} step" + ("s" if int(k) > 1 else ""), e))
    if "latency_rounds" in settings:
        lines.append(f"ms/sample: the median of {settings['latency_rounds']} timed round(s) per sampler, batch "
                     f"{settings['latency_batch']}")
    if any(e.get("speedup_suspect") for e in result["steps"].values()):
        lines.append("? a speed-up above the ratio of network evaluations: the timing was disturbed; rerun it")
    return "\n".join(lines)


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """MLflow metric names: eval_<metric>_<k>step (Stage.quick_eval's names) and eval_teacher_<metric>."""
    keys = report_stage(result).metrics + ("latency_s", "speedup", "nfe")
    out: dict[str, float] = {}
    for k, e in result["steps"].items():
        out.update({f"eval_{m}_{k}step": float(e[m]) for m in keys if m in e})
    if result.get("teacher"):
        out.update({f"eval_teacher_{m}": float(result["teacher"][m]) for m in keys if m in result["teacher"]})
    return out
