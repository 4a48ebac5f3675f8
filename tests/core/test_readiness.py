"""Readiness checks: the check functions against real local sockets, the scheduler, and the
register role registering an instance only once it answers (fake source/registry: core logic);
the damping of a flapping instance and the listen probe with fake checks, and the listen probe
against real sockets (sock_diag, in this process's own network namespace)."""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from discoverd import CheckTarget, ServiceInstance
from discoverd.core import checks
from discoverd.core.checks import CheckSpec, Detected, ListenProbe, detect_mode, run_check, spec_for
from discoverd.core.durations import format_seconds, parse_duration
from discoverd.core.metadata import ContainerSpec, PortBinding, instances_for
from discoverd.core.readiness import DETECT_TRIES, PROBE_MISTRUST, LivenessProbe, Readiness
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


# --------------------------------------------------------------------------------------------
# Damping and the listen probe, with fake checks: the scheduler's own logic. Timing assertions
# are lower bounds only (a hold is never cut short) or deadlines far beyond what is expected.


class FakeApp:
    """An application whose answers the test decides: ``up``, or spells of ``flap_every``
    seconds up and down. Records when each check ran and whether it passed."""

    def __init__(self) -> None:
        self.up = True
        self.flap_every: float | None = None
        self.since = time.monotonic()
        self.checks: list[tuple[float, bool]] = []

    def answering(self) -> bool:
        if self.flap_every is not None:
            return int((time.monotonic() - self.since) / self.flap_every) % 2 == 0
        return self.up

    def check(
        self, instance: ServiceInstance, spec: CheckSpec, target: CheckTarget | None
    ) -> str | None:
        ok = self.answering()
        self.checks.append((time.monotonic(), ok))
        return None if ok else "down"

    def switch(self, up: bool) -> float:
        """Answer (or not) from now on; the moment just before the switch."""
        moment = time.monotonic()
        self.up = up
        return moment

    def checked_since(self, moment: float, ok: bool) -> bool:
        return any(at >= moment and passed == ok for at, passed in list(self.checks))


class Changes:
    """The readiness notifications, with the moment each came."""

    def __init__(self) -> None:
        self.items: list[tuple[float, str]] = []

    def __call__(self, reason: str) -> None:
        self.items.append((time.monotonic(), reason))

    def count(self, word: str, since: float = 0.0) -> int:
        return sum(1 for at, reason in list(self.items) if word in reason and at >= since)

    def last(self, word: str) -> float:
        return max(at for at, reason in list(self.items) if word in reason)

    def reach(self, word: str, count: int) -> Callable[[], bool]:
        """A condition: ``count`` notifications with ``word`` came."""
        return lambda: self.count(word) == count


class FakeProbe:
    """A listen probe that reads the fake application; ``blind_after`` calls it says nothing
    listens whatever the application does."""

    def __init__(self, app: FakeApp, blind_after: int | None = None) -> None:
        self.app = app
        self.blind_after = blind_after
        self.asked = 0
        self.closed = False

    def listening(self) -> bool:
        self.asked += 1
        if self.blind_after is not None and self.asked > self.blind_after:
            return False
        return self.app.answering()

    def close(self) -> None:
        self.closed = True


MakeReadiness = Callable[..., Readiness]


@pytest.fixture
def make_readiness() -> Iterator[MakeReadiness]:
    """``make_readiness(app, notify, interval=..., **options)``: a scheduler checking with the
    fake application (no probes unless ``probe`` is given); closed at teardown."""
    made: list[Readiness] = []

    def make(
        app: FakeApp, notify: Callable[[str], None], interval: float = 0.05, **options: Any
    ) -> Readiness:
        options.setdefault("probe", None)
        readiness = Readiness(
            CheckSpec("tcp", interval=interval, timeout=0.5),
            lambda i: None,
            notify,
            check=app.check,
            **options,
        )
        made.append(readiness)
        return readiness

    yield make
    for readiness in made:
        readiness.close()


