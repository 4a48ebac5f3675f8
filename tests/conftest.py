"""Shared fixtures: real Docker daemons, etcd and HAProxy for discoverd's tests.

The services are the real ones, started by :mod:`tests.support.services`. When a binary is
missing or a service does not come up, the tests that need it are skipped with a hint to run
``scripts/install-deps.sh`` -- unless ``DISCOVERD_REQUIRE_SERVICES=1`` or ``CI`` is set (as
``.ci/run`` does), where they fail loudly instead: the policy of the conformance kit's pytest
plugin, which this suite loads as any plugin's tests would (``pytest_plugins`` below). A banner
at the end counts any skipped test.

Two Docker "hosts" run side by side: ``docker_daemon`` and ``docker_daemon2``. Each gets its own
Linux bridge and subnet, unique to this pytest process: two daemons on one bridge (``docker0``
included, which any other dockerd on the machine also uses) hand out the same container
addresses, and docker-proxy may then reach the other daemon's container. Publish each host's
containers on its own loopback address (``run_whoami(..., host_ip="127.0.0.2")``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import docker
import docker.errors
import pytest

from discoverd.testing.pytest_plugin import service_unavailable as kit_service_unavailable
from tests.support.etcd import EtcdCluster
from tests.support.services import (
    DockerDaemon,
    Etcd,
    ServiceUnavailable,
    ensure_images,
    require_binary,
)

# The kit's fixtures (discoverd_free_port, discoverd_require_binary, ...), its marker and its
# report of skipped contract checks: the opt-in a third-party plugin's conftest.py makes too.
pytest_plugins = ["discoverd.testing"]

_INSTALL_HINT = "run scripts/install-deps.sh (as root) to install Docker, etcd and HAProxy"

# Every daemon this session started, for cleanup_containers.
_DAEMONS: list[DockerDaemon] = []
_BRIDGE_NUMBERS = itertools.count()
_SUBNETS_TAKEN: set[int] = set()


def service_unavailable(reason: str) -> NoReturn:
    """Fail (DISCOVERD_REQUIRE_SERVICES=1 or CI set) or skip the current test: the kit's
    :func:`~discoverd.testing.pytest_plugin.service_unavailable`, with how to fix it here."""
    hint = "" if "install-deps.sh" in reason else f"; {_INSTALL_HINT}"
    kit_service_unavailable(f"{reason}{hint}")


def _need_binaries(*names: str) -> list[str]:
    try:
        return [require_binary(name) for name in names]
    except ServiceUnavailable as exc:
        service_unavailable(str(exc))


def _new_bridge() -> tuple[str, str]:
    """A bridge name and a 172.31.X.1/24 address unused on this machine and in this session."""
    number = next(_BRIDGE_NUMBERS)
    name = f"dd{os.getpid() % 100000}b{number}"  # at most 15 characters
    try:
        addresses = subprocess.run(
            [require_binary("ip"), "-o", "-4", "addr", "show"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except ServiceUnavailable as exc:
        service_unavailable(str(exc))
    in_use = {int(m) for m in re.findall(r"inet 172\.31\.(\d+)\.", addresses)}
    first = 64 + (os.getpid() * 7 + number) % 190
    for offset in range(190):
        third = 64 + (first - 64 + offset) % 190
        if third not in in_use and third not in _SUBNETS_TAKEN:
            _SUBNETS_TAKEN.add(third)
            return name, f"172.31.{third}.1/24"
    service_unavailable("no free 172.31.X.0/24 subnet left for a test bridge")


def _start_daemon(root: Path, *, live_restore: bool = False) -> DockerDaemon:
    """Start a daemon on a fresh bridge, with the test images; stop it again on failure."""
    _need_binaries("dockerd", "containerd", "runc", "docker-proxy", "ip", "busybox")
    bridge, cidr = _new_bridge()
    daemon = DockerDaemon(root, bridge=bridge, bridge_cidr=cidr, live_restore=live_restore)
    try:
        daemon.start()
        client = daemon.client()
        try:
            ensure_images(client)
        finally:
            client.close()
    except (ServiceUnavailable, docker.errors.DockerException) as exc:
        daemon.stop()
        service_unavailable(f"{daemon!r} did not start: {exc}")
    _DAEMONS.append(daemon)
    return daemon


def _stop_daemon(daemon: DockerDaemon) -> None:
    daemon.stop()
    if daemon in _DAEMONS:
        _DAEMONS.remove(daemon)


@pytest.fixture(scope="session")
def docker_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerDaemon]:
    """The first Docker "host" (its own bridge; publish on 127.0.0.1 or 127.0.0.2)."""
    daemon = _start_daemon(tmp_path_factory.mktemp("docker1"))
    yield daemon
    _stop_daemon(daemon)


@pytest.fixture(scope="session")
def docker_daemon2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerDaemon]:
    """A second Docker "host" with its own bridge and subnet; publish on another loopback IP."""
    daemon = _start_daemon(tmp_path_factory.mktemp("docker2"))
    yield daemon
    _stop_daemon(daemon)


@pytest.fixture
def docker_daemon_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., DockerDaemon]]:
    """Start extra private daemons (own bridge, images ready) that this test alone may abuse;
    ``make(live_restore=True)`` turns on Docker's live-restore.

    Each takes about a second; all are stopped when the test ends.
    """
    started: list[DockerDaemon] = []

    def make(*, live_restore: bool = False) -> DockerDaemon:
        daemon = _start_daemon(tmp_path_factory.mktemp("dockerx"), live_restore=live_restore)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        _stop_daemon(daemon)


@pytest.fixture(scope="session")
def docker_client(docker_daemon: DockerDaemon) -> Iterator[docker.DockerClient]:
    """An SDK client of :func:`docker_daemon`."""
    client = docker_daemon.client()
    yield client
    client.close()


@pytest.fixture
def cleanup_containers() -> Iterator[None]:
    """After the test, force-remove every container of every daemon this session started."""
    yield
    for daemon in list(_DAEMONS):
        if not daemon.running:
            continue
        client = daemon.client()
        try:
            for container in client.containers.list(all=True):
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True)
        finally:
            client.close()


# A fresh etcd per test: it starts in about half a second, tests may kill and restart it freely,
# and no test sees another's keys or leases. Use a unique key prefix anyway, to be safe if this
# ever becomes session-scoped.
@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    """A running single-member etcd on loopback ports, new for each test."""
    _need_binaries("etcd")
    server = Etcd(tmp_path / "etcd")
    try:
        server.start()
    except ServiceUnavailable as exc:
        server.stop()
        service_unavailable(str(exc))
    yield server
    server.stop()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh three-member etcd cluster for one test (members may be killed)."""
    _need_binaries("etcd")
    cluster = EtcdCluster(tmp_path / "cluster")
    try:
        cluster.start()
    except ServiceUnavailable as exc:
        service_unavailable(str(exc))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def haproxy_binary() -> str:
    """Path of the haproxy executable."""
    return _need_binaries("haproxy")[0]


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """Make skipped tests impossible to miss."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons: Counter[str] = Counter()
    for report in skipped:
        longrepr = getattr(report, "longrepr", None)
        if isinstance(longrepr, tuple) and len(longrepr) == 3:
            reasons[str(longrepr[2]).removeprefix("Skipped: ")] += 1
        else:
            reasons[str(longrepr)] += 1
    terminalreporter.write_sep("!", f"{len(skipped)} TEST(S) SKIPPED", red=True, bold=True)
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"  {count} x {reason}", red=True)
    terminalreporter.write_line(
        f"Skipped tests prove nothing. {_INSTALL_HINT}, then run scripts/test.sh again "
        "(DISCOVERD_REQUIRE_SERVICES=1 turns a missing service into a failure).",
        red=True,
        bold=True,
    )
    terminalreporter.write_sep("!", f"{len(skipped)} TEST(S) SKIPPED", red=True, bold=True)
