"""`mdt-ray sweep` / `python jobs/sweep.py`: a Ray Tune sweep of distillation runs."""

from __future__ import annotations

import argparse
import json

from mdt_ray.cli._common import add_config_args, main_for
from mdt_ray.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    parser.add_argument("--json", help="write the trial table and the best trial here")


def run(args: argparse.Namespace) -> int:
    from mdt_ray.train.launch import RunError
    from mdt_ray.tune import load_sweep, run_sweep

    if not args.config:
        raise ConfigError("--config SWEEP.yaml is required (see jobs/configs/sweep.yaml)")
    cfg, spec, tree = load_sweep(args.config, args.overrides)
    out = run_sweep(cfg, spec, tree, resume=args.resume)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in out.items() if k != "table"}, f, indent=1, default=str)
    if not out["best"]:
        raise RunError(f"sweep {spec.name!r}: no trial reported {spec.metric} (the trial errors are above)")
    return 0


main = main_for("sweep", "Ray Tune sweep of MDT-dist distillation runs", add_arguments, run)
