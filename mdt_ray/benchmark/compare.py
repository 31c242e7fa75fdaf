"""The method comparison on the multimodal benchmark (driven by benchmarks/methods.py).

1. Sweeps: per method, a small grid through the project's own Ray Tune sweeps (mdt_ray.tune, the
   jobs/configs/sweep.yaml format): each trial is a full `distill` run from the learned teacher on
   the training corpus, selected on the validation corpus by its in-training exact 2-step
   precision (SWEEP_METRIC).
2. Final runs: the selected settings, from the same teacher at an equal budget (steps × batch),
   for every seed, trained in this process with the same optimizer step (mdt_ray.engine) and
   scored on the held-out test corpus at 1, 2 and 4 steps with the exact metrics
   (mdt_ray.benchmark.score); mean ± 95 % CI (Student t) over seeds.
3. References: the exact teacher and the learned teacher at 1, 2 and 25 steps; ablations VM only
   vs VM + VD (the `vm` and `mdt` rows) and MDT-dist's Δt.
4. Pictures: quality against steps with CI bars, training curves, and a render grid; everything
   is written under the output folder and logged to one MLflow run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from mdt_ray import flow
from mdt_ray.benchmark import score as scoring
from mdt_ray.benchmark.corpus import distribution

METHODS = ("mdt", "vm", "cm", "pcm", "scm")
LABELS = {"mdt": "MDT-dist", "vm": "VM only", "cm": "CM", "pcm": "PCM", "scm": "sCM"}
STUDENT_STEPS = (1, 2, 4)
TEACHER_STEPS = (1, 2, 25)
# Settings every method shares. Guidance 0: the benchmark's truth is the unguided conditional
# distribution, which guidance would sharpen toward the heaviest mode.
COMMON = {"distill.cfg_vm": 0.0, "distill.cfg_vd": 0.0, "distill.t_mean": 0.0, "distill.t_std": 1.2,
          "distill.d_norm": True}
DEFAULTS: dict[str, dict[str, Any]] = {
    "mdt": {"distill.method": "mdt", "distill.lambda_vd": 1.0, "distill.dt": 0.05, "train.lr": 3e-4},
    "vm": {"distill.method": "vm", "distill.dt": 0.05, "train.lr": 3e-4},
    "cm": {"distill.method": "cm", "distill.dt": 0.05, "train.lr": 3e-4},
    "pcm": {"distill.method": "pcm", "distill.dt": 0.05, "distill.phases": 2, "train.lr": 3e-4},
    "scm": {"distill.method": "scm", "train.lr": 3e-4},
}
# The searched knobs (issue #12): the learning rate for all (lower for the consistency methods,
# which collapse at distillation's usual 3e-4: docs/benchmark.md, the earlier benchmark); λ and
# the VD guidance for MDT-dist; the phase count for PCM. Δt is the ablation's (on the test split,
# from the selected settings), which keeps the default run inside two hours on 2 cores.
SPACES: dict[str, dict[str, list[Any]]] = {
    "mdt": {"train.lr": [3e-4, 1e-3], "distill.lambda_vd": [0.25, 1.0], "distill.cfg_vd": [0.0, 1.0]},
    "vm": {"train.lr": [3e-4, 1e-3]},
    "cm": {"train.lr": [3e-5, 1e-4, 3e-4]},
    "pcm": {"train.lr": [3e-4, 1e-3], "distill.phases": [2, 4]},
    "scm": {"train.lr": [3e-5, 1e-4, 3e-4]},
}
QUICK_SPACES: dict[str, dict[str, list[Any]]] = {"mdt": {"train.lr": [1e-4, 3e-4]}}
# What the sweeps select on: the trials' in-training eval on the validation corpus, which for a
# multimodal corpus is the exact scorer (DenseStage.score). The 2-step precision, the table's
# headline at the step count where the methods differ: the 1-step FD, used first, ranked them
# against the exact metrics (the first full run: MDT-dist had the best 2-step precision and the
# worst 2-step FD), and 1-step precision is near 0 for every method. Equal scores keep the
# earliest trial in grid order (Ray 2.60's ExperimentAnalysis.get_best_trial replaces only on a
# strictly better one).
SWEEP_METRIC, SWEEP_MODE, SWEEP_EVAL_STEPS = "eval_precision_2step", "max", [1, 2]
# A trial's one worker: half a Ray CPU (mdt_ray/train/loop.py gives it one torch thread).
TRIAL_WORKER_CPUS = 0.5
DT_ABLATION = (0.01, 0.05, 0.1)


@dataclass
class Budget:
    # The default run: 20 sweep trials, 15 final runs, 6 ablation runs, `jobs` at a time; how long
    # it takes on the 2-core CPU is measured in docs/benchmark.md.
    steps: int = 200  # optimizer steps per run, every method
    batch_size: int = 8
    seeds: int = 3
    test_assets: int = 256
    val_assets: int = 64
    # Sweep trials train this long; None: as long as the final runs. The first comparisons swept
    # at 60 steps, and the setting MDT-dist's sweep then selected on 2-step precision (lr 1e-3
    # with VD guidance: 0.45 on validation, 3x the next) diverged by step 200 (docs/benchmark.md):
    # a short sweep selects what learns fastest, not what the reported budget trains best.
    sweep_steps: Optional[int] = None
    ablation_seeds: int = 3
    spaces: dict[str, dict[str, list[Any]]] = field(default_factory=lambda: copy.deepcopy(SPACES))
    render_assets: int = 8
    # Sweep trials and final runs at once. Each trains on one torch thread: one at a time left
    # one of the 2-core machine's cores idle. Every run seeds its own draws and its thread count
    # is fixed, so the numbers do not depend on `jobs` (tests/test_benchmark_methods.py).
    jobs: int = 2

    @property
    def sweep_length(self) -> int:
        return self.steps if self.sweep_steps is None else self.sweep_steps

    @classmethod
    def quick(cls) -> "Budget":
        # The default test suite runs it (tests/test_benchmark_methods.py): every stage of the
        # default run, at a size that keeps the suite near 20 minutes on 2 cores.
        return cls(steps=12, batch_size=4, seeds=3, test_assets=32, val_assets=16,
                   ablation_seeds=1, spaces=copy.deepcopy(QUICK_SPACES), render_assets=4)


# ---------------------------------------------------------------------------------------------
# Statistics


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % Student-t interval); the half-width is 0 for one value."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), 0.0
    t = _T975.get(len(x) - 1, 1.96)
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))


# ---------------------------------------------------------------------------------------------
# Data, models, evaluation


@dataclass
class Bench:
    train: Any  # stage-1 Splits (mdt_ray.stages)
    val: Any
    test: Any
    test_conditions: np.ndarray
    val_conditions: np.ndarray
    teacher: torch.nn.Module
    teacher_path: str


def load_bench(train_uri: str, val_uri: str, test_uri: str, teacher_path: str, budget: Budget) -> Bench:
    from mdt_ray.data.storage import StorageTarget
    from mdt_ray.models import load_trellis
    from mdt_ray.stages import get_stage

    stage = get_stage("ss")
    exact = distribution().exact_teacher()
    train = stage.load(StorageTarget(train_uri))
    val = stage.load(StorageTarget(val_uri), limit=budget.val_assets)
    test = stage.load(StorageTarget(test_uri), limit=budget.test_assets)
    for name, split in (("train", train), ("val", val), ("test", test)):
        if split.source.get("kind") != "multimodal":
            raise ValueError(f"{name} corpus {split.manifest.uri}: kind {split.source.get('kind')!r}, the benchmark "
                             f"needs `mdt-ray corpus build --kind multimodal`")
    teacher = load_trellis(teacher_path).float().eval().requires_grad_(False)
    return Bench(train, val, test, exact.condition_index(test.cond).numpy(), exact.condition_index(val.cond).numpy(),
                 teacher, teacher_path)


def provenance(bench: Bench) -> dict[str, Any]:
    """What a run's numbers depend on beyond its budget and settings: the software, the machine,
    and each corpus's shard layout. The sweep trials stream the training corpus through Ray Data
    in shard order, so two runs over the same assets split into different shards train different
    trials; float results can also differ in the last digits between CPUs. Both are what to compare
    first when two runs of one command disagree (docs/benchmark.md, "Run to run")."""
    import platform

    import ray

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    corpora = {name: {"uri": split.manifest.uri, "rows": split.manifest.num_rows,
                      "shards": [[s.path, s.num_rows, s.num_bytes] for s in split.manifest.shards]}
               for name, split in (("train", bench.train), ("val", bench.val), ("test", bench.test))}
    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "corpora": corpora}


def generate(model, split, steps: int, *, sampler: Optional[dict] = None, seed: int = 0, batch: int = 64) -> np.ndarray:
    """Samples for every asset of `split` from fixed noise (the same for every model)."""
    sampler = sampler or {}
    noise = torch.randn(len(split), *split.x0.shape[1:], generator=torch.Generator().manual_seed(seed))
    out = []
    with torch.no_grad():
        for lo in range(0, len(split), batch):
            cond = split.cond[lo:lo + batch]
            y = flow.sample(model, noise[lo:lo + batch], cond, torch.zeros_like(cond), steps=steps,
                            cfg_strength=sampler.get("cfg_strength", 0.0),
                            cfg_interval=tuple(sampler.get("cfg_interval", (0.0, 1.0))),
                            rescale_t=sampler.get("rescale_t", 1.0))
            out.append(y.float().numpy())
    return np.concatenate(out)


# The teachers' many-step sampler: TRELLIS's warped grid, without guidance (see COMMON).
TEACHER_SAMPLER = {"cfg_strength": 0.0, "rescale_t": 3.0}


def teacher_rows(bench: Bench, log, *, learned: bool = True, exact: bool = True) -> dict[str, dict[int, dict[str, float]]]:
    out: dict[str, dict[int, dict[str, float]]] = {}
    models = (([("exact teacher", distribution().exact_teacher())] if exact else [])
              + ([("learned teacher", bench.teacher)] if learned else []))
    for label, model in models:
        out[label] = {}
        for k in TEACHER_STEPS:
            samples = generate(model, bench.test, k, sampler=TEACHER_SAMPLER if k > 2 else None)
            out[label][k] = scoring.score(samples, bench.test_conditions, distribution())
            log(f"[bench] {label} {k} step(s): " + _fmt_metrics(out[label][k]))
    return out


def teachers_report(uris: dict[str, str], teacher_path: Optional[str], test_assets: int,
                    log: Optional[Callable[[str], None]] = None, *, exact: bool = True) -> dict[str, Any]:
    """The reference rows alone (exact teacher, and the learned one unless `teacher_path` is None)
    with the learned teacher's relative error against the exact field."""
    from mdt_ray.data.storage import StorageTarget
    from mdt_ray.models import load_trellis
    from mdt_ray.stages import get_stage

    log = log or (lambda line: print(line, flush=True))
    test = get_stage("ss").load(StorageTarget(uris["test"]), limit=test_assets)
    conditions = distribution().exact_teacher().condition_index(test.cond).numpy()
    teacher = load_trellis(teacher_path).float().eval() if teacher_path else None
    bench = Bench(None, None, test, conditions, None, teacher, teacher_path or "")
    t0 = time.perf_counter()
    report: dict[str, Any] = {"test_assets": len(test), "teacher": teacher_path,
                              "rows": {label: {str(k): v for k, v in rows.items()}
                                       for label, rows in teacher_rows(bench, log, learned=teacher is not None,
                                                                                     exact=exact).items()}}
    if teacher is not None:
        from mdt_ray.benchmark.teacher import field_error

        report["field_error"] = field_error(teacher, test, n=min(128, len(test)))
        log("[bench] learned teacher's relative error against the exact field: "
            + " ".join(f"{k}={v:.4f}" for k, v in report["field_error"].items()))
    report["seconds"] = time.perf_counter() - t0
    return report


