"""Interrupts as one exception: Ctrl-C (SIGINT) and SIGTERM (what `kill`, Kubernetes and `ray job
stop` send) both end a command through KeyboardInterrupt, so every clean-up written for one runs
for the other: the MLflow run is closed KILLED, scratch folders go, and a run with a checkpoint
can be resumed."""

from __future__ import annotations

import contextlib
import signal
import threading


class Interrupted(KeyboardInterrupt):
    """A KeyboardInterrupt that knows which signal raised it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


# The signal the active handler last turned into an interrupt: Ray's `ray.get` re-raises an
# interrupt inside it as a plain KeyboardInterrupt, which no longer says where it came from.
_last_signal: list[str] = []
_active_handler: list = []


def signal_name(exc: BaseException) -> str:
    return getattr(exc, "signal_name", None) or (_last_signal[-1] if _last_signal else "SIGINT")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM raises `Interrupted` in the main thread (Python lets only
    the main thread set a handler; elsewhere the default stays)."""
    if not _in_main_thread():
        yield
        return

    def handler(signum, frame):
        _last_signal.append(signal.Signals(signum).name)
        raise Interrupted(signal.Signals(signum).name)

    _last_signal.clear()  # a signal of an earlier command in this process says nothing of this one
    previous = signal.signal(signal.SIGTERM, handler)
    _active_handler.append(handler)
    try:
        yield
    finally:
        _active_handler.remove(handler)
        signal.signal(signal.SIGTERM, previous)


def reclaim_sigterm() -> None:
    """Put the active SIGTERM handler back after `ray.init`: Ray 2.60's core worker installs a
    C++ handler for SIGTERM in the driver that prints a stack trace and aborts the process (rc
    134) once Python's handler has run, which would cut the clean-up short."""
    if _active_handler and _in_main_thread():
        signal.signal(signal.SIGTERM, _active_handler[-1])


@contextlib.contextmanager
def ray_train_sigint():
    """Around `TorchTrainer.fit()`: Ray Train 2.60 installs its own SIGINT handler there
    (DataParallelTrainer._register_sigint_handler), which aborts the run's controller and then
    calls sys.exit, and never puts the previous handler back. Its SystemExit becomes
    `Interrupted("SIGINT")` here, and the handler the caller had is restored."""
    previous = signal.getsignal(signal.SIGINT) if _in_main_thread() else None
    try:
        yield
    except SystemExit as exc:
        raise Interrupted("SIGINT") from exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


# Ray Tune 2.60's SIGINT handler (ray.tune.tune._setup_signal_catching) is a closure of this name;
# it ends the tuning loop, saves the experiment state and puts back the handler it replaced, so
# Tuner.fit() returns a result grid as if the sweep had finished.
_TUNE_HANDLER = "signal_interrupt_tune_run"


def _is_tune_handler(handler) -> bool:
    return getattr(handler, "__name__", "") == _TUNE_HANDLER


class _DropTuneRestoreHint:
    """Tune's own 'Resume experiment with: Tuner.restore(...)' and 'Stop signal received' lines:
    a sweep resumes with `--resume`, and the interrupt gets the project's one line."""

    def filter(self, record) -> bool:
        text = str(record.msg)
        return not ("Tuner.restore" in text or "interrupted, but the most recent state" in text
                    or text.startswith("Stop signal received"))


@contextlib.contextmanager
def tune_interrupts():
    """Around Tuner.fit(): yields a list that holds the signal's name when Tune ended the sweep on
    an interrupt (fit() returned rather than raised). SIGTERM takes Tune's graceful path as SIGINT
    does, so the experiment state is saved for `--resume` either way; after fit() the SIGINT
    handler the caller had is back (Tune 2.60 leaves its own in place when nothing interrupts)."""
    interrupted: list[str] = []
    if not _in_main_thread():
        yield interrupted
        return

    def on_sigterm(signum, frame):
        _last_signal.append("SIGTERM")
        tune_handler = signal.getsignal(signal.SIGINT)
        if not _is_tune_handler(tune_handler):  # Tune's loop is not running: end where we are
            raise Interrupted("SIGTERM")
        interrupted.append("SIGTERM")
        tune_handler(signal.SIGINT, frame)

    import logging

    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    hint = _DropTuneRestoreHint()
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(hint)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield interrupted
        # fit() returned: Tune's handler replaced the caller's on entry and put it back only if it ran.
        if not interrupted and not _is_tune_handler(signal.getsignal(signal.SIGINT)):
            interrupted.append("SIGINT")
            _last_signal.append("SIGINT")
    finally:
        tune_log.removeFilter(hint)
        signal.signal(signal.SIGTERM, before_term)
        signal.signal(signal.SIGINT, before_int)
