"""Pre-train a small benchmark teacher with flow matching:
`python jobs/pretrain_teacher.py [--stage ss|slat] [--config FILE] [--set k=v ...] [--out DIR] [--name NAME]`.
The settings of the committed `mdt_ray/assets/teacher_ss_demo` are the stage-1 defaults (mdt_ray/pretrain.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under `ray job submit`

from mdt_ray.cli.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
