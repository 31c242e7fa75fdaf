"""MDT-dist against the consistency baselines at equal training budget: the paper's Tables 2 and 3
rebuilt on our own benchmark (the committed `ss-demo` teacher, the synthetic corpus, exact voxel
decoding).

Every method distils the same teacher from the same initial student (the teacher's weights) with
the same steps, batch, optimizer, EMA, clipping, seed and data order; what differs is the
objective (`distill.method`) and the knobs each method was tuned on with the same budget:

    mdt   MDT-dist, VM + VD (paper eq. 15)          vm    VM only (Table 3's ablation)
    cm    consistency distillation                   pcm   phased CM, 2 phases (evaluated at 1 and 2 steps;
    scm   continuous-time consistency (sCM)                2 steps are its phase boundaries)

plus the teacher itself at 1, 2 and 25 steps with its guided sampler. Each student (EMA weights)
samples the held-out conditions at 1 and 2 steps from the same noise; FD is against the held-out
latents, IoU against the shape behind each condition, COV / MMD / 1-NNA with distance 1 − IoU
(`Stage.score`, mdt_ray.stages).

The distillation runs in a plain in-process loop, not on Ray: one process using both cores is
the fastest way to run five distillations on a 2-core CPU, and the loop runs the optimizer step
the Ray worker runs (mdt_ray.engine: draws seeded by `step_seed`, the objective of a
`DistillConfig`, AdamW, clipping, EMA) in pre-training's data order (mdt_ray.pretrain).

    python benchmarks/quality.py --quick                       # smoke run, a few minutes on CPU
    python benchmarks/quality.py --json docs/quality.json      # the full table of docs/benchmark.md
    python benchmarks/quality.py --tune --json tune.json       # the tuning grid behind TUNED

`--tune` trains every method for TUNE_STEPS at each point of the same grid (CFG scale × learning
rate) and scores 1- and 2-step FD on a validation corpus (seed 2, disjoint from the test corpus);
the best point per method is what `TUNED` below holds. Corpora missing under data/ are built
(seeds: train 0, test 1, validation 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import set_threads, write_json  # noqa: E402
from mdt_ray.config import DistillConfig, TrainConfig  # noqa: E402
from mdt_ray.engine import Engine  # noqa: E402
from mdt_ray.eval import measure_latency, sampler_nfe  # noqa: E402
from mdt_ray.models import load_trellis  # noqa: E402
from mdt_ray.models.teachers import resolve_model_path, student_from  # noqa: E402
from mdt_ray.pretrain import train_steps  # noqa: E402
from mdt_ray.stages import STUDENT_SAMPLER, Split, get_stage  # noqa: E402

STAGE = get_stage("ss")
TEACHER_SAMPLER = STAGE.teacher_sampler

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "mdt": ("MDT-dist (VM + VD)", {"method": "mdt"}),
    "vm": ("VM only", {"method": "vm"}),
    "cm": ("CM", {"method": "cm"}),
    "pcm": ("PCM (2 phases)", {"method": "pcm", "phases": 2}),
    "scm": ("sCM", {"method": "scm"}),
}

# What every method shares. dt, d_norm and the time distribution are the paper's (its section 4); the
# EMA decay suits a run of a few hundred steps (its horizon is ~100 steps).
SHARED = {"dt": 0.01, "d_norm": True, "t_mean": 1.0, "t_std": 1.0, "sigma_min": 1e-5}
FULL = {"steps": 300, "batch": 8, "ema": 0.99, "grad_clip": 1.0, "seed": 0, "test_assets": 256}
QUICK = {"steps": 6, "batch": 4, "ema": 0.9, "grad_clip": 1.0, "seed": 0, "test_assets": 16}

# The tuning grid, the same for every method: the teacher's CFG scale inside the objective (for
# MDT-dist both cfg_vm and cfg_vd) and the learning rate.
TUNE_GRID = {"cfg": [0.5, 2.0], "lr": [1e-4, 3e-4]}
TUNE_STEPS = 80
# Guidance strengths tried for the teacher's own 25-step sampler (the stage's teacher_sampler
# holds the pick).
TEACHER_CFG_GRID = [0.0, 0.5, 1.0, 2.0, 3.0]
TUNE_ASSETS = 64
# The knobs every method runs with in the table. One point for all, the teacher's own guidance
# (TEACHER_SAMPLER) and the learning rate that did best for MDT-dist in a partial `--tune` run
# (docs/benchmark.md); `--tune` searches TUNE_GRID per method when the compute is there.
TUNED: dict[str, dict[str, float]] = {m: {"cfg": 1.0, "lr": 3e-4} for m in METHODS}

DATA = {"train": ("data/teacher-corpus", 8192, 0), "test": ("data/bench-eval", 512, 1),
        "val": ("data/bench-val", 256, 2)}
TEACHER = "mdt_ray/assets/teacher_ss_demo.json"


def ensure_corpus(kind: str, log: Callable[[str], None]) -> str:
    from mdt_ray.data.corpus import build_synthetic

    uri, n, seed = DATA[kind]
    path = REPO / uri
    if not (path / "_common_metadata").is_file():
        log(f"[bench] building the {kind} corpus: {n} synthetic assets, seed {seed} -> {uri}")
        build_synthetic(str(path), n, seed=seed, progress=False)
    return str(path)


def distil(teacher: torch.nn.Module, train: Split, dc: DistillConfig, *, steps: int, batch: int, lr: float,
           ema: float, grad_clip: float, seed: int, log: Callable[[str], None],
           device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    """The Ray worker's step, in-process, on `train` (either stage): returns the EMA student.
    Every method gets the same data order from the same seed (mdt_ray.pretrain.batch_order)."""
    # fp32 on every device: the table compares objectives, not precisions.
    tc = TrainConfig(steps=steps, batch_size=batch, lr=lr, ema=ema, grad_clip=grad_clip, seed=seed,
                     mixed_precision="fp32")
    engine = Engine(student_from(teacher), teacher, stage=train.stage, distill=dc, train=tc)
    t0, window = time.perf_counter(), []
    for step, _, loss, _ in train_steps(engine, train, device=device):
        window.append(loss)
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            rate = (step + 1) / (time.perf_counter() - t0)
            log(f"[bench]   {dc.method} step {step + 1}/{steps} loss {np.mean(window):.4g} "
                f"({rate:.2f} it/s, ETA {(steps - step - 1) / rate:.0f}s)")
            window = []
    return engine.averaged_model().eval().requires_grad_(False)


def distill_config(method: str, cfg: float) -> DistillConfig:
    overrides = METHODS[method][1]
    return DistillConfig(**{**SHARED, **overrides, "cfg_vm": cfg, "cfg_vd": cfg})


def sample_scores(model: torch.nn.Module, held: Split, noise: Any, steps: int, sampler: dict[str, Any],
                  device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Every metric of the stage for `model` sampling `held` from `noise`, and its NFE."""
    samples = held.stage.generate(model, held, noise, steps=steps, sampler=sampler, device=device)
    return {**held.stage.score(samples, held, full=True), "nfe": sampler_nfe(steps, sampler)}


