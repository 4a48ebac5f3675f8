"""Keep-alive clients through HAProxy while keep-alive backends come and go: no request fails.

The backends speak HTTP/1.1 with persistent connections, so HAProxy keeps idle connections to
them and reuses them. A backend that stops closes every idle connection at once with a reset (as
a process that exits does) while the requests it is serving still get their answers, and the
proxy only learns of it afterwards (``docker stop`` signals the container before the register
role sees the ``kill`` event). A request HAProxy sends on such a connection must be replayed on
another server, not fail.

(An answer cut in the middle, once HAProxy has passed its headers on, cannot be replayed by any
proxy: a backend that dies while writing an answer costs that request. See docs/haproxy.md.)
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from discoverd import Service, ServiceInstance
from discoverd.plugins.haproxy.proxy import HAProxy
from discoverd.plugins.haproxy.sockets import master_reload_count
from tests.support.services import free_port, wait_for

MakeHAProxy = Callable[..., HAProxy]


class KeepAliveBackend:
    """An HTTP/1.1 server on 127.0.0.1 answering ``I am <name>``, keeping connections open.

    :meth:`stop` stops listening and resets every connection that is not in the middle of an
    answer; an answer being written is finished, then its connection is reset too.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.idle: set[socket.socket] = set()
        self.stopped = False
        body = f"I am {name}\n".encode()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def setup(self) -> None:
                super().setup()
                with owner.lock:
                    owner.idle.add(self.connection)

            def handle_one_request(self) -> None:
                with owner.lock:
                    if owner.stopped:
                        self.close_connection = True
                        return
                super().handle_one_request()

            def do_GET(self) -> None:
                with owner.lock:
                    owner.idle.discard(self.connection)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                with owner.lock:
                    if owner.stopped:
                        _reset(self.connection)
                        self.close_connection = True
                    else:
                        owner.idle.add(self.connection)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # connections reset on purpose

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def instance(self, port: int) -> ServiceInstance:
        return ServiceInstance(
            service="web",
            id=f"host1:{self.name}:8000:tcp",
            address="127.0.0.1",
            port=self.port,
            frontend_port=port,
            host_id="host1",
        )

    def stop(self) -> None:
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            idle, self.idle = self.idle, set()
        self.server.shutdown()
        self.server.server_close()
        for connection in idle:
            _reset(connection)


def _reset(connection: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as the kernel does for a process that is killed."""
    with contextlib.suppress(OSError):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        connection.close()


@pytest.fixture
def keepalive_backends() -> Iterator[Callable[[str], KeepAliveBackend]]:
    started: list[KeepAliveBackend] = []

    def start(name: str) -> KeepAliveBackend:
        backend = KeepAliveBackend(name)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


def push(proxy: HAProxy, port: int, live: list[KeepAliveBackend]) -> str:
    services = [Service("web", port, mode="http", instances=tuple(b.instance(port) for b in live))]
    config = proxy.render(services)
    proxy.validate(config)
    return proxy.apply(config, services)


class Client(threading.Thread):
    """A keep-alive client (like one wrk connection): GETs on one connection, a new connection
    only after a failure, which it records."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.stop = port, stop
        self.ok = 0
        self.failures: list[str] = []
        self.start()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read().decode()
                if response.status == 200 and body.startswith("I am"):
                    self.ok += 1
                else:
                    self.failures.append(f"{response.status} {body[:60]!r}")
                if response.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()


def test_keep_alive_clients_see_no_failure_while_backends_die(
    make_haproxy: MakeHAProxy, keepalive_backends: Callable[[str], KeepAliveBackend]
) -> None:
    proxy = make_haproxy(drain_timeout=5)
    port = free_port()
    live = [keepalive_backends(f"k{i}") for i in range(3)]
    assert push(proxy, port, live) == "started"
    wait_for(
        lambda: _answers(port, 12) == {f"I am {b.name}" for b in live}, 15, what="all backends"
    )
    before = master_reload_count(proxy.dir.parent)
    stop = threading.Event()
    clients = [Client(port, stop) for _ in range(6)]
    try:
        for i in range(3, 15):
            new = keepalive_backends(f"k{i}")
            live.append(new)
            assert push(proxy, port, live) == "runtime"
            time.sleep(0.15)  # traffic reaches the new one, and idle connections pile up
            gone = live.pop(0)
            gone.stop()  # the process is gone before the proxy hears of it
            time.sleep(0.03)
            assert push(proxy, port, live) == "runtime"
            time.sleep(0.15)
    finally:
        stop.set()
        for client in clients:
            client.join(30)
    # A body cut after its headers went out (IncompleteRead) is the one failure no proxy can
    # replay; this fake backend can produce it when a stop races a request it has just read.
    # Every other failure (a request sent on a connection the backend had reset, a 502) is a
    # request HAProxy should have replayed.
    failures = [f for c in clients for f in c.failures if not f.startswith("IncompleteRead")]
    ok = sum(c.ok for c in clients)
    assert ok > 100, ok
    assert failures == [], (len(failures), ok, failures[:5])
    assert master_reload_count(proxy.dir.parent) == before


def _answers(port: int, count: int) -> set[str]:
    seen = set()
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/")
            seen.add(conn.getresponse().read().decode().strip())
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
    return seen
