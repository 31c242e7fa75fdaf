"""Evaluate a checkpoint against its teacher on held-out conditions:
`python jobs/evaluate.py CHECKPOINT [--config FILE] [--set k=v ...] [--steps 1 2 4 25] [--json PATH]`,
locally or under `ray job submit --working-dir . -- python jobs/evaluate.py ...` (= `mdt-ray eval`;
see mdt_ray/cli/eval.py and mdt_ray/eval/)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir under `ray job submit`

from mdt_ray.cli.eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
