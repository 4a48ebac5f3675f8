"""A service's frontend port is taken by another process on the host (issue 9, "per-service
blast radius"), with HAProxy and with nginx.

- **on a running host**: services ``alpha`` and ``beta`` are served; a backend of ``gamma``
  starts, whose frontend port another process already listens on (on this host's address).
  While the port stays taken, a new ``alpha`` backend is started: it must answer through the
  proxy (the client sees it) in the usual time. Then the port is freed: ``gamma`` must be
  served on its own.
- **on a fresh host**: the same three services exist before the agent starts, the port of
  ``gamma`` already taken: the proxy must start with ``alpha`` and ``beta``.

Expected: ``alpha`` and ``beta`` lose 0 requests; the taken port is reported naming ``gamma``
and the port (a problem of the agent's ``/healthz/ready``, or a warning or error in its log);
``gamma`` is served once the port is free.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import FleetFactory
from tests.faults.harness import EtcdUnderTest, moment_when, wait_until
from tests.support.probe import ask
from tests.support.services import DockerDaemon, Etcd

pytestmark = [pytest.mark.services, pytest.mark.slow]

PROXIES = [pytest.param("haproxy", id="haproxy"), pytest.param("nginx", id="nginx")]
#: A membership change of another service reaches the proxy within this while the port is
#: taken (its usual time is well under a second; nginx batches reloads, 1 s by default).
CHANGE_LIMIT = 5.0
#: How long the port stays taken after gamma's backend started.
TAKEN = 8.0
#: Deadline for gamma to be served once its port is free.
RETURN_DEADLINE = 45.0


@pytest.mark.parametrize("proxy", PROXIES)
def test_a_taken_frontend_port_costs_the_other_services_nothing(
    proxy: str, etcd: Etcd, docker_daemon: DockerDaemon, make_fleet: FleetFactory
) -> None:
    fleet = make_fleet(EtcdUnderTest([etcd.url]), proxy=proxy)
    host = fleet.add_host(docker_daemon)
    for service in ("alpha", "beta"):
        fleet.run_many(host, service, 2)
    fleet.settle()
    probers = fleet.probe_all(["alpha", "beta"])
    wait_until(lambda: all(p.total() >= 20 for p in probers), 15, "the clients' first answers")

    port = fleet.frontend("gamma")
    taker = fleet.take_port(host.ip, port)
    fleet.mark(f"another process listens on {host.ip}:{port}")
    fleet.run(host, "gamma")
    arrived = fleet.mark("a backend of gamma (frontend port taken) starts")
    wait_until(lambda: "gamma" in fleet.registry_view(["gamma"]), 15, "gamma's instance registered")

    newcomer = fleet.run(host, "alpha")
    change = fleet.mark(f"a new alpha backend {newcomer.short_id} starts")
    alpha = probers[0]
    moment_when(lambda: alpha.first_from(newcomer.short_id, change), CHANGE_LIMIT + 15)
    routed_at = alpha.first_from(newcomer.short_id, change)
    time.sleep(max(0.0, arrived + TAKEN - time.monotonic()))  # the port stays taken meanwhile
    was_reported = fleet.reported(host, "gamma", str(port))()

    fleet.release_port(taker)
    freed = fleet.mark(f"{host.ip}:{port} free again")
    served_at = moment_when(lambda: ask(port, 1.0, host.ip), RETURN_DEADLINE, interval=0.1)
    convergence = fleet.converge(freed, "the port was freed", 20)
    fleet.stop_probes()

    change_time = None if routed_at is None else routed_at - change
    back_time = None if served_at is None else served_at - freed
    text = fleet.report(
        f"a frontend port taken by another process ({proxy}): gamma cannot bind, alpha and "
        "beta go on",
        probers=probers,
        convergence=convergence,
        extra={
            "alpha change routed after": fmt(change_time),
            "taken port reported": was_reported,
            "gamma served after the port was freed": fmt(back_time),
        },
    )
    assert fleet.failed(probers) == 0, text
    assert change_time is not None and change_time <= CHANGE_LIMIT, text
    assert was_reported, text
    assert back_time is not None, text
    assert convergence.matched, text


@pytest.mark.parametrize("proxy", PROXIES)
def test_a_fresh_host_with_a_taken_port_serves_the_others(
    proxy: str, etcd: Etcd, docker_daemon: DockerDaemon, make_fleet: FleetFactory
) -> None:
    fleet = make_fleet(EtcdUnderTest([etcd.url]), proxy=proxy)
    host = fleet.add_host(docker_daemon, start=False)
    for service in ("alpha", "beta", "gamma"):
        fleet.run(host, service)
    port = fleet.frontend("gamma")
    taker = fleet.take_port(host.ip, port)
    fleet.mark(f"another process listens on {host.ip}:{port}")
    fleet.start_agent(host)
    started = fleet.mark("the agent starts on a fresh host")

    convergence = fleet.converge(started, "the agent's start", 30, services=["alpha", "beta"])
    probers = fleet.probe_all(["alpha", "beta"])
    time.sleep(2.0)  # a short window of requests to the services that can be served
    fleet.stop_probes()
    fleet.release_port(taker)
    freed = fleet.mark(f"{host.ip}:{port} free again")
    served_at = moment_when(lambda: ask(port, 1.0, host.ip), RETURN_DEADLINE, interval=0.1)
    back_time = None if served_at is None else served_at - freed
    text = fleet.report(
        f"a fresh host whose port of gamma is taken ({proxy}): alpha and beta served",
        probers=probers,
        convergence=convergence,
        extra={"gamma served after the port was freed": fmt(back_time)},
    )
    assert convergence.matched, text
    assert fleet.failed(probers) == 0, text
    assert back_time is not None, text


def fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}s"
