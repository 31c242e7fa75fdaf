"""Transformer building blocks shared by the stage-1 (dense) and stage-2 (sparse) flow models.

Every block works on plain token tensors (B, N, C), so the sparse model can reuse them on its
voxels padded to a common length (with a key-padding mask) or packed into one sequence (with a
block-diagonal mask). Module and attribute names follow TRELLIS (`trellis/modules/*`) exactly:
they are the checkpoint's key names.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

# Module types whose parameters TRELLIS stores in fp16 inside the transformer containers.
FP16_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
FP16_CONTAINERS = ("blocks", "input_blocks", "out_blocks")


def fp32_region(device_type: str):
    """Switch autocast off where reduced precision would hurt: the time MLP (its input must tell
    t and t - Δt apart for the VM finite difference) and the output head (fp32 in TRELLIS)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, so a `.double()` model can be checked by finite differences)."""
    return x if x.dtype == torch.float64 else x.float()


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class TimestepEmbedder(nn.Module):
    """Embeds t_model = 1000·t (not rounded) as [cos, sin] frequencies, then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        # Same float32 expression order as TRELLIS so the embedding matches it bit for bit.
        t = _wide(t)
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
        args = t[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        with fp32_region(t.device.type):
            emb = self.timestep_embedding(t, self.frequency_embedding_size)
            return self.mlp(emb.to(self.mlp[0].weight.dtype))


def absolute_position_embedding(coords: torch.Tensor, channels: int) -> torch.Tensor:
    """Sinusoidal embedding of integer coordinates (N, D) → (N, channels) float32.

    Per axis [sin(c·f), cos(c·f)] with freq_dim = channels // D // 2 frequencies 10000^(-j/freq_dim);
    axes concatenated in order, then zero padded to `channels` (TRELLIS-L: 170 freqs, 4 pads).
    """
    n, d = coords.shape
    freq_dim = channels // d // 2
    freqs = torch.arange(freq_dim, dtype=torch.float32, device=coords.device) / freq_dim
    freqs = 1.0 / (10000 ** freqs)
    args = torch.outer(coords.reshape(-1).float(), freqs)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1).reshape(n, -1)
    if emb.shape[1] < channels:
        emb = torch.cat([emb, emb.new_zeros(n, channels - emb.shape[1])], dim=-1)
    return emb


def setup_flow_model(model: nn.Module, args: dict) -> None:
    """What both TRELLIS flow transformers start with: every constructor argument as an attribute
    of the same name (as TRELLIS keeps them), the head count, the timestep embedder and, with
    `share_mod`, the one adaLN modulation all blocks share."""
    for name, value in args.items():
        setattr(model, name, value)
    width = args["model_channels"]
    model.num_heads = args["num_heads"] or width // args["num_head_channels"]
    model.t_embedder = TimestepEmbedder(width)
    if args["share_mod"]:
        model.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width, bias=True))


