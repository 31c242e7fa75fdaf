"""What a run leaves in its run directory: checkpoints, the run's metadata, the stop note.

A checkpoint directory holds
  student.safetensors    student weights (fp32 master copy, TRELLIS key names)
  ema.safetensors        EMA weights (rank 0's)
  optimizer.safetensors  AdamW moments, keys `<param name>.<state key>`
  state.json             step, data position, seed, MLflow run id, clipper history, config
and, in the final one, `trellis/<name>.{json,safetensors}`: the exported student.
The random draws of step s on rank r come from a generator seeded by (seed, r, s), so the step
and seed are the whole RNG state and a resumed run draws exactly what the original would have.

Beside the checkpoints, the run directory holds `mdt_ray_run.json` (the MLflow run and config,
written by the driver when the run starts) and, after a non-finite loss, `stopped_nonfinite.json`
(written by rank 0, read and removed by the driver).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
RUN_META = "mdt_ray_run.json"
# Ray's Result carries the metrics of the latest checkpoint only, and a stopped run must not
# write a checkpoint, so why it stopped travels to the driver as a file in the run directory.
STOP_NOTE = "stopped_nonfinite.json"


@dataclass(frozen=True)
class RunDir:
    """A run's directory on its store: a pyarrow filesystem (None: local) and the path on it.
    Small and picklable, so the driver hands it to the workers as it is."""

    fs: Any
    path: str

    def _fs(self):
        import pyarrow.fs as pafs

        return self.fs or pafs.LocalFileSystem()

    def _file(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def has_files(self) -> bool:
        import pyarrow.fs as pafs

        if self._fs().get_file_info(self.path).type == pafs.FileType.NotFound:
            return False
        return any(True for _ in self._fs().get_file_info(pafs.FileSelector(self.path, recursive=False)))

    def read(self, name: str) -> Optional[dict[str, Any]]:
        import pyarrow.fs as pafs

        if self._fs().get_file_info(self._file(name)).type == pafs.FileType.NotFound:
            return None
        with self._fs().open_input_stream(self._file(name)) as f:
            return json.loads(f.read().decode())

    def write(self, name: str, content: dict[str, Any]) -> None:
        self._fs().create_dir(self.path, recursive=True)
        with self._fs().open_output_stream(self._file(name)) as f:
            f.write(json.dumps(content, indent=1, default=str).encode())

    def take(self, name: str) -> Optional[dict[str, Any]]:
        """Read and remove a note; None when there is none."""
        content = self.read(name)
        if content is not None:
            self._fs().delete_file(self._file(name))
        return content


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_checkpoint(directory: str | Path, *, student: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
                    optimizer: tuple[dict[str, torch.Tensor], list[dict]], meta: dict[str, Any]) -> None:
    """`optimizer` is (named state tensors, param groups), as `Engine.optimizer_tensors()` gives."""
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
