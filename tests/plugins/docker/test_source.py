"""The Docker source against a real Docker daemon and real containers."""

from __future__ import annotations

import dataclasses
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import pytest

from discoverd import (
    ConfigError,
    HostInfo,
    PluginContext,
    ServiceInstance,
    SourceSnapshot,
    Unavailable,
    build_config,
)
from discoverd.core.checks import CheckSpec, run_check
from discoverd.core.config import CoreConfig
from discoverd.plugins.docker import discoverd_register_sources, make_source
from discoverd.plugins.docker.config import DockerConfig
from discoverd.plugins.docker.source import (
    DockerSource,
    _bindings,
    _container_address,
    _container_name,
    _eligible,
    _read_inspect,
    _signal_number,
    _watched_action,
    _with_local_address,
)
from tests.support.services import (
    WHOAMI_COMMAND,
    WHOAMI_IMAGE,
    DockerDaemon,
    published_port,
    run_whoami,
    wait_for,
)

if TYPE_CHECKING:
    from docker.models.containers import Container

pytestmark = [pytest.mark.services, pytest.mark.usefixtures("cleanup_containers")]

HOST_ID = "testhost"
HOST_IP = "127.0.0.5"

SourceFactory = Callable[..., DockerSource]


def make_ctx(
    host: str, host_ip: str = HOST_IP, timeout: float = 10.0, **core: Any
) -> PluginContext[DockerConfig]:
    """A factory's context; ``core`` sets core options (``single_machine=True``, ...)."""
    return PluginContext(
        config=build_config(DockerConfig, {"host": host, "timeout": timeout}, section="docker"),
        host=HostInfo(ip=host_ip, id=HOST_ID),
        state_dir=Path("."),
        core=build_config(CoreConfig, core) if core else None,
    )


@pytest.fixture
def new_source(docker_daemon: DockerDaemon) -> Iterator[SourceFactory]:
    """Build sources for the shared daemon; all are closed after the test."""
    made: list[DockerSource] = []

    def build(host_ip: str = HOST_IP, host: str | None = None, **core: Any) -> DockerSource:
        source = make_source(make_ctx(host or docker_daemon.host, host_ip, **core))
        assert isinstance(source, DockerSource)
        made.append(source)
        return source

    yield build
    for source in made:
        source.close()


def of(snapshot: SourceSnapshot, container: Container) -> list[ServiceInstance]:
    """The instances of ``container`` in ``snapshot`` (other tests' containers ignored)."""
    marker = f":{container.id[:12]}:"
    return sorted(i for i in snapshot.instances if marker in i.id)


def routed(source: DockerSource, container: Container) -> list[ServiceInstance]:
    """The instances of ``container`` the register role would keep: in a fresh snapshot, and
    not stopping."""
    listed = of(source.snapshot(), container)
    leaving = source.stopping()
    return [i for i in listed if i.id not in leaving]


def problems_of(snapshot: SourceSnapshot, container: Container) -> list[str]:
    return [str(p) for p in snapshot.problems if container.id[:12] in p.subject]


def run_plain(client: docker.DockerClient, **kwargs: Any) -> Container:
    """A whoami container with free-form ``containers.run`` arguments (ports, healthcheck)."""
    kwargs.setdefault("ports", {"8000/tcp": ("127.0.0.1", None)})
    return client.containers.run(WHOAMI_IMAGE, WHOAMI_COMMAND, detach=True, **kwargs)


def whoami(client: docker.DockerClient, **kwargs: Any) -> Container:
    return run_whoami(client, **kwargs)


# --------------------------------------------------------------------------------------------
# Plugin record


def test_plugin_record_and_options() -> None:
    [record] = discoverd_register_sources()
    assert record.name == "docker" and record.config is DockerConfig
    options = {o.name: o for o in record.options}
    assert options["host"].kind == "string" and options["host"].default == ""
    assert options["host"].env == ("DOCKER_HOST",)
    assert options["timeout"].kind == "number" and options["timeout"].default == 10.0


