"""A tracker that may fail or block, run on a thread of its own with a bounded buffer.

The training thread only appends an event to a deque and returns. A worker thread
starts the tracker's run on the first event and sends what is buffered, the
metric rows in batches. When a call fails (a server that went away, a store that
is locked or full) the events stay in the buffer, one warning line says so, and
the worker retries with a growing pause; training and the local files go on.
Sends are at least `interval` seconds apart: a call to a store costs about the
same for one metric as for hundreds, so the rows of several log calls go together.
The buffer keeps at most `capacity` events: past that, the oldest metric rows
are dropped and counted. `close` waits up to `timeout` seconds for the buffer to
drain and then says what could not be sent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

log = logging.getLogger("bprun")

METRICS = "metrics"
BATCH_ROWS = 200  # metric rows per call: well under MLflow's 1000 metrics per batch
PAUSES = (1.0, 2.0, 4.0, 8.0)  # between retries; the last one repeats


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _never(e: BaseException) -> bool:
    return False


class Background:
    """Runs `backend`'s calls off the training thread. The backend has `start()`, which
    opens its run, `handle(kind, items)`, which sends a list of events of one kind,
    `stop()`, its local clean-up, and may have `permanent(error)`: True for a refusal
    that a retry cannot change (the event is dropped with a warning)."""

    def __init__(
        self,
        name: str,
        backend,
        capacity: int = 10_000,
        timeout: float = 30.0,
        interval: float = 0.0,
    ):
        self.name, self.backend, self.interval = name, backend, float(interval)
        self._last_send = float("-inf")
        self.capacity, self.timeout = max(1, int(capacity)), float(timeout)
        self._queue: deque = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._started = False
        self._failing: str | None = None  # the reason of the current outage
        self._inflight: list = []
        self._abandoned = False  # close gave up waiting: the worker stops retrying
        self.dropped = 0  # metric rows dropped from a full buffer
        self.sent = 0

    # ---------------------------------------------------------------- training thread
    def warm(self) -> None:
        """Start the worker now: it runs the backend's `prepare()` (imports, a client), so that
        the run opens as soon as the first event comes. Opens no run."""
        with self._cond:
            self._start_thread()

    def _start_thread(self) -> None:
        if self._thread is None and not self._closing:
            self._thread = threading.Thread(target=self._work, name=f"bprun-{self.name}")
            self._thread.daemon = True
            self._thread.start()

    def put(self, kind: str, *payload) -> None:
        with self._cond:
            if self._closing:
                return
            self._start_thread()
            self._queue.append((kind, payload))
            if len(self._queue) > self.capacity:
                self._drop_oldest_metrics()
            self._cond.notify()

    def _drop_oldest_metrics(self) -> None:
        for i, (kind, _) in enumerate(self._queue):
            if kind == METRICS:
                del self._queue[i]
                self.dropped += 1
                return

    def request_close(self) -> None:
        """Take no more events; the worker sends what is buffered and ends its run."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def close(self) -> None:
        """Wait up to `timeout` seconds for the buffer to drain, then say what was lost."""
        with self._cond:
            if self._thread is None or self._abandoned:
                self._closing = True
                return
        self.request_close()
        self._thread.join(self.timeout)
        with self._cond:
            self._abandoned = True
            left = list(self._queue) + list(self._inflight)
            self._queue.clear()
        rows = sum(1 for kind, _ in left if kind == METRICS) + self.dropped
        other = sum(1 for kind, _ in left if kind != METRICS)
        if rows or other or self._thread.is_alive():
            what = f"{rows} metric rows" + (f" and {other} other events" if other else "")
            why = f" ({self._failing})" if self._failing else ""
            log.warning(
                f"tracker {self.name}: {what} could not be sent{why} and are lost from it; "
                "the run folder (TensorBoard, metrics.json, checkpoints) has them all"
            )

    # ---------------------------------------------------------------- worker thread
    @staticmethod
    def _groups(events: list) -> list[list]:
        """Calls to make: runs of metric rows (BATCH_ROWS at most), each other event alone."""
        groups: list[list] = []
        for event in events:
            last = groups[-1] if groups else None
            if event[0] == METRICS and last and last[0][0] == METRICS and len(last) < BATCH_ROWS:
                last.append(event)
            else:
                groups.append([event])
        return groups

    def _wait_for_work(self) -> bool:
        """Under the lock: wait for events, and for `interval` since the last send, so that
        the rows of several log calls go in one call. False when closed and drained."""
        while not self._queue and not self._closing:
            self._cond.wait()
        if not self._queue:
            return False
        due = self._last_send + self.interval
        while not self._closing and len(self._queue) < BATCH_ROWS:
            left = due - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        return True

    def _work(self) -> None:
        failures = 0
        try:
            getattr(self.backend, "prepare", lambda: None)()
        except Exception:
            pass  # what fails here fails again in start(), where it is reported and retried
        while True:
            with self._cond:
                if not self._wait_for_work():
                    break
                self._inflight = list(self._queue)
                self._queue.clear()
            batch, done = self._inflight, 0
            try:
                if not self._started:
                    self.backend.start()
                    self._started = True
                for group in self._groups(batch):
                    try:
                        self.backend.handle(group[0][0], [payload for _, payload in group])
                    except Exception as e:
                        if not getattr(self.backend, "permanent", _never)(e):
                            raise
                        log.warning(f"tracker {self.name}: refused {group[0][0]} ({_reason(e)})")
                    done += len(group)
            except Exception as e:
                with self._cond:
                    self._queue.extendleft(reversed(batch[done:]))  # retried first, in order
                    self._inflight = []
                    while len(self._queue) > self.capacity and self._has_metrics():
                        self._drop_oldest_metrics()
                if self._failing is None:
                    log.warning(
                        f"tracker {self.name}: {_reason(e)}; training goes on, keeping up to "
                        f"{self.capacity} events to send when it answers again"
                    )
                self._failing = _reason(e)
                if self._abandoned:
                    return
                pause = PAUSES[min(failures, len(PAUSES) - 1)]
                failures += 1
                time.sleep(pause)
                continue
            with self._cond:
                self._inflight = []
            self._last_send = time.monotonic()
            self.sent += len(batch)
            if self._failing is not None:
                log.warning(f"tracker {self.name}: answering again; sending what was kept")
                self._failing = None
            failures = 0
        try:
            if self._started:
                self.backend.stop()  # local clean-up; the run's end was an event like any other
        except Exception as e:
            log.warning(f"tracker {self.name}: could not end its run cleanly ({_reason(e)})")

    def _has_metrics(self) -> bool:
        return any(kind == METRICS for kind, _ in self._queue)
