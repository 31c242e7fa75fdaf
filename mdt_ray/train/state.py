"""Checkpoint contents: tensors in safetensors, everything else in one JSON file.

A checkpoint directory holds
  student.safetensors    student weights (fp32 master copy, TRELLIS key names)
  ema.safetensors        EMA weights (rank 0's)
  optimizer.safetensors  AdamW moments, keys `<param name>.<state key>`
  state.json             step, data position, seed, MLflow run id, clipper history, config
and, in the final one, `trellis/<name>.{json,safetensors}`: the exported student.
The random draws of step s on rank r come from a generator seeded by (seed, r, s), so the step
and seed are the whole RNG state and a resumed run draws exactly what the original would have.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW state as named tensors plus the JSON-able param-group settings."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{names[idx]}.{key}"] = value
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor],
                   groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for idx, name in names.items():
        entry = {key[len(name) + 1 :]: t for key, t in tensors.items() if key.startswith(name + ".")
                 and "." not in key[len(name) + 1 :]}
        if entry:
            state[idx] = entry
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(directory: str | Path, *, student: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
                    optimizer: tuple[dict[str, torch.Tensor], list[dict]], meta: dict[str, Any]) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(student), str(d / "student.safetensors"))
    if ema is not None:
        save_file(_contiguous(ema), str(d / "ema.safetensors"))
    opt_tensors, groups = optimizer
    save_file(_contiguous(opt_tensors), str(d / "optimizer.safetensors"))
    # state.json last: a directory without it is incomplete and never loaded.
    (d / STATE_FILE).write_text(json.dumps({**meta, "param_groups": groups}, indent=1, default=str))


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    d = Path(directory)
    if not (d / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {d} has no {STATE_FILE}: incomplete or not an mdt-ray checkpoint")
    meta = json.loads((d / STATE_FILE).read_text())
    out = {
        "meta": meta,
        "student": load_file(str(d / "student.safetensors"), device=str(device)),
        "optimizer": load_file(str(d / "optimizer.safetensors"), device=str(device)),
    }
    if (d / "ema.safetensors").is_file():
        out["ema"] = load_file(str(d / "ema.safetensors"), device=str(device))
    return out
