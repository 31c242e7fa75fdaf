"""Seconds per sample of samplers, and what a few-step sampler saves over a reference one."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

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


class Timing(dict):
    """Seconds per call (or per sample) of each name, and how they were measured: the median of
    `rounds` timed rounds, each of `calls[name]` calls back to back."""

    def __init__(self, seconds: dict[str, float], rounds: int, calls: dict[str, int]):
        super().__init__(seconds)
        self.rounds, self.calls = rounds, dict(calls)


def hms(seconds: float) -> str:
    """h:mm:ss, as training's ETA reads."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def time_interleaved(calls: dict[str, Callable[[], Any]], *, repeats: int = 3, max_calls: int = 64,
                     device: torch.device | str = "cpu", budget_s: Optional[float] = None,
                     log: Optional[Callable[[str], None]] = None) -> Timing:
    """Seconds per call of each callable, timed side by side.

    One untimed warm-up call each also measures how long it takes; then up to `repeats` rounds,
    every callable in turn, and in each round a callable runs back to back as many times as it
    takes to last about as long as the slowest one (at most `max_calls`). The median round counts.
    Equal-length chunks matter on a shared machine: timed once each, a 1-step sampler
    (milliseconds) often runs in a quiet gap while a 25-step one (a second) never does, and
    their ratio came out above the ratio of network evaluations, which no sampler can beat.

    With `budget_s`, a round starts only while the mean round so far still fits in what is left
    of the budget (warm-up included); the first round always runs. `log` gets a line after
    every round but the last, with the rounds that still fit and their ETA.
    """
    if repeats < 1:
        raise ValueError(f"latency repeats must be >= 1, got {repeats}")
    if max_calls < 1:
        raise ValueError(f"latency max_calls must be >= 1, got {max_calls}")
    if budget_s is not None and budget_s < 0:
        raise ValueError(f"latency budget must be >= 0 seconds, got {budget_s}")
    device = torch.device(device)

    def run(fn: Callable[[], Any], n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        return time.perf_counter() - start

    start = time.perf_counter()
    warm = {name: max(run(fn, 1), 1e-9) for name, fn in calls.items()}
    longest = max(warm.values())
    count = {name: max(1, min(max_calls, round(longest / w))) for name, w in warm.items()}
    rounds: dict[str, list[float]] = {name: [] for name in calls}
    timed = 0.0
    for done in range(1, repeats + 1):
        t0 = time.perf_counter()
        for name, fn in calls.items():
            rounds[name].append(run(fn, count[name]) / count[name])
        now = time.perf_counter()
        timed += now - t0
        round_s = timed / done
        more = repeats - done
        if budget_s is not None:
            more = min(more, int(max(0.0, budget_s - (now - start)) // max(round_s, 1e-9)))
        if more == 0:
            break
        if log is not None:
            log(f"latency: round {done} of {done + more} ({now - start:.0f}s, ETA {hms(more * round_s)})")
    return Timing({name: statistics.median(values) for name, values in rounds.items()}, done, count)


@torch.no_grad()
def measure_latency(entries: dict[str, Entry], noise: Any, cond: torch.Tensor, *, repeats: int = 3,
                    max_calls: int = 64, budget_s: Optional[float] = None,
                    log: Optional[Callable[[str], None]] = None) -> Timing:
    """Seconds per sample of each entry, sampling the batch `noise` (a dense tensor or a
    SparseBatch) under `cond` on their device, timed side by side (`time_interleaved`)."""
    neg = torch.zeros_like(cond)

    def sampler(model: Callable, steps: int, sampler: dict[str, Any]) -> Callable[[], Any]:
        return lambda: flow.sample(model, noise, cond, neg, steps=steps, **sample_kwargs(sampler))

    calls = {name: sampler(*entry) for name, entry in entries.items()}
    per_call = time_interleaved(calls, repeats=repeats, max_calls=max_calls, device=cond.device, budget_s=budget_s,
                                log=log)
    return Timing({name: seconds / cond.shape[0] for name, seconds in per_call.items()}, per_call.rounds,
                  per_call.calls)


def nfe_ratios(entries: dict[str, Entry], reference: str) -> dict[str, float]:
    """The reference's network evaluations over each entry's: the most its speed-up can be
    (with a network evaluation costing the same in both, as on one device and batch size)."""
    ref = sampler_nfe(entries[reference][1], entries[reference][2])
    return {name: ref / sampler_nfe(steps, sampler) for name, (_, steps, sampler) in entries.items()}


def speedups(latency: dict[str, float], reference: str) -> dict[str, float]:
    """latency[reference] / latency[name] for every entry (the reference itself is 1)."""
    if reference not in latency:
        raise KeyError(f"no latency measured for the reference {reference!r}; have {sorted(latency)}")
    return {name: latency[reference] / value for name, value in latency.items()}
