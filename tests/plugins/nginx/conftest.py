"""Fixtures for the nginx plugin's tests: name-answering HTTP backends (with a slow path), TCP
echo backends, and proxies whose nginx is always stopped at teardown."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from discoverd import HostInfo, PluginContext, Service, ServiceInstance, build_config
from discoverd.plugins.nginx import make_proxy
from discoverd.plugins.nginx.config import NginxConfig
from discoverd.plugins.nginx.processes import holding, masters_of
from discoverd.plugins.nginx.proxy import NginxProxy
from discoverd.proxykit import pid_alive
from tests.conftest import service_unavailable
from tests.support.services import ServiceUnavailable, free_port, require_binary


class NameServer:
    """A small HTTP server on 127.0.0.1 answering ``I am <name>``; ``/slow?<seconds>`` answers
    after that long (and sets ``slow_started`` when such a request arrives)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.slow_started = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                if self.path.startswith("/slow?"):
                    owner.slow_started.set()
                    time.sleep(float(self.path.partition("?")[2]))
                body = f"I am {owner.name}\n".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def instance(self, service: str, frontend_port: int) -> ServiceInstance:
        return ServiceInstance(
            service=service,
            id=f"host1:{self.name}:8000:tcp",
            address="127.0.0.1",
            port=self.port,
            frontend_port=frontend_port,
            host_id="host1",
        )

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class EchoServer:
    """A TCP server on 127.0.0.1 that answers every chunk with ``<name>:<chunk>``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            with contextlib.suppress(OSError):
                while chunk := conn.recv(4096):
                    conn.sendall(self.name.encode() + b":" + chunk)

    def instance(self, service: str, frontend_port: int) -> ServiceInstance:
        return ServiceInstance(
            service=service,
            id=f"host1:{self.name}:9000:tcp",
            address="127.0.0.1",
            port=self.port,
            frontend_port=frontend_port,
            host_id="host1",
        )

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def backends() -> Iterator[Callable[[str], NameServer]]:
    """``backends("a")`` starts an HTTP backend answering ``I am a``; all stop at teardown."""
    started: list[NameServer] = []

    def start(name: str) -> NameServer:
        server = NameServer(name)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def echoes() -> Iterator[Callable[[str], EchoServer]]:
    """``echoes("a")`` starts a TCP echo backend; all stop at teardown."""
    started: list[EchoServer] = []

    def start(name: str) -> EchoServer:
        server = EchoServer(name)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def nginx_context(state_dir: Path, **options: Any) -> PluginContext[NginxConfig]:
    """What discoverd hands the factory: ``options`` checked into an ``NginxConfig`` (a bad
    value raises ``ConfigError``, as the core's own check does)."""
    return PluginContext(
        config=build_config(NginxConfig, options, section="nginx"),
        host=HostInfo(ip="127.0.0.1", id="host1"),
        state_dir=state_dir,
    )


def http_service(
    name: str, port: int, *servers: NameServer | EchoServer, mode: str = "http"
) -> Service:
    return Service(
        name=name,
        frontend_port=port,
        mode="http" if mode == "http" else "tcp",
        instances=tuple(s.instance(name, port) for s in servers),
    )


@pytest.fixture(scope="session")
def nginx_binary() -> str:
    """Path of the nginx executable (skipped or failed loudly when missing)."""
    try:
        return require_binary("nginx")
    except ServiceUnavailable as exc:
        service_unavailable(str(exc))


@pytest.fixture
def state_root() -> Iterator[Path]:
    """A state directory, mode 0755 as discoverd makes it for root (nginx's workers run as
    nobody and must reach their temp folders), removed at teardown."""
    root = Path(tempfile.mkdtemp(prefix="dn-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def kill_strays(proxy: NginxProxy) -> None:
    """Kill every nginx process of this proxy's directory that may still run."""
    pids = set(masters_of(proxy.config_file)) | holding(proxy.error_log)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def make_nginx(nginx_binary: str, state_root: Path) -> Iterator[Callable[..., NginxProxy]]:
    """``make_nginx(**options)`` builds a proxy on ``state_root`` (status page on a free port,
    no reload interval, unless given). Every nginx started there is stopped at teardown."""
    made: list[NginxProxy] = []

    def build(state_dir: Path | None = None, **options: Any) -> NginxProxy:
        options.setdefault("binary", nginx_binary)
        options.setdefault("bind", "127.0.0.1")
        options.setdefault("status_port", free_port())
        options.setdefault("reload_interval", 0.0)
        options.setdefault("worker_processes", "1")
        proxy = make_proxy(nginx_context(state_dir or state_root, **options))
        assert isinstance(proxy, NginxProxy)
        made.append(proxy)
        return proxy

    yield build
    for proxy in made:
        try:
            proxy.stop_process(timeout=5.0)
        finally:
            kill_strays(proxy)
