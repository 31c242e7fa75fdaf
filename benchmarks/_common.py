"""What the benchmark scripts share: thread limits, a timer, random batches of a model's shape,
and the /proc readers and background thread of their process samplers.

torch is imported where it is used: the ingest benchmark's readers measure their own memory."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional


def set_threads(n: Optional[int]) -> None:
    """torch's CPU threads and, when threadpoolctl is installed, numpy's BLAS pool (the FD's
    matrix square root), which otherwise spin-waits on a busy machine."""
    import torch

    if not n:
        return
    torch.set_num_threads(n)
    try:
        import threadpoolctl
    except ImportError:
        return
    threadpoolctl.threadpool_limits(n)


def write_json(path: Optional[str], result: Any, indent: int = 1) -> None:
    """The results as JSON at `path` (its folder made), when a path is given."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=indent, default=str))
    print(f"[bench] wrote {path}", flush=True)


def timed(fn: Callable[[], Any], repeats: int, device: Any = None) -> float:
    """Median wall seconds of `repeats` calls of `fn`, after one untimed warm-up call (allocator,
    kernels); the median is robust to other jobs on a shared machine. On a CUDA `device` each
    call is timed to the end of its kernels."""
    sync = _cuda_sync(device)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cuda_sync(device: Any) -> Callable[[], None]:
    if device is None or getattr(device, "type", device) != "cuda":
        return lambda: None
    import torch

    return lambda: torch.cuda.synchronize(device)


def cond_tokens(cond_channels: int) -> int:
    """Condition tokens per image: the synthetic corpus's 64, or DINOv2's 1374 for TRELLIS sizes."""
    return 64 if cond_channels == 64 else 1374


def random_batch(model: str, batch: int, generator) -> dict[str, Any]:
    """A stage-1 batch {"x0", "cond"} of Gaussian values in the shapes of the named size `model`."""
    import torch

    from mdt_ray.models import NAMED_CONFIGS

    a = NAMED_CONFIGS[model]["args"]
    x0 = torch.randn(batch, a["in_channels"], a["resolution"], a["resolution"], a["resolution"], generator=generator)
    cond = torch.randn(batch, cond_tokens(a["cond_channels"]), a["cond_channels"], generator=generator)
    return {"x0": x0, "cond": cond}


def shell_voxels(count: int, res: int = 64, seed: int = 0):
    """`count` voxels of a lumpy sphere shell in a res³ grid (a surface, as TRELLIS's SLAT voxels
    are: ~7 of 26 neighbours active), in random order, (count, 3) int32."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ax = torch.arange(res, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1).reshape(-1, 3)
    d = grid - (res - 1) / 2
    r = d.norm(dim=1)
    phase = float(torch.rand((), generator=g)) * 6.283
    polar = torch.acos((d[:, 2] / r.clamp(min=1e-6)).clamp(-1, 1))
    bump = 1 + 0.15 * torch.sin(3 * torch.atan2(d[:, 1], d[:, 0]) + phase) * torch.cos(2 * polar)
    keep = (r - 0.38 * res * bump).abs().argsort()[:count]
    return grid[keep[torch.randperm(keep.numel(), generator=g)]].int()


# -- /proc ---------------------------------------------------------------------------------------
def stat_fields(path: str) -> Optional[list[str]]:
    """The fields after the command name of a /proc/<pid>[/task/<tid>]/stat file (the name, in
    parentheses, may hold spaces), or None when the process is gone."""
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """Every live process below `root`, from the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = stat_fields(f"/proc/{entry}/stat") if entry.isdigit() else None
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class PeriodicSampler:
    """Calls `sample()` every `period` seconds on a daemon thread while used as a context
    manager, and once more on exit so the last interval is never lost. Subclasses define
    `sample` and what they keep."""

    def __init__(self, period: float):
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def save_figure(fig, path) -> None:
    """A benchmark's plot as a PNG at `path` (its folder made)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"[bench] wrote {path}", flush=True)