def test_a_fallen_instance_is_ready_again_only_after_answering_for_a_growing_hold(
    make_readiness: MakeReadiness,
) -> None:
    app, changes = FakeApp(), Changes()
    readiness = make_readiness(
        app, changes, hold=0.2, hold_max=0.5, half_life=3600.0, hold_recheck=0.02
    )
    web = instance(1)
    # A new instance is ready at its first good check: no hold.
    assert readiness.update({web.id: web}, first_wait=5.0) == {web.id}
    assert readiness.hold_of(web.id) == 0.0
    for fall, hold in ((1, 0.2), (2, 0.4), (3, 0.5)):  # doubles with each fall, up to the cap
        app.switch(False)
        eventually(changes.reach("failed", fall))
        assert readiness.update({web.id: web}, first_wait=0.0) == set()
        assert readiness.hold_of(web.id) == pytest.approx(hold, rel=0.01)
        back = app.switch(True)
        eventually(changes.reach("passed", fall + 1), timeout=hold + 10.0)
        took = changes.last("passed") - back
        assert took >= hold, f"fall {fall}: ready {took:.3f}s after answering again, hold {hold}s"
    assert readiness.update({web.id: web}, first_wait=0.0) == {web.id}
    assert readiness.counts["fell"] == 3 and readiness.counts["readmitted"] == 3


def test_a_failure_during_the_hold_starts_it_again(make_readiness: MakeReadiness) -> None:
    app, changes = FakeApp(), Changes()
    readiness = make_readiness(app, changes, hold=0.5, half_life=3600.0, hold_recheck=0.02)
    web = instance(1)
    assert readiness.update({web.id: web}, first_wait=5.0) == {web.id}
    app.switch(False)
    eventually(lambda: changes.count("failed") == 1)
    answering = app.switch(True)
    eventually(lambda: app.checked_since(answering, ok=True))
    blip = app.switch(False)  # well within the hold
    eventually(lambda: app.checked_since(blip, ok=False))
    back = app.switch(True)
    eventually(lambda: changes.count("passed") == 2, timeout=10.0)
    took = changes.last("passed") - back
    assert took >= 0.5, f"ready {took:.3f}s after the last failure; the hold is 0.5s"
    assert changes.count("passed", since=answering) == 1


def test_the_count_of_falls_fades(make_readiness: MakeReadiness) -> None:
    app, changes = FakeApp(), Changes()
    readiness = make_readiness(app, changes, hold=0.2, half_life=0.02, hold_recheck=0.02)
    web = instance(1)
    assert readiness.update({web.id: web}, first_wait=5.0) == {web.id}
    for fall in (1, 2):
        app.switch(False)
        eventually(changes.reach("failed", fall))
        # The falls are at least a hold (ten half-lives) apart: the first one is forgotten.
        assert readiness.hold_of(web.id) == pytest.approx(0.2, abs=0.01)
        app.switch(True)
        eventually(changes.reach("passed", fall + 1), timeout=10.0)


def test_a_flapping_instance_is_kept_out(make_readiness: MakeReadiness) -> None:
    """Spells of 30 ms up and down, checks every 20 ms: once it fell, it never answers for a
    whole hold, so it stays out (one change, not one per spell)."""
    app, changes = FakeApp(), Changes()
    app.flap_every = 0.03
    readiness = make_readiness(
        app, changes, interval=0.02, hold=0.3, half_life=3600.0, hold_recheck=0.01
    )
    web = instance(1)
    readiness.update({web.id: web}, first_wait=1.0)
    eventually(lambda: changes.count("failed") == 1)
    fell = changes.last("failed")
    window = 1.5
    time.sleep(window)  # the observation window: the assertions bound what happened in it
    checks = [passed for at, passed in list(app.checks) if at >= fell]
    assert checks.count(True) > 0 and checks.count(False) > 0  # it did flap while out
    readmitted = changes.count("passed", since=fell)
    assert readmitted == 0, f"readmitted {readmitted} times in {window}s: {changes.items}"
    assert readiness.update({web.id: web}, first_wait=0.0) == set()


def test_a_probe_that_finds_nothing_is_confirmed_by_one_check(
    make_readiness: MakeReadiness,
) -> None:
    """Checks every 30 s, probes every 20 ms: the application's stop is found by the probe,
    and one check confirms it (a probe and a check are the two failures that take it out)."""
    app, changes = FakeApp(), Changes()
    probes: list[FakeProbe] = []

    def probe(i: ServiceInstance, spec: CheckSpec, target: CheckTarget | None) -> LivenessProbe:
        probes.append(FakeProbe(app))
        return probes[-1]

    readiness = make_readiness(app, changes, interval=30.0, probe=probe, probe_interval=0.02)
    web = instance(1)
    assert readiness.update({web.id: web}, first_wait=5.0) == {web.id}
    eventually(lambda: len(probes) == 1 and probes[0].asked > 3)
    down = app.switch(False)
    eventually(lambda: changes.count("failed") == 1, timeout=5.0)
    confirming = [at for at, _ in list(app.checks) if at >= down]
    assert len(confirming) == 1, confirming
    assert readiness.reason(web.id) == "down"
    assert readiness.update({web.id: web}, first_wait=0.0) == set()
    readiness.update({}, first_wait=0.0)  # forgotten: its probe is closed
    assert probes[0].closed


