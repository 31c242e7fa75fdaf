"""What a run leaves in its run directory: checkpoints, the run's metadata, the stop note.

A checkpoint directory holds
  student.safetensors    student weights (fp32 master copy, TRELLIS key names)
  ema.safetensors        EMA weights (rank 0's)
  optimizer.safetensors  AdamW moments, keys `<param name>.<state key>`
  state.json             step, data position, seed, MLflow run id, clipper history, config, and
                         `files`: every other file of the directory with its size and sha256
and, in the final one, `trellis/<name>.{json,safetensors}`: the exported student.
The random draws of step s on rank r come from a generator seeded by (seed, r, s), so the step
and seed are the whole RNG state and a resumed run draws exactly what the original would have.

A checkpoint is complete only when every file `state.json` lists is there with its size and
hash: Ray uploads a checkpoint's files in parallel, so a `state.json` can reach the store before
the weights beside it, and an interrupted upload leaves it next to truncated files. A resumed
run takes the newest complete checkpoint of its run directory and names the ones it skipped.

Beside the checkpoints, the run directory holds `mdt_ray_run.json` (the MLflow run and config,
written by the driver when the run starts) and, after a non-finite loss or non-finite weights,
`stopped_nonfinite.json` (written by rank 0, read and removed by the driver).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

STATE_FILE = "state.json"
RUN_META = "mdt_ray_run.json"
# Ray's Result carries the metrics of the latest checkpoint only, and a stopped run must not
# write a checkpoint, so why it stopped travels to the driver as a file in the run directory.
STOP_NOTE = "stopped_nonfinite.json"
# `checkpoint_<step>`, or `checkpoint_<step>.<n>` for a step written again after a resume passed
# over a damaged folder of that name: Ray 2.60's retention deletes a superseded checkpoint by its
# path, which would take a new folder of the same name with it.
CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)(?:\.(\d+))?$")


class CheckpointDamagedError(ValueError):
    """A checkpoint directory is incomplete or its files differ from what its state.json lists."""


def new_scratch_dir(prefix: str = "mdt-ckpt-") -> Path:
    """A fresh temporary directory named after this process (`<prefix><pid>-…`), so that one
    left behind by a process that died can be told from one in use (`remove_orphaned_scratch`)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


