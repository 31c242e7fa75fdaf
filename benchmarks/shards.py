"""Corpora of thousands of tiny shards on the loopback S3 server: start-up and memory vs shard count.

The real corpus is ~5,800 shards (docs/scaling.md); what grows with the count is per-shard
work before the first batch (reading the manifest, checking every footer, Ray Data's read
planning) and anything that keeps a per-shard entry in memory. This builds a base corpus of
`--base` one-row shards (synthetic, `build_synthetic`) and, by server-side copies, corpora of
each `--counts` shards, then reads each in a fresh child process with a fresh local Ray:

- time to first batch: from reading the manifest to the first `torch_batches` batch
  (manifest read + `verify_shards` footer checks + `make_dataset`'s read planning + the
  first block), with the footer check and `make_dataset` timed apart;
- driver memory: peak private memory of the reading process;
- per-worker memory: peak private memory of the largest Ray worker process during the epoch
  (`--epoch-rows` rows, default all);
- the manifest's size in bytes.

Targets (issue 16): first batch sub-linear in the shard count and < 60 s at 6,000 shards on
this machine; driver and worker memory flat in the count.

    python benchmarks/shards.py [--counts 100 1000 6000] [--base 100] [--epoch-rows N]
        [--cpus 2] [--label TEXT] [--json out.json] [--plot out.png] [--compare earlier.json]
        [--replot out.json --plot out.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import PeriodicSampler, descendants, save_figure, write_json  # noqa: E402
from benchmarks.ingest import _rollup, scale_corpus  # noqa: E402


class MemorySampler(PeriodicSampler):
    """Peak private memory (KiB) of this process and of its largest descendant."""

    def __init__(self, period: float = 0.2):
        super().__init__(period)
        self.driver_kib = 0
        self.worker_kib = 0

    def sample(self) -> None:
        me = os.getpid()
        self.driver_kib = max(self.driver_kib, _rollup(me)["private"])
        kids = [_rollup(p)["private"] for p in descendants(me)]
        if kids:
            self.worker_kib = max(self.worker_kib, max(kids))


def child(uri: str, batch: int, cpus: int, epoch_rows: int) -> dict:
    import logging

    import ray

    from mdt_ray.data.pipeline import make_dataset, torch_batches, verify_shards
    from mdt_ray.data.schema import STAGE_COLUMNS
    from mdt_ray.data.schema import read_manifest

    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        manifest = read_manifest(uri)
        t_manifest = time.perf_counter()
        verify_shards(manifest, STAGE_COLUMNS["ss"])
        t_verify = time.perf_counter()
        ds = make_dataset(uri, manifest=manifest, shuffle=True, seed=0, verify=False)
        t_plan = time.perf_counter()
        rows, first = 0, None
        for b in torch_batches(ds, batch, drop_last=False):
            if first is None:
                first = time.perf_counter()
            rows += b["x0"].shape[0]
            if epoch_rows and rows >= epoch_rows:
                break
        t_end = time.perf_counter()
    ray.shutdown()
    return {"shards": len(manifest.shards), "rows": rows, "manifest_s": t_manifest - t0,
            "verify_s": t_verify - t_manifest, "make_dataset_s": t_plan - t_verify, "first_batch_s": first - t0, "epoch_s": t_end - t0,
            "driver_private_mib": mem.driver_kib / 1024, "worker_private_mib": mem.worker_kib / 1024}


def run(counts: list[int], base: int, batch: int, cpus: int, epoch_rows: int, log=print) -> dict:
    from tests.s3_server import LocalS3, apply_env, restore_env

    res: dict = {"counts": counts, "base": base, "batch": batch, "cpus": cpus, "loadavg_start": os.getloadavg(),
                 "runs": []}
    with LocalS3() as server:
        # The server's AWS_* for this run only: in the test suite, the session's own S3 server
        # must be what later tests reach.
        saved = apply_env(server.env())
        try:
            _run_counts(server, counts, base, batch, cpus, epoch_rows, log, res)
        finally:
            restore_env(saved)
    return res


def _run_counts(server, counts: list[int], base: int, batch: int, cpus: int, epoch_rows: int, log, res: dict) -> None:
    from mdt_ray.data import storage
    from mdt_ray.data.corpus import build_synthetic
    from mdt_ray.data.schema import MANIFEST_FILE

    # moto keeps its buckets per process, not per server: a second run in one process (the
    # tests) must not find the first one's corpora.
    bucket = server.create_bucket(f"shards-bench-{uuid.uuid4().hex[:8]}")
    base_uri = f"s3://{bucket}/base"
    t0 = time.perf_counter()
    build_synthetic(base_uri, base, seed=0, num_shards=base, use_ray=False, progress=False)
    log(f"[shards] built {base} one-row shards in {time.perf_counter() - t0:.1f} s")
    for n in counts:
        if n % base:
            raise SystemExit(f"--counts {n} is not a multiple of --base {base}")
        uri = base_uri if n == base else f"s3://{bucket}/x{n}"
        if n != base:
            t0 = time.perf_counter()
            scale_corpus(base_uri, uri, n // base)
            log(f"[shards] copied to {n} shards in {time.perf_counter() - t0:.1f} s")
        fs, path = storage.StorageTarget(uri).pyarrow_fs()
        manifest_bytes = fs.get_file_info(f"{path}/{MANIFEST_FILE}").size
        out = subprocess.run([sys.executable, __file__, "--child", uri, str(batch), str(cpus), str(epoch_rows)],
                             capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"reading {n} shards failed:\n{out.stderr[-4000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["manifest_bytes"] = manifest_bytes
        r["loadavg"] = os.getloadavg()[0]
        res["runs"].append(r)
        log(f"[shards] {n:5d} shards: first batch {r['first_batch_s']:.1f} s (manifest {r['manifest_s']:.2f} s, "
            f"footers {r['verify_s']:.1f} s, make_dataset {r['make_dataset_s']:.1f} s), epoch of {r['rows']} rows {r['epoch_s']:.1f} s, driver "
            f"{r['driver_private_mib']:.0f} MiB, largest worker {r['worker_private_mib']:.0f} MiB, manifest "
            f"{manifest_bytes / 1024:.0f} KiB (load {r['loadavg']:.1f})")


def plot(res: dict, path: str, before: Optional[dict] = None) -> None:
    """Time to first batch and memory vs shard count; `before`, an earlier run's --json, is drawn
    in grey beside it (with its label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    series = [(res, f" ({res.get('label') or 'this run'})" if before is not None else "", {})]
    if before is not None:
        series.insert(0, (before, f" ({before.get('label', 'before')})", {"color": "grey", "alpha": 0.7}))
    for run, tag, style in series:
        runs = run["runs"]
        n = [r["shards"] for r in runs]
        axes[0].plot(n, [r["first_batch_s"] for r in runs], "o-", label="first batch" + tag, **style)
        axes[0].plot(n, [r["verify_s"] for r in runs], "s--", label="of which: footer checks" + tag, **style)
        axes[1].plot(n, [r["driver_private_mib"] for r in runs], "o-", label="driver" + tag, **style)
        axes[1].plot(n, [r["worker_private_mib"] for r in runs], "s--", label="largest Ray worker" + tag, **style)
    axes[0].axhline(60, color="grey", lw=0.8, ls=":", label="target 60 s")
    axes[0].set_xscale("log"), axes[0].set_xlabel("shards"), axes[0].set_ylabel("seconds")
    axes[0].set_title("time to first batch"), axes[0].legend(fontsize=7)
    axes[1].set_xscale("log"), axes[1].set_xlabel("shards"), axes[1].set_ylabel("peak private MiB")
    axes[1].set_title("memory during the epoch"), axes[1].legend(fontsize=7)
    fig.suptitle("Ingest vs shard count (loopback S3, 2-core CPU)", fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 6000])
    p.add_argument("--base", type=int, default=100, help="one-row shards built; the rest are copies")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray")
    p.add_argument("--epoch-rows", type=int, default=0, help="stop the epoch after this many rows (0: all)")
    p.add_argument("--label", default="", help="what this run measures (kept in --json; names it in a --compare plot)")
    p.add_argument("--json")
    p.add_argument("--plot", help="write the plot here (PNG)")
    p.add_argument("--replot", help="only redraw --plot from this earlier --json")
    p.add_argument("--compare", help="an earlier run's --json, drawn in grey in --plot (its 'label' key names it)")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        uri, batch, cpus, rows = args.child
        r = child(uri, int(batch), int(cpus), int(rows))
        print(json.dumps(r))
        return r
    if args.replot:
        res = json.loads(Path(args.replot).read_text())
    else:
        res = run(args.counts, args.base, args.batch, args.cpus, args.epoch_rows)
        res["label"] = args.label
        write_json(args.json, res)
    if args.plot:
        plot(res, args.plot, json.loads(Path(args.compare).read_text()) if args.compare else None)
    return res


if __name__ == "__main__":
    main()
