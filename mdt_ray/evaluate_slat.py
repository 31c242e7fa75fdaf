"""Stage-2 (SLAT) evaluation behind `mdt-ray eval` for checkpoints of `SLatFlowModel`.

TRELLIS's stage 2 never chooses where the voxels are: stage 1 does. So every sampler here runs
on each held-out asset's own voxel coordinates, from the same seeded noise, and what is scored is
the features it puts there, in the corpus's normalised units:

* `feat_mse`: mean squared error against the held-out asset's own features (voxel-weighted, the
  in-training `eval_feat_mse_<k>step` of mdt_ray.train.loop);
* `fd`: Fréchet distance between the per-voxel feature distributions (C-dimensional, one sample
  per voxel, so thousands of samples for an 8×8 covariance);
* `nfe`, `latency_s` and `speedup` over the teacher, as in mdt_ray.evaluate.

There is no decoder from features to something viewable, so no renders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from mdt_ray import flow, metrics
from mdt_ray.evaluate import (
    STUDENT_SAMPLER,
    TEACHER_SAMPLER,
    _jsonable,
    _sample_kwargs,
    flat_metrics,
    format_table,
    measure_latency,
    sampler_nfe,
    speedups,
)
from mdt_ray.models.sparse import SparseBatch

# TRELLIS's stage-2 sampler shape (25 steps, guidance on t ∈ [0.5, 1], rescale_t 3). TRELLIS-L
# uses guidance 3 for stage 2; a teacher of a few hundred thousand parameters trained for minutes
# has a far noisier conditional-minus-unconditional difference, and extrapolating it 3× mostly
# amplifies that noise. 1.0 keeps guidance in the loop (the students are distilled from guided
# velocities) at the strength the stage-1 benchmark teacher settled on after its guidance sweep.
SLAT_TEACHER_SAMPLER: dict[str, Any] = {**TEACHER_SAMPLER, "cfg_strength": 1.0}
SLAT_METRICS = ("feat_mse", "fd")
SLAT_COLUMNS = (("feat_mse", "feat MSE", 10, ".4f"), ("fd", "FD", 10, ".4f"))
STAGE_OF_CLASS = {"SparseStructureFlowModel": "ss", "SLatFlowModel": "slat", "ElasticSLatFlowModel": "slat"}


def checkpoint_stage(json_path: str | Path) -> str:
    """"ss" or "slat" from a TRELLIS <name>.json's model class."""
    name = json.loads(Path(json_path).read_text()).get("name")
    if name not in STAGE_OF_CLASS:
        raise ValueError(f"{json_path}: unknown TRELLIS model class {name!r}; known: {sorted(STAGE_OF_CLASS)}")
    return STAGE_OF_CLASS[name]


class SparseBank:
    """Per-asset (coords, feats) arrays that index like a dense tensor: `bank[idx]` is the
    SparseBatch of those assets and `bank.shape[0]` the asset count, so loops written for dense
    `x0[idx]` (pre-training, benchmarks/quality.py's `distil`) take stage-2 data unchanged."""

    def __init__(self, coords: Sequence[np.ndarray], feats: Sequence[np.ndarray]):
        if len(coords) != len(feats):
            raise ValueError(f"{len(coords)} coords arrays but {len(feats)} feats arrays")
        self.coords = [torch.as_tensor(np.asarray(c, dtype=np.int32)) for c in coords]
        self.feats = [torch.as_tensor(np.asarray(f, dtype=np.float32)) for f in feats]
        self.shape = (len(self.coords),)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> SparseBatch:
        rows = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        return SparseBatch.from_list([self.coords[i] for i in rows], [self.feats[i] for i in rows])


def held_noise(held: dict[str, Any], seed: int) -> list[torch.Tensor]:
    """Per-asset Gaussian noise, drawn once so that every sampler starts from the same point."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    channels = np.asarray(held["slat_feats"][0]).shape[1]
    total = sum(len(c) for c in held["slat_coords"])
    flat = torch.randn(total, channels, generator=g)
    return list(flat.split([len(c) for c in held["slat_coords"]]))


def held_batch(held: dict[str, Any], noise: list[torch.Tensor], start: int, stop: int,
           device: torch.device) -> tuple[SparseBatch, torch.Tensor]:
    coords = [torch.as_tensor(np.asarray(c, dtype=np.int32), device=device) for c in held["slat_coords"][start:stop]]
    x = SparseBatch.from_list(coords, [n.to(device) for n in noise[start:stop]])
    cond = torch.as_tensor(held["cond"][start:stop], dtype=torch.float32, device=device)
    return x, cond


@torch.no_grad()
def generate_slat(model: torch.nn.Module, held: dict[str, Any], noise: list[torch.Tensor], *, steps: int,
                  sampler: dict[str, Any], batch_size: int = 16, device: torch.device | str = "cpu") -> np.ndarray:
    """Features sampled on every held-out asset's voxels, stacked in held-out order (N_vox, C)."""
    device = torch.device(device)
    out = []
    for start in range(0, len(noise), batch_size):
        x, cond = held_batch(held, noise, start, start + batch_size, device)
        y = flow.sample(model, x, cond, torch.zeros_like(cond), steps=steps, **_sample_kwargs(sampler))
        out.append(y.feats.float().cpu().numpy())
    return np.concatenate(out)