@contextmanager
def scratch_dir(prefix: str = "mdt-ckpt-") -> Iterator[Path]:
    """A fresh temporary directory, removed when the block ends however it ends."""
    path = new_scratch_dir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphaned_scratch(prefix: str = "mdt-ckpt-") -> list[Path]:
    """Remove the scratch directories of processes that no longer run; the removed ones. An
    asynchronous upload removes its directory only once the upload has succeeded, so a failed or
    cut-short one leaves it behind its worker, which Ray Train then replaces."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)-")
    removed = []
    for entry in Path(tempfile.gettempdir()).iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


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

    def _entries(self) -> list:
        import pyarrow.fs as pafs

        if self._fs().get_file_info(self.path).type == pafs.FileType.NotFound:
            return []
        return self._fs().get_file_info(pafs.FileSelector(self.path, recursive=False))

    def has_files(self) -> bool:
        return bool(self._entries())

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

    def checkpoint_names(self) -> list[str]:
        """The checkpoint directories, newest first (by step, then by rewrite)."""
        import pyarrow.fs as pafs

        names = [e.base_name for e in self._entries()
                 if e.type == pafs.FileType.Directory and CHECKPOINT_NAME.match(e.base_name)]

        def newness(name: str) -> tuple[int, int]:
            step, again = CHECKPOINT_NAME.match(name).groups()
            return int(step), int(again or 0)

        return sorted(names, key=newness, reverse=True)

    def load_checkpoint(self, name: str, device: str | torch.device = "cpu") -> dict[str, Any]:
        """`load_checkpoint` of the checkpoint `name`; one on a remote store is copied to a scratch
        directory first (storage errors propagate: they say nothing about the checkpoint)."""
        import pyarrow.fs as pafs

        if isinstance(self._fs(), pafs.LocalFileSystem):
            return load_checkpoint(self._file(name), device)
        with scratch_dir("mdt-restore-") as local:
            pafs.copy_files(self._file(name), str(local), source_filesystem=self._fs(),
                            destination_filesystem=pafs.LocalFileSystem())
            return load_checkpoint(local, device, label=self._file(name))


@dataclass
class Restored:
    """The checkpoint a run resumes from, and why each newer one was passed over."""

    name: str
    state: dict[str, Any]
    skipped: list[str] = field(default_factory=list)


def latest_complete(run_dir: RunDir, device: str | torch.device = "cpu") -> Optional[Restored]:
    """The newest complete checkpoint of `run_dir`, loaded; None when it has no checkpoint. When
    it has some but none is complete, resuming would silently start over: that raises."""
    names = run_dir.checkpoint_names()
    skipped = []
    for name in names:
        try:
            return Restored(name, run_dir.load_checkpoint(name, device), skipped)
        except CheckpointDamagedError as e:
            skipped.append(str(e))
    if skipped:
        raise CheckpointDamagedError(
            f"run directory {run_dir.path} holds {len(names)} checkpoint(s) and none is complete, so the run "
            f"cannot resume (delete the directory or set run.name to start over): " + "; ".join(skipped))
    return None


# safetensors' dtype names (its format: 8-byte little-endian header length, JSON header, raw bytes).
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_WRITE_CHUNK = 64 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], hasher: ThreadPoolExecutor) -> dict[str, Any]:
    """`tensors` as a safetensors file at `path`; its size and sha256, hashed from memory while
    the bytes are written (reading the file back doubled the time a checkpoint holds the loop).
    Hashing runs on `hasher`'s thread beside the write: both release the GIL."""
    flat = {k: v.detach().cpu().contiguous().reshape(-1) for k, v in sorted(tensors.items())}
    header, offset = {}, 0
    for k, t in flat.items():
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{path.name}: tensor {k!r} has dtype {t.dtype}, which a checkpoint cannot hold")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(tensors[k].shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    h = hashlib.sha256()
    with open(path, "wb", buffering=0) as f:
        for piece in _pieces(struct.pack("<Q", len(head)) + head, flat.values()):
            hashed = hasher.submit(h.update, piece)
            view = piece
            while view:  # a raw write may take fewer bytes than given
                view = view[f.write(view):]
            hashed.result()
    return {"bytes": 8 + len(head) + offset, "sha256": h.hexdigest()}


def _pieces(head: bytes, flat: Iterable[torch.Tensor]) -> Iterator[memoryview]:
    """The file's bytes without copies: the header, then each tensor's memory in chunks."""
    yield memoryview(head)
    for t in flat:
        if t.numel() == 0:
            continue
        raw = memoryview(t.view(torch.uint8).numpy())
        for i in range(0, len(raw), _WRITE_CHUNK):
            yield raw[i:i + _WRITE_CHUNK]


