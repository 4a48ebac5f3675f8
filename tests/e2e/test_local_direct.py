"""Local instances without the detour, end to end: real Docker daemons, etcd and HAProxy.

Two backend "hosts" (each its own Docker daemon and bridge, HOST_IP 127.0.0.2 and 127.0.0.3,
host ids host2 and host3) and a discover agent that calls itself host2: host2's instances are
served at their container address, host3's at their published port. Traffic to container
addresses goes only to the containers these tests start, on the tests' own bridges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_seed_walkthrough import (
    HOST_A,
    HOST_B,
    Cluster,
    running_cluster,
    whoami_name,
)
from tests.faults.harness import nginx_upstreams
from tests.plugins.etcd.raw import RawEtcd
from tests.support.discoverd import DiscoverdProcess, requests_through, until
from tests.support.haproxy import haproxy_cli, serving_servers
from tests.support.services import DockerDaemon, Etcd, published_port

pytestmark = pytest.mark.services

LOCAL_ID = "host2"  # the host id start_register gives HOST_A's agent


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest,
    etcd: Etcd,
    docker_daemon: DockerDaemon,
    docker_daemon2: DockerDaemon,
    haproxy_binary: str,
) -> Iterator[Cluster]:
    registry, proxy = getattr(request, "param", ("etcd", "haproxy"))
    daemons = {HOST_A: docker_daemon, HOST_B: docker_daemon2}
    with running_cluster(registry, proxy, etcd, daemons, "ddlocal") as c:
        yield c


def proxy_settings(cluster: Cluster) -> list[str]:
    if cluster.proxy == "nginx":
        sets = ["nginx.bind=127.0.0.1", f"nginx.status_port={cluster.stats}"]
    else:
        sets = ["haproxy.bind=127.0.0.1", f"haproxy.stats_port={cluster.stats}"]
    return [arg for item in sets for arg in ("--set", item)]


def start_discover(cluster: Cluster, **env: str) -> Path:
    """The discover agent of host2 (the register agent of HOST_A is host2 too); its state."""
    state = cluster.root / "discover" / "state"
    args = ["discover", "--host-id", LOCAL_ID, "--log-level", "debug", *proxy_settings(cluster)]
    if cluster.proxy == "haproxy":
        args += ["--set", "haproxy.check_interval=500ms"]
    agent = DiscoverdProcess(
        cluster.root / "discover",
        args,
        cluster.env(DISCOVERD_STATE_DIR=str(state), **env),
    ).start()
    cluster.agents["discover"] = agent
    return state


def container_ip(container: Any) -> str:
    container.reload()
    address: str = container.attrs["NetworkSettings"]["IPAddress"]
    assert address, container.attrs["NetworkSettings"]
    return address


def served(state: Path) -> set[str]:
    """Every server address the running proxy routes to (HAProxy: ``show servers state``;
    nginx: the configuration it runs)."""
    try:
        if (state / "nginx").exists():
            return set().union(*nginx_upstreams(state).values())
        return set().union(*serving_servers(state).values())
    except OSError:
        return set()


def both_at(state: Path, address: str) -> bool:
    """Both servers of the service (the container's and the one written by hand) at
    ``address``."""
    try:
        return sorted(a for s in _servers(state) for a in s) == [address, address]
    except OSError:
        return False


def _servers(state: Path) -> list[list[str]]:
    """The addresses of the servers in rotation, per backend, duplicates kept."""
    found: dict[str, list[str]] = {}
    for line in haproxy_cli(state, "show servers state").splitlines():
        fields = line.split()
        if len(fields) >= 19 and fields[0].isdigit() and not int(fields[6]) & 0x7F:
            found.setdefault(fields[1], []).append(f"{fields[4]}:{fields[18]}")
    return list(found.values())


def reloads(state: Path) -> int:
    for line in haproxy_cli(state, "show proc", "master.sock").splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == "master" and fields[2].isdigit():
            return int(fields[2])
    raise AssertionError("no reload counter in show proc")


@pytest.mark.parametrize(
    "cluster",
    [
        pytest.param(("etcd", "haproxy"), id="etcd-haproxy"),
        pytest.param(("consul", "haproxy"), id="consul-haproxy"),
        pytest.param(("etcd", "nginx"), id="etcd-nginx"),
    ],
    indirect=True,
)
def test_local_instances_at_their_container_address_remote_ones_at_their_published_port(
    cluster: Cluster,
) -> None:
    # HAProxy asks for container addresses (local_direct = "auto"); nginx is told to.
    told = {"DISCOVERD_LOCAL_DIRECT": "true"} if cluster.proxy == "nginx" else {}
    cluster.start_register(HOST_A)
    cluster.start_register(HOST_B)
    state = start_discover(cluster, **told)
    a, b = cluster.whoami(HOST_A), cluster.whoami(HOST_B)
    expected = {whoami_name(a), whoami_name(b)}
    until(lambda: cluster.answers() == expected, 30, "both answer\n" + cluster.logs())

    direct = f"{container_ip(a)}:8000"
    remote = f"{HOST_B}:{published_port(b)}"
    until(lambda: served(state) == {direct, remote}, 10, f"{served(state)}\n{cluster.logs()}")
    answers = requests_through(cluster.frontend, 20)
    assert set(answers) == expected and answers.count(whoami_name(a)) >= 5

    # The registry holds both addresses of host2's instance; discoverd services shows the
    # registry as it is (the published port), discoverd render what this host serves.
    env = {
        **cluster.env(), "DISCOVERD_HOST_ID": LOCAL_ID, "DISCOVERD_STATE_DIR": str(state), **told
    }  # fmt: skip
    listing = subprocess.run(
        [sys.executable, "-m", "discoverd", "services", "--json"],
        env={**_clean_env(), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    [service] = json.loads(listing.stdout)
    mine = next(i for i in service["instances"] if i["host_id"] == LOCAL_ID)
    assert (mine["address"], mine["port"]) == (HOST_A, published_port(a))
    assert mine["meta"]["container_address"] == direct
    theirs = next(i for i in service["instances"] if i["host_id"] != LOCAL_ID)
    assert theirs["meta"]["container_address"].endswith(":8000")  # published, not used here
    rendered = subprocess.run(
        [sys.executable, "-m", "discoverd", "render", *proxy_settings(cluster)],
        env={**_clean_env(), **env}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert direct in rendered and f"{HOST_A}:{published_port(a)}" not in rendered
    assert remote in rendered


@pytest.mark.parametrize(
    "cluster", [pytest.param(("etcd", "nginx"), id="etcd-nginx")], indirect=True
)
def test_nginx_keeps_published_ports_unless_told(cluster: Cluster) -> None:
    """nginx has no active checks: a container address that stops answering would cost a
    connect timeout per request, where the published port refuses at once. With the default
    (local_direct = "auto") its instances stay at their published port."""
    cluster.start_register(HOST_A)
    state = start_discover(cluster)
    a = cluster.whoami(HOST_A)
    until(lambda: cluster.answers() == {whoami_name(a)}, 30, "routable\n" + cluster.logs())
    published = f"{HOST_A}:{published_port(a)}"
    until(lambda: served(state) == {published}, 10, f"{served(state)}\n{cluster.logs()}")
    assert container_ip(a) not in (state / "nginx" / "nginx.conf").read_text()


def test_with_local_direct_off_every_instance_keeps_its_published_port(cluster: Cluster) -> None:
    cluster.start_register(HOST_A)
    state = start_discover(cluster, DISCOVERD_LOCAL_DIRECT="false")
    a = cluster.whoami(HOST_A)
    until(lambda: cluster.answers() == {whoami_name(a)}, 30, "routable\n" + cluster.logs())
    assert served(state) == {f"{HOST_A}:{published_port(a)}"}
    config = (state / "haproxy" / "haproxy.cfg").read_text()
    assert container_ip(a) not in config  # the metadata is never rendered
    assert "local: container address" not in cluster.agents["discover"].log()


def raw_etcd(etcd: Etcd) -> RawEtcd:
    return RawEtcd(f"http://127.0.0.1:{etcd.client_port}")


def put_instance(
    cluster: Cluster, client: RawEtcd, iid: str, endpoint: str, container: str
) -> None:
    """An instance of whoami written the way the etcd plugin writes it, as host2's."""
    meta = {"mode": "http", "container_address": container}
    document = {
        "frontend_port": cluster.frontend, "protocol": "tcp", "tags": [], "meta": meta,
        "host_id": LOCAL_ID,
    }  # fmt: skip
    client.put(f"/discoverd/instances/whoami/{iid}", json.dumps(document))
    client.put(f"{cluster.prefix}/whoami/{iid}", endpoint)


def test_an_unreachable_container_address_falls_back_and_moves_without_a_reload(
    cluster: Cluster,
) -> None:
    cluster.start_register(HOST_A)
    state = start_discover(cluster)
    a = cluster.whoami(HOST_A)
    until(lambda: cluster.answers() == {whoami_name(a)}, 30, "routable\n" + cluster.logs())
    ip, published = container_ip(a), f"{HOST_A}:{published_port(a)}"
    until(lambda: served(state) == {f"{ip}:8000"}, 10, f"{served(state)}")

    # A second instance of host2 whose container address refuses (nothing listens on 8001 in
    # that container): served at its published port.
    client = raw_etcd(cluster.etcd)
    iid = f"{LOCAL_ID}:0123456789ab:8000:tcp"
    try:
        put_instance(cluster, client, iid, published, f"{ip}:8001")
        until(
            lambda: served(state) == {f"{ip}:8000", published},
            10,
            f"{served(state)}\n{cluster.logs()}",
        )
        log = cluster.agents["discover"].log()
        assert f"container address {ip}:8001 not reachable" in log

        # Its container address becomes one that answers: it moves, on the runtime API.
        before = reloads(state)
        put_instance(cluster, client, iid, published, f"{ip}:8000")
        until(lambda: both_at(state, f"{ip}:8000"), 10, f"{served(state)}\n{cluster.logs()}")
        # ...and back to its published port when the address no longer answers.
        put_instance(cluster, client, iid, published, f"{ip}:8001")
        until(lambda: served(state) == {f"{ip}:8000", published}, 10, f"{served(state)}")
        assert reloads(state) == before  # both moves without a reload
        assert set(requests_through(cluster.frontend, 10)) == {whoami_name(a)}
    finally:
        client.delete(f"{cluster.prefix}/whoami/{iid}")
        client.delete(f"/discoverd/instances/whoami/{iid}")


@pytest.mark.parametrize(
    "hostile", ["127.0.0.1:22", "169.254.169.254:80", "0.0.0.0:8000", "localhost:8000"]
)
def test_a_hostile_container_address_in_the_registry_is_refused(
    cluster: Cluster, hostile: str
) -> None:
    cluster.start_register(HOST_A)
    state = start_discover(cluster)
    a = cluster.whoami(HOST_A)
    until(lambda: cluster.answers() == {whoami_name(a)}, 30, "routable\n" + cluster.logs())
    published = f"{HOST_A}:{published_port(a)}"
    client = raw_etcd(cluster.etcd)
    iid = f"{LOCAL_ID}:ba9876543210:8000:tcp"
    try:
        put_instance(cluster, client, iid, published, hostile)
        until(lambda: published in served(state), 10, f"{served(state)}\n{cluster.logs()}")
        # The pass logs its problems right after the proxy took the change: wait for the line.
        until(
            lambda: "container_address refused" in cluster.agents["discover"].log(),
            10,
            cluster.logs(),
        )
        assert served(state) == {f"{container_ip(a)}:8000", published}
    finally:
        client.delete(f"{cluster.prefix}/whoami/{iid}")
        client.delete(f"/discoverd/instances/whoami/{iid}")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("DISCOVERD_", "ETCD"))}
