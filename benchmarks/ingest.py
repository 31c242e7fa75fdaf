"""Corpus ingest: Ray Data from S3 versus a bare pyarrow read versus what a training worker eats.

One run, one synthetic corpus, one S3-protocol server on loopback (moto, from tests/s3_server.py).
It prints, side by side:

- rows/s and MB/s through the Ray Data pipeline (make_dataset -> torch_batches, float32 tensors),
  with the decode in Ray tasks (the default) and in the consumer (decode="collate"),
- rows/s and MB/s of a bare pyarrow read of the same columns (read only, and read + the same
  decode to float32 numpy), shard by shard in one process,
- rows/s one training worker consumes: the demo job's optimizer steps (MDT-dist VM + VD, forward +
  backward, clipping, AdamW, EMA) of the demo model (`ss-demo`) on batches of the corpus's shape,

with the ratios against the targets (Ray Data >= 0.7x bare pyarrow, >= 5x the worker), and the
peak memory of the reading process (and of the Ray processes under it) for the corpus and for a
corpus `--scale` times larger (made by server-side copies of the shards): flat means streamed.

Each read runs in a fresh child process, so its peak RSS is its own.

    python benchmarks/ingest.py [--num-assets 8000] [--shards 8] [--scale 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import PeriodicSampler, descendants, random_batch, timed, write_json  # noqa: E402

DECODED_BYTES_PER_ROW = 4 * (8 * 16**3 + 64 * 64)  # float32 x0 + cond, what the trainer receives
DECODES = ("tasks", "collate")  # make_dataset(decode=...): in Ray tasks, or in the consumer


# -- memory of a process tree, from /proc --------------------------------------------------------
def _rollup(pid: int) -> dict[str, int]:
    """Pss and Private (clean + dirty) of a process in KiB, from /proc/<pid>/smaps_rollup.

    PSS splits shared pages (Ray's object store in /dev/shm) among the processes that map them,
    so summing PSS over a process tree counts each page once; Private is memory only this
    process holds (its heap), the number that grows if a reader materialises the corpus.
    """
    out = {"pss": 0, "private": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "Pss":
                    out["pss"] = int(rest.split()[0])
                elif key in ("Private_Clean", "Private_Dirty"):
                    out["private"] += int(rest.split()[0])
    except OSError:
        pass
    return out


def _plasma_mib() -> float:
    """Ray's object store in use (MiB), as the raylet reports it; 0 without a Ray session."""
    import re

    try:
        import ray
        from ray._private.internal_api import memory_summary

        if not ray.is_initialized():
            return 0.0
        address = ray.get_runtime_context().gcs_address  # other Ray sessions may share the machine
        match = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(address=address, stats_only=True))
        return float(match.group(1)) if match else 0.0
    except Exception:  # a summary that fails mid-shutdown is not a measurement
        return 0.0


class TreeSampler(PeriodicSampler):
    """Peak memory of this process, of its descendants (Ray's processes) and of Ray's object
    store, sampled every `period` s.

    Private memory (a process's own pages: heap, buffers) is summed over processes; the object
    store is shared memory that every worker maps, so it is counted once, from the raylet's own
    figure, rather than through each process's share of touched pages.
    """

    def __init__(self, period: float = 0.25, plasma: bool = False):
        super().__init__(period)
        self.plasma = plasma
        self.peak_self_private_kib = 0
        self.peak_children_private_kib = 0
        self.peak_plasma_mib = 0.0

    def sample(self) -> None:
        me = os.getpid()
        own = _rollup(me)["private"]
        children = sum(_rollup(p)["private"] for p in descendants(me))
        self.peak_self_private_kib = max(self.peak_self_private_kib, own)
        self.peak_children_private_kib = max(self.peak_children_private_kib, children)
        if self.plasma:
            self.peak_plasma_mib = max(self.peak_plasma_mib, _plasma_mib())

    def result(self) -> dict[str, float]:
        return {"private_mib": self.peak_self_private_kib / 1024,
                "ray_private_mib": self.peak_children_private_kib / 1024,
                "object_store_mib": self.peak_plasma_mib}


