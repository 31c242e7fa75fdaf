"""Start-up time of the `mdt-ray` command, side by side with a bare interpreter.

Prints the median wall time of `mdt-ray --help`, `mdt-ray --version`, `python -m mdt_ray --help`
and `mdt-ray distill --help` (which loads that command's module and the config schema), next to
`python -c pass` and `python -c "import torch"` (what a parser that imported its libraries
eagerly would pay at least). The target is `mdt-ray --help` under one second.

    python benchmarks/cli_startup.py [--repeats 7] [--json out.json]
"""

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import timed, write_json  # noqa: E402


def mdt_ray_command() -> list[str]:
    """The `mdt-ray` script beside this interpreter (a venv's bin/), else `python -m mdt_ray`."""
    script = Path(sys.executable).parent / "mdt-ray"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mdt_ray"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    cli = mdt_ray_command()
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "mdt-ray --help": [*cli, "--help"],
        "mdt-ray --version": [*cli, "--version"],
        "python -m mdt_ray --help": [sys.executable, "-m", "mdt_ray", "--help"],
        "mdt-ray distill --help": [*cli, "distill", "--help"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    }
    seconds = {}
    for name, command in cases.items():
        seconds[name] = timed(lambda: subprocess.run(command, check=True, stdout=subprocess.DEVNULL), args.repeats)
    base = seconds["python -c pass"]
    print(f"median of {args.repeats} runs each ({' '.join(cli)})")
    print(f"{'':28s}{'seconds':>9s}{'x python':>10s}")
    for name, s in seconds.items():
        print(f"{name:28s}{s:9.3f}{s / base:10.1f}")
    verdict = "met" if seconds["mdt-ray --help"] < 1.0 else "MISSED"
    print(f"mdt-ray --help: {seconds['mdt-ray --help']:.3f} s (target < 1 s: {verdict})")
    result = {"repeats": args.repeats, "command": cli, "seconds": seconds}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
