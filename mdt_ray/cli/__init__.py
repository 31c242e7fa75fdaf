"""The `mdt-ray` command. Each sub-command lives in its own module of this package with
`add_arguments(parser)` and `run(args) -> int` (see _common.py); the heavy libraries (torch, Ray,
pyarrow) are imported by `run`, never at parse time."""

from __future__ import annotations

import argparse
import importlib
import sys

from mdt_ray.cli._common import guarded

# (sub-command, module in this package, help, parser defaults)
COMMANDS: tuple[tuple[str, str, str, dict], ...] = (
    ("corpus", "corpus", "build, import and inspect distillation corpora", {}),
    ("distill", "distill", "run (or --resume) a distillation job", {}),
    ("sweep", "sweep", "Ray Tune sweep over config keys (λ, Δt, ...)", {}),
    ("eval", "eval", "few-step quality and speed-up of a checkpoint vs its teacher", {}),
    ("pretrain-teacher", "pretrain", "flow-matching pre-training of a small benchmark teacher", {}),
    ("pretrain-slat-teacher", "pretrain", "pre-training of a small stage-2 (SLAT) teacher "
     "(= pretrain-teacher --stage slat)", {"stage": "slat"}),
    ("bench", "bench", "run a script of benchmarks/ (e.g. quality --quick); --list names them", {}),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdt-ray", description="MDT-dist distillation of TRELLIS flow models on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name, help_text, defaults in COMMANDS:
        module = importlib.import_module(f"mdt_ray.cli.{module_name}")
        if hasattr(module, "register"):  # a command with sub-commands of its own
            module.register(sub, name, help_text)
            continue
        p = sub.add_parser(name, help=help_text, **getattr(module, "PARSER_OPTIONS", {}))
        module.add_arguments(p)
        p.set_defaults(func=guarded(f"mdt-ray {name}", module.run), **defaults)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
