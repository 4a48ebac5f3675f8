"""Local instances without the detour: this host's own instances at their container address.

A port published by Docker is reached at ``HOST_IP:<published port>``; for loopback always, and
for every address on a host whose daemon runs without iptables, the connection goes through
docker-proxy, a userland forwarder that is slow under load (measured here: p90 780 ms straight
at one backend's published port, against single milliseconds at the container's own address).
The register role therefore also publishes where each TCP instance's application listens on its
own host: the metadata ``container_address`` (the container's IP and private port), set by the
source, never taken from a label (:data:`~discoverd.core.model.INTERNAL_META_KEYS`).

The discover role of that same host serves the instance there instead of its published port
(:meth:`LocalAddresses.apply`, on each pass, before the services are built), when

- the instance's ``host_id`` is this agent's own (another host's container address means
  nothing here: those keep their published port),
- the value passes :func:`~discoverd.core.model.check_container_address` (an IP literal and a
  port in canonical form; no loopback, unspecified, link-local, multicast or broadcast
  address): a value that does not is refused with a problem, and the published port is used,
- and a TCP connect from this agent's own network namespace reached it. Each address is
  verified once (non-blocking connects, all of a pass at once; a pass waits at most
  :data:`PASS_WAIT` for them and a connect counts as failed after :data:`CONNECT_TIMEOUT`);
  the verdict is kept while the address is in the registry. An address that failed is served
  at its published port and tried again after 2 s, doubling up to :data:`RETRY_MAX`; a
  reachable one is verified again every :data:`RECHECK_OK` seconds at a pass (while the
  re-check runs, the instance stays where it is), and moves back to its published port if
  that fails.

With HAProxy a move between the two addresses is a ``set server ... addr`` on the runtime API
(no reload). The core option ``local_direct`` turns all of this off.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from discoverd.core.errors import ValidationError
from discoverd.core.model import (
    CONTAINER_ADDRESS_KEY,
    Catalog,
    Problem,
    ServiceInstance,
    check_container_address,
    format_endpoint,
)

log = logging.getLogger("discoverd.local")

#: Seconds a connect may take before the address counts as unreachable.
CONNECT_TIMEOUT = 1.0
#: Longest one pass waits for the connects it started (the rest finish in later passes).
PASS_WAIT = 0.1
#: First delay before an unreachable address is tried again; doubles up to RETRY_MAX.
RETRY_FIRST = 2.0
RETRY_MAX = 60.0
#: Seconds after which a reachable address is verified again (at the next pass).
RECHECK_OK = 60.0
#: At most this many connects in flight at once (each holds a socket).
MAX_PENDING = 256

Endpoint = tuple[str, int]
Schedule = Callable[[float, str], None]


@dataclass
class _Verdict:
    """What is known of one container address."""

    reachable: bool = False  # what the last finished check found
    checked: bool = False  # a check has finished at least once
    sock: socket.socket | None = None  # the connect in flight, if any
    deadline: float = 0.0  # when the connect in flight counts as failed
    next_check: float = 0.0  # when to check again
    failures: int = 0
    reason: str = ""


class LocalAddresses:
    """The container addresses of this host's instances, and whether this host reaches them.

    Used by one discover role, from its reconcile thread only (no lock). ``schedule(delay,
    reason)`` asks for a pass later (the role's ``Waker.retry_in``): when a connect is still in
    flight after a pass, or an unreachable address is due to be tried again."""

    def __init__(
        self,
        own_host_id: str,
        *,
        schedule: Schedule | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        pass_wait: float = PASS_WAIT,
    ) -> None:
        self.own_host_id = own_host_id
        self._schedule = schedule
        self.connect_timeout = connect_timeout
        self.pass_wait = pass_wait
        self._verdicts: dict[Endpoint, _Verdict] = {}
        # Each value seen, parsed: the address, or why it is refused (the problem's text).
        self._parsed: dict[str, Endpoint | str] = {}
        # The instance served in place of each local instance seen at the last pass, so an
        # unchanged one is the very same object pass after pass (cheap to compare downstream).
        self._swapped: dict[ServiceInstance, ServiceInstance] = {}

    # -- the pass ---------------------------------------------------------------------------

    def apply(self, catalog: Catalog, *, wait: float | None = None) -> Catalog:
        """``catalog`` with this host's instances at their container address where it is
        reachable, and a problem for each refused container address. ``wait``: the longest
        this call waits for connects in flight (default ``pass_wait``)."""
        if not self.own_host_id:
            return catalog
        local: list[tuple[ServiceInstance, Endpoint]] = []
        problems: list[Problem] = []
        for instance in catalog.instances:
            if instance.host_id != self.own_host_id or not instance.meta:
                continue
            endpoint = self._endpoint(instance, problems)
            if endpoint is not None:
                local.append((instance, endpoint))
        if not local and not self._verdicts:
            if problems:
                return dataclasses.replace(catalog, problems=(*catalog.problems, *problems))
            return catalog
        self._check({endpoint for _, endpoint in local}, self.pass_wait if wait is None else wait)
        swapped: dict[ServiceInstance, ServiceInstance] = {}
        # By identity: hashing every instance of a large registry would cost more than this.
        by_object: dict[int, ServiceInstance] = {}
        for instance, endpoint in local:
            verdict = self._verdicts.get(endpoint)
            if verdict is None or not verdict.reachable:
                continue
            moved = self._swapped.get(instance)
            if moved is None or (moved.address, moved.port) != endpoint:
                moved = dataclasses.replace(instance, address=endpoint[0], port=endpoint[1])
            swapped[instance] = by_object[id(instance)] = moved
        self._swapped = swapped
        if not swapped and not problems:
            return catalog
        instances = tuple(by_object.get(id(i), i) for i in catalog.instances)
        return dataclasses.replace(
            catalog, instances=instances, problems=(*catalog.problems, *problems)
        )

    def _endpoint(self, instance: ServiceInstance, problems: list[Problem]) -> Endpoint | None:
        raw = next((v for k, v in instance.meta if k == CONTAINER_ADDRESS_KEY), None)
        if raw is None:
            return None
        parsed = self._parsed.get(raw)
        if parsed is None:
            if len(self._parsed) > 100_000:
                self._parsed.clear()
            try:
                parsed = check_container_address(raw)
            except ValidationError as exc:
                parsed = str(exc)
            self._parsed[raw] = parsed
        if not isinstance(parsed, str):
            return parsed
        problems.append(
            Problem(
                f"instance {instance.id} of {instance.service}",
                f"metadata {CONTAINER_ADDRESS_KEY} refused: {parsed}; served at its "
                f"published address {instance.endpoint}",
                instance.service,
            )
        )
        return None

    # -- reachability -----------------------------------------------------------------------

    def _check(self, wanted: set[Endpoint], wait: float) -> None:
        """Start the checks that are due for ``wanted``, wait up to ``wait`` for those in
        flight, forget the addresses no longer wanted, and schedule the next look."""
        for endpoint in [e for e in self._verdicts if e not in wanted]:
            self._close(self._verdicts.pop(endpoint))
        now = time.monotonic()
        due = sorted(
            e
            for e in wanted
            if (verdict := self._verdicts.get(e)) is None
            or (verdict.sock is None and verdict.next_check <= now)
        )
        in_flight = sum(1 for v in self._verdicts.values() if v.sock is not None)
        for endpoint in due[: max(0, MAX_PENDING - in_flight)]:
            self._start(endpoint, now)
        self._poll(time.monotonic() + max(0.0, wait))
        self._plan(more=len(due) > MAX_PENDING - in_flight)

    def _start(self, endpoint: Endpoint, now: float) -> None:
        verdict = self._verdicts.setdefault(endpoint, _Verdict())
        address, port = endpoint
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # out of descriptors: try again later
            self._finish(endpoint, verdict, f"no socket: {exc.strerror or exc}", now)
            return
        sock.setblocking(False)
        code = sock.connect_ex((address, port))
        if code in (0, errno.EINPROGRESS, errno.EAGAIN):
            verdict.sock = sock
            verdict.deadline = now + self.connect_timeout
            if code == 0:
                self._settle(endpoint, verdict, sock, now)
            return
        sock.close()
        self._finish(endpoint, verdict, os.strerror(code), now)

    def _poll(self, until: float) -> None:
        """Collect the connects that finished, waiting until ``until`` at most while some are
        in flight; a connect past its deadline has failed."""
        while True:
            now = time.monotonic()
            flying = {e: v for e, v in self._verdicts.items() if v.sock is not None}
            for endpoint, verdict in list(flying.items()):
                if now >= verdict.deadline:
                    self._close(verdict)
                    late = f"no connection within {self.connect_timeout:g}s"
                    self._finish(endpoint, verdict, late, now)
                    del flying[endpoint]
            if not flying:
                return
            timeout = min(until, *(v.deadline for v in flying.values())) - now
            with selectors.DefaultSelector() as selector:
                for endpoint, verdict in flying.items():
                    assert verdict.sock is not None
                    selector.register(verdict.sock, selectors.EVENT_WRITE, endpoint)
                ready = selector.select(max(0.0, timeout))
            now = time.monotonic()
            for key, _ in ready:
                endpoint = key.data
                verdict = self._verdicts[endpoint]
                if verdict.sock is not None:
                    self._settle(endpoint, verdict, verdict.sock, now)
            if now >= until:
                return

    def _settle(
        self, endpoint: Endpoint, verdict: _Verdict, sock: socket.socket, now: float
    ) -> None:
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._close(verdict)
        self._finish(endpoint, verdict, os.strerror(code) if code else "", now)

    def _finish(self, endpoint: Endpoint, verdict: _Verdict, reason: str, now: float) -> None:
        """Record a finished check: ``reason`` empty when the address answered."""
        shown = format_endpoint(*endpoint)
        first = not verdict.checked
        was = verdict.reachable
        verdict.checked = True
        verdict.reason = reason
        if not reason:
            verdict.reachable = True
            verdict.failures = 0
            verdict.next_check = now + RECHECK_OK
            if first or not was:
                log.debug("local: container address %s reachable from this host", shown)
            return
        verdict.reachable = False
        verdict.failures += 1
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (verdict.failures - 1))
        verdict.next_check = now + delay
        if first or was:
            log.info(
                "local: container address %s not reachable from this host (%s); its instance "
                "is served at its published port, tried again in %gs",
                shown,
                reason,
                delay,
            )

    def _plan(self, *, more: bool) -> None:
        """Ask for a pass when a connect in flight ends or a failed address is due."""
        if self._schedule is None:
            return
        now = time.monotonic()
        times = [
            v.deadline if v.sock is not None else v.next_check
            for v in self._verdicts.values()
            if v.sock is not None or not v.reachable
        ]
        if more:
            times.append(now)
        if times:
            self._schedule(max(0.01, min(times) - now), "container address check")

    @staticmethod
    def _close(verdict: _Verdict) -> None:
        if verdict.sock is not None:
            verdict.sock.close()
            verdict.sock = None

    # -- for tests, explain and shutdown ------------------------------------------------------

    def verdicts(self) -> dict[Endpoint, bool | None]:
        """Each container address known: reachable (True), not (False), not checked yet
        (None)."""
        return {e: (v.reachable if v.checked else None) for e, v in self._verdicts.items()}

    def forget(self, endpoints: Iterable[Endpoint] | None = None) -> None:
        """Verify these addresses (all with ``None``) again at the next pass."""
        for endpoint in list(self._verdicts if endpoints is None else endpoints):
            verdict = self._verdicts.pop(endpoint, None)
            if verdict is not None:
                self._close(verdict)

    def close(self) -> None:
        self.forget()


def local_catalog(catalog: Catalog, own_host_id: str, *, wait: float = CONNECT_TIMEOUT) -> Catalog:
    """One-shot :meth:`LocalAddresses.apply` (``discoverd render``, ``plan``, ``explain``):
    what the discover role of ``own_host_id`` would serve, waiting up to ``wait`` for the
    connects."""
    local = LocalAddresses(own_host_id, pass_wait=wait)
    try:
        return local.apply(catalog)
    finally:
        local.close()
