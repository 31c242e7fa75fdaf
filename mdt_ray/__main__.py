"""`python -m mdt_ray ...` is the `mdt-ray` command."""

import sys

from mdt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
