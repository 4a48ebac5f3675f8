"""The fault suite's harness: a fleet of Docker "hosts" running discoverd, a registry, clients.

A :class:`Fleet` is what an operator runs, on one machine:

- **hosts**: each a private Docker daemon on its own bridge (``tests.support.services``),
  publishing its containers on its own loopback address (``HOST_IP``: 127.0.0.2, 127.0.0.3), and
  one ``discoverd`` process with both roles (``discoverd --registry R --proxy P``), whose proxy
  binds that address too. Its state (rendered configuration, HAProxy's sockets) lives in a
  temporary folder, never in /run/discoverd.
- **a registry** (:class:`EtcdUnderTest`, :class:`ConsulUnderTest`) that the agents use and the
  harness reads directly to compare with reality.
- **backends**: whoami containers that stop gracefully (``graceful_whoami_command``), labelled
  with their service, its frontend port and its mode.
- **clients**: one :class:`~tests.support.probe.Prober` per host and service, a GET on a fresh
  connection every 10 ms through that host's frontend, recording every failure (refused, reset,
  closed without an answer, another status, no answer within 5 s) with its moment and reason.

What a scenario measures:

- failed client requests per host and service (goal 0), each with when and why;
- the time until the registry and every host's proxy match reality again
  (:meth:`Fleet.converge`). *Reality* is what Docker runs: the published endpoints of every
  running container of the fleet. The *registry* is read directly (etcd's key range, Consul's
  passing instances); a *proxy* is what it routes to (HAProxy: ``show servers state`` on its
  admin socket, servers in maintenance or drain left out; nginx: its configuration file while
  it is the one confirmed running).
  "Match" means equal sets of ``ip:port`` per service, held for one second.

The figures of every scenario are collected (:func:`record`) and printed at the end of the
pytest run; ``DISCOVERD_FAULTS_REPORT=file.json`` writes them as JSON as well.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import docker
import docker.errors
import requests

from tests.support.discoverd import DiscoverdProcess, stop_proxies
from tests.support.etcd import etcd_endpoints
from tests.support.haproxy import serving_servers
from tests.support.probe import Prober
from tests.support.services import (
    DockerDaemon,
    free_port,
    graceful_whoami_command,
    run_whoami,
)

if TYPE_CHECKING:
    from docker.models.containers import Container

#: The loopback addresses of the hosts (their HOST_IP), in order.
HOST_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
#: The registry TTL of the fault scenarios, in seconds (etcd lease TTL, Consul check TTL).
#: discoverd's default is 15 s; 5 s keeps the scenarios short, and every outage is made longer
#: than it where the scenario says "longer than the TTL".
TTL = 5
#: The label every container of a fleet carries (value: the fleet's id).
FLEET_LABEL = "discoverd.faults"
#: A client's pace: one request every 10 ms at most, per host and service.
PROBE_INTERVAL = 0.01
#: A request that takes longer fails ("timed out"). Generous: the machine is shared, and a
#: slow answer is not what the suite counts; a refused or cut connection fails at once anyway.
PROBE_TIMEOUT = 5.0
#: How long a match must hold before it counts as converged.
HOLD = 1.0
#: ``DISCOVERD_FAULTS_SRC=/path/to/src``: the agents import discoverd from there instead of
#: this checkout (e.g. an older revision extracted with ``git archive REV src | tar -x -C DIR``)
#: to measure "before" figures with the same suite.
AGENT_SOURCE = os.environ.get("DISCOVERD_FAULTS_SRC", "")

_CORE_OPTIONS: set[str] = set()


def core_options() -> set[str]:
    """The core options the agents' discoverd knows (asked once, in a subprocess importing it
    as the agents do), so that an option an older :data:`AGENT_SOURCE` lacks is not set."""
    if not _CORE_OPTIONS:
        env = {**os.environ, **({"PYTHONPATH": AGENT_SOURCE} if AGENT_SOURCE else {})}
        code = (
            "import dataclasses\n"
            "from discoverd.core.config import CoreConfig\n"
            "print(' '.join(f.name for f in dataclasses.fields(CoreConfig)))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        _CORE_OPTIONS.update(result.stdout.split())
    return _CORE_OPTIONS


# --------------------------------------------------------------------------------------------
# Registries


class RegistryUnderTest(Protocol):
    """How agents reach the registry, and what it holds."""

    name: str

    def env(self, host_index: int) -> dict[str, str]:
        """Environment of the agent of the ``host_index``-th host."""
        ...

    def settings(self) -> list[str]:
        """``--set`` items of every agent."""
        ...

    def endpoints(self) -> dict[str, set[str]]:
        """``service -> {"ip:port"}`` as the registry holds them; raises when unreachable."""
        ...


@dataclass
class EtcdUnderTest:
    """etcd: one member or a cluster; every agent gets every endpoint (``ETCD_HOST``)."""

    urls: list[str]
    ttl: int = TTL
    name: str = "etcd"

    def env(self, host_index: int) -> dict[str, str]:
        hosts = [urllib.parse.urlsplit(url).netloc for url in self.urls]
        return {"ETCD_HOST": ",".join(hosts)}

    def settings(self) -> list[str]:
        return [f"etcd.ttl={self.ttl}"]

    def endpoints(self) -> dict[str, set[str]]:
        return etcd_endpoints(self.urls)


@dataclass
class ConsulUnderTest:
    """Consul: each host's agent talks to one Consul agent (``addresses[host_index]``, the
    last one for hosts beyond the list), as a host talks to its local Consul agent."""

    addresses: list[str]
    ttl: int = TTL
    name: str = "consul"

    def env(self, host_index: int) -> dict[str, str]:
        return {"CONSUL_HTTP_ADDR": self.addresses[min(host_index, len(self.addresses) - 1)]}

    def settings(self) -> list[str]:
        return [f"consul.ttl={self.ttl}"]

    def endpoints(self) -> dict[str, set[str]]:
        error: Exception | None = None
        for address in self.addresses:
            session = requests.Session()
            session.trust_env = False
            try:
                base = f"http://{address}/v1"
                names = session.get(f"{base}/catalog/services", timeout=1.0).json()
                found: dict[str, set[str]] = {}
                for name in names:
                    if name == "consul":
                        continue
                    response = session.get(f"{base}/health/service/{name}?passing", timeout=1.0)
                    response.raise_for_status()
                    for entry in response.json():
                        svc = entry.get("Service") or {}
                        found.setdefault(name, set()).add(f"{svc['Address']}:{svc['Port']}")
                return {name: eps for name, eps in found.items() if eps}
            except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
                error = exc
            finally:
                session.close()
        assert error is not None
        raise error


# --------------------------------------------------------------------------------------------
# Hosts and backends


@dataclass
class Host:
    """One Docker "host": a daemon, an address, a folder, and the discoverd agent there."""

    name: str
    index: int
    ip: str
    daemon: DockerDaemon
    root: Path
    stats_port: int
    agent: DiscoverdProcess | None = None
    #: The agent's HTTP endpoint (``ip:port``), when its discoverd has one.
    listen: str = ""
    _client: docker.DockerClient | None = field(default=None, repr=False)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def client(self) -> docker.DockerClient:
        """An SDK client of the daemon (a new one after :meth:`reconnect`)."""
        if self._client is None:
            self._client = self.daemon.client()
        return self._client

    def reconnect(self) -> None:
        """Forget the client (its daemon was restarted)."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        self._client = None


