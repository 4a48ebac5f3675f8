"""The Docker daemon of a host crashes and restarts, with containers changed meanwhile (issue 9).

Host A runs its own daemon (this test alone abuses it) with three backends; host B one. dockerd
on A is SIGKILLed (containerd and the containers keep running), one of A's backends dies while
dockerd is down (its process is sent SIGTERM from the host, as `docker stop` would; a graceful
backend finishes what it serves and exits), dockerd starts again 3 s later, and a
new backend is started on A at once. With Docker's ``live-restore`` the two other backends keep
running; without it (Docker's default) the restarted dockerd stops every container that ran
through its outage, so none of A's old backends survives.

Expected: 0 failed requests on both hosts, and the registry and both proxies match what Docker
runs once the daemon is back (the dead backends gone, the new one routed).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from tests.faults.conftest import FleetFactory
from tests.faults.harness import EtcdUnderTest, wait_until
from tests.support.services import DockerDaemon, Etcd

pytestmark = [pytest.mark.services, pytest.mark.slow]

#: How long dockerd stays down.
DOWN = 3.0
#: Deadline for the registry and the proxies to match reality after dockerd is back.
DEADLINE = 60.0


@pytest.mark.parametrize("live_restore", [True, False], ids=["live-restore", "no-live-restore"])
def test_docker_daemon_restarted_with_containers_changed_meanwhile(
    live_restore: bool,
    etcd: Etcd,
    docker_daemon_factory: Callable[..., DockerDaemon],
    docker_daemon2: DockerDaemon,
    make_fleet: FleetFactory,
) -> None:
    daemon = docker_daemon_factory(live_restore=live_restore)
    fleet = make_fleet(EtcdUnderTest([etcd.url]))
    host_a = fleet.add_host(daemon)
    fleet.add_host(docker_daemon2)
    backends = fleet.run_many(host_a, "web", 3)
    fleet.run(fleet.hosts[1], "web")
    fleet.settle()
    probers = fleet.probe_all()
    wait_until(lambda: all(p.total() >= 20 for p in probers), 15, "the clients' first answers")

    victim = backends[0]
    victim.container.reload()
    victim_pid = int(victim.container.attrs["State"]["Pid"])
    assert victim_pid > 0

    daemon.kill()
    fleet.mark("dockerd A SIGKILL")
    # Its process is told to stop (as `docker stop` would) while nobody can tell discoverd: it
    # finishes what it serves and exits. (Killed with SIGKILL, a response it was sending would
    # be cut after its headers: no proxy can replay that, whatever the daemon does.)
    os.kill(victim_pid, signal.SIGTERM)
    fleet.mark(f"backend {victim.short_id} dies while dockerd is down")
    time.sleep(DOWN)  # the outage itself
    daemon.start()
    host_a.reconnect()
    back = fleet.mark("dockerd A answers again")
    fresh = fleet.run(host_a, "web")
    fleet.mark(f"backend {fresh.short_id} started")

    convergence = fleet.converge(back, "dockerd's restart", DEADLINE)
    fleet.stop_probes()
    expected = 2 if live_restore else 0
    running = {c.id for c in host_a.client().containers.list(sparse=True)}
    survivors = [b.short_id for b in backends if b.container.id in running]
    text = fleet.report(
        f"Docker daemon SIGKILLed and restarted {DOWN:g}s later "
        f"({'with' if live_restore else 'without'} live-restore), one backend died meanwhile, "
        "one started after, 2 hosts",
        convergence=convergence,
        extra={"old backends of host A still running": len(survivors), "expected": expected},
    )
    assert len(survivors) == expected, text  # the fault happened as described
    assert fleet.failed() == 0, text
    assert convergence.matched, text
