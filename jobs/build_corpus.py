"""Corpus job: build the synthetic corpus or import a TRELLIS root, locally or on a Ray cluster.

    python jobs/build_corpus.py --kind synthetic --num-assets 10000 --out s3://bucket/corpus
    python jobs/build_corpus.py --kind trellis --root /data/TRELLIS-500K --out s3://bucket/trellis
    ray job submit --working-dir . -- python jobs/build_corpus.py --kind synthetic ...

Under `ray job submit` (RAY_ADDRESS is set) or with --ray, each shard is one Ray task, so shards
are generated and written in parallel across the cluster; otherwise local processes do it. The
result is the same corpus either way (asset i lands in the same shard with the same content).
A TRELLIS root must be readable at the same path by every node (a shared filesystem).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under `ray job submit`

from mdt_ray.cli.corpus import job_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