def _fmt_metrics(m: dict[str, float]) -> str:
    return " ".join(f"{k}={m[k]:.3f}" for k in scoring.METRICS)


# ---------------------------------------------------------------------------------------------
# Runs


def run_config(settings: dict[str, Any], budget: Budget, seed: int, *, steps: Optional[int] = None):
    """(DistillConfig, TrainConfig) of one run: COMMON, then `settings` (dotted keys)."""
    from mdt_ray.config import DistillConfig, TrainConfig

    distill, train = {}, {"steps": steps or budget.steps, "batch_size": budget.batch_size, "seed": seed,
                          "ema": 0.0, "mixed_precision": "fp32", "grad_clip": 1.0}
    for key, value in {**COMMON, **settings}.items():
        block, name = key.split(".", 1)
        (distill if block == "distill" else train)[name] = value
    return DistillConfig(**distill), TrainConfig(**train)


def distill_run(bench: Bench, settings: dict[str, Any], budget: Budget, seed: int,
                log: Callable[[str], None]) -> tuple[torch.nn.Module, list[list[float]], float]:
    """One distillation in this process: (student, loss curve [[step, loss]], seconds)."""
    from mdt_ray.engine import Engine
    from mdt_ray.models.teachers import student_from
    from mdt_ray.pretrain import train_steps
    from mdt_ray.stages import get_stage

    dc, tc = run_config(settings, budget, seed)
    torch.manual_seed(seed)
    student = student_from(bench.teacher)
    engine = Engine(student, bench.teacher, stage=get_stage("ss"), distill=dc, train=tc, keep_ema=False)
    curve, t0 = [], time.perf_counter()
    for step, _epoch, loss, _grad in train_steps(engine, bench.train):
        curve.append([step + 1, float(loss)])
    return engine.averaged_model().eval(), curve, time.perf_counter() - t0


