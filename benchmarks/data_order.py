"""What order-preserving reads (data.deterministic, Ray Data's `preserve_order`) cost: rows/s of
one corpus streamed through the pipeline the trainer uses (make_dataset -> streaming_split ->
torch batches), with and without the option, alternating in one Ray session.

    python benchmarks/data_order.py [--num-assets 2000] [--shards 16] [--splits 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import write_json  # noqa: E402


def _drain(shards, batch: int) -> int:
    """Every split consumed at once, one thread each (as the workers of a run do); rows read."""
    from mdt_ray.data.pipeline import torch_batches

    counts = [0] * len(shards)

    def consume(i: int) -> None:
        for b in torch_batches(shards[i], batch, drop_last=False):
            counts[i] += len(b["x0"])

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def measure(corpus: str, splits: int, batch: int, preserve: bool) -> float:
    import ray.data

    from mdt_ray.data.pipeline import make_dataset

    ds = make_dataset(corpus, shuffle=True, seed=0)
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = preserve
    ds.context.execution_options = options
    shards = ds.streaming_split(splits, equal=True)
    t0 = time.perf_counter()
    rows = _drain(shards, batch)
    return rows / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-assets", type=int, default=2000)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--splits", type=int, default=2, help="consumers, as the workers of a run")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray session")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import ray
    import ray.data

    from mdt_ray.data.corpus import build_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        corpus = f"{tmp}/corpus"
        build_synthetic(corpus, args.num_assets, seed=0, num_shards=args.shards, progress=False)
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        runs = {False: [], True: []}
        measure(corpus, args.splits, args.batch, False)  # warm-up: workers started, files cached
        for _ in range(args.repeats):
            for preserve in (False, True):
                runs[preserve].append(measure(corpus, args.splits, args.batch, preserve))
        ray.shutdown()
    free, ordered = statistics.median(runs[False]), statistics.median(runs[True])
    print(f"{args.num_assets} assets in {args.shards} shards, {args.splits} consumers, median of {args.repeats}:\n"
          f"  any order      {free:8.1f} rows/s   ({', '.join(f'{r:.0f}' for r in runs[False])})\n"
          f"  preserve_order {ordered:8.1f} rows/s   ({', '.join(f'{r:.0f}' for r in runs[True])})\n"
          f"  ordered / any  {ordered / free:8.2f}x", flush=True)
    write_json(args.json, {"any_order_rows_s": runs[False], "preserve_order_rows_s": runs[True],
                           "ratio": ordered / free, **vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