@dataclass
class Backend:
    host: Host
    service: str
    container: Container
    endpoint: str

    @property
    def short_id(self) -> str:
        return str(self.container.id)[:12]


def flapping_whoami_command(period: float = 0.3, port: int = 8000) -> list[str]:
    """A whoami whose application listens for ``period`` seconds, then not for ``period``
    seconds, and so on; docker-proxy in front of it accepts all the time."""
    return [
        "/bin/sh",
        "-c",
        'mkdir -p /www; echo "I am $(hostname)" > /www/index.html; trap "exit 0" TERM; '
        f"while true; do httpd -f -p {port} -h /www & pid=$!; sleep {period:g}; "
        f"kill $pid; wait $pid; sleep {period:g}; done",
    ]


def frontend_port_free(port: int, addresses: Iterable[str]) -> bool:
    for address in ("0.0.0.0", *addresses):
        with socket.socket() as sock:
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


# --------------------------------------------------------------------------------------------
# Convergence and figures


@dataclass
class Convergence:
    """When each part (``registry``, ``proxy A``, ...) matched reality for good, in seconds
    after the reference moment (``None``: not within the deadline)."""

    reference: str
    times: dict[str, float | None]
    mismatch: str = ""

    @property
    def matched(self) -> bool:
        return all(t is not None for t in self.times.values())

    @property
    def worst(self) -> float | None:
        if not self.matched:
            return None
        values = [t for t in self.times.values() if t is not None]
        return max(values) if values else 0.0

    def text(self) -> str:
        parts = [
            f"{part} {'never' if t is None else f'{t:.2f}s'}" for part, t in self.times.items()
        ]
        line = f"matched reality after {self.reference}: " + ", ".join(parts)
        return line + (f"\n  still different: {self.mismatch}" if self.mismatch else "")


