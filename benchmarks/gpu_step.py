"""One MDT-dist optimizer step at TRELLIS-L size on an accelerator: time, FLOPs, MFU, memory.

The step is the project's own (`mdt_ray.engine.Engine` with the `mdt` objective, discrete
derivative): a trainable fp32 student (bf16 autocast) and a frozen teacher whose transformer
runs in bf16, batch 8 split into 2 micro-batches as the paper trains. Stage 1 is ss-L (555 M
parameters, 16³ latent → 4,096 tokens, 1,374 DINOv2 cond tokens); stage 2 is slat-L on
`--voxels` voxels per asset (shell-shaped sets of the 64³ grid; 8,000 as in docs/scaling.md).
Weights are random (TRELLIS's zero-initialised layers filled with N(0, 0.02)); nothing is
downloaded.

Reported: median step seconds over `--steps` timed steps (after `--warmup`), assets/s, FLOPs of
one step counted by `torch.utils.flop_counter.FlopCounterMode` (eager, before any compile),
MFU = FLOPs / step time / the device's dense bf16 peak (table below, or `--peak-tflops`), peak
memory, the SDPA kernels that ran (from the profiler), and the split of one extra,
synchronised step into teacher passes, student passes with and without grad, backward and
optimizer (+ EMA).

Options: `--compile` (torch.compile of student and teacher), `--fused-adamw`,
`--checkpointing` (activation checkpointing of every transformer block), `--sdpa
{auto,flash,efficient,cudnn,math}` (restrict SDPA to one backend).

    python benchmarks/gpu_step.py --stage ss|slat [--model ss-L] [--batch 8] [--split 2]
        [--voxels 8000] [--steps 5] [--warmup 2] [--compile] [--fused-adamw] [--checkpointing]
        [--sdpa auto] [--peak-tflops X] [--json out.json]
    python benchmarks/gpu_step.py --cpu-smoke --stage ss      # tiny model on CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import shell_voxels, write_json  # noqa: E402
from mdt_ray.config import DistillConfig, TrainConfig  # noqa: E402
from mdt_ray.engine import Engine  # noqa: E402
from mdt_ray.models import NAMED_CONFIGS, build_model, count_parameters  # noqa: E402
from mdt_ray.models.teachers import freeze, student_from  # noqa: E402
from mdt_ray.stages import get_stage  # noqa: E402

# Dense (no structured sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s.
# Matched by substring of torch.cuda.get_device_name, first match wins.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / HBM3
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def device_peak(device: torch.device, override: Optional[float]) -> tuple[Optional[float], str]:
    if override:
        return override * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for a CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"table entry {key!r} for {name!r}"
    return None, f"{name!r} not in the peak table (pass --peak-tflops)"


class Timed(torch.nn.Module):
    """Times every call of the wrapped network, with grad and without, when `timing` is on.

    Deliberately not named `.module`: the objectives unwrap `.module` (DDP) for no-grad passes,
    which would bypass the timer."""

    def __init__(self, inner: torch.nn.Module, sync):
        super().__init__()
        self.inner = inner
        self.sync = sync
        self.timing = False
        self.seconds = {"grad": 0.0, "no_grad": 0.0}

    def forward(self, *args, **kwargs):
        if not self.timing:
            return self.inner(*args, **kwargs)
        self.sync()
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.sync()
        self.seconds["grad" if torch.is_grad_enabled() else "no_grad"] += time.perf_counter() - t0
        return out


@contextlib.contextmanager
def timed_backward(sync, sink: dict):
    """Times every Tensor.backward call inside (the engine's backward of each micro-batch)."""
    original = torch.Tensor.backward

    def backward(self, *a, **k):
        sync()
        t0 = time.perf_counter()
        original(self, *a, **k)
        sync()
        sink["backward"] = sink.get("backward", 0.0) + time.perf_counter() - t0

    torch.Tensor.backward = backward
    try:
        yield
    finally:
        torch.Tensor.backward = original


def make_batch(stage: str, model: str, batch: int, voxels: int, cond_tokens: int, device, seed: int = 0) -> dict:
    a = NAMED_CONFIGS[model]["args"]
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, cond_tokens, a["cond_channels"], generator=g)
    if stage == "ss":
        r = a["resolution"]
        x0 = torch.randn(batch, a["in_channels"], r, r, r, generator=g)
        return {"x0": x0.to(device), "cond": cond.to(device)}
    coords = [shell_voxels(voxels, res=a["resolution"], seed=seed + i) for i in range(batch)]
    counts = torch.tensor([len(c) for c in coords], dtype=torch.int64)
    index = torch.repeat_interleave(torch.arange(batch, dtype=torch.int32), counts)
    return {"coords": torch.cat([index[:, None], torch.cat(coords)], dim=1).to(device),
            "feats": torch.randn(int(counts.sum()), a["in_channels"], generator=g).to(device),
            "cond": cond.to(device), "counts": counts}


def random_network(model: str, device, checkpointing: bool) -> torch.nn.Module:
    with torch.device(device):
        net = build_model(model, use_fp16=False, use_checkpoint=checkpointing)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 1 and not p.any():
                p.normal_(0.0, 0.02)
    return net


