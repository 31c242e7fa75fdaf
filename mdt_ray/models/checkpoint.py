"""TRELLIS checkpoints: a `<name>.json` ({"name": class, "args": constructor args}) next to a
`<name>.safetensors` state dict. Loading is strict, like TRELLIS's `from_pretrained`;
exporting writes the pair that an unmodified TRELLIS pipeline loads.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from mdt_ray.models.registry import build_model, model_classes


class CheckpointMismatchError(RuntimeError):
    """The state dict in a checkpoint file does not fit the model its json describes."""


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def _compare(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape
    )
    return missing, unexpected, wrong_shape


def _read_pair(json_path: str | os.PathLike, safetensors_path: str | os.PathLike | None) -> tuple[Path, Path, dict]:
    """(json path, safetensors path, the json's {"name", "args"}) of a TRELLIS checkpoint pair."""
    json_path = Path(json_path)
    _require_file(json_path, "TRELLIS model config")
    st_path = Path(safetensors_path) if safetensors_path is not None else json_path.with_suffix(".safetensors")
    _require_file(st_path, "TRELLIS weights")
    try:
        cfg = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or "name" not in cfg or "args" not in cfg:
        raise ValueError(f"{json_path} must hold {{'name': ..., 'args': {{...}}}}")
    if cfg["name"] not in model_classes():
        raise ValueError(f"{json_path} names model class {cfg['name']!r}; known: {sorted(model_classes())}")
    return json_path, st_path, cfg


def _raise_mismatch(model: nn.Module, tensors: dict[str, torch.Tensor], cfg: dict, json_path: Path, st_path: Path,
                    strict: bool) -> tuple[list[str], list[str]]:
    """CheckpointMismatchError naming what does not fit; else the (missing, unexpected) keys."""
    missing, unexpected, wrong_shape = _compare(model, tensors)
    problems = []
    if wrong_shape:
        problems.append(f"shape mismatches: {wrong_shape}")
    if strict and missing:
        problems.append(f"missing keys: {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if problems:
        raise CheckpointMismatchError(
            f"{st_path} does not fit {cfg['name']} as configured by {json_path.name}: " + "; ".join(problems))
    return missing, unexpected


def check_trellis(json_path: str | os.PathLike, safetensors_path: str | os.PathLike | None = None) -> None:
    """Raise what `load_trellis` would about the pair, from the json and the safetensors header
    alone: the model is built on the meta device and no weight is read, so a driver can check a
    multi-GB teacher in milliseconds before any worker starts."""
    from safetensors import safe_open

    json_path, st_path, cfg = _read_pair(json_path, safetensors_path)
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except ValueError as e:
        raise ValueError(f"{json_path}: {e}") from None
    with safe_open(str(st_path), framework="pt") as f:
        tensors = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    _raise_mismatch(model, tensors, cfg, json_path, st_path, strict=True)


def load_trellis(json_path: str | os.PathLike, safetensors_path: str | os.PathLike | None = None, *,
                 device: str | torch.device = "cpu", strict: bool = True) -> nn.Module:
    """Build the model the json names and load the safetensors into it.

    The json's `use_fp16` fixes the dtype layout (fp16 Linear weights inside the blocks, fp32
    elsewhere, as TRELLIS runs and stores them); each stored tensor is copied into its parameter,
    so an fp32 master-copy checkpoint of an fp16 model is cast the way TRELLIS's
    `load_state_dict` would. Shape mismatches always raise; with `strict`, so do missing and
    unexpected keys (otherwise those are skipped and reported with a warning).
    """
    json_path, st_path, cfg = _read_pair(json_path, safetensors_path)
    try:
        with torch.device(device):
            model = build_model(cfg)
    except ValueError as e:
        raise ValueError(f"{json_path}: {e}") from None
    tensors = load_file(str(st_path), device=str(device))
    missing, unexpected = _raise_mismatch(model, tensors, cfg, json_path, st_path, strict)
    if missing or unexpected:
        warnings.warn(f"{st_path}: loaded non-strictly; missing keys {missing}, unexpected keys {unexpected}")
        tensors = {k: v for k, v in tensors.items() if k not in unexpected}
    model.load_state_dict(tensors, strict=strict)
    return model


def _atomic_write(path: Path, write) -> None:
    """`write(tmp_path)` into a temp file in the same folder, fsync it, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unwrap(model: nn.Module) -> nn.Module:
    """Look through DDP (`.module`) and torch.compile (`._orig_mod`): their state-dict keys carry prefixes."""
    while not hasattr(model, "config_args"):
        inner = [getattr(model, a) for a in ("module", "_orig_mod") if isinstance(getattr(model, a, None), nn.Module)]
        if not inner:
            break
        model = inner[0]
    return model


def export_trellis(model: nn.Module, out_dir: str | os.PathLike, name: str, *,
                   fp16: bool | None = None) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.json` and `<name>.safetensors` in TRELLIS's layout; returns both paths.

    `fp16=None` follows the model (fp16 if any of its weights are fp16), which round-trips
    bit-exactly; `True` writes the released mixed layout (block Linear weights fp16, the rest fp32,
    json `use_fp16: true`), e.g. for a student trained with fp32 master weights; `False` all fp32.
    """
    model = _unwrap(model)
    args = getattr(model, "config_args", None)
    if args is None:
        raise ValueError(f"{type(model).__name__} has no `config_args`; build it through mdt_ray.models")
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    if fp16 is None:
        fp16 = any(v.dtype == torch.float16 for v in tensors.values())
    args = {**args, "use_fp16": fp16}
    # The model class's own fp16 rule decides which tensors are fp16: build the target layout on
    # the meta device (no memory, no init cost) and read its dtypes.
    with torch.device("meta"):
        layout = {k: v.dtype for k, v in type(model)(**args).state_dict().items()}
    tensors = {k: v.to(device="cpu", dtype=layout[k]).contiguous() for k, v in tensors.items()}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, st_path = out_dir / f"{name}.json", out_dir / f"{name}.safetensors"
    config = json.dumps({"name": type(model).__name__, "args": args}, indent=4)
    # The json is the pair's commit marker (loading starts from it): drop the old one before the
    # weights change and write the new one last, so a crash leaves the old pair, no pair, or the
    # new pair, never a json next to weights it does not describe.
    json_path.unlink(missing_ok=True)
    _atomic_write(st_path, lambda tmp: save_file(tensors, tmp))
    _atomic_write(json_path, lambda tmp: Path(tmp).write_text(config))
    return json_path, st_path


def save_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a flat dict of tensors as safetensors (training checkpoints reuse this)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    _require_file(path, "safetensors file")
    return load_file(str(path), device=str(device))