def score_student(student, bench: Bench) -> dict[int, dict[str, float]]:
    return {k: scoring.score(generate(student, bench.test, k), bench.test_conditions, distribution())
            for k in STUDENT_STEPS}


@dataclass(frozen=True)
class RunTask:
    """One distillation of the comparison: a final run ("final", method) or an ablation run
    ("ablation", "dt=0.01"); `keep`: also return the student's weights (for the render grid)."""
    group: str
    name: str
    seed: int
    settings: dict[str, Any]
    keep: bool = False

    @property
    def cost(self) -> float:
        # Relative run time (docs/benchmark.md: MDT-dist and sCM take about 2.4x VM's time per
        # step): the longest go first, so the last runs of the pool end together.
        return 2.4 if self.settings.get("distill.method") in ("mdt", "scm") else 1.0


def run_task(bench: Bench, budget: Budget, task: RunTask) -> dict[str, Any]:
    """Train and score one run: {"seed", "curve", "seconds", "scores", "state"}."""
    student, curve, secs = distill_run(bench, task.settings, budget, task.seed, lambda _line: None)
    scores = score_student(student, bench)
    state = {k: v.detach().clone() for k, v in student.state_dict().items()} if task.keep else None
    return {"seed": task.seed, "curve": curve, "seconds": secs,
            "scores": {str(k): v for k, v in scores.items()}, "state": state}