def score_slat(generated: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {"feat_mse": float(np.mean((generated.astype(np.float64) - reference) ** 2)),
            "fd": metrics.frechet_distance(generated, reference)}


def measure_latency_sparse(entries: dict[str, tuple[torch.nn.Module, int, dict[str, Any]]], noise: SparseBatch,
                           cond: torch.Tensor, *, repeats: int = 3) -> dict[str, float]:
    """mdt_ray.evaluate.measure_latency on one sparse batch (stage 2's per-asset voxel sets)."""
    return measure_latency(entries, cond, repeats=repeats, noise=noise)


def require_slat(model: torch.nn.Module, what: str) -> None:
    from mdt_ray.models.slat_flow import SLatFlowModel

    if not isinstance(model, SLatFlowModel):
        raise ValueError(f"the {what} is a {type(model).__name__}, not a stage-2 SLatFlowModel; "
                         "a stage-2 checkpoint needs a stage-2 teacher (--teacher <slat>.json)")


def evaluate_slat_model(
    model: torch.nn.Module,
    held: dict[str, Any],
    *,
    teacher: Optional[torch.nn.Module],
    steps: Sequence[int] = (1, 2, 4, 25),
    sampler: Optional[dict[str, Any]] = None,
    teacher_sampler: Optional[dict[str, Any]] = None,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    latency_batch: int = 8,
    latency_repeats: int = 3,
    log: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """{"steps": {"<k>": metrics}, "teacher": metrics | None, "settings": ...}, the layout of
    mdt_ray.evaluate.evaluate_model, with stage 2's metrics (feat_mse, fd, nfe, latency_s, speedup)."""
    log = log or (lambda _msg: None)
    sampler = {**STUDENT_SAMPLER, **(sampler or {})}
    teacher_sampler = {**SLAT_TEACHER_SAMPLER, **(teacher_sampler or {})}
    device = torch.device(device)
    steps = [int(k) for k in steps]
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be a non-empty list of positive step counts, got {steps}")
    n = len(held["slat_coords"])
    if n < 2:
        raise ValueError(f"the held-out set needs at least 2 assets, got {n}")
    require_slat(model, "checkpoint")
    model = model.to(device).eval()
    noise = held_noise(held, seed)
    reference = np.concatenate([np.asarray(f, dtype=np.float64) for f in held["slat_feats"]])
    entries = {str(k): (model, k, sampler) for k in steps}
    runs = [(str(k), model, k, sampler) for k in steps]
    if teacher is not None:
        require_slat(teacher, "teacher")
        teacher = teacher.to(device).eval()
        entries["teacher"] = (teacher, teacher_sampler["steps"], teacher_sampler)
        runs.append(("teacher", teacher, teacher_sampler["steps"], teacher_sampler))

    scored: dict[str, dict[str, Any]] = {}
    for name, net, k, smp in runs:
        t0 = time.perf_counter()
        gen = generate_slat(net, held, noise, steps=k, sampler=smp, batch_size=batch_size, device=device)
        scored[name] = {**score_slat(gen, reference), "nfe": sampler_nfe(k, smp)}
        label = f"teacher {k} steps" if name == "teacher" else f"{k} step(s)"
        log(f"[eval] {label}: " + " ".join(f"{m}={scored[name][m]:.4g}" for m in SLAT_METRICS)
            + f" ({time.perf_counter() - t0:.0f}s)")

    m = max(1, min(latency_batch, n))
    lat_x, lat_cond = held_batch(held, noise, 0, m, device)
    latency = measure_latency_sparse(entries, lat_x, lat_cond, repeats=latency_repeats)
    ups = speedups(latency, "teacher") if "teacher" in latency else {}
    for name, entry in scored.items():
        entry["latency_s"] = latency[name]
        if ups:
            entry["speedup"] = ups[name]
    if "teacher" in scored:
        scored["teacher"]["steps"] = teacher_sampler["steps"]

    return {
        "steps": {str(k): scored[str(k)] for k in steps},
        "teacher": scored.get("teacher"),
        "settings": {
            "stage": "slat", "assets": n, "voxels": int(reference.shape[0]), "seed": seed, "device": str(device),
            "latency_batch": m, "latency_repeats": latency_repeats, "sampler": _jsonable(sampler),
            "teacher_sampler": _jsonable(teacher_sampler) if teacher is not None else None,
        },
    }


def format_slat_table(result: dict[str, Any]) -> str:
    """The stage-2 report as a fixed-width text table, teacher first."""
    return format_table(result, SLAT_COLUMNS)


def flat_slat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """MLflow names as in mdt_ray.evaluate.flat_metrics: eval_<metric>_<k>step, eval_teacher_<metric>."""
    return flat_metrics(result, SLAT_METRICS)
