"""Exact metrics of generated stage-1 latents against the benchmark's known distribution.

A sample is decoded to occupancy (threshold at 0, exact for this corpus), matched to the mode it
overlaps most (IoU against all M modes of every condition, one matrix product), and is *valid*
when that mode belongs to its condition and the IoU is at least VALID_IOU. Then, averaged over
conditions:

- precision: the valid fraction;
- coverage: the fraction of the condition's modes that received at least COVERED_FRAC of the
  samples their true weight predicts (a mode hit once in a thousand draws is not covered);
- mode TV: total variation between the modes' frequencies among the valid samples and the true
  weights (1 when nothing is valid);
- FD: Fréchet distance (mdt_ray.metrics.latent_features) to as many exact samples of the same
  conditions, drawn with a fixed seed; exact samples against exact samples give its floor.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from mdt_ray import metrics

# Modes of different conditions at the same height overlap up to IoU 0.81 (the disk's cylinder
# and the square's slab), so a valid sample must be closer than that to its mode.
VALID_IOU = 0.9
COVERED_FRAC = 0.25
METRICS = ("precision", "coverage", "mode_tv", "fd", "iou")


def match_modes(occ: np.ndarray, mode_occ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best mode (N,), its IoU (N,)) of decoded samples (N, 32, 32, 32) bool."""
    a = torch.from_numpy(occ.reshape(occ.shape[0], -1).astype(np.float32))
    b = torch.from_numpy(mode_occ.reshape(mode_occ.shape[0], -1).astype(np.float32))
    inter = a @ b.T  # exact: integer counts far below 2^24
    union = a.sum(1, keepdim=True) + b.sum(1)[None] - inter
    iou = (inter / union.clamp(min=1)).numpy()
    best = iou.argmax(axis=1)
    return best, iou[np.arange(len(best)), best]


def exact_reference(dist, conditions: np.ndarray, seed: int = 12345) -> np.ndarray:
    """Latents of exact samples, one per given condition, drawn with a fixed seed."""
    return dist.latents[exact_modes(dist, conditions, seed)]


def exact_modes(dist, conditions: np.ndarray, seed: int = 12345) -> np.ndarray:
    return dist.sample(np.asarray(conditions), np.random.default_rng(seed))


def _mode_features(dist) -> np.ndarray:
    # An exact sample's FD features are its mode's: embed the M modes once, not every sample.
    cached = getattr(dist, "_features", None)
    if cached is None:
        cached = metrics.latent_features(dist.latents)
        object.__setattr__(dist, "_features", cached)
    return cached


def score(samples: Any, conditions: np.ndarray, dist, *, reference: Optional[np.ndarray] = None,
          per_condition: bool = False) -> dict[str, Any]:
    """The benchmark metrics of `samples` (N, 8, 16, 16, 16) generated for `conditions` (N,)."""
    from mdt_ray.data.synthetic import decode_ss

    x = samples.detach().float().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    conditions = np.asarray(conditions)
    if x.shape[0] != conditions.shape[0]:
        raise ValueError(f"score: {x.shape[0]} samples but {conditions.shape[0]} conditions")
    if not np.isfinite(x).all():
        raise ValueError("score: samples contain NaN or inf")
    best, best_iou = match_modes(decode_ss(x), dist.occupancy)
    owner = dist.condition_of_mode()
    valid = (owner[best] == conditions) & (best_iou >= VALID_IOU)
    per: dict[str, dict[str, float]] = {}
    for k, (idx, w) in enumerate(zip(dist.components, dist.weights)):
        rows = conditions == k
        n = int(rows.sum())
        if n == 0:
            continue
        counts = np.array([np.sum(valid & rows & (best == m)) for m in idx], dtype=np.float64)
        w = np.asarray(w)
        freq = counts / counts.sum() if counts.sum() > 0 else None
        per[dist.condition_names[k]] = {
            "precision": float(valid[rows].mean()),
            "coverage": float(np.mean(counts >= np.maximum(1.0, COVERED_FRAC * w * n))),
            "mode_tv": 1.0 if freq is None else float(0.5 * np.abs(freq - w).sum()),
        }
    out: dict[str, Any] = {k: float(np.mean([p[k] for p in per.values()])) for k in ("precision", "coverage", "mode_tv")}
    ref_feats = (_mode_features(dist)[exact_modes(dist, conditions)] if reference is None
                 else metrics.latent_features(reference))
    out["fd"] = metrics.frechet_distance(metrics.latent_features(x), ref_feats)
    out["iou"] = float(best_iou.mean())
    if per_condition:
        out["per_condition"] = per
    return out


def score_split(samples: Any, split) -> dict[str, float]:
    """`score` against a multimodal corpus split (mdt_ray.stages.Split): the conditions are its
    rows' cond tokens, so `mdt-ray eval`, the in-training eval and the sweeps report the exact
    metrics on this corpus (a sample need not match its row's shape, only a mode of its condition)."""
    from mdt_ray.benchmark.corpus import distribution

    dist = distribution()
    conditions = dist.exact_teacher().condition_index(split.cond).numpy()
    unconditioned = np.flatnonzero(conditions >= len(dist.components))
    if unconditioned.size:
        raise ValueError(f"score: corpus {split.manifest.uri}: asset {split.asset_id[unconditioned[0]]} has the "
                         "zero condition; each row of a multimodal corpus needs its own")
    return score(samples, conditions, dist)
