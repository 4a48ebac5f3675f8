"""The seed's walkthrough, end to end, with real Docker daemons, registries and proxies.

Two backend "hosts" (each its own Docker daemon, its own HOST_IP on loopback and its own register
agent), one registry, one discover agent with its proxy; whoami containers come and go. The
walkthrough runs with each of the four combinations etcd or Consul x HAProxy or nginx, chosen
the way an operator chooses them (``--registry``/``--proxy`` and environment); the other
scenarios run with the defaults (etcd and HAProxy).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import service_unavailable
from tests.support.consul import Consul
from tests.support.discoverd import DiscoverdProcess, free_port, requests_through, until
from tests.support.services import (
    DockerDaemon,
    Etcd,
    http_get,
    run_whoami,
)

pytestmark = pytest.mark.services

HOST_A, HOST_B = "127.0.0.2", "127.0.0.3"


class Cluster:
    def __init__(
        self,
        root: Path,
        etcd: Etcd,
        daemons: dict[str, DockerDaemon],
        registry: str = "etcd",
        proxy: str = "haproxy",
        consul: Consul | None = None,
    ) -> None:
        self.root = root
        self.etcd = etcd
        self.daemons = daemons
        self.registry = registry
        self.proxy = proxy
        self.consul = consul
        self.frontend = free_port()
        self.stats = free_port()
        self.agents: dict[str, DiscoverdProcess] = {}
        self.prefix = f"/backends-{self.frontend}"
        self.containers: list[Any] = []

    def env(self, **extra: str) -> dict[str, str]:
        # Every "host" of this test is one machine (HOST_IPs on loopback): accept loopback
        # backends from any host id, which a real fleet refuses.
        env = {
            "DISCOVERD_REGISTRY": self.registry,
            "DISCOVERD_PROXY": self.proxy,
            "DISCOVERD_SINGLE_MACHINE": "1",
        }
        if self.registry == "consul":
            assert self.consul is not None
            env["CONSUL_HTTP_ADDR"] = self.consul.address
        else:
            env.update(ETCD_HOST=self.etcd.endpoint, DISCOVERD_ETCD_PREFIX=self.prefix)
        return {**env, **extra}

    def start_register(self, host_ip: str) -> DiscoverdProcess:
        name = f"register-{host_ip}"
        ttl = {"DISCOVERD_CONSUL_TTL": "5"} if self.registry == "consul" else {}
        agent = DiscoverdProcess(
            self.root / name,
            ["register", "--host-id", f"host{host_ip.rsplit('.', 1)[1]}", "--log-level", "debug"],
            self.env(
                HOST_IP=host_ip,
                DOCKER_HOST=self.daemons[host_ip].host,
                DISCOVERD_STATE_DIR=str(self.root / name / "state"),
                DISCOVERD_ETCD_TTL="5",
                **ttl,
            ),
        ).start()
        self.agents[name] = agent
        return agent

    def start_discover(self) -> DiscoverdProcess:
        if self.proxy == "nginx":
            settings = ["nginx.bind=127.0.0.1", f"nginx.status_port={self.stats}"]
        else:
            settings = [
                "haproxy.bind=127.0.0.1",
                f"haproxy.stats_port={self.stats}",
                "haproxy.check_interval=500ms",
            ]
        agent = DiscoverdProcess(
            self.root / "discover",
            [
                "discover",
                *itertools.chain.from_iterable(("--set", item) for item in settings),
                "--log-level",
                "debug",
            ],
            self.env(DISCOVERD_STATE_DIR=str(self.root / "discover" / "state")),
        ).start()
        self.agents["discover"] = agent
        return agent

    def stats_page(self) -> str:
        return http_get(f"http://127.0.0.1:{self.stats}/")

    def whoami(self, host_ip: str) -> Any:
        container = run_whoami(
            self.daemons[host_ip].client(),
            host_ip=host_ip,
            labels={"SERVICE_8000_PORT": str(self.frontend), "SERVICE_MODE": "http"},
        )
        self.containers.append(container)
        return container

    def answers(self, count: int = 8) -> set[str]:
        return set(requests_through(self.frontend, count))

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{a.log()[-4000:]}" for n, a in self.agents.items())

    def stop_proxies(self) -> None:
        """Stop every proxy a discover agent of this cluster started (they outlive agents)."""
        for pid_file in self.root.glob("*/state/haproxy/haproxy.pid"):
            subprocess.run(["kill", "-USR1", pid_file.read_text().split()[0]], check=False)
        for pid_file in self.root.glob("*/state/nginx/nginx.pid"):
            subprocess.run(["kill", "-TERM", pid_file.read_text().split()[0]], check=False)


STACKS = [
    pytest.param(("etcd", "haproxy"), id="etcd-haproxy"),
    pytest.param(("etcd", "nginx"), id="etcd-nginx"),
    pytest.param(("consul", "haproxy"), id="consul-haproxy"),
    pytest.param(("consul", "nginx"), id="consul-nginx"),
]


@contextlib.contextmanager
def running_cluster(
    registry: str, proxy: str, etcd: Etcd, daemons: dict[str, DockerDaemon], prefix: str
) -> Iterator[Cluster]:
    """A two-host cluster of ``registry`` and ``proxy`` below a fresh short folder (``prefix``),
    torn down afterwards: agents, proxies, Consul, containers and the folder."""
    if (
        proxy == "nginx"
        and shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None
    ):
        service_unavailable("nginx is not installed (run scripts/install-deps.sh)")
    # A short root: HAProxy's unix sockets live below it (at most ~100 bytes per path). nginx's
    # workers drop root's privileges and must be able to walk down to their temp folders.
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    consul: Consul | None = None
    if registry == "consul":
        if shutil.which("consul") is None:
            service_unavailable("consul is not installed (run scripts/install-deps.sh)")
        consul = Consul(root / "consul")
        consul.start()
    c = Cluster(root, etcd, daemons, registry, proxy, consul)
    try:
        yield c
    finally:
        for agent in c.agents.values():
            if agent.alive():
                agent.terminate()
        c.stop_proxies()
        if consul is not None:
            consul.stop()
        for container in c.containers:
            with contextlib.suppress(Exception):
                container.remove(force=True)
        shutil.rmtree(root, ignore_errors=True)


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
    with running_cluster(registry, proxy, etcd, daemons, "dde2e") as c:
        yield c


def whoami_name(container: Any) -> str:
    return f"I am {container.id[:12]}"


@pytest.mark.parametrize("cluster", STACKS, indirect=True)
def test_seed_walkthrough(cluster: Cluster) -> None:
    cluster.start_register(HOST_A)
    cluster.start_register(HOST_B)
    cluster.start_discover()

    # Two hosts, one whoami each: requests to the frontend alternate between both.
    first = [cluster.whoami(HOST_A), cluster.whoami(HOST_B)]
    expected = {whoami_name(c) for c in first}
    until(lambda: cluster.answers() == expected, 30, "both whoami answer\n" + cluster.logs())
    answers = requests_through(cluster.frontend, 10)
    assert set(answers) == expected
    if cluster.proxy == "haproxy":
        assert all(a != b for a, b in itertools.pairwise(answers)), answers
    else:
        # Each nginx worker keeps its own round-robin position: balanced, not strictly
        # alternating when requests land on different workers.
        assert all(answers.count(name) >= 3 for name in expected), answers

    # Two more on the second host (the seed's whoami-2 and whoami-3): all four answer.
    more = [cluster.whoami(HOST_B), cluster.whoami(HOST_B)]
    expected |= {whoami_name(c) for c in more}
    until(lambda: cluster.answers(16) == expected, 30, "all four answer")

    # Kill everything on the second host: only the survivor answers, and once the proxy has
    # converged a steady client sees no failed request.
    for container in [first[1], *more]:
        container.kill()
    survivor = {whoami_name(first[0])}
    until(lambda: cluster.answers(6) == survivor, 30, "only the survivor answers")
    steady = requests_through(cluster.frontend, 200)
    assert set(steady) == survivor, [a for a in steady if a not in survivor][:5]

    # The stats (status) page answers on its loopback port.
    page = cluster.stats_page()
    assert ("Statistics Report" in page) if cluster.proxy == "haproxy" else ("whoami" in page)

    # What the registry holds, as the CLI shows it, in the seed's layout.
    listing = subprocess.run(
        [sys.executable, "-m", "discoverd", "services", "--json"],
        env={**os.environ, **cluster.env()},
        capture_output=True,
        text=True,
        check=True,
    )
    [service] = json.loads(listing.stdout)
    assert service["name"] == "whoami" and service["frontend_port"] == cluster.frontend
    assert [i["address"] for i in service["instances"]] == [HOST_A], cluster.logs()


def test_sigterm_deregisters_at_once_and_proxy_keeps_serving(cluster: Cluster) -> None:
    agent_a = cluster.start_register(HOST_A)
    cluster.start_register(HOST_B)
    cluster.start_discover()
    a, b = cluster.whoami(HOST_A), cluster.whoami(HOST_B)
    until(
        lambda: cluster.answers() == {whoami_name(a), whoami_name(b)},
        30,
        "both answer\n" + cluster.logs(),
    )
    # SIGTERM: exit 0, and this host's instances leave at once (lease revoked, not 5 s later).
    assert agent_a.terminate() == 0
    until(lambda: cluster.answers(6) == {whoami_name(b)}, 3, "host A's instance removed")
    assert "deregistered" in agent_a.log()

    # The discover agent exits too; HAProxy keeps serving its last configuration.
    assert cluster.agents["discover"].terminate() == 0
    assert set(requests_through(cluster.frontend, 10)) == {whoami_name(b)}


def test_registry_outage_keeps_the_proxy_and_heals(cluster: Cluster) -> None:
    cluster.start_register(HOST_A)
    cluster.start_discover()
    a = cluster.whoami(HOST_A)
    until(lambda: cluster.answers() == {whoami_name(a)}, 30, "whoami answers\n" + cluster.logs())

    cluster.etcd.kill()
    try:
        # While etcd is down, the proxy keeps its last good configuration.
        assert set(requests_through(cluster.frontend, 20)) == {whoami_name(a)}
        b = cluster.whoami(HOST_A)  # registered once etcd is back
    finally:
        cluster.etcd.start()
    until(
        lambda: cluster.answers(8) == {whoami_name(a), whoami_name(b)},
        40,
        "the new container is routed after the outage\n" + cluster.logs(),
    )
    assert all(agent.alive() for agent in cluster.agents.values())


def test_docker_daemon_outage_does_not_stop_the_register_agent(
    cluster: Cluster, docker_daemon_factory: Callable[[], DockerDaemon]
) -> None:
    daemon = docker_daemon_factory()  # this test alone kills it
    cluster.daemons[HOST_A] = daemon
    agent = cluster.start_register(HOST_A)
    cluster.start_discover()
    before = cluster.whoami(HOST_A)
    until(lambda: cluster.answers() == {whoami_name(before)}, 30, "routable\n" + cluster.logs())

    daemon.kill()
    until(lambda: "Docker daemon at" in agent.log(), 15, "the agent notices the outage")
    assert agent.alive()
    daemon.start()
    after = cluster.whoami(HOST_A)  # a fresh client: the old one's daemon is gone
    until(
        lambda: whoami_name(after) in cluster.answers(8),
        40,
        "a container started after the daemon came back is routed\n" + cluster.logs(),
    )
    assert agent.alive()


def test_both_roles_in_one_process_and_a_restart_keeps_traffic(cluster: Cluster) -> None:
    """`discoverd --registry etcd --proxy haproxy`: both roles in one process. Its SIGTERM
    revokes the lease but leaves the proxy serving this host's instances, and a restarted
    discoverd adopts the running HAProxy."""
    state = cluster.root / "both" / "state"
    args = [
        "--registry", "etcd", "--proxy", "haproxy",
        "--host-ip", HOST_A, "--host-id", "both", "--state-dir", str(state),
        "--set", "haproxy.bind=127.0.0.1", "--set", f"haproxy.stats_port={cluster.stats}",
    ]  # fmt: skip
    env = cluster.env(DOCKER_HOST=cluster.daemons[HOST_A].host)
    first = DiscoverdProcess(cluster.root / "both", args, env).start()
    cluster.agents["both"] = first
    a = cluster.whoami(HOST_A)
    until(lambda: cluster.answers() == {whoami_name(a)}, 30, "routable\n" + cluster.logs())
    config = state / "haproxy" / "haproxy.cfg"
    served = config.read_text()
    a.reload()  # this host's own instance: served at its container address (local_direct)
    assert f"{a.attrs['NetworkSettings']['IPAddress']}:8000" in served

    assert first.terminate() == 0
    # The proxy was not emptied by this host's own deregistration on the way out.
    assert config.read_text() == served
    assert set(requests_through(cluster.frontend, 10)) == {whoami_name(a)}

    second = DiscoverdProcess(cluster.root / "both", args, env).start()
    cluster.agents["both"] = second
    until(lambda: "register: added" in second.log().split("starting")[-1], 30, "re-registered")
    assert set(requests_through(cluster.frontend, 10)) == {whoami_name(a)}
    masters = cluster.root / "both" / "state" / "haproxy" / "haproxy.pid"
    assert masters.exists()  # the same master, adopted (its pid file is still the one)