def _inventory(d: Path, known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every file under `d` but state.json, by POSIX path relative to `d`: size and sha256, from
    `known` for the files just written, read and hashed for the others (the TRELLIS export)."""
    files = sorted(p for p in d.rglob("*") if p.is_file() and p != d / STATE_FILE)
    out = {}
    for p in files:
        name = p.relative_to(d).as_posix()
        out[name] = known.get(name) or {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    return out


def save_checkpoint(directory: str | Path, *, student: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
                    optimizer: tuple[dict[str, torch.Tensor], list[dict]], meta: dict[str, Any]) -> None:
    """`optimizer` is (named state tensors, param groups), as `Engine.optimizer_tensors()` gives.
    Files already in `directory` (the TRELLIS export) are listed in state.json too. state.json is
    written last, through a rename: a directory without it is no checkpoint."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    opt_tensors, groups = optimizer
    parts = {"student.safetensors": student, "ema.safetensors": ema, "optimizer.safetensors": opt_tensors}
    written = {}
    with ThreadPoolExecutor(1, thread_name_prefix="mdt-ckpt-sha256") as hasher:
        for name, tensors in parts.items():
            if tensors is not None:
                written[name] = _write_safetensors(d / name, tensors, hasher)
    content = json.dumps({**meta, "param_groups": groups, "files": _inventory(d, written)}, indent=1, default=str)
    partial = d / f".{STATE_FILE}.partial"
    partial.write_text(content)
    os.replace(partial, d / STATE_FILE)


class DeferredCheckpoint:
    """A checkpoint copied to host memory now and written (`write`) later, in another thread:
    the training loop then waits for the copy, not for the write and hash. The copy is what
    the next optimizer steps cannot change; it is dropped once written."""

    def __init__(self, directory: str | Path, *, student: dict[str, torch.Tensor],
                 ema: dict[str, torch.Tensor] | None, optimizer: tuple[dict[str, torch.Tensor], list[dict]],
                 meta: dict[str, Any]):
        def host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}

        self.directory = Path(directory)
        opt_tensors, groups = optimizer
        # meta and the groups are small, and the loop goes on changing what they hold.
        self._state: Optional[dict[str, Any]] = {
            "student": host(student), "ema": host(ema) if ema is not None else None,
            "optimizer": (host(opt_tensors), copy.deepcopy(groups)), "meta": copy.deepcopy(meta)}
        self.seconds: Optional[float] = None

    def write(self) -> None:
        """`save_checkpoint` of the copy, once (a retried upload finds it written)."""
        if self._state is None:
            return
        t0 = time.perf_counter()
        save_checkpoint(self.directory, **self._state)
        self.seconds = time.perf_counter() - t0
        self._state = None


def verify_checkpoint(directory: str | Path, *, label: Optional[str] = None) -> dict[str, Any]:
    """The checkpoint's state.json, once every file it lists is there with its size and sha256;
    else CheckpointDamagedError naming the file. `label` names the directory in messages."""
    d = Path(directory)
    where = label or str(d)
    if not (d / STATE_FILE).is_file():
        raise CheckpointDamagedError(f"checkpoint {where} has no {STATE_FILE}: incomplete or not an mdt-ray checkpoint")
    try:
        meta = json.loads((d / STATE_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointDamagedError(f"checkpoint {where}: {STATE_FILE} is unreadable ({e})") from None
    for name, want in (meta.get("files") or {}).items():
        path = d / name
        if not path.is_file():
            raise CheckpointDamagedError(f"checkpoint {where}: {name} is missing ({STATE_FILE} lists it)")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointDamagedError(f"checkpoint {where}: {name} has {size} bytes, {STATE_FILE} lists "
                                         f"{want['bytes']} (cut short or overwritten)")
        if _sha256(path) != want["sha256"]:
            raise CheckpointDamagedError(f"checkpoint {where}: {name} does not match the sha256 {STATE_FILE} "
                                         "lists (damaged)")
    return meta


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu", *,
                    label: Optional[str] = None) -> dict[str, Any]:
    """Verify (see `verify_checkpoint`) and load a checkpoint directory. Checkpoints written
    before state.json listed its files are loaded unverified; a file that does not load is
    reported as damage all the same."""
    d = Path(directory)
    meta = verify_checkpoint(d, label=label)
    out: dict[str, Any] = {"meta": meta}
    names = {"student": "student.safetensors", "optimizer": "optimizer.safetensors", "ema": "ema.safetensors"}
    for key, name in names.items():
        if key == "ema" and not (d / name).is_file():
            continue
        try:
            out[key] = load_file(str(d / name), device=str(device))
        except (SafetensorError, OSError) as e:
            raise CheckpointDamagedError(f"checkpoint {label or d}: {name} does not load ({e})") from None
    return out
