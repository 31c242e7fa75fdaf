"""How the cost of one MDT-dist step grows with batch size and model size, on CPU.

One Engine step (the `mdt` objective, discrete derivative, AdamW, EMA, fp32 on CPU) of each
`--models` size at each `--batches` size, median of `--repeats` after a warm-up step; random
inputs in the model's shapes (64 cond tokens for the 64-wide cond, else 1,374). `--max-batch`
caps the batch per model (ss-B runs 4,096 tokens per asset: one step of batch 1 takes minutes
on 2 cores). Writes a plot of seconds per step and per asset.

    python benchmarks/step_scaling.py [--models ss-tiny ss-demo ss-B] [--batches 1 2 4 8]
        [--max-batch ss-B=1] [--repeats 2] [--threads 2] [--plot out.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import random_batch, save_figure, set_threads, timed, write_json  # noqa: E402
from mdt_ray.config import DistillConfig, TrainConfig  # noqa: E402
from mdt_ray.engine import Engine  # noqa: E402
from mdt_ray.models import count_parameters  # noqa: E402
from mdt_ray.models.teachers import build_teacher, freeze, student_from  # noqa: E402
from mdt_ray.stages import get_stage  # noqa: E402


def plot(rows: list[dict], path: str, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        label = f"{model} ({rs[0]['parameters'] / 1e6:.1f} M)"
        axes[0].plot([r["batch"] for r in rs], [r["step_s"] for r in rs], "o-", label=label)
    axes[0].set_xscale("log", base=2), axes[0].set_yscale("log")
    axes[0].set_xlabel("batch size"), axes[0].set_ylabel("s / step"), axes[0].set_title("step time vs batch")
    axes[0].legend(fontsize=8)
    # each model at the largest batch that every model ran (per-asset cost, fixed overheads shared)
    common = max(set.intersection(*({r["batch"] for r in rows if r["model"] == m} for m in {r["model"] for r in rows})))
    ms = [r for r in rows if r["batch"] == common]
    axes[1].plot([m["parameters"] for m in ms], [m["step_s"] / m["batch"] for m in ms], "s-")
    for m in ms:
        axes[1].annotate(f"{m['model']} (batch {m['batch']})", (m["parameters"], m["step_s"] / m["batch"]),
                         textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes[1].set_xscale("log"), axes[1].set_yscale("log")
    axes[1].set_xlabel("parameters"), axes[1].set_ylabel("s / asset"), axes[1].set_title("step time per asset vs model")
    fig.suptitle(f"MDT-dist step on CPU (fp32, {threads} thread(s))", fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["ss-tiny", "ss-demo", "ss-B"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--max-batch", nargs="*", default=["ss-B=1"], help="MODEL=N caps")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot")
    p.add_argument("--json")
    args = p.parse_args(argv)
    set_threads(args.threads)
    caps = {k: int(v) for k, v in (c.split("=") for c in args.max_batch)}
    rows = []
    for model in args.models:
        teacher = build_teacher(model)
        student = student_from(teacher)
        params = count_parameters(student)
        for b in args.batches:
            if b > caps.get(model, 10**9):
                continue
            engine = Engine(student, freeze(teacher, torch.device("cpu"), False), stage=get_stage("ss"),
                            distill=DistillConfig(method="mdt"), train=TrainConfig(batch_size=b, lr=1e-5, ema=0.999))
            batch = random_batch(model, b, torch.Generator().manual_seed(b))
            k = iter(range(10**6))
            step_s = timed(lambda: engine.step(batch, next(k)), args.repeats)
            r = {"model": model, "parameters": params, "batch": b, "step_s": step_s, "load": os.getloadavg()[0]}
            rows.append(r)
            print(f"[scaling] {model} ({params / 1e6:.1f} M) batch {b}: {step_s:.2f} s/step, "
                  f"{step_s / b:.2f} s/asset (load {r['load']:.1f})", flush=True)
    if args.plot:
        plot(rows, args.plot, args.threads)
    res = {"threads": args.threads, "rows": rows}
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
