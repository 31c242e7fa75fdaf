"""`python -m mdt_ray ...` is the `mdt-ray` command."""

import sys

from mdt_ray.cli import main

sys.exit(main())
