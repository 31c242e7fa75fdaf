"""Ray Train + Ray Data overhead: the real distillation job versus the same loop in bare PyTorch.

One run, one model and batch, one synthetic corpus. It prints, side by side:

- steady-state seconds per step of the real job (`mdt_ray.train.trainer.distill`, Ray Train
  workers fed by Ray Data) and of the same step in this process with plain PyTorch (corpus
  pre-loaded in memory with `load_local`, the best case for the bare loop), and their ratio
  (target <= 1.03);
- assets/s per worker both ways;
- Ray's start-up costs apart from the steady state (ray.init, the job's set-up, trainer start to
  the first step, and the tail after the last step);
- the load on the machine (load average, and CPU cores busy with other people's processes while
  each side was measured), and where the CPU of the Ray processes went.

Measuring the same thing on both sides. The worker loop reports every `log_every` steps; MLflow
stores each report with a timestamp, and `assets_per_s_per_worker` is batch × steps / elapsed
of that window, timed from just after the previous report to the current one. So per window:

- "wall" s/step = time between consecutive reports / steps in between: data fetch, the step,
  optimizer, EMA and the report itself (metrics to MLflow, `ray.train.report`). This is the
  headline figure; the bare loop's wall windows are the same windows without a report.
- "in-loop" s/step = batch / assets_per_s_per_worker: the same without the report.

Both sides drop the first window (process start-up, allocator and kernel warm-up, Ray Data's
first batch) and take the median over the rest; the wall figure also drops the last window,
whose report timestamp is taken after the final checkpoint is written. The bare loop runs before
and (by default) after the Ray run, so load drifting on a shared machine shows as a spread.

On a busy shared machine that drift is larger than the 3 % to be resolved. `--paired` runs the
bare loop in a thread of this process *during* the Ray run instead, and compares mean s/step of
both over the same wall-clock interval (the Ray steady state): both sides then see the same
outside load. Each side has one torch thread (on a 1-CPU worker), so on 2 cores neither starves
the other when the machine is otherwise idle; Ray's own daemons, though, now take their CPU from
either side, so their cost shows in the CPU table rather than in full in the ratio. The bare
thread runs at the nice value Ray gives its workers, so the scheduler favours neither side.

Niceness. Ray starts every task and actor process, the training workers included, at nice 15
(`RAY_worker_niceness`, read by the raylet when the cluster starts). Against anything at nice 0
on the same cores (Ray's own raylet, GCS, dashboard and log monitor, the driver, other jobs) the
training worker then gets a small share of a contended CPU. `--worker-niceness 0` starts the
local cluster with RAY_worker_niceness=0, to measure the job without that handicap.

The CPU table (from /proc) splits the CPU of the Ray steady state by process and, for the
training worker, by thread: what Ray adds beside the training thread itself.

    python benchmarks/train_overhead.py [--model ss-demo] [--batch 8] [--steps 40] [--log-every 5]
        [--workers 1] [--cpus-per-worker 1] [--corpus PATH | --assets 512] [--paired]
        [--worker-niceness N] [--json out.json]

Ray is always started here as a local cluster (RAY_ADDRESS is ignored), under a private temp dir.
"""

from __future__ import annotations

import argparse
import atexit
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import PeriodicSampler, descendants, stat_fields, write_json  # noqa: E402

