"""What every command shares: the `--config/--set` pair, and one way of failing.

Each command module in mdt_ray/cli/ has `add_arguments(parser)` and `run(args) -> int`; the
`mdt-ray` parser and the `jobs/*.py` scripts both call them through `main_for`. The project's own
errors (a bad config key, a corrupt shard, an unreachable store, a run that cannot start) become
one line on stderr and a non-zero exit status: 2 for what the user must change before trying again
(config, corpus, paths), 1 for a run that started and failed. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from mdt_ray.config import ConfigError, add_config_args

__all__ = ["add_config_args", "fail", "guarded", "main_for", "user_errors"]


def user_errors() -> tuple[type[BaseException], ...]:
    """The error types whose message is the whole story (imported late: they pull in pyarrow)."""
    from mdt_ray.data.schema import CorpusError
    from mdt_ray.data.storage import StorageError
    from mdt_ray.models.checkpoint import CheckpointMismatchError

    return (ConfigError, CorpusError, StorageError, CheckpointMismatchError, FileNotFoundError, ValueError)


def fail(prog: str, message: object, code: int = 2) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code


def guarded(prog: str, run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`run` with the project's errors reported as one line (see the module docstring)."""

    def call(args: argparse.Namespace) -> int:
        from mdt_ray.train.launch import RunError

        try:
            return int(run(args) or 0)
        except RunError as e:
            return fail(prog, e, 1)
        except user_errors() as e:
            return fail(prog, e, 2)

    return call


def main_for(prog: str, description: str, add_arguments, run) -> Callable[..., int]:
    """A stand-alone `main(argv)` for one command (what jobs/*.py call)."""

    def main(argv=None) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=description)
        add_arguments(parser)
        return guarded(prog, run)(parser.parse_args(argv))

    return main
