"""Launchers for real Consul agents: one agent in ``-dev`` mode (:class:`Consul`, for the tests
and the demo) and a cluster of server agents (:class:`ConsulCluster`, for failover).

``-dev`` runs a single server agent that keeps its catalog in memory: :meth:`Consul.restart`
brings back an *empty* agent on the same ports, which is exactly what a registry must survive
(it has to notice and register its instances again). The agent itself keeps the services
registered with it in ``<root>/data`` and loads them again when it starts; ``restart()`` wipes
that first unless told not to. Every port is a free loopback port; DNS and gRPC are off. With
``acl_token`` the agent enforces ACLs (default policy ``deny``) and that token is its master and
agent token.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

from tests.support.services import (
    ServiceUnavailable,
    _kill_process,
    _launch,
    _Service,
    _stop_process,
    _tool_env,
    _wait_until_up,
    free_port,
    require_binary,
    wait_for,
)

__all__ = ["Consul", "ConsulCluster", "ConsulServer"]

_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Consul(_Service):
    """A ``consul agent -dev`` on 127.0.0.1 (log in ``<root>/consul.log``, data in
    ``<root>/data``). ``address`` is ``127.0.0.1:<http port>``; ``url`` adds ``http://``."""

    def __init__(
        self,
        root: Path,
        *,
        http_port: int | None = None,
        node: str = "discoverd-test",
        acl_token: str = "",
    ) -> None:
        self.root = Path(root).absolute()
        self.node = node
        self.acl_token = acl_token
        ports: list[int] = []
        for _ in range(4):
            port = free_port()
            while port in ports or port == http_port:
                port = free_port()
            ports.append(port)
        self.http_port = http_port if http_port is not None else ports[0]
        self.server_port, self.serf_lan_port, self.serf_wan_port = ports[1:]
        self.address = f"127.0.0.1:{self.http_port}"
        self.url = f"http://{self.address}"
        self.data_dir = self.root / "data"
        self.log_path = self.root / "consul.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"Consul(url={self.url!r}, root={str(self.root)!r})"

    def command(self) -> list[str]:
        cmd = [
            require_binary("consul"),
            "agent",
            "-dev",
            f"-node={self.node}",
            "-bind=127.0.0.1",
            "-client=127.0.0.1",
            f"-http-port={self.http_port}",
            "-dns-port=-1",
            "-grpc-port=-1",
            f"-server-port={self.server_port}",
            f"-serf-lan-port={self.serf_lan_port}",
            f"-serf-wan-port={self.serf_wan_port}",
            f"-data-dir={self.data_dir}",
            "-log-level=debug",
        ]
        if self.acl_token:
            hcl = {
                "acl": {
                    "enabled": True,
                    "default_policy": "deny",
                    "tokens": {"master": self.acl_token, "agent": self.acl_token},
                }
            }
            cmd.append(f"-hcl={json.dumps(hcl)}")  # JSON is valid HCL
        return cmd

    def start(self, timeout: float = 30) -> None:
        """Start the agent and wait until it has a leader and lists its own node."""
        if self.running:
            return
        cmd = self.command()
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = _tool_env(drop_prefixes=("CONSUL_",))
        self._proc = _launch(cmd, self.log_path, env)
        _wait_until_up(self._proc, self._ready, timeout, f"consul ({self.url})", self.log_path)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self._proc is not None:
            _stop_process(self._proc, 10)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL now; :meth:`start` brings the agent back on the same ports, with the services
        it kept in its data directory (see :meth:`restart`)."""
        if self._proc is not None:
            _kill_process(self._proc)
            self._proc = None

    def restart(self, timeout: float = 30, *, forget: bool = True) -> None:
        """Stop and start again on the same ports.

        With ``forget`` (the default) the data directory is wiped first, so the agent comes back
        empty: the catalog of a ``-dev`` agent lives in memory, but the agent keeps its own
        services and checks in the data directory and would register them again on start."""
        self.stop()
        if forget:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start(timeout)

    def get(self, path: str, timeout: float = 2.0) -> object:
        """GET ``path`` of the HTTP API (with the ACL token, if any) and decode the JSON."""
        request = urllib.request.Request(self.url + path)
        if self.acl_token:
            request.add_header("X-Consul-Token", self.acl_token)
        with _NO_PROXY_OPENER.open(request, timeout=timeout) as response:
            body: bytes = response.read()
        return json.loads(body)

    def _ready(self) -> bool:
        try:
            leader = self.get("/v1/status/leader", timeout=1.0)
            if not leader:
                return False
            nodes = self.get("/v1/catalog/nodes", timeout=1.0)
        except (OSError, ValueError):
            return False
        return isinstance(nodes, list) and any(
            isinstance(n, dict) and n.get("Node") == self.node for n in nodes
        )


# --------------------------------------------------------------------------------------------
# A cluster of servers

#: The ports every server of a :class:`ConsulCluster` keeps (Consul's defaults): server RPC,
#: serf LAN, serf WAN (TCP and UDP), HTTP.
CLUSTER_PORTS = (8300, 8301, 8302, 8500)


def _bindable(address: str, port: int, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def free_loopback_addresses(count: int, ports: tuple[int, ...] = CLUSTER_PORTS) -> list[str]:
    """``count`` addresses 127.0.0.X (X from 10 to 249, drawn at random so that two test runs
    on one machine rarely meet) on which every one of ``ports`` is free, TCP and UDP, and also
    free on the wildcard address."""
    rng = random.SystemRandom()
    candidates = list(range(10, 250))
    rng.shuffle(candidates)
    chosen: list[str] = []
    for last in candidates:
        address = f"127.0.0.{last}"
        if all(
            _bindable(address, port, kind)
            for port in ports
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM)
        ):
            chosen.append(address)
            if len(chosen) == count:
                return chosen
    raise ServiceUnavailable(f"no {count} loopback addresses with the ports {ports} free")


class ConsulServer:
    """One server agent of a :class:`ConsulCluster` on its own loopback address."""

    def __init__(self, root: Path, name: str, address: str) -> None:
        self.root = root
        self.name = name
        self.address = address
        self.http_address = f"{address}:8500"
        self.url = f"http://{self.http_address}"
        self.data_dir = root / "data"
        self.log_path = root / "consul.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"ConsulServer({self.name!r}, {self.address!r})"

    @property
    def pid(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        return None

    def get(self, path: str, timeout: float = 2.0) -> object:
        """GET ``path`` of this agent's HTTP API and decode the JSON."""
        with _NO_PROXY_OPENER.open(self.url + path, timeout=timeout) as response:
            body: bytes = response.read()
        return json.loads(body)

    def leader(self) -> str:
        """The leader's server address (``127.0.0.X:8300``) this agent knows, or ``""``."""
        try:
            answer = self.get("/v1/status/leader", timeout=1.0)
        except (OSError, ValueError):
            return ""
        return answer if isinstance(answer, str) else ""