def init_flow_weights(model: nn.Module) -> None:
    """TRELLIS's initialisation of a flow transformer: xavier Linears with zero biases, N(0, 0.02)
    time-embedding MLP, and zeroed adaLN modulation so that every block starts as the identity."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for mod in [model.adaLN_modulation] if model.share_mod else [b.adaLN_modulation for b in model.blocks]:
        nn.init.zeros_(mod[-1].weight)
        nn.init.zeros_(mod[-1].bias)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm whose statistics and affine parameters stay fp32 inside fp16/bf16 torsos."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_wide(x)).to(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """Per-head L2 normalisation of q or k (…, heads, head_dim), scaled by gamma·sqrt(head_dim)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(_wide(x), dim=-1) * self.gamma * self.scale).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Lq, H, D), k/v (B, Lk, H, D) → (B, Lq, H, D).

    `mask`: None; a (B, Lk) bool key-padding mask (True = real token); or any boolean/additive mask
    broadcastable to (B, H, Lq, Lk), passed to SDPA as is.
    """
    if mask is not None and mask.dim() == 2:
        mask = mask[:, None, None, :]
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    try:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    except NotImplementedError:
        # The fused kernels (CPU flash, CUDA flash/efficient) have no forward-mode derivative, so
        # under torch.func.jvp (continuous-time VM, sCM) they refuse; the math path is composite.
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


class MultiHeadAttention(nn.Module):
    """Self-attention (fused `to_qkv`, laid out [q | k | v]) or cross-attention (`to_q`, `to_kv`
    laid out [k | v]), each split into (heads, head_dim), with optional QK RMS norm."""

    def __init__(self, channels: int, num_heads: int, ctx_channels: int | None = None, type: str = "self",
                 qkv_bias: bool = True, qk_rms_norm: bool = False):
        super().__init__()
        if type not in ("self", "cross"):
            raise ValueError(f"attention type must be 'self' or 'cross', got {type!r}")
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.channels = channels
        self.num_heads = num_heads
        self._type = type
        self.qk_rms_norm = qk_rms_norm
        if type == "self":
            self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(ctx_channels or channels, 2 * channels, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def project(self, x: torch.Tensor, context: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v split into (…, heads, head_dim), QK-normed. Any leading shape: the sparse model
        projects its packed voxels (N, C) and pads only for the attention kernel itself."""
        if self._type == "self":
            q, k, v = self.to_qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(dim=-3)
        else:
            if context is None:
                raise ValueError("cross-attention needs a context")
            q = self.to_q(x).unflatten(-1, (self.num_heads, -1))
            k, v = self.to_kv(context).unflatten(-1, (2, self.num_heads, -1)).unbind(dim=-3)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return q, k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x, context)
        return self.to_out(attention(q, k, v, mask).flatten(-2))


class FeedForwardNet(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ModulatedTransformerCrossBlock(nn.Module):
    """adaLN-modulated self-attention, plain cross-attention to the cond, modulated MLP.

    The cond enters only through cross-attention; t only through the six modulation chunks
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp). With `share_mod`, the model
    computes the chunks once and passes them as `mod` (B, 6C); otherwise `mod` is t_emb (B, C).
    """

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float = 4.0,
                 use_checkpoint: bool = False, share_mod: bool = False, qk_rms_norm: bool = False,
                 qk_rms_norm_cross: bool = False, qkv_bias: bool = True):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.share_mod = share_mod
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = MultiHeadAttention(channels, num_heads, type="self", qkv_bias=qkv_bias,
                                            qk_rms_norm=qk_rms_norm)
        self.cross_attn = MultiHeadAttention(channels, num_heads, ctx_channels=ctx_channels, type="cross",
                                             qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels, bias=True))

    def _forward(self, x, mod, context, mask=None, context_mask=None):
        if not self.share_mod:
            mod = self.adaLN_modulation(mod)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.self_attn(h, mask=mask)
        x = x + self.cross_attn(self.norm2(x), context, mask=context_mask)
        h = self.norm3(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.mlp(h)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C), mod (B, C) or (B, 6C), context (B, T, C_ctx); masks as in `attention`."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, mod, context, mask, context_mask, use_reentrant=False)
        return self._forward(x, mod, context, mask, context_mask)


def convert_to_fp16(model: nn.Module, extra_types: tuple[type[nn.Module], ...] = ()) -> nn.Module:
    """TRELLIS's mixed precision: only Linear/Conv (plus `extra_types`, e.g. a sparse conv) inside
    the transformer containers become fp16. Norm affines, RMS gammas, the t-MLP, the input/output
    layers and buffers stay fp32, which is also the dtype layout of the released checkpoints."""
    return convert_torso(model, torch.float16, extra_types)


def convert_torso(model: nn.Module, dtype: torch.dtype, extra_types: tuple[type[nn.Module], ...] = ()) -> nn.Module:
    """The same layout with another torso dtype: a frozen teacher runs its blocks in bf16 on GPU
    while its embedders, norms and head stay fp32."""
    types = FP16_MODULE_TYPES + tuple(extra_types)
    for name in FP16_CONTAINERS:
        container = getattr(model, name, None)
        if container is None:
            continue
        for m in container.modules():
            if isinstance(m, types):
                m.to(dtype)
    return model
