"""Stage 2: the sparse flow transformer over structured latents (SLAT).

Parameter names, constructor arguments and numerics are those of TRELLIS's `SLatFlowModel`
so its `.json` + `.safetensors` checkpoints load strictly and students
export back into the same format. Call convention: `model(x_t, 1000·t, cond) → velocity`, x_t a
`SparseBatch` with (N, 8) float32 feats on the 64³ grid, cond (B, T, C_cond); the output sits on
x_t's coordinates in x_t's row order.

Shape of the network: sparse ResBlocks at full resolution, the last one average-pooling 2× into
the transformer's voxels; transformer blocks with attention within each sample and
cross-attention to the cond; ResBlocks that upsample back, each fed [h, skip].
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mdt_ray.models.modules import (
    LayerNorm32, ModulatedTransformerCrossBlock, absolute_position_embedding,
    convert_to_fp16, fp32_region, init_flow_weights, setup_flow_model,
)
from mdt_ray.models.sparse import (
    SparseBatch,
    SparseConv3d,
    SubMConv3d,
    sparse_downsample,
    sparse_upsample,
    varlen_cross_attention,
    varlen_self_attention,
)


def modulate(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return h * (1 + scale) + shift


class SparseResBlock3d(nn.Module):
    """Optional 2× down/upsample, then SiLU(LN_affine) → conv → LN·(1 + scale) + shift (t-modulated)
    → SiLU → conv, plus a linear skip when the width changes."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 downsample: bool = False, upsample: bool = False):
        super().__init__()
        if downsample and upsample:
            raise ValueError("a SparseResBlock3d cannot both downsample and upsample")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.downsample = downsample
        self.upsample = upsample
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(self.out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseConv3d(channels, self.out_channels, 3)
        self.conv2 = SparseConv3d(self.out_channels, self.out_channels, 3)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels, bias=True))
        self.skip_connection = (nn.Linear(channels, self.out_channels) if channels != self.out_channels
                                else nn.Identity())

    def forward(self, x: SparseBatch, emb: torch.Tensor) -> SparseBatch:
        scale, shift = self.emb_layers(emb).to(x.dtype).chunk(2, dim=1)
        if self.downsample:
            x = sparse_downsample(x, 2)
        elif self.upsample:
            x = sparse_upsample(x, 2)
        h = self.conv1(x.replace(F.silu(self.norm1(x.feats))))
        h = self.conv2(x.replace(F.silu(x.map_samples(modulate, self.norm2(h.feats), scale, shift))))
        return h + self.skip_connection(x.feats)


class SparseTransformerCrossBlock(ModulatedTransformerCrossBlock):
    """The dense cross block (same parameters and keys) run on packed voxels: every per-token
    op sees only real voxels; attention alone goes per sample (`varlen_*_attention`)."""

    def _sparse_forward(self, x: SparseBatch, feats: torch.Tensor, mod: torch.Tensor,
                        context: torch.Tensor) -> torch.Tensor:
        if not self.share_mod:
            mod = self.adaLN_modulation(mod)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        q, k, v = self.self_attn.project(x.map_samples(modulate, self.norm1(feats), scale_msa, shift_msa))
        h = self.self_attn.to_out(varlen_self_attention(q, k, v, x).flatten(-2))
        feats = feats + x.map_samples(torch.mul, h, gate_msa)
        q, k, v = self.cross_attn.project(self.norm2(feats), context)
        feats = feats + self.cross_attn.to_out(varlen_cross_attention(q, k, v, x).flatten(-2))
        h = self.mlp(x.map_samples(modulate, self.norm3(feats), scale_mlp, shift_mlp))
        return feats + x.map_samples(torch.mul, h, gate_mlp)

    def forward(self, x: SparseBatch, mod: torch.Tensor, context: torch.Tensor) -> SparseBatch:  # type: ignore[override]
        """x with (N, C) feats; mod (B, C) t_emb or (B, 6C) shared modulation; context (B, T, C_ctx)."""
        def run(feats, mod, context):
            return self._sparse_forward(x, feats, mod, context)

        if self.use_checkpoint and torch.is_grad_enabled():
            return x.replace(checkpoint(run, x.feats, mod, context, use_reentrant=False))
        return x.replace(run(x.feats, mod, context))


