"""Client traffic for the proxy tests: a request loop per frontend port, counting every
request that did not get its backend's answer, and what the proxies' ``unservable`` asks of
a test (a port held by a plain Python listener; what the core does with the answer)."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Self

from discoverd import Catalog, Notify, Proxy, Registry, Service, ServiceInstance
from tests.support.services import free_port


class RequestLoop:
    """One thread per port sending ``GET /`` to ``127.0.0.1:<port>`` (a new connection each
    time, a 3 s timeout) until the loop is left; an answer that is not ``200 I am ...`` is a
    failure, kept with its reason."""

    def __init__(self, ports: Sequence[int], pause: float = 0.005) -> None:
        self.ports = list(ports)
        self.pause = pause
        self.sent = dict.fromkeys(self.ports, 0)
        self.failed: dict[int, list[str]] = {port: [] for port in self.ports}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(port,), daemon=True) for port in self.ports
        ]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _run(self, port: int) -> None:
        while not self._stop.is_set():
            error = ""
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
                try:
                    connection.request("GET", "/")
                    response = connection.getresponse()
                    body = response.read().decode(errors="replace")
                    if response.status != 200 or not body.startswith("I am "):
                        error = f"{response.status} {body[:60]!r}"
                finally:
                    connection.close()
            except (OSError, http.client.HTTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.sent[port] += 1
                if error:
                    self.failed[port].append(f"{time.monotonic():.3f} {error}")
            self._stop.wait(self.pause)

    def total(self) -> int:
        with self._lock:
            return sum(self.sent.values())

    def wait_requests(self, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` more requests were sent (all ports together)."""
        goal = self.total() + count
        deadline = time.monotonic() + timeout
        while self.total() < goal:
            assert time.monotonic() < deadline, f"fewer than {count} requests in {timeout}s"
            time.sleep(0.01)

    def report(self) -> str:
        with self._lock:
            return ", ".join(
                f"port {port}: {len(self.failed[port])} of {self.sent[port]} failed"
                + (f" (first: {self.failed[port][0]})" if self.failed[port] else "")
                for port in self.ports
            )

    def failures(self) -> int:
        with self._lock:
            return sum(len(errors) for errors in self.failed.values())


@contextlib.contextmanager
def squatter(kind: int = socket.SOCK_STREAM) -> Iterator[int]:
    """A plain Python socket of this process holding a free port of 127.0.0.1 (listening, for
    tcp); yields the port, closes it on exit."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", free_port()))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        yield int(sock.getsockname()[1])


def apply_servable(proxy: Proxy, services: Sequence[Service]) -> tuple[dict[str, str], str]:
    """One pass as the core makes it: leave out what ``unservable`` names, render, validate,
    apply. Returns what was left out (with the reasons) and the apply's result."""
    left_out = proxy.unservable(services)
    rest = [service for service in services if service.name not in left_out]
    config = proxy.render(rest)
    proxy.validate(config)
    return left_out, proxy.apply(config, rest)


def held_reason(port: int, suffix: str = "") -> str:
    """What ``unservable`` says of a port this test process holds (``suffix``: ``/udp``)."""
    with open(f"/proc/{os.getpid()}/comm") as comm:
        name = comm.read().strip()
    return f"frontend port {port}{suffix} is held by another process ({name}, pid {os.getpid()})"


class StaticRegistry(Registry):
    """A registry holding ``instances`` (the discover role only reads)."""

    def __init__(self, instances: Sequence[ServiceInstance]) -> None:
        self.instances = tuple(instances)

    def register(self, instance: ServiceInstance) -> None:
        raise AssertionError("read only")

    def deregister(self, instance: ServiceInstance) -> None:
        raise AssertionError("read only")

    def keepalive(self) -> bool:
        return True

    def snapshot(self) -> Catalog:
        return Catalog(instances=self.instances, revision=1)

    def watch(self, notify: Notify, stop: threading.Event, since: int) -> None:
        stop.wait()