def score_student(model: torch.nn.Module, held: Split, noise: Any, steps=(1, 2),
                  device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    return {str(k): sample_scores(model, held, noise, k, STUDENT_SAMPLER, device) for k in steps}


def load_split(uri: str, limit: Optional[int]) -> Split:
    return STAGE.load(uri, limit=limit)


def run_tune(teacher, train, val, settings, methods, log) -> dict[str, Any]:
    noise = STAGE.noise(val, settings["seed"])
    trials = []
    best: dict[str, dict[str, Any]] = {}
    for method in methods:
        for cfg in TUNE_GRID["cfg"]:
            for lr in TUNE_GRID["lr"]:
                log(f"[bench] tune {method}: cfg {cfg}, lr {lr:g}")
                student = distil(teacher, train, distill_config(method, cfg), steps=TUNE_STEPS,
                                 batch=settings["batch"], lr=lr, ema=settings["ema"],
                                 grad_clip=settings["grad_clip"], seed=settings["seed"], log=log,
                                 device=settings["device"])
                scores = score_student(student, val, noise, device=settings["device"])
                objective = scores["1"]["fd"] + scores["2"]["fd"]
                trials.append({"method": method, "cfg": cfg, "lr": lr, "fd_1": scores["1"]["fd"],
                               "fd_2": scores["2"]["fd"], "objective": objective})
                log(f"[bench]   -> FD 1 step {scores['1']['fd']:.3f}, 2 steps {scores['2']['fd']:.3f}")
                if method not in best or objective < best[method]["objective"]:
                    best[method] = {"cfg": cfg, "lr": lr, "objective": objective}
    return {"grid": TUNE_GRID, "tune_steps": TUNE_STEPS, "val_assets": TUNE_ASSETS, "trials": trials, "best": best}


def tune_teacher(teacher, val, seed: int, log, device: torch.device) -> dict[str, Any]:
    """The teacher's 25-step guided sampler at each guidance strength of TEACHER_CFG_GRID."""
    noise, rows = STAGE.noise(val, seed), {}
    for w in TEACHER_CFG_GRID:
        t0 = time.perf_counter()
        sampler = {**TEACHER_SAMPLER, "cfg_strength": w}
        scores = sample_scores(teacher, val, noise, TEACHER_SAMPLER["steps"], sampler, device)
        scores.pop("nfe")
        rows[str(w)] = scores
        log(f"[bench] teacher cfg {w:g}: " + " ".join(f"{k}={v:.4g}" for k, v in scores.items())
            + f" ({time.perf_counter() - t0:.0f}s)")
    best = min(rows, key=lambda w: rows[w]["fd"])
    log(f"[bench] lowest FD at cfg {best}")
    return {"cfg": rows, "best": float(best), "val_assets": len(val)}


def format_tune(result: dict[str, Any]) -> str:
    lines = [f"{'method':<8}{'cfg':>6}{'lr':>9}{'FD 1':>10}{'FD 2':>10}", "-" * 43]
    for t in result["trials"]:
        mark = " *" if result["best"][t["method"]]["cfg"] == t["cfg"] and result["best"][t["method"]]["lr"] == t["lr"] else ""
        lines.append(f"{t['method']:<8}{t['cfg']:>6g}{t['lr']:>9.0e}{t['fd_1']:>10.3f}{t['fd_2']:>10.3f}{mark}")
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    """Table 2/3 layout: one row per method and step count."""
    ref = result["teacher"]["25"]["fd"]
    head = (f"{'method':<22}{'steps':>6}{'FD':>9}{'FD/T25':>8}{'IoU':>7}{'COV':>7}{'MMD':>7}{'1-NNA':>7}"
            f"{'ms/sample':>11}{'speed-up':>10}")
    lines = [head, "-" * len(head)]

    def row(label, k, e):
        return (f"{label:<22}{k:>6}{e['fd']:>9.3f}{e['fd'] / ref:>8.2f}{e.get('iou', math.nan):>7.3f}"
                f"{e.get('cov', math.nan):>7.3f}{e.get('mmd', math.nan):>7.3f}{e.get('nna', math.nan):>7.3f}"
                f"{e['latency_s'] * 1e3:>11.2f}{e['speedup']:>9.1f}x")

    for k in ("25", "2", "1"):
        lines.append(row(f"teacher (cfg {result['settings']['teacher_sampler']['cfg_strength']:g})", k,
                         result["teacher"][k]))
    for method, entry in result["methods"].items():
        for k in ("1", "2"):
            lines.append(row(entry["label"], k, entry[k]))
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps on a few assets: a smoke run in minutes")
    p.add_argument("--tune", action="store_true", help="run the tuning grid on the validation corpus instead")
    p.add_argument("--tune-teacher", action="store_true",
                   help="score the teacher at 25 steps for each TEACHER_CFG_GRID guidance on the validation corpus")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--teacher", default=TEACHER, help="teacher <name>.json")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: full 300, quick 6)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--test-assets", type=int, default=None, help="held-out assets scored (full 256, quick 16)")
    p.add_argument("--lr", type=float, default=None, help="learning rate for every method run (default: TUNED)")
    p.add_argument("--latency-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    set_threads(args.threads)

    settings = dict(QUICK if args.quick else FULL)
    for key, value in (("steps", args.steps), ("batch", args.batch), ("test_assets", args.test_assets)):
        if value is not None:
            settings[key] = value
    settings["device"] = torch.device(args.device)
    teacher_path = resolve_model_path(args.teacher)
    teacher = load_trellis(teacher_path, device=settings["device"]).eval().requires_grad_(False)
    train = load_split(ensure_corpus("train", log), 512 if args.quick else None)
    if args.tune_teacher or args.tune:
        val = load_split(ensure_corpus("val", log), 16 if args.quick else TUNE_ASSETS)
    if args.tune_teacher:
        result = tune_teacher(teacher, val, settings["seed"], log, settings["device"])
    elif args.tune:
        result = run_tune(teacher, train, val, settings, args.methods, log)
        print(format_tune(result))
        print("best per method: " + json.dumps(result["best"]))
    else:
        result = run_benchmark(teacher, teacher_path, train, settings, args, log)
        print(format_table(result))
    write_json(args.json, result)
    return result


def latencies(teacher: torch.nn.Module, x: Any, cond: torch.Tensor,
              teacher_sampler: dict[str, Any]) -> dict[str, float]:
    """Seconds per sample of the teacher at 25, 2, 1 steps and of the students at 1, 2 steps on
    the batch (x, cond). Students have the teacher's architecture, so the teacher network sampled
    with the student sampler has the students' latency; every entry runs on the same batch,
    interleaved."""
    entries = {f"teacher_{k}": (teacher, k, {**teacher_sampler, "steps": k}) for k in (25, 2, 1)}
    entries.update({f"student_{k}": (teacher, k, STUDENT_SAMPLER) for k in (1, 2)})
    return measure_latency(entries, x, cond, repeats=3)


def _scored(scores: dict[str, float], held: Split) -> str:
    return " ".join(f"{m} {scores[m]:.4g}" for m in held.stage.metrics if m in scores)


def teacher_rows(teacher: torch.nn.Module, held: Split, noise: Any, latency: dict[str, float], log,
                 device: torch.device) -> dict[str, Any]:
    """The teacher's own sampler at 25, 2 and 1 steps: scores, NFE, latency, speed-up."""
    rows = {}
    for k in (25, 2, 1):
        t0 = time.perf_counter()
        scores = sample_scores(teacher, held, noise, k, {**held.stage.teacher_sampler, "steps": k}, device)
        rows[str(k)] = {**scores, "latency_s": latency[f"teacher_{k}"],
                        "speedup": latency["teacher_25"] / latency[f"teacher_{k}"]}
        log(f"[bench]   teacher {k} steps: {_scored(scores, held)} ({time.perf_counter() - t0:.0f}s)")
    return rows


def method_row(method: str, teacher: torch.nn.Module, train: Split, held: Split, noise: Any,
               latency: dict[str, float], settings: dict[str, Any], knobs: dict[str, float], log) -> dict[str, Any]:
    """One method distilled with `knobs` (cfg, lr) and scored at 1 and 2 steps."""
    label, device = METHODS[method][0], settings.get("device", torch.device("cpu"))
    dc = distill_config(method, knobs["cfg"])
    log(f"[bench] {label}: {settings['steps']} steps × batch {settings['batch']}, lr {knobs['lr']:g}, "
        f"cfg {knobs['cfg']:g}")
    t0 = time.perf_counter()
    student = distil(teacher, train, dc, steps=settings["steps"], batch=settings["batch"], lr=knobs["lr"],
                     ema=settings["ema"], grad_clip=settings["grad_clip"], seed=settings["seed"], log=log,
                     device=device)
    entry: dict[str, Any] = {"label": label, "train_s": time.perf_counter() - t0, "cfg": knobs["cfg"],
                             "lr": knobs["lr"], "distill": dc.model_dump(mode="json")}
    for k, scores in score_student(student, held, noise, device=device).items():
        entry[k] = {**scores, "nfe": int(k), "latency_s": latency[f"student_{k}"],
                    "speedup": latency["teacher_25"] / latency[f"student_{k}"]}
        log(f"[bench]   {k} step(s): {_scored(scores, held)}")
    return entry


def jsonable(sampler: dict[str, Any]) -> dict[str, Any]:
    return {**sampler, "cfg_interval": list(sampler["cfg_interval"])}


def run_benchmark(teacher, teacher_path, train, settings, args, log) -> dict[str, Any]:
    held = load_split(ensure_corpus("test", log), settings["test_assets"])
    device = settings["device"]
    noise = STAGE.noise(held, settings["seed"])
    log(f"[bench] teacher {teacher_path} on {len(held)} held-out assets")
    m = min(args.latency_batch, len(held))
    latency = latencies(teacher, *STAGE.sampler_input(held, noise, 0, m, device), TEACHER_SAMPLER)
    result: dict[str, Any] = {"teacher": teacher_rows(teacher, held, noise, latency, log, device), "methods": {}}
    for method in args.methods:
        knobs = {**TUNED[method], **({"lr": args.lr} if args.lr is not None else {})}
        result["methods"][method] = method_row(method, teacher, train, held, noise, latency, settings, knobs, log)
    result["settings"] = {**settings, "device": str(device), "teacher": str(teacher_path), "test_assets": len(held),
                          "train_assets": len(train), "shared": SHARED, "teacher_sampler": jsonable(TEACHER_SAMPLER),
                          "student_sampler": jsonable(STUDENT_SAMPLER), "latency_batch": m,
                          "threads": torch.get_num_threads()}
    return result


if __name__ == "__main__":
    main()
