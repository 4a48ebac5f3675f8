"""HAProxy's own health checks and passive health, against a real HAProxy (and real Docker where
docker-proxy matters): what takes a dead backend out of rotation on the discover side alone,
without the register role (a frozen agent, a lost host, or before its deregistration lands).

The register role's side (checks in the container's namespace, the listen probe, damping) and
the whole stack (a flapping backend, an application that dies, both modes) are in
``tests/core/test_readiness.py`` and ``tests/faults/test_flapping.py``.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Iterator

import docker
import pytest

from discoverd import Service, ServiceInstance
from discoverd.plugins.haproxy.proxy import HAProxy
from tests.plugins.haproxy.conftest import NameServer
from tests.support.haproxy import haproxy_cli
from tests.support.probe import Prober
from tests.support.services import (
    WHOAMI_IMAGE,
    free_port,
    http_get,
    published_port,
    wait_for,
)

pytestmark = pytest.mark.services

#: A whoami whose application (httpd) is not the container's main process: killing it leaves
#: the container running and docker-proxy accepting on its published port.
KILLABLE = [
    "/bin/sh",
    "-c",
    'mkdir -p /www; echo "I am $(hostname)" > /www/index.html; '
    "httpd -f -p 8000 -h /www & echo $! > /tmp/app.pid; "
    'trap "exit 0" TERM; while :; do sleep 1 & wait $!; done',
]


def server_stats(proxy: HAProxy, backend: str) -> dict[str, dict[str, str]]:
    """``show stat`` of one backend's servers: server name -> column -> value."""
    text = haproxy_cli(proxy.dir.parent, "show stat")
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {
        row["svname"]: row
        for row in rows
        if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND")
    }


@pytest.fixture
def killable(
    docker_client: docker.DockerClient, cleanup_containers: None
) -> Iterator[Callable[[], ServiceInstance]]:
    """``killable()`` runs a whoami (KILLABLE) published on 127.0.0.1 and returns its instance
    once its application answers at the published port."""

    def run() -> ServiceInstance:
        container = docker_client.containers.run(
            WHOAMI_IMAGE, KILLABLE, detach=True, ports={"8000/tcp": ("127.0.0.1", None)}
        )
        port = published_port(container)
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: http_get(url, timeout=1).startswith("I am"), 30, what="the application")
        return ServiceInstance(
            service="web",
            id=f"host1:{container.id[:12]}:8000:tcp",
            address="127.0.0.1",
            port=port,
            host_id="host1",
        )

    yield run


def test_http_checks_take_a_dead_application_out_behind_docker_proxy(
    killable: Callable[[], ServiceInstance],
    make_haproxy: Callable[..., HAProxy],
    docker_client: docker.DockerClient,
) -> None:
    """http mode, three backends behind docker-proxy; one's application is killed while its
    container (and docker-proxy) runs on. A TCP check of the published port still succeeds
    (before: never marked down, chkfail 0); an HTTP check does not. The server that dies was
    added at run time, so the checks of runtime-added servers are tested too."""
    first, second, victim = killable(), killable(), killable()
    port = free_port()
    proxy = make_haproxy(check_interval="1s")
    two = Service("web", port, mode="http", instances=(first, second))
    proxy.apply(proxy.render([two]), [two])
    three = Service("web", port, mode="http", instances=(first, second, victim))
    assert proxy.apply(proxy.render([three]), [three]) == "runtime"
    name = victim.id
    host = name.split(":")[1]
    with Prober(port, interval=0.005, name="web") as prober:
        wait_for(lambda: prober.first_from(host) is not None, 15, what="the victim's answers")
        time.sleep(1.5)  # a few checks pass first
        sessions = int(server_stats(proxy, "web")[name]["stot"])
        killed = time.monotonic()
        exec_result = docker_client.containers.get(host).exec_run(
            ["sh", "-c", "kill $(cat /tmp/app.pid)"]
        )
        assert exec_result.exit_code == 0, exec_result.output
        down: float | None = None
        while time.monotonic() - killed < 5.0:
            stats = server_stats(proxy, "web")[name]
            if stats["status"].startswith("DOWN"):
                down = time.monotonic()
                break
            time.sleep(0.02)
        at_down = server_stats(proxy, "web")[name]
        time.sleep(1.0)  # nothing more may reach it
    final = server_stats(proxy, "web")[name]
    took = None if down is None else down - killed
    reached = int(at_down["stot"]) - sessions
    text = (
        f"marked down {'never' if took is None else f'{took:.2f}s'} after the kill "
        f"(check every 1s, 100 ms after a failure: expected about 0.1-1.1 s); requests that "
        f"reached it after the kill: {reached}, after it was down: "
        f"{int(final['stot']) - int(at_down['stot'])}; chkfail {final['chkfail']}, "
        f"last check {final['check_status']}; clients: {prober.describe(killed)}"
    )
    print(text)  # the figures: pytest -rP shows them
    assert took is not None and took < 2.5, text
    assert int(final["stot"]) - int(at_down["stot"]) <= 1, text
    assert prober.failures(killed) == 0, text  # each request that reached it was replayed


def test_a_refused_connection_marks_a_tcp_server_down_at_once(
    backends: Callable[..., NameServer], make_haproxy: Callable[..., HAProxy]
) -> None:
    """tcp mode, checks only every 10 s: a server that refuses connections (here its port is
    closed; behind docker-proxy, when the whole host or its Docker daemon is gone) is marked
    down by the first connection that fails (observe layer4, on-error sudden-death, one fast
    check), and the client's connection is retried on the other server."""
    good, gone = backends("good"), backends("gone")
    port = free_port()
    proxy = make_haproxy(check_interval="10s")
    web = Service(
        "web", port, mode="tcp", instances=(good.instance("web", port), gone.instance("web", port))
    )
    proxy.apply(proxy.render([web]), [web])
    url = f"http://127.0.0.1:{port}/"
    wait_for(lambda: http_get(url) == "I am good\n", 10, what="web")
    name = gone.instance("web", port).id
    wait_for(lambda: server_stats(proxy, "web")[name]["status"] == "UP", 10, what="gone up")
    with Prober(port, interval=0.01, name="web") as prober:
        wait_for(lambda: prober.total() > 5, 10, what="the client's first answers")
        gone.stop()
        stopped = time.monotonic()
        down: float | None = None
        while time.monotonic() - stopped < 5.0:
            if server_stats(proxy, "web")[name]["status"].startswith("DOWN"):
                down = time.monotonic()
                break
            time.sleep(0.02)
        time.sleep(0.5)
    took = None if down is None else down - stopped
    stats = server_stats(proxy, "web")[name]
    text = (
        f"marked down {'never' if took is None else f'{took:.2f}s'} after its port closed "
        f"(checks every 10s); chkfail {stats['chkfail']}, redispatched {stats['wredis']}; "
        f"clients: {prober.describe(stopped)}"
    )
    print(text)  # the figures: pytest -rP shows them
    assert took is not None and took < 2.0, text
    # Only the request it was serving when it stopped may fail; every later one is retried.
    assert prober.failures(stopped + 0.1) == 0, text
