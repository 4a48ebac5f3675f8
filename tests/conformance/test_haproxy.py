"""The HAProxy proxy plugin through the proxy contract, against the real haproxy binary.

The probe reads HAProxy itself, through the files any operator would use: the master CLI socket
``<state_dir>/haproxy/master.sock`` (``show proc``: the master's reload counter) and the
configuration file named by the master's ``-f`` argument.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from discoverd import HostInfo, PluginContext, Proxy, build_config
from discoverd.plugins.haproxy import make_proxy
from discoverd.plugins.haproxy.config import HAProxyConfig
from discoverd.testing.conformance import ProxyContract, ProxyFactory, fresh_port


def master_cli(master_socket: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(3.0)
        sock.connect(str(master_socket))
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


class HAProxyProbe:
    """HAProxy's own view of itself, through its master socket and process table."""

    def __init__(self, state_dir: Path) -> None:
        self.master_socket = state_dir / "haproxy" / "master.sock"

    def _proc(self) -> tuple[int, int, list[int]]:
        """(master pid, reload count, worker pids) from ``show proc``."""
        master: tuple[int, int] | None = None
        workers: list[int] = []
        for line in master_cli(self.master_socket, "show proc").splitlines():
            fields = line.split()
            if len(fields) < 3 or not fields[0].isdigit():
                continue
            if fields[1] == "master":
                master = (int(fields[0]), int(fields[2]))
            elif fields[1] == "worker":
                workers.append(int(fields[0]))
        if master is None:
            raise RuntimeError("show proc names no master (mid-reload?)")
        return master[0], master[1], workers

    def reload_count(self) -> int:
        return self._proc()[1]

    def running_config(self) -> str:
        pid = self._proc()[0]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        config = Path(argv[argv.index(b"-f") + 1].decode())
        return config.read_text()

    def kill_all(self) -> None:
        """Kill the master and its workers, if any still run."""
        with contextlib.suppress(OSError, RuntimeError):
            master, _, workers = self._proc()
            for pid in (master, *workers):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class TestHAProxyProxy(ProxyContract):
    serves_traffic = True
    service_mode = "http"

    @pytest.fixture
    def haproxy_state(self, haproxy_binary: str, discoverd_state_dir: Path) -> Path:
        return discoverd_state_dir

    @pytest.fixture
    def make_proxy(self, haproxy_binary: str, haproxy_state: Path) -> Iterator[ProxyFactory]:
        options: dict[str, Any] = {
            "binary": haproxy_binary,
            "bind": "127.0.0.1",
            "stats_port": fresh_port(),
        }
        made: list[Proxy] = []

        def build() -> Proxy:
            ctx = PluginContext(
                config=build_config(HAProxyConfig, options, section="haproxy"),
                host=HostInfo(ip="127.0.0.1", id="kit-host-1"),
                state_dir=haproxy_state,
            )
            proxy = make_proxy(ctx)
            made.append(proxy)
            return proxy

        yield build
        for proxy in made:
            stop = getattr(proxy, "stop_process", None)
            if stop is not None:
                with contextlib.suppress(Exception):
                    stop()
                break
        HAProxyProbe(haproxy_state).kill_all()

    @pytest.fixture
    def proxy_probe(self, haproxy_state: Path) -> HAProxyProbe:
        return HAProxyProbe(haproxy_state)
