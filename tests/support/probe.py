"""Client loops that count failed requests through a proxy frontend.

Used by the benchmarks (``bench/``) and the fault suite (``tests/faults/``). Every request is a
GET on a *fresh* connection (``Connection: close``), as a client that does not pool would send
it: a frontend that stops listening for a moment, a backend that accepts and then drops a
connection, a reload that pauses the listeners -- each shows up as a failed request, recorded
with the moment it ended and the reason.

A backend answers ``I am <container hostname>`` (the whoami of :mod:`tests.support.services`);
anything else (another status, another body) is a failure too.
"""

from __future__ import annotations

import collections
import http.client
import math
import threading
import time
from collections.abc import Sequence

__all__ = ["Prober", "ask", "ask_why"]


def ask(port: int, timeout: float = 2.0, host: str = "127.0.0.1") -> str | None:
    """One GET on a fresh connection to ``host:port``; the answering host or ``None``."""
    return ask_why(port, timeout, host)[0]


def ask_why(port: int, timeout: float = 2.0, host: str = "127.0.0.1") -> tuple[str | None, str]:
    """Like :func:`ask`, with the reason of a failure (``""`` on success)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
        if response.status != 200 or not body.startswith("I am "):
            return None, f"HTTP {response.status}"
        return body[5:].strip(), ""
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:120]
    finally:
        conn.close()


class Prober:
    """A client loop in a thread: fresh connections one after another, who answered when.

    ``results`` holds ``(moment, who)`` for every request (``who`` is ``None`` for a failure;
    moments are ``time.monotonic()`` when the request ended), ``reasons`` holds ``(moment,
    reason)`` for every failed one. With ``interval`` the loop starts a request at most every
    ``interval`` seconds (a steady client instead of a flood: the machine is shared).
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        interval: float = 0.0,
        timeout: float = 2.0,
        name: str = "",
    ) -> None:
        self.port = port
        self.host = host
        self.interval = interval
        self.timeout = timeout
        self.name = name or f"{host}:{port}"
        self.results: list[tuple[float, str | None]] = []
        self.reasons: list[tuple[float, str]] = []  # why each failed request failed
        self.started: float | None = None
        self.stopped: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"prober {self.name}", daemon=True)

    def __enter__(self) -> Prober:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Prober:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            who, why = ask_why(self.port, self.timeout, self.host)
            moment = time.monotonic()
            self.results.append((moment, who))
            if who is None:
                self.reasons.append((moment, why))
            if self.interval > 0:
                self._stop.wait(self.interval - (moment - began))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout + 10)
        if self.stopped is None:
            self.stopped = time.monotonic()

    def why(self, since: float = 0.0) -> dict[str, int]:
        """The reasons of the failures since ``since``, counted."""
        return dict(
            collections.Counter(why for moment, why in list(self.reasons) if moment >= since)
        )

    def failures(self, since: float = 0.0, until: float = math.inf) -> int:
        return sum(
            1 for moment, who in list(self.results) if who is None and since <= moment <= until
        )

    def total(self, since: float = 0.0, until: float = math.inf) -> int:
        return sum(1 for moment, _ in list(self.results) if since <= moment <= until)

    def answered_by(self, since: float = 0.0, until: float = math.inf) -> dict[str, int]:
        """Who answered the requests that succeeded in the window, counted."""
        return dict(
            collections.Counter(
                who
                for moment, who in list(self.results)
                if who is not None and since <= moment <= until
            )
        )

    def last_from(self, host: str) -> float | None:
        moments = [moment for moment, who in list(self.results) if who == host]
        return max(moments) if moments else None

    def first_from(self, host: str, since: float = 0.0) -> float | None:
        for moment, who in list(self.results):
            if who == host and moment >= since:
                return moment
        return None

    def describe(
        self,
        origin: float,
        marks: Sequence[tuple[float, str]] = (),
        *,
        since: float = 0.0,
        until: float = math.inf,
        limit: int = 8,
    ) -> str:
        """``name: F of N requests failed``, then when and why: each failure's moment relative
        to ``origin`` and to the latest of ``marks`` (``(moment, label)``, e.g. the fault's
        injection) before it, for the first and last ``limit // 2`` failures, and the reasons
        counted."""
        failed = [(m, why) for m, why in list(self.reasons) if since <= m <= until]
        text = f"{self.name}: {len(failed)} of {self.total(since, until)} requests failed"
        if not failed:
            return text
        span = f"t+{failed[0][0] - origin:.2f}s .. t+{failed[-1][0] - origin:.2f}s"
        counted = collections.Counter(why for _, why in failed)
        reasons = "; ".join(f"{n} x {why}" for why, n in counted.most_common(4))
        lines = [f"{text} ({span}): {reasons}"]
        shown = failed if len(failed) <= limit else failed[: limit // 2] + failed[-limit // 2 :]
        for index, (moment, why) in enumerate(shown):
            if len(failed) > limit and index == limit // 2:
                lines.append(f"    ... {len(failed) - limit} more ...")
            before = [(m, label) for m, label in marks if m <= moment]
            after = f" ({moment - before[-1][0]:.2f}s after {before[-1][1]})" if before else ""
            lines.append(f"    t+{moment - origin:.3f}s{after}: {why}")
        return "\n".join(lines)
