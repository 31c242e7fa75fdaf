"""Checkpoint write and upload time vs model size, on the loopback S3 server, and how long the
step loop waits for them.

For each `--models` size: a checkpoint of the real layout (`mdt_ray.train.state.save_checkpoint`:
fp32 student, fp32 EMA, AdamW's two fp32 moments, state.json with every file's size and
sha256) written to local disk, then uploaded to the loopback S3 server with
`pyarrow.fs.copy_files`, as Ray Train persists a reported checkpoint directory. Rates (GB/s)
of each part, and the time both would take for a TRELLIS-L checkpoint (`--extrapolate-gb`,
default 9) at the largest model's measured rates.

The wait: a loop of real optimizer steps (`--step-model`, Engine + MDT-dist, default ss-tiny)
writes one checkpoint of `--wait-model` and keeps stepping until its upload is done. `--wait`
picks how it is uploaded:
  ray-async  through the training loop's own report path (`mdt_ray.train.loop._send`) in a real
             Ray Train run: the state copied to host memory, `ray.train.report(
             checkpoint_upload_mode=ASYNC)`, the write, sha256 and upload in Ray's background
             thread, a metrics-only report every 10 steps as at the default
             `train.log_every` (Ray's controller takes one report per 2 s poll: a loop that
             reports faster queues them up, in Ray's upload thread ahead of the upload)
  ray-sync   the same with `train.async_upload=false`: the report uploads inline
  sync       an inline `pyarrow.fs.copy_files` without Ray (what a synchronous report does)
  async      the same copy in a background thread without Ray
Reported: the seconds the loop was held at the checkpoint step, as a fraction of the upload
time (target < 10 %), and the step time while the upload runs against before.

`--paired-write N` only times `save_checkpoint` (sha256 while writing) against safetensors'
`save_file` and a re-read of every file, alternating N times on the `--wait-model` state.

    python benchmarks/checkpoint_io.py [--models ss-tiny ss-demo ss-B] [--wait-model ss-B]
        [--step-model ss-tiny] [--wait ray-async ray-sync] [--extrapolate-gb 9] [--json out.json]
    python benchmarks/checkpoint_io.py --wait-model ss-B --paired-write 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import save_figure, write_json  # noqa: E402
from mdt_ray.models import build_model, count_parameters  # noqa: E402
from mdt_ray.train.state import save_checkpoint, scratch_dir  # noqa: E402


def fake_state(model: str, seed: int = 0):
    """Student, EMA and AdamW tensors in the shapes of `model` (values random, sizes real)."""
    with torch.device("meta"):
        net = build_model(model, use_fp16=False)
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    student = {k: torch.empty(s).uniform_(-1, 1, generator=g) for k, s in shapes.items()}
    params = {n for n, _ in net.named_parameters()}
    ema = {k: v.clone() for k, v in student.items() if k in params}
    opt = {}
    for k in params:
        opt[f"{k}.exp_avg"] = torch.empty(shapes[k]).normal_(generator=g)
        opt[f"{k}.exp_avg_sq"] = torch.empty(shapes[k]).uniform_(0, 1e-3, generator=g)
        opt[f"{k}.step"] = torch.tensor(100.0)
    groups = [{"lr": 1e-5, "betas": [0.9, 0.999], "weight_decay": 0.0, "params": list(range(len(params)))}]
    return {"student": student, "ema": ema, "optimizer": (opt, groups),
            "meta": {"step": 100, "model": model}}, count_parameters(net)


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def upload(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    from mdt_ray.data import storage

    fs, path = storage.StorageTarget(uri).pyarrow_fs()
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def measure_size(model: str, uri: str) -> dict:
    state, params = fake_state(model)
    with scratch_dir("ckpt-bench-") as d:
        t0 = time.perf_counter()
        save_checkpoint(d, **state)
        t_write = time.perf_counter() - t0
        nbytes = dir_bytes(d)
        t0 = time.perf_counter()
        upload(d, uri)
        t_upload = time.perf_counter() - t0
    return {"model": model, "parameters": params, "bytes": nbytes, "write_s": t_write, "upload_s": t_upload,
            "write_gb_s": nbytes / t_write / 1e9, "upload_gb_s": nbytes / t_upload / 1e9,
            "load": os.getloadavg()[0]}


def paired_write(model: str, rounds: int) -> dict:
    """`save_checkpoint` (sha256 while writing) against what it did before: safetensors'
    `save_file` for each part, then every file read back and hashed; alternating, same state."""
    import hashlib

    from safetensors.torch import save_file

    def before(d: Path, state: dict) -> None:
        for name, part in (("student", state["student"]), ("ema", state["ema"]), ("optimizer", state["optimizer"][0])):
            save_file(part, str(d / f"{name}.safetensors"))
        for p in sorted(d.iterdir()):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)

    state, _ = fake_state(model)
    times: dict[str, list[float]] = {"reread": [], "while_writing": []}
    for _ in range(rounds):
        for kind in times:
            with scratch_dir("ckpt-paired-") as d:
                t0 = time.perf_counter()
                before(d, state) if kind == "reread" else save_checkpoint(d, **state)
                times[kind].append(time.perf_counter() - t0)
    return {"model": model, **{k: v for k, v in times.items()},
            "ratio_median": statistics.median(times["while_writing"]) / statistics.median(times["reread"]),
            "load": os.getloadavg()[0]}


def step_loop(step_model: str, ckpt_model: str, uri: str, mode: str, before: int = 3, after: int = 30) -> dict:
    """Steps, one checkpoint (inline or background upload), more steps until the upload is done."""
    from mdt_ray.config import DistillConfig, TrainConfig
    from mdt_ray.engine import Engine
    from mdt_ray.models.teachers import build_teacher, freeze, student_from
    from mdt_ray.stages import get_stage

    from benchmarks._common import random_batch

    teacher = build_teacher(step_model)
    engine = Engine(student_from(teacher), freeze(teacher, torch.device("cpu"), False), stage=get_stage("ss"),
                    distill=DistillConfig(method="mdt"), train=TrainConfig(batch_size=2, lr=1e-5))
    batch = random_batch(step_model, 2, torch.Generator().manual_seed(0))
    state, _ = fake_state(ckpt_model)
    k = iter(range(10**6))
    times_before = []
    for _ in range(before):
        t0 = time.perf_counter()
        engine.step(batch, next(k))
        times_before.append(time.perf_counter() - t0)
    with scratch_dir("ckpt-wait-") as d:
        done = threading.Event()
        result: dict = {}

        def run_upload():
            t0 = time.perf_counter()
            try:
                upload(d, uri)
            except Exception as e:  # noqa: BLE001 (reported, the measurement stops)
                result["error"] = repr(e)
            result["upload_s"] = time.perf_counter() - t0
            done.set()

        t0 = time.perf_counter()
        save_checkpoint(d, **state)
        write_s = time.perf_counter() - t0
        if mode == "sync":
            run_upload()
        else:
            threading.Thread(target=run_upload, daemon=True).start()
        held_s = time.perf_counter() - t0
        times_during = []
        while not done.is_set() and len(times_during) < after:
            t1 = time.perf_counter()
            engine.step(batch, next(k))
            times_during.append(time.perf_counter() - t1)
        done.wait()
    if "error" in result:
        raise RuntimeError(f"upload failed: {result['error']}")
    return {"mode": mode, "write_s": write_s, "held_s": held_s, "upload_s": result["upload_s"],
            "held_over_upload": held_s / result["upload_s"],
            "step_s_before": statistics.median(times_before),
            "step_s_during_upload": statistics.median(times_during) if times_during else None,
            "steps_during_upload": len(times_during), "load": os.getloadavg()[0]}


def ray_step_loop(step_model: str, ckpt_model: str, uri: str, mode: str, before: int = 5, after: int = 5000, *,
                  endpoint: str) -> dict:
    """`step_loop` inside a one-worker Ray Train run, the checkpoint going through the training
    loop's `_send` (store probe, report, upload watchdog) with train.async_upload on or off."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mdt_ray.config import load_config
    from mdt_ray.train.trainer import run_dir_of, storage_target

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "jobs/configs/demo.yaml", [
        f"model.teacher={step_model}", f"run.storage_path={uri}", f"data.storage_endpoint={endpoint}",
        f"run.name=wait-{mode}", "tracking.enabled=false",
        f"train.steps={10**6}", f"train.async_upload={'true' if mode == 'ray-async' else 'false'}"])
    storage_path, storage_fs = storage_target(cfg)
    trainer = TorchTrainer(
        _ray_wait_worker, train_loop_config={"config": cfg.model_dump(mode="json"), "run_dir": run_dir_of(cfg),
                                             "step_model": step_model, "ckpt_model": ckpt_model,
                                             "before": before, "after": after, "report_every": 10},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                       failure_config=ray.train.FailureConfig(max_failures=0)))
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"the Ray Train run of --wait {mode} failed: {result.error}")
    r = dict(result.metrics)
    r.update(mode=mode, held_over_upload=r["held_s"] / r["upload_s"], load=os.getloadavg()[0])
    return r


