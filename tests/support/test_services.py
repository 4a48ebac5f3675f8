"""The test suite's service launchers (tests.support.services), against real Docker and etcd."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors
import pytest

from tests.conftest import service_unavailable
from tests.support.services import (
    BUSYBOX_IMAGE,
    WHOAMI_IMAGE,
    DockerDaemon,
    Etcd,
    ServiceUnavailable,
    ensure_images,
    free_port,
    http_get,
    published_port,
    require_binary,
    run_whoami,
    wait_for,
)


def answer(port: int, host: str = "127.0.0.1", timeout: float = 15) -> str:
    """The whoami body on ``host:port``, retried: docker-proxy accepts before httpd listens."""
    url = f"http://{host}:{port}/"
    wait_for(lambda: http_get(url).startswith("I am "), timeout, what=f"an answer from {url}")
    return http_get(url).strip()


# -- helpers that need no service


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_wait_for_names_what_it_waited_for() -> None:
    calls: list[int] = []

    def never() -> bool:
        calls.append(1)
        raise ConnectionRefusedError("nope")

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="the moon") as info:
        wait_for(never, timeout=0.2, interval=0.05, what="the moon")
    assert 0.2 <= time.monotonic() - started < 2
    assert len(calls) >= 3
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    wait_for(lambda: True, timeout=0)


def test_require_binary_explains_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert Path(require_binary("sh")).name == "sh"
    with pytest.raises(ServiceUnavailable, match=r"install-deps\.sh"):
        require_binary("no-such-binary-discoverd")


def test_http_get_raises_when_nothing_listens() -> None:
    with pytest.raises(urllib.error.URLError):
        http_get(f"http://127.0.0.1:{free_port()}/", timeout=1)


# -- Docker Engine

services = pytest.mark.services


def command_lines() -> str:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return "\n".join(lines)


@services
def test_whoami_answers_on_its_published_loopback_port(
    docker_client: docker.DockerClient, cleanup_containers: None
) -> None:
    container = run_whoami(
        docker_client, labels={"SERVICE_NAME": "probe"}, environment={"GREETING": "hi"}
    )
    port = published_port(container)
    assert answer(port) == f"I am {container.id[:12]}"
    container.reload()
    assert container.labels["SERVICE_NAME"] == "probe"
    assert "GREETING=hi" in container.attrs["Config"]["Env"]
    binding = container.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]
    assert binding["HostIp"] == "127.0.0.1"
    # The trap in WHOAMI_COMMAND makes `docker stop` quick instead of waiting 10 s for SIGKILL.
    started = time.monotonic()
    container.stop(timeout=10)
    assert time.monotonic() - started < 5


@services
def test_images_are_tagged_and_ensure_images_is_idempotent(
    docker_client: docker.DockerClient,
) -> None:
    before = docker_client.images.get(WHOAMI_IMAGE).id
    ensure_images(docker_client)
    assert docker_client.images.get(WHOAMI_IMAGE).id == before
    assert docker_client.images.get(BUSYBOX_IMAGE).id == before
    assert WHOAMI_IMAGE.split("/")[1].split(":")[0] == "whoami"
    output = docker_client.containers.run(
        BUSYBOX_IMAGE, ["/bin/sh", "-c", "ls /bin/busybox && echo ok"], remove=True
    )
    assert output.decode().split() == ["/bin/busybox", "ok"]


@services
def test_two_daemons_run_side_by_side(
    docker_daemon: DockerDaemon, docker_daemon2: DockerDaemon, cleanup_containers: None
) -> None:
    assert docker_daemon.host != docker_daemon2.host
    one, two = docker_daemon.client(), docker_daemon2.client()
    try:
        assert one.info()["ID"] != two.info()["ID"]
        a = run_whoami(one, host_ip="127.0.0.1")
        b = run_whoami(two, host_ip="127.0.0.2", private_port=8080)
        assert answer(published_port(a)) == f"I am {a.id[:12]}"
        assert answer(published_port(b, "8080/tcp"), "127.0.0.2") == f"I am {b.id[:12]}"
        # Each daemon sees only its own container, on its own bridge and subnet.
        assert [c.id for c in one.containers.list()] == [a.id]
        assert [c.id for c in two.containers.list()] == [b.id]
        a.reload()
        b.reload()
        ip_a = a.attrs["NetworkSettings"]["IPAddress"]
        ip_b = b.attrs["NetworkSettings"]["IPAddress"]
        assert ip_a.rsplit(".", 1)[0] != ip_b.rsplit(".", 1)[0]
    finally:
        one.close()
        two.close()


@services
def test_docker_daemon_survives_kill_and_cleans_up(
    docker_daemon_factory: Callable[[], DockerDaemon],
) -> None:
    daemon = docker_daemon_factory()
    bridge = daemon.bridge
    assert bridge is not None and Path("/sys/class/net", bridge).exists()
    assert len(daemon.host) < 100
    client = daemon.client()
    try:
        old = run_whoami(client)
        assert answer(published_port(old)) == f"I am {old.id[:12]}"
    finally:
        client.close()

    daemon.kill()
    with pytest.raises(docker.errors.DockerException):
        daemon.client().ping()
    # Its pid file stays behind, as after a crash; start() copes.
    assert daemon.pid_file.exists()

    daemon.start()
    client = daemon.client()
    try:
        assert client.ping()
        # Without live-restore the restarted daemon stops what ran before the crash.
        old.reload()
        assert old.status == "exited"
        new = run_whoami(client)
        assert answer(published_port(new)) == f"I am {new.id[:12]}"
    finally:
        client.close()

    daemon.stop()
    assert not daemon.running
    assert not Path("/sys/class/net", bridge).exists()
    leftovers = command_lines()
    assert str(daemon.root) not in leftovers
    assert str(daemon.socket_dir) + "/" not in leftovers
    assert str(daemon.root) not in Path("/proc/self/mountinfo").read_text()


def test_docker_daemon_puts_sockets_in_a_short_directory(tmp_path: Path) -> None:
    long_root = tmp_path / ("x" * 80)
    daemon = DockerDaemon(long_root)
    try:
        assert len(daemon.host) < 100
        assert daemon.log_path == long_root / "dockerd.log"
        assert daemon.data_root == long_root / "data"
    finally:
        daemon.stop()
    assert not daemon.socket_dir.exists()


# -- etcd


def etcdctl(server: Etcd, *args: str) -> str:
    result = subprocess.run(
        [require_binary("etcdctl"), f"--endpoints={server.endpoint}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


@services
def test_etcd_keeps_its_data_and_ports_across_a_kill(etcd: Etcd) -> None:
    assert etcd.url == f"http://{etcd.endpoint}"
    assert etcd.endpoint.startswith("127.0.0.1:")
    assert http_get(etcd.url + "/health").strip().startswith("{")
    assert etcdctl(etcd, "put", "/discoverd-test/k", "v1").strip() == "OK"

    etcd.kill()
    with pytest.raises(OSError):
        http_get(etcd.url + "/health", timeout=1)

    etcd.start()
    assert etcdctl(etcd, "get", "/discoverd-test/k", "--print-value-only").strip() == "v1"


@services
def test_etcd_restarts_on_explicit_ports_after_stop(tmp_path: Path) -> None:
    try:
        require_binary("etcd")
    except ServiceUnavailable as exc:
        service_unavailable(str(exc))
    client_port, peer_port = free_port(), free_port()
    with Etcd(tmp_path / "e", client_port=client_port, peer_port=peer_port, name="solo") as server:
        assert server.endpoint == f"127.0.0.1:{client_port}"
        etcdctl(server, "put", "k", "before")
        server.stop()
        server.start()
        assert etcdctl(server, "get", "k", "--print-value-only").strip() == "before"
    assert (tmp_path / "e" / "etcd.log").read_text().strip()
    assert (tmp_path / "e" / "data").is_dir()


@pytest.mark.services
def test_a_test_bridge_keeps_its_mac_address_while_containers_come_and_go(
    docker_daemon: DockerDaemon, docker_client: docker.DockerClient
) -> None:
    """Without a fixed MAC a Linux bridge takes its lowest port's, so it changes with every
    container; the containers' ARP entries for the gateway then go stale and docker-proxy's
    connections wait seconds for retransmissions (seen as 3 s answers in the benchmarks)."""
    assert docker_daemon.bridge is not None
    address = Path("/sys/class/net", docker_daemon.bridge, "address")
    before = address.read_text().strip()
    assert before.startswith("02:")  # locally administered, set at creation
    containers = [run_whoami(docker_client) for _ in range(2)]
    try:
        assert address.read_text().strip() == before
    finally:
        for container in containers:
            container.remove(force=True)
    assert address.read_text().strip() == before
