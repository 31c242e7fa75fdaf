"""Build a flow model from TRELLIS's `{"name": ..., "args": {...}}` checkpoint config.

`NAMED_CONFIGS` are the built-in sizes a config may name as `model.teacher`. Synthetic-corpus
sizes use patch size 2 (512 tokens at resolution 16), which a 2-core CPU trains in minutes;
patch size 1 has 8× the tokens and attention grows with their square. Their cond width (64) is the synthetic corpus's token
width (mdt_ray.data.synthetic); TRELLIS sizes take DINOv2's 1024.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

_SS = "SparseStructureFlowModel"
_SLAT = "SLatFlowModel"


def _config(name: str, width: int, blocks: int, heads: int, *, cond: int, fp16: bool, resolution: int,
            **extra: Any) -> dict[str, Any]:
    return {"name": name, "args": {
        "resolution": resolution, "in_channels": 8, "out_channels": 8, "model_channels": width,
        "cond_channels": cond, "num_blocks": blocks, "num_heads": heads, "mlp_ratio": 4, **extra,
        "pe_mode": "ape", "qk_rms_norm": True, "use_fp16": fp16,
    }}


def _ss(width: int, blocks: int, heads: int, *, cond: int = 64, patch: int = 2, fp16: bool = False,
        resolution: int = 16) -> dict[str, Any]:
    return _config(_SS, width, blocks, heads, cond=cond, fp16=fp16, resolution=resolution, patch_size=patch)


def _slat(width: int, blocks: int, heads: int, io: list[int], *, cond: int = 64, fp16: bool = False,
          resolution: int = 64) -> dict[str, Any]:
    return _config(_SLAT, width, blocks, heads, cond=cond, fp16=fp16, resolution=resolution, patch_size=2,
                   num_io_res_blocks=2, io_block_channels=io)


NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "ss-tiny": _ss(64, 2, 4),  # tests
    "ss-demo": _ss(128, 4, 4),  # CPU demo and CPU benchmark
    "ss-B": _ss(768, 12, 12, cond=1024, patch=1, fp16=True),
    # TRELLIS-image-large stage 1 (ss_flow_img_dit_L_16l8_fp16): 555,543,560 parameters.
    "ss-L": _ss(1024, 24, 16, cond=1024, patch=1, fp16=True),
    "slat-tiny": _slat(64, 2, 4, [16]),  # tests
    "slat-demo": _slat(128, 4, 4, [32]),  # CPU demo
    # TRELLIS-image-large stage 2 (slat_flow_img_dit_L_64l8p2_fp16): 600,432,520 parameters.
    "slat-L": _slat(1024, 24, 16, [128], cond=1024, fp16=True),
}


def model_classes() -> dict[str, type[nn.Module]]:
    from mdt_ray.models.slat_flow import SLatFlowModel
    from mdt_ray.models.ss_flow import SparseStructureFlowModel

    # ElasticSLatFlowModel has SLatFlowModel's parameters; TRELLIS adds only memory-driven checkpointing.
    return {_SS: SparseStructureFlowModel, _SLAT: SLatFlowModel, "ElasticSLatFlowModel": SLatFlowModel}


def resolve_config(spec: str | dict[str, Any]) -> dict[str, Any]:
    """A named size or an explicit `{"name", "args"}` dict, returned as a fresh dict."""
    if isinstance(spec, str):
        if spec not in NAMED_CONFIGS:
            raise KeyError(f"unknown model name {spec!r}; known: {sorted(NAMED_CONFIGS)}")
        return copy.deepcopy(NAMED_CONFIGS[spec])
    if not isinstance(spec, dict) or "name" not in spec or "args" not in spec:
        raise ValueError(f"a model config is {{'name': ..., 'args': {{...}}}}, got {spec!r}")
    return copy.deepcopy(spec)


def build_model(spec: str | dict[str, Any], **overrides: Any) -> nn.Module:
    cfg = resolve_config(spec)
    classes = model_classes()
    if cfg["name"] not in classes:
        raise ValueError(f"unknown model class {cfg['name']!r}; known: {sorted(classes)}")
    args = {**cfg["args"], **overrides}
    try:
        return classes[cfg["name"]](**args)
    except TypeError as e:
        raise ValueError(f"bad arguments for {cfg['name']}: {e}") from None
