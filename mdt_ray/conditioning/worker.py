"""Views to condition tokens on a training worker, inside the step.

A batch from an image corpus holds `views`: (B, V, S, S, 3) uint8, every stored view of each
asset, decoded in the data path. TRELLIS draws one view per sample at random; here the draw comes
from a generator seeded by `step_seed(seed, rank, step, VIEW_STREAM)`, so a resumed run draws the
same views the original would have (the micro-batch draws use streams 0, 1, ...).
"""

from __future__ import annotations

from typing import Any

import torch

from mdt_ray.engine import step_seed

VIEW_STREAM = -1  # the step_seed "micro-batch" index of the view draws; no micro-batch has it


def draw_views(num_assets: int, num_views: int, seed: int, rank: int, step: int) -> torch.Tensor:
    """(num_assets,) int64 view indices in [0, num_views) for (seed, rank, step)."""
    gen = torch.Generator(device="cpu").manual_seed(step_seed(seed, rank, step, VIEW_STREAM))
    return torch.randint(num_views, (num_assets,), generator=gen)


def images_of(views: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The chosen view of each asset as (B, 3, S, S) float32 in [0, 1]."""
    rows = torch.arange(views.shape[0], device=views.device)
    return views[rows, index.to(views.device)].permute(0, 3, 1, 2).float() / 255.0


class ViewConditioner:
    """Replaces a batch's `views` with `cond` tokens of one drawn view per asset."""

    def __init__(self, encoder: torch.nn.Module, *, seed: int, rank: int):
        self.encoder, self.seed, self.rank = encoder, seed, rank

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        views = batch["views"]
        index = draw_views(views.shape[0], views.shape[1], self.seed, self.rank, step)
        out = {k: v for k, v in batch.items() if k != "views"}
        out["cond"] = self.encoder(images_of(views, index))
        out["view_index"] = index
        return out

    @torch.no_grad()
    def encode_first(self, views: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Tokens of view 0 of every asset (a held-out split's fixed condition), in batches."""
        device = next(self.encoder.parameters()).device
        parts = []
        for chunk in views.split(batch_size):
            first = torch.zeros(len(chunk), dtype=torch.int64)
            parts.append(self.encoder(images_of(chunk.to(device), first)).cpu())
        return torch.cat(parts)