def test_loading_the_plugin_does_not_import_the_sdk() -> None:
    code = "import sys, discoverd.plugins.docker as p; p.discoverd_register_sources(); "
    code += "print('docker' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"docker\.timeout"):
        make_source(make_ctx("unix:///nonexistent.sock", timeout=0))
    with pytest.raises(ConfigError, match="bogus"):
        make_source(make_ctx("bogus://daemon"))


# --------------------------------------------------------------------------------------------
# Snapshots


def test_snapshot_of_a_whoami_container(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    source = new_source()
    container = whoami(docker_client)
    port = published_port(container)
    [instance] = of(source.snapshot(), container)
    container.reload()
    own_address = container.attrs["NetworkSettings"]["IPAddress"]
    assert instance == ServiceInstance(
        service="whoami",
        id=f"{HOST_ID}:{container.id[:12]}:8000:tcp",
        address=HOST_IP,
        port=port,
        protocol="tcp",
        frontend_port=8000,
        # Where the application listens on this host, for this host's discover role.
        meta=(("container_address", f"{own_address}:8000"),),
        host_id=HOST_ID,
    )


def test_no_container_address_without_an_address_of_its_own_nor_for_udp(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    source = new_source()
    udp = run_plain(
        docker_client,
        ports={"9000/udp": ("127.0.0.1", None), "9001/tcp": ("127.0.0.1", None)},
    )
    found = {i.protocol: i for i in of(source.snapshot(), udp)}
    assert "container_address" not in found["udp"].meta_dict
    assert found["tcp"].meta_dict["container_address"].endswith(":9001")
    # An odd inspect (no address, an address that cannot be one) publishes none either.
    bare = dataclasses.replace(found["tcp"], meta=())
    inspected = _read_inspect({"NetworkSettings": {"IPAddress": "127.0.0.1"}, "State": {}})
    assert _with_local_address(inspected, bare) is bare
    assert _with_local_address(_read_inspect({}), bare) is bare


def test_without_host_ip_the_binding_address_is_used(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    source = new_source(host_ip="", single_machine=True)
    container = whoami(docker_client)
    [instance] = of(source.snapshot(), container)
    assert (instance.address, instance.port) == ("127.0.0.1", published_port(container))


def test_a_port_published_on_loopback_only_is_not_published_to_other_hosts_silently(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    source = new_source(host_ip="")
    container = whoami(docker_client)
    snapshot = source.snapshot()
    assert of(snapshot, container) == []
    [problem] = problems_of(snapshot, container)
    assert "127.0.0.1:" in problem and "HOST_IP" in problem and "single_machine" in problem


def test_labels_and_environment(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    source = new_source()
    both = whoami(
        docker_client,
        labels={"SERVICE_NAME": "from-label"},
        environment={"SERVICE_NAME": "from-env", "SERVICE_TAGS": "env-tag,two"},
    )
    env_only = whoami(docker_client, environment={"SERVICE_NAME": "env-only"})
    per_port = whoami(
        docker_client,
        labels={"SERVICE_8000_NAME": "port-name", "SERVICE_TAGS": "label-tag"},
        environment={"SERVICE_NAME": "from-env", "SERVICE_TAGS": "env-tag"},
    )
    snapshot = source.snapshot()
    [first] = of(snapshot, both)
    assert (first.service, first.tags) == ("from-label", ("env-tag", "two"))
    [second] = of(snapshot, env_only)
    assert second.service == "env-only"
    [third] = of(snapshot, per_port)
    assert (third.service, third.tags) == ("port-name", ("label-tag",))


def test_service_ignore(new_source: SourceFactory, docker_client: docker.DockerClient) -> None:
    source = new_source()
    by_label = whoami(docker_client, labels={"SERVICE_IGNORE": "true"})
    by_env = whoami(docker_client, environment={"SERVICE_IGNORE": "1"})
    kept = whoami(docker_client, labels={"SERVICE_IGNORE": "false"})
    snapshot = source.snapshot()
    assert of(snapshot, by_label) == [] and problems_of(snapshot, by_label) == []
    assert of(snapshot, by_env) == [] and problems_of(snapshot, by_env) == []
    assert len(of(snapshot, kept)) == 1


@pytest.mark.parametrize(
    ("label", "value"),
    [
        ("SERVICE_NAME", "bad\nname"),
        ("SERVICE_TAGS", "fine,{oops}"),
        ("SERVICE_DRAIN", "x" * 10_000),
        ("SERVICE_8000_PORT", "99999"),
    ],
)
def test_hostile_labels_skip_only_that_port(
    new_source: SourceFactory,
    docker_client: docker.DockerClient,
    label: str,
    value: str,
) -> None:
    source = new_source()
    hostile = whoami(docker_client, name=f"hostile-{label.lower()}", labels={label: value})
    fine = whoami(docker_client)
    snapshot = source.snapshot()
    assert of(snapshot, hostile) == []
    [problem] = problems_of(snapshot, hostile)
    assert f"hostile-{label.lower()}" in problem
    assert label in problem
    assert "\n" not in problem
    assert [i.service for i in of(snapshot, fine)] == ["whoami"]
    assert problems_of(snapshot, fine) == []


def test_two_published_ports_give_two_named_instances(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    source = new_source()
    container = run_plain(
        docker_client,
        ports={"8000/tcp": ("127.0.0.1", None), "9000/udp": ("127.0.0.1", None)},
    )
    tcp_port = published_port(container, "8000/tcp")
    udp_port = published_port(container, "9000/udp")
    found = {
        (i.service, i.protocol, i.port, i.frontend_port) for i in of(source.snapshot(), container)
    }
    assert found == {("whoami-8000", "tcp", tcp_port, 8000), ("whoami-9000", "udp", udp_port, 9000)}


def test_ipv6_binding_beside_ipv4_is_not_a_second_instance(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    source = new_source(host_ip="", single_machine=True)
    container = run_plain(docker_client, ports={"8000/tcp": [("127.0.0.1", None), ("::1", None)]})
    [instance] = of(source.snapshot(), container)
    assert instance.address == "127.0.0.1"


def test_stopped_container_disappears_and_leaves_the_cache(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    source = new_source()
    staying = whoami(docker_client)
    leaving = whoami(docker_client)
    snapshot = source.snapshot()
    assert len(of(snapshot, staying)) == 1 and len(of(snapshot, leaving)) == 1
    assert {staying.id, leaving.id} <= source.inspected()
    leaving.stop(timeout=10)
    snapshot = source.snapshot()
    assert len(of(snapshot, staying)) == 1
    assert of(snapshot, leaving) == []
    assert staying.id in source.inspected() and leaving.id not in source.inspected()


def test_a_die_event_hides_the_container_before_the_list_catches_up(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    """The daemon sends ``die`` before its list stops showing the container as running; the
    source trusts the event (seen in the end-to-end walkthrough: a killed container stayed
    registered because the snapshot after its ``die`` still listed it)."""
    source = new_source()
    container = whoami(docker_client)
    [instance] = routed(source, container)
    # The event as the stream delivers it, while the container still runs.
    source.note_event({"Type": "container", "Action": "die", "id": container.id})
    assert len(of(source.snapshot(), container)) == 1  # still listed as running...
    assert source.stopping() == {instance.id}  # ... and named as leaving
    assert routed(source, container) == []
    source.note_event({"Type": "container", "Action": "start", "id": container.id})
    assert routed(source, container) == [instance]
    source.note_event({"Actor": {"ID": container.id}, "Action": "destroy"})
    container.remove(force=True)
    source.snapshot()
    assert source.stopping() == frozenset()  # gone from the list: the hint is dropped


def test_healthcheck_decides_eligibility(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    source = new_source()
    ms = 1_000_000
    healthy = run_plain(docker_client, healthcheck={"test": ["CMD", "true"], "interval": 100 * ms})
    unhealthy = run_plain(
        docker_client,
        healthcheck={"test": ["CMD", "false"], "interval": 100 * ms, "retries": 1},
    )
    starting = run_plain(
        docker_client, healthcheck={"test": ["CMD", "true"], "interval": 3600_000 * ms}
    )

    def health(container: Container) -> str:
        container.reload()
        return str(container.attrs["State"]["Health"]["Status"])

    wait_for(lambda: health(healthy) == "healthy", 30, what="healthy container")
    wait_for(lambda: health(unhealthy) == "unhealthy", 30, what="unhealthy container")
    assert health(starting) == "starting"
    snapshot = source.snapshot()
    assert len(of(snapshot, healthy)) == 1
    assert of(snapshot, unhealthy) == []
    assert of(snapshot, starting) == []


def test_paused_container_is_not_eligible(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    source = new_source()
    container = whoami(docker_client)
    container.pause()
    try:
        assert of(source.snapshot(), container) == []
    finally:
        container.unpause()
    assert len(of(source.snapshot(), container)) == 1


def test_missing_daemon_socket_is_unavailable(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/missing.sock"
    source = make_source(make_ctx(url))
    try:
        with pytest.raises(Unavailable, match=r"missing\.sock") as raised:
            source.snapshot()
        assert "\n" not in str(raised.value)
        with pytest.raises(Unavailable, match=r"missing\.sock"):
            source.watch(lambda *_, **__: None, threading.Event())
    finally:
        source.close()


# --------------------------------------------------------------------------------------------
# Watch


class Watcher:
    """``source.watch`` in a thread, recording notifications and how the watch ended."""

    def __init__(self, source: DockerSource) -> None:
        self.source = source
        self.reasons: list[str] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.source.watch(lambda reason, services=None: self.reasons.append(reason), self.stop)
        except BaseException as exc:
            self.error = exc

    def saw(self, *reasons: str) -> bool:
        return any(r in self.reasons for r in reasons)

    def wait_connected(self) -> None:
        wait_for(lambda: self.saw("docker events connected"), 20, what="event stream")


def test_watch_notifies_and_stops(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    source = new_source()
    watcher = Watcher(source)
    try:
        watcher.wait_connected()
        container = whoami(docker_client)
        wait_for(lambda: watcher.saw("docker start"), 20, what="start event")
        container.stop(timeout=10)
        wait_for(lambda: watcher.saw("docker die", "docker stop"), 20, what="die/stop event")
    finally:
        watcher.stop.set()
        source.close()
        watcher.thread.join(20)
    assert not watcher.thread.is_alive()
    assert watcher.error is None


def test_watch_returns_once_stop_is_set(new_source: SourceFactory) -> None:
    source = new_source()
    watcher = Watcher(source)
    watcher.wait_connected()
    watcher.stop.set()  # no close(): the watch must notice on its own
    watcher.thread.join(20)
    assert not watcher.thread.is_alive()
    assert watcher.error is None


def test_close_unblocks_a_running_watch(new_source: SourceFactory) -> None:
    source = new_source()
    watcher = Watcher(source)
    watcher.wait_connected()
    source.close()
    watcher.thread.join(20)
    assert not watcher.thread.is_alive()
    assert watcher.error is None


def test_watch_reports_health_status(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    source = new_source()
    watcher = Watcher(source)
    try:
        watcher.wait_connected()
        run_plain(
            docker_client,
            healthcheck={"test": ["CMD", "true"], "interval": 100_000_000},
        )
        wait_for(
            lambda: watcher.saw("docker health_status: healthy"), 30, what="health_status event"
        )
    finally:
        watcher.stop.set()
        source.close()
        watcher.thread.join(20)
    assert watcher.error is None


# --------------------------------------------------------------------------------------------
# A daemon that dies (a dedicated daemon: the shared one must stay up for other tests)


def test_daemon_killed_and_restarted(
    docker_daemon_factory: Callable[[], DockerDaemon],
) -> None:
    daemon = docker_daemon_factory()  # stopped (and its containers with it) after the test
    client = daemon.client()
    source = make_source(make_ctx(daemon.host, host_ip="", single_machine=True))
    assert isinstance(source, DockerSource)
    try:
        container = run_whoami(client)
        [instance] = of(source.snapshot(), container)
        assert instance.port == published_port(container)

        watcher = Watcher(source)
        watcher.wait_connected()
        daemon.kill()
        watcher.thread.join(30)
        assert not watcher.thread.is_alive()
        assert watcher.error is None or isinstance(watcher.error, Unavailable)

        with pytest.raises(Unavailable, match=re.escape(daemon.host)) as raised:
            source.snapshot()
        assert "\n" not in str(raised.value)
        with pytest.raises(Unavailable, match=re.escape(daemon.host)):
            source.watch(lambda *_, **__: None, threading.Event())

        daemon.start()
        snapshot = source.snapshot()  # the container may come back stopped: both are fine
        assert len(of(snapshot, container)) <= 1

        again = Watcher(source)
        again.wait_connected()
        again.stop.set()
        again.thread.join(20)
        assert not again.thread.is_alive() and again.error is None
    finally:
        source.close()
        client.close()


# --------------------------------------------------------------------------------------------
# Odd daemon JSON (the pure helpers, fed what a hostile or old daemon could send)


def test_bindings_survive_odd_port_lists() -> None:
    assert _bindings(None) == ()
    assert _bindings("nonsense") == ()
    odd: list[Any] = [
        None,
        "8000/tcp",
        {"PrivatePort": 8000, "Type": "tcp"},  # exposed, not published
        {"PrivatePort": 8000, "PublicPort": "", "Type": "tcp", "IP": "0.0.0.0"},
        {"PrivatePort": 8000, "PublicPort": 0, "Type": "tcp"},
        {"PrivatePort": 8000, "PublicPort": 70000, "Type": "tcp"},
        {"PrivatePort": True, "PublicPort": 5000, "Type": "tcp"},
        {"PrivatePort": 8000, "PublicPort": 5000, "Type": "sctp"},
        {"PrivatePort": 8000, "PublicPort": 5000, "Type": "tcp", "IP": None},
        {"PrivatePort": "8001", "PublicPort": "5001", "Type": "udp", "IP": "127.0.0.1"},
    ]
    found = _bindings(odd)
    assert [(b.private_port, b.protocol, b.host_ip, b.host_port) for b in found] == [
        (8000, "tcp", "", 5000),
        (8001, "udp", "127.0.0.1", 5001),
    ]


def test_bindings_dedupe_and_prefer_ipv4() -> None:
    entry = {"PrivatePort": 8000, "PublicPort": 5000, "Type": "tcp", "IP": "0.0.0.0"}
    found = _bindings(
        [
            entry,
            dict(entry),
            {**entry, "IP": "::"},
            {**entry, "IP": "127.0.0.2", "PublicPort": 5002},
            {"PrivatePort": 9000, "PublicPort": 6000, "Type": "tcp", "IP": "::1"},
        ]
    )
    assert [(b.private_port, b.host_ip, b.host_port) for b in found] == [
        (8000, "0.0.0.0", 5000),
        (8000, "127.0.0.2", 5002),
        (9000, "::1", 6000),  # IPv6 only: kept
    ]


@pytest.mark.parametrize(
    ("entry", "eligible"),
    [
        ({"State": "running", "Status": "Up 3 seconds"}, True),
        ({"State": "running", "Status": "Up 3 minutes (healthy)"}, True),
        ({"State": "running", "Status": "Up 3 minutes (unhealthy)"}, False),
        ({"State": "running", "Status": "Up 1 second (health: starting)"}, False),
        ({"State": "paused", "Status": "Up 1 second (Paused)"}, False),
        ({"State": "running", "Health": {"Status": "healthy"}, "Status": "?"}, True),
        ({"State": "running", "Health": {"Status": "starting"}}, False),
        ({"Status": None}, True),
        ({}, True),
    ],
)
def test_eligibility(entry: dict[str, Any], eligible: bool) -> None:
    assert _eligible(entry) is eligible


def test_names_and_actions_from_odd_json() -> None:
    assert _container_name(["/web"]) == "web"
    assert _container_name(["/other/alias", "/web"]) == "web"
    assert _container_name(None) == ""
    assert _container_name([None, 3]) == ""
    assert _container_name(["/evil\nWARNING forged", "/only/alias"]) == ""


def test_odd_values_of_an_inspect_result() -> None:
    assert _container_address({"IPAddress": "172.17.0.2"}) == "172.17.0.2"
    networks = {"b": {"IPAddress": "10.1.0.2"}, "a": {"IPAddress": "metadata.internal"}}
    assert _container_address({"IPAddress": "", "Networks": networks}) == "10.1.0.2"
    assert _container_address({"Networks": {1: {}, "x": {"IPAddress": 5}}}) == ""
    assert _container_address(None) == ""
    assert _signal_number("SIGTERM") == _signal_number("TERM") == _signal_number(15) == 15
    assert _signal_number("SIGRTMIN+3") == int(signal.SIGRTMIN) + 3
    for odd in ("\u00b2", "SIGRTMIN+" + "9" * 50, "9" * 30, 10**30, ["15"], None, True, "0"):
        assert _signal_number(odd) is None, odd
    assert _watched_action({"Type": "container", "Action": "start"}) == "start"
    assert _watched_action({"status": "die"}) == "die"
    assert _watched_action({"Action": "health_status: healthy"}) == "health_status: healthy"
    assert _watched_action({"Action": "exec_start: sh"}) is None
    assert _watched_action({"Type": "network", "Action": "connect"}) is None
    assert _watched_action(["start"]) is None
    assert _watched_action({"Action": None}) is None


# --------------------------------------------------------------------------------------------
# Drain on stop, and where a readiness check reaches the application

# PID 1 takes its time to exit after TERM, like an application finishing its requests.
SLOW_EXIT = [
    "/bin/sh",
    "-c",
    'mkdir -p /www; echo "I am $(hostname)" > /www/index.html; '
    'trap "sleep 4; exit 0" TERM; httpd -f -p 8000 -h /www & while true; do sleep 1; done',
]
# The application listens only 3 s after the container started.
LATE_LISTENER = [
    "/bin/sh",
    "-c",
    'mkdir -p /www; echo "I am $(hostname)" > /www/index.html; trap "exit 0" TERM; '
    "sleep 3; httpd -f -p 8000 -h /www & wait",
]


def test_docker_stop_removes_the_instance_before_the_container_exits(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    """``docker stop`` sends TERM (a ``kill`` event) and the container runs on while it
    shuts down: the watch must take it out of the snapshot before it exits."""
    source = new_source()
    container = docker_client.containers.run(
        WHOAMI_IMAGE, SLOW_EXIT, detach=True, ports={"8000/tcp": ("127.0.0.1", None)}
    )
    watcher = Watcher(source)
    try:
        watcher.wait_connected()
        assert len(of(source.snapshot(), container)) == 1
        stopper = threading.Thread(target=container.stop, kwargs={"timeout": 20}, daemon=True)
        stopper.start()
        wait_for(lambda: watcher.saw("docker kill"), 20, what="kill event")
        assert routed(source, container) == []
        container.reload()
        assert container.status == "running"  # still shutting down, already out
        stopper.join(30)
    finally:
        watcher.stop.set()
        source.close()
        watcher.thread.join(20)
    assert watcher.error is None


def test_a_reload_signal_keeps_the_instance(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    source = new_source()
    container = whoami(docker_client)
    assert len(routed(source, container)) == 1
    event = {"Action": "kill", "Actor": {"ID": container.id, "Attributes": {"signal": "1"}}}
    source.note_event(event)
    assert len(routed(source, container)) == 1
    event["Actor"]["Attributes"]["signal"] = "15"  # type: ignore[index]
    source.note_event(event)
    assert routed(source, container) == []
    source.note_event({"Action": "start", "id": container.id})  # restarted
    assert len(routed(source, container)) == 1


def test_check_target_reaches_the_application_not_docker_proxy(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    """docker-proxy accepts a connection on the published port before the application
    listens; the check target (the container's own namespace) tells the truth."""
    source = new_source(host_ip="127.0.0.1")
    container = docker_client.containers.run(
        WHOAMI_IMAGE, LATE_LISTENER, detach=True, ports={"8000/tcp": ("127.0.0.1", None)}
    )
    [instance] = of(source.snapshot(), container)
    target = source.check_target(instance)
    assert target is not None and target.netns is not None and target.port == 8000
    assert target.netns.startswith("/proc/") and target.address.count(".") == 3
    tcp = CheckSpec(kind="tcp", timeout=1.0)
    http = CheckSpec(kind="http", path="/", timeout=1.0)
    # The application is not listening yet: a bare connect through docker-proxy succeeds...
    with socket.create_connection(("127.0.0.1", instance.port), timeout=2):
        pass
    # ... but the checks see the truth, in the namespace and through the published port.
    assert run_check(tcp, target, forwarded=False) is not None
    assert run_check(http, target, forwarded=False) is not None
    published = type(target)(address="127.0.0.1", port=instance.port)
    assert run_check(tcp, published, forwarded=True) is not None
    wait_for(lambda: run_check(tcp, target, forwarded=False) is None, 20, what="app listening")
    assert run_check(http, target, forwarded=False) is None
    assert run_check(tcp, published, forwarded=True) is None


def test_many_new_containers_are_inspected_together(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    """An agent starting on a busy host inspects the new containers several at a time; each
    still gets its own environment (the service name below comes from the inspect)."""
    containers = [whoami(docker_client, environment={"SERVICE_NAME": f"many{n}"}) for n in range(6)]
    source = new_source()
    snapshot = source.snapshot()
    for n, container in enumerate(containers):
        [found] = of(snapshot, container)
        assert found.service == f"many{n}"
        assert source.check_target(found) is not None


def test_the_images_own_stop_signal_drains_too(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    """`docker stop` sends the image's StopSignal (httpd: WINCH, systemd: RTMIN+3), not
    always TERM: that signal takes the container out as well, for that container only."""
    source = new_source()
    custom = run_plain(docker_client, stop_signal="SIGUSR2")
    plain = whoami(docker_client)
    snapshot = source.snapshot()
    assert len(of(snapshot, custom)) == 1 and len(of(snapshot, plain)) == 1
    for container in (custom, plain):
        event = {"Action": "kill", "Actor": {"ID": container.id, "Attributes": {"signal": "12"}}}
        source.note_event(event)
    assert routed(source, custom) == []  # USR2 is how this one is stopped
    assert len(routed(source, plain)) == 1  # for this one USR2 is just a signal


def test_a_start_event_begins_the_inspect_before_the_snapshot(
    new_source: SourceFactory, docker_client: docker.DockerClient
) -> None:
    """A ``start`` event begins the new container's inspect at once, and the snapshot that the
    event asks for takes it instead of inspecting again; a restart in between (another start)
    is never served the earlier inspect."""
    source = new_source()
    source.snapshot()  # connected
    client = source._api()
    inspected: list[str] = []
    real = client.inspect_container

    def counting(cid: str) -> Any:
        inspected.append(cid)
        return real(cid)

    client.inspect_container = counting
    container = whoami(docker_client, environment={"SERVICE_NAME": "early"})
    source.note_event({"Type": "container", "Action": "start", "id": container.id})
    wait_for(lambda: inspected == [container.id], 5, what="the inspect begun by the event")
    [found] = of(source.snapshot(), container)
    assert found.service == "early"
    assert inspected == [container.id]  # the snapshot took the early inspect
    assert source.check_target(found) is not None

    container.restart(timeout=1)  # a new process: the early inspect of the first is not used
    source.note_event({"Type": "container", "Action": "start", "id": container.id})
    source.note_event({"Type": "container", "Action": "start", "id": container.id})
    [again] = of(source.snapshot(), container)
    container.reload()
    published = {int(b["HostPort"]) for bound in container.ports.values() for b in bound or ()}
    assert again.service == "early" and again.port in published  # the new process's port
    assert inspected.count(container.id) >= 2
    assert source._early == {}  # nothing left behind
