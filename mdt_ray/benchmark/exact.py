"""The exact velocity field of a Gaussian-mixture (or Dirac-mixture) data distribution.

Under TRELLIS's path x_t = a·x0 + b·ε with a = 1 − t, b = σ_min + (1 − σ_min)·t, a component
x0 ~ N(μ_m, s²·I) gives x_t | m ~ N(a·μ_m, (a²s² + b²)·I). Every component shares that isotropic
variance, so the posterior over components is a softmax of log w_m − ‖x_t − a·μ_m‖² / (2·var),
and within a component (Gaussian conditioning)

    E[x0 | x_t, m] = μ_m + (a·s²/var)·(x_t − a·μ_m),   E[ε | x_t, m] = (b/var)·(x_t − a·μ_m).

The optimal velocity E[(1 − σ_min)·ε − x0 | x_t] is therefore affine in the posterior mean of
the component means μ̄ = Σ_m π_m·μ_m:

    v* = c·(x_t − a·μ̄) − μ̄,   c = ((1 − σ_min)·b − a·s²) / var.

Written as c·(x_t − a·μ̄) rather than c·x_t − (1 + a·c)·μ̄ because near t = 0 the factor c is
~1/σ_min and x_t − a·μ̄ is the small difference that must not cancel in float32.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def _coefficients(t: torch.Tensor, sigma: float, sigma_min: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = 1.0 - t
    b = sigma_min + (1.0 - sigma_min) * t
    var = a * a * sigma * sigma + b * b
    return a, var, ((1.0 - sigma_min) * b - a * sigma * sigma) / var


def posterior(x_t: torch.Tensor, t: torch.Tensor, means: torch.Tensor, weights: torch.Tensor, sigma: float,
              sigma_min: float = 1e-5) -> torch.Tensor:
    """Posterior component probabilities π (B, M) at x_t (B, *S), computed in float64.

    The squared distances are summed as differences, not as ‖x‖² − 2·x·μ + ‖μ‖², whose cancellation
    would swamp the gaps between components once var is ~σ_min²."""
    if weights.dim() != 1 or weights.shape[0] != means.shape[0]:
        raise ValueError(f"exact_velocity: weights must be (M,) = ({means.shape[0]},), got {tuple(weights.shape)}")
    if (weights < 0).any() or not torch.isfinite(weights).all() or float(weights.sum()) <= 0:
        raise ValueError("exact_velocity: weights must be finite, non-negative and not all zero")
    if tuple(x_t.shape[1:]) != tuple(means.shape[1:]):
        raise ValueError(f"exact_velocity: x_t has sample shape {tuple(x_t.shape[1:])}, means "
                         f"{tuple(means.shape[1:])}")
    if t.dim() != 1 or t.shape[0] != x_t.shape[0]:
        raise ValueError(f"exact_velocity: t must be (B,) = ({x_t.shape[0]},), got {tuple(t.shape)}")
    if sigma < 0:
        raise ValueError(f"exact_velocity: sigma must be >= 0, got {sigma}")
    x = x_t.reshape(x_t.shape[0], -1).double()
    mu = means.reshape(means.shape[0], -1).to(x)
    a, var, _ = _coefficients(t.double(), float(sigma), float(sigma_min))
    log_w = torch.log(weights.double() / weights.double().sum())
    dist = torch.empty(x.shape[0], mu.shape[0], dtype=torch.float64, device=x.device)
    for m in range(mu.shape[0]):  # M passes of (B, D) instead of one (B, M, D) tensor
        dist[:, m] = (x - a[:, None] * mu[m]).pow(2).sum(dim=1)
    # A zero-weight component must be impossible, not merely unlikely: log 0 = −inf does that.
    logits = log_w[None] - dist / (2 * var[:, None])
    return torch.softmax(logits, dim=1)


def exact_velocity(x_t: torch.Tensor, t: torch.Tensor, means: torch.Tensor, weights: torch.Tensor, sigma: float,
                   sigma_min: float = 1e-5) -> torch.Tensor:
    """v*(x_t, t) = E[(1 − σ_min)·ε − x0 | x_t] for x0 ~ Σ_m w_m·N(μ_m, σ²·I) (Dirac when σ = 0).

    x_t (B, *S), t (B,) in [0, 1], means (M, *S), weights (M,) non-negative (normalised here),
    sigma ≥ 0. Returns (B, *S) in x_t's dtype; the posterior and the combination run in float64.
    """
    pi = posterior(x_t, t, means, weights, sigma, sigma_min)
    mu = means.reshape(means.shape[0], -1).double()
    mu_bar = pi @ mu
    a, _, c = _coefficients(t.double(), float(sigma), float(sigma_min))
    x = x_t.reshape(x_t.shape[0], -1).double()
    v = c[:, None] * (x - a[:, None] * mu_bar) - mu_bar
    return v.reshape(x_t.shape).to(x_t.dtype)


class ExactTeacher(torch.nn.Module):
    """The exact velocity as a TRELLIS-style model `f(x, 1000·t, cond)`.

    `cond_tokens` (K, T, C) are the conditions' tokens; condition k's data are the Dirac/Gaussian
    components `components[k]` (indices into `means`) with `weights[k]`. A cond batch row equal to
    one of the tokens (nearest within `tol`) selects that condition; the all-zero row (the negative
    condition the objectives pass for CFG) selects every component, weighted by
    prior[k]·weights[k] — the unconditional distribution, so guided velocities are exact too.
    """

    def __init__(self, means: torch.Tensor, cond_tokens: torch.Tensor, components: Sequence[Sequence[int]],
                 weights: Sequence[Sequence[float]], *, prior: Optional[Sequence[float]] = None, sigma: float = 0.0,
                 sigma_min: float = 1e-5, tol: float = 1e-2):
        super().__init__()
        if len(components) != cond_tokens.shape[0] or len(weights) != len(components):
            raise ValueError(f"ExactTeacher: {cond_tokens.shape[0]} conditions, {len(components)} component lists, "
                             f"{len(weights)} weight lists")
        # float64: the posterior runs in float64, and converting 32768-dim means every call costs.
        self.register_buffer("means", means.double())
        self.register_buffer("cond_tokens", cond_tokens.float())
        k = len(components)
        prior = [1.0 / k] * k if prior is None else list(prior)
        table = torch.zeros(k + 1, means.shape[0], dtype=torch.float64)
        for i, (idx, w) in enumerate(zip(components, weights)):
            w = torch.as_tensor(w, dtype=torch.float64)
            table[i, list(idx)] = w / w.sum()
            table[k, list(idx)] += prior[i] * w / w.sum()
        self.register_buffer("weight_table", table)  # row k (the last): unconditional
        self.sigma, self.sigma_min, self.tol = float(sigma), float(sigma_min), float(tol)
        # Distillation builds students from a model's TRELLIS config; the exact teacher has none.
        self.config_args: dict = {}

    def condition_index(self, cond: torch.Tensor) -> torch.Tensor:
        """(B,) condition of each cond row; K (one past the last) for the zero condition."""
        flat = cond.reshape(cond.shape[0], -1).float()
        zero = flat.abs().amax(dim=1) == 0
        ref = self.cond_tokens.reshape(self.cond_tokens.shape[0], -1)
        dist = torch.cdist(flat, ref) / ref.shape[1] ** 0.5
        best, idx = dist.min(dim=1)
        bad = ~zero & (best > self.tol)
        if bad.any():
            raise ValueError(f"ExactTeacher: cond row {int(bad.nonzero()[0])} matches none of the "
                             f"{ref.shape[0]} conditions (rms distance {float(best[bad][0]):.3g} > {self.tol})")
        return torch.where(zero, torch.full_like(idx, ref.shape[0]), idx)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = t / 1000.0
        which = self.condition_index(cond)
        out = torch.empty_like(x)
        for k in which.unique().tolist():
            rows = (which == k).nonzero().flatten()
            w = self.weight_table[k]
            keep = (w > 0).nonzero().flatten()
            out[rows] = exact_velocity(x[rows], t[rows], self.means[keep], w[keep], self.sigma, self.sigma_min)
        return out
