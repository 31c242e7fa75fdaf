"""Flow-matching math in TRELLIS's convention.

t ∈ [0, 1], t = 1 is noise, t = 0 is data, and
    x_t = (1 − t)·x_0 + (σ_min + (1 − σ_min)·t)·ε,     v = (1 − σ_min)·ε − x_0.
Models are called as `model(x_t, 1000·t, cond)`.

Everything here works on dense tensors (B, ...) and on stage-2 sparse batches: the few
operations that depend on the batch layout (`expand_t`, `cat_batch`, `split_batch`,
`per_sample_norm`, `per_sample_mean`) dispatch to the sparse type's own methods.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

Batch = Any  # torch.Tensor or mdt_ray.models.sparse.SparseBatch


# ---------------------------------------------------------------------------------------------
# Layout-dependent helpers (dense here; sparse batches implement the same-named methods)


def expand_t(t: torch.Tensor, x: Batch) -> Any:
    """Per-sample values (B,) shaped to broadcast against `x`."""
    if isinstance(x, torch.Tensor):
        return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return x.expand_per_sample(t)


def cat_batch(xs: Sequence[Batch]) -> Batch:
    if isinstance(xs[0], torch.Tensor):
        return torch.cat(list(xs), dim=0)
    return type(xs[0]).cat(xs)


def split_batch(x: Batch, n: int) -> list[Batch]:
    """Inverse of `cat_batch` of `n` equal-sized batches."""
    if isinstance(x, torch.Tensor):
        return list(x.chunk(n, dim=0))
    return x.split(n)


def per_sample_norm(x: Batch) -> torch.Tensor:
    """L2 norm over every non-batch element of each sample, (B,)."""
    if isinstance(x, torch.Tensor):
        x = x.flatten(1)
        return (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).norm(dim=1)
    return x.per_sample_norm()


def per_sample_mean(x: Batch) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.flatten(1).mean(dim=1)
    return x.per_sample_mean()


def batch_size(x: Batch) -> int:
    return x.shape[0] if isinstance(x, torch.Tensor) else x.batch_size


def randn_like(x: Batch, generator: Optional[torch.Generator] = None) -> Batch:
    """Gaussian noise with `x`'s layout (for sparse batches: on the same coordinates)."""
    if isinstance(x, torch.Tensor):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x.randn_like(generator=generator)


# ---------------------------------------------------------------------------------------------
# The path


def diffuse(x0: Batch, noise: Batch, t: torch.Tensor, sigma_min: float = 1e-5) -> Batch:
    return expand_t(1 - t, x0) * x0 + expand_t(sigma_min + (1 - sigma_min) * t, x0) * noise


def velocity(x0: Batch, noise: Batch, sigma_min: float = 1e-5) -> Batch:
    """Ground-truth conditional velocity dx_t/dt."""
    return (1 - sigma_min) * noise - x0


def predict_x0(x_t: Batch, v: Batch, t: torch.Tensor, sigma_min: float = 1e-5) -> Batch:
    """TRELLIS's x̂_0 from a velocity estimate (exact when v is the true velocity)."""
    return (1 - sigma_min) * x_t - expand_t(sigma_min + (1 - sigma_min) * t, x_t) * v


def sample_t(
    n: int,
    *,
    schedule: str = "logit_normal",
    mean: float = 1.0,
    std: float = 1.0,
    dt: float = 0.0,
    sigma_min: float = 1e-5,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training times, shifted so that t − dt ≥ σ_min (MDT-dist `sample_t`).

    Pass dt = 0 for objectives that take no step back (continuous derivative, sCM, plain FM).
    """
    if schedule == "logit_normal":
        u = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    elif schedule == "uniform":
        u = torch.rand(n, generator=generator, device=device)
    else:
        raise ValueError(f"unknown time schedule {schedule!r} (logit_normal | uniform)")
    return sigma_min + dt + (1 - dt - sigma_min) * u


# ---------------------------------------------------------------------------------------------
# Sampling


def time_grid(steps: int, rescale_t: float = 1.0) -> list[float]:
    """TRELLIS's grid: linspace(1, 0, steps + 1) warped by t ↦ r·t / (1 + (r − 1)·t)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if rescale_t <= 0:
        raise ValueError(f"rescale_t must be > 0, got {rescale_t}")
    s = [1 - i / steps for i in range(steps + 1)]
    return [rescale_t * v / (1 + (rescale_t - 1) * v) for v in s]


def guided_velocity(
    model: Callable,
    x: Batch,
    t: torch.Tensor,
    cond: torch.Tensor,
    neg_cond: Optional[torch.Tensor],
    w: float,
) -> Batch:
    """(1 + w)·v(c) − w·v(c∅); the two branches run as one batched forward pass."""
    if w == 0 or neg_cond is None:
        return model(x, 1000 * t, cond)
    v = model(cat_batch([x, x]), 1000 * torch.cat([t, t]), torch.cat([cond, neg_cond]))
    v_cond, v_uncond = split_batch(v, 2)
    return (1 + w) * v_cond - w * v_uncond


@torch.no_grad()
def sample(
    model: Callable,
    noise: Batch,
    cond: torch.Tensor,
    neg_cond: Optional[torch.Tensor] = None,
    *,
    steps: int,
    cfg_strength: float = 0.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    rescale_t: float = 1.0,
    sigma_min: float = 1e-5,
) -> Batch:
    """Few-step Euler sampler with CFG inside a guidance interval (TRELLIS semantics).

    Guidance applies where the current t lies in the closed `cfg_interval`; elsewhere the
    conditional velocity alone is used. `sigma_min` is accepted for API symmetry: TRELLIS's
    Euler update does not use it.
    """
    del sigma_min
    n = batch_size(noise)
    if cond.shape[0] == 1 and n > 1:
        cond = cond.expand(n, *cond.shape[1:])
    if neg_cond is None and cfg_strength > 0:
        neg_cond = torch.zeros_like(cond)
    elif neg_cond is not None and neg_cond.shape[0] == 1 and n > 1:
        neg_cond = neg_cond.expand(n, *neg_cond.shape[1:])
    grid = time_grid(steps, rescale_t)
    x = noise
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        t = torch.full((n,), t_cur, device=cond.device, dtype=torch.float32)
        guided = cfg_strength > 0 and cfg_interval[0] <= t_cur <= cfg_interval[1]
        v = guided_velocity(model, x, t, cond, neg_cond if guided else None, cfg_strength if guided else 0.0)
        x = x - (t_cur - t_next) * v
    return x


def num_function_evals(steps: int, cfg_strength: float, cfg_interval=(0.0, 1.0), rescale_t: float = 1.0) -> int:
    """Network evaluations (per sample) that `sample` spends; guided steps cost two."""
    grid = time_grid(steps, rescale_t)
    return sum(
        2 if cfg_strength > 0 and cfg_interval[0] <= t <= cfg_interval[1] else 1 for t in grid[:-1]
    )