class ConsulCluster:
    """``size`` Consul servers (``-server -bootstrap-expect size``), one per loopback address
    so that each keeps Consul's default ports (see ``../shared/SERVICES.md``), with
    ``raft_multiplier = 1``: a new leader within about 3 s of losing one."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = Path(root).absolute()
        addresses = free_loopback_addresses(size)
        self.servers = [
            ConsulServer(self.root / f"s{i}", f"s{i}", address)
            for i, address in enumerate(addresses)
        ]

    def command(self, server: ConsulServer) -> list[str]:
        joins = [f"-retry-join={other.address}" for other in self.servers]
        return [
            require_binary("consul"),
            "agent",
            "-server",
            f"-bootstrap-expect={len(self.servers)}",
            f"-node={server.name}",
            f"-bind={server.address}",
            f"-client={server.address}",
            f"-data-dir={server.data_dir}",
            "-dns-port=-1",
            "-grpc-port=-1",
            "-retry-interval=1s",
            "-hcl=performance { raft_multiplier = 1 }",
            "-log-level=info",
            *joins,
        ]

    def _launch(self, server: ConsulServer) -> None:
        server.root.mkdir(parents=True, exist_ok=True)
        server.data_dir.mkdir(parents=True, exist_ok=True)
        env = _tool_env(drop_prefixes=("CONSUL_",))
        server.proc = _launch(self.command(server), server.log_path, env)

    def start(self, timeout: float = 60) -> None:
        """Start every server; wait until all agree on a leader and list every node."""
        for server in self.servers:
            self._launch(server)
        try:
            wait_for(self._formed, timeout, interval=0.2, what="a Consul cluster with a leader")
        except TimeoutError as exc:
            tails = "\n".join(
                f"--- {s.name}: {s.log_path.read_text(errors='replace')[-1500:]}"
                for s in self.servers
                if s.log_path.exists()
            )
            self.stop()
            raise ServiceUnavailable(f"{exc}\n{tails}") from exc

    def _formed(self) -> bool:
        leaders = {s.leader() for s in self.servers if s.pid is not None}
        if len(leaders) != 1 or "" in leaders:
            return False
        nodes = self.servers[0].get("/v1/catalog/nodes", timeout=1.0)
        if not isinstance(nodes, list):
            return False
        names = {n.get("Node") for n in nodes if isinstance(n, dict)}
        return names >= {s.name for s in self.servers}

    def leader(self) -> int | None:
        """The index of the server that leads, as the running servers agree; else None."""
        leaders = {s.leader() for s in self.servers if s.pid is not None}
        if len(leaders) != 1:
            return None
        address = leaders.pop().rpartition(":")[0]
        for index, server in enumerate(self.servers):
            if server.address == address and server.pid is not None:
                return index
        return None

    def kill(self, index: int) -> None:
        """SIGKILL one server now."""
        server = self.servers[index]
        if server.proc is not None:
            _kill_process(server.proc)
            server.proc = None

    def stop(self) -> None:
        for server in self.servers:
            if server.proc is not None:
                _stop_process(server.proc, 10)
                server.proc = None