# -- the children: one measured read each --------------------------------------------------------
def child_pyarrow(uri: str, batch: int, passes: int = 1) -> dict:
    """The hand-written loader: each shard's columns with pyarrow, the same decode, one process.

    With several passes, the figures of the fastest are kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mdt_ray.data.pipeline import decode_table
    from mdt_ray.data.schema import read_manifest
    from mdt_ray.data.storage import StorageTarget

    m = read_manifest(uri)
    best = None
    with TreeSampler() as sampler:
        for _ in range(passes):
            rows, t_read, t_decode = 0, 0.0, 0.0
            t0 = time.perf_counter()
            for s_uri in m.shard_uris():
                fs, path = StorageTarget(s_uri).pyarrow_fs()
                with fs.open_input_file(path) as f:
                    pf = pq.ParquetFile(f, pre_buffer=True)
                    it = pf.iter_batches(columns=["asset_id", "ss_latent", "cond"], batch_size=batch)
                    while True:
                        a = time.perf_counter()
                        rb = next(it, None)
                        b = time.perf_counter()
                        t_read += b - a
                        if rb is None:
                            break
                        decode_table(pa.Table.from_batches([rb]), m, "ss", shard=s_uri)
                        t_decode += time.perf_counter() - b
                        rows += rb.num_rows
            run = {"rows": rows, "read_s": t_read, "decode_s": t_decode, "total_s": time.perf_counter() - t0}
            if best is None or run["total_s"] < best["total_s"]:
                best = run
    return {**best, "passes": passes, **sampler.result()}


def child_ray(uri: str, batch: int, cpus: int | None, decode: str = "tasks", passes: int = 2) -> dict:
    """Ray Data passes over the corpus in one Ray session, as the epochs of a training run.

    The first pass also pays for starting Ray's worker processes (once per session); the last
    pass is the steady per-epoch cost. Both are kept."""
    import logging

    import ray

    from mdt_ray.data.pipeline import make_dataset, torch_batches
    from mdt_ray.data.schema import read_manifest

    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    runs = []
    with TreeSampler(plasma=True) as sampler:
        for epoch in range(passes):
            t0 = time.perf_counter()
            manifest = read_manifest(uri)
            ds = make_dataset(uri, manifest=manifest, shuffle=True, seed=epoch, decode=decode)
            stamps = []  # (time, rows so far) after each batch
            rows = 0
            for b in torch_batches(ds, batch, drop_last=False, manifest=manifest if decode == "collate" else None):
                rows += b["x0"].shape[0]
                stamps.append((time.perf_counter(), rows))
            t_end = time.perf_counter()
            # Sustained rate: over the second half of the rows, when start-up and the first
            # prefetched blocks are behind us.
            half = next(i for i, (_, n) in enumerate(stamps) if n >= rows / 2)
            t_half, n_half = stamps[half]
            runs.append({"rows": rows, "total_s": t_end - t0, "startup_s": stamps[0][0] - t0,
                         "steady_rows": rows - n_half, "steady_s": t_end - t_half})
    ray.shutdown()
    return {**runs[-1], "cold": runs[0], "passes": passes, **sampler.result()}


def child_worker(model: str, batch: int, steps: int, threads: int) -> dict:
    """One training worker's consumption: the demo job's optimizer step (mdt_ray.engine, with
    the demo config's objective, MDT-dist) on a random batch of the corpus's shapes."""
    import torch

    torch.set_num_threads(threads)

    from mdt_ray.config import load_config
    from mdt_ray.engine import Engine
    from mdt_ray.models.teachers import build_teacher, freeze, student_from
    from mdt_ray.stages import get_stage

    cfg = load_config(REPO / "jobs/configs/demo.yaml", [f"model.teacher={model}", f"train.batch_size={batch}"])
    teacher = build_teacher(model, seed=cfg.train.seed)
    engine = Engine(student_from(teacher), freeze(teacher, torch.device("cpu"), False), stage=get_stage("ss"),
                    distill=cfg.distill, train=cfg.train)
    data = random_batch(model, batch, torch.Generator().manual_seed(0))
    calls = iter(range(steps + 1))
    dt = timed(lambda: engine.step(data, next(calls)), steps)
    return {"model": model, "batch": batch, "step_s": dt, "rows_per_s": batch / dt,
            "threads": torch.get_num_threads()}


def keep_best(results: dict, key: str, run: dict) -> None:
    """Keep the faster of two runs of one reader, and the larger of their memory peaks."""
    old = results.get(key)
    if old is None:
        results[key] = run
        return
    mem = {k: max(old[k], run[k]) for k in ("private_mib", "ray_private_mib", "object_store_mib") if k in run}
    results[key] = {**(run if run["total_s"] < old["total_s"] else old), **mem}


def run_child(args: list[str], timeout: float = 1800) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the parent ----------------------------------------------------------------------------------
def scale_corpus(src: str, dst: str, times: int) -> None:
    """`dst` = `times` server-side copies of every shard of `src`, with a manifest listing them."""
    import copy

    from mdt_ray.data import storage
    from mdt_ray.data.corpus import finish_corpus
    from mdt_ray.data.schema import SHARD_PATTERN, read_manifest

    m = read_manifest(src)
    fs, src_path = storage.StorageTarget(src).pyarrow_fs()
    dst_path = storage.bare_path(dst)
    fs.create_dir(dst_path, recursive=True)  # a no-op on S3, needed on a local disk
    shards = []
    for k in range(times):
        for s in m.shards:
            info = copy.deepcopy(s)
            info.path = SHARD_PATTERN.format(index=len(shards))
            fs.copy_file(f"{src_path}/{s.path}", f"{dst_path}/{info.path}")
            shards.append(info)
    out = copy.deepcopy(m)
    finish_corpus(dst, out, shards)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Big enough that Ray Data's streaming window (the blocks in flight) fills on the 1x
    # corpus too, so the two peak-memory figures compare steady states.
    p.add_argument("--num-assets", type=int, default=8000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--scale", type=int, default=10, help="the larger corpus is this many times the first")
    p.add_argument("--batch", type=int, default=32, help="rows per batch the Ray reader hands out")
    p.add_argument("--pyarrow-batch", type=int, default=1024, help="rows per batch of the bare pyarrow read")
    p.add_argument("--model", default="ss-demo", help="model whose training step sets the worker's consumption")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=5)
    # The demo runs two workers on two cores: one core each. Two torch threads on a shared,
    # busy machine are slower per step than one (oversubscription).
    p.add_argument("--train-threads", type=int, default=1)
    p.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs for the Ray reader (default: all)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of every reader; each keeps its best")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        kind, *rest = args.child
        if kind == "pyarrow":
            res = child_pyarrow(rest[0], int(rest[1]))
        elif kind == "ray":
            res = child_ray(rest[0], int(rest[1]), int(rest[2]) if rest[2] != "none" else None, rest[3])
        else:
            res = child_worker(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        print(json.dumps(res))
        return res

    from mdt_ray.data.corpus import build_synthetic, inspect_corpus
    # The tests' loopback S3 server, so there is one copy of it; the repo root is on sys.path
    # (top of this file) and tests/ is not part of the installed package.
    from tests.s3_server import LocalS3, apply_env

    # Load from other jobs on a shared machine skews every rate: record it beside them.
    results: dict = {"num_assets": args.num_assets, "shards": args.shards, "scale": args.scale,
                     "batch": args.batch, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    log = lambda msg: print(f"[ingest] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    with LocalS3() as server:
        apply_env(server.env())  # the children inherit it
        bucket = server.create_bucket("ingest-bench")
        base, big = f"s3://{bucket}/base", f"s3://{bucket}/x{args.scale}"
        t0 = time.perf_counter()
        build_synthetic(base, args.num_assets, seed=0, num_shards=args.shards, use_ray=False, progress=False)
        results["build_s"] = time.perf_counter() - t0
        log(f"built {args.num_assets} assets in {results['build_s']:.1f} s")
        scale_corpus(base, big, args.scale)
        info = inspect_corpus(base)
        stored_per_row = sum(info["columns"][c]["compressed_per_asset"] for c in ("asset_id", "ss_latent", "cond"))
        results["stored_bytes_per_row"] = stored_per_row
        results["decoded_bytes_per_row"] = DECODED_BYTES_PER_ROW
        cpus = str(args.ray_cpus) if args.ray_cpus else "none"
        # Other jobs on a shared machine come and go: the readers take turns, `--repeats` rounds,
        # and each keeps its best round (peak memory: its worst), so a burst of load elsewhere
        # does not land on one reader only.
        for label, uri in (("1x", base), (f"{args.scale}x", big)):
            for rep in range(args.repeats):
                log(f"bare pyarrow read, {label}, round {rep + 1}")
                keep_best(results, f"pyarrow_{label}", run_child(["pyarrow", uri, str(args.pyarrow_batch)]))
                for decode in DECODES:
                    log(f"Ray Data read (decode={decode}), {label}, round {rep + 1}")
                    keep_best(results, f"ray_{decode}_{label}",
                              run_child(["ray", uri, str(args.batch), cpus, decode]))
        log(f"training worker ({args.model}, batch {args.train_batch})")
        results["worker"] = run_child(["worker", args.model, str(args.train_batch), str(args.train_steps),
                                       str(args.train_threads)])

    results["loadavg_end"] = os.getloadavg()
    report(results)
    write_json(args.json, results, indent=2)
    return results


def rates(pa_res: dict, ray_res: dict) -> dict[str, float]:
    return {
        "pyarrow_read": pa_res["rows"] / pa_res["read_s"],
        "pyarrow_read_decode": pa_res["rows"] / (pa_res["read_s"] + pa_res["decode_s"]),
        "ray_end_to_end": ray_res["rows"] / ray_res["total_s"],
        "ray_steady": ray_res["steady_rows"] / ray_res["steady_s"],
        "ray_first_pass": ray_res["cold"]["rows"] / ray_res["cold"]["total_s"],
    }


def report(r: dict) -> None:
    big = f"{r['scale']}x"
    w = r["worker"]
    stored, decoded = r["stored_bytes_per_row"], r["decoded_bytes_per_row"]
    # The ratios use the larger corpus, where Ray's fixed costs weigh least; 1x is beside it.
    r["rates"], r["ratios"] = {"worker": w["rows_per_s"]}, {}
    for d in DECODES:
        for size in ("1x", big):
            r["rates"][f"{d}_{size}"] = rates(r[f"pyarrow_{size}"], r[f"ray_{d}_{size}"])
        q, rb, rs = r["rates"][f"{d}_{big}"], r[f"ray_{d}_{big}"], r[f"ray_{d}_1x"]
        r["ratios"][d] = {
            "end_to_end_vs_pyarrow_read_decode": q["ray_end_to_end"] / q["pyarrow_read_decode"],
            "second_half_vs_pyarrow_read_decode": q["ray_steady"] / q["pyarrow_read_decode"],
            "end_to_end_vs_pyarrow_read_only": q["ray_end_to_end"] / q["pyarrow_read"],
            "end_to_end_vs_worker": q["ray_end_to_end"] / w["rows_per_s"],
            "memory_driver_growth": rb["private_mib"] / rs["private_mib"],
            "memory_ray_processes_growth": rb["ray_private_mib"] / rs["ray_private_mib"],
            "memory_object_store_growth": rb["object_store_mib"] / max(1.0, rs["object_store_mib"]),
        }
    pa_small, pa_big = r["rates"][f"tasks_1x"], r["rates"][f"tasks_{big}"]
    n_small, n_big = r["pyarrow_1x"]["rows"], r[f"pyarrow_{big}"]["rows"]

    def cell(x: float) -> str:
        return f"{x:>7,.0f} [{x * stored / 2**20:5.1f} | {x * decoded / 2**20:6.1f}]"

    def row(name: str, a: float, b: float, note: str = "") -> None:
        print(f"  {name:<52} {cell(a)}   {cell(b)}  {note}")

    print(f"\ncorpus: {r['num_assets']} synthetic assets in {r['shards']} shards on loopback S3 (moto), "
          f"{stored / 1024:.1f} KiB stored and {decoded / 1024:.0f} KiB decoded per row (x0 + cond); "
          f"{r['cpus']} CPUs; built in {r['build_s']:.1f} s; load average {r['loadavg_start'][0]:.1f} at start, "
          f"{r['loadavg_end'][0]:.1f} at end")
    print(f"  {'rows/s [MB/s stored | MB/s decoded]':<52} {'1x (' + format(n_small, ',') + ' rows)':>28}"
          f"   {big + ' (' + format(n_big, ',') + ' rows)':>28}")
    row("bare pyarrow, read only", pa_small["pyarrow_read"], pa_big["pyarrow_read"])
    row("bare pyarrow, read + decode to float32", pa_small["pyarrow_read_decode"], pa_big["pyarrow_read_decode"])
    for d in DECODES:
        s1, sb = r["rates"][f"{d}_1x"], r["rates"][f"{d}_{big}"]
        row(f"Ray Data, decode={d}: epoch, end to end", s1["ray_end_to_end"], sb["ray_end_to_end"])
        row(f"Ray Data, decode={d}: epoch, 2nd half", s1["ray_steady"], sb["ray_steady"])
        row(f"Ray Data, decode={d}: first epoch of the session", s1["ray_first_pass"], sb["ray_first_pass"],
            f"(first batch after {r[f'ray_{d}_1x']['cold']['startup_s']:.0f} s / "
            f"{r[f'ray_{d}_{big}']['cold']['startup_s']:.0f} s; later epochs {r[f'ray_{d}_{big}']['startup_s']:.0f} s)")
    print(f"  {'one worker training ' + w['model'] + ', batch ' + str(w['batch']):<52} {cell(w['rows_per_s'])}"
          f"   ({w['step_s']:.2f} s/step, {w['threads']} threads)")
    for d in DECODES:
        q = r["ratios"][d]
        print(f"ratios, decode={d}, {big} corpus (epoch after the first)")
        print(f"  Ray Data / bare pyarrow read+decode      {q['end_to_end_vs_pyarrow_read_decode']:6.2f}x end to end, "
              f"{q['second_half_vs_pyarrow_read_decode']:.2f}x 2nd half   target >= 0.7")
        print(f"  Ray Data / bare pyarrow read only        {q['end_to_end_vs_pyarrow_read_only']:6.2f}x end to end")
        print(f"  Ray Data / one training worker           {q['end_to_end_vs_worker']:6.0f}x            target >= 5")
    print(f"peak memory, 1x -> {big} corpus (target: flat)")
    for d in DECODES:
        rs, rb, q = r[f"ray_{d}_1x"], r[f"ray_{d}_{big}"], r["ratios"][d]
        print(f"  Ray Data, decode={d:<8} driver private {rs['private_mib']:5.0f} -> {rb['private_mib']:5.0f} MiB "
              f"({q['memory_driver_growth']:.2f}x); Ray processes private {rs['ray_private_mib']:5.0f} -> "
              f"{rb['ray_private_mib']:5.0f} MiB ({q['memory_ray_processes_growth']:.2f}x); object store "
              f"{rs['object_store_mib']:5.0f} -> {rb['object_store_mib']:5.0f} MiB ({q['memory_object_store_growth']:.2f}x)")
    ps, pb = r["pyarrow_1x"], r[f"pyarrow_{big}"]
    print(f"  bare pyarrow              private        {ps['private_mib']:5.0f} -> {pb['private_mib']:5.0f} MiB "
          f"({pb['private_mib'] / ps['private_mib']:.2f}x)")


if __name__ == "__main__":
    main()