#: The figures of every scenario of this pytest run, printed at its end (see conftest.py).
RESULTS: list[dict[str, Any]] = []


def record(
    scenario: str,
    *,
    probers: Sequence[Prober] = (),
    convergence: Convergence | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keep one scenario's figures for the summary; returns them."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    entry: dict[str, Any] = {
        "scenario": scenario,
        "test": current.rsplit(" (", 1)[0],
        "outcome": "",  # set once the test's own assertions ran (conftest.py)
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "failed": {p.name: [p.failures(), p.total()] for p in probers},
        "converged": dict(convergence.times) if convergence is not None else {},
        "reference": convergence.reference if convergence is not None else "",
        "agents": AGENT_SOURCE or "this checkout",
        **(extra or {}),
    }
    RESULTS.append(entry)
    return entry


def figures_line(entry: dict[str, Any]) -> str:
    failed = sum(f for f, _ in entry["failed"].values())
    total = sum(n for _, n in entry["failed"].values())
    times = entry.get("converged") or {}
    worst: str
    if not times:
        worst = "-"
    elif any(t is None for t in times.values()):
        worst = "never"
    else:
        worst = f"{max(times.values()):.2f}s"
    extra = {k: v for k, v in entry.items() if k not in ("scenario", "date", "failed", "converged")}
    hidden = ("reference", "agents", "test", "outcome")
    shown = ", ".join(f"{k}={v}" for k, v in extra.items() if k not in hidden and v != "")
    outcome = f"{entry['outcome'].upper()} " if entry.get("outcome") else ""
    return f"{outcome}{entry['scenario']}: failed {failed}/{total}; converged {worst}" + (
        f"; {shown}" if shown else ""
    )


# --------------------------------------------------------------------------------------------
# The fleet


