"""Graceful stop on SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 (what submitit sends before a
SLURM time limit): finish the update, save, exit.

A second SIGINT aborts at once, for a user who does not want to wait.
"""

from __future__ import annotations

import signal
import threading


class StopSignals:
    SIGNALS = tuple(
        s
        for s in (
            signal.SIGTERM,
            signal.SIGINT,
            getattr(signal, "SIGUSR1", None),
            getattr(signal, "SIGUSR2", None),
        )
        if s
    )

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without saving
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        return False
