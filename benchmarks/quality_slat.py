"""The stage-2 row of the quality benchmark: MDT-dist on a small SLAT teacher.

A `slat-tiny` teacher is pre-trained with flow matching on the synthetic corpus's stage-2 data
(mdt_ray.pretrain_slat), or loaded with `--teacher PATH`, then distilled with MDT-dist (and the
VM-only ablation) by benchmarks/quality.py's own in-process `distil` loop, fed sparse batches.
Every sampler fills the held-out assets' own voxels (stage 2 runs on stage 1's structure) from
the same noise; scored by the mean squared error against the asset's features (normalised
units), the Fréchet distance of per-voxel features, and latency per sample, teacher and students
timed interleaved on the same batch (mdt_ray.evaluate_slat).

    python benchmarks/quality_slat.py --quick --threads 1            # about a minute on CPU
    python benchmarks/quality_slat.py --threads 1 --json docs/quality_slat.json
    python benchmarks/quality_slat.py --teacher runs/quality_slat/teacher_slat_tiny.json

The pre-trained teacher is exported to `--out` so a later run can pass it as `--teacher`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.quality import METHODS, SHARED, TUNED, distil, distill_config, ensure_corpus  # noqa: E402
from mdt_ray.data.pipeline import load_local  # noqa: E402
from mdt_ray.evaluate import STUDENT_SAMPLER, sampler_nfe, speedups  # noqa: E402
from mdt_ray.evaluate_slat import (  # noqa: E402
    SLAT_TEACHER_SAMPLER,
    generate_slat,
    held_noise,
    measure_latency_sparse,
    require_slat,
    score_slat,
)
from mdt_ray.models import load_trellis  # noqa: E402

SLAT_METHODS = ("mdt", "vm")
# Teacher pre-training (steps, batch, train assets) and distillation (steps, batch, EMA) budgets.
# Full: ~4 min of teacher training and ~6 min of MDT-dist on a 2-core CPU shared with other jobs.
FULL = {"pretrain_steps": 1200, "pretrain_batch": 8, "train_assets": None, "steps": 300, "batch": 8,
        "ema": 0.99, "grad_clip": 1.0, "seed": 0, "test_assets": 64}
QUICK = {"pretrain_steps": 150, "pretrain_batch": 8, "train_assets": 512, "steps": 12, "batch": 4,
         "ema": 0.9, "grad_clip": 1.0, "seed": 0, "test_assets": 16}


def teacher_from(args, settings: dict[str, Any], train_uri: str, log: Callable[[str], None]) -> tuple[Any, str]:
    """The `--teacher` checkpoint, else a freshly pre-trained slat-tiny exported to `--out`."""
    if args.teacher:
        teacher = load_trellis(args.teacher).eval().requires_grad_(False)
        require_slat(teacher, "teacher")
        return teacher, str(args.teacher)
    from mdt_ray.pretrain_slat import load_slat_pretrain_config, pretrain_slat

    cfg = load_slat_pretrain_config(None, [
        f"train.steps={settings['pretrain_steps']}", f"train.batch_size={settings['pretrain_batch']}",
        f"train.log_every={max(1, settings['pretrain_steps'] // 5)}", f"train.seed={settings['seed']}",
        f"data.uri={train_uri}", "data.eval_uri=null", "tracking.enabled=false"])
    summary = pretrain_slat(cfg, args.out, "teacher_slat_tiny", limit=settings["train_assets"], log=log)
    settings["teacher_train_s"] = summary["train_s"]
    return load_trellis(summary["json"]).eval().requires_grad_(False), summary["json"]


def score(model, held, noise, reference, steps: int, sampler: dict[str, Any]) -> dict[str, float]:
    gen = generate_slat(model, held, noise, steps=steps, sampler=sampler)
    return {**score_slat(gen, reference), "nfe": sampler_nfe(steps, sampler)}


def latencies(teacher, held, noise, latency_batch: int) -> dict[str, float]:
    """Students have the teacher's architecture, so the teacher network on the student sampler
    times them; every entry runs on the same batch, interleaved."""
    from mdt_ray.evaluate_slat import held_batch

    x, cond = held_batch(held, noise, 0, latency_batch, torch.device("cpu"))
    teacher_at = {k: {**SLAT_TEACHER_SAMPLER, "steps": k} for k in (25, 2, 1)}
    entries = {f"teacher_{k}": (teacher, k, s) for k, s in teacher_at.items()}
    entries.update({f"student_{k}": (teacher, k, STUDENT_SAMPLER) for k in (1, 2)})
    return measure_latency_sparse(entries, x, cond, repeats=3)


def run_benchmark(args, settings: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    train_uri, test_uri = ensure_corpus("train", log), ensure_corpus("test", log)
    teacher, teacher_path = teacher_from(args, settings, train_uri, log)
    held = load_local(test_uri, stage="slat", limit=settings["test_assets"])
    noise, reference = held_noise(held, settings["seed"]), np.concatenate(held["slat_feats"])
    latency = latencies(teacher, held, noise, args.latency_batch)
    ups = speedups(latency, "teacher_25")
    result: dict[str, Any] = {"teacher": {}, "methods": {}}
    for k in (25, 2, 1):
        t0 = time.perf_counter()
        entry = score(teacher, held, noise, reference, k, {**SLAT_TEACHER_SAMPLER, "steps": k})
        result["teacher"][str(k)] = {**entry, "latency_s": latency[f"teacher_{k}"], "speedup": ups[f"teacher_{k}"]}
        log(f"[bench] teacher {k} steps: feat_mse {entry['feat_mse']:.4f} FD {entry['fd']:.4f} "
            f"({time.perf_counter() - t0:.0f}s)")

    from mdt_ray.pretrain_slat import load_slat_split

    train = load_slat_split(train_uri, settings["train_assets"])
    for method in args.methods:
        result["methods"][method] = distil_and_score(method, teacher, train, held, noise, reference, latency,
                                                     ups, settings, log)
    result["settings"] = {**settings, "teacher": teacher_path, "test_assets": len(noise),
                          "test_voxels": int(reference.shape[0]), "train_assets": len(train["x0"]),
                          "shared": SHARED, "teacher_sampler": {**SLAT_TEACHER_SAMPLER, "cfg_interval": list(
                              SLAT_TEACHER_SAMPLER["cfg_interval"])},
                          "latency_batch": args.latency_batch, "threads": torch.get_num_threads()}
    return result


def distil_and_score(method, teacher, train, held, noise, reference, latency, ups, settings, log) -> dict[str, Any]:
    label, knobs = METHODS[method][0], TUNED[method]
    # Distil from the teacher's own guidance (the stage-1 TUNED cfg is tuned to a different teacher).
    cfg = SLAT_TEACHER_SAMPLER["cfg_strength"]
    log(f"[bench] {label}: {settings['steps']} steps × batch {settings['batch']}, lr {knobs['lr']:g}, cfg {cfg:g}")
    t0 = time.perf_counter()
    student = distil(teacher, train, distill_config(method, cfg), steps=settings["steps"], batch=settings["batch"],
                     lr=knobs["lr"], ema=settings["ema"], grad_clip=settings["grad_clip"], seed=settings["seed"],
                     log=log)
    entry: dict[str, Any] = {"label": label, "train_s": time.perf_counter() - t0, "cfg": cfg, "lr": knobs["lr"]}
    for k in (1, 2):
        scores = score(student, held, noise, reference, k, STUDENT_SAMPLER)
        entry[str(k)] = {**scores, "latency_s": latency[f"student_{k}"], "speedup": ups[f"student_{k}"]}
        log(f"[bench]   {k} step(s): feat_mse {scores['feat_mse']:.4f} FD {scores['fd']:.4f}")
    return entry


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
    if args.threads:
        torch.set_num_threads(args.threads)
        try:  # numpy's BLAS pool (FD) spin-waits on a busy machine, as in benchmarks/quality.py
            import threadpoolctl
        except ImportError:
            pass
        else:
            threadpoolctl.threadpool_limits(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    for key, value in (("steps", args.steps), ("pretrain_steps", args.pretrain_steps),
                       ("test_assets", args.test_assets)):
        if value is not None:
            settings[key] = value
    t0 = time.perf_counter()
    result = run_benchmark(args, settings, log)
    result["settings"]["wall_s"] = time.perf_counter() - t0
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        log(f"[bench] wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
