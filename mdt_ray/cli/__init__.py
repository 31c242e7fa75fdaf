"""The `mdt-ray` command. Each sub-command lives in its own module of this package with
`add_arguments(parser)` and `run(args) -> int` (see _common.py). `main` imports only the module
of the sub-command it runs, so `mdt-ray --help` and `mdt-ray --version` load none of them; the
heavy libraries (torch, Ray, pyarrow, MLflow) are imported by `run`, never at parse time."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Iterable, Optional

from mdt_ray.cli._common import add_logging_args, configure_logging, guarded

# (sub-command, module in this package, help, parser defaults)
COMMANDS: tuple[tuple[str, str, str, dict], ...] = (
    ("corpus", "corpus", "build, import and inspect distillation corpora", {}),
    ("distill", "distill", "run (or --resume) a distillation job", {}),
    ("sweep", "sweep", "Ray Tune sweep over config keys (λ, Δt, ...)", {}),
    ("eval", "eval", "few-step quality and speed-up of a checkpoint vs its teacher", {}),
    ("pretrain-teacher", "pretrain", "flow-matching pre-training of a small benchmark teacher", {}),
    ("pretrain-slat-teacher", "pretrain", "pre-training of a small stage-2 (SLAT) teacher "
     "(= pretrain-teacher --stage slat)", {"stage": "slat"}),
    ("export-pipeline", "export_pipeline", "a TRELLIS pipeline folder with distilled students as its flow models",
     {}),
    ("bench", "bench", "run a script of benchmarks/ (e.g. quality --quick); --list names them", {}),
)


def version() -> str:
    """The installed distribution's version; a source tree on sys.path that was never installed
    has only `mdt_ray.__version__` (pyproject.toml reads the same attribute)."""
    from importlib import metadata

    try:
        return metadata.version("mdt-ray")
    except metadata.PackageNotFoundError:
        from mdt_ray import __version__

        return __version__


def build_parser(commands: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The `mdt-ray` parser. The sub-commands named in `commands` (default: all of them) get their
    arguments, which imports their modules; the others are listed with their help line only,
    which is all the top-level `--help` shows."""
    parser = argparse.ArgumentParser(prog="mdt-ray", description="MDT-dist distillation of TRELLIS flow models on Ray")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    add_logging_args(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = None if commands is None else set(commands)
    for name, module_name, help_text, defaults in COMMANDS:
        if wanted is not None and name not in wanted:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"mdt_ray.cli.{module_name}")
        if hasattr(module, "register"):  # a command with sub-commands of its own
            module.register(sub, name, help_text)
            continue
        p = sub.add_parser(name, help=help_text, **getattr(module, "PARSER_OPTIONS", {}))
        module.add_arguments(p)
        p.set_defaults(func=guarded(f"mdt-ray {name}", module.run), **defaults)
    return parser


def named_command(argv: list[str]) -> list[str]:
    """The sub-command `argv` runs, as a list of zero or one name: its first word that is not an
    option (the top-level options take no value)."""
    for word in argv:
        if not word.startswith("-"):
            return [word] if any(word == c[0] for c in COMMANDS) else []
    return []


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(named_command(argv)).parse_args(argv)
    configure_logging(args.verbosity)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
