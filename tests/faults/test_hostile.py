"""One hostile container among 50 (issue 9, "a bad service costs the others nothing").

49 good backends of five HTTP services run on one host, clients on every service. Then, one
after the other, a 50th container arrives with labels meant to hurt, stays while the agent
deals with it, and is removed:

- **bad values**: an invalid service name, an out-of-range port, an unknown mode, tags with
  spaces, a check path without its slash, an unparsable drain period;
- **another service's port**: a service ``hostile-port`` asking for the frontend port of a
  good service;
- **the stats port**: a service asking for the proxy's own stats port;
- **a port it holds itself**: a service asking for the very port the container publishes on
  the host's address (docker-proxy holds it, so the proxy cannot bind it); while it is there, a
  good service gains a backend, which must be routed in the usual time.

Expected: 0 failed requests on the 49 good backends' services, every good backend routed all
along, the hostile container reported (its short id or its service name in a problem of the
agent's ``/healthz/ready``, or in a warning or error of its log), and
a change of a good service still routed within 5 s.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.faults.conftest import FleetFactory
from tests.faults.harness import (
    Backend,
    EtcdUnderTest,
    Fleet,
    Host,
    frontend_port_free,
    moment_when,
    wait_until,
)
from tests.support.probe import Prober
from tests.support.services import DockerDaemon, Etcd, free_port

pytestmark = [pytest.mark.services, pytest.mark.slow]

#: The good services and how many backends each has: 49 in all.
GOOD = {"svc-a": 10, "svc-b": 10, "svc-c": 10, "svc-d": 10, "svc-e": 9}
#: How long each hostile container stays once the agent has seen it.
STAY = 5.0
#: A change of a good service is routed within this while a hostile container is there.
CHANGE_LIMIT = 5.0
#: The clients' pace: one request per 50 ms per service (five services on one host).
PACE = 0.05


def reported(fleet: Fleet, host: Host, *names: str) -> Callable[[], bool]:
    """A check: a problem the agent reports names one of ``names``."""
    checks = [fleet.reported(host, name) for name in names]
    return lambda: any(check() for check in checks)


def answer_from(prober: Prober, who: str, since: float) -> Callable[[], bool]:
    """A check: ``who`` answered ``prober`` after ``since``."""
    return lambda: prober.first_from(who, since) is not None


def hostile_port(host: Host) -> int:
    for _ in range(100):
        port = free_port(host.ip)
        if port < 32768 and frontend_port_free(port, [host.ip]):
            return port
    raise RuntimeError("no free port for the hostile container")


def test_one_hostile_container_in_50(
    etcd: Etcd, docker_daemon: DockerDaemon, make_fleet: FleetFactory
) -> None:
    fleet = make_fleet(EtcdUnderTest([etcd.url]))
    host = fleet.add_host(docker_daemon)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(fleet.run, host, svc) for svc, n in GOOD.items() for _ in range(n)]
        good: list[Backend] = [job.result() for job in jobs]
    assert len(good) == 49
    fleet.settle(timeout=120)
    probers = [fleet.probe(host, service, interval=PACE) for service in GOOD]
    wait_until(lambda: all(p.total() >= 10 for p in probers), 20, "the clients' first answers")

    self_port = hostile_port(host)
    variants: list[tuple[str, dict[str, Any]]] = [
        (
            "bad values",
            {
                "labels": {
                    "SERVICE_NAME": "Evil Name!",
                    "SERVICE_8000_PORT": "99999",
                    "SERVICE_MODE": "quic",
                    "SERVICE_TAGS": "a b,c d",
                    "SERVICE_CHECK_HTTP": "no-slash",
                    "SERVICE_DRAIN": "forever",
                }
            },
        ),
        (
            "another service's port",
            {
                "labels": {
                    "SERVICE_NAME": "hostile-port",
                    "SERVICE_8000_PORT": str(fleet.frontend("svc-a")),
                    "SERVICE_MODE": "http",
                }
            },
        ),
        (
            "the stats port",
            {
                "labels": {
                    "SERVICE_NAME": "hostile-stats",
                    "SERVICE_8000_PORT": str(host.stats_port),
                }
            },
        ),
        (
            "a port it holds itself",
            {
                "labels": {"SERVICE_NAME": "hostile-self", "SERVICE_8000_PORT": str(self_port)},
                "host_port": self_port,
            },
        ),
    ]
    outcomes: dict[str, str] = {}
    change_time: float | None = None
    for name, spec in variants:
        container = fleet.run_other(host, **spec)
        short = str(container.id)[:12]
        arrived = fleet.mark(f"hostile container {short} ({name}) starts")
        noticed = moment_when(reported(fleet, host, short, spec["labels"]["SERVICE_NAME"]), 15)
        if name == "a port it holds itself":
            newcomer = fleet.run(host, "svc-b")
            change = fleet.mark(f"a new svc-b backend {newcomer.short_id} starts")
            answered = moment_when(
                answer_from(probers[1], newcomer.short_id, change), CHANGE_LIMIT + 10
            )
            change_time = None if answered is None else answered - change
        time.sleep(max(0.0, (noticed or arrived) + STAY - time.monotonic()))  # it stays a while
        convergence = fleet.converge(time.monotonic(), "now", 10, services=list(GOOD), hold=0.5)
        outcomes[name] = (
            f"reported {'after ' + format(noticed - arrived, '.2f') + 's' if noticed else 'never'}"
            f"; good services {'all routed' if convergence.matched else convergence.mismatch}"
        )
        container.remove(force=True)
        fleet.mark(f"hostile container {short} removed")

    fleet.stop_probes()
    text = fleet.report(
        "1 hostile container among 50 (49 good backends of 5 services), one variant at a time",
        extra={
            **{f"hostile: {name}": outcome for name, outcome in outcomes.items()},
            "svc-b change routed after (hostile-self present)": (
                "never" if change_time is None else f"{change_time:.2f}s"
            ),
        },
    )
    assert fleet.failed() == 0, text
    assert all("all routed" in o for o in outcomes.values()), text
    assert all(not o.startswith("reported never") for o in outcomes.values()), text
    assert change_time is not None and change_time <= CHANGE_LIMIT, text
