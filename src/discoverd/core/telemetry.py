"""What the roles count and time, cheaply, for the logs, the tests, ``/healthz`` and ``/metrics``.

Everything here is plain Python with no dependency: the loops record into it whether or not an
endpoint is on. :mod:`discoverd.core.endpoint` (imported only when the listener is on) turns it
into Prometheus text with ``prometheus-client`` at scrape time.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: Bucket bounds (seconds) of the duration histograms: from a runtime API change (~1 ms) to a
#: slow reload (seconds).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


@dataclass
class Counters:
    """Counts of what happened, optionally by label (``inc("applies", outcome="runtime")``).

    ``counters["applies"]`` is the total over every label; :meth:`by_label` the detail."""

    values: dict[str, int] = field(default_factory=dict)
    labeled: dict[tuple[str, Labels], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def inc(self, name: str, by: int = 1, **labels: str) -> None:
        with self._lock:
            self.values[name] = self.values.get(name, 0) + by
            key = (name, _labels(labels))
            self.labeled[key] = self.labeled.get(key, 0) + by

    def __getitem__(self, name: str) -> int:
        return self.values.get(name, 0)

    def by_label(self, name: str) -> dict[Labels, int]:
        with self._lock:
            return {labels: n for (each, labels), n in self.labeled.items() if each == name}

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.values)


class Histogram:
    """Observations in fixed buckets (cumulative counts are computed when read)."""

    def __init__(self, buckets: Iterable[float] = DURATION_BUCKETS) -> None:
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """``([(upper bound, cumulative count), ...], sum, count)``; the last bound is +inf."""
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        cumulative: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return cumulative, total, running


@dataclass
class Contact:
    """When a role last reached its backing service (the registry, the source), and the last
    error it met since (empty once it succeeds again)."""

    last_ok: float | None = None  # time.monotonic()
    error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def ok(self) -> None:
        with self._lock:
            self.last_ok = time.monotonic()
            self.error = ""

    def failed(self, error: str) -> None:
        with self._lock:
            self.error = error

    def age(self) -> float | None:
        """Seconds since the last success (``None``: never)."""
        last = self.last_ok
        return None if last is None else time.monotonic() - last


def now_ms() -> str:
    """``time.monotonic()`` in milliseconds, as debug lines print it (``t=``): the clock is
    the machine's, so a benchmark in another process can line its own moments up with them."""
    return f"{time.monotonic() * 1000:.1f}"


class Stages:
    """Where the time of one pass goes, for a debug line: ``mark(name)`` ends the stage
    ``name`` (from the previous mark, or the start); :meth:`line` lists them, each with the
    CPU time the calling thread spent in it (the rest is waiting: for I/O, a subprocess, the
    GIL or a core)."""

    def __init__(self) -> None:
        self.began = time.monotonic()
        self._last = self.began
        self._cpu = time.thread_time()
        #: ``(stage, seconds, CPU seconds of this thread)``, in order.
        self.parts: list[tuple[str, float, float]] = []

    def mark(self, name: str) -> None:
        now, cpu = time.monotonic(), time.thread_time()
        self.parts.append((name, now - self._last, cpu - self._cpu))
        self._last, self._cpu = now, cpu

    def line(self) -> str:
        """``read 512.3 (cpu 250.1), build 40.1 (cpu 39.8) ms; total 552.4 ms (t=<start>)``."""
        parts = ", ".join(
            f"{name} {seconds * 1000:.1f} (cpu {cpu * 1000:.1f})"
            for name, seconds, cpu in self.parts
        )
        total = (self._last - self.began) * 1000
        return f"{parts} ms; total {total:.1f} ms (t={self.began * 1000:.1f})"