def sdpa_kernels_seen(run) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        run()
    return sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "flash" in e.key.lower()
                   or "fmha" in e.key.lower() or "efficient_attention" in e.key})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=["ss", "slat"], default="ss")
    p.add_argument("--model", help="named size (default ss-L / slat-L; ss-tiny / slat-tiny with --cpu-smoke)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--split", type=int, default=2)
    p.add_argument("--voxels", type=int, default=8000, help="stage 2: voxels per asset")
    p.add_argument("--cond-tokens", type=int, help="default 1374 (DINOv2), 16 with --cpu-smoke")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fused-adamw", action="store_true")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--sdpa", choices=["auto", *SDPA_BACKENDS], default="auto")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, overriding the table")
    p.add_argument("--device", default="cuda")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, small batch, CPU: checks the script runs")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device = "cpu"
        args.model = args.model or f"{args.stage}-tiny"
        args.batch, args.split, args.voxels = min(args.batch, 4), min(args.split, 2), min(args.voxels, 300)
        args.cond_tokens = args.cond_tokens or 16
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    model = args.model or f"{args.stage}-L"
    if not model.startswith(args.stage):
        raise SystemExit(f"--model {model} is not a {args.stage} model")
    cond_tokens = args.cond_tokens or 1374
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible (use --cpu-smoke on CPU)")
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    teacher_net = random_network(model, device, False)
    student = student_from(teacher_net)
    if args.checkpointing:
        for block in getattr(student, "blocks", []):
            block.use_checkpoint = True
    teacher = freeze(teacher_net, device, bf16=True)  # bf16 torso on CUDA; unchanged on CPU
    params = count_parameters(student)
    stage = get_stage(args.stage)
    train = TrainConfig(batch_size=args.batch, batch_split=args.split, lr=1e-5, ema=0.999,
                        mixed_precision="bf16" if cuda else "fp32")
    distill = DistillConfig(method="mdt")
    t_student, t_teacher = Timed(student, sync), Timed(teacher, sync)
    engine = Engine(student, t_teacher, stage=stage, distill=distill, train=train, forward_model=t_student)
    if args.fused_adamw:
        engine.optimizer = torch.optim.AdamW(student.parameters(), lr=train.lr, betas=tuple(train.betas),
                                             weight_decay=train.weight_decay, fused=True)
    batch = make_batch(args.stage, model, args.batch, args.voxels, cond_tokens, device)
    sdpa_ctx = (lambda: torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, SDPA_BACKENDS[args.sdpa])))\
        if args.sdpa != "auto" else contextlib.nullcontext
    step_no = iter(range(10**9))

    def step():
        with sdpa_ctx():
            engine.step(batch, next(step_no))

    # FLOPs: one eager step (the counter does not see inside compiled graphs).
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    kernels = sdpa_kernels_seen(step)

    if args.compile:
        t_student.inner = torch.compile(student)
        t_teacher.inner = torch.compile(teacher)
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak_mem = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # The split: one more step with every network call and backward synchronised and timed.
    split: dict[str, float] = {}
    for t in (t_student, t_teacher):
        t.timing, t.seconds = True, {"grad": 0.0, "no_grad": 0.0}
    with timed_backward(sync, split), sdpa_ctx():
        sync()
        t0 = time.perf_counter()
        measured = engine.forward_backward(batch, next(step_no))
        sync()
        t1 = time.perf_counter()
        engine.apply(0)
        sync()
        t2 = time.perf_counter()
    for t in (t_student, t_teacher):
        t.timing = False
    split = {"teacher_s": t_teacher.seconds["no_grad"] + t_teacher.seconds["grad"],
             "student_grad_fwd_s": t_student.seconds["grad"], "student_nograd_fwd_s": t_student.seconds["no_grad"],
             "backward_s": split.get("backward", 0.0), "optimizer_ema_s": t2 - t1}
    split["other_s"] = (t1 - t0) - sum(v for k, v in split.items() if k != "optimizer_ema_s")
    split["total_s"] = t2 - t0

    peak, peak_source = device_peak(device, args.peak_tflops)
    res: dict[str, Any] = {
        "stage": args.stage, "model": model, "parameters": params, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "batch": args.batch, "split": args.split, "cond_tokens": cond_tokens,
        "voxels_per_asset": args.voxels if args.stage == "slat" else None,
        "options": {"compile": args.compile, "fused_adamw": args.fused_adamw, "checkpointing": args.checkpointing,
                    "sdpa": args.sdpa},
        "step_s": step_s, "step_s_all": times, "assets_per_s": args.batch / step_s,
        "flops_per_step": flops, "achieved_tflops": flops / step_s / 1e12,
        "peak_bf16_tflops": peak / 1e12 if peak else None, "peak_source": peak_source,
        "mfu": flops / step_s / peak if peak else None,
        "peak_memory_bytes": peak_mem, "sdpa_kernels": kernels, "split": split,
        "loss": measured.terms.get("loss"), "torch": torch.__version__,
    }
    mfu = f"{100 * res['mfu']:.1f} %" if res["mfu"] is not None else f"n/a ({peak_source})"
    print(f"[gpu_step] {model} on {res['device_name']}: {step_s:.3f} s/step, {res['assets_per_s']:.2f} assets/s, "
          f"{flops / 1e12:.2f} TFLOP/step, MFU {mfu}, peak memory {peak_mem / 2**30:.2f} GiB", flush=True)
    print("[gpu_step] split: " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()), flush=True)
    print(f"[gpu_step] SDPA kernels: {kernels}", flush=True)
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
