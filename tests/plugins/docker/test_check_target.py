"""The readiness check never loses its namespace (issue 10): the Docker source's check target
names the container's current process, and a check whose process is gone never falls back to
the published port. Against a real Docker daemon and real containers."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import docker
import pytest

from discoverd import CheckTarget, HostInfo, PluginContext, ServiceInstance, build_config
from discoverd.core.checks import CheckSpec
from discoverd.core.readiness import Readiness
from discoverd.plugins.docker import make_source
from discoverd.plugins.docker.config import DockerConfig
from discoverd.plugins.docker.source import DockerSource
from tests.support.services import DockerDaemon, run_whoami, wait_for

if TYPE_CHECKING:
    from docker.models.containers import Container

pytestmark = [pytest.mark.services, pytest.mark.usefixtures("cleanup_containers")]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="entering a network namespace needs root")


@pytest.fixture
def source(docker_daemon: DockerDaemon) -> Iterator[DockerSource]:
    """A source whose watch does not run: no event reaches it, as when its events are late
    (a busy agent) or were missed (a reconnecting watch)."""
    ctx = PluginContext(
        config=build_config(DockerConfig, {"host": docker_daemon.host}, section="docker"),
        host=HostInfo(ip="127.0.0.1", id="testhost"),
        state_dir=Path("."),
    )
    made = make_source(ctx)
    assert isinstance(made, DockerSource)
    yield made
    made.close()


def instance_of(source: DockerSource, container: Container) -> ServiceInstance:
    marker = f":{container.id[:12]}:"
    [found] = [i for i in source.snapshot().instances if marker in i.id]
    return found


def current_pid(container: Container) -> int:
    container.reload()
    return int(container.attrs["State"]["Pid"])


@needs_root
def test_a_restart_the_source_has_not_heard_of_yet_gives_the_new_process(
    source: DockerSource, docker_client: docker.DockerClient
) -> None:
    """The inspect result (and its process id) was cached by container id and forgotten only
    on the ``start`` event; a snapshot taken before that event is read (a late or missed
    event) named the old process, whose namespace no longer exists."""
    container = run_whoami(docker_client)
    first = instance_of(source, container)
    before = source.check_target(first)
    assert before is not None and before.netns == f"/proc/{current_pid(container)}/ns/net"
    for round_ in range(3):
        container.restart(timeout=5)
        again = instance_of(source, container)
        target = source.check_target(again)
        pid = current_pid(container)
        assert target is not None, f"restart {round_ + 1}: no check target"
        assert target.netns == f"/proc/{pid}/ns/net", f"restart {round_ + 1}: stale process"
        assert os.path.exists(target.netns)


class Answering:
    """An HTTP/1 server on 127.0.0.1: what a published port may reach once the stopped
    container's port was given to another container."""

    def __init__(self) -> None:
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_HEAD = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@needs_root
def test_a_check_after_the_container_stopped_never_reaches_the_published_port(
    source: DockerSource, docker_client: docker.DockerClient
) -> None:
    """The check of a container that stopped before the register role heard of it (the
    ``kill`` event still in flight on a busy agent) found ``/proc/<pid>`` gone and checked the
    published port instead, where another application may answer by then."""
    container = run_whoami(docker_client)
    found = instance_of(source, container)
    target = source.check_target(found)
    assert target is not None and target.netns
    container.stop(timeout=5)
    assert not os.path.exists(target.netns)
    other = Answering()
    stale = dataclasses.replace(found, address="127.0.0.1", port=other.port)
    notes: list[str] = []
    readiness = Readiness(CheckSpec("tcp", timeout=0.5), lambda i: target, notes.append)
    try:
        assert readiness.update({stale.id: stale}, first_wait=1.0) == set()
        wait_for(lambda: readiness.reason(stale.id) != "", 5, what="a check")
        assert "gone" in readiness.reason(stale.id), readiness.reason(stale.id)
    finally:
        readiness.close()
        other.close()