def test_a_probe_the_checks_contradict_is_dropped(make_readiness: MakeReadiness) -> None:
    app, changes = FakeApp(), Changes()
    blind = FakeProbe(app, blind_after=2)

    def probe(i: ServiceInstance, spec: CheckSpec, target: CheckTarget | None) -> LivenessProbe:
        return blind

    readiness = make_readiness(app, changes, interval=30.0, probe=probe, probe_interval=0.02)
    web = instance(1)
    assert readiness.update({web.id: web}, first_wait=5.0) == {web.id}
    eventually(lambda: blind.closed, timeout=5.0)
    assert blind.asked >= PROBE_MISTRUST
    assert changes.count("failed") == 0  # each of its false alarms was checked, and passed
    assert readiness.update({web.id: web}, first_wait=0.0) == {web.id}


def test_checks_alone_when_no_probe_can_be_made(make_readiness: MakeReadiness) -> None:
    app, changes = FakeApp(), Changes()

    def probe(i: ServiceInstance, spec: CheckSpec, target: CheckTarget | None) -> LivenessProbe:
        raise OSError(1, "Operation not permitted")

    readiness = make_readiness(app, changes, interval=0.05, probe=probe, probe_interval=0.02)
    web = instance(1)
    assert readiness.update({web.id: web}, first_wait=5.0) == {web.id}
    app.switch(False)
    eventually(lambda: changes.count("failed") == 1)


# --------------------------------------------------------------------------------------------
# The listen probe against real sockets, in this process's own network namespace (entering a
# namespace, even one's own, takes CAP_SYS_ADMIN: root, as the Docker tests are run).

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="entering a network namespace needs root")
OWN_NETNS = f"/proc/{os.getpid()}/ns/net"