_WORKER: dict[str, Any] = {}


def _worker_init(uris: dict[str, str], teacher_path: str, budget: Budget, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["bench"] = load_bench(uris["train"], uris["val"], uris["test"], teacher_path, budget)
    _WORKER["budget"] = budget


def _worker_run(task: RunTask) -> dict[str, Any]:
    return run_task(_WORKER["bench"], _WORKER["budget"], task)


def run_tasks(tasks: list[RunTask], bench: Bench, uris: dict[str, str], teacher_path: str, budget: Budget,
              log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every task's outcome, in the order of `tasks`: in this process when budget.jobs is 1, else
    in budget.jobs spawned processes (each loads the corpora and the teacher once, and trains on
    this process's torch thread count). A process that dies ends the benchmark with an error."""
    import concurrent.futures as cf
    import multiprocessing

    def report(i: int, outcome: dict[str, Any], done: int, t0: float) -> None:
        task = tasks[i]
        label = task.name if task.group == "final" else f"ablation mdt {task.name}"
        log(f"[bench] {label} seed {task.seed} ({outcome['seconds']:.0f} s; {done}/{len(tasks)} runs in "
            f"{(time.perf_counter() - t0) / 60:.1f} min): "
            + " | ".join(f"{k} step {_fmt_metrics(v)}" for k, v in outcome["scores"].items()))

    order = sorted(range(len(tasks)), key=lambda i: -tasks[i].cost)
    outcomes: list[Optional[dict[str, Any]]] = [None] * len(tasks)
    t0 = time.perf_counter()
    log(f"[bench] {len(tasks)} final and ablation runs, {budget.jobs} at a time")
    if budget.jobs <= 1 or len(tasks) <= 1:
        for done, i in enumerate(order, 1):
            outcomes[i] = run_task(bench, budget, tasks[i])
            report(i, outcomes[i], done, t0)
        return outcomes
    # Spawned, not forked: the parent has a Ray driver and torch's thread pools by now.
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(budget.jobs, mp_context=context, initializer=_worker_init,
                                initargs=(uris, teacher_path, budget, torch.get_num_threads())) as pool:
        futures = {pool.submit(_worker_run, tasks[i]): i for i in order}
        try:
            for done, future in enumerate(cf.as_completed(futures), 1):
                i = futures[future]
                try:
                    outcomes[i] = future.result()
                except cf.process.BrokenProcessPool as e:
                    task = tasks[i]
                    raise RuntimeError(f"[bench] a run process died (killed, or out of memory) during "
                                       f"{task.group} {task.name} seed {task.seed} or a run beside it") from e
                report(i, outcomes[i], done, t0)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return outcomes


# ---------------------------------------------------------------------------------------------
# Sweeps (Ray Tune, the project's sweep format)


def write_base_config(path: Path, bench_uris: dict[str, str], teacher_path: str, budget: Budget) -> Path:
    """The job config every trial starts from (jobs/configs/*.yaml format)."""
    import yaml

    tree = {
        "model": {"teacher": str(Path(teacher_path).resolve()), "stage": "ss", "teacher_bf16": False},
        "distill": {k.split(".", 1)[1]: v for k, v in COMMON.items()},
        "train": {"steps": budget.sweep_length, "batch_size": budget.batch_size, "ema": 0.0,
                  "mixed_precision": "fp32", "log_every": max(1, budget.sweep_length // 2),
                  "checkpoint_every": budget.sweep_length, "eval_every": max(1, budget.sweep_length // 2),
                  "eval_assets": budget.val_assets, "eval_steps": SWEEP_EVAL_STEPS},
        "data": {"uri": str(Path(bench_uris["train"]).resolve()), "eval_uri": str(Path(bench_uris["val"]).resolve())},
        "scale": {"num_workers": 1, "cpus_per_worker": TRIAL_WORKER_CPUS},
        "tracking": {"experiment": "mdt-ray-benchmark"},
        "run": {"name": "bench", "storage_path": str(path.parent.resolve() / "runs")},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def write_sweep_file(path: Path, base: Path, method: str, budget: Budget) -> Path:
    import yaml

    overrides = {k: v for k, v in DEFAULTS[method].items() if k not in budget.spaces.get(method, {})}
    tree = {
        "base": str(base.resolve()),
        "overrides": overrides,
        "sweep": {"name": f"bench-{method}", "storage_path": str(path.parent.resolve() / "tune"),
                  "metric": SWEEP_METRIC, "mode": SWEEP_MODE, "search": "grid", "num_samples": 1,
                  "max_concurrent_trials": max(1, budget.jobs), "scheduler": {"type": "none"},
                  "space": {k: {"grid": v} for k, v in budget.spaces[method].items()}},
    }
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def start_local_ray(budget: Budget) -> bool:
    """Start the local Ray cluster the sweeps run on, with room for `budget.jobs` trials at once;
    False (nothing started) when Ray is already up or RAY_ADDRESS names a cluster, whose size
    mdt_ray.tune checks against the trials as for any sweep.

    Ray's CPUs are reservations, not cores. Each trial reserves its worker's CPUs, a sliver for
    its driver and a whole CPU for its Ray Data read tasks (Ray 2.60: with less, the read waits
    forever; mdt_ray/train/resources.py), but computes on its worker's one thread alone. So
    two trials need 3.02 CPUs of Ray's and two cores of the machine's: the cluster gets the
    larger of the machine's cores and what the trials reserve."""
    import ray

    from mdt_ray.train.resources import READ_TASK_CPUS, TRIAL_DRIVER_CPUS
    from mdt_ray.train.trainer import ensure_ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return False
    per_trial = TRIAL_WORKER_CPUS + TRIAL_DRIVER_CPUS + READ_TASK_CPUS
    ensure_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(max(1, budget.jobs) * per_trial)))
    return True


def run_sweeps(bench_uris: dict[str, str], teacher_path: str, budget: Budget, out: Path,
               log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Each method's grid through mdt_ray.tune, `budget.jobs` trials at a time; returns the
    selected settings per method (the defaults for a method without a space), and writes
    `<out>/selected.json`."""
    import ray

    started = start_local_ray(budget)
    try:
        return _sweep_all(bench_uris, teacher_path, budget, out, log)
    finally:
        if started:  # the final runs need none of it: its processes and memory go back
            ray.shutdown()


def _sweep_all(bench_uris: dict[str, str], teacher_path: str, budget: Budget, out: Path,
               log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    from mdt_ray.tune import load_sweep, run_sweep

    base = write_base_config(out / "sweeps" / "base.yaml", bench_uris, teacher_path, budget)
    selected: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {}
    for method in METHODS:
        settings = dict(DEFAULTS[method])
        if budget.spaces.get(method):
            sweep_file = write_sweep_file(out / "sweeps" / f"{method}.yaml", base, method, budget)
            cfg, spec, tree = load_sweep(sweep_file)
            t0 = time.perf_counter()
            result = run_sweep(cfg, spec, tree)
            report[method] = {"table": result["table"], "best": result["best"], "seconds": time.perf_counter() - t0,
                              "sweep_file": str(sweep_file)}
            if result["best"]:
                settings.update(result["best"]["params"])
            log(f"[bench] sweep {method}: selected {settings} in {report[method]['seconds']:.0f} s")
        selected[method] = settings
    (out / "selected.json").write_text(json.dumps({"selected": selected, "sweeps": report}, indent=1, default=str))
    return selected


# ---------------------------------------------------------------------------------------------
# The whole benchmark


def run_benchmark(uris: dict[str, str], teacher_path: str, out: str | Path, budget: Budget, *,
                  sweep: bool = True, log: Optional[Callable[[str], None]] = None, track: bool = True) -> dict[str, Any]:
    log = log or (lambda line: print(line, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    bench = load_bench(uris["train"], uris["val"], uris["test"], teacher_path, budget)
    log(f"[bench] {len(bench.train)} train / {len(bench.val)} val / {len(bench.test)} test assets; teacher "
        f"{teacher_path}; budget {asdict(budget)}")
    machine = provenance(bench)
    log(f"[bench] {machine['cpu']} ({machine['cpu_capability']}, {machine['torch_threads']} torch thread(s)), torch "
        f"{machine['torch']}, ray {machine['ray']}; shards: "
        + ", ".join(f"{k} {len(v['shards'])}" for k, v in machine["corpora"].items()))
    if sweep:
        selected = run_sweeps(uris, teacher_path, budget, out, log)
    else:
        selected = {m: dict(DEFAULTS[m]) for m in METHODS}
    results: dict[str, Any] = {"budget": asdict(budget), "selected": selected, "uris": uris, "teacher": teacher_path,
                               "provenance": machine}
    results["teachers"] = {label: {str(k): v for k, v in rows.items()} for label, rows in teacher_rows(bench, log).items()}

    # Every final and ablation run is independent of the others: all go to `budget.jobs`
    # processes at once. An ablation run with the selected Δt is the final run of its seed.
    tasks = [RunTask("final", method, seed, selected[method], keep=seed == 0)
             for method in METHODS for seed in range(budget.seeds)]
    reused = []
    for dt in DT_ABLATION:
        key = f"dt={dt:g}"
        settings = {**selected["mdt"], "distill.dt": dt}
        if settings == selected["mdt"] and budget.ablation_seeds <= budget.seeds:
            reused.append(key)
        else:
            tasks += [RunTask("ablation", key, seed, settings) for seed in range(budget.ablation_seeds)]
    outcomes = run_tasks(tasks, bench, uris, teacher_path, budget, log)

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    ablation: dict[str, list[dict[str, Any]]] = {f"dt={dt:g}": [] for dt in DT_ABLATION}
    students: dict[str, torch.nn.Module] = {}
    for task, outcome in zip(tasks, outcomes):
        state = outcome.pop("state")
        (runs if task.group == "final" else ablation)[task.name].append(outcome)
        if state is not None:
            from mdt_ray.models.teachers import student_from

            students[task.name] = student_from(bench.teacher).eval()
            students[task.name].load_state_dict(state)
    for key in reused:
        ablation[key] = [dict(r) for r in runs["mdt"][:budget.ablation_seeds]]
        log(f"[bench] ablation mdt {key}: the final runs")
    results["runs"] = runs
    results["summary"] = summarise(runs)
    results["dt_ablation"] = {"runs": ablation, "summary": summarise(ablation)}
    results["seconds"] = time.perf_counter() - t_start

    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    tables = format_tables(results)
    (out / "tables.md").write_text(tables)
    figures = make_figures(results, bench, students, out)
    log(tables)
    log(f"[bench] done in {results['seconds'] / 60:.1f} min -> {out}")
    if track:
        _log_mlflow(results, out, figures, log)
    return results


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """{name: {steps: {metric: (mean, ci)}}} over the seeds of each run group."""
    out: dict[str, Any] = {}
    for name, seeds in runs.items():
        out[name] = {}
        for k in seeds[0]["scores"]:
            out[name][k] = {m: mean_ci([s["scores"][k][m] for s in seeds]) for m in scoring.METRICS}
    return out


# ---------------------------------------------------------------------------------------------
# Tables, figures, MLflow


def format_tables(results: dict[str, Any]) -> str:
    n = results["budget"]["seeds"]
    head = "| sampler | steps | precision | coverage | mode TV | FD | mean IoU |\n|---|---|---|---|---|---|---|"
    lines = [f"Students: mean ± 95 % CI over {n} seeds; {results['budget']['test_assets']} held-out assets.", "", head]
    for label, rows in results["teachers"].items():
        for k, m in rows.items():
            lines.append(f"| {label} | {k} | " + " | ".join(f"{m[x]:.3f}" for x in scoring.METRICS) + " |")
    for method, rows in results["summary"].items():
        for k, m in rows.items():
            lines.append(f"| {LABELS[method]} | {k} | " + " | ".join(f"{m[x][0]:.3f} ± {m[x][1]:.3f}"
                                                                    for x in scoring.METRICS) + " |")
    abl = results["dt_ablation"]["summary"]
    lines += ["", f"MDT-dist Δt ablation ({results['budget']['ablation_seeds']} seed(s)):", "", head]
    for key, rows in abl.items():
        for k, m in rows.items():
            lines.append(f"| MDT-dist {key} | {k} | " + " | ".join(f"{m[x][0]:.3f} ± {m[x][1]:.3f}"
                                                                  for x in scoring.METRICS) + " |")
    return "\n".join(lines) + "\n"


def make_figures(results: dict[str, Any], bench: Bench, students: dict[str, torch.nn.Module], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mdt_ray.data.synthetic import decode_ss
    from mdt_ray.eval.render import render_grid

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ("precision", "coverage", "fd")):
        for method, rows in results["summary"].items():
            ks = [int(k) for k in rows]
            ax.errorbar(ks, [rows[str(k)][metric][0] for k in ks], yerr=[rows[str(k)][metric][1] for k in ks],
                        marker="o", capsize=3, label=LABELS[method])
        for label, style in (("learned teacher", "k--"), ("exact teacher", "k:")):
            rows = results["teachers"][label]
            ks = [int(k) for k in rows]
            ax.plot(ks, [rows[str(k)][metric] for k in ks], style, marker="x", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_title(metric + (" (lower is better)" if metric == "fd" else ""))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "quality_vs_steps.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method, seeds in results["runs"].items():
        curves = np.array([[c[1] for c in s["curve"]] for s in seeds])
        steps = [c[0] for c in seeds[0]["curve"]]
        window = max(1, len(steps) // 20)
        smooth = np.array([np.convolve(c, np.ones(window) / window, mode="valid") for c in curves])
        ax.plot(steps[window - 1:], smooth.mean(0), label=LABELS[method])
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "training_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    d = distribution()
    paths.append(render_grid([("true modes", d.occupancy.copy())], out / "truth_modes.png",
                             column_labels=[n.split("/")[1] for n in d.mode_names]))
    n = min(results["budget"]["render_assets"], len(bench.test))
    # Columns: the first test assets of each condition in turn, so every condition shows.
    pick = np.concatenate([np.nonzero(bench.test_conditions == k)[0][: max(1, n // 4)] for k in range(4)])[:n]
    sub = bench.test.head(len(bench.test))
    sub = type(sub)(sub.stage, sub.x0[pick], sub.cond[pick], [sub.asset_id[i] for i in pick], sub.manifest, sub.source)
    rows = [("exact 25", decode_ss(generate(d.exact_teacher(), sub, 25, sampler=TEACHER_SAMPLER))),
            ("teacher 25", decode_ss(generate(bench.teacher, sub, 25, sampler=TEACHER_SAMPLER))),
            ("teacher 1", decode_ss(generate(bench.teacher, sub, 1)))]
    for method, student in students.items():
        for k in (1, 2):
            rows.append((f"{LABELS[method]} {k}", decode_ss(generate(student, sub, k))))
    paths.append(render_grid(rows, out / "render_grid.png",
                             column_labels=[d.condition_names[bench.test_conditions[i]] for i in pick]))
    return paths


def _log_mlflow(results: dict[str, Any], out: Path, figures: list[Path], log) -> None:
    from mdt_ray import tracking
    from mdt_ray.config import TrackingConfig

    uri = tracking.resolve_uri(TrackingConfig().resolved_uri())
    run_id = tracking.start_run(uri, "mdt-ray-benchmark", f"benchmark-{out.name}",
                                {"budget": json.dumps(results["budget"]), "teacher": results["teacher"],
                                 "selected": json.dumps(results["selected"], default=str)},
                                tags={"kind": "benchmark"})
    logger = tracking.RunLogger(uri, run_id)
    flat = {}
    for method, rows in results["summary"].items():
        for k, m in rows.items():
            for metric, (mean, ci) in m.items():
                flat[f"{method}_{metric}_{k}step"] = mean
                flat[f"{method}_{metric}_{k}step_ci"] = ci
    for label, rows in results["teachers"].items():
        for k, m in rows.items():
            for metric, v in m.items():
                if isinstance(v, float):
                    flat[f"{label.replace(' ', '_')}_{metric}_{k}step"] = v
    logger.log_metrics(flat, step=0)
    for method, seeds in results["runs"].items():
        for step, loss in seeds[0]["curve"]:
            logger.log_metrics({f"loss_{method}": loss}, step=step)
    for path in [*figures, out / "results.json", out / "tables.md"]:
        logger.log_artifact(path, "benchmark")
    tracking.end_run(uri, run_id)
    log(f"[bench] MLflow run {run_id} in {uri}")
