"""Readiness checks: the check functions against real local sockets, the scheduler, and the
register role registering an instance only once it answers (fake source/registry: core logic)."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from discoverd import CheckTarget, ServiceInstance
from discoverd.core.checks import CheckSpec, run_check, spec_for
from discoverd.core.durations import format_seconds, parse_duration
from discoverd.core.metadata import ContainerSpec, PortBinding, instances_for
from discoverd.core.readiness import Readiness
from discoverd.core.register import RegisterRole
from tests.core.test_agent import FakeRegistry, FakeSource, eventually


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A real HTTP server on 127.0.0.1 that can be started, stopped and told to fail."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.status = 200
        self._httpd: http.server.HTTPServer | None = None

    def start(self) -> None:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(owner.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        http.server.HTTPServer.allow_reuse_address = True
        self._httpd = http.server.HTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(free_port())
    yield srv
    srv.stop()


def forwarder() -> tuple[int, Callable[[], None]]:
    """A listener that accepts and drops every connection, as docker-proxy does when nothing
    listens behind it."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    threading.Thread(target=run, daemon=True).start()

    def close() -> None:
        stop.set()
        listener.close()

    return int(listener.getsockname()[1]), close


def test_durations() -> None:
    assert parse_duration("10s") == 10
    assert parse_duration("500ms") == 0.5
    assert parse_duration("1m") == 60
    assert parse_duration(" 2.5 ") == 2.5
    for bad in ("", "ten", "-1s", "nan", "1d", "99999h"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert format_seconds(10.0) == "10" and format_seconds(0.5) == "0.5"
    assert format_seconds(0.0) == "0"


def test_tcp_and_http_checks_against_real_sockets(server: Server) -> None:
    target = CheckTarget("127.0.0.1", server.port)
    tcp, http_ = CheckSpec("tcp", timeout=0.5), CheckSpec("http", "/health", timeout=0.5)
    assert run_check(tcp, target, forwarded=False) is not None  # nothing listens yet
    assert run_check(http_, target, forwarded=False) is not None
    server.start()
    assert run_check(tcp, target, forwarded=False) is None
    assert run_check(http_, target, forwarded=False) is None
    server.status = 503
    assert run_check(http_, target, forwarded=False) == "HTTP 503"
    assert run_check(CheckSpec("none"), CheckTarget("127.0.0.1", 1), forwarded=True) is None


def test_a_forwarder_that_drops_connections_is_not_ready() -> None:
    port, close = forwarder()
    try:
        target = CheckTarget("127.0.0.1", port)
        assert run_check(CheckSpec("tcp"), target, forwarded=False) is None  # a bare connect
        assert run_check(CheckSpec("tcp"), target, forwarded=True) is not None
        assert run_check(CheckSpec("http"), target, forwarded=True) is not None
    finally:
        close()


def test_check_in_a_network_namespace_that_does_not_exist() -> None:
    target = CheckTarget("127.0.0.1", 1, netns="/proc/999999999/ns/net")
    with pytest.raises(OSError):
        run_check(CheckSpec("tcp", timeout=0.2), target, forwarded=False)


def instance(port: int, **meta: str) -> ServiceInstance:
    return ServiceInstance(
        service="web",
        id=f"h:c{port}:8000:tcp",
        address="127.0.0.1",
        port=port,
        frontend_port=8000,
        meta=tuple(sorted(meta.items())),
    )


def test_spec_from_metadata_over_defaults() -> None:
    default = CheckSpec("tcp", "/", 2.0, 1.0)
    assert spec_for(instance(1), default) == default
    assert spec_for(instance(1, check_http="/ready"), default) == CheckSpec("http", "/ready")
    assert spec_for(instance(1, check="none"), default).kind == "none"
    got = spec_for(instance(1, check_interval="0.5", check_timeout="0.2"), default)
    assert (got.interval, got.timeout) == (0.5, 0.2)
    udp = ServiceInstance(service="dns", id="h:c:53:udp", address="127.0.0.1", port=53,
                          protocol="udp")  # fmt: skip
    assert spec_for(udp, default).kind == "none"


def test_labels_for_checks_and_drain_are_validated() -> None:
    def spec(**labels: str) -> ContainerSpec:
        return ContainerSpec(
            id="c" * 64,
            name="web",
            image="web:1",
            labels=labels,
            env={},
            ports=(PortBinding(8000, "tcp", "127.0.0.1", 30000),),
        )

    [ok], problems = instances_for(
        spec(SERVICE_DRAIN="10s", SERVICE_CHECK_HTTP="/health", SERVICE_CHECK_INTERVAL="500ms"),
        host_ip="127.0.0.1",
        host_id="h",
    )
    assert problems == []
    assert ok.meta_dict == {"drain": "10", "check_http": "/health", "check_interval": "0.5"}
    for labels, fragment in (
        ({"SERVICE_DRAIN": "soon"}, "SERVICE_DRAIN"),
        ({"SERVICE_CHECK_HTTP": "health"}, "SERVICE_CHECK_HTTP"),
        ({"SERVICE_CHECK_HTTP": "/a b"}, "SERVICE_CHECK_HTTP"),
        ({"SERVICE_CHECK": "ping"}, "SERVICE_CHECK"),
        ({"SERVICE_CHECK_TCP": "maybe"}, "SERVICE_CHECK_TCP"),
    ):
        found, problems = instances_for(spec(**labels), host_ip="127.0.0.1", host_id="h")
        assert found == [] and len(problems) == 1 and fragment in str(problems[0]), labels


def test_readiness_follows_the_application(server: Server) -> None:
    notes: list[str] = []
    readiness = Readiness(
        CheckSpec("http", interval=0.1, timeout=0.5), lambda i: None, notes.append
    )
    try:
        web = instance(server.port)
        assert readiness.update({web.id: web}, first_wait=0.2) == set()
        server.start()
        eventually(lambda: any("passed" in n for n in notes))
        assert readiness.update({web.id: web}, first_wait=0.0) == {web.id}
        server.status = 500
        eventually(lambda: any("failed" in n for n in notes))
        assert readiness.update({web.id: web}, first_wait=0.0) == set()
        assert readiness.reason(web.id) == "HTTP 500"
        server.status = 200
        eventually(lambda: readiness.update({web.id: web}, first_wait=0.0) == {web.id})
        assert readiness.update({}, first_wait=0.0) == set()  # forgotten when not wanted
    finally:
        readiness.close()


def test_first_check_of_a_listening_instance_is_waited_for(server: Server) -> None:
    server.start()
    readiness = Readiness(CheckSpec("tcp"), lambda i: None, lambda reason: None)
    try:
        web = instance(server.port)
        assert readiness.update({web.id: web}, first_wait=5.0) == {web.id}
    finally:
        readiness.close()


def test_register_role_registers_only_answering_instances(server: Server) -> None:
    source, registry = FakeSource(), FakeRegistry()
    role = RegisterRole(
        source,
        registry,
        min_wait=0.0,
        max_wait=0.01,
        retry_max=0.05,
        checks=CheckSpec("http", interval=0.1, timeout=0.5),
        first_check_wait=0.05,
    )
    web = instance(server.port)
    unchecked = instance(free_port(), check="none")
    source.instances = [web, unchecked]
    role.start()
    try:
        eventually(lambda: set(registry.entries) == {unchecked.id})
        assert web.id in role.waiting
        server.start()
        eventually(lambda: set(registry.entries) == {web.id, unchecked.id})
        server.stop()  # stops answering: leaves the registry after two failed checks
        eventually(lambda: set(registry.entries) == {unchecked.id})
        server.start()  # answers again: comes back
        eventually(lambda: set(registry.entries) == {web.id, unchecked.id})
    finally:
        role.shutdown()