TARGET = 1.03
RAY_DEFAULT_WORKER_NICENESS = 15  # RayConfig worker_niceness: Ray runs tasks and actors at nice 15
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- a private place for Ray, MLflow, checkpoints and the corpus --------------------------------
def private_root(keep: bool) -> str:
    """Point Ray, tempfile and MLflow at a fresh temp dir before Ray is imported anywhere.

    Ray reads RAY_TMPDIR and the auth-token path when it starts, and its unix socket paths must
    stay under ~107 characters, hence a short /tmp/mdt-ovh-XXXX root. Workers inherit TMPDIR, so
    their scratch checkpoints land here too and go with the root.
    """
    root = tempfile.mkdtemp(prefix="mdt-ovh-", dir="/tmp")
    if not keep:
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    for d in ("ray", "tmp"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.environ.pop("RAY_ADDRESS", None)  # a local cluster: its processes are ours to account for
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ["RAY_TMPDIR"] = os.path.join(root, "ray")
    os.environ["TMPDIR"] = os.path.join(root, "tmp")
    tempfile.tempdir = None  # let tempfile pick up the new TMPDIR
    # Ray 2.60 turns token authentication on by default and refuses to start when
    # RAY_AUTH_TOKEN_PATH names a missing file; a random hex token is what it generates itself.
    token = os.path.join(root, "auth_token")
    with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = token
    return root


# -- CPU accounting from /proc -------------------------------------------------------------------
def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat's first line."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user..steal; guest time is already inside user
    return total - idle, total


def _proc_ticks(pid: int) -> Optional[int]:
    """utime + stime of one process (all its threads), in clock ticks."""
    fields = stat_fields(f"/proc/{pid}/stat")
    return None if fields is None else int(fields[11]) + int(fields[12])


def _nice(pid: int) -> Optional[int]:
    """The nice value of a process (field 19 of /proc/PID/stat)."""
    fields = stat_fields(f"/proc/{pid}/stat")
    return None if fields is None else int(fields[16])


def _thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """{tid: (thread name, utime + stime)} of every thread of one process."""
    out: dict[int, tuple[str, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        rest = text.rsplit(")", 1)[1].split()
        out[int(tid)] = (name, int(rest[11]) + int(rest[12]))
    return out


def _proc_name(pid: int) -> str:
    """A short, stable name: Ray's process title (`ray::RayTrainWorker`), else the script or binary.

    Ray retitles an actor's process with the method it runs (`ray::RayTrainWorker.run_train_fn`),
    so the part after the dot is dropped to keep one name per process.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if len(argv) == 1 and " " in argv[0]:
        argv = argv[0].split()  # a process that rewrote its title keeps one space-joined string
    if not argv:
        return "?"
    first = argv[0].split()[0] if argv[0].startswith("ray::") else argv[0]
    if first.startswith("ray::"):
        return first.split(".")[0]
    base = os.path.basename(first)
    if base.startswith("python"):
        args = argv[1:]
        if "-m" in args and args.index("-m") + 1 < len(args):
            return args[args.index("-m") + 1]
        if "-c" in args:
            return "python -c"
        # Interpreter flags (`python -u script.py`) come before the script.
        script = next((os.path.basename(a) for a in args if not a.startswith("-")), base)
        # A Ray worker process that has not (yet) been given a task or actor keeps its argv.
        return "idle ray worker" if script == "default_worker.py" else script
    return base


class TreeSampler(PeriodicSampler):
    """Snapshots, every `period` seconds, of the CPU ticks of this process and its descendants
    (a local Ray cluster's raylet, GCS, dashboard, workers, Ray Data tasks) and of the machine.

    After the run, `between(a, b)` gives the CPU each process used in a wall-clock interval that
    is only known afterwards (from the MLflow timestamps of the reports).
    """

    WORKER = "ray::RayTrainWorker"
    BARE = "bare loop (thread of this process)"

    def __init__(self, period: float = 0.5):
        super().__init__(period)
        self.samples: list[tuple[float, tuple[int, int], dict[int, tuple[str, int]]]] = []
        # Per-thread ticks of the training workers, sampled alongside: which thread of the worker
        # (the training thread, Ray Data's prefetcher, Ray's core-worker threads) used the CPU.
        self.threads: list[dict[int, tuple[str, int]]] = []
        # The paired mode's bare loop runs in a thread of this process: its CPU is counted apart.
        self.bare_tid: Optional[int] = None
        self.worker_nice: dict[int, Optional[int]] = {}  # pid -> nice of each training worker

    def sample(self) -> None:
        procs: dict[int, tuple[str, int]] = {}
        threads: dict[int, tuple[str, int]] = {}
        me, bare_tid = os.getpid(), self.bare_tid
        for pid in [me, *descendants(me)]:
            ticks = _proc_ticks(pid)
            if ticks is not None and pid == me and bare_tid is not None:
                bare = _thread_ticks(me).get(bare_tid)
                if bare is not None:
                    ticks -= bare[1]
                    procs[-bare_tid] = (self.BARE, bare[1])  # negative key: cannot clash with a pid
            if ticks is not None:
                procs[pid] = (name := _proc_name(pid), ticks)
                if name.startswith(self.WORKER):
                    self.worker_nice.setdefault(pid, _nice(pid))
                    threads.update({tid: (f"{pid}/{tname}", t) for tid, (tname, t) in _thread_ticks(pid).items()})
        self.samples.append((time.time(), machine_busy_ticks(), procs))
        self.threads.append(threads)

    def between(self, a: float, b: float) -> dict[str, Any]:
        """CPU-seconds per process name and of the whole machine between wall times a and b.

        The interval is widened to the nearest samples outside it (at most one period each side).
        A process first seen inside the interval started there (its baseline is 0); one that
        vanished keeps its last seen value.
        """
        if not self.samples:
            return {}
        i0 = max([i for i, s in enumerate(self.samples) if s[0] <= a] or [0])
        i1 = min([i for i, s in enumerate(self.samples) if s[0] >= b] or [len(self.samples) - 1])
        t0, (busy0, _), _ = self.samples[i0]
        t1, (busy1, _), _ = self.samples[i1]
        def used(series: list[dict[int, tuple[str, int]]]) -> dict[str, float]:
            base, last = series[0], {}
            for snap in series:
                last.update(snap)
            per_name: dict[str, float] = {}
            for key, (name, ticks) in last.items():
                cpu = (ticks - base[key][1] if key in base else ticks) / CLK_TCK
                if cpu > 0:
                    per_name[name] = per_name.get(name, 0.0) + cpu
            return dict(sorted(per_name.items(), key=lambda kv: -kv[1]))

        per_name = used([procs for _, _, procs in self.samples[i0 : i1 + 1]])
        per_thread = used(self.threads[i0 : i1 + 1])
        wall = t1 - t0
        bare = per_name.pop(self.BARE, 0.0)
        ours = sum(per_name.values())  # the Ray job and this driver, without the bare loop
        machine = (busy1 - busy0) / CLK_TCK
        return {"wall_s": wall, "ours_cpu_s": ours, "bare_thread_cpu_s": bare, "machine_cpu_s": machine,
                "others_cores": max(0.0, machine - ours - bare) / wall if wall > 0 else float("nan"),
                "per_process_cpu_s": per_name, "worker_threads_cpu_s": per_thread}


# -- the configuration both sides run ------------------------------------------------------------
def make_config(args, corpus: str, root: str):
    from mdt_ray.config import load_config

    # The demo job's objective and optimizer settings; no eval, one checkpoint at the end, a report
    # every `log_every` steps, MLflow into a private sqlite store (that is where the per-window
    # timings are read back from), and no retries: a failed run must fail the benchmark.
    return load_config(REPO / "jobs/configs/demo.yaml", [
        f"model.teacher={args.model}", "model.stage=ss",
        f"data.uri={corpus}", "data.eval_uri=null",
        f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.log_every={args.log_every}",
        f"train.checkpoint_every={args.steps}",
        f"scale.num_workers={args.workers}", f"scale.cpus_per_worker={args.cpus_per_worker}",
        f"tracking.uri=sqlite:///{root}/mlflow.db", "tracking.experiment=train-overhead",
        f"run.storage_path={root}/runs", "run.name=overhead", "run.max_failures=0",
    ])


def worker_threads(cfg) -> int:
    # Exactly what train_loop_per_worker sets on a CPU worker.
    return max(1, int(cfg.scale.cpus_per_worker))


# -- the bare PyTorch loop -----------------------------------------------------------------------
def bare_loop(cfg, label: str, stop: Optional[threading.Event] = None) -> dict[str, Any]:
    """The worker's step for rank 0 of a world of 1, in this process, without Ray.

    The engine is built as the worker builds it (mdt_ray.train.loop: teacher, student, EMA,
    clipping, micro-batching, `step_seed` draws, the loss terms as Python floats every step) and
    fed as the worker is fed (mdt_ray.train.position.Batches: epoch after epoch of full batches in
    the stage's layout, reshuffled with the worker's per-epoch seed), but from the corpus
    pre-loaded in memory: the best case for the bare loop.

    Runs `train.steps` steps, or, given `stop`, until it is set (the paired mode, beside the Ray
    run). Every step's wall-clock start and end (time.time(), the clock of MLflow's timestamps)
    and CPU time are kept, so the paired mode can pick the steps inside the Ray steady state.
    """
    import torch

    from mdt_ray.data.storage import StorageTarget
    from mdt_ray.engine import Engine
    from mdt_ray.models.teachers import build_teacher, freeze, student_from
    from mdt_ray.pretrain import epoch_batches
    from mdt_ray.stages import get_stage
    from mdt_ray.train.position import Batches

    tc, stage, device = cfg.train, get_stage(cfg.model.stage), torch.device("cpu")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(worker_threads(cfg))
    try:
        t0 = time.perf_counter()
        split = stage.load(StorageTarget.from_data_config(cfg.data))
        load_s = time.perf_counter() - t0
        if len(split) < tc.batch_size:
            raise SystemExit(f"the corpus has {len(split)} assets, fewer than one batch of {tc.batch_size}")
        t0 = time.perf_counter()
        teacher = build_teacher(cfg.model.teacher, seed=tc.seed)
        student = student_from(teacher).to(device)
        engine = Engine(student, freeze(teacher, device, cfg.model.teacher_bf16), stage=stage, distill=cfg.distill,
                        train=tc)
        build_s = time.perf_counter() - t0

        def epoch(e: int):  # indexing copies, like the collate step that hands the worker fresh tensors
            order = torch.Generator().manual_seed(tc.seed * 1000 + e)
            return (split.batch(idx, device) for idx in epoch_batches(len(split), tc.batch_size, order))

        batches = Batches(epoch, batch_size=tc.batch_size)
        # Beside the Ray run this is one thread among the driver's: count its CPU only. Alone, count
        # the whole process, which also covers more than one torch thread.
        windows, steps = _timed_steps(engine, batches, tc, label, stop,
                                      time.thread_time if stop is not None else time.process_time)
    finally:
        torch.set_num_threads(threads_before)

    res: dict[str, Any] = {"label": label, "threads": worker_threads(cfg), "load_corpus_s": load_s,
                           "build_models_s": build_s, "epochs": batches.position.epoch + 1, "windows": windows,
                           "steps": steps}
    if stop is not None:
        return res  # the paired mode picks its steps against the Ray run's timeline
    steady = windows[1:]  # the first window holds the warm-up, as on the Ray side
    per_step_in_loop = [w["elapsed_s"] / w["steps"] for w in steady]
    per_step_wall = per_step_in_loop[:-1]  # the same windows the Ray side's wall figure can use
    n_steady = sum(w["steps"] for w in steady)
    res.update({
        "s_per_step_wall": statistics.median(per_step_wall),
        "s_per_step_in_loop": statistics.median(per_step_in_loop),
        "s_per_step_median_of_steps": statistics.median(st["s"] for st in steps[windows[0]["steps"]:]),
        "first_window_s_per_step": windows[0]["elapsed_s"] / windows[0]["steps"],
        "cpu_s_per_step": sum(w["own_cpu_s"] for w in steady) / n_steady,
        "others_cores": statistics.mean(w["others_cores"] for w in steady),
        "last_loss": windows[-1]["loss"],
    })
    return res


def _timed_steps(engine, batches, tc, label: str, stop: Optional[threading.Event],
                 cpu_clock) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """Engine steps with each step's times, and a window (mean loss, time, CPU, others' load)
    every `log_every` steps, as the worker reports them."""
    windows: list[dict[str, Any]] = []
    steps: list[dict[str, float]] = []
    losses: list[float] = []
    t_window, cpu_window, stat_window = time.perf_counter(), cpu_clock(), machine_busy_ticks()
    step = 0
    while (step < tc.steps) if stop is None else not stop.is_set():
        wall0, t_step, cpu0 = time.time(), time.perf_counter(), cpu_clock()
        # Steps past train.steps (paired mode) reuse the seeds cyclically: same cost.
        measured, _ = engine.step(next(batches), step % tc.steps)
        steps.append({"start": wall0, "end": time.time(), "s": time.perf_counter() - t_step,
                      "cpu_s": cpu_clock() - cpu0})
        losses.append(measured.terms["loss"])
        step += 1
        if step % tc.log_every and step != tc.steps:
            continue
        now, cpu_now, stat_now = time.perf_counter(), cpu_clock(), machine_busy_ticks()
        wall, own_cpu = now - t_window, cpu_now - cpu_window
        machine_cpu = (stat_now[0] - stat_window[0]) / CLK_TCK
        loss = sum(losses) / len(losses)
        windows.append({"step": step, "steps": len(losses), "elapsed_s": wall, "loss": loss, "own_cpu_s": own_cpu,
                        "others_cores": max(0.0, machine_cpu - own_cpu) / wall})
        print(f"[bare {label}] step {step}{'' if stop else f'/{tc.steps}'} loss {loss:.4g} "
              f"{wall / len(losses):.3f} s/step", flush=True)
        losses = []
        t_window, cpu_window, stat_window = now, cpu_now, stat_now
    return windows, steps


# -- the real job on Ray -------------------------------------------------------------------------
def ray_run(cfg, ray_cpus: Optional[int], paired: bool = False, bare_nice: int = 0) -> dict[str, Any]:
    """`distill(cfg)` on a fresh local Ray cluster; per-window timings from its MLflow metrics.

    With `paired`, the bare loop runs meanwhile in a thread of this process, from just after
    ray.init until distill() returns, so both sides share whatever load the machine has; that
    thread runs at `bare_nice`, the nice value Ray gives its workers, so that neither side is
    favoured by the scheduler.
    """
    bare_box: dict[str, Any] = {}
    with TreeSampler() as sampler:
        t0 = time.perf_counter()
        import ray

        from mdt_ray.train.launch import distill
        from mdt_ray.train.trainer import ensure_ray

        import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ensure_ray(num_cpus=ray_cpus)  # what the job itself calls, here always a local cluster
        init_s = time.perf_counter() - t0
        cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
        stop = threading.Event()
        bare_thread = None
        if paired:
            def run_bare() -> None:
                sampler.bare_tid = threading.get_native_id()
                # Linux keeps a nice value per thread: this lowers the bare loop's thread only.
                os.setpriority(os.PRIO_PROCESS, sampler.bare_tid, max(bare_nice, os.getpriority(os.PRIO_PROCESS, 0)))
                try:
                    bare_box["res"] = bare_loop(cfg, "paired", stop)
                except BaseException as e:  # re-raised in the main thread below
                    bare_box["err"] = e
                    stop.set()

            bare_thread = threading.Thread(target=run_bare, name="bare-loop", daemon=True)
            bare_thread.start()
        wall_call = time.time()
        try:
            result = distill(cfg)
        finally:
            stop.set()
        wall_done = time.time()
        if bare_thread is not None:
            bare_thread.join()  # at most one more step
            if "err" in bare_box:
                raise bare_box["err"]
        t0 = time.perf_counter()
        ray.shutdown()
        shutdown_s = time.perf_counter() - t0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.resolved_uri())
    run = client.get_run(result.mlflow_run_id)
    rates = sorted(client.get_metric_history(result.mlflow_run_id, "assets_per_s_per_worker"), key=lambda m: m.step)
    losses = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "loss")}
    if len(rates) < 3:
        raise SystemExit(f"the Ray run reported {len(rates)} windows; need >= 3 (steps >= 3 × log_every)")
    b = cfg.train.batch_size
    steps = [m.step for m in rates]
    stamps = [m.timestamp / 1000.0 for m in rates]
    sizes = [steps[0]] + [s1 - s0 for s0, s1 in zip(steps, steps[1:])]
    # In-loop: a window's own timer (batch × steps / elapsed), without the report that ends it.
    in_loop = [b / m.value for m in rates]
    # Wall: report-to-report, i.e. the previous report's cost plus this window's steps. The last
    # report's timestamp is taken after the final checkpoint is written, so it is left out.
    wall = [(stamps[k] - stamps[k - 1]) / sizes[k] for k in range(1, len(rates) - 1)]
    first_start = stamps[0] - sizes[0] * in_loop[0]  # the first step began one window before
    run_start = run.info.start_time / 1000.0
    cpu = sampler.between(stamps[0], stamps[-2])
    steady_steps = steps[-2] - steps[0]
    return {
        "windows": [{"step": s, "steps": n, "report_time": t, "in_loop_s_per_step": il, "loss": losses.get(s)}
                    for s, n, t, il in zip(steps, sizes, stamps, in_loop)],
        "s_per_step_wall": statistics.median(wall),
        "s_per_step_in_loop": statistics.median(in_loop[1:]),
        "first_window_s_per_step": in_loop[0],
        "last_loss": losses.get(steps[-1]),
        "cluster_cpus": cluster_cpus,
        "startup": {
            "import_ray_s": import_s,
            "ray_init_s": init_s,
            # manifest + shard checks, MLflow store and run creation, up to the run's start time
            "job_setup_s": run_start - wall_call,
            # build_trainer, fit(): controller, worker actors, process group, model build, dataset
            "trainer_start_s": first_start - run_start,
            # after the last step: final checkpoint and export, report, teardown, MLflow end
            "tail_s": wall_done - stamps[-1],
            "shutdown_s": shutdown_s,
            "distill_total_s": wall_done - wall_call,
        },
        "cpu_steady": {**cpu, "steps": steady_steps},
        "others_cores": cpu.get("others_cores"),
        # Per worker, to compare with the bare loop, which does one worker's share of each step.
        "worker_cpu_s_per_step": sum(v for k, v in cpu.get("per_process_cpu_s", {}).items()
                                     if k.startswith(TreeSampler.WORKER))
        / max(1, steady_steps) / cfg.scale.num_workers,
        "mlflow_run_id": result.mlflow_run_id,
        "steady_interval": [stamps[0], stamps[-2]],
        "steady_steps": steady_steps,
        # Means over the steady interval (the paired mode compares these with the bare steps
        # inside the same interval); windows 2..K-1, each weighted by its steps.
        "mean_s_per_step_wall": (stamps[-2] - stamps[0]) / max(1, steady_steps),
        "mean_s_per_step_in_loop": sum(in_loop[k] * sizes[k] for k in range(1, len(rates) - 1))
        / max(1, sum(sizes[1:-1])),
        "bare_paired": bare_box.get("res"),
        "worker_nice": sorted({n for n in sampler.worker_nice.values() if n is not None}),
    }


# -- report --------------------------------------------------------------------------------------
def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def paired_bare(bare: dict[str, Any], ray_res: dict[str, Any]) -> dict[str, Any]:
    """The bare steps that ran wholly inside the Ray run's steady interval, and their figures."""
    a, b = ray_res["steady_interval"]
    inside = [st for st in bare["steps"] if st["start"] >= a and st["end"] <= b]
    if len(inside) < 2:
        raise SystemExit(f"only {len(inside)} bare step(s) ran inside the Ray steady state; raise --steps")
    # First start to last end, as the Ray side's report-to-report time: nothing between steps lost.
    span = inside[-1]["end"] - inside[0]["start"]
    return {"steps_inside": len(inside), "s_per_step": span / len(inside),
            "cpu_s_per_step": statistics.mean(st["cpu_s"] for st in inside),
            "s_per_step_median_of_steps": statistics.median(st["s"] for st in inside)}


def summarize(mode: str, bare: list[dict[str, Any]], ray_res: dict[str, Any], batch: int) -> dict[str, Any]:
    """The two columns of the table, each side measured the same way for the chosen mode."""
    cs = ray_res["cpu_steady"]
    ray_all_cpu = cs.get("ours_cpu_s", float("nan")) / max(1, cs.get("steps", 1))
    if mode == "paired":
        pb = paired_bare(ray_res["bare_paired"], ray_res)
        out = {"bare_wall": pb["s_per_step"], "ray_wall": ray_res["mean_s_per_step_wall"],
               # The bare loop has no reports: its in-loop time is its wall time.
               "bare_in_loop": pb["s_per_step"], "ray_in_loop": ray_res["mean_s_per_step_in_loop"],
               "bare_cpu": pb["cpu_s_per_step"], "bare_steps_inside": pb["steps_inside"],
               "bare_median_of_steps": pb["s_per_step_median_of_steps"],
               "bare_others_cores": ray_res["others_cores"],
               "bare_first_window": ray_res["bare_paired"]["windows"][0]["elapsed_s"]
               / ray_res["bare_paired"]["windows"][0]["steps"],
               # The paired bare loop runs past train.steps: its loss at the Ray run's last step.
               "bare_last_loss": next((w["loss"] for w in ray_res["bare_paired"]["windows"]
                                       if w["step"] >= ray_res["windows"][-1]["step"]), float("nan"))}
    else:
        out = {"bare_wall": statistics.mean(r["s_per_step_wall"] for r in bare), "ray_wall": ray_res["s_per_step_wall"],
               "bare_in_loop": statistics.mean(r["s_per_step_in_loop"] for r in bare),
               "ray_in_loop": ray_res["s_per_step_in_loop"],
               "bare_cpu": statistics.mean(r["cpu_s_per_step"] for r in bare),
               "bare_median_of_steps": statistics.mean(r["s_per_step_median_of_steps"] for r in bare),
               "bare_others_cores": statistics.mean(r["others_cores"] for r in bare),
               "bare_first_window": statistics.mean(r["first_window_s_per_step"] for r in bare),
               "bare_last_loss": bare[0]["last_loss"]}
    out.update({
        "mode": mode,
        "ratio_wall": out["ray_wall"] / out["bare_wall"],
        "ratio_in_loop": out["ray_in_loop"] / out["bare_in_loop"],
        "assets_per_s_per_worker": {"bare": batch / out["bare_wall"], "ray": batch / out["ray_wall"]},
        "ray_worker_cpu": ray_res["worker_cpu_s_per_step"], "ray_all_cpu": ray_all_cpu,
        "ray_others_cores": ray_res["others_cores"], "ray_first_window": ray_res["first_window_s_per_step"],
        "ray_last_loss": ray_res["last_loss"],
    })
    if mode == "sequential":
        out["ratio_wall_per_bare_run"] = [ray_res["s_per_step_wall"] / r["s_per_step_wall"] for r in bare]
    return out


def print_table(res: dict[str, Any]) -> None:
    c, m, ray_ = res["config"], res["summary"], res["ray"]
    b = c["batch"]
    print()
    print(f"model {c['model']}, batch {b}/worker, {c['steps']} steps (report every {c['log_every']}), "
          f"{c['workers']} worker(s) × {c['cpus_per_worker']} CPU, torch threads {c['threads']}, "
          f"corpus {c['corpus_assets']} assets, Ray cluster {c['ray_cpus']:g} CPUs, "
          f"{res['machine']['cpus']} CPUs on the machine")
    if m["mode"] == "paired":
        print(f"paired: bare loop in a thread beside the Ray run; means over the Ray steady state "
              f"({ray_['steady_steps']} Ray steps, {m['bare_steps_inside']} bare steps inside it)")
    else:
        print("sequential: bare before" + (" and after" if len(res["bare"]) > 1 else "")
              + " the Ray run; medians over report windows 2.. (first window = warm-up, dropped)")
    print(f"{'':34s}{'bare PyTorch':>14s}{'Ray Train+Data':>16s}{'ratio':>8s}")
    r = m["ratio_wall"]
    print(f"{'s/step, wall (incl. reports)':34s}{m['bare_wall']:14.3f}{m['ray_wall']:16.3f}{r:8.3f}"
          f"  target <= {TARGET}: {'met' if r <= TARGET else 'MISSED'}")
    print(f"{'s/step, in-loop (excl. reports)':34s}{m['bare_in_loop']:14.3f}{m['ray_in_loop']:16.3f}"
          f"{m['ratio_in_loop']:8.3f}")
    for run in res["bare"]:
        print(f"{'  bare ' + run['label'] + ' (wall, in-loop)':34s}{run['s_per_step_wall']:14.3f}"
              f"{run['s_per_step_in_loop']:16.3f}   (median of single steps {run['s_per_step_median_of_steps']:.3f})")
    ap = m["assets_per_s_per_worker"]
    print(f"{'assets/s per worker (wall)':34s}{ap['bare']:14.3f}{ap['ray']:16.3f}{ap['ray'] / ap['bare']:8.3f}")
    print(f"{'first window s/step (warm-up)':34s}{m['bare_first_window']:14.3f}{m['ray_first_window']:16.3f}")
    # CPU time per step depends less on how much CPU others leave than wall time does: on a
    # shared machine it is the steadier view of the work Ray adds.
    print(f"{'CPU-s/step, per training worker':34s}{m['bare_cpu']:14.3f}{m['ray_worker_cpu']:16.3f}"
          f"{m['ray_worker_cpu'] / m['bare_cpu']:8.3f}")
    print(f"{'CPU-s/step, all processes':34s}{m['bare_cpu']:14.3f}{m['ray_all_cpu']:16.3f}"
          f"{m['ray_all_cpu'] / m['bare_cpu']:8.3f}")
    print(f"{'cores busy with other work':34s}{m['bare_others_cores']:14.2f}{m['ray_others_cores']:16.2f}"
          "   (machine CPU minus this benchmark's processes)")
    print(f"{'loss, last window':34s}{m['bare_last_loss']:14.4g}{m['ray_last_loss']:16.4g}"
          "   (data order differs; same magnitude expected)")
    s = ray_["startup"]
    print(f"Ray start-up (outside the steady state): import ray {s['import_ray_s']:.1f} s, ray.init "
          f"{s['ray_init_s']:.1f} s, job set-up (manifest, shard checks, MLflow run) {s['job_setup_s']:.1f} s, "
          f"trainer start to first step {s['trainer_start_s']:.1f} s; after the last report "
          f"{s['tail_s']:.1f} s; ray.shutdown {s['shutdown_s']:.1f} s; distill() in all {s['distill_total_s']:.1f} s"
          + ("  [paired: start-up shared the CPU with the bare loop]" if m["mode"] == "paired" else ""))
    cs = ray_["cpu_steady"]
    if cs:
        n = max(1, cs["steps"])
        print(f"CPU during the Ray steady state ({cs['wall_s']:.0f} s wall, {n} steps), CPU-s per Ray step:")
        for name, v in list(cs["per_process_cpu_s"].items())[:10]:
            print(f"  {name:44s}{v / n:8.3f}")
        print(f"  {'all Ray processes and this driver':44s}{cs['ours_cpu_s'] / n:8.3f}"
              + (f"   bare loop thread {cs['bare_thread_cpu_s'] / n:.3f}" if cs.get("bare_thread_cpu_s") else "")
              + f"   whole machine {cs['machine_cpu_s'] / n:.3f}")
        print("  threads of the training worker:")
        for name, v in list(cs["worker_threads_cpu_s"].items())[:6]:
            print(f"    {name:42s}{v / n:8.3f}")
    bare_nice = c["bare_nice_paired"] if m["mode"] == "paired" else os.getpriority(os.PRIO_PROCESS, 0)
    print(f"nice: Ray training worker {ray_['worker_nice']}, bare loop {bare_nice} "
          "(Ray starts its workers at RAY_worker_niceness, 15 unless set; it matters only when the CPU is contended)")
    print("load average (1, 5, 15 min): " + "; ".join(f"{k} {v}" for k, v in res["machine"]["loadavg"].items()))


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ss-demo")
    p.add_argument("--batch", type=int, default=8, help="assets per worker per step")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=5, help="steps per report window")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="Ray CPUs per worker (default 1, or 0.5 when the workers would take every CPU)")
    p.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local cluster (default: all)")
    p.add_argument("--corpus", help="an existing stage-1 corpus to reuse (else a synthetic one is built)")
    p.add_argument("--assets", type=int, default=512, help="assets in the synthetic corpus")
    p.add_argument("--shards", type=int, default=4, help="shards of the synthetic corpus")
    p.add_argument("--paired", action="store_true",
                   help="run the bare loop beside the Ray run instead of before/after it: both sides "
                        "then share the same load (for busy, shared machines)")
    p.add_argument("--no-bare-after", action="store_true", help="sequential mode: skip the bare run after Ray")
    p.add_argument("--worker-niceness", type=int, default=None,
                   help="start the local cluster with RAY_worker_niceness=N (Ray's default: 15)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (corpus, runs, MLflow store)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 3 * args.log_every:
        p.error("--steps must be at least 3 × --log-every: one warm-up window, and two more to measure")
    ncpu = os.cpu_count() or 1
    if args.cpus_per_worker is None:
        # As in the demo config: workers holding every CPU leave none for Ray Data's read tasks.
        args.cpus_per_worker = 1.0 if args.workers < (args.ray_cpus or ncpu) else 0.5

    root = private_root(args.keep)
    if args.worker_niceness is not None:
        # Read by the raylet when it starts, as with `RAY_worker_niceness=N ray start ...`.
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    ray_nice = int(os.environ.get("RAY_worker_niceness", RAY_DEFAULT_WORKER_NICENESS))
    if args.keep:
        print(f"[train_overhead] temp dir kept: {root}", flush=True)
    load = {"start": loadavg()}
    corpus = args.corpus
    if corpus is None:
        from mdt_ray.data.corpus import build_synthetic

        corpus = f"{root}/corpus"
        t0 = time.perf_counter()
        # In this process: a Ray session here would become part of what is measured.
        build_synthetic(corpus, args.assets, seed=0, num_shards=args.shards, workers=1, use_ray=False,
                        progress=False)
        print(f"[train_overhead] built a synthetic corpus of {args.assets} assets in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    from mdt_ray.data.schema import read_manifest

    n_assets = read_manifest(corpus).num_rows
    cfg = make_config(args, corpus, root)
    if args.steps * args.batch * args.workers > n_assets:
        print(f"[train_overhead] note: {args.steps} steps × {args.batch} × {args.workers} worker(s) pass the "
              f"{n_assets}-asset corpus more than once; Ray Data restarts its pipeline each epoch", flush=True)

    bare: list[dict[str, Any]] = []
    mode = "paired" if args.paired else "sequential"
    if mode == "sequential":
        bare.append(bare_loop(cfg, "before"))
        load["after_bare_before"] = loadavg()
    ray_res = ray_run(cfg, args.ray_cpus, paired=args.paired, bare_nice=ray_nice)
    load["after_ray"] = loadavg()
    if mode == "sequential" and not args.no_bare_after:
        bare.append(bare_loop(cfg, "after"))
        load["after_bare_after"] = loadavg()

    res = {
        "config": {"model": args.model, "batch": args.batch, "steps": args.steps, "log_every": args.log_every,
                   "workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
                   "threads": worker_threads(cfg), "corpus": corpus, "corpus_assets": n_assets,
                   "ray_cpus": ray_res["cluster_cpus"], "ray_worker_niceness_setting": ray_nice,
                   "bare_nice_paired": max(ray_nice, os.getpriority(os.PRIO_PROCESS, 0))},
        "machine": {"cpus": ncpu, "loadavg": load},
        "bare": bare,
        "ray": ray_res,
        "target": TARGET,
    }
    res["summary"] = summarize(mode, bare, ray_res, args.batch)
    print_table(res)
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
