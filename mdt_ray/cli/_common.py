"""What every command shares: the `--config/--set` pair, the `-v/-q` switches, and one way of failing.

Each command module in mdt_ray/cli/ has `add_arguments(parser)` and `run(args) -> int`; the
`mdt-ray` parser and the `jobs/*.py` scripts both call them through `main_for`. The project's own
errors (a bad config key, a corrupt shard, an unreachable store, a run that cannot start) become
one line on stderr and a non-zero exit status: 2 for what the user must change before trying again
(config, corpus, paths), 1 for a run that started and failed; with `-v` their traceback comes
first. Anything else is a bug and keeps its traceback.

Messages go through the `mdt_ray` logger (`logging.getLogger(__name__)` in any module of the
package): `configure_logging` writes them to stderr as `[mdt-ray] message`, so that what a
command prints on stdout (a table, `--json`) stays clean when piped.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
from typing import Callable

from mdt_ray.interrupts import signal_name, sigterm_as_interrupt

__all__ = ["add_config_args", "add_logging_args", "configure_logging", "fail", "guarded", "main_for", "user_errors"]

LOGGER = "mdt_ray"
# -q, neither, -v
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The `--config FILE --set key=value ...` pair (mdt_ray.config's, imported here rather than at
    module level so that `mdt-ray --help` does not load pydantic)."""
    from mdt_ray.config import add_config_args as add

    add(parser)


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    """`-v/--verbose` and `-q/--quiet`, stored as `args.verbosity` (1, -1; 0 without either). A
    parser that already has a `--quiet` of its own (jobs/build_corpus.py's: no progress bar)
    keeps it and gets the short `-q` only."""
    group = parser.add_mutually_exclusive_group()
    switches = ((("-v", "--verbose"), 1, "debug messages, and the traceback of a reported error"),
                (("-q", "--quiet"), -1, "warnings and errors only"))
    for flags, value, help_text in switches:
        options = dict(dest="verbosity", action="store_const", const=value, default=0, help=help_text)
        try:
            group.add_argument(*flags, **options)
        except argparse.ArgumentError:
            group.add_argument(flags[0], **options)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted: pytest's capture and
    contextlib.redirect_stderr replace it after the handler is made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbosity: int = 0) -> logging.Logger:
    """The `mdt_ray` logger at INFO (DEBUG for verbosity > 0, WARNING below 0), with one stderr
    handler; calling it again only changes the level. Records still propagate, so pytest's
    caplog and any root handler an application adds see them too."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(LEVELS[max(-1, min(1, int(verbosity)))])
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[mdt-ray] %(message)s"))
        logger.addHandler(handler)
    return logger


def user_errors() -> tuple[type[BaseException], ...]:
    """The error types whose message is the whole story (imported late: they pull in pyarrow)."""
    from mdt_ray.config import ConfigError
    from mdt_ray.data.schema import CorpusError
    from mdt_ray.data.storage import StorageError
    from mdt_ray.models.checkpoint import CheckpointMismatchError

    return (ConfigError, CorpusError, StorageError, CheckpointMismatchError, FileNotFoundError, ValueError)


def fail(prog: str, message: object, code: int = 2) -> int:
    """`PROG: error: message` on stderr (argparse's form, whatever the log level), and `code`."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code


def guarded(prog: str, run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`run` with the project's errors reported as one line (see the module docstring)."""

    def call(args: argparse.Namespace) -> int:
        from mdt_ray.train.launch import RunError

        try:
            with sigterm_as_interrupt():
                return int(run(args) or 0)
        except KeyboardInterrupt as e:
            return _interrupted(prog, e)
        except RunError as e:
            return _report(prog, e, 1, args)
        except user_errors() as e:
            return _report(prog, e, 2, args)

    return call


def _interrupted(prog: str, error: KeyboardInterrupt) -> int:
    """One line for an interrupted command, and the shell's status for the signal (128 + number)."""
    name = signal_name(error)
    fail(prog, f"interrupted by {name}; what was running is marked KILLED in MLflow, and a run with a "
               "checkpoint continues with --resume", 0)
    return 128 + int(signal.Signals[name])


def _report(prog: str, error: BaseException, code: int, args: argparse.Namespace) -> int:
    if getattr(args, "verbosity", 0) > 0:
        traceback.print_exception(error, file=sys.stderr)
    return fail(prog, error, code)


def main_for(prog: str, description: str, add_arguments, run) -> Callable[..., int]:
    """A stand-alone `main(argv)` for one command (what jobs/*.py call)."""

    def main(argv=None) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=description)
        add_arguments(parser)
        add_logging_args(parser)
        args = parser.parse_args(argv)
        configure_logging(args.verbosity)
        return guarded(prog, run)(args)

    return main
