"""The background-thread plumbing shared by the benchmarks' process samplers."""

from __future__ import annotations

import threading


class PeriodicSampler:
    """Calls `sample()` every `period` seconds on a daemon thread while used as a context
    manager, and once more on exit so the last interval is never lost. Subclasses define
    `sample` and what they keep."""

    def __init__(self, period: float):
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
