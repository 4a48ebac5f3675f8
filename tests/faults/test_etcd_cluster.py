"""A 3-member etcd cluster loses its leader (SIGKILL) while containers start and stop on two
hosts and clients send requests through both hosts' proxies (issue 9).

The agents are given the leader's endpoint first, so they lose the member they talk to *and*
the cluster has to elect a new leader: they must fail over to another member. Expected: 0 failed
requests on either host, and the registry and both proxies match what Docker runs once the
cluster has a leader again (registrations and the removal made during the election included).
"""

from __future__ import annotations

import pytest

from tests.faults.conftest import FleetFactory
from tests.faults.harness import EtcdUnderTest, wait_until
from tests.support.etcd import EtcdCluster
from tests.support.services import DockerDaemon

pytestmark = [pytest.mark.services, pytest.mark.slow]

#: Deadline for the registry and the proxies to match reality after the leader was killed.
DEADLINE = 30.0


def test_etcd_leader_killed_during_registrations_and_load(
    etcd_cluster: EtcdCluster,
    docker_daemon: DockerDaemon,
    docker_daemon2: DockerDaemon,
    make_fleet: FleetFactory,
) -> None:
    leader = etcd_cluster.leader()
    if leader is None:
        wait_until(lambda: etcd_cluster.leader() is not None, 15, "an etcd leader")
        leader = etcd_cluster.leader()
    assert leader is not None
    members = etcd_cluster.members
    ordered = [members[leader], *(m for i, m in enumerate(members) if i != leader)]
    fleet = make_fleet(EtcdUnderTest([m.url for m in ordered]))
    host_a = fleet.add_host(docker_daemon)
    host_b = fleet.add_host(docker_daemon2)
    old_a = fleet.run_many(host_a, "web", 2)
    fleet.run_many(host_b, "web", 2)
    fleet.settle()
    probers = fleet.probe_all()
    wait_until(lambda: all(p.total() >= 20 for p in probers), 15, "the clients' first answers")

    # A registration in flight when the leader dies, then more changes during the election.
    fleet.run(host_a, "web")
    killed = fleet.mark(f"etcd leader {members[leader].name} SIGKILL")
    etcd_cluster.kill(leader)
    fleet.run(host_b, "web")
    fleet.stop(old_a[0])
    fleet.mark("changes made during the election")
    fleet.run(host_a, "web")
    fleet.mark("a registration after the election")

    convergence = fleet.converge(killed, "the leader's SIGKILL", DEADLINE)
    fleet.stop_probes()
    new_leader = etcd_cluster.leader()
    text = fleet.report(
        "etcd 3-member cluster, leader SIGKILLed during registrations and load, 2 hosts",
        convergence=convergence,
        extra={"new leader": members[new_leader].name if new_leader is not None else "none"},
    )
    assert fleet.failed() == 0, text
    assert convergence.matched, text
