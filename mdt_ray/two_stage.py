"""Two-stage generation, TRELLIS's pipeline shape: stage 1 samples the dense structure latent,
its occupancy gives the active voxels, stage 2 samples the structured latent on those voxels,
and the SLAT normalisation is undone on the way out.

Turning a stage-1 latent into voxels is the corpus's business: the synthetic benchmark decodes
exactly (`synthetic_structure`); TRELLIS latents need TRELLIS's sparse-structure VAE decoder,
which a caller passes in as `structure_to_coords`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from mdt_ray import flow
from mdt_ray.models.sparse import SparseBatch
from mdt_ray.stages import sample_kwargs


@dataclass
class StageSampling:
    steps: int
    cfg_strength: float = 0.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    rescale_t: float = 1.0

    def sample(self, model: torch.nn.Module, noise, cond: torch.Tensor, neg: torch.Tensor):
        """This stage's Euler sampler from `noise` (dense latents or a SparseBatch)."""
        return flow.sample(model, noise, cond, neg, steps=self.steps, **sample_kwargs(asdict(self)))


def synthetic_structure(latents: torch.Tensor) -> list[np.ndarray]:
    """Stage-1 latents → per-asset (L, 3) surface-voxel coordinates (the synthetic corpus's
    stage-2 support). An empty shape keeps one voxel so stage 2 always has a token."""
    from mdt_ray.data.synthetic import decode_ss, surface_voxels

    out = []
    for occ in decode_ss(latents.float().cpu().numpy()):
        coords = surface_voxels(occ)
        out.append(coords if len(coords) else np.zeros((1, 3), dtype=np.int64))
    return out


@torch.no_grad()
def sample_two_stage(
    ss_model: torch.nn.Module,
    slat_model: torch.nn.Module,
    cond: torch.Tensor,
    *,
    ss: StageSampling,
    slat: StageSampling,
    structure_to_coords: Callable[[torch.Tensor], Sequence[np.ndarray]] = synthetic_structure,
    slat_mean: Optional[Sequence[float]] = None,
    slat_std: Optional[Sequence[float]] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, SparseBatch]:
    """(stage-1 latents (B, C, R, R, R), stage-2 SparseBatch with un-normalised features)."""
    device = cond.device
    a = ss_model.config_args
    shape = (cond.shape[0], a["in_channels"], a["resolution"], a["resolution"], a["resolution"])
    noise = torch.randn(shape, generator=generator).to(device)
    neg = torch.zeros_like(cond)
    latents = ss.sample(ss_model, noise, cond, neg)
    coords = [torch.as_tensor(c, device=device) for c in structure_to_coords(latents)]
    channels = slat_model.config_args["in_channels"]
    feats = [torch.randn(len(c), channels, generator=generator).to(device) for c in coords]
    x = slat.sample(slat_model, SparseBatch.from_list(coords, feats), cond, neg)
    if slat_mean is not None and slat_std is not None:
        mean = torch.as_tensor(slat_mean, dtype=x.feats.dtype, device=device)
        std = torch.as_tensor(slat_std, dtype=x.feats.dtype, device=device)
        x = x.replace(x.feats * std + mean)
    return latents, x
