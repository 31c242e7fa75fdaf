"""The `mdt-ray` command: corpus, distill, sweep, eval, pretrain-teacher, pretrain-slat-teacher."""

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

    from mdt_ray import evaluate

    p = sub.add_parser("eval", help="few-step quality and speed-up of a checkpoint vs its teacher")
    evaluate.add_arguments(p)
    p.set_defaults(func=evaluate.run_command)

    from mdt_ray import pretrain

    p = sub.add_parser("pretrain-teacher", help="flow-matching pre-training of the small benchmark teacher")
    pretrain.add_arguments(p)
    p.set_defaults(func=pretrain.run)

    from mdt_ray import pretrain_slat

    p = sub.add_parser("pretrain-slat-teacher", help="flow-matching pre-training of a small stage-2 (SLAT) teacher")
    pretrain.add_arguments(p)
    p.set_defaults(func=pretrain_slat.run, out="runs/slat-teacher")

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