def _ray_wait_worker(config: dict) -> None:
    """The Ray Train worker of `ray_step_loop`."""
    import ray.train

    from mdt_ray.config import Config, DistillConfig, TrainConfig
    from mdt_ray.engine import Engine
    from mdt_ray.models.teachers import build_teacher, freeze, student_from
    from mdt_ray.stages import get_stage
    from mdt_ray.train.loop import Worker, _quiet_report_log, _send
    from mdt_ray.train.state import DeferredCheckpoint, new_scratch_dir

    from benchmarks._common import random_batch

    _quiet_report_log()
    torch.set_num_threads(1)
    cfg = Config.model_validate(config["config"])
    w = Worker(cfg, get_stage("ss"), 0, 1, torch.device("cpu"), config["run_dir"], None, None, None, None)
    teacher = build_teacher(config["step_model"])
    engine = Engine(student_from(teacher), freeze(teacher, torch.device("cpu"), False), stage=get_stage("ss"),
                    distill=DistillConfig(method="mdt"), train=TrainConfig(batch_size=2, lr=1e-5))
    batch = random_batch(config["step_model"], 2, torch.Generator().manual_seed(0))
    state, _ = fake_state(config["ckpt_model"])
    done = 0

    def step() -> float:
        """One optimizer step, and every `report_every` steps a metrics-only report; its seconds."""
        nonlocal done
        t0 = time.perf_counter()
        engine.step(batch, done)
        done += 1
        if done % config["report_every"] == 0:
            _send(w, {"step": done}, None, done, {})
        return time.perf_counter() - t0

    times_before = [step() for _ in range(config["before"])]
    # What _report and _save do at a checkpoint step but the last.
    t0 = time.perf_counter()
    ckpt_dir = new_scratch_dir()
    deferred = DeferredCheckpoint(ckpt_dir, **state) if cfg.train.async_upload else save_checkpoint(ckpt_dir, **state)
    copy_s = time.perf_counter() - t0
    done += 1
    _send(w, {"step": done}, ckpt_dir, done, {}, deferred)
    held_s = time.perf_counter() - t0
    times_during = []
    while not w.upload.finished.is_set() and len(times_during) < config["after"]:
        times_during.append(step())
    if not w.upload.finished.wait(3 * cfg.train.upload_timeout_s):
        raise RuntimeError("the checkpoint upload did not finish")
    write_s = deferred.seconds if deferred is not None else copy_s
    # Ray's Result carries the metrics of the latest checkpoint: the figures go with a small one.
    with scratch_dir("ckpt-wait-result-") as d:
        (d / "result.txt").write_text("the metrics of this report are the benchmark's figures\n")
        ray.train.report({"write_s": write_s, "held_s": held_s, "upload_s": w.upload.seconds,
                          "copy_s": copy_s if deferred is not None else None,
                          "tensor_bytes": sum(t.numel() * t.element_size() for part in
                                              (state["student"], state["ema"], state["optimizer"][0])
                                              for t in part.values()),
                          "scratch_left": ckpt_dir.exists(), "step_s_before": statistics.median(times_before),
                          "step_s_during_upload": statistics.median(times_during) if times_during else None,
                          "steps_during_upload": len(times_during)},
                         checkpoint=ray.train.Checkpoint.from_directory(str(d)), checkpoint_dir_name="result")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gb = [r["bytes"] / 1e9 for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(gb, [r["write_s"] for r in rows], "o-", label="write + sha256 (local disk)")
    ax.plot(gb, [r["upload_s"] for r in rows], "s-", label="upload (loopback S3)")
    for r, x in zip(rows, gb):
        ax.annotate(r["model"], (x, r["upload_s"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("checkpoint size (GB)"), ax.set_ylabel("seconds")
    ax.set_title("Checkpoint time vs size (2-core CPU)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _measure(server, args, res: dict) -> None:
    """The sizes and the loop's wait, on `server`."""
    bucket = server.create_bucket("ckpt-bench")
    for i, m in enumerate(args.models):
        r = measure_size(m, f"s3://{bucket}/size/{i}_{m}")
        res["sizes"].append(r)
        print(f"[ckpt] {m}: {r['parameters'] / 1e6:.1f} M params, {r['bytes'] / 1e9:.3f} GB, write {r['write_s']:.2f} s "
              f"({r['write_gb_s']:.2f} GB/s), upload {r['upload_s']:.2f} s ({r['upload_gb_s']:.2f} GB/s) "
              f"(load {r['load']:.1f})", flush=True)
    big = res["sizes"][-1]
    gb = args.extrapolate_gb * 1e9
    res["extrapolated"] = {"bytes": gb, "write_s": gb / (big["write_gb_s"] * 1e9),
                           "upload_s": gb / (big["upload_gb_s"] * 1e9), "from": big["model"]}
    e = res["extrapolated"]
    print(f"[ckpt] {args.extrapolate_gb:g} GB at {big['model']}'s rates: write {e['write_s']:.0f} s, "
          f"upload {e['upload_s']:.0f} s", flush=True)
    for mode in args.wait:
        if mode.startswith("ray-"):
            r = ray_step_loop(args.step_model, args.wait_model, f"s3://{bucket}/wait/{mode}", mode,
                              endpoint=server.endpoint)
        else:
            r = step_loop(args.step_model, args.wait_model, f"s3://{bucket}/wait/{mode}", mode)
        res["wait"].append(r)
        during = f"{r['step_s_during_upload']:.3f}" if r["step_s_during_upload"] else "n/a"
        print(f"[ckpt] {mode:5s}: loop held {r['held_s']:.2f} s of a {r['upload_s']:.2f} s upload "
              f"({100 * r['held_over_upload']:.1f} %; write {r['write_s']:.2f} s"
              + (f" in the background, copy to host memory {r['copy_s']:.2f} s" if r.get("copy_s") is not None else "")
              + f"); step {r['step_s_before']:.3f} s "
              f"before, {during} s during ({r['steps_during_upload']} steps) (load {r['load']:.1f})", flush=True)


@contextlib.contextmanager
def _ray_if_needed(modes: list[str], env: dict[str, str]):
    """A local Ray for the ray-* modes, whose workers reach the benchmark's S3 server; one that
    runs already (the test suite's) is used as it is, reaching the server through the storage
    endpoint in the run's config."""
    import ray

    if not any(m.startswith("ray-") for m in modes) or ray.is_initialized():
        yield
        return
    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=True, logging_level="WARNING",
             runtime_env={"env_vars": {**env, "PYTHONPATH": os.pathsep.join(
                 p for p in (root, os.environ.get("PYTHONPATH")) if p)}})
    try:
        yield
    finally:
        ray.shutdown()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["ss-tiny", "ss-demo", "ss-B"])
    p.add_argument("--wait-model", default="ss-B")
    p.add_argument("--step-model", default="ss-tiny")
    p.add_argument("--wait", nargs="+", default=["ray-async", "ray-sync"],
                   choices=["ray-async", "ray-sync", "sync", "async"])
    p.add_argument("--paired-write", type=int, default=0, metavar="ROUNDS",
                   help="only time save_checkpoint against the old write-then-reread hash on --wait-model")
    p.add_argument("--extrapolate-gb", type=float, default=9.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", help="write the time-vs-size plot here (PNG)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.paired_write:
        r = paired_write(args.wait_model, args.paired_write)
        print(f"[ckpt] {r['model']} write + sha256: re-read {', '.join(f'{t:.2f}' for t in r['reread'])} s; "
              f"while writing {', '.join(f'{t:.2f}' for t in r['while_writing'])} s; ratio of medians "
              f"{r['ratio_median']:.2f} (load {r['load']:.1f})", flush=True)
        write_json(args.json, r)
        return r
    from tests.s3_server import LocalS3, apply_env, restore_env

    res: dict = {"loadavg_start": os.getloadavg(), "sizes": [], "wait": []}
    with LocalS3() as server:
        # The server's AWS_* for this run only (in the test suite, the session's S3 server must
        # be what later tests reach).
        saved = apply_env(server.env())
        try:
            with _ray_if_needed(args.wait, server.env()):
                _measure(server, args, res)
        finally:
            restore_env(saved)
    if args.plot:
        plot(res["sizes"], args.plot)
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
