"""The `mdt-ray` command: corpus, distill, sweep, eval, pretrain-teacher, pretrain-slat-teacher, bench."""

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

    p = sub.add_parser("bench", help="run a script of benchmarks/ (e.g. quality --quick); --list names them",
                       add_help=False)
    p.add_argument("--list", "-h", "--help", dest="list", action="store_true", help="name the benchmarks")
    p.add_argument("name", nargs="?", help="benchmark script name, without .py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script (its --help lists them)")
    p.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _bench(args) -> int:
    """The benchmarks live beside the package in a source checkout (they are scripts, not API);
    each runs in its own interpreter, as `python benchmarks/<name>.py` would."""
    import subprocess
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    names = sorted(f.stem for f in folder.glob("*.py") if not f.stem.startswith("_")) if folder.is_dir() else []
    if not names:
        print(f"error: no benchmarks/ folder at {folder}: `mdt-ray bench` runs from a source checkout "
              "(git clone + scripts/setup.sh)", file=sys.stderr)
        return 2
    if args.list or args.name is None:
        print("benchmarks: " + ", ".join(names) + "\nrun one: mdt-ray bench NAME [ARGS]  (NAME --help for its options)")
        return 0
    if args.name not in names:
        print(f"error: unknown benchmark {args.name!r}; have {', '.join(names)}", file=sys.stderr)
        return 2
    return subprocess.run([sys.executable, str(folder / f"{args.name}.py"), *args.args]).returncode


if __name__ == "__main__":
    sys.exit(main())
