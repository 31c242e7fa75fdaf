"""Stage 1: the dense flow transformer over the 16³×8 sparse-structure latent.

Parameter names, constructor arguments and numerics are those of TRELLIS's
`SparseStructureFlowModel`, so its `.json` + `.safetensors` checkpoints load
strictly and our students export back into the same format. Call convention:
`model(x_t, 1000·t, cond) → velocity`, x_t (B, C, R, R, R) float32, cond (B, T, C_cond).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mdt_ray.models.modules import (
    ModulatedTransformerCrossBlock, absolute_position_embedding, convert_to_fp16,
    fp32_region, init_flow_weights, setup_flow_model,
)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, R, R, R) → (B, C·p³, R/p, R/p, R/p); channel index = c·p³ + i·p² + j·p + k."""
    b, c, *dims = x.shape
    if any(d % p for d in dims):
        raise ValueError(f"spatial shape {dims} not divisible by patch_size {p}")
    x = x.reshape(b, c, dims[0] // p, p, dims[1] // p, p, dims[2] // p, p)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * p**3, *(d // p for d in dims))


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    b, cp, *dims = x.shape
    c = cp // p**3
    x = x.reshape(b, c, p, p, p, *dims)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, *(d * p for d in dims))


class SparseStructureFlowModel(nn.Module):
    def __init__(self, resolution: int, in_channels: int, model_channels: int, cond_channels: int,
                 out_channels: int, num_blocks: int, num_heads: int | None = None, num_head_channels: int = 64,
                 mlp_ratio: float = 4, patch_size: int = 2, pe_mode: str = "ape", use_fp16: bool = False,
                 use_checkpoint: bool = False, share_mod: bool = False, qk_rms_norm: bool = False,
                 qk_rms_norm_cross: bool = False):
        # Constructor arguments in signature order: `export_trellis` writes them as the json "args".
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.config_args = args
        if pe_mode != "ape":
            raise ValueError(f"pe_mode {pe_mode!r} is not supported (TRELLIS's released models use 'ape')")
        if resolution % patch_size:
            raise ValueError(f"resolution {resolution} not divisible by patch_size {patch_size}")
        setup_flow_model(self, args)
        # Tokens follow the 'ij' meshgrid, i.e. the C order of the flattened patch grid; TRELLIS
        # saves this buffer in the checkpoint, so it must stay persistent.
        g = torch.arange(resolution // patch_size)
        coords = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)
        self.register_buffer("pos_emb", absolute_position_embedding(coords, model_channels))
        self.input_layer = nn.Linear(in_channels * patch_size**3, model_channels)
        self.blocks = nn.ModuleList([
            ModulatedTransformerCrossBlock(model_channels, cond_channels, num_heads=self.num_heads,
                                           mlp_ratio=mlp_ratio, use_checkpoint=use_checkpoint, share_mod=share_mod,
                                           qk_rms_norm=qk_rms_norm, qk_rms_norm_cross=qk_rms_norm_cross)
            for _ in range(num_blocks)
        ])
        self.out_layer = nn.Linear(model_channels, out_channels * patch_size**3)

        self.initialize_weights()
        if use_fp16:
            convert_to_fp16(self)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The torso's activation dtype: that of the block weights (fp16 with `use_fp16`), so a
        model cast with `.float()` (an fp32 student from fp16 teacher weights) or `.double()` runs."""
        return self.blocks[0].self_attn.to_qkv.weight.dtype if self.num_blocks else self.input_layer.weight.dtype

    def initialize_weights(self) -> None:
        init_flow_weights(self)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, R, R, R); t (B,) already 1000·t; cond (B, T, C_cond) → (B, C_out, R, R, R)."""
        b = x.shape[0]
        expected = (b, self.in_channels, *[self.resolution] * 3)
        if tuple(x.shape) != expected:
            raise ValueError(f"x must have shape {expected}, got {tuple(x.shape)}")
        if cond.dim() != 3 or cond.shape[0] != b or cond.shape[2] != self.cond_channels:
            raise ValueError(f"cond must be (B={b}, T, {self.cond_channels}), got {tuple(cond.shape)}")
        p, r = self.patch_size, self.resolution // self.patch_size

        h = patchify(x, p).reshape(b, self.in_channels * p**3, -1).transpose(1, 2)
        h = self.input_layer(h) + self.pos_emb[None]
        t_emb = self.t_embedder(t)
        if self.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        t_emb, h, cond = t_emb.to(self.dtype), h.to(self.dtype), cond.to(self.dtype)
        for block in self.blocks:
            h = block(h, t_emb, cond)

        with fp32_region(x.device.type):
            h = F.layer_norm(h.to(x.dtype), h.shape[-1:])
            h = self.out_layer(h)
        h = h.transpose(1, 2).reshape(b, self.out_channels * p**3, r, r, r)
        return unpatchify(h, p)
