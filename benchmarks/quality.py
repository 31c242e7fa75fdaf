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
samples the held-out conditions at 1 and 2 steps; FD is against the held-out latents, IoU against
the shape behind each condition, COV / MMD / 1-NNA with distance 1 − IoU (mdt_ray.evaluate).

The distillation runs in a plain in-process loop, not on Ray: one process using both cores is
the fastest way to run five distillations on a 2-core CPU, and the loop calls exactly what the Ray
worker calls for a step (`draw_inputs` + `compute_loss` with a `DistillConfig`, per-step
generators seeded by `step_seed`, AdamW, `GradClipper`, `ema_update`).

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

from mdt_ray.config import DistillConfig  # noqa: E402
from mdt_ray.evaluate import (  # noqa: E402
    STUDENT_SAMPLER,
    TEACHER_SAMPLER,
    measure_latency,
    sample_and_score,
    sampler_nfe,
    synthetic_decoder,
)
from mdt_ray.models import load_trellis  # noqa: E402
from mdt_ray.objectives import compute_loss, draw_inputs  # noqa: E402
from mdt_ray.train.loop import step_seed, student_from  # noqa: E402
from mdt_ray.train.optim import GradClipper, ema_init, ema_update  # noqa: E402

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "mdt": ("MDT-dist (VM + VD)", {"method": "mdt"}),
    "vm": ("VM only", {"method": "vm"}),
    "cm": ("CM", {"method": "cm"}),
    "pcm": ("PCM (2 phases)", {"method": "pcm", "phases": 2}),
    "scm": ("sCM", {"method": "scm"}),
}

# What every method shares. dt, d_norm and the time distribution are the paper's (spec §4); the
# EMA decay suits a run of a few hundred steps (its horizon is ~100 steps).
SHARED = {"dt": 0.01, "d_norm": True, "t_mean": 1.0, "t_std": 1.0, "sigma_min": 1e-5}
FULL = {"steps": 300, "batch": 8, "ema": 0.99, "grad_clip": 1.0, "seed": 0, "test_assets": 256}
QUICK = {"steps": 6, "batch": 4, "ema": 0.9, "grad_clip": 1.0, "seed": 0, "test_assets": 16}

# The tuning grid, the same for every method: the teacher's CFG scale inside the objective (for
# MDT-dist both cfg_vm and cfg_vd) and the learning rate.
TUNE_GRID = {"cfg": [0.5, 2.0], "lr": [1e-4, 3e-4]}
TUNE_STEPS = 80
# Guidance strengths tried for the teacher's own 25-step sampler (TEACHER_SAMPLER holds the pick).
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


