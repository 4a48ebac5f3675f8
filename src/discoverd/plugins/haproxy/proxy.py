"""The HAProxy proxy: render, check with ``haproxy -c``, and the apply decision: runtime API
commands when only servers changed, a verified hitless reload otherwise.

Files, all in ``<state_dir>/haproxy`` (mode 0700):

- ``haproxy.cfg``: the configuration HAProxy runs (``-f``), replaced atomically;
  ``applied.sha256``: the digest of the configuration last confirmed running;
- ``haproxy.pid``, ``master.sock`` (master CLI), ``admin.sock`` (runtime API, level admin);
- ``server-state``: servers' health saved just before a reload, loaded by the new worker;
- ``haproxy.log``: HAProxy's own messages (start-up and reload errors, servers going up and
  down), kept under about a megabyte;
- ``candidate-*.cfg``: short-lived files for ``haproxy -c``.

The apply skeleton (lock, compare, write, start or reload, roll back, confirm) is
:class:`~discoverd.proxykit.ManagedProxy`'s; the master process is supervised by
:class:`~discoverd.plugins.haproxy.master.Master` (start, adopt, verified reload, stop). On a
refused reload the previous file is put back, so the file on disk always is what runs.

Most changes need no reload at all. When a candidate differs from the configuration confirmed
running only in the plain server lines of its backends (:mod:`.config_split`), ``apply`` sends
runtime API commands on the admin socket instead: ``add server`` (+ ``enable health``, ``set
server ... state ready``) for a new instance, ``set server ... addr`` for one that moved, ``set
server ... state drain`` for one that left (:mod:`.drain` frees it later), then writes the new
file. Should HAProxy refuse a command, the same candidate is applied by a verified reload
instead, and the logs say so.

``validate`` skips ``haproxy -c`` for such a candidate too: it differs from the configuration
confirmed running (the file on disk whose digest is the marker's, which HAProxy itself loaded)
only in server lines whose options that file already uses. The decision reads those two files,
nothing remembered from earlier calls. ``apply_delay`` keeps reloads (never runtime changes) at
most one per ``reload_interval``.

``unservable`` names the services whose frontend port another process holds (the probe is
:func:`~discoverd.proxykit.held_ports`), so that the core leaves them out: a reload that cannot
bind one port fails, and HAProxy pauses every listener for about 2 s while it retries.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from discoverd import PluginError, ProxyConfigError, Service
from discoverd.plugins.haproxy import render as rendering
from discoverd.plugins.haproxy.config import HAProxyConfig, WorkerUser, with_workers, worker_user
from discoverd.plugins.haproxy.config_split import (
    Changes,
    ConfigSplit,
    checked_without_haproxy,
    runtime_changes,
    split_config,
)
from discoverd.plugins.haproxy.drain import Drain, Drainer, DrainPeriods
from discoverd.plugins.haproxy.master import Master, alerts
from discoverd.plugins.haproxy.sockets import (
    CommandError,
    ProcStatus,
    admin,
    admin_many,
    cli,
    filter_server_state,
    server_names,
    server_status,
)
from discoverd.proxykit import (
    LogFile,
    ManagedProxy,
    OwnPage,
    check_state_dir,
    child_pids,
    held_ports,
    last_lines,
    read_bytes,
    write_atomic,
)

log = logging.getLogger(__name__)
#: What in a configuration uses HAProxy's HTTP client: Lua scripts (2.6), and in later
#: versions ACME certificates and OCSP updates.
_HTTPCLIENT_WORDS = (b"lua-load", b"acme", b"ocsp-update")
_USES_HTTPCLIENT = re.compile(
    rb"(?m)^[ \t]*(?:lua-load(?:-per-thread)?|acme)[ \t]|[ \t]ocsp-update[ \t]+on\b"
)

# Generic trailers of `haproxy -c` that say nothing the lines before them do not.
_GENERIC_ALERTS = ("Error(s) found in configuration file", "Fatal errors found in configuration")
# Characters that cannot appear in the state directory: a quote or a line break would escape the
# single-quoted paths of the configuration, a comma would cut the -S argument of the command line.
_BAD_PATH_CHARS = "'\n\r\0,"
# A unix socket path holds at most 107 bytes; HAProxy binds "<path>.<pid>.tmp" and renames it.
_SOCKET_PATH_MAX = 107 - len(".4194304.tmp")
# "bind 127.0.0.1:8000", "bind *:8000 ...", "bind [::]:8000,:8001 ..."
_BIND_RE = re.compile(rb"^[ \t]*bind[ \t]+(\S+)", re.MULTILINE)


def bound_ports(config: bytes) -> frozenset[int]:
    """The ports the ``bind`` lines of a configuration listen on."""
    ports: set[int] = set()
    for match in _BIND_RE.finditer(config):
        for address in match.group(1).split(b","):
            port = address.rsplit(b":", 1)[-1]
            if port.isdigit():
                ports.add(int(port))
    return frozenset(ports)


def check_haproxy_dir(path: Path) -> Path:
    """The plugin's folder in the state directory, refused when HAProxy could not use paths
    inside it (a character its configuration or command line cannot hold, or too long for
    its unix sockets)."""
    check_state_dir(
        path, forbidden=_BAD_PATH_CHARS, used_by="HAProxy's configuration or command line"
    )
    longest = path / "master.sock"
    if len(str(longest).encode()) > _SOCKET_PATH_MAX:
        raise PluginError(
            f"state directory {str(path)!r} is too long for HAProxy's unix sockets ({longest} "
            f"must stay within {_SOCKET_PATH_MAX} bytes); choose a shorter state_dir"
        )
    return path


class HAProxy(ManagedProxy[ProcStatus]):
    """A local HAProxy in master-worker mode, managed through its files and sockets.

    ``workers`` fixes who HAProxy's workers run as (default: derived from ``config`` on this
    machine, see :func:`~discoverd.plugins.haproxy.config.worker_user`), for renders that must
    not depend on the machine (tests, golden files)."""

    #: Seconds allowed for ``haproxy -c``.
    check_timeout = 30.0
    #: Seconds the admin socket may take to answer a runtime API command.
    answer_timeout = 5.0

    def __init__(
        self, config: HAProxyConfig, state_dir: Path, *, workers: WorkerUser | None = None
    ) -> None:
        directory = check_haproxy_dir(Path(state_dir) / "haproxy")
        haproxy_log = LogFile(directory / "haproxy.log")
        super().__init__(
            "haproxy",
            directory / "haproxy.cfg",
            private_dir=directory,
            dir_mode=0o700,
            log=haproxy_log,
        )
        self.config = config
        #: Who the workers run as (``user``/``group`` empty: discoverd's own user).
        self.workers = workers if workers is not None else worker_user(config)
        self.dir = directory
        self.log_file = haproxy_log.path
        #: The master process (start, adopt, ``show proc``, reload, stop).
        self.master = Master(directory, self.config_file, config.binary, haproxy_log)
        self.pid_file = self.master.pid_file.path
        self.master_socket = self.master.master_socket
        self.admin_socket = directory / "admin.sock"
        self.server_state = directory / "server-state"
        env = rendering.environment(config.template_dir)
        #: Renders services, from per-service sections it caches by ``Service`` value
        #: (``renderer.cached`` says whether the template allows it).
        self.renderer = rendering.Renderer(
            env, rendering.load_template(env), with_workers(config, self.workers), directory
        )
        #: The stats page, left out while another process holds its port.
        self.stats_page = OwnPage("haproxy", "stats port", config.stats_bind, config.stats_port)
        #: The drain period each instance asks for (metadata ``drain``).
        self.drain_periods = DrainPeriods(config.drain_timeout)
        # One apply or drain step at a time within this process (the file lock is for others).
        self._lock = threading.RLock()
        self._drainer = Drainer(self.admin_socket, self._lock, timeout=self.answer_timeout)
        # The periods asked for by the services last applied: a server the next apply removes
        # drains for its instance's period.
        self._periods: dict[tuple[str, str], float] = {}
        # Memoization, keyed by its input: the split of the last candidate text, and of the
        # last file content read.
        self._candidate: tuple[str, ConfigSplit] | None = None
        self._on_disk: tuple[bytes, ConfigSplit] | None = None
        self._udp_warned: set[str] = set()
        self._lua_warned = False
        self._bound: tuple[str, frozenset[int]] | None = None  # memo: bound_ports by structure
        self._swept = False  # leftover servers of an adopted HAProxy looked for
        #: Reloads this object did (fallbacks included), and changes applied at run time.
        self.reloads = 0
        self.runtime_applies = 0
        #: Runtime changes HAProxy refused, each applied by a reload instead.
        self.fallbacks = 0

    # -- Proxy interface ---------------------------------------------------------------------

    def render(self, services: Sequence[Service]) -> str:
        udp = {s.name for s in services if s.protocol == "udp"}
        for name in sorted(udp - self._udp_warned):
            port = next(s.frontend_port for s in services if s.name == name)
            log.warning(
                "haproxy: service %s is udp (port %d); HAProxy proxies tcp only, so it is not "
                "served (a comment marks it in haproxy.cfg)",
                name,
                port,
            )
        self._udp_warned = udp  # a service that leaves and comes back is reported again
        return self.renderer.render(services, stats=self._stats_wanted())

    def _stats_wanted(self) -> bool:
        """Whether the configuration has the stats page: not while another process holds its
        port (HAProxy would not start, or not reload, and no service would be served for a
        page no service needs); see :class:`~discoverd.proxykit.OwnPage`."""
        port = self.config.stats_port
        if not port:
            return False
        master, binary = self._master_and_binary()
        running = master is not None and port in self._running_ports()
        return self.stats_page.wanted(master=master, running_binds=running, executable=binary)

    def validate(self, config: str) -> None:
        running = self.running_split()
        if running is not None and checked_without_haproxy(self.split(config), running):
            log.debug("haproxy: candidate differs only in server lines; haproxy -c skipped")
            return
        binary = self.master.executable()
        # No configuration confirmed running (a first start): haproxy -c runs whatever the
        # split says, and the split is wanted by the apply that follows.
        with self._split_meanwhile(config) if running is None else contextlib.nullcontext():
            done, name = self.check_candidate(
                config,
                lambda path: [binary, "-c", "-f", path],
                suffix=".cfg",
                timeout=self.check_timeout,
                label=f"{binary} -c",
            )
        if done.returncode != 0:
            output = (done.stdout + "\n" + done.stderr).replace(name, "candidate")
            found = alerts(output)
            specific = [line for line in found if not line.endswith(_GENERIC_ALERTS)]
            lines = specific or found or last_lines(output)
            raise ProxyConfigError(
                "haproxy -c refused the configuration: " + "; ".join(lines)
                if lines
                else f"haproxy -c refused the configuration (exit status {done.returncode})"
            )

    def needs_check(self, config: str) -> bool:
        """No ``haproxy -c`` before a first start (nothing was applied in this state directory,
        and no master of it runs): HAProxy checks the file as it starts, exits if it refuses
        it, and a start that fails loses nothing. A check is 0.2 s for 10,000 servers, a fifth
        of the cold start. Cheap on every pass: while HAProxy runs, the marker is there."""
        return not self._nothing_applied() or self.master.running_pid() is not None

    def _nothing_applied(self) -> bool:
        """No configuration is marked applied (a fresh state directory, or a start that
        failed): a stat, where ``running_split`` reads and compares the whole file."""
        return self.marker_file is not None and not self.marker_file.exists()

    @contextlib.contextmanager
    def _split_meanwhile(self, config: str) -> Iterator[None]:
        """Split ``config`` on another thread while the block runs (HAProxy parses the file
        meanwhile, in a process of its own); the split is memoized for what follows."""
        thread = threading.Thread(
            target=self.split, args=(config,), name="discoverd-haproxy-split", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            thread.join()

    def apply_delay(self, config: str, services: Sequence[Service]) -> float:
        """Time left before a reload is allowed (``reload_interval`` after the last start or
        reload began); always 0 for a change of servers only."""
        interval = self.config.reload_interval
        last = self.last_reload
        if interval <= 0 or last is None:
            return 0.0
        left = last.began + interval - time.monotonic()
        if left <= 0 or not self._needs_reload(config):
            return 0.0
        return left

    def apply(self, config: str, services: Sequence[Service]) -> str:
        with self._lock:
            # A first start: the split is wanted once it is done; make it meanwhile.
            first = self._nothing_applied()
            with self._split_meanwhile(config) if first else contextlib.nullcontext():
                try:
                    result = super().apply(config, services)
                finally:
                    self._periods = self.drain_periods.of(services)
            if result != "unchanged":  # the file now holds the candidate: its split is known
                self._on_disk = (config.encode("utf-8"), self.split(config))
            return result

    def reserved_ports(self) -> frozenset[int]:
        return frozenset({self.config.stats_port}) if self.config.stats_port else frozenset()

    def prefers_container_addresses(self) -> bool:
        """Yes: every server is health-checked (a connect timeout or a failed answer takes it
        out within a check or two, and ``observe`` at the first error), and a server moves
        between its published port and its container address on the runtime API."""
        return True

    def preflight(self) -> None:
        """The executable must exist: without it nothing will ever be served."""
        self.master.executable()

    def unservable(self, services: Sequence[Service]) -> dict[str, str]:
        """The tcp services whose frontend port another process holds on ``bind`` now
        (:func:`~discoverd.proxykit.held_ports`), e.g. ``frontend port 8000 is held by another
        process (python3, pid 4242)``: a reload with them would fail, and HAProxy would pause
        every listener for about 2 s while it retries. Ports the running HAProxy binds (those
        of its confirmed configuration) are not probed; a port found held by HAProxy's own
        master or workers is not reported either. udp services are not served at all."""
        wanted: dict[int, list[str]] = {}
        for service in services:
            if service.protocol == "tcp":
                wanted.setdefault(service.frontend_port, []).append(service.name)
        if not wanted:
            return {}
        master, binary = self._master_and_binary()
        ports = set(wanted) - (self._running_ports() if master is not None else frozenset())
        if not ports:
            return {}
        owners = {master, *child_pids(master)} if master is not None else set()
        held = held_ports(self.config.bind, ports, "tcp", owners=owners, executable=binary)
        return {
            name: found.describe("frontend port")
            for port, found in held.items()
            for name in wanted[port]
        }

    def _master_and_binary(self) -> tuple[int | None, str | None]:
        """The running master's pid (``None``: none runs) and the haproxy binary (``None``:
        there is none, so nothing runs; ``start()`` says why), for the port probes."""
        try:
            return self.master.running_pid(), self.master.executable()
        except PluginError:
            return None, None

    def close(self) -> None:
        """Leave HAProxy running with its last good configuration (see ``stop_process``).

        Servers still draining stay in drain in HAProxy (no new connections); a later discoverd
        on the same state directory frees them (see ``_sweep``)."""
        self._drainer.close()
        self.master.close()  # never stops it

    # -- the apply skeleton's hooks ----------------------------------------------------------

    def find_running(self) -> ProcStatus | None:
        return self.master.status()

    def serves_file(self, running: ProcStatus) -> bool:
        return running.failed == 0  # a failed reload since the last good one: reload again

    def start(self) -> None:
        # A fresh start checks every server from scratch: no health states from a past run.
        with contextlib.suppress(FileNotFoundError):
            self.server_state.unlink()
        self._warn_unverified_lua()
        self.master.start()

    def reload(self, running: ProcStatus, services: Sequence[Service]) -> None:
        self._save_server_state(services)
        self._warn_unverified_lua()
        self.master.reload(running)

    def _warn_unverified_lua(self) -> None:
        """Once: the file to load uses HAProxy's HTTP client (Lua; ACME and OCSP updates in
        HAProxy versions after 2.6) while it does not verify (option httpclient_verify off)."""
        if self.config.httpclient_verify or self._lua_warned:
            return
        data = read_bytes(self.config_file)
        if data is None or not any(word in data for word in _HTTPCLIENT_WORDS):
            return  # the usual case: substring searches, not the pattern over the whole file
        found = _USES_HTTPCLIENT.search(data)
        if found is not None:
            self._lua_warned = True
            log.warning(
                "haproxy: the configuration uses HAProxy's HTTP client (%r), which does not "
                "verify the certificates of HTTPS servers; set haproxy.httpclient_verify = true "
                "if it calls HTTPS servers",
                found.group(0).strip().decode("ascii"),
            )

    def apply_in_place(
        self, running: ProcStatus, previous: bytes, config: str, services: Sequence[Service]
    ) -> str | None:
        current = self._split_file(previous)
        changes = runtime_changes(current, self.split(config))
        if changes is None or not self._apply_runtime(changes, current):
            return None
        return "runtime"

    def changes_in_place(self, previous: bytes, config: str) -> bool:
        return runtime_changes(self._split_file(previous), self.split(config)) is not None

    def server_states(self, service: str) -> dict[str, str] | None:
        """``show stat`` of the admin socket: the status HAProxy gives each server of the
        service's backend (``UP``, ``DOWN``, ``DRAIN``, ``MAINT``, ``no check``, ...)."""
        try:
            answer = cli(self.admin_socket, "show stat", timeout=self.answer_timeout)
        except OSError:
            return None
        return server_status(answer, service)

    def applied(self, result: str, services: Sequence[Service]) -> None:
        if result == "runtime":
            self.runtime_applies += 1
        elif result in ("started", "reloaded"):
            # The new worker has none of the servers that were draining: the old worker keeps
            # their connections until they end.
            self._drainer.clear()
            self._swept = True
            if result == "reloaded":
                self.reloads += 1

    # -- beyond the interface: for tests, the demo and benchmarks ------------------------------

    def split(self, config: str) -> ConfigSplit:
        """``config`` split into structure and server lines (assembled from the renderer's
        cached pieces when it is the last render)."""
        cached = self._candidate
        if cached is not None and (cached[0] is config or cached[0] == config):
            return cached[1]
        split = self.renderer.split(config)
        self._candidate = (config, split)
        return split

    def running_split(self) -> ConfigSplit | None:
        """The split of the configuration confirmed running (the file on disk, if its digest
        is the marker's): HAProxy loaded it, so it passed HAProxy's own checks. ``None`` when
        no file is confirmed."""
        data = self.confirmed_config()
        return self._split_file(data) if data is not None else None

    def status(self) -> ProcStatus | None:
        """What the master says of itself and its workers, or ``None`` if none runs."""
        return self.master.status()

    def draining(self) -> list[tuple[str, str]]:
        """(backend, server) of the servers being drained now."""
        return sorted(drain.key for drain in self._drainer.pending())

    def stop_process(self, *, graceful: bool = False, timeout: float | None = None) -> bool:
        """Stop the HAProxy master of this state directory and its workers; wait for them.

        ``graceful`` lets workers finish their connections (SIGUSR1) instead of stopping at once
        (SIGTERM). Returns ``False`` if no HAProxy was running.
        """
        with self._lock:
            self._drainer.clear()  # nothing left to drain in a stopped HAProxy
        return self.master.stop(graceful=graceful, timeout=timeout)

    # -- internals -----------------------------------------------------------------------------

    def _split_file(self, data: bytes) -> ConfigSplit:
        cached = self._on_disk
        if cached is not None and cached[0] == data:
            return cached[1]
        split = split_config(data.decode("utf-8", errors="replace"))
        self._on_disk = (data, split)
        return split

    def _running_ports(self) -> frozenset[int]:
        """The ports of the configuration confirmed running (HAProxy binds them), from the
        structure of its split (the ``bind`` lines; a change of servers leaves it alone, so
        the scan of a 10,000-server file is not repeated after every change)."""
        data = self.confirmed_config()
        if data is None:
            return frozenset()
        structure = self._split_file(data).structure
        cached = self._bound
        if cached is None or cached[0] != structure:
            cached = self._bound = (structure, bound_ports(structure.encode("utf-8")))
        return cached[1]

    def _needs_reload(self, config: str) -> bool:
        """Cheap: does ``config`` take a reload (or a start) rather than runtime commands?"""
        data = read_bytes(self.config_file)
        if data is None:
            return True
        return runtime_changes(self._split_file(data), self.split(config)) is None

    def _apply_runtime(self, changes: Changes, current: ConfigSplit) -> bool:
        """Apply ``changes`` with runtime commands; False (and a log line) if HAProxy refused
        one, the caller then reloads. Added servers first: a backend never runs empty. The
        commands go out together (:func:`admin_many`: one connection for a change of a few
        servers, not three per new server)."""
        if not changes:
            return True
        started = time.monotonic()
        commands: list[tuple[str, str]] = []
        try:
            self._sweep(current)
            for server in changes.added:
                back = self._drainer.take(server.section, server.name)
                path = f"{server.section}/{server.name}"
                if back is not None and back.args != server.args:
                    raise CommandError(f"{path} is draining with other options")
                if back is None:
                    command = f"add server {path} {server.endpoint} {server.runtime_args}"
                    commands.append((command.rstrip(), "New server registered"))
                    if server.checked:
                        commands.append((f"enable health {path}", ""))
                    if server.agent_checked:
                        commands.append((f"enable agent {path}", ""))
                elif (back.address, back.port) != (server.address, server.port):
                    commands.append(_set_addr(path, server.address, server.port))
                commands.append((f"set server {path} state ready", ""))
            for server in changes.moved:
                path = f"{server.section}/{server.name}"
                commands.append(_set_addr(path, server.address, server.port))
            for server in changes.removed:
                commands.append((f"set server {server.section}/{server.name} state drain", ""))
            admin_many(self.admin_socket, commands, timeout=self.answer_timeout)
        except CommandError as exc:
            self.fallbacks += 1
            self.forget()  # some commands may have gone through: reload
            log.warning("haproxy: runtime change refused (%s); reloading instead", exc)
            return False
        now = time.monotonic()
        for server in changes.removed:
            period = self._periods.get((server.section, server.name), self.config.drain_timeout)
            self._drainer.add(
                Drain(
                    server.section,
                    server.name,
                    server.address,
                    server.port,
                    server.args,
                    deadline=now + period,
                )
            )
        log.debug(
            "haproxy: runtime change (+%d -%d ~%d servers, %d commands) in %.1f ms",
            len(changes.added),
            len(changes.removed),
            len(changes.moved),
            len(commands),
            (time.monotonic() - started) * 1000,
        )
        return True

    def _admin(self, command: str, expect: str = "") -> str:
        return admin(self.admin_socket, command, expect=expect, timeout=self.answer_timeout)

    def _sweep(self, current: ConfigSplit) -> None:
        """Once per adopted HAProxy: drain servers it runs that its file does not name (left
        draining by a discoverd that exited), so that they are freed and their names reusable."""
        if self._swept:
            return
        self._swept = True
        try:
            dump = cli(self.admin_socket, "show servers state", timeout=self.answer_timeout)
        except OSError as exc:
            raise CommandError(f"'show servers state': {exc}") from None
        now = time.monotonic()
        for backend, names in server_names(dump).items():
            known = current.servers.get(backend, {})
            for name in sorted(names - set(known)):
                if current.structure.find(f"server {name} ") >= 0:
                    continue  # a server line of another shape: part of the structure
                log.info("haproxy: server %s/%s is not in haproxy.cfg; draining it", backend, name)
                self._admin(f"set server {backend}/{name} state drain")
                self._drainer.add(
                    Drain(backend, name, "", 0, "", deadline=now + self.config.drain_timeout)
                )

    def _save_server_state(self, services: Sequence[Service]) -> None:
        """Dump the servers' health for the next worker, dropping servers that moved."""
        servers = {
            (service.name, instance.id): (instance.address, instance.port)
            for service in services
            if service.protocol == "tcp"
            for instance in service.instances
        }
        try:
            dump = cli(self.admin_socket, "show servers state", timeout=self.answer_timeout)
        except OSError as exc:
            log.warning("haproxy: cannot save server states before the reload (%s)", exc)
            dump = ""
        state = filter_server_state(dump, servers)
        if state:
            write_atomic(self.server_state, state.encode())
        else:
            with contextlib.suppress(FileNotFoundError):
                self.server_state.unlink()


def _set_addr(path: str, address: str, port: int) -> tuple[str, str]:
    """The runtime command that moves a server, and what HAProxy's answer to it says."""
    return f"set server {path} addr {address} port {port}", "change"
