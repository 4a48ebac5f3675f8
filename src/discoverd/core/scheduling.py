"""When the loops act: coalescing wake-ups into batches, and backing off after errors."""

from __future__ import annotations

import random as _random
import threading
import time
from collections.abc import Callable, Collection


class Waker:
    """Coalesces wake-ups: ``notify`` from any thread, ``wait`` in the loop that acts.

    A batch is ready after ``min_wait`` seconds without a new event, and at most ``max_wait``
    after its first event. The first event after a calm period (``calm`` seconds without events
    or passes that acted on events) is acted on at once: a lone change (a container starting)
    is not delayed, and the events that follow it in a burst are batched into the next pass. A
    pass that only a timer asked for (``retry_in``: a resync, a write put off) ends no calm
    period: it says nothing about a burst, and the next lone change is not held for it.
    """

    def __init__(self, min_wait: float, max_wait: float, calm: float = 0.1) -> None:
        self.min_wait = min_wait
        self.max_wait = max_wait
        self.calm = calm
        self._cond = threading.Condition()
        self._first: float | None = None
        self._last = 0.0
        self._leading = False
        self._quiet_since = -float("inf")  # the last event, or pass that acted on events
        self._due: float | None = None  # a retry scheduled for later
        self._due_reason = ""
        self._reasons: list[str] = []
        #: When the first event of the batch :meth:`wait` returned last came (``None``: a
        #: scheduled pass without events), on the ``time.monotonic()`` clock.
        self.batch_first: float | None = None

    def notify(self, reason: str, services: Collection[str] | None = None) -> None:
        """Something may have changed (``services`` is accepted, so the waker can be handed
        to a watch as its ``Notify``, and ignored)."""
        with self._cond:
            now = time.monotonic()
            if self._first is None:
                self._first = now
                self._leading = self.calm > 0 and now - self._quiet_since >= self.calm
            self._last = now
            self._quiet_since = now
            if len(self._reasons) < 20:
                self._reasons.append(reason)
            self._cond.notify_all()

    def retry_in(self, delay: float, reason: str = "retry") -> None:
        with self._cond:
            due = time.monotonic() + delay
            if self._due is None or due < self._due:
                self._due = due
                self._due_reason = reason
            self._cond.notify_all()

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, stop: threading.Event) -> list[str] | None:
        """Block until a batch is ready; return its reasons, or ``None`` once ``stop`` is set."""
        with self._cond:
            while not stop.is_set():
                now = time.monotonic()
                if self._first is not None:
                    ready_at = min(self._last + self.min_wait, self._first + self.max_wait)
                    if self._leading:
                        ready_at = self._first
                    if now >= ready_at:
                        return self._take()
                    self._cond.wait(ready_at - now)
                    continue
                if self._due is not None:
                    if now >= self._due:
                        self._reasons.append(self._due_reason)
                        return self._take()
                    self._cond.wait(self._due - now)
                    continue
                self._cond.wait(1.0)
            return None

    def _take(self) -> list[str]:
        reasons, self._reasons = self._reasons, []
        if self._first is not None:  # a timer's pass alone leaves the calm period as it was
            self._quiet_since = time.monotonic()
        self.batch_first, self._first = self._first, None
        self._due = None
        self._leading = False
        return reasons


class Backoff:
    """Exponential backoff with jitter: a delay drawn between half of and the whole of 0.1 s,
    0.2 s, 0.4 s, ... up to ``maximum``; ``reset`` after a success.

    The jitter spreads the retries of many agents that failed together (a registry that was
    overloaded or away answers every host at once, and the same schedule would bring them back
    at the same moments); no retry comes later than it would without it."""

    def __init__(
        self,
        maximum: float,
        initial: float = 0.1,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial
        self._random = random

    def next(self) -> float:
        ceiling = self._next
        self._next = min(self._next * 2, self.maximum)
        return ceiling * (1 - self._random() / 2)

    def reset(self) -> None:
        self._next = self.initial
