"""Sweep job: `python jobs/sweep.py --config jobs/configs/sweep.yaml [--set key=value ...] [--resume]`,
locally or under `ray job submit --working-dir . -- python jobs/sweep.py ...`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdt_ray.cli.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
