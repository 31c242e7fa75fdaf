"""The stage-2 row of the quality benchmark: MDT-dist on a small SLAT teacher.

A `slat-tiny` teacher is pre-trained with flow matching on the synthetic corpus's stage-2 data
(mdt_ray.pretrain, stage `slat`), or loaded with `--teacher PATH`, then distilled with MDT-dist
(and the VM-only ablation) by benchmarks/quality.py's own in-process `distil` loop, fed sparse
batches. Every sampler fills the held-out assets' own voxels (stage 2 runs on stage 1's
structure) from the same noise; scored by the mean squared error against the asset's features
(normalised units), the Fréchet distance of per-voxel features (`Stage.score`), and latency per
sample, teacher and students timed interleaved on the same batch (mdt_ray.eval).

    python benchmarks/quality_slat.py --quick --threads 1            # about a minute on CPU
    python benchmarks/quality_slat.py --threads 1 --json docs/quality_slat.json
    python benchmarks/quality_slat.py --teacher runs/quality_slat/teacher_slat_tiny.json

The pre-trained teacher is exported to `--out` so a later run can pass it as `--teacher`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import set_threads, write_json  # noqa: E402
from benchmarks.quality import (  # noqa: E402
    METHODS,
    SHARED,
    TUNED,
    ensure_corpus,
    jsonable,
    latencies,
    method_row,
    teacher_rows,
)
from mdt_ray.models import load_trellis  # noqa: E402
from mdt_ray.stages import get_stage, stage_of_model  # noqa: E402

STAGE = get_stage("slat")
SLAT_METHODS = ("mdt", "vm")
# Teacher pre-training (steps, batch, train assets) and distillation (steps, batch, EMA) budgets
# (docs/benchmark.md has what they cost on a 2-core CPU).
FULL = {"pretrain_steps": 1200, "pretrain_batch": 8, "train_assets": None, "steps": 300, "batch": 8,
        "ema": 0.99, "grad_clip": 1.0, "seed": 0, "test_assets": 64}
QUICK = {"pretrain_steps": 150, "pretrain_batch": 8, "train_assets": 512, "steps": 12, "batch": 4,
         "ema": 0.9, "grad_clip": 1.0, "seed": 0, "test_assets": 16}


def teacher_from(args, settings: dict[str, Any], train_uri: str, log: Callable[[str], None]) -> tuple[Any, str]:
    """The `--teacher` checkpoint, else a freshly pre-trained slat-tiny exported to `--out`."""
    if args.teacher:
        teacher = load_trellis(args.teacher).eval().requires_grad_(False)
        if stage_of_model(teacher) is not STAGE:
            raise SystemExit(f"--teacher {args.teacher}: a {type(teacher).__name__}, not a stage-2 model "
                             f"({', '.join(STAGE.model_classes)})")
        return teacher, str(args.teacher)
    from mdt_ray.pretrain import load_pretrain_config, pretrain

    cfg = load_pretrain_config(None, [
        f"train.steps={settings['pretrain_steps']}", f"train.batch_size={settings['pretrain_batch']}",
        f"train.log_every={max(1, settings['pretrain_steps'] // 5)}", f"train.seed={settings['seed']}",
        f"data.uri={train_uri}", "data.eval_uri=null", "tracking.enabled=false"], stage="slat")
    summary = pretrain(cfg, args.out, "teacher_slat_tiny", limit=settings["train_assets"], log=log)
    settings["teacher_train_s"] = summary["train_s"]
    return load_trellis(summary["json"]).eval().requires_grad_(False), summary["json"]


def run_benchmark(args, settings: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    train_uri, test_uri = ensure_corpus("train", log), ensure_corpus("test", log)
    teacher, teacher_path = teacher_from(args, settings, train_uri, log)
    held = STAGE.load(test_uri, limit=settings["test_assets"])
    noise = STAGE.noise(held, settings["seed"])
    latency = latencies(teacher, *STAGE.sampler_input(held, noise, 0, args.latency_batch, "cpu"),
                        STAGE.teacher_sampler)
    result: dict[str, Any] = {"teacher": teacher_rows(teacher, held, noise, latency, log, "cpu"), "methods": {}}
    train = STAGE.load(train_uri, limit=settings["train_assets"])
    for method in args.methods:
        # Distil from the teacher's own guidance (the stage-1 TUNED cfg is tuned to a different teacher).
        knobs = {"lr": TUNED[method]["lr"], "cfg": STAGE.teacher_sampler["cfg_strength"]}
        result["methods"][method] = method_row(method, teacher, train, held, noise, latency, settings, knobs, log)
    result["settings"] = {**settings, "teacher": teacher_path, "test_assets": len(held),
                          "test_voxels": int(sum(len(c) for c in held.x0.coords)), "train_assets": len(train),
                          "shared": SHARED, "teacher_sampler": jsonable(STAGE.teacher_sampler),
                          "latency_batch": args.latency_batch, "threads": torch.get_num_threads()}
    return result


def format_table(result: dict[str, Any]) -> str:
    cfg = result["settings"]["teacher_sampler"]["cfg_strength"]
    head = f"{'method':<22}{'steps':>6}{'NFE':>5}{'feat MSE':>10}{'FD':>9}{'ms/sample':>11}{'speed-up':>10}"
    lines = [head, "-" * len(head)]

    def row(label: str, k: str, e: dict[str, Any]) -> str:
        return (f"{label:<22}{k:>6}{e['nfe']:>5d}{e['feat_mse']:>10.4f}{e['fd']:>9.4f}{e['latency_s'] * 1e3:>11.2f}"
                f"{e['speedup']:>9.1f}x")

    lines += [row(f"teacher (cfg {cfg:g})", k, result["teacher"][k]) for k in ("25", "2", "1")]
    for entry in result["methods"].values():
        lines += [row(entry["label"], k, entry[k]) for k in ("1", "2")]
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a short teacher and distillation: a smoke run of a minute")
    p.add_argument("--teacher", default=None, help="stage-2 teacher <name>.json (default: pre-train one)")
    p.add_argument("--methods", nargs="+", default=list(SLAT_METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=None, help="distillation steps (full 300, quick 12)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="teacher steps (full 1200, quick 150)")
    p.add_argument("--test-assets", type=int, default=None, help="held-out assets scored (full 64, quick 16)")
    p.add_argument("--latency-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=str(REPO / "runs" / "quality_slat"), help="folder for the pre-trained teacher")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    set_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    for key, value in (("steps", args.steps), ("pretrain_steps", args.pretrain_steps),
                       ("test_assets", args.test_assets)):
        if value is not None:
            settings[key] = value
    t0 = time.perf_counter()
    result = run_benchmark(args, settings, log)
    result["settings"]["wall_s"] = time.perf_counter() - t0
    print(format_table(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
