"""The `mdt-ray` command: corpus, distill, sweep, eval, bench."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mdt-ray", description="MDT-dist distillation of TRELLIS flow models on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    from mdt_ray.data import cli as corpus_cli

    corpus_cli.register(sub)

    from mdt_ray.train import command as distill_cmd

    p = sub.add_parser("distill", help="run (or --resume) a distillation job")
    distill_cmd.add_arguments(p)
    p.set_defaults(func=distill_cmd.run)

    from mdt_ray import tune_command

    p = sub.add_parser("sweep", help="Ray Tune sweep over config keys (λ, Δt, ...)")
    tune_command.add_arguments(p)
    p.set_defaults(func=tune_command.run)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