def distil(teacher: torch.nn.Module, train: dict[str, torch.Tensor], dc: DistillConfig, *, steps: int, batch: int,
           lr: float, ema: float, grad_clip: float, seed: int, log: Callable[[str], None],
           device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    """The Ray worker's step, in-process: returns the EMA student."""
    student = student_from(teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    clipper = GradClipper(grad_clip)
    shadow = ema_init(student)
    n = train["x0"].shape[0]
    # One data order for every method: the same permutation stream from the same seed.
    order = torch.Generator().manual_seed(seed)
    perm, cursor = torch.randperm(n, generator=order), 0
    t0, window = time.perf_counter(), []
    for step in range(steps):
        if cursor + batch > n:
            perm, cursor = torch.randperm(n, generator=order), 0
        idx = perm[cursor : cursor + batch]
        cursor += batch
        x0, cond = train["x0"][idx].to(device).float(), train["cond"][idx].to(device).float()
        gen = torch.Generator(device=device).manual_seed(step_seed(seed, 0, step, 0))
        draws = draw_inputs(x0, dc, gen)
        out = compute_loss(dc, student, teacher, x0, cond, draws, gen)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{dc.method}: non-finite loss at step {step} (lr {lr}, cfg {dc.cfg_vm})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clipper(student.parameters())
        optimizer.step()
        ema_update(shadow, student, ema)
        window.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            rate = (step + 1) / (time.perf_counter() - t0)
            log(f"[bench]   {dc.method} step {step + 1}/{steps} loss {np.mean(window):.4g} "
                f"({rate:.2f} it/s, ETA {(steps - step - 1) / rate:.0f}s)")
            window = []
    with torch.no_grad():
        for name, p in student.named_parameters():
            p.copy_(shadow[name])
    return student.eval().requires_grad_(False)


def distill_config(method: str, cfg: float) -> DistillConfig:
    overrides = METHODS[method][1]
    return DistillConfig(**{**SHARED, **overrides, "cfg_vm": cfg, "cfg_vd": cfg})


def score_student(model: torch.nn.Module, held: dict[str, Any], decode, seed: int, steps=(1, 2),
                  device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    return {str(k): sample_and_score(model, held, steps=k, sampler=STUDENT_SAMPLER, decode=decode, seed=seed,
                                     device=device)[1]
            for k in steps}


def load_split(uri: str, limit: Optional[int]) -> dict[str, Any]:
    from mdt_ray.data.pipeline import load_local

    return load_local(uri, stage="ss", limit=limit)


def _tensors(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    # The synthetic latents are exactly ±1: float16 stores them losslessly at half the memory.
    return {"x0": torch.from_numpy(np.ascontiguousarray(data["x0"])).half(),
            "cond": torch.from_numpy(np.ascontiguousarray(data["cond"])).half()}


def run_tune(teacher, train, val, decode, settings, methods, log) -> dict[str, Any]:
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
                scores = score_student(student, val, decode, settings["seed"], device=settings["device"])
                objective = scores["1"]["fd"] + scores["2"]["fd"]
                trials.append({"method": method, "cfg": cfg, "lr": lr, "fd_1": scores["1"]["fd"],
                               "fd_2": scores["2"]["fd"], "objective": objective})
                log(f"[bench]   -> FD 1 step {scores['1']['fd']:.3f}, 2 steps {scores['2']['fd']:.3f}")
                if method not in best or objective < best[method]["objective"]:
                    best[method] = {"cfg": cfg, "lr": lr, "objective": objective}
    return {"grid": TUNE_GRID, "tune_steps": TUNE_STEPS, "val_assets": TUNE_ASSETS, "trials": trials, "best": best}


def tune_teacher(teacher, val, decode, seed: int, log, device: torch.device) -> dict[str, Any]:
    """The teacher's 25-step guided sampler at each guidance strength of TEACHER_CFG_GRID."""
    rows = {}
    for w in TEACHER_CFG_GRID:
        t0 = time.perf_counter()
        _, scores = sample_and_score(teacher, val, steps=TEACHER_SAMPLER["steps"],
                                     sampler={**TEACHER_SAMPLER, "cfg_strength": w}, decode=decode, seed=seed,
                                     device=device)
        rows[str(w)] = scores
        log(f"[bench] teacher cfg {w:g}: " + " ".join(f"{k}={v:.4g}" for k, v in scores.items())
            + f" ({time.perf_counter() - t0:.0f}s)")
    best = min(rows, key=lambda w: rows[w]["fd"])
    log(f"[bench] lowest FD at cfg {best}")
    return {"cfg": rows, "best": float(best), "val_assets": int(val["x0"].shape[0])}


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
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import threadpoolctl
        except ImportError:
            pass
        else:
            threadpoolctl.threadpool_limits(args.threads)

    settings = dict(QUICK if args.quick else FULL)
    for key, value in (("steps", args.steps), ("batch", args.batch), ("test_assets", args.test_assets)):
        if value is not None:
            settings[key] = value
    settings["device"] = torch.device(args.device)
    from mdt_ray.evaluate import resolve_model_path

    teacher_path = resolve_model_path(args.teacher)
    teacher = load_trellis(teacher_path, device=settings["device"]).eval().requires_grad_(False)
    from mdt_ray.data.schema import read_manifest

    train_uri = ensure_corpus("train", log)
    train = _tensors(load_split(train_uri, 512 if args.quick else None))
    if args.tune_teacher:
        val_uri = ensure_corpus("val", log)
        val = load_split(val_uri, 16 if args.quick else TUNE_ASSETS)
        result = tune_teacher(teacher, val, synthetic_decoder(read_manifest(val_uri).source), settings["seed"], log,
                              settings["device"])
    elif args.tune:
        val_uri = ensure_corpus("val", log)
        val = load_split(val_uri, 16 if args.quick else TUNE_ASSETS)
        decode = synthetic_decoder(read_manifest(val_uri).source)
        result = run_tune(teacher, train, val, decode, settings, args.methods, log)
        print(format_tune(result))
        print("best per method: " + json.dumps(result["best"]))
    else:
        result = run_benchmark(teacher, teacher_path, train, settings, args, log)
        print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        log(f"[bench] wrote {args.json}")
    return result


def run_benchmark(teacher, teacher_path, train, settings, args, log) -> dict[str, Any]:
    from mdt_ray.data.schema import read_manifest

    test_uri = ensure_corpus("test", log)
    held = load_split(test_uri, settings["test_assets"])
    decode = synthetic_decoder(read_manifest(test_uri).source)
    seed = settings["seed"]
    result: dict[str, Any] = {"teacher": {}, "methods": {}}

    log(f"[bench] teacher {teacher_path} on {len(held['asset_id'])} held-out assets")
    for k in (25, 2, 1):
        t0 = time.perf_counter()
        _, scores = sample_and_score(teacher, held, steps=k, sampler={**TEACHER_SAMPLER, "steps": k}, decode=decode,
                                     seed=seed, device=settings["device"])
        result["teacher"][str(k)] = {**scores, "nfe": sampler_nfe(k, TEACHER_SAMPLER)}
        log(f"[bench]   teacher {k} steps: FD {scores['fd']:.3f} IoU {scores.get('iou', math.nan):.3f} "
            f"({time.perf_counter() - t0:.0f}s)")

    # Students have the teacher's architecture, so the teacher network sampled with the student
    # sampler has the students' latency; every entry is timed on the same batch, interleaved.
    lat_cond = torch.as_tensor(held["cond"][: args.latency_batch], dtype=torch.float32, device=settings["device"])
    latency = measure_latency({
        "teacher_25": (teacher, 25, TEACHER_SAMPLER), "teacher_2": (teacher, 2, TEACHER_SAMPLER),
        "teacher_1": (teacher, 1, TEACHER_SAMPLER), "student_1": (teacher, 1, STUDENT_SAMPLER),
        "student_2": (teacher, 2, STUDENT_SAMPLER)}, lat_cond, latent_shape=held["x0"].shape[1:], seed=seed)
    for k in ("25", "2", "1"):
        result["teacher"][k].update(latency_s=latency[f"teacher_{k}"],
                                    speedup=latency["teacher_25"] / latency[f"teacher_{k}"])

    for method in args.methods:
        label, _ = METHODS[method]
        knobs = {**TUNED[method], **({"lr": args.lr} if args.lr is not None else {})}
        dc = distill_config(method, knobs["cfg"])
        log(f"[bench] {label}: {settings['steps']} steps × batch {settings['batch']}, lr {knobs['lr']:g}, "
            f"cfg {knobs['cfg']:g}")
        t0 = time.perf_counter()
        student = distil(teacher, train, dc, steps=settings["steps"], batch=settings["batch"], lr=knobs["lr"],
                         ema=settings["ema"], grad_clip=settings["grad_clip"], seed=seed, log=log,
                         device=settings["device"])
        train_s = time.perf_counter() - t0
        scores = score_student(student, held, decode, seed, device=settings["device"])
        entry: dict[str, Any] = {"label": label, "train_s": train_s, "cfg": knobs["cfg"], "lr": knobs["lr"],
                                 "distill": dc.model_dump(mode="json")}
        for k in ("1", "2"):
            entry[k] = {**scores[k], "nfe": int(k), "latency_s": latency[f"student_{k}"],
                        "speedup": latency["teacher_25"] / latency[f"student_{k}"]}
            log(f"[bench]   {k} step(s): FD {scores[k]['fd']:.3f} IoU {scores[k].get('iou', math.nan):.3f}")
        result["methods"][method] = entry

    result["settings"] = {**settings, "device": str(settings["device"]), "teacher": str(teacher_path), "test_assets": len(held["asset_id"]),
                          "train_assets": int(train["x0"].shape[0]), "shared": SHARED,
                          "teacher_sampler": {**TEACHER_SAMPLER, "cfg_interval": list(TEACHER_SAMPLER["cfg_interval"])},
                          "student_sampler": {**STUDENT_SAMPLER, "cfg_interval": list(STUDENT_SAMPLER["cfg_interval"])},
                          "latency_batch": int(lat_cond.shape[0]), "threads": torch.get_num_threads()}
    return result


if __name__ == "__main__":
    main()
