"""Few-step sampling of a checkpoint on held-out conditions, scored against held-out latents.

`quick_eval` is the cheap in-training eval (the metric a sweep's early stopping reads): the
Fréchet distance of latent features (mdt_ray.metrics) and, for corpora whose latents decode
exactly to voxels (the synthetic benchmark), the IoU with the shape behind each condition.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from mdt_ray import flow, metrics


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    cond: torch.Tensor,
    *,
    steps: int,
    cfg_strength: float = 0.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    rescale_t: float = 1.0,
    latent_shape: Sequence[int] = (8, 16, 16, 16),
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Samples (N, *latent_shape) for N conditions, noise seeded per call for comparability."""
    device = cond.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(cond.shape[0], *latent_shape, generator=g).to(device)
    out = []
    for i in range(0, cond.shape[0], batch_size):
        c = cond[i : i + batch_size]
        out.append(flow.sample(model, noise[i : i + batch_size], c, torch.zeros_like(c), steps=steps,
                               cfg_strength=cfg_strength, cfg_interval=cfg_interval, rescale_t=rescale_t))
    return torch.cat(out).float()


def score(samples: np.ndarray, reference: np.ndarray, decode: Optional[Callable[[np.ndarray], np.ndarray]] = None,
          *, shape_metrics: bool = False) -> dict[str, float]:
    """FD between sample and reference latents; with `decode`, IoU of each sample with the
    reference shape of the same condition (and COV/MMD/1-NNA when `shape_metrics`)."""
    out = {"fd": metrics.frechet_distance(metrics.latent_features(samples), metrics.latent_features(reference))}
    if decode is not None:
        gen_occ, ref_occ = decode(samples), decode(reference)
        out["iou"] = float(np.mean(metrics.iou(gen_occ, ref_occ)))
        if shape_metrics:
            out.update(metrics.shape_metrics(gen_occ, ref_occ))
    return out


def synthetic_decoder(source: dict) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The exact latent→voxel decoder for corpora built by mdt_ray.data.synthetic (manifest
    `source.kind == "synthetic"`); TRELLIS latents need TRELLIS's VAE decoder, so None."""
    if not isinstance(source, dict) or source.get("kind") != "synthetic":
        return None
    from mdt_ray.data.synthetic import decode_ss

    return decode_ss


def quick_eval(
    model: torch.nn.Module,
    x0: np.ndarray,
    cond: np.ndarray,
    *,
    steps: Sequence[int] = (1, 2),
    device: torch.device | str = "cpu",
    decode: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    seed: int = 0,
) -> dict[str, float]:
    """{"eval_fd_<k>step": ..., "eval_iou_<k>step": ...} for each step count k."""
    was_training = model.training
    model.eval()
    c = torch.as_tensor(cond, dtype=torch.float32, device=device)
    result: dict[str, float] = {}
    try:
        for k in steps:
            samples = generate(model, c, steps=k, latent_shape=x0.shape[1:], seed=seed).cpu().numpy()
            for name, value in score(samples, x0, decode).items():
                result[f"eval_{name}_{k}step"] = float(value)
    finally:
        model.train(was_training)
    return result
