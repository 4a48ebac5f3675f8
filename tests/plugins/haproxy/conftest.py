"""Fixtures for the HAProxy plugin's tests: name-answering HTTP backends, proxies that are always
stopped at teardown, and services built from them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from discoverd import HostInfo, PluginContext, Service, ServiceInstance, build_config
from discoverd.plugins.haproxy import make_proxy
from discoverd.plugins.haproxy.config import HAProxyConfig
from discoverd.plugins.haproxy.proxy import HAProxy
from discoverd.plugins.haproxy.sockets import show_proc
from discoverd.proxykit import pid_alive, read_pid


class NameServer:
    """A tiny HTTP server on 127.0.0.1 answering ``I am <name>`` to every GET.

    ``GET /sleep/<seconds>`` answers after that long (``slow`` is set while one waits). With
    ``keep_alive`` it speaks HTTP/1.1 and keeps connections open between requests.
    """

    def __init__(self, name: str, keep_alive: bool = False) -> None:
        self.name = name
        body = f"I am {name}\n".encode()
        self.slow = threading.Event()
        self.stopped = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"
            timeout = 30  # an idle keep-alive connection does not hold its thread forever

            def do_GET(self) -> None:
                if self.path.startswith("/sleep/"):
                    owner.slow.set()
                    owner.stopped.wait(float(self.path.rsplit("/", 1)[1]))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: health checks connect every interval

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def instance(self, service: str, frontend_port: int, **meta: str) -> ServiceInstance:
        return ServiceInstance(
            service=service,
            id=f"host1:{self.name}:8000:tcp",
            address="127.0.0.1",
            port=self.port,
            frontend_port=frontend_port,
            meta=tuple(meta.items()),
            host_id="host1",
        )

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()


def haproxy_context(state_dir: Path, **options: Any) -> PluginContext[HAProxyConfig]:
    """What discoverd hands the factory: ``options`` checked into an ``HAProxyConfig`` (a bad
    value raises ``ConfigError``, as the core's own check does)."""
    return PluginContext(
        config=build_config(HAProxyConfig, options, section="haproxy"),
        host=HostInfo(ip="127.0.0.1", id="host1"),
        state_dir=state_dir,
    )


@pytest.fixture
def backends() -> Iterator[Callable[..., NameServer]]:
    """``backends("a")`` starts a backend answering ``I am a``; all stop at teardown."""
    started: list[NameServer] = []

    def start(name: str, keep_alive: bool = False) -> NameServer:
        server = NameServer(name, keep_alive)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def http_service(name: str, port: int, *servers: NameServer, mode: str = "http") -> Service:
    return Service(
        name=name,
        frontend_port=port,
        mode="http" if mode == "http" else "tcp",
        instances=tuple(s.instance(name, port) for s in servers),
    )


@pytest.fixture
def state_root() -> Iterator[Path]:
    """A short state directory (unix socket paths must stay short), removed at teardown."""
    root = Path(tempfile.mkdtemp(prefix="dh-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _kill_strays(state_dir: Path) -> None:
    """Kill whatever HAProxy master (and workers) the pid file or master socket still names."""
    haproxy_dir = state_dir / "haproxy"
    pids: set[int] = set()
    pid = read_pid(haproxy_dir / "haproxy.pid")
    if pid is not None:
        pids.add(pid)
    status = show_proc(haproxy_dir / "master.sock", timeout=1.0)
    if status is not None:
        pids.update({status.master, *status.workers})
    for each in pids:
        if pid_alive(each):
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGKILL)


@pytest.fixture
def make_haproxy(haproxy_binary: str, state_root: Path) -> Iterator[Callable[..., HAProxy]]:
    """``make_haproxy(**options)`` builds a proxy on ``state_root`` (stats on a free port unless
    given). Every HAProxy started there is stopped at teardown, killed if it does not stop."""
    from tests.support.services import free_port

    made: list[HAProxy] = []

    def build(state_dir: Path | None = None, **options: Any) -> HAProxy:
        options.setdefault("binary", haproxy_binary)
        options.setdefault("bind", "127.0.0.1")
        options.setdefault("stats_port", free_port())
        proxy = make_proxy(haproxy_context(state_dir or state_root, **options))
        assert isinstance(proxy, HAProxy)
        made.append(proxy)
        return proxy

    yield build
    for proxy in made:
        try:
            proxy.stop_process()
        finally:
            _kill_strays(proxy.dir.parent)
