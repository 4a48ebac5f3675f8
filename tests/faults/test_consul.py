"""Consul goes away (issue 9).

- **an agent restarted**: the ``-dev`` agent both hosts talk to is stopped and started again on
  the same ports; a dev agent keeps its catalog in memory, so it comes back *empty* and every
  host must register its instances again;
- **a 3-server cluster loses its leader**: three server agents, one per loopback address
  (``tests.support.consul.ConsulCluster``, ``raft_multiplier = 1``); each host talks to one of
  the two followers, and the leader is SIGKILLed. A backend is started right after, while the
  cluster elects a new leader.

Check TTL 5 s (``--set consul.ttl=5``). Expected: 0 failed requests on both hosts, and the
registry (the passing instances) and both proxies match what Docker runs once Consul is back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import service_unavailable
from tests.faults.conftest import FleetFactory
from tests.faults.harness import TTL, ConsulUnderTest, wait_until
from tests.support.consul import Consul, ConsulCluster
from tests.support.services import DockerDaemon, ServiceUnavailable, require_binary

pytestmark = [pytest.mark.services, pytest.mark.slow]

#: Deadline for the registry and the proxies to match reality after Consul is back.
DEADLINE = 45.0


@pytest.fixture
def consul_agent(tmp_path: Path) -> Iterator[Consul]:
    """A ``consul agent -dev`` on loopback ports, new for this test."""
    try:
        require_binary("consul")
        agent = Consul(tmp_path / "consul")
        agent.start()
    except ServiceUnavailable as exc:
        service_unavailable(str(exc))
    yield agent
    agent.stop()


@pytest.fixture
def consul_cluster(tmp_path: Path) -> Iterator[ConsulCluster]:
    """Three Consul servers on three loopback addresses, new for this test."""
    try:
        require_binary("consul")
        cluster = ConsulCluster(tmp_path / "consul-cluster")
        cluster.start()
    except ServiceUnavailable as exc:
        service_unavailable(str(exc))
    yield cluster
    cluster.stop()


def test_consul_agent_restarted_empty(
    consul_agent: Consul,
    docker_daemon: DockerDaemon,
    docker_daemon2: DockerDaemon,
    make_fleet: FleetFactory,
) -> None:
    fleet = make_fleet(ConsulUnderTest([consul_agent.address]))
    for daemon in (docker_daemon, docker_daemon2):
        host = fleet.add_host(daemon)
        fleet.run_many(host, "web", 2)
    fleet.settle()
    probers = fleet.probe_all()
    wait_until(lambda: all(p.total() >= 20 for p in probers), 15, "the clients' first answers")

    fleet.mark("Consul agent stopped")
    consul_agent.restart()  # wipes its data directory: it comes back with nothing registered
    back = fleet.mark("Consul agent answers again, empty")

    convergence = fleet.converge(back, "the agent's restart", DEADLINE)
    fleet.stop_probes()
    text = fleet.report(
        f"Consul -dev agent restarted empty (check TTL {TTL}s), 2 hosts", convergence=convergence
    )
    assert fleet.failed() == 0, text
    assert convergence.matched, text


def test_consul_cluster_loses_its_leader(
    consul_cluster: ConsulCluster,
    docker_daemon: DockerDaemon,
    docker_daemon2: DockerDaemon,
    make_fleet: FleetFactory,
) -> None:
    leader = consul_cluster.leader()
    assert leader is not None
    followers = [s for i, s in enumerate(consul_cluster.servers) if i != leader]
    fleet = make_fleet(ConsulUnderTest([s.http_address for s in followers]))
    host_a = fleet.add_host(docker_daemon)
    host_b = fleet.add_host(docker_daemon2)
    fleet.run_many(host_a, "web", 2)
    fleet.run_many(host_b, "web", 2)
    fleet.settle()
    probers = fleet.probe_all()
    wait_until(lambda: all(p.total() >= 20 for p in probers), 15, "the clients' first answers")

    killed = fleet.mark(f"Consul leader {consul_cluster.servers[leader].name} SIGKILL")
    consul_cluster.kill(leader)
    fleet.run(host_a, "web")
    fleet.mark("a backend started during the election")

    convergence = fleet.converge(killed, "the leader's SIGKILL", DEADLINE)
    fleet.stop_probes()
    new_leader = consul_cluster.leader()
    text = fleet.report(
        f"Consul 3-server cluster loses its leader (check TTL {TTL}s), 2 hosts",
        convergence=convergence,
        extra={
            "new leader": "none" if new_leader is None else consul_cluster.servers[new_leader].name
        },
    )
    assert fleet.failed() == 0, text
    assert convergence.matched, text
