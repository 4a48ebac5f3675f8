"""What the contracts share: the fixtures' protocols, and helpers for the checks and fixtures.

The helpers -- :func:`poll_until`, :func:`fresh_port`, :class:`HttpBackend`, and the small
service helpers :func:`free_port`, :func:`http_get`, :func:`require_binary` with
:class:`ServiceUnavailable` -- are also used by the pytest plugin's fixtures, and discoverd's own
test launchers reuse them. They need nothing but the standard library and pytest.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn, Protocol

import pytest

from discoverd import HostInfo, Proxy, Registry, ServiceInstance

# --------------------------------------------------------------------------------------------
# What a subclass provides


class RegistryServer(Protocol):
    """The real registry server of a :class:`RegistryContract` run."""

    def stop(self) -> None:
        """Make the server unreachable (kill it); its data stays for :meth:`start`."""

    def start(self) -> None:
        """Start it again on the same address, with its data; return once it answers."""

    def restart(self) -> None:
        """Stop it and start it again on the same address with *no* data (all state lost)."""


class RegistryFactory(Protocol):
    """``make_registry(host=..., ttl=...)``: a new registry object of the plugin."""

    def __call__(self, *, host: HostInfo, ttl: int) -> Registry: ...


#: ``write_bad_entry(service)``: write malformed entries of ``service`` behind the plugin's back.
BadEntryWriter = Callable[[str], None]

#: ``make_proxy()``: a new proxy object managing the one real proxy of the test.
ProxyFactory = Callable[[], Proxy]


class ProxyProbe(Protocol):
    """Reads the real proxy's own state (optionally also ``running_config() -> str``)."""

    def reload_count(self) -> int:
        """How many times the running proxy has reloaded (may raise when none runs)."""


def _missing(contract: str, fixture: str, what: str) -> NoReturn:
    pytest.fail(
        f"{contract} needs a `{fixture}` fixture: {what}. Define it in your subclass "
        f"(see the docstring of discoverd.testing.conformance).",
        pytrace=False,
    )


# --------------------------------------------------------------------------------------------
# Real services: ports, binaries, HTTP

_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class ServiceUnavailable(RuntimeError):
    """A binary a test needs is missing, or a service did not come up."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now.

    The port is drawn below the kernel's ephemeral range when there is room, so that neither an
    outgoing connection nor a port Docker publishes at random takes it before the caller binds it.
    """
    low = _ephemeral_port_floor()
    rng = random.SystemRandom()
    if low > 11000:
        for _ in range(50):
            port = rng.randrange(10000, low)
            if _port_is_free(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_port_floor() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def require_binary(name: str) -> str:
    """Return the path of the executable ``name``, or raise :class:`ServiceUnavailable`.

    Looks on ``PATH`` and then in the sbin directories, which a non-login ``PATH`` may lack
    (``dockerd``, ``haproxy`` and ``ip`` live there on Debian).
    """
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))
    if found is None:
        raise ServiceUnavailable(
            f"{name!r} is not installed (not on PATH nor in {', '.join(_SBIN_DIRS)})"
        )
    return found


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 2.0) -> str:
    """GET ``url`` (never through an HTTP proxy) and return the body as text.

    Raises :class:`urllib.error.URLError` (``HTTPError`` for a non-2xx status) or ``OSError``.
    """
    with _NO_PROXY_OPENER.open(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# Helpers (also used by the pytest plugin's fixtures)


def poll_until(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> Any:
    """Call ``check`` until it returns something true (returned) or ``timeout`` passes.

    An exception from ``check`` counts as "not yet". On timeout, fail the test naming ``what``
    and the last exception or value seen. A deadline, not a timing assertion.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            pytest.fail(f"after {timeout:g}s still waiting for {what} (last: {last!r})")
        time.sleep(interval)


_PORTS_TAKEN: set[int] = set()


def fresh_port(avoid: Iterable[int] = ()) -> int:
    """A free TCP port on 127.0.0.1 not handed out before in this process nor in ``avoid``."""
    blocked = set(avoid)
    for _ in range(200):
        port = free_port()
        if port not in _PORTS_TAKEN and port not in blocked:
            _PORTS_TAKEN.add(port)
            return port
    raise RuntimeError("no free port found")


class HttpBackend:
    """A tiny HTTP server on 127.0.0.1 answering ``I am <name>`` to every GET; :meth:`stop` it."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        body = f"I am {name}\n".encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # health checks connect every second; keep the test output clean

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},  # shutdown() waits up to one interval
            name=f"backend-{name}",
            daemon=True,
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"HttpBackend({self.name!r}, port={self.port})"

    def instance(
        self,
        service: str,
        frontend_port: int,
        *,
        host_id: str = "kit",
        meta: Iterable[tuple[str, str]] = (),
    ) -> ServiceInstance:
        """This backend as an instance of ``service`` (id ``<host_id>:<name>:8000:tcp``)."""
        return ServiceInstance(
            service=service,
            id=f"{host_id}:{self.name}:8000:tcp",
            address="127.0.0.1",
            port=self.port,
            frontend_port=frontend_port,
            meta=tuple(meta),
            host_id=host_id,
        )

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Backends:
    """Backends of one test, all stopped by :meth:`stop_all`."""

    def __init__(self) -> None:
        self.started: list[HttpBackend] = []

    def __call__(self, name: str) -> HttpBackend:
        backend = HttpBackend(name)
        self.started.append(backend)
        return backend

    def stop_all(self) -> None:
        for backend in self.started:
            with contextlib.suppress(Exception):
                backend.stop()
        self.started.clear()


@contextlib.contextmanager
def _backends() -> Iterator[_Backends]:
    pool = _Backends()
    try:
        yield pool
    finally:
        pool.stop_all()
