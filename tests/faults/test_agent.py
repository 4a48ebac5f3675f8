"""The discoverd agent itself fails on one host (issue 9).

- **SIGKILL, restarted before or after the TTL**: host A's agent (both roles) is killed and
  started again 2 s later (its lease still runs) or TTL + 3 s later (its lease expired and its
  instances left the registry although its containers kept serving). A's proxy kept running
  meanwhile (it outlives discoverd on purpose), and a restarted agent adopts it. The service
  lives on host A only, so nothing else covers for it; host B's proxy routes to A's backends.
- **SIGSTOP for 20 s while containers come and go**: host A's agent hangs (longer than the
  TTL) while a backend is started and the oldest one stopped every 4 s on A; then SIGCONT.

Expected: 0 failed requests on both hosts, and the registry and both proxies match what Docker
runs soon after the agent is back.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import FleetFactory
from tests.faults.harness import TTL, EtcdUnderTest, wait_until
from tests.support.services import DockerDaemon, Etcd

pytestmark = [pytest.mark.services, pytest.mark.slow]

#: Deadline for the registry and the proxies to match reality after the agent is back.
DEADLINE = 30.0
#: How long the agent stays frozen, and how often a container comes and goes meanwhile.
FROZEN = 20.0
CHURN_EVERY = 4.0


@pytest.mark.parametrize(
    "down", [2.0, TTL + 3.0], ids=["restarted-before-the-ttl", "restarted-after-the-ttl"]
)
def test_agent_killed_and_restarted(
    down: float,
    etcd: Etcd,
    docker_daemon: DockerDaemon,
    docker_daemon2: DockerDaemon,
    make_fleet: FleetFactory,
) -> None:
    fleet = make_fleet(EtcdUnderTest([etcd.url]))
    host_a = fleet.add_host(docker_daemon)
    fleet.add_host(docker_daemon2)
    fleet.run_many(host_a, "web", 3)
    fleet.settle()
    probers = fleet.probe_all()
    wait_until(lambda: all(p.total() >= 20 for p in probers), 15, "the clients' first answers")

    agent = fleet.agent(host_a)
    agent.kill()
    fleet.mark("agent A SIGKILL")
    time.sleep(down)  # the fault itself: no agent on host A
    agent.start()
    back = fleet.mark("agent A started again")

    convergence = fleet.converge(back, "the agent's restart", DEADLINE)
    fleet.stop_probes()
    when = "before" if down < TTL else "after"
    text = fleet.report(
        f"agent SIGKILLed, restarted {down:g}s later ({when} the TTL of {TTL}s), 2 hosts",
        convergence=convergence,
    )
    assert fleet.failed() == 0, text
    assert convergence.matched, text


def test_agent_frozen_while_containers_come_and_go(
    etcd: Etcd,
    docker_daemon: DockerDaemon,
    docker_daemon2: DockerDaemon,
    make_fleet: FleetFactory,
) -> None:
    fleet = make_fleet(EtcdUnderTest([etcd.url]))
    host_a = fleet.add_host(docker_daemon)
    host_b = fleet.add_host(docker_daemon2)
    running = fleet.run_many(host_a, "web", 2)
    fleet.run(host_b, "web")
    fleet.settle()
    probers = fleet.probe_all()
    wait_until(lambda: all(p.total() >= 20 for p in probers), 15, "the clients' first answers")

    pid = fleet.agent(host_a).pid
    assert pid is not None
    frozen = fleet.freeze(pid, "agent A SIGSTOP")
    started = stopped = 0
    while time.monotonic() - frozen < FROZEN - CHURN_EVERY / 2:
        time.sleep(CHURN_EVERY - (time.monotonic() - frozen) % CHURN_EVERY)  # the churn's pace
        running.append(fleet.run(host_a, "web"))
        fleet.stop(running.pop(0))
        started, stopped = started + 1, stopped + 1
    time.sleep(max(0.0, FROZEN - (time.monotonic() - frozen)))  # frozen for FROZEN in all
    back = fleet.thaw(pid, "agent A SIGCONT")

    convergence = fleet.converge(back, "SIGCONT", DEADLINE)
    fleet.stop_probes()
    text = fleet.report(
        f"agent SIGSTOPped {FROZEN:g}s (TTL {TTL}s) while {started} containers started and "
        f"{stopped} stopped on its host, 2 hosts",
        convergence=convergence,
    )
    assert fleet.failed() == 0, text
    assert convergence.matched, text
