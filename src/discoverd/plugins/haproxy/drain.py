"""Draining removed servers: no new requests at once, freed when idle or after their period.

A server whose instance left the registry is put in ``drain`` by the apply that removes it (no new
connection or request goes to it; established ones continue). A background thread of the proxy
object then watches its sessions (``show stat``) and frees it -- ``maint``, then ``del server`` --
as soon as it has none, or when its drain period is over, after cutting the sessions left
(``shutdown sessions server``).

HAProxy 2.6 does not end an HTTP stream that waits for its server's answer on ``shutdown
sessions`` (nor on ``shutdown session``): such a request ends when the server answers or closes
the connection (its container exits), or at ``timeout server``. The server stays in maintenance
meanwhile, and is deleted once it has nothing left.

The thread runs only while something drains, holds the proxy's lock only for a few socket round
trips at a time, and is stopped by ``close()``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from discoverd import Service
from discoverd.plugins.haproxy.config import MAX_DRAIN
from discoverd.plugins.haproxy.sockets import (
    CommandError,
    admin,
    cli,
    server_ids,
    sessions,
)

log = logging.getLogger(__name__)

#: Instance metadata key holding the drain period of an instance (label SERVICE_DRAIN=10s).
DRAIN_KEY = "drain"


def drain_seconds(value: str) -> float | None:
    """A drain period from instance metadata ("10", "2.5"; "10s" and "500ms" are accepted too),
    or ``None`` if it is not a number of seconds from 0 to ``MAX_DRAIN``."""
    text = value.strip().lower()
    scale = 1.0
    if text.endswith("ms"):
        text, scale = text[:-2], 0.001
    try:
        seconds = float(text.removesuffix("s")) * scale
    except ValueError:
        return None
    return seconds if 0 <= seconds <= MAX_DRAIN else None


class DrainPeriods:
    """The drain periods instances ask for (metadata ``drain``), by (backend, server); an
    instance without one drains for ``default`` (the ``drain_timeout`` option). A value that
    is not a number of seconds is warned about once per instance."""

    def __init__(self, default: float) -> None:
        self.default = default
        self._warned: set[tuple[str, str]] = set()

    def of(self, services: Sequence[Service]) -> dict[tuple[str, str], float]:
        periods: dict[tuple[str, str], float] = {}
        for service in services:
            for instance in service.instances:
                if not instance.meta:
                    continue
                value = dict(instance.meta).get(DRAIN_KEY)
                if value is None:
                    continue
                seconds = drain_seconds(value)
                key = (service.name, instance.id)
                if seconds is not None:
                    periods[key] = seconds
                elif key not in self._warned:
                    self._warned.add(key)
                    log.warning(
                        "haproxy: instance %s of %s has drain=%r, not a number of seconds; "
                        "using drain_timeout (%gs)",
                        instance.id,
                        service.name,
                        value[:40],
                        self.default,
                    )
        return periods


@dataclass
class Drain:
    """One server being drained."""

    backend: str
    server: str
    address: str
    port: int
    args: str
    deadline: float  # monotonic time at which the remaining sessions are cut
    freeing: bool = False  # in maint, waiting for ``del server`` to succeed

    @property
    def key(self) -> tuple[str, str]:
        return (self.backend, self.server)

    @property
    def path(self) -> str:
        return f"{self.backend}/{self.server}"


class Drainer:
    """The drains of one HAProxy, and the thread that finishes them."""

    #: Seconds between two looks at the sessions of draining servers.
    poll_interval = 0.1
    #: Seconds after its deadline a server that HAProxy refuses to delete is left in maint.
    give_up_after = 120.0

    def __init__(self, admin_socket: Path, lock: threading.RLock, timeout: float = 2.0) -> None:
        self.admin_socket = admin_socket
        self.lock = lock
        self.timeout = timeout
        self._drains: dict[tuple[str, str], Drain] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Servers freed by this drainer (for tests and logs).
        self.freed = 0

    # -- called with the lock held, by the proxy's apply -----------------------------------------

    def add(self, drain: Drain) -> None:
        self._drains[drain.key] = drain
        self._ensure_thread()
        self._wake.set()

    def take(self, backend: str, server: str) -> Drain | None:
        """Forget and return the drain of a server that comes back, if it drains."""
        return self._drains.pop((backend, server), None)

    def clear(self) -> None:
        """Forget every drain (after a reload or a start: the new worker has none of them)."""
        self._drains.clear()

    def pending(self) -> list[Drain]:
        with self.lock:
            return list(self._drains.values())

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self._thread = None

    # -- the thread -----------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._stop.is_set() or (self._thread is not None and self._thread.is_alive()):
            return
        self._thread = threading.Thread(target=self._run, name="haproxy-drain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                busy = bool(self._drains)
                if busy:
                    try:
                        self.tick(time.monotonic())
                    except Exception:  # never let the thread die: log, try again later
                        log.exception("haproxy: draining servers failed; trying again")
            if busy:
                self._stop.wait(self.poll_interval)
            else:
                self._wake.wait(1.0)
                self._wake.clear()

    def tick(self, now: float) -> None:
        """One look at every drain (the lock must be held)."""
        by_backend: dict[str, list[Drain]] = {}
        for drain in list(self._drains.values()):
            by_backend.setdefault(drain.backend, []).append(drain)
        for backend, drains in by_backend.items():
            try:
                counts = self._sessions(backend)
            except (OSError, CommandError) as exc:
                log.debug("haproxy: cannot read the sessions of backend %s: %s", backend, exc)
                continue
            for drain in drains:
                self._advance(drain, counts, now)

    def _sessions(self, backend: str) -> dict[str, int | None]:
        """Sessions of each server of ``backend``; a server that does not exist maps to None."""
        ids = server_ids(cli(self.admin_socket, f"show servers state {backend}", self.timeout))
        if not ids:
            return {}
        backend_id = next(iter(ids.values()))[0]
        counts = sessions(cli(self.admin_socket, f"show stat {backend_id} 4 -1", self.timeout))
        return {name: counts.get(name, 0) for name in ids}

    def _advance(self, drain: Drain, counts: dict[str, int | None], now: float) -> None:
        if drain.server not in counts:
            self._drains.pop(drain.key, None)  # gone already (deleted by someone else)
            return
        try:
            if not drain.freeing:
                left = counts[drain.server] or 0
                if left and now < drain.deadline:
                    return
                if left:
                    log.info(
                        "haproxy: drain period of %s is over; cutting its %d session(s)",
                        drain.path,
                        left,
                    )
                    admin(self.admin_socket, f"shutdown sessions server {drain.path}")
                admin(self.admin_socket, f"set server {drain.path} state maint")
                drain.freeing = True
            answer = _try_delete(self.admin_socket, drain.path)
        except (OSError, CommandError) as exc:
            log.debug("haproxy: draining %s: %s", drain.path, exc)
            return
        if answer:
            self._drains.pop(drain.key, None)
            self.freed += 1
            log.info("haproxy: server %s drained and removed", drain.path)
        elif now > drain.deadline + self.give_up_after:
            self._drains.pop(drain.key, None)
            log.warning(
                "haproxy: HAProxy still refuses to delete %s; it stays in maintenance until "
                "the next reload",
                drain.path,
            )


def _try_delete(path: Path, server: str) -> bool:
    """``del server``; False while HAProxy refuses (connections still closing)."""
    try:
        admin(path, f"del server {server}", expect="Server deleted")
    except CommandError as exc:
        if "No such server" in str(exc):
            return True
        log.debug("haproxy: %s", exc)
        return False
    return True
