"""The `mdt-ray` command itself: what its top-level help costs, --version, the -v/-q switches and
how they shape logging and error reports, `python -m mdt_ray`, and `bench` handing its arguments
to the script."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import mdt_ray
from mdt_ray.cli import COMMANDS, build_parser, main, named_command, version
from mdt_ray.cli._common import LOGGER, configure_logging, guarded, main_for
from mdt_ray.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "pyarrow", "mlflow")

# Runs the real entry point in a fresh interpreter and reports which libraries it loaded.
PROBE = """
import json, sys
from mdt_ray.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "ray", "pyarrow", "mlflow", "pydantic"})
commands = sorted(m for m in sys.modules if m.startswith("mdt_ray.cli."))
print(json.dumps({"loaded": loaded, "commands": commands}))
"""


def probe(*argv: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def mdt_logger():
    """The `mdt_ray` logger as an unconfigured process has it, restored after the test."""
    logger = logging.getLogger(LOGGER)
    saved = (logger.level, list(logger.handlers))
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]


def test_top_level_help_and_version_load_no_heavy_library():
    for argv in (["--help"], ["--version"]):
        seen = probe(*argv)
        assert seen["loaded"] == [], f"mdt-ray {argv[0]} imported {seen['loaded']}"
        assert seen["commands"] == ["mdt_ray.cli._common"], seen["commands"]
    # A sub-command's help loads that command's module (and the config schema), not the others'
    # and not the training stack.
    seen = probe("distill", "--help")
    assert "mdt_ray.cli.distill" in seen["commands"] and "mdt_ray.cli.sweep" not in seen["commands"]
    assert not set(seen["loaded"]) & set(HEAVY), seen["loaded"]
    for argv in (("corpus", "--help"), ("corpus", "import-trellis", "--help"), ("sweep", "--help")):
        seen = probe(*argv)
        assert not set(seen["loaded"]) & set(HEAVY), (argv, seen["loaded"])


def test_version_is_the_package_version(capsys):
    assert version() == mdt_ray.__version__
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"mdt-ray {mdt_ray.__version__}"


def test_python_dash_m_is_the_same_command():
    for argv, expected in ((["--help"], [c[0] for c in COMMANDS]), (["--version"], [mdt_ray.__version__])):
        out = subprocess.run([sys.executable, "-m", "mdt_ray", *argv], capture_output=True, text=True,
                             timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr[-3000:]
        for word in expected:
            assert word in out.stdout
    out = subprocess.run([sys.executable, "-m", "mdt_ray", "no-such-command"], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 2 and "invalid choice: 'no-such-command'" in out.stderr


def test_named_command_and_the_switches():
    assert named_command(["-v", "distill", "--config", "x.yaml"]) == ["distill"]
    assert named_command(["--help"]) == [] and named_command(["distil"]) == []
    parser = build_parser()
    assert parser.parse_args(["bench"]).verbosity == 0
    assert parser.parse_args(["-v", "bench"]).verbosity == 1
    assert parser.parse_args(["--quiet", "bench"]).verbosity == -1
    with pytest.raises(SystemExit):
        parser.parse_args(["-v", "-q", "bench"])
    # The full parser (every sub-command's arguments) still builds: tests and docs use it.
    assert parser.parse_args(["pretrain-slat-teacher"]).stage == "slat"


def test_logging_levels_and_format(mdt_logger, capsys):
    log = logging.getLogger("mdt_ray.some.module")
    configure_logging(0)
    log.debug("hidden detail")
    log.info("distilling ss-tiny")
    err = capsys.readouterr()
    assert err.err == "[mdt-ray] distilling ss-tiny\n" and err.out == ""
    configure_logging(1)
    log.debug("shown detail")
    assert "[mdt-ray] shown detail" in capsys.readouterr().err
    configure_logging(-1)
    log.info("progress")
    log.warning("a warning")
    assert capsys.readouterr().err == "[mdt-ray] a warning\n"
    assert sum(type(h).__name__ == "_StderrHandler" for h in mdt_logger.handlers) == 1


def test_guarded_reports_one_line_and_the_traceback_only_with_verbose(capsys):
    def run(args):
        raise ConfigError("train.steps: must be >= 1, got 0")

    assert guarded("mdt-ray distill", run)(argparse.Namespace(verbosity=0)) == 2
    err = capsys.readouterr().err
    assert err == "mdt-ray distill: error: train.steps: must be >= 1, got 0\n"
    assert guarded("mdt-ray distill", run)(argparse.Namespace(verbosity=1)) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "raise ConfigError" in err
    assert err.endswith("mdt-ray distill: error: train.steps: must be >= 1, got 0\n")

    def bug(args):
        raise KeyError("not a project error")

    with pytest.raises(KeyError):
        guarded("mdt-ray distill", bug)(argparse.Namespace(verbosity=0))


def test_verbose_switch_reaches_the_error_report_end_to_end(tmp_path, mdt_logger, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert main(["distill", "--config", missing]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("mdt-ray distill: error:") and "nope.yaml" in err
    assert main(["-v", "distill", "--config", missing]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "mdt-ray distill: error:" in err.splitlines()[-1]


def test_job_scripts_get_the_switches_and_keep_their_own_quiet(mdt_logger, capsys):
    seen = {}

    def add(parser):
        parser.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args):
        seen.update(vars(args))
        return 0

    job = main_for("job.py", "a job", add, run)
    assert job(["-q", "--quiet"]) == 0 and seen == {"quiet": True, "verbosity": -1}
    assert job(["-v"]) == 0 and seen == {"quiet": False, "verbosity": 1}
    with pytest.raises(SystemExit):
        job(["--help"])
    text = capsys.readouterr().out
    assert "-v, --verbose" in text and "no progress bar" in text


def test_bench_hands_help_and_options_to_the_script():
    out = subprocess.run([sys.executable, "-m", "mdt_ray", "bench", "quality", "--help"], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    # quality.py's own options, not bench's.
    assert "--quick" in out.stdout and "--list" not in out.stdout
    out = subprocess.run([sys.executable, "-m", "mdt_ray", "bench", "--help"], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0 and "--list" in out.stdout
