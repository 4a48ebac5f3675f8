"""Backends whose application misbehaves behind docker-proxy (issue 9, "checks that see
through docker-proxy").

A port published on loopback goes through docker-proxy, which *accepts* a connection whether
or not the application inside listens, then closes it: a plain TCP check of the published port
never sees the application die.

- **a flapping backend**: one of three backends of a service listens for 300 ms, then not for
  300 ms, and so on, for 20 s of client requests, in tcp and in http mode. Expected: under 1 %
  of requests fail. Reported too: how many answers the flapping one gave, and the registry's
  writes per second (damping: at most one change per backend per few seconds).
- **an application that dies**: the application of one of three backends (tcp mode) is killed
  inside its container, which keeps running (docker-proxy keeps accepting). Expected: it is out
  of rotation (out of the proxy, or marked down by its health checks) within 1 s.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import FleetFactory
from tests.faults.harness import (
    EtcdUnderTest,
    flapping_whoami_command,
    moment_when,
    wait_until,
)
from tests.support.etcd import etcd_revision
from tests.support.haproxy import serving_servers
from tests.support.services import DockerDaemon, Etcd

pytestmark = [pytest.mark.services, pytest.mark.slow]

#: How long the clients run while one backend flaps.
WINDOW = 20.0
#: The share of failed requests a flapping backend may cost (issue 9).
FLAP_LIMIT = 0.01
#: A backend whose application died leaves rotation within this (issue 9).
DEAD_APP_LIMIT = 1.0


@pytest.mark.parametrize("mode", ["tcp", "http"])
def test_a_flapping_backend_costs_under_1_percent(
    mode: str, etcd: Etcd, docker_daemon: DockerDaemon, make_fleet: FleetFactory
) -> None:
    fleet = make_fleet(EtcdUnderTest([etcd.url]))
    host = fleet.add_host(docker_daemon)
    fleet.run_many(host, "web", 2, mode=mode)
    fleet.settle()
    prober = fleet.probe(host, "web")
    wait_until(lambda: prober.total() >= 20, 15, "the client's first answers")

    before = etcd_revision(etcd.url)
    flapper = fleet.run(host, "web", mode=mode, command=flapping_whoami_command(0.3))
    since = fleet.mark(f"backend {flapper.short_id} starts flapping every 300 ms")
    time.sleep(WINDOW)  # the measurement window
    fleet.stop_probes()
    writes = etcd_revision(etcd.url) - before

    failed, total = prober.failures(since), prober.total(since)
    share = failed / total if total else 1.0
    from_flapper = prober.answered_by(since).get(flapper.short_id, 0)
    text = fleet.report(
        f"a backend flapping every 300 ms behind docker-proxy, {mode} mode, {WINDOW:g}s",
        extra={
            "failed share": f"{share:.2%} (limit {FLAP_LIMIT:.0%})",
            "answers from the flapping backend": f"{from_flapper} of {total - failed}",
            "registry writes": f"{writes} ({writes / WINDOW:.2f}/s)",
        },
    )
    assert total > 0 and share < FLAP_LIMIT, text


def test_an_application_that_dies_leaves_rotation_within_1s(
    etcd: Etcd, docker_daemon: DockerDaemon, make_fleet: FleetFactory
) -> None:
    fleet = make_fleet(EtcdUnderTest([etcd.url]))
    host = fleet.add_host(docker_daemon)
    # The application (httpd) is not the container's main process: killing it leaves the
    # container running, and docker-proxy accepting on its published port.
    command = [
        "/bin/sh",
        "-c",
        'mkdir -p /www; echo "I am $(hostname)" > /www/index.html; trap "exit 0" TERM; '
        "httpd -f -p 8000 -h /www & while true; do sleep 1; done",
    ]
    backends = fleet.run_many(host, "web", 3, mode="tcp", command=command)
    fleet.settle()
    prober = fleet.probe(host, "web")
    wait_until(lambda: prober.total() >= 20, 15, "the client's first answers")

    victim = backends[0]
    killed = fleet.mark(f"the application of {victim.short_id} is killed; its container runs on")
    result = victim.container.exec_run(["killall", "httpd"])
    assert result.exit_code == 0, result.output

    def out_of_rotation() -> bool:
        return victim.endpoint not in serving_servers(host.state_dir, healthy_only=True).get(
            "web", set()
        )

    out = moment_when(out_of_rotation, DEAD_APP_LIMIT + 20, interval=0.02)
    time.sleep(2.0)  # requests after it left rotation: none may fail
    fleet.stop_probes()
    took = None if out is None else out - killed
    text = fleet.report(
        "a backend's application dies behind docker-proxy (its container runs on), tcp mode",
        extra={
            "out of rotation after": "never" if took is None else f"{took:.2f}s",
            "limit": f"{DEAD_APP_LIMIT:g}s",
            "failed after it left rotation": prober.failures(out) if out is not None else "-",
        },
    )
    assert took is not None and took <= DEAD_APP_LIMIT, text
    assert out is not None and prober.failures(out + 0.1) == 0, text
