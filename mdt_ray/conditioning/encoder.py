"""The frozen image encoder: DINOv2 with registers, as TRELLIS conditions on it.

TRELLIS encodes each 518² view with DINOv2 ViT-L/14 with 4 registers (`dinov2_vitl14_reg`),
takes the tokens after the last block and before the final norm (`x_prenorm`: class token, 4
registers, 37² patches = 1374 tokens) and layer-normalises them without affine parameters.

The network is written here, in DINOv2's own module and parameter names, so that the original
checkpoint (`dinov2_vitl14_reg4_pretrain.pth`) loads strictly. timm's implementation was the
first choice, but timm imports torchvision unconditionally, and no torchvision build on the
package registry runs with the CPU build of torch 2.13.0 this project pins: 0.28.0 (the release
for torch 2.13) ships only the CUDA build, whose extension links libtorch_cuda.so, and 0.29.x
requires torch 2.14 (docs/scaling.md, section on the encoder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCH_KEYS = ("embed_dim", "depth", "num_heads", "patch_size", "num_register_tokens", "img_size")
# DINOv2's hub models with registers (hubconf: init_values 1.0, MLP feed-forward, 518² positions).
ARCHS: dict[str, dict[str, int]] = {
    "dinov2_vits14_reg": dict(embed_dim=384, depth=12, num_heads=6, patch_size=14, num_register_tokens=4, img_size=518),
    "dinov2_vitb14_reg": dict(embed_dim=768, depth=12, num_heads=12, patch_size=14, num_register_tokens=4,
                              img_size=518),
    "dinov2_vitl14_reg": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=14, num_register_tokens=4,
                              img_size=518),
}


class EncoderError(ValueError):
    """An image-encoder checkpoint or architecture that cannot be used; the message names it."""


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, 4 * dim)
        self.ls2 = _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """DINOv2's ViT with registers, parameter names as in its checkpoints; `prenorm` gives x_prenorm."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, patch_size: int, num_register_tokens: int,
                 img_size: int):
        super().__init__()
        if embed_dim % num_heads:
            raise EncoderError(f"image encoder: embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        grid = img_size // patch_size
        self.patch_size, self.grid = patch_size, grid
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # in the checkpoint; unused without masks
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)  # in the checkpoint; x_prenorm comes before it

    def _positions(self, rows: int, cols: int) -> torch.Tensor:
        if rows == cols == self.grid:
            return self.pos_embed
        # DINOv2 with registers (interpolate_offset 0, antialias) resizes the grid to the exact size.
        dim = self.pos_embed.shape[-1]
        patch = self.pos_embed[:, 1:].float().reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(rows, cols), mode="bicubic", antialias=True)
        patch = patch.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(self.pos_embed.dtype)
        return torch.cat([self.pos_embed[:, :1], patch], dim=1)

    def prenorm(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self._positions(h // self.patch_size, w // self.patch_size)
        # Registers join after the positions are added: they carry none.
        tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return tokens


def arch_args(arch: Union[str, dict[str, Any]]) -> dict[str, int]:
    """DINOv2 constructor arguments of a named arch, or a dict of them checked."""
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise EncoderError(f"unknown image encoder arch {arch!r}; known: {sorted(ARCHS)}, or a dict of {ARCH_KEYS}")
        return dict(ARCHS[arch])
    unknown, missing = sorted(set(arch) - set(ARCH_KEYS)), [k for k in ARCH_KEYS if k not in arch]
    if unknown or missing:
        raise EncoderError(f"image encoder arch: unknown keys {unknown}, missing keys {missing} (it takes {ARCH_KEYS})")
    return {k: int(arch[k]) for k in ARCH_KEYS}


def load_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The tensors of a `.pth` state dict (read with weights_only=True) or a `.safetensors` file."""
    p = Path(path)
    if not p.is_file():
        raise EncoderError(f"model.image_encoder: no checkpoint file at {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many kinds for a damaged file
        raise EncoderError(f"model.image_encoder: cannot read {p} ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EncoderError(f"model.image_encoder: {p} is not a state dict of tensors")
    return state


class ImageEncoder(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> condition tokens (B, 1 + registers + patches, C), float32.

    ImageNet normalisation, DINOv2's x_prenorm, then a layer norm without affine parameters.
    """

    def __init__(self, vit: DinoV2, arch: dict[str, int]):
        super().__init__()
        self.vit, self.arch = vit, dict(arch)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    @classmethod
    def build(cls, arch: Union[str, dict[str, Any]] = "dinov2_vitl14_reg") -> "ImageEncoder":
        args = arch_args(arch)
        return cls(DinoV2(**args), args)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], arch: Union[str, dict[str, Any]] = "dinov2_vitl14_reg"
                        ) -> "ImageEncoder":
        """The encoder with the weights of `path` (DINOv2's key layout, loaded strictly)."""
        encoder = cls.build(arch)
        state = load_state_dict(path)
        mine = encoder.vit.state_dict()
        missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in mine.items()
                 if k in state and state[k].shape != v.shape]
        if missing or unexpected or wrong:
            more = lambda keys: " ..." if len(keys) > 4 else ""  # noqa: E731
            raise EncoderError(
                f"model.image_encoder: {path} does not fit arch {arch!r}: missing {missing[:4]}{more(missing)}, "
                f"unexpected {unexpected[:4]}{more(unexpected)}, shape {wrong[:3]}")
        encoder.vit.load_state_dict({k: v.float() for k, v in state.items()})
        return encoder

    @property
    def width(self) -> int:
        return self.arch["embed_dim"]

    def num_tokens(self, size: int) -> int:
        return 1 + self.arch["num_register_tokens"] + (size // self.arch["patch_size"]) ** 2

    def freeze(self, device: torch.device | str, bf16: bool = True) -> "ImageEncoder":
        """Eval mode, no grad, on `device`; bf16 weights on GPU when asked (it never trains)."""
        self.to(device).eval().requires_grad_(False)
        if bf16 and torch.device(device).type == "cuda":
            self.vit.to(torch.bfloat16)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"the image encoder takes (B, 3, H, W) images, got {tuple(images.shape)}")
        x = ((images.float() - self.mean) / self.std).to(self.vit.cls_token.dtype)
        tokens = self.vit.prenorm(x)
        return F.layer_norm(tokens.float(), tokens.shape[-1:])


def flop_counter():
    """torch.utils.flop_counter's counter, also counting the CPU kernel of scaled_dot_product_attention
    (torch 2.13 registers a formula for the CUDA kernels only, so CPU counts miss every attention)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa})


def flops_per_image(arch: Union[str, dict[str, Any]], size: int = 518) -> int:
    """Forward FLOPs of one image, counted by torch.utils.flop_counter on fake CPU tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        encoder = ImageEncoder.build(arch)
        images = torch.zeros(1, 3, size, size)
        with flop_counter() as counter:
            encoder(images)
    return int(counter.get_total_flops())