def listener(
    family: socket.AddressFamily, address: str, v6only: bool | None = None
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((address, 0))
    sock.listen()
    return sock


@needs_root
def test_listen_probe_reads_the_kernels_listeners() -> None:
    def listens(address: str, port: int) -> bool:
        probe = ListenProbe(OWN_NETNS, address, port)
        try:
            return probe.listening()
        finally:
            probe.close()

    with (
        listener(socket.AF_INET, "127.0.0.1") as exact,
        listener(socket.AF_INET, "0.0.0.0") as wild,
    ):
        port, wild_port = exact.getsockname()[1], wild.getsockname()[1]
        assert listens("127.0.0.1", port)
        assert not listens("127.0.0.2", port)  # bound to another address: not reachable there
        assert listens("10.1.2.3", wild_port)
    assert not listens("127.0.0.1", port) and not listens("10.1.2.3", wild_port)  # closed
    with listener(socket.AF_INET6, "::", v6only=False) as dual:
        assert listens("127.0.0.1", dual.getsockname()[1])  # IPv4 reaches a dual-stack socket
    with listener(socket.AF_INET6, "::", v6only=True) as only6:
        assert not listens("127.0.0.1", only6.getsockname()[1])
        assert listens("::1", only6.getsockname()[1])
    with pytest.raises(OSError):
        ListenProbe("/proc/999999999/ns/net", "127.0.0.1", 1)


@needs_root
def test_listen_probes_beyond_the_descriptor_budget_keep_no_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with listener(socket.AF_INET, "127.0.0.1") as sock:
        port = sock.getsockname()[1]
        kept = ListenProbe(OWN_NETNS, "127.0.0.1", port)
        monkeypatch.setattr(checks, "_held_budget", lambda: 0)
        passing = ListenProbe(OWN_NETNS, "127.0.0.1", port)
        try:
            assert kept.kept and not passing.kept
            assert passing.listening() and kept.listening()
        finally:
            kept.close()
            kept.close()  # twice: harmless
            passing.close()
        sock.close()
        assert not passing.listening()


@needs_root
def test_readiness_finds_a_stopped_listener_between_two_checks() -> None:
    """The real check and the real probe, in a real namespace: checks every 30 s, yet the
    instance leaves within a second or so of its listener closing."""
    sock = listener(socket.AF_INET, "127.0.0.1")
    port = sock.getsockname()[1]
    web = instance(port)
    changes = Changes()
    readiness = Readiness(
        CheckSpec("tcp", interval=30.0, timeout=0.5),
        lambda i: CheckTarget("127.0.0.1", port, netns=OWN_NETNS),
        changes,
    )
    try:
        assert readiness.update({web.id: web}, first_wait=5.0) == {web.id}
        eventually(lambda: readiness.counts["probes"] > 0)
        closed = time.monotonic()
        sock.close()
        eventually(lambda: changes.count("failed") == 1, timeout=10.0)
        took = changes.last("failed") - closed
        # Two checks: the first one, and the one that confirmed what the probe found.
        assert readiness.counts["checks"] == 2, f"{readiness.counts}; out after {took:.3f}s"
        assert readiness.reason(web.id) == "Connection refused"
    finally:
        sock.close()
        readiness.close()


# --------------------------------------------------------------------------------------------
# Mode detection: what an application speaks, asked carefully (real sockets on 127.0.0.1).


class Speaker:
    """A TCP server on 127.0.0.1 whose behaviour the test sets: ``banner`` sent at once (or
    after ``banner_after`` seconds), ``reply`` sent for what it receives, or silence; it
    records what each client sent."""

    def __init__(
        self,
        *,
        banner: bytes = b"",
        banner_after: float = 0.0,
        reply: bytes | None = None,
        close_at_once: bool = False,
    ) -> None:
        self.banner, self.banner_after = banner, banner_after
        self.reply, self.close_at_once = reply, close_at_once
        self.received: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            if self.close_at_once:
                return
            if self.banner:
                time.sleep(self.banner_after)
                conn.sendall(self.banner)
            conn.settimeout(2.0)
            got = b""
            try:
                while b"\r\n\r\n" not in got and not (self.banner and got):
                    chunk = conn.recv(1024)
                    if not chunk:
                        break
                    got += chunk
                    if self.reply is not None:
                        conn.sendall(self.reply)
            except OSError:
                pass
            self.received.append(got)
            if self.reply is None and not self.banner:
                self._stop.wait(3.0)  # silent: keeps the connection open, says nothing

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


@pytest.fixture
def speakers() -> Iterator[Callable[..., Speaker]]:
    made: list[Speaker] = []

    def make(**kwargs: Any) -> Speaker:
        made.append(Speaker(**kwargs))
        return made[-1]

    yield make
    for speaker in made:
        speaker.close()


def test_detect_mode_finds_http_whatever_the_status(server: Server) -> None:
    server.start()
    target = CheckTarget("127.0.0.1", server.port)
    assert detect_mode(target, 1.0) == "http"
    server.status = 503
    assert detect_mode(target, 1.0) == "http"  # any status: it speaks HTTP/1


def test_detect_mode_waits_for_a_banner_and_sends_nothing_to_a_server_that_speaks_first(
    speakers: Callable[..., Speaker],
) -> None:
    smtp = speakers(banner=b"220 mail.example ESMTP ready\r\n")
    assert detect_mode(CheckTarget("127.0.0.1", smtp.port), 1.0) == "tcp"
    eventually(lambda: len(smtp.received) == 1)
    assert smtp.received == [b""]  # it never saw a byte of HTTP
    mysql = speakers(banner=b"J\x00\x00\x00\n8.0.36\x00")  # binary greeting
    assert detect_mode(CheckTarget("127.0.0.1", mysql.port), 1.0) == "tcp"


def test_detect_mode_reads_a_late_banner_as_what_it_is(speakers: Callable[..., Speaker]) -> None:
    """A banner later than the wait (a server resolving the client's name first) arrives
    after the request: still not an HTTP answer."""
    slow = speakers(banner=b"220 slow ESMTP\r\n", banner_after=checks.BANNER_WAIT + 0.2)
    assert detect_mode(CheckTarget("127.0.0.1", slow.port), 2.0) == "tcp"


def test_detect_mode_asks_a_silent_server_the_smallest_request(
    speakers: Callable[..., Speaker],
) -> None:
    redis = speakers(reply=b"-ERR unknown command\r\n")
    assert detect_mode(CheckTarget("127.0.0.1", redis.port), 1.0) == "tcp"
    eventually(lambda: len(redis.received) == 1)
    [sent] = redis.received
    assert sent.startswith(b"HEAD / HTTP/1.0\r\n") and sent.endswith(b"\r\n\r\n")
    assert b"host:" not in sent.lower()  # Redis takes a Host: line for an attack
    binary = speakers(reply=b"\x00\x00\x12\x04\x00\x00\x00\x00\x00")  # an HTTP/2 frame
    assert detect_mode(CheckTarget("127.0.0.1", binary.port), 1.0) == "tcp"
    almost = speakers(reply=b"HTTP/2 200\r\n\r\n")  # not HTTP/1
    assert detect_mode(CheckTarget("127.0.0.1", almost.port), 1.0) == "tcp"


def test_detect_mode_cannot_tell_without_a_byte_back(speakers: Callable[..., Speaker]) -> None:
    silent = speakers()  # reads and never answers
    started = time.monotonic()
    assert detect_mode(CheckTarget("127.0.0.1", silent.port), 0.3) is None
    assert time.monotonic() - started < 2.0
    closing = speakers(close_at_once=True)
    assert detect_mode(CheckTarget("127.0.0.1", closing.port), 0.5) is None
    assert detect_mode(CheckTarget("127.0.0.1", free_port()), 0.5) is None  # nothing listens


@needs_root
def test_detect_mode_inside_a_namespace(server: Server) -> None:
    server.start()
    assert detect_mode(CheckTarget("127.0.0.1", server.port, netns=OWN_NETNS), 1.0) == "http"
    with pytest.raises(OSError):
        detect_mode(CheckTarget("127.0.0.1", server.port, netns="/proc/999999999/ns/net"), 1.0)


class FakeDetector:
    """Answers what the test says, counting the calls; ``error`` raised instead."""

    def __init__(self, answer: Detected | None = "http", error: OSError | None = None) -> None:
        self.answer, self.error = answer, error
        self.calls: list[CheckTarget] = []

    def __call__(self, target: CheckTarget, timeout: float) -> Detected | None:
        self.calls.append(target)
        if self.error is not None:
            raise self.error
        return self.answer


IN_NAMESPACE = CheckTarget("10.0.0.2", 8000, netns="/proc/1/ns/net")


def detecting(
    make_readiness: MakeReadiness,
    app: FakeApp,
    notify: Callable[[str], None],
    detector: FakeDetector,
    target: CheckTarget | None = IN_NAMESPACE,
    **options: Any,
) -> Readiness:
    readiness = make_readiness(app, notify, detect=True, detector=detector, **options)
    readiness._target_of = lambda i: target
    return readiness


def test_the_mode_is_detected_once_after_the_first_good_check(
    make_readiness: MakeReadiness,
) -> None:
    app, changes, detector = FakeApp(), Changes(), FakeDetector("http")
    readiness = detecting(make_readiness, app, changes, detector, interval=0.02)
    web = instance(1)
    app.up = False
    assert readiness.update({web.id: web}, first_wait=0.1) == set()
    assert detector.calls == []  # never before it answers
    app.up = True
    eventually(lambda: readiness.modes() == {web.id: "http"})
    eventually(lambda: changes.count("mode detected") == 1)
    time.sleep(0.2)  # ten more checks
    assert len(detector.calls) == 1 and detector.calls[0] == IN_NAMESPACE
    assert readiness.update({web.id: web}, first_wait=0.0) == {web.id}


def test_no_detection_for_an_explicit_mode_a_published_port_or_no_check(
    make_readiness: MakeReadiness,
) -> None:
    app, changes = FakeApp(), Changes()
    labelled, published, unchecked = FakeDetector(), FakeDetector(), FakeDetector()
    first = detecting(make_readiness, app, changes, labelled)
    web = instance(1, mode="tcp")
    assert first.update({web.id: web}, first_wait=5.0) == {web.id}
    second = detecting(make_readiness, app, changes, published, target=None)
    other = instance(2)
    assert second.update({other.id: other}, first_wait=5.0) == {other.id}
    forwarded = CheckTarget("127.0.0.1", 2)  # no namespace: the published port
    third = detecting(make_readiness, app, changes, unchecked, target=forwarded)
    plain = instance(3, check="none")
    assert third.update({plain.id: plain, other.id: other}, first_wait=5.0) == {plain.id, other.id}
    time.sleep(0.3)
    assert labelled.calls == published.calls == unchecked.calls == []
    assert first.modes() == second.modes() == third.modes() == {}


def test_a_namespace_detection_cannot_enter_is_never_detected_elsewhere(
    make_readiness: MakeReadiness,
) -> None:
    app, changes = FakeApp(), Changes()
    denied = FakeDetector(error=PermissionError(1, "Operation not permitted"))
    readiness = detecting(make_readiness, app, changes, denied, interval=0.02)
    web = instance(1)
    assert readiness.update({web.id: web}, first_wait=5.0) == {web.id}
    eventually(lambda: len(denied.calls) == 1)
    time.sleep(0.2)
    assert len(denied.calls) == 1 and readiness.modes() == {}
    gone = FakeDetector(error=FileNotFoundError(2, "No such file or directory"))
    other = detecting(make_readiness, app, changes, gone, interval=0.02)
    assert other.update({web.id: web}, first_wait=5.0) == {web.id}
    eventually(lambda: len(gone.calls) >= 2)  # tried again: the checks say what happened
    assert other.modes() == {}


def test_an_application_that_never_answers_is_taken_for_tcp_after_a_few_tries(
    make_readiness: MakeReadiness,
) -> None:
    app, changes, mute = FakeApp(), Changes(), FakeDetector(None)
    readiness = detecting(make_readiness, app, changes, mute, interval=0.02)
    web = instance(1)
    readiness.update({web.id: web}, first_wait=5.0)
    eventually(lambda: readiness.modes() == {web.id: "tcp"})
    assert len(mute.calls) == DETECT_TRIES


def test_a_remembered_mode_is_not_detected_again_and_a_new_process_is(
    make_readiness: MakeReadiness,
) -> None:
    app, changes, detector = FakeApp(), Changes(), FakeDetector("tcp")
    web = instance(1)
    readiness = detecting(
        make_readiness, app, changes, detector, interval=0.02, remembered={web.id: "http"}
    )
    assert readiness.modes() == {}
    assert readiness.update({web.id: web}, first_wait=5.0) == {web.id}
    assert readiness.modes() == {web.id: "http"}
    time.sleep(0.1)
    assert detector.calls == []
    # The container restarted (the source names another process): asked again.
    restarted = CheckTarget("10.0.0.2", 8000, netns="/proc/2/ns/net")
    readiness._target_of = lambda i: restarted
    readiness.update({web.id: web}, first_wait=0.0)
    eventually(lambda: readiness.modes() == {web.id: "tcp"})
    assert detector.calls == [restarted]


@needs_root
def test_the_register_role_publishes_the_detected_mode_and_keeps_it(
    server: Server, tmp_path: Path
) -> None:
    """A real check and a real detection, in this process's namespace: registered at once,
    then again with ``detected_mode``; a restarted role registers it with its mode at once."""
    server.start()

    class InNamespace(FakeSource):
        def check_target(self, i: ServiceInstance) -> CheckTarget | None:
            return CheckTarget("127.0.0.1", server.port, netns=OWN_NETNS)

    class Recording(FakeRegistry):
        def __init__(self) -> None:
            super().__init__()
            self.log: list[ServiceInstance] = []

        def register(self, instance: ServiceInstance) -> None:
            self.log.append(instance)
            super().register(instance)

    source, registry = InNamespace(), Recording()
    web = instance(server.port)
    source.instances = [web]
    kept = tmp_path / "register" / "modes.json"

    def role() -> RegisterRole:
        return RegisterRole(
            source,
            registry,
            min_wait=0.0,
            max_wait=0.01,
            retry_max=0.05,
            checks=CheckSpec("tcp", interval=0.1, timeout=0.5),
            detect_modes=True,
            modes_file=kept,
        )

    first = role()
    first.start()
    try:
        eventually(lambda: registry.entries.get(web.id) is not None)
        eventually(lambda: registry.entries[web.id].meta_dict.get("detected_mode") == "http")
        assert registry.entries[web.id].meta_dict.get("mode") is None  # the operator's key
    finally:
        first.shutdown()
    assert json.loads(kept.read_text()) == {"modes": {web.id: "http"}}
    registry.log.clear()
    second = role()
    second.start()
    try:
        eventually(lambda: len(registry.log) >= 1)
        assert registry.log[0].meta_dict.get("detected_mode") == "http"
    finally:
        second.shutdown()
