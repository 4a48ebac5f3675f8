"""etcd goes away and comes back, with one and with two register hosts (issue 9).

- **frozen**: SIGSTOP for longer than the TTL, then SIGCONT. etcd revokes the leases that
  expired meanwhile as soon as it runs again;
- **stopped**: SIGKILL, down for longer than the TTL, started again with its data;
- **wiped**: SIGKILL, started again with an empty data directory (a new store: revision 1).

Every host runs ``discoverd`` with both roles (lease TTL 5 s) and two backends of one HTTP
service; a client on every host sends a GET on a fresh connection every 10 ms through its own
frontend. Expected (issue 9, "no cliff at the TTL"): 0 failed requests on every host, and the
registry and every proxy match what Docker runs again soon after etcd is back.
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.faults.conftest import FleetFactory
from tests.faults.harness import TTL, EtcdUnderTest, wait_until
from tests.support.services import DockerDaemon, Etcd

pytestmark = [pytest.mark.services, pytest.mark.slow]

#: How long etcd stays frozen or down: longer than the TTL.
OUTAGE = TTL + 3.0
#: How long a wiped etcd stays down before it comes back empty.
WIPED_DOWN = 3.0
#: Deadline for the registry and the proxies to match reality again after etcd is back.
DEADLINE = 30.0


@pytest.mark.parametrize("hosts", [1, 2], ids=["one-host", "two-hosts"])
@pytest.mark.parametrize("outage", ["frozen", "stopped", "wiped"])
def test_etcd_outage_costs_no_request(
    outage: str,
    hosts: int,
    etcd: Etcd,
    docker_daemon: DockerDaemon,
    docker_daemon2: DockerDaemon,
    make_fleet: FleetFactory,
) -> None:
    fleet = make_fleet(EtcdUnderTest([etcd.url]))
    for daemon in [docker_daemon, docker_daemon2][:hosts]:
        fleet.add_host(daemon)
    for host in fleet.hosts:
        fleet.run_many(host, "web", 2)
    fleet.settle()
    probers = fleet.probe_all()
    wait_until(lambda: all(p.total() >= 20 for p in probers), 15, "the clients' first answers")

    if outage == "frozen":
        pid = etcd.pid
        assert pid is not None
        fleet.freeze(pid, "etcd SIGSTOP")
        time.sleep(OUTAGE)  # the fault itself: frozen for longer than the TTL
        back = fleet.thaw(pid, "etcd SIGCONT")
        what = f"etcd frozen {OUTAGE:g}s (TTL {TTL}s)"
    else:
        etcd.kill()
        fleet.mark("etcd SIGKILL")
        if outage == "wiped":
            shutil.rmtree(etcd.data_dir)
        time.sleep(OUTAGE if outage == "stopped" else WIPED_DOWN)  # the outage itself
        etcd.start()
        back = fleet.mark("etcd answers again" + (", empty" if outage == "wiped" else ""))
        down = OUTAGE if outage == "stopped" else WIPED_DOWN
        what = f"etcd {'killed and restarted with its data' if outage == 'stopped' else 'wiped'}"
        what += f", down {down:g}s (TTL {TTL}s)"

    convergence = fleet.converge(back, "etcd is back", DEADLINE)
    fleet.stop_probes()
    text = fleet.report(f"{what}, {hosts} host(s)", convergence=convergence)
    assert fleet.failed() == 0, text
    assert convergence.matched, text
