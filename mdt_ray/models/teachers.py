"""Teachers and students: where `model.teacher` points, building it, freezing it, copying it; and
the frozen image encoder that sits beside the teacher on image corpora (`model.image_encoder`).

`model.teacher` is a built-in size (`ss-demo`, ...), a TRELLIS `<name>.json` path, or a TRELLIS
pipeline (folder or Hugging Face id, see mdt_ray.models.pipeline) whose `model.stage` flow model it takes. Paths that do
not exist from the working directory are also tried from the repository (or installed package)
root, so the packaged `mdt_ray/assets/...` teacher resolves from any cwd, a Ray worker's included.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import torch

from mdt_ray.models.modules import convert_torso
from mdt_ray.models.registry import NAMED_CONFIGS, build_model

PACKAGED_TEACHER = "mdt_ray/assets/teacher_ss_demo.json"
_ROOT = Path(__file__).resolve().parents[2]


class ModelPathError(ValueError):
    """A checkpoint path that does not name a usable TRELLIS checkpoint; the message says why."""


def from_root(path: str | Path) -> Path:
    """`path` as given when it exists (or is absolute), else relative to the repository root."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (_ROOT / p).exists():
        return _ROOT / p
    return p


def resolve_model_path(path: str | Path) -> Path:
    """A TRELLIS `<name>.json` from a json path, a checkpoint dir (its `trellis/*.json`, or a json
    beside the weights), or a run dir (its latest `checkpoint_*`)."""
    p = from_root(path)
    if p.is_file():
        if p.suffix != ".json":
            raise ModelPathError(f"{p}: expected a TRELLIS <name>.json (with <name>.safetensors beside it)")
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for folder in (p / "trellis", p):
        found = sorted(j for j in folder.glob("*.json") if j.with_suffix(".safetensors").is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ModelPathError(f"{folder} holds several TRELLIS checkpoints ({', '.join(j.name for j in found)}); "
                                 "pass the .json of the one to evaluate")
    ckpts = sorted(c for c in p.glob("checkpoint_*") if c.is_dir())
    if ckpts:
        return resolve_model_path(ckpts[-1])
    raise FileNotFoundError(f"no TRELLIS <name>.json + <name>.safetensors in {p} (looked in {p}/trellis, {p} "
                            "and its checkpoint_* folders)")


def run_teacher_of(path: Path) -> Optional[str]:
    """`model.teacher` recorded in the state.json of the run checkpoint that holds `path`, if any."""
    for folder in (path.parent, path.parent.parent):
        state = folder / "state.json"
        if state.is_file():
            try:
                teacher = json.loads(state.read_text()).get("config", {}).get("model", {}).get("teacher")
            except (json.JSONDecodeError, AttributeError):
                return None
            return teacher if isinstance(teacher, str) else None
    return None


def teacher_spec(spec: str, stage: str = "ss") -> dict[str, Any]:
    """The teacher's TRELLIS `{"name", "args"}` without building it (driver-side checks); a
    pipeline folder or Hub id gives `stage`'s flow model."""
    from mdt_ray.models.pipeline import resolve_teacher

    if spec in NAMED_CONFIGS:
        return copy.deepcopy(NAMED_CONFIGS[spec])
    spec = resolve_teacher(spec, stage)
    path = from_root(spec)
    if not path.is_file():
        raise ModelPathError(f"model.teacher: no TRELLIS checkpoint config at {path} (expected <name>.json with "
                             f"<name>.safetensors beside it)")
    try:
        loaded = json.loads(path.read_text())
        loaded["name"], loaded["args"]
    except (ValueError, KeyError, TypeError):
        raise ModelPathError(f"model.teacher: {path} is not a TRELLIS model config "
                             "({\"name\": ..., \"args\": ...})") from None
    return loaded


def build_teacher(spec: str, seed: int = 0, stage: str = "ss") -> torch.nn.Module:
    """The teacher on CPU: a TRELLIS checkpoint pair (or `stage`'s in a pipeline), or a built-in size.

    Each worker resolves a pipeline itself, so a Hub id reads that node's Hugging Face cache.

    A built-in size has no trained weights; it gets a seeded random init with the zero-initialised
    layers (adaLN, output) perturbed too, so that smoke runs and tests distil a non-trivial field.
    """
    from mdt_ray.models.checkpoint import load_trellis

    if spec in NAMED_CONFIGS:
        torch.manual_seed(seed)
        model = build_model(spec)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 1 and not p.any():
                    p.normal_(0.0, 0.02)
        return model
    from mdt_ray.models.pipeline import resolve_teacher

    return load_trellis(from_root(resolve_teacher(spec, stage)))


def student_from(teacher: torch.nn.Module) -> torch.nn.Module:
    """A trainable copy of the teacher's weights with fp32 master parameters."""
    student = copy.deepcopy(teacher).float()
    student.requires_grad_(True)
    return student.train()


def build_image_encoder(model_cfg, device: torch.device):
    """The frozen image encoder of `model.image_encoder` on `device` (beside the teacher: eval, no
    grad, bf16 on GPU when model.teacher_bf16), or None when none is configured."""
    if not model_cfg.image_encoder:
        return None
    from mdt_ray.conditioning import ImageEncoder

    encoder = ImageEncoder.from_checkpoint(from_root(model_cfg.image_encoder), arch=model_cfg.image_encoder_arch)
    return encoder.freeze(device, bf16=model_cfg.teacher_bf16)


def freeze(teacher: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    """Eval mode, no grad, on `device`; the transformer blocks in bf16 on GPU when asked."""
    teacher = teacher.to(device).eval().requires_grad_(False)
    if bf16 and device.type == "cuda":
        convert_torso(teacher, torch.bfloat16)
    return teacher