class Fleet:
    """Hosts running discoverd against one registry, their backends, clients and figures."""

    def __init__(
        self,
        root: Path,
        registry: RegistryUnderTest,
        *,
        proxy: str = "haproxy",
        log_level: str = "debug",
        extra_settings: Sequence[str] = (),
    ) -> None:
        self.root = root
        self.registry = registry
        self.proxy = proxy
        self.log_level = log_level
        self.extra_settings = list(extra_settings)
        self.id = f"{os.getpid()}-{root.name}"
        self.origin = time.monotonic()
        self.marks: list[tuple[float, str]] = []
        self.hosts: list[Host] = []
        self.backends: list[Backend] = []
        self.extra_containers: list[tuple[Host, Container]] = []
        self.frontends: dict[str, int] = {}
        self._frontends_lock = threading.Lock()  # containers are started from several threads
        self.probers: list[Prober] = []
        self.listeners: list[socket.socket] = []
        self.frozen: list[int] = []

    # -- hosts and agents

    def add_host(self, daemon: DockerDaemon, *, start: bool = True) -> Host:
        index = len(self.hosts)
        name = "ABC"[index]
        ip = HOST_IPS[index]
        stats = self._port()
        host = Host(name, index, ip, daemon, self.root / f"host{name}", stats)
        self.hosts.append(host)
        if start:
            self.start_agent(host)
        return host

    def agent_args(self, host: Host) -> list[str]:
        proxy_sets = {
            "haproxy": [
                f"haproxy.bind={host.ip}",
                f"haproxy.stats_bind={host.ip}",
                f"haproxy.stats_port={host.stats_port}",
            ],
            "nginx": [
                f"nginx.bind={host.ip}",
                f"nginx.status_bind={host.ip}",
                f"nginx.status_port={host.stats_port}",
            ],
        }[self.proxy]
        sets = [*self.registry.settings(), *proxy_sets, *self.extra_settings]
        args = [
            "--registry", self.registry.name,
            "--proxy", self.proxy,
            "--host-ip", host.ip,
            "--host-id", f"host{host.name}",
            "--state-dir", str(host.state_dir),
            "--log-level", self.log_level,
        ]  # fmt: skip
        for item in sets:
            args += ["--set", item]
        return args

    def start_agent(self, host: Host) -> DiscoverdProcess:
        """Start (or start again) ``discoverd`` with both roles on ``host``."""
        if host.agent is None:
            env = {**self.registry.env(host.index), "DOCKER_HOST": host.daemon.host}
            if AGENT_SOURCE:
                env["PYTHONPATH"] = AGENT_SOURCE
            known = core_options()
            if "single_machine" in known:
                # The hosts are loopback addresses of this one machine: without it, a proxy
                # refuses loopback backends another host registered (issue 9's address policy).
                env["DISCOVERD_SINGLE_MACHINE"] = "true"
            if "local_direct" in known:
                # The scenarios compare each proxy's servers with the published ports and
                # measure the path through docker-proxy: keep every instance at its published
                # port (tests/e2e/test_local_direct.py covers container addresses).
                env["DISCOVERD_LOCAL_DIRECT"] = "false"
            if "listen" in known:
                # The agent's HTTP endpoint (/healthz): on the host's own address and a free
                # port, not the shared default (127.0.0.1:9275).
                host.listen = f"{host.ip}:{self._port()}"
                env["DISCOVERD_LISTEN"] = host.listen
            host.agent = DiscoverdProcess(host.root, self.agent_args(host), env)
        host.agent.start()
        return host.agent

    def agent(self, host: Host) -> DiscoverdProcess:
        assert host.agent is not None, f"no agent on host {host.name}"
        return host.agent

    # -- services and backends

    def _port(self) -> int:
        for _ in range(100):
            port = free_port("0.0.0.0")
            if port < 32768 and frontend_port_free(port, HOST_IPS):
                return port
        raise RuntimeError("no free port below 32768 on the hosts' addresses")

    def frontend(self, service: str) -> int:
        """The frontend port of ``service`` (chosen once, free on every host address)."""
        with self._frontends_lock:  # two threads must not give one service two ports
            if service not in self.frontends:
                port = self._port()
                taken = self.frontends.values()
                while port in taken or any(h.stats_port == port for h in self.hosts):
                    port = self._port()
                self.frontends[service] = port
            return self.frontends[service]

    def labels(self, service: str, mode: str = "http") -> dict[str, str]:
        return {
            FLEET_LABEL: self.id,
            "SERVICE_NAME": service,
            "SERVICE_8000_PORT": str(self.frontend(service)),
            "SERVICE_MODE": mode,
        }

    def run(
        self,
        host: Host,
        service: str,
        *,
        mode: str = "http",
        command: list[str] | None = None,
    ) -> Backend:
        """A backend of ``service`` on ``host``: a graceful whoami unless ``command``."""
        container = run_whoami(
            host.client(),
            host_ip=host.ip,
            labels=self.labels(service, mode),
            command=command if command is not None else graceful_whoami_command(),
        )
        backend = Backend(host, service, container, f"{host.ip}:{self._published(container)}")
        self.backends.append(backend)
        return backend

    def run_many(self, host: Host, service: str, count: int, **kwargs: Any) -> list[Backend]:
        return [self.run(host, service, **kwargs) for _ in range(count)]

    def run_other(self, host: Host, **kwargs: Any) -> Container:
        """A container that is not a backend of the fleet's services (hostile, ...): removed at
        the end, never part of reality. ``kwargs`` go to ``run_whoami``."""
        kwargs.setdefault("command", graceful_whoami_command())
        container = run_whoami(host.client(), host_ip=host.ip, **kwargs)
        self.extra_containers.append((host, container))
        return container

    @staticmethod
    def _published(container: Container) -> int:
        deadline = time.monotonic() + 10
        while True:
            container.reload()
            ports = (container.attrs.get("NetworkSettings") or {}).get("Ports") or {}
            for binding in ports.get("8000/tcp") or []:
                if binding.get("HostPort"):
                    return int(binding["HostPort"])
            if time.monotonic() > deadline:
                raise LookupError(f"container {container.short_id} publishes no port 8000")
            time.sleep(0.05)

    def stop(self, backend: Backend, timeout: int = 10) -> None:
        """``docker stop``: SIGTERM, the backend stops listening and exits 0.3 s later."""
        backend.container.stop(timeout=timeout)

    def remove(self, backend: Backend) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            backend.container.remove(force=True)

    def services(self) -> list[str]:
        return sorted({b.service for b in self.backends})

    # -- what is, what the registry says, what the proxies route to

    def reality(self, services: Iterable[str] | None = None) -> dict[str, set[str]]:
        """``service -> {"ip:port"}`` of the running containers of this fleet, from Docker."""
        wanted = set(services) if services is not None else set(self.services())
        found: dict[str, set[str]] = {}
        for host in self.hosts:
            if not host.daemon.running:
                raise RuntimeError(f"the Docker daemon of host {host.name} is down")
            listed = host.client().containers.list(
                filters={"label": f"{FLEET_LABEL}={self.id}"}, sparse=True
            )
            for container in listed:
                attrs = container.attrs
                if attrs.get("State") != "running":
                    continue
                service = (attrs.get("Labels") or {}).get("SERVICE_NAME", "")
                if service not in wanted:
                    continue
                for port in attrs.get("Ports") or []:
                    if port.get("PrivatePort") == 8000 and port.get("PublicPort"):
                        found.setdefault(service, set()).add(f"{host.ip}:{port['PublicPort']}")
        return found

    def registry_view(self, services: Iterable[str] | None = None) -> dict[str, set[str]]:
        wanted = set(services) if services is not None else set(self.services())
        return {s: eps for s, eps in self.registry.endpoints().items() if s in wanted and eps}

    def proxy_view(self, host: Host, services: Iterable[str] | None = None) -> dict[str, set[str]]:
        """What ``host``'s proxy routes to; raises ``OSError`` when it does not answer."""
        wanted = set(services) if services is not None else set(self.services())
        if self.proxy == "haproxy":
            served = serving_servers(host.state_dir)
        else:
            served = nginx_upstreams(host.state_dir)
        return {s: eps for s, eps in served.items() if s in wanted and eps}

    def views(
        self, services: Iterable[str] | None = None, hosts: Sequence[Host] | None = None
    ) -> tuple[dict[str, set[str]] | None, dict[str, dict[str, set[str]] | str]]:
        """Reality, and each part's view (or why it could not be read)."""
        wanted = list(services) if services is not None else self.services()
        try:
            real: dict[str, set[str]] | None = self.reality(wanted)
        except Exception:
            real = None
        parts: dict[str, dict[str, set[str]] | str] = {}
        try:
            parts["registry"] = self.registry_view(wanted)
        except Exception as exc:
            parts["registry"] = f"unreadable ({type(exc).__name__})"
        for host in hosts if hosts is not None else self.hosts:
            try:
                parts[f"proxy {host.name}"] = self.proxy_view(host, wanted)
            except Exception as exc:
                parts[f"proxy {host.name}"] = f"unreadable ({type(exc).__name__})"
        return real, parts

    def converge(
        self,
        since: float,
        reference: str,
        timeout: float,
        *,
        services: Iterable[str] | None = None,
        hosts: Sequence[Host] | None = None,
        hold: float = HOLD,
    ) -> Convergence:
        """Poll until the registry and every proxy (of ``hosts``, default all) match reality
        and kept matching for ``hold`` seconds, or ``timeout`` seconds after ``since`` pass.
        Each part's time is when its final match began, relative to ``since``."""
        wanted = list(services) if services is not None else self.services()
        began: dict[str, float | None] = {}
        deadline = since + timeout
        real: dict[str, set[str]] | None = None
        parts: dict[str, dict[str, set[str]] | str] = {}
        while True:
            moment = time.monotonic()
            real, parts = self.views(wanted, hosts)
            for part, view in parts.items():
                if real is not None and view == real:
                    if began.get(part) is None:
                        began[part] = moment
                else:
                    began[part] = None
            settled = [b for b in began.values() if b is not None]
            if len(settled) == len(parts) and moment - max(settled) >= hold:
                break
            if moment >= deadline:
                break
            time.sleep(0.1)
        times = {part: (None if b is None else max(0.0, b - since)) for part, b in began.items()}
        mismatch = "" if all(t is not None for t in times.values()) else describe(real, parts)
        return Convergence(reference, times, mismatch)

    def settle(
        self,
        timeout: float = 60,
        *,
        services: Iterable[str] | None = None,
        hosts: Sequence[Host] | None = None,
    ) -> None:
        """Wait until everything matches reality (a scenario's setup); fail with the views and
        the agents' logs otherwise."""
        result = self.converge(
            time.monotonic(), "setup", timeout, services=services, hosts=hosts, hold=0.5
        )
        if not result.matched:
            raise AssertionError(
                f"setup did not converge within {timeout:g}s: {result.text()}\n{self.logs()}"
            )

    def problems(self, host: Host) -> list[str]:
        """The problems the agent of ``host`` reports: ``subject: message`` of each problem of
        its ``/healthz/ready`` answer, and its log lines at WARNING or ERROR."""
        found: list[str] = []
        if host.listen:
            session = requests.Session()
            session.trust_env = False
            try:
                answer = session.get(f"http://{host.listen}/healthz/ready", timeout=1.0).json()
                for problem in answer.get("problems") or []:
                    found.append(f"{problem.get('subject')}: {problem.get('message')}")
            except (requests.RequestException, ValueError, AttributeError):
                pass
            finally:
                session.close()
        if host.agent is not None:
            found.extend(
                line
                for line in host.agent.log().splitlines()
                if " WARNING " in line or " ERROR " in line
            )
        return found

    def reported(self, host: Host, *needles: str) -> Callable[[], bool]:
        """A check: a problem the agent of ``host`` reports names every one of ``needles``."""

        def check() -> bool:
            return any(all(n in line for n in needles) for line in self.problems(host))

        return check

    # -- clients

    def probe(self, host: Host, service: str, *, interval: float = PROBE_INTERVAL) -> Prober:
        prober = Prober(
            self.frontend(service),
            host.ip,
            interval=interval,
            timeout=PROBE_TIMEOUT,
            name=f"{service}@{host.name}",
        )
        self.probers.append(prober.start())
        return prober

    def probe_all(self, services: Iterable[str] | None = None) -> list[Prober]:
        wanted = list(services) if services is not None else self.services()
        return [self.probe(host, service) for host in self.hosts for service in wanted]

    def stop_probes(self) -> None:
        for prober in self.probers:
            prober.stop()

    # -- faults

    def mark(self, label: str) -> float:
        """Note a moment of the scenario (a fault injected, healed): its monotonic time."""
        moment = time.monotonic()
        self.marks.append((moment, label))
        return moment

    def freeze(self, pid: int, label: str) -> float:
        """SIGSTOP ``pid`` (SIGCONT again at the latest at :meth:`close`)."""
        os.kill(pid, signal.SIGSTOP)
        self.frozen.append(pid)
        return self.mark(label)

    def thaw(self, pid: int, label: str) -> float:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        if pid in self.frozen:
            self.frozen.remove(pid)
        return self.mark(label)

    def take_port(self, address: str, port: int) -> socket.socket:
        """Listen on ``address:port`` as "another process" would (closed at the end)."""
        sock = socket.socket()
        sock.bind((address, port))
        sock.listen(16)
        self.listeners.append(sock)
        return sock

    def release_port(self, sock: socket.socket) -> None:
        sock.close()
        if sock in self.listeners:
            self.listeners.remove(sock)

    # -- reporting

    def report(
        self,
        scenario: str,
        *,
        convergence: Convergence | None = None,
        probers: Sequence[Prober] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """The scenario's figures as text (for assertion messages), recorded for the summary."""
        chosen = list(probers) if probers is not None else self.probers
        record(scenario, probers=chosen, convergence=convergence, extra=extra)
        timeline = ", ".join(f"t+{m - self.origin:.2f}s {label}" for m, label in self.marks)
        lines = [f"[{scenario}]", f"  timeline: {timeline or '-'}"]
        failed = sum(p.failures() for p in chosen)
        total = sum(p.total() for p in chosen)
        lines.append(f"  failed client requests: {failed} of {total} (goal 0)")
        for prober in chosen:
            for line in prober.describe(self.origin, self.marks).splitlines():
                lines.append(f"    {line}")
        if convergence is not None:
            lines.append("  " + convergence.text().replace("\n", "\n  "))
        for key, value in (extra or {}).items():
            lines.append(f"  {key}: {value}")
        return "\n".join(lines)

    def failed(self, probers: Sequence[Prober] | None = None) -> int:
        return sum(p.failures() for p in (probers if probers is not None else self.probers))

    def logs(self, lines: int = 30) -> str:
        parts = []
        for host in self.hosts:
            if host.agent is not None:
                tail = host.agent.log().splitlines()[-lines:]
                parts.append(f"--- agent of host {host.name} ({host.agent.log_path}):")
                parts.extend(tail)
        return "\n".join(parts)

    def keep_logs(self, destination: Path) -> None:
        """Copy every log of the fleet (agents, HAProxy, nginx) to ``destination``."""
        destination.mkdir(parents=True, exist_ok=True)
        for path in self.root.rglob("*.log"):
            if path.is_file():
                target = destination / "_".join(path.relative_to(self.root).parts)
                with contextlib.suppress(OSError):
                    shutil.copyfile(path, target)

    # -- the end

    def close(self) -> None:
        """End everything the fleet started, in order, whatever state it is in."""
        for prober in self.probers:
            with contextlib.suppress(Exception):
                prober.stop()
        for pid in list(self.frozen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen.clear()
        for sock in self.listeners:
            sock.close()
        self.listeners.clear()
        for host in self.hosts:
            if host.agent is not None:
                # SIGKILL: a graceful exit would wait for a registry the scenario may have
                # taken away; the registry is thrown away with the test anyway.
                host.agent.kill()
            stop_proxies(host.state_dir, kill=True)
        for backend in self.backends:
            with contextlib.suppress(Exception):
                self.remove(backend)
        for _, container in self.extra_containers:
            with contextlib.suppress(Exception):
                container.remove(force=True)
        for host in self.hosts:
            if host.daemon.running:
                with contextlib.suppress(Exception):
                    for container in host.client().containers.list(
                        all=True, filters={"label": f"{FLEET_LABEL}={self.id}"}
                    ):
                        container.remove(force=True)
            host.reconnect()


def describe(real: dict[str, set[str]] | None, parts: dict[str, dict[str, set[str]] | str]) -> str:
    """What differs from reality, part by part (for messages)."""
    if real is None:
        return "reality unreadable (a Docker daemon is down)"
    out = []
    for part, view in parts.items():
        if isinstance(view, str):
            out.append(f"{part}: {view}")
            continue
        if view == real:
            continue
        diffs = []
        for service in sorted(set(real) | set(view)):
            missing = real.get(service, set()) - view.get(service, set())
            extra = view.get(service, set()) - real.get(service, set())
            if missing:
                diffs.append(f"{service} lacks {sorted(missing)}")
            if extra:
                diffs.append(f"{service} still has {sorted(extra)}")
        out.append(f"{part}: {'; '.join(diffs)}")
    return " | ".join(out)


_UPSTREAM = re.compile(r"^\s*upstream\s+(\S+)\s*\{")
_SERVER = re.compile(r"^\s*server\s+(\S+:\d+)[\s;]")


def nginx_upstreams(state_dir: Path) -> dict[str, set[str]]:
    """``upstream -> {"ip:port"}`` of the configuration nginx runs (discoverd names each
    upstream after its service).

    nginx has no runtime API to ask: the file is read only while it is the one confirmed
    running -- its SHA-256 is the marker ``applied.sha256`` the proxy toolkit writes once nginx
    loaded it (``discoverd.proxykit``) -- and while nginx runs. A candidate written but not (or
    not yet) loaded raises ``OSError``, as an unreadable proxy."""
    folder = state_dir / "nginx"
    try:
        pid = int((folder / "nginx.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return {}
    data = (folder / "nginx.conf").read_bytes()
    if (folder / "applied.sha256").read_text().strip() != hashlib.sha256(data).hexdigest():
        raise OSError("nginx.conf is not the configuration confirmed running")
    text = data.decode(errors="replace")
    found: dict[str, set[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        if match := _UPSTREAM.match(line):
            current = match.group(1)
            continue
        if current is not None and (match := _SERVER.match(line)):
            found.setdefault(current, set()).add(match.group(1))
        elif current is not None and line.strip() == "}":
            current = None
    return found


def short_root() -> Path:
    """A short work folder under /tmp (HAProxy's unix socket paths must stay short), which
    nginx's unprivileged workers can walk through."""
    root = Path(tempfile.mkdtemp(prefix="ddf", dir="/tmp"))
    root.chmod(0o755)
    return root


def wait_until(
    check: Callable[[], object], timeout: float, what: str, interval: float = 0.05
) -> float:
    """Poll ``check`` until it returns something true; the moment it did. An exception
    counts as "not yet". Raises ``AssertionError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = check()
            if last:
                return time.monotonic()
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)


def moment_when(
    check: Callable[[], object], timeout: float, interval: float = 0.05
) -> float | None:
    """Like :func:`wait_until`, but ``None`` instead of an error after ``timeout``: for a
    figure the scenario reports (and asserts) itself."""
    try:
        return wait_until(check, timeout, "", interval)
    except AssertionError:
        return None


def command_line() -> str:
    """The command of this pytest run, for the report."""
    return " ".join([Path(sys.executable).name, "-m", "pytest", *sys.argv[1:]])


def write_results(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    document = {"command": command_line(), "results": RESULTS}
    Path(path).write_text(json.dumps(document, indent=2, default=str) + "\n")
