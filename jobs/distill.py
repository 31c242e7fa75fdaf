"""Distillation job: `python jobs/distill.py --config jobs/configs/demo.yaml [--set k=v ...] [--resume]`,
locally or under `ray job submit --working-dir . -- python jobs/distill.py ...`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under `ray job submit`

from mdt_ray.cli.distill import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
