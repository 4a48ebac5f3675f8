"""What must still leave the proxies quickly, whatever keeps instances through registry
outages (issue 9, the counterpart of "no cliff at the TTL"):

- **a host that really died**: host A's agent, its proxy and its containers are killed at once
  (nothing deregisters anything). Its instances must leave host B's proxy within TTL + 2 s,
  and B's clients lose no request meanwhile (B has its own backend);
- **``docker stop``** takes an instance out of every proxy at once (issue 4 set a p99 of
  250 ms for this in the benchmarks; here the bound is 1 s, because this machine is shared and
  timings are noisy), with 0 failed requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from tests.faults.conftest import FleetFactory
from tests.faults.harness import TTL, EtcdUnderTest, Fleet, wait_until
from tests.support.discoverd import stop_proxies
from tests.support.services import DockerDaemon, Etcd

pytestmark = [pytest.mark.services, pytest.mark.slow]

#: A dead host's instances must leave the other proxies within this (issue 9).
DEAD_HOST_LIMIT = TTL + 2.0
#: ``docker stop`` -> the instance is out of every proxy within this (see the module doc).
STOP_LIMIT = 1.0


def out_of_every_proxy(fleet: Fleet, service: str, endpoint: str) -> Callable[[], bool]:
    def check() -> bool:
        return all(endpoint not in fleet.proxy_view(h).get(service, set()) for h in fleet.hosts)

    return check


def test_a_dead_host_leaves_the_proxies_within_ttl_plus_2s(
    etcd: Etcd,
    docker_daemon: DockerDaemon,
    docker_daemon2: DockerDaemon,
    make_fleet: FleetFactory,
) -> None:
    fleet = make_fleet(EtcdUnderTest([etcd.url]))
    host_a = fleet.add_host(docker_daemon)
    host_b = fleet.add_host(docker_daemon2)
    doomed = fleet.run_many(host_a, "web", 2)
    fleet.run(host_b, "web")
    fleet.settle()
    prober = fleet.probe(host_b, "web")
    wait_until(lambda: prober.total() >= 20, 15, "the client's first answers")

    died = fleet.mark("host A dies: agent, proxy and containers SIGKILLed")
    fleet.agent(host_a).kill()
    stop_proxies(host_a.state_dir, kill=True)
    for backend in doomed:
        backend.container.kill()

    convergence = fleet.converge(
        died, "host A died", DEAD_HOST_LIMIT + 20, hosts=[host_b], hold=0.5
    )
    fleet.stop_probes()
    took = convergence.times.get(f"proxy {host_b.name}")
    text = fleet.report(
        f"a host dies (agent, proxy, containers SIGKILLed; TTL {TTL}s): its instances leave "
        "the other host's proxy",
        convergence=convergence,
        extra={"limit": f"{DEAD_HOST_LIMIT:g}s"},
    )
    assert took is not None and took <= DEAD_HOST_LIMIT, text
    assert fleet.failed() == 0, text


def test_docker_stop_takes_an_instance_out_at_once(
    etcd: Etcd,
    docker_daemon: DockerDaemon,
    docker_daemon2: DockerDaemon,
    make_fleet: FleetFactory,
) -> None:
    fleet = make_fleet(EtcdUnderTest([etcd.url]))
    host_a = fleet.add_host(docker_daemon)
    host_b = fleet.add_host(docker_daemon2)
    backends = fleet.run_many(host_a, "web", 3)
    fleet.run(host_b, "web")
    fleet.settle()
    probers = fleet.probe_all()
    wait_until(lambda: all(p.total() >= 20 for p in probers), 15, "the clients' first answers")

    took: list[float] = []
    for backend in backends:
        # `docker stop` returns once the container exited (0.3 s after SIGTERM for this
        # backend): call it in the background and watch the proxies meanwhile.
        stopping = threading.Thread(target=fleet.stop, args=(backend,))
        stopped = fleet.mark(f"docker stop {backend.short_id}")
        stopping.start()
        gone = wait_until(
            out_of_every_proxy(fleet, "web", backend.endpoint),
            20,
            f"{backend.endpoint} out of every proxy",
            interval=0.005,
        )
        stopping.join()
        took.append(gone - stopped)
    convergence = fleet.converge(time.monotonic(), "the last stop", 20, hold=0.5)
    fleet.stop_probes()
    text = fleet.report(
        "docker stop takes an instance out of every proxy (3 stops, 2 hosts)",
        convergence=convergence,
        extra={
            "out of every proxy after": ", ".join(f"{t:.3f}s" for t in took),
            "limit": f"{STOP_LIMIT:g}s",
        },
    )
    assert max(took) <= STOP_LIMIT, text
    assert fleet.failed() == 0, text
    assert convergence.matched, text
