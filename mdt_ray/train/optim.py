"""Optimizer-side helpers of the worker loop: EMA and TRELLIS's adaptive gradient clipping."""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    for name, p in model.named_parameters():
        ema[name].lerp_(p.detach().to(ema[name].dtype), 1 - decay)


def ema_init(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().float() for name, p in model.named_parameters()}


class GradClipper:
    """Clip the global grad norm to `max_norm`; with `percentile`, TRELLIS's adaptive variant:
    once `window` norms are recorded, clip to min(percentile of the recent norms, max_norm)."""

    def __init__(self, max_norm: Optional[float], percentile: Optional[float] = None, window: int = 1000):
        self.max_norm = max_norm
        self.percentile = percentile
        self.window = window
        self.history: list[float] = []

    def threshold(self) -> float:
        if self.max_norm is None:
            return float("inf")
        if self.percentile is not None and len(self.history) >= self.window:
            return min(float(np.percentile(self.history, self.percentile)), self.max_norm)
        return self.max_norm

    def __call__(self, params: Iterable[torch.nn.Parameter]) -> float:
        """Clip in place; returns the norm before clipping."""
        limit = self.threshold()
        norm = float(torch.nn.utils.clip_grad_norm_(list(params), limit if limit != float("inf") else 1e30))
        if self.percentile is not None and np.isfinite(norm):
            self.history.append(norm)
            del self.history[: -self.window]
        return norm

    def state(self) -> list[float]:
        return list(self.history)

    def load(self, history: list[float]) -> None:
        self.history = list(history)[-self.window :]
