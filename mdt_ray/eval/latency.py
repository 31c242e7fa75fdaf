"""Seconds per sample of samplers, and what a few-step sampler saves over a reference one."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from mdt_ray import flow
from mdt_ray.stages import sample_kwargs

# (network, Euler steps, sampler dict): what `measure_latency` times under one name.
Entry = tuple[Callable, int, dict[str, Any]]


def sampler_nfe(steps: int, sampler: dict[str, Any]) -> int:
    """Network evaluations per sample of `steps` Euler steps with `sampler`'s guidance."""
    kw = sample_kwargs(sampler)
    return flow.num_function_evals(steps, kw["cfg_strength"], kw["cfg_interval"], kw["rescale_t"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(entries: dict[str, Entry], noise: Any, cond: torch.Tensor, *, repeats: int = 3
                    ) -> dict[str, float]:
    """Seconds per sample of each entry, sampling the batch `noise` (a dense tensor or a
    SparseBatch) under `cond` on their device.

    Every entry is timed once per round, round after round (interleaved), after one untimed
    warm-up call each, and the fastest round counts: on a shared machine the minimum is the
    estimate least inflated by other work, and interleaving exposes every entry to the same load.
    """
    if repeats < 1:
        raise ValueError(f"latency repeats must be >= 1, got {repeats}")
    device = cond.device
    neg = torch.zeros_like(cond)
    best = {name: float("inf") for name in entries}
    for round_ in range(repeats + 1):
        for name, (model, steps, sampler) in entries.items():
            _sync(device)
            start = time.perf_counter()
            flow.sample(model, noise, cond, neg, steps=steps, **sample_kwargs(sampler))
            _sync(device)
            elapsed = time.perf_counter() - start
            if round_ > 0:  # round 0 warms caches and allocators up
                best[name] = min(best[name], elapsed / cond.shape[0])
    return best


def speedups(latency: dict[str, float], reference: str) -> dict[str, float]:
    """latency[reference] / latency[name] for every entry (the reference itself is 1)."""
    if reference not in latency:
        raise KeyError(f"no latency measured for the reference {reference!r}; have {sorted(latency)}")
    return {name: latency[reference] / value for name, value in latency.items()}