@needs_root
def test_a_stale_target_is_replaced_at_the_next_snapshot(
    source: DockerSource, docker_client: docker.DockerClient
) -> None:
    """A check that finds its process gone asks for a new snapshot (the notification), and
    the instance answers again once the source names the restarted process."""
    container = run_whoami(docker_client)
    found = instance_of(source, container)
    notes: list[str] = []
    targets: dict[str, CheckTarget | None] = {found.id: source.check_target(found)}
    readiness = Readiness(
        CheckSpec("tcp", interval=0.1, timeout=0.5), lambda i: targets[i.id], notes.append
    )
    try:
        assert readiness.update({found.id: found}, first_wait=5.0) == {found.id}
        container.restart(timeout=5)
        wait_for(
            lambda: any("gone" in n for n in notes), 10, what=f"the stale target noticed {notes}"
        )
        again = instance_of(source, container)
        targets[again.id] = source.check_target(again)
        wait_for(
            lambda: readiness.update({again.id: again}, 0.0) == {again.id},
            15,
            what=f"ready again ({readiness.reason(again.id)!r}; {notes})",
        )
    finally:
        readiness.close()


# --------------------------------------------------------------------------------------------
# Mode detection against real containers: from inside their namespace, once.

ECHO = ["nc", "-ll", "-p", "7000", "-e", "/bin/cat"]  # says nothing, echoes what it gets
BANNER = ["nc", "-ll", "-p", "7000", "-e", "/bin/sh", "-c", "echo 220 ready; cat"]


def detected(source: DockerSource, containers: list[Container]) -> dict[str, str | None]:
    """The mode a detecting readiness finds for each container (by short id)."""
    found = {c.id[:12]: instance_of(source, c) for c in containers}
    readiness = Readiness(
        CheckSpec("tcp", interval=0.2, timeout=1.0),
        source.check_target,
        lambda reason: None,
        detect=True,
    )
    try:
        wanted = {i.id: i for i in found.values()}
        wait_for(
            lambda: readiness.update(wanted, 0.5) == set(wanted), 20, what="every container ready"
        )
        wait_for(lambda: len(readiness.modes()) == len(wanted), 20, what="every mode detected")
        modes = readiness.modes()
        return {short: modes.get(i.id) for short, i in found.items()}
    finally:
        readiness.close()


@needs_root
def test_modes_of_real_containers(source: DockerSource, docker_client: docker.DockerClient) -> None:
    from tests.support.services import BUSYBOX_IMAGE

    web = run_whoami(docker_client)
    ports = {"7000/tcp": ("127.0.0.1", None)}
    echo = docker_client.containers.run(BUSYBOX_IMAGE, ECHO, detach=True, ports=ports)
    banner = docker_client.containers.run(BUSYBOX_IMAGE, BANNER, detach=True, ports=ports)
    modes = detected(source, [web, echo, banner])
    assert modes == {web.id[:12]: "http", echo.id[:12]: "tcp", banner.id[:12]: "tcp"}


def test_no_namespace_for_a_process_this_agent_cannot_see() -> None:
    """An agent that does not see the host's processes (in a container without ``--pid
    host``) checks the published port from the start, rather than a namespace path that does
    not exist here (which now means: the process is gone)."""
    from discoverd.plugins.docker.source import _check_target, _Inspected, _process_start

    web = ServiceInstance(service="web", id="h:0123456789ab:8000:tcp", address="10.0.0.1",
                          port=30000)  # fmt: skip
    assert _process_start(999_999_999) == 0
    assert _check_target(_Inspected(image="web", env={}, pid=4242, started=0), web) is None
    seen = _Inspected(image="web", env={}, pid=os.getpid(), started=_process_start(os.getpid()))
    target = _check_target(seen, web)
    assert target is not None and target.netns == f"/proc/{os.getpid()}/ns/net"
    assert target.port == 8000
