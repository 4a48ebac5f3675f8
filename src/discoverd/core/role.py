"""What the register and discover loops share: threads, stop, backoff, counters, problems.

Both roles are level-triggered: events only wake a loop (:class:`~discoverd.core.scheduling.Waker`);
the loop then reads a full snapshot and applies the difference, so a missed event, a restart or an
outage heals by itself at the next wake-up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from discoverd.core.errors import PluginError
from discoverd.core.model import Problem
from discoverd.core.scheduling import Backoff, Waker
from discoverd.core.telemetry import Contact, Counters, now_ms

log = logging.getLogger("discoverd")

#: The reason of the periodic pass each role makes even without events.
RESYNC = "periodic resync"


class ProblemLog:
    """Logs each problem once while it persists (not at every reconcile), and keeps the
    current ones for ``/healthz`` and ``explain``."""

    def __init__(self, logger: logging.Logger) -> None:
        self._seen: set[str] = set()
        self._log = logger
        self.current: tuple[Problem, ...] = ()

    def update(self, problems: Iterable[Problem]) -> None:
        found = tuple(dict.fromkeys(problems))
        current = {str(p): p for p in found}
        for line in sorted(set(current) - self._seen):
            service = current[line].service
            self._log.warning("%s", line, extra={"service": service} if service else None)
        self._seen = set(current)
        self.current = found


def _thread(name: str, target: Callable[[], None]) -> threading.Thread:
    return threading.Thread(target=target, name=f"discoverd-{name}", daemon=True)


class Role:
    """Common plumbing: a stop event, threads, a waker, backoff for the loops."""

    name = "role"

    def __init__(self, min_wait: float, max_wait: float, retry_max: float) -> None:
        self.stop_event = threading.Event()
        self.waker = Waker(min_wait, max_wait)
        self.retry_max = retry_max
        self.counters = Counters()
        #: The problems of the last pass (each logged once while it lasts).
        self.problems = ProblemLog(log)
        #: When this role last reached the registry (and the error since, if any).
        self.registry_contact = Contact()
        self.watch_live = threading.Event()  # a watch stream is open now
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        raise NotImplementedError

    def _log_wake(self, reasons: list[str]) -> None:
        """The debug line of a pass about to start: its reasons, how long after the first
        event of its batch, and when (``t=``, see :func:`~discoverd.core.telemetry.now_ms`)."""
        if not log.isEnabledFor(logging.DEBUG):
            return
        first = self.waker.batch_first
        after = "" if first is None else f"; {(time.monotonic() - first) * 1000:.1f} ms after"
        log.debug("%s: reconcile (%s)%s (t=%s)", self.name, ", ".join(reasons), after, now_ms())

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = _thread(f"{self.name}-{name}", target)
        self._threads.append(thread)
        thread.start()

    def _guarded(self, what: str, body: Callable[[], None]) -> Callable[[], None]:
        """Run ``body`` until stop; an unexpected exception is logged and the loop restarted."""

        def run() -> None:
            backoff = Backoff(self.retry_max)
            while not self.stop_event.is_set():
                try:
                    body()
                    return
                except Exception:
                    log.exception("%s: unexpected error in %s; restarting it", self.name, what)
                    delay = backoff.next()
                    # The batch that failed was consumed: make sure the loop runs again.
                    self.waker.retry_in(delay, "restart after an error")
                    self.stop_event.wait(delay)

        return run

    def _watch_forever(self, what: str, watch: Callable[[], None]) -> None:
        """Keep a watch running: when it returns or fails, resync and start it again."""
        backoff = Backoff(self.retry_max)
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                watch()
                if self.stop_event.is_set():
                    return
                log.warning("%s: %s stream ended; reconnecting", self.name, what)
            except PluginError as exc:
                log.warning("%s: %s lost: %s; reconnecting", self.name, what, exc)
            except Exception:
                log.exception("%s: %s failed; reconnecting", self.name, what)
            self.waker.notify(f"{what} reconnect")
            if time.monotonic() - started > 30:
                backoff.reset()
            self.stop_event.wait(backoff.next())

    def alive(self) -> bool:
        """Every thread of this role runs (for ``/healthz/live``)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.waker.wake_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
