"""A tiny smooth conditional velocity network for objective tests: (B, C, R, R, R) in and out,
called like TRELLIS models as f(x, 1000·t, cond). Nonlinear in x and t so that time derivatives,
JVPs and finite differences are all non-trivial."""

import torch
import torch.nn as nn


class ToyFlow(nn.Module):
    def __init__(self, channels: int = 2, cond_dim: int = 3, seed: int = 0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_in = nn.Parameter(torch.randn(channels, channels, generator=g, dtype=dtype) * 0.5)
        self.w_t = nn.Parameter(torch.randn(channels, generator=g, dtype=dtype))
        self.w_c = nn.Parameter(torch.randn(cond_dim, channels, generator=g, dtype=dtype) * 0.5)
        self.calls = 0

    def forward(self, x, t, cond):
        self.calls += 1
        s = (t / 1000).to(x.dtype).reshape(-1, 1, 1, 1, 1)
        c = cond.mean(dim=1) @ self.w_c  # (B, C)
        h = torch.einsum("bcxyz,cd->bdxyz", x, self.w_in)
        return torch.tanh(h + s * self.w_t.reshape(1, -1, 1, 1, 1)) * (1 + s) + c.reshape(*c.shape, 1, 1, 1) * torch.cos(3 * s)