class SLatFlowModel(nn.Module):
    def __init__(self, resolution: int, in_channels: int, model_channels: int, cond_channels: int,
                 out_channels: int, num_blocks: int, num_heads: int | None = None, num_head_channels: int = 64,
                 mlp_ratio: float = 4, patch_size: int = 2, num_io_res_blocks: int = 2,
                 io_block_channels: list[int] | None = None, pe_mode: str = "ape", use_fp16: bool = False,
                 use_checkpoint: bool = False, use_skip_connection: bool = True, share_mod: bool = False,
                 qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False):
        # Constructor arguments in signature order: `export_trellis` writes them as the json "args".
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        if isinstance(args["io_block_channels"], tuple):
            args["io_block_channels"] = list(args["io_block_channels"])
        self.config_args = args
        if pe_mode != "ape":
            raise ValueError(f"pe_mode {pe_mode!r} is not supported (TRELLIS's released models use 'ape')")
        if not io_block_channels:
            raise ValueError("io_block_channels must list one width per 2× stage, e.g. [128] for patch_size 2")
        stages = int(round(math.log2(patch_size))) if patch_size > 0 else -1
        if patch_size < 1 or 2**stages != patch_size:
            raise ValueError(f"patch_size must be a power of 2, got {patch_size}")
        if stages != len(io_block_channels):
            raise ValueError(f"patch_size {patch_size} means {stages} 2× stage(s), but io_block_channels "
                             f"{io_block_channels} lists {len(io_block_channels)}")
        if num_io_res_blocks < 1:
            raise ValueError(f"num_io_res_blocks must be >= 1, got {num_io_res_blocks}")
        setup_flow_model(self, args)
        io = self.io_block_channels
        self.input_layer = nn.Linear(in_channels, io[0])
        self.input_blocks = nn.ModuleList()
        for chs, next_chs in zip(io, io[1:] + [model_channels]):
            self.input_blocks.extend(SparseResBlock3d(chs, model_channels) for _ in range(num_io_res_blocks - 1))
            self.input_blocks.append(SparseResBlock3d(chs, model_channels, next_chs, downsample=True))
        self.blocks = nn.ModuleList([
            SparseTransformerCrossBlock(model_channels, cond_channels, num_heads=self.num_heads, mlp_ratio=mlp_ratio,
                                        use_checkpoint=use_checkpoint, share_mod=share_mod, qk_rms_norm=qk_rms_norm,
                                        qk_rms_norm_cross=qk_rms_norm_cross)
            for _ in range(num_blocks)
        ])
        skip = 2 if use_skip_connection else 1
        self.out_blocks = nn.ModuleList()
        for chs, prev_chs in zip(reversed(io), [model_channels] + list(reversed(io[1:]))):
            self.out_blocks.append(SparseResBlock3d(prev_chs * skip, model_channels, chs, upsample=True))
            self.out_blocks.extend(SparseResBlock3d(chs * skip, model_channels, chs) for _ in range(num_io_res_blocks - 1))
        self.out_layer = nn.Linear(io[0], out_channels)

        self.initialize_weights()
        if use_fp16:
            convert_to_fp16(self, extra_types=(SubMConv3d,))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The torso's activation dtype: that of the torso weights (fp16 with `use_fp16`), so a
        model cast with `.float()` or `.double()` runs in that precision."""
        return self.input_blocks[0].conv1.conv.weight.dtype

    def initialize_weights(self) -> None:
        init_flow_weights(self)
        # Zeroed conv2 starts every ResBlock as its skip path, and the zeroed head predicts 0.
        for block in [*self.input_blocks, *self.out_blocks]:
            nn.init.zeros_(block.conv2.conv.weight)
            nn.init.zeros_(block.conv2.conv.bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def forward(self, x: SparseBatch, t: torch.Tensor, cond: torch.Tensor) -> SparseBatch:
        """x: SparseBatch, feats (N, C_in); t (B,) already 1000·t; cond (B, T, C_cond) →
        SparseBatch (N, C_out) on x's coordinates, row for row."""
        if not isinstance(x, SparseBatch):
            raise TypeError(f"SLatFlowModel takes a SparseBatch, got {type(x).__name__}")
        b = x.batch_size
        if x.feats.shape[1] != self.in_channels:
            raise ValueError(f"x.feats must be (N, {self.in_channels}), got {tuple(x.feats.shape)}")
        if cond.dim() != 3 or cond.shape[0] != b or cond.shape[2] != self.cond_channels:
            raise ValueError(f"cond must be (B={b}, T, {self.cond_channels}), got {tuple(cond.shape)}")
        if t.shape != (b,):
            raise ValueError(f"t must be (B={b},), got {tuple(t.shape)}")
        if 0 in x.counts:
            raise ValueError(f"every sample needs at least one voxel, got counts {x.counts}")

        h = x.replace(self.input_layer(x.feats).to(self.dtype))
        t_emb = self.t_embedder(t)
        if self.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        t_emb, cond = t_emb.to(self.dtype), cond.to(self.dtype)

        skips = []
        for block in self.input_blocks:
            h = block(h, t_emb)
            skips.append(h.feats)
        # APE on the pooled integer coords, recomputed per call (TRELLIS keeps no buffer for it).
        h = h + absolute_position_embedding(h.coords[:, 1:], self.model_channels).to(h.dtype)
        for block in self.blocks:
            h = block(h, t_emb, cond)
        for block, skip in zip(self.out_blocks, reversed(skips)):
            if self.use_skip_connection:
                h = h.replace(torch.cat([h.feats, skip], dim=1))
            h = block(h, t_emb)

        # TRELLIS normalises while still in the torso dtype, then runs the head in fp32.
        f = F.layer_norm(h.feats, h.feats.shape[-1:])
        with fp32_region(x.device.type):
            f = self.out_layer(f.to(x.dtype))
        return x.replace(f)
