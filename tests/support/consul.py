"""A launcher for a real Consul agent in ``-dev`` mode, for the tests and the demo.

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
import shutil
import subprocess
import urllib.request
from pathlib import Path

from tests.support.services import (
    _kill_process,
    _launch,
    _Service,
    _stop_process,
    _tool_env,
    _wait_until_up,
    free_port,
    require_binary,
)

__all__ = ["Consul"]

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
