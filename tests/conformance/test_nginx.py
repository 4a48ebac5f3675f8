"""The nginx proxy plugin through the proxy contract, against the real nginx binary.

The probe reads nginx itself, through what any operator would look at: the pid file
``<state_dir>/nginx/nginx.pid``, the master's process title (which names its ``-c`` file) and
its worker processes. nginx keeps no reload counter: a reload shows as a new generation of
workers, so the probe counts the times the set of accepting workers changed between two looks.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from discoverd import HostInfo, PluginContext, Proxy, build_config
from discoverd.plugins.nginx import make_proxy
from discoverd.plugins.nginx.config import NginxConfig
from discoverd.testing.conformance import ProxyContract, ProxyFactory, fresh_port


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return 0
    return int(fields[1])


class NginxProbe:
    """nginx's own view of itself: its pid file, its master and worker processes."""

    def __init__(self, state_dir: Path) -> None:
        self.pid_file = state_dir / "nginx" / "nginx.pid"
        self.generation: frozenset[int] | None = None
        self.reloads = 0

    def master(self) -> int:
        pid = int(self.pid_file.read_text().strip())
        if not _title(pid).startswith("nginx: master process"):
            raise RuntimeError(f"pid {pid} of {self.pid_file} is not an nginx master")
        return pid

    def accepting_workers(self, master: int) -> frozenset[int]:
        """Workers that accept connections (not those draining after a reload)."""
        return frozenset(
            pid
            for pid in (int(p) for p in os.listdir("/proc") if p.isdigit())
            if _parent(pid) == master and _title(pid) == "nginx: worker process"
        )

    def reload_count(self) -> int:
        current = self.accepting_workers(self.master())
        if not current:
            raise RuntimeError("nginx has no accepting worker now (mid-reload?)")
        if self.generation is not None and current - self.generation:
            self.reloads += 1
        self.generation = current
        return self.reloads

    def running_config(self) -> str:
        words = _title(self.master()).split()
        return Path(words[words.index("-c") + 1]).read_text()

    def kill_all(self) -> None:
        """Kill the master and its workers, if any still run."""
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            master = self.master()
            for pid in (master, *self.accepting_workers(master)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class TestNginxProxy(ProxyContract):
    serves_traffic = True
    service_mode = "http"

    @pytest.fixture
    def nginx_state(self, discoverd_require_binary: Any, discoverd_state_dir: Path) -> Path:
        discoverd_require_binary("nginx")
        # As discoverd makes it for root: nginx's workers (nobody) must reach their temp folders.
        discoverd_state_dir.chmod(0o755)
        return discoverd_state_dir

    @pytest.fixture
    def make_proxy(
        self, discoverd_require_binary: Any, nginx_state: Path
    ) -> Iterator[ProxyFactory]:
        options: dict[str, Any] = {
            "binary": discoverd_require_binary("nginx"),
            "bind": "127.0.0.1",
            "status_port": fresh_port(),
            "worker_processes": "1",
        }
        made: list[Proxy] = []

        def build() -> Proxy:
            ctx = PluginContext(
                config=build_config(NginxConfig, options, section="nginx"),
                host=HostInfo(ip="127.0.0.1", id="kit-host-1"),
                state_dir=nginx_state,
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
        NginxProbe(nginx_state).kill_all()

    @pytest.fixture
    def proxy_probe(self, nginx_state: Path) -> NginxProbe:
        return NginxProbe(nginx_state)
