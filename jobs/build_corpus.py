"""Corpus job: build the synthetic corpus or import a TRELLIS root, locally or on a Ray cluster.

    python jobs/build_corpus.py --kind synthetic --num-assets 10000 --out s3://bucket/corpus
    python jobs/build_corpus.py --kind trellis --root /data/TRELLIS-500K --out s3://bucket/trellis
    ray job submit --working-dir . -- python jobs/build_corpus.py --kind synthetic ...

Under `ray job submit` (RAY_ADDRESS is set) or with --ray, each shard is one Ray task, so shards
are generated and written in parallel across the cluster; otherwise local processes do it. The
result is the same corpus either way (asset i lands in the same shard with the same content).
A TRELLIS root must be readable at the same path by every node (a shared filesystem).
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under `ray job submit`

from mdt_ray.data import cli as corpus_cli  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="build_corpus.py", description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["synthetic", "trellis"], default="synthetic")
    p.add_argument("--num-assets", type=int, default=None, help="synthetic: how many assets")
    p.add_argument("--seed", type=int, default=0, help="synthetic: corpus seed")
    p.add_argument("--root", default=None, help="trellis: dataset root (holds metadata.csv)")
    corpus_cli.add_trellis_options(p)
    corpus_cli.add_write_arguments(p)
    args = p.parse_args(argv)
    if args.kind == "synthetic" and args.num_assets is None:
        p.error("--kind synthetic needs --num-assets")
    if args.kind == "trellis" and args.root is None:
        p.error("--kind trellis needs --root")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.use_ray is None and os.environ.get("RAY_ADDRESS"):
        args.use_ray = True
    if args.use_ray:
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    run = corpus_cli.run_build if args.kind == "synthetic" else corpus_cli.run_import
    return corpus_cli.guard(run)(args)


if __name__ == "__main__":
    sys.exit(main())
