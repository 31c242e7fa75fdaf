"""`mdt-ray bench NAME [ARGS]`: run a script of benchmarks/ in its own interpreter, as
`python benchmarks/NAME.py ARGS` would (the benchmarks are scripts of a source checkout, not API)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from mdt_ray.cli._common import fail

FOLDER = Path(__file__).resolve().parents[2] / "benchmarks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="name the benchmarks")
    parser.add_argument("name", nargs="?", help="benchmark script name, without .py")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="arguments for the script (`mdt-ray bench NAME --help` lists them)")


def names() -> list[str]:
    return sorted(f.stem for f in FOLDER.glob("*.py") if not f.stem.startswith("_")) if FOLDER.is_dir() else []


def run(args: argparse.Namespace) -> int:
    found = names()
    if not found:
        return fail("mdt-ray bench", f"no benchmarks/ folder at {FOLDER}: `mdt-ray bench` runs from a source "
                    "checkout (git clone + scripts/setup.sh)")
    if args.list or args.name is None:
        print("benchmarks: " + ", ".join(found) + "\nrun one: mdt-ray bench NAME [ARGS]  (NAME --help for its options)")
        return 0
    if args.name not in found:
        return fail("mdt-ray bench", f"unknown benchmark {args.name!r}; have {', '.join(found)}")
    return subprocess.run([sys.executable, str(FOLDER / f"{args.name}.py"), *args.args]).returncode
