"""The nginx proxy: render, check with ``nginx -t``, apply with a verified graceful reload.

Files, all in ``<state_dir>/nginx`` (nginx runs with ``-p <state_dir>/nginx/``):

- ``nginx.conf``: the configuration nginx runs (``-c``), replaced atomically;
  ``applied.sha256``: the digest of the configuration last confirmed running;
- ``nginx.pid``, ``error.log`` (nginx's own messages, kept under about a megabyte; also ``-e``,
  so nothing is lost before the configuration is read), ``tmp/`` (nginx's temp folders);
- ``status/services.txt`` and ``status/services.json``: the status page's content, written
  after each successful start or reload;
- ``check/``: the prefix ``nginx -t`` runs with, so a check never touches the running nginx's
  pid file or logs; ``candidate-*.conf``: short-lived files for ``nginx -t``;
- ``start.out``: what the last start printed.

The apply skeleton (lock, compare, write, start or reload, roll back, confirm) is
:class:`~discoverd.proxykit.ManagedProxy`'s; the master process is supervised by
:class:`~discoverd.plugins.nginx.master.Master` (start, adopt, verified reload, stop). nginx
has no runtime API: every change is a reload, at most one per ``reload_interval``. On a refused
reload the previous file is put back, so the file on disk always is what runs. ``unservable``
names the services whose frontend port another process holds, so that the core leaves them
out instead of a reload nginx refuses.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from discoverd import PluginError, ProxyConfigError, Service
from discoverd.plugins.nginx import render as rendering
from discoverd.plugins.nginx.config import (
    FORBIDDEN_PATH_CHARS,
    NginxConfig,
    WorkerSettings,
    worker_settings,
)
from discoverd.plugins.nginx.master import Master
from discoverd.plugins.nginx.messages import stderr_messages
from discoverd.plugins.nginx.processes import workers
from discoverd.proxykit import (
    LogFile,
    ManagedProxy,
    OwnPage,
    check_state_dir,
    child_pids,
    ensure_directory,
    held_ports,
    last_lines,
    pid_alive,
    read_pid,
    write_atomic,
)

log = logging.getLogger(__name__)

_STUB_STATUS_FLAG = "--with-http_stub_status_module"
# "listen 8000;", "listen 127.0.0.1:8000;", "listen [::]:53 udp;"
_LISTEN_RE = re.compile(rb"^[ \t]*listen[ \t]+([^\s;]+)([^;\n]*);", re.MULTILINE)


def listened_ports(config: bytes) -> frozenset[tuple[int, str]]:
    """The (port, protocol) pairs the ``listen`` directives of a configuration name."""
    found: set[tuple[int, str]] = set()
    for match in _LISTEN_RE.finditer(config):
        port = match.group(1).rsplit(b":", 1)[-1]
        if port.isdigit():
            found.add((int(port), "udp" if b"udp" in match.group(2).split() else "tcp"))
    return frozenset(found)


class NginxProxy(ManagedProxy[int]):
    """A local nginx, managed through its files, its pid and signals.

    ``workers`` fixes what nginx's workers run as (default: derived from ``config`` on this
    machine, see :func:`~discoverd.plugins.nginx.config.worker_settings`); ``stub_status``
    whether the binary has the stub_status module (default: asked once, ``nginx -V``). Both
    are for renders that must not depend on the machine (tests, golden files)."""

    #: Seconds allowed for ``nginx -t`` (and ``nginx -V``).
    check_timeout = 30.0

    def __init__(
        self,
        config: NginxConfig,
        state_dir: Path,
        *,
        workers: WorkerSettings | None = None,
        stub_status: bool | None = None,
    ) -> None:
        directory = Path(state_dir) / "nginx"
        used_by = "nginx's command line or configuration"
        check_state_dir(directory, forbidden=FORBIDDEN_PATH_CHARS, used_by=used_by)
        error_log = LogFile(directory / "error.log")
        super().__init__(
            "nginx",
            directory / "nginx.conf",
            private_dir=directory,
            dir_mode=0o711,
            log=error_log,
        )
        self.config = config
        self.workers = workers if workers is not None else worker_settings(config)
        self.dir = directory
        self.prefix = f"{directory}/"
        self.error_log = error_log.path
        self.status_dir = directory / "status"
        self.check_dir = directory / "check"
        #: The master process (start, adopt, reload, stop).
        self.master = Master(directory, self.config_file, config.binary, error_log)
        self.pid_file = self.master.pid_file.path
        self.start_output = self.master.start_output
        self._template = rendering.load_template(rendering.environment(config.template_dir))
        self._stub_status = stub_status
        #: The status page, left out while another process holds its port.
        self.status_page = OwnPage("nginx", "status port", config.status_bind, config.status_port)
        self._listened: tuple[bytes, frozenset[tuple[int, str]]] | None = None  # memo

    # -- Proxy interface ---------------------------------------------------------------------

    def render(self, services: Sequence[Service]) -> str:
        return rendering.render_config(
            self._template,
            self.config,
            self.workers,
            services,
            self.has_stub_status(),
            status=self._status_wanted(),
        )

    def _status_wanted(self) -> bool:
        """Whether the configuration has the status page: not while another process holds
        its port (nginx would not start, or not reload, and no service would be served for a
        page no service needs); see :class:`~discoverd.proxykit.OwnPage`."""
        port = self.config.status_port
        if not port:
            return False
        master, binary = self._master_and_binary()
        running = master is not None and (port, "tcp") in self._running_ports()
        return self.status_page.wanted(master=master, running_binds=running, executable=binary)

    def validate(self, config: str) -> None:
        binary = self.master.executable()
        prefix = f"{self.check_dir}/"
        done, name = self.check_candidate(
            config,
            lambda path: [binary, "-t", "-q", "-p", prefix, "-c", path, "-e", "stderr"],
            suffix=".conf",
            timeout=self.check_timeout,
            label=f"{binary} -t",
        )
        if done.returncode != 0:
            output = self.master.clean(done.stdout + "\n" + done.stderr, name)
            found = stderr_messages(output) or last_lines(output, 3)
            found = [line for line in found if not line.endswith("test failed")] or found
            raise ProxyConfigError(
                "nginx -t refused the configuration: " + "; ".join(found)
                if found
                else f"nginx -t refused the configuration (exit status {done.returncode})"
            )

    def apply_delay(self, config: str, services: Sequence[Service]) -> float:
        """Time left before the next reload is allowed (``reload_interval`` after the last start
        or reload ended); 0 when nginx does not run (a start is never delayed)."""
        interval = self.config.reload_interval
        last = self.last_reload
        if interval <= 0 or last is None:
            return 0.0
        pid = read_pid(self.pid_file)
        if pid is None or not pid_alive(pid):
            return 0.0
        left = max(0.0, last.ended + interval - time.monotonic())
        if left > 0 and self._only_removes(config):
            return 0.0  # taking a server out is never held back: it may be dead already
        return left

    def _only_removes(self, config: str) -> bool:
        """Whether ``config`` only drops lines of the configuration confirmed running (servers
        leaving, nothing new): such a change is applied at once, rate limit or not."""
        running = self.confirmed_config()
        if running is None:
            return False
        have = Counter(running.decode("utf-8", errors="replace").splitlines())
        want = Counter(config.splitlines())
        return not (want - have) and want != have

    def reserved_ports(self) -> frozenset[int]:
        port = self.config.status_port
        return frozenset({port}) if port else frozenset()

    def preflight(self) -> None:
        """The executable must exist: without it nothing will ever be served."""
        self.master.executable()

    def unservable(self, services: Sequence[Service]) -> dict[str, str]:
        """The services whose frontend port (tcp, or udp for udp services) another process
        holds on ``bind`` now (:func:`~discoverd.proxykit.held_ports`), e.g. ``frontend port
        8000 is held by another process (python3, pid 4242)``: nginx would refuse the reload
        (after retrying the port for about 2.5 s). Ports the running nginx listens on (those
        of its confirmed configuration) are not probed; a port found held by nginx's own
        master or workers is not reported either."""
        wanted: dict[tuple[int, str], list[str]] = {}
        for service in services:
            wanted.setdefault((service.frontend_port, service.protocol), []).append(service.name)
        if not wanted:
            return {}
        master, binary = self._master_and_binary()
        pending = set(wanted) - (self._running_ports() if master is not None else frozenset())
        if not pending:
            return {}
        owners = {master, *child_pids(master)} if master is not None else set()
        # nginx sets IPV6_V6ONLY on its IPv6 listeners ("ipv6only=on" is its default).
        v6only = True if ":" in self.config.bind else None
        found: dict[str, str] = {}
        for protocol in ("tcp", "udp"):
            ports = {port for port, kind in pending if kind == protocol}
            if not ports:
                continue
            held = held_ports(
                self.config.bind, ports, protocol, owners=owners, v6only=v6only, executable=binary
            )
            for port, holder in held.items():
                for name in wanted[(port, protocol)]:
                    found[name] = holder.describe("frontend port")
        return found

    def _master_and_binary(self) -> tuple[int | None, str | None]:
        """The running master's pid (``None``: none runs) and the nginx binary (``None``:
        there is none, so nothing runs; ``start()`` says why), for the port probes."""
        try:
            return self.master.running(adopt=False), self.master.executable()
        except PluginError:
            return None, None

    def close(self) -> None:
        """Leave nginx running with its last good configuration (see ``stop_process``)."""

    # -- the apply skeleton's hooks ----------------------------------------------------------

    def prepare(self) -> None:
        # Workers may run as another user (root starts them as nobody): they must be able to
        # reach their temp folders and the status page, but not list or change anything.
        for path, mode in (
            (self.dir, 0o711),
            (self.dir / "tmp", 0o711),
            (self.status_dir, 0o711),
            (self.check_dir, 0o700),
            (self.check_dir / "tmp", 0o700),
        ):
            ensure_directory(path, mode)

    def find_running(self) -> int | None:
        return self.master.running(adopt=True)

    def start(self) -> None:
        self.master.start()

    def reload(self, running: int, services: Sequence[Service]) -> None:
        self.master.reload(running)

    def applied(self, result: str, services: Sequence[Service]) -> None:
        if result != "unchanged" or not (self.status_dir / "services.json").exists():
            self._write_status(services)

    # -- beyond the interface: for tests, the demo and benchmarks ------------------------------

    def master_pid(self) -> int | None:
        """The running master's pid, or ``None`` if no nginx of this state directory runs."""
        return self.master.running(adopt=False)

    def worker_pids(self) -> set[int]:
        """The running master's workers (those still draining after a reload included)."""
        master = self.master_pid()
        return workers(master) if master is not None else set()

    def has_stub_status(self) -> bool:
        """True if the nginx binary has the stub_status module (asked once, ``nginx -V``)."""
        if self._stub_status is None:
            try:
                done = subprocess.run(
                    [self.master.executable(), "-V"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=self.check_timeout,
                    check=False,
                )
                self._stub_status = _STUB_STATUS_FLAG in done.stdout + done.stderr
            except (PluginError, OSError, subprocess.TimeoutExpired):
                return True  # nginx -t will tell what is missing
        return self._stub_status

    def stop_process(self, *, graceful: bool = False, timeout: float | None = None) -> bool:
        """Stop the nginx of this state directory (master and workers); wait for them.

        ``graceful`` lets workers finish their connections (SIGQUIT) instead of stopping at once
        (SIGTERM). Returns ``False`` if no nginx was running.
        """
        stopped = self.master.stop(graceful=graceful, timeout=timeout)
        self.forget()
        return stopped

    # -- internals -----------------------------------------------------------------------------

    def _running_ports(self) -> frozenset[tuple[int, str]]:
        """The (port, protocol) pairs of the configuration confirmed running (nginx holds
        them)."""
        data = self.confirmed_config()
        if data is None:
            return frozenset()
        cached = self._listened
        if cached is None or cached[0] != data:
            cached = self._listened = (data, listened_ports(data))
        return cached[1]

    def _write_status(self, services: Sequence[Service]) -> None:
        try:
            documents = rendering.status_documents(services, self.config)
            for name, content in documents.items():
                write_atomic(self.status_dir / name, content, mode=0o644)
        except (OSError, PluginError) as exc:
            log.warning("nginx: cannot write the status page: %s", exc)
