"""The HAProxy proxy: render, check with ``haproxy -c``, apply with a verified hitless reload.

Files, all in ``<state_dir>/haproxy`` (mode 0700):

- ``haproxy.cfg``: the configuration HAProxy runs (``-f``), replaced atomically;
  ``applied.sha256``: the digest of the configuration last confirmed running;
- ``haproxy.pid``, ``master.sock`` (master CLI), ``admin.sock`` (runtime API, level admin);
- ``server-state``: servers' health saved just before a reload, loaded by the new worker;
- ``haproxy.log``: HAProxy's own messages (start-up and reload errors, servers going up and
  down), kept under about a megabyte;
- ``candidate-*.cfg``: short-lived files for ``haproxy -c``.

HAProxy runs in master-worker mode. The master is started in a session of its own, with no
controlling terminal and its output going to ``haproxy.log``; it is not tied to discoverd, so it
keeps serving when discoverd exits or restarts, and the next discoverd adopts it through the pid
file and the master socket. (It is not started with ``-D``: a daemonised 2.6 master sends its
output to /dev/null, and the reason of a failed reload -- say a port another program holds -- would
be lost.)

A reload is verified: HAProxy 2.6 answers ``reload`` by cutting the connection, whatever the
outcome. A reload succeeded when the master's ``show proc`` counts one more reload, no failed
one, and lists a worker pid it did not list before. When the new configuration cannot start
(``haproxy -c`` does not bind ports), the master keeps the old worker serving and counts a failed
reload; the previous file is then put back, so the file on disk always is what runs.

Most changes need no reload at all. When a candidate differs from the running configuration only
in the plain server lines of its backends (:mod:`.layout`), ``apply`` sends runtime API commands on
the admin socket instead: ``add server`` (+ ``enable health``, ``set server ... state ready``) for
a new instance, ``set server ... addr`` for one that moved, ``set server ... state drain`` for one
that left (:mod:`.drain` frees it later), then writes the new file. Should HAProxy refuse a
command, the same candidate is applied by a verified reload instead, and the logs say so.
``validate`` skips ``haproxy -c`` for such a candidate when its server lines only use options a
checked configuration already had; ``apply_delay`` keeps reloads (never runtime changes) at most
one per ``reload_interval``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from discoverd import PluginError, Proxy, ProxyConfigError, Service, Unavailable
from discoverd.core.process import (
    directory_lock,
    find_executable,
    pid_alive,
    run_check_command,
)
from discoverd.plugins.haproxy import render as rendering
from discoverd.plugins.haproxy.drain import Drain, Drainer
from discoverd.plugins.haproxy.layout import (
    Changes,
    Layout,
    checked_without_haproxy,
    parse_layout,
    runtime_changes,
)
from discoverd.plugins.haproxy.runtime import (
    CommandError,
    ProcStatus,
    admin,
    alerts,
    cli,
    command_line,
    filter_server_state,
    read_pid,
    send_only,
    server_names,
    show_proc,
    wait_gone,
)
from discoverd.plugins.haproxy.settings import Settings, check_state_dir, drain_seconds

log = logging.getLogger(__name__)

_LOG_MAX_BYTES = 1 << 20
# Generic trailers of `haproxy -c` that say nothing the lines before them do not.
_GENERIC_ALERTS = ("Error(s) found in configuration file", "Fatal errors found in configuration")
#: Instance metadata key holding the drain period of an instance (label SERVICE_DRAIN=10s).
DRAIN_KEY = "drain"


class HAProxy(Proxy):
    """A local HAProxy in master-worker mode, managed through its files and sockets."""

    #: Seconds allowed for ``haproxy -c``, for a start, for a reload and for a stop.
    check_timeout = 30.0
    start_timeout = 15.0
    reload_timeout = 15.0
    stop_timeout = 10.0
    #: Seconds a running master may take to answer on its socket before it counts as hung.
    answer_timeout = 5.0

    def __init__(self, settings: Settings, state_dir: Path) -> None:
        self.settings = settings
        self.dir = check_state_dir(Path(state_dir) / "haproxy")
        self.config_file = self.dir / "haproxy.cfg"
        self.pid_file = self.dir / "haproxy.pid"
        self.master_socket = self.dir / "master.sock"
        self.admin_socket = self.dir / "admin.sock"
        self.server_state = self.dir / "server-state"
        self.log_file = self.dir / "haproxy.log"
        self.marker_file = self.dir / "applied.sha256"
        env = rendering.environment(settings.template_dir)
        self._renderer = rendering.Renderer(env, rendering.load_template(env), settings, self.dir)
        self._binary_path: str | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._udp_warned: set[str] = set()
        # One apply or drain step at a time within this process (the file lock is for others).
        self._lock = threading.RLock()
        self._drainer = Drainer(self.admin_socket, self._lock, timeout=self.answer_timeout)
        self._parsed: tuple[str, Layout] | None = None  # the last candidate split, cached
        self._running_layout: tuple[bytes, Layout] | None = None  # what the file on disk holds
        self._validated: Layout | None = None  # the last layout haproxy -c (or HAProxy) accepted
        self._drain_periods: dict[tuple[str, str], float] = {}
        self._bad_drain_warned: set[tuple[str, str]] = set()
        self._swept = False  # leftover servers of an adopted HAProxy looked for
        self._last_reload: float | None = None
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
        return self._renderer.render(services)

    def validate(self, config: str) -> None:
        layout = self._layout(config)
        if checked_without_haproxy(layout, self._validated):
            log.debug("haproxy: candidate differs only in server lines; haproxy -c skipped")
            return
        try:
            self._validate(config)
        except OSError as exc:  # a full disk, a state dir removed under us, ...
            raise PluginError(f"haproxy: cannot stage the candidate configuration: {exc}") from None
        self._validated = layout

    def apply_delay(self, config: str, services: Sequence[Service]) -> float:
        """Time left before a reload is allowed; always 0 for a change of servers only."""
        interval = self.settings.reload_interval
        if interval <= 0 or self._last_reload is None:
            return 0.0
        left = self._last_reload + interval - time.monotonic()
        if left <= 0 or not self._needs_reload(config):
            return 0.0
        return left

    def apply(self, config: str, services: Sequence[Service]) -> str:
        try:
            with self._lock:
                try:
                    return self._apply(config, services)
                finally:
                    self._drain_periods = self._periods_of(services)
        except OSError as exc:
            raise PluginError(f"haproxy: cannot apply the configuration: {exc}") from None

    def _validate(self, config: str) -> None:
        self._ensure_dir()
        binary = self._binary()
        fd, name = tempfile.mkstemp(prefix="candidate-", suffix=".cfg", dir=self.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(config)
            done = run_check_command([binary, "-c", "-f", name], self.check_timeout, f"{binary} -c")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        if done.returncode != 0:
            output = (done.stdout + "\n" + done.stderr).replace(name, "candidate")
            found = alerts(output)
            specific = [line for line in found if not line.endswith(_GENERIC_ALERTS)]
            lines = specific or found or _last_lines(output)
            raise ProxyConfigError(
                "haproxy -c refused the configuration: " + "; ".join(lines)
                if lines
                else f"haproxy -c refused the configuration (exit status {done.returncode})"
            )

    def _apply(self, config: str, services: Sequence[Service]) -> str:
        data = config.encode("utf-8")
        digest = hashlib.sha256(data).hexdigest()
        self._ensure_dir()
        with self._locked():
            status = self._running()
            previous = _read_bytes(self.config_file)
            running = (
                status is not None
                and status.failed == 0
                and previous is not None
                and _read_text(self.marker_file) == hashlib.sha256(previous).hexdigest()
            )
            if running and previous == data:
                return "unchanged"
            self._trim_log()
            if running and previous is not None:
                changes = runtime_changes(self._file_layout(previous), self._layout(config))
                if changes is not None and self._apply_runtime(changes):
                    # Renamed into place but not flushed to disk (that costs more than the
                    # change itself): after a power loss HAProxy is not running either, and
                    # discoverd applies the registry's state again when it starts.
                    _write_atomic(self.config_file, data, durable=False)
                    _write_atomic(self.marker_file, digest.encode(), durable=False)
                    self._running_layout = (data, self._layout(config))
                    self.runtime_applies += 1
                    return "runtime"
            _write_atomic(self.config_file, data)
            self._last_reload = time.monotonic()  # a failed attempt counts too
            try:
                if status is None:
                    self._start()
                    result = "started"
                else:
                    self._save_server_state(services)
                    self._reload(status)
                    self.reloads += 1
                    result = "reloaded"
            except BaseException:
                self._running_layout = None
                self._restore(previous)
                raise
            # The new worker has none of the servers that were draining: the old worker keeps
            # their connections until they end.
            self._drainer.clear()
            self._swept = True
            _write_atomic(self.marker_file, digest.encode())
            self._running_layout = (data, self._layout(config))
            self._validated = self._validated or self._layout(config)  # HAProxy loaded it
            return result

    def _apply_runtime(self, changes: Changes) -> bool:
        """Apply ``changes`` with runtime commands; False (and a log line) if HAProxy refused
        one, the caller then reloads. Added servers first: a backend never runs empty."""
        if not changes:
            return True
        started = time.monotonic()
        try:
            self._sweep()
            for server in changes.added:
                back = self._drainer.take(server.section, server.name)
                path = f"{server.section}/{server.name}"
                if back is not None and back.args != server.args:
                    raise CommandError(f"{path} is draining with other options")
                if back is None:
                    command = f"add server {path} {server.endpoint} {server.args}"
                    self._admin(command.rstrip(), expect="New server registered")
                    if server.checked:
                        self._admin(f"enable health {path}")
                    if server.agent_checked:
                        self._admin(f"enable agent {path}")
                elif (back.address, back.port) != (server.address, server.port):
                    self._set_addr(path, server.address, server.port)
                self._admin(f"set server {path} state ready")
            for server in changes.moved:
                self._set_addr(f"{server.section}/{server.name}", server.address, server.port)
            now = time.monotonic()
            for server in changes.removed:
                path = f"{server.section}/{server.name}"
                period = self._drain_periods.get(
                    (server.section, server.name), self.settings.drain_timeout
                )
                self._admin(f"set server {path} state drain")
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
        except CommandError as exc:
            self.fallbacks += 1
            with contextlib.suppress(FileNotFoundError):
                self.marker_file.unlink()  # some commands may have gone through: reload
            log.warning("haproxy: runtime change refused (%s); reloading instead", exc)
            return False
        log.debug(
            "haproxy: runtime change (+%d -%d ~%d servers) in %.1f ms",
            len(changes.added),
            len(changes.removed),
            len(changes.moved),
            (time.monotonic() - started) * 1000,
        )
        return True

    def _admin(self, command: str, expect: str = "") -> str:
        return admin(self.admin_socket, command, expect=expect, timeout=self.answer_timeout)

    def _set_addr(self, path: str, address: str, port: int) -> None:
        self._admin(f"set server {path} addr {address} port {port}", expect="change")

    def _sweep(self) -> None:
        """Once per adopted HAProxy: drain servers it runs that its file does not name (left
        draining by a discoverd that exited), so that they are freed and their names reusable."""
        if self._swept or self._running_layout is None:
            return
        self._swept = True
        try:
            dump = cli(self.admin_socket, "show servers state", timeout=self.answer_timeout)
        except OSError as exc:
            raise CommandError(f"'show servers state': {exc}") from None
        layout = self._running_layout[1]
        now = time.monotonic()
        for backend, names in server_names(dump).items():
            known = layout.servers.get(backend, {})
            for name in sorted(names - set(known)):
                if layout.structure.find(f"server {name} ") >= 0:
                    continue  # a server line of another shape: part of the structure
                log.info("haproxy: server %s/%s is not in haproxy.cfg; draining it", backend, name)
                self._admin(f"set server {backend}/{name} state drain")
                self._drainer.add(
                    Drain(backend, name, "", 0, "", deadline=now + self.settings.drain_timeout)
                )

    def _layout(self, config: str) -> Layout:
        cached = self._parsed
        if cached is not None and (cached[0] is config or cached[0] == config):
            return cached[1]
        layout = self._renderer.layout(config)
        self._parsed = (config, layout)
        return layout

    def _file_layout(self, data: bytes) -> Layout:
        cached = self._running_layout
        if cached is not None and cached[0] == data:
            return cached[1]
        layout = parse_layout(data.decode("utf-8", errors="replace"))
        self._running_layout = (data, layout)
        return layout

    def _needs_reload(self, config: str) -> bool:
        """Cheap: does ``config`` take a reload (or a start) rather than runtime commands?"""
        running = self._running_layout
        if running is None:
            data = _read_bytes(self.config_file)
            if data is None:
                return True
            running = (data, self._file_layout(data))
        return runtime_changes(running[1], self._layout(config)) is None

    def _periods_of(self, services: Sequence[Service]) -> dict[tuple[str, str], float]:
        """Drain periods asked for by instances (metadata ``drain``), by (backend, server)."""
        periods: dict[tuple[str, str], float] = {}
        for service in services:
            for instance in service.instances:
                if not instance.meta:
                    continue
                value = dict(instance.meta).get(DRAIN_KEY)
                if value is None:
                    continue
                seconds = drain_seconds(value)
                key = (service.name, instance.id)
                if seconds is not None:
                    periods[key] = seconds
                elif key not in self._bad_drain_warned:
                    self._bad_drain_warned.add(key)
                    log.warning(
                        "haproxy: instance %s of %s has drain=%r, not a number of seconds; "
                        "using drain_timeout (%gs)",
                        instance.id,
                        service.name,
                        value[:40],
                        self.settings.drain_timeout,
                    )
        return periods

    def reserved_ports(self) -> frozenset[int]:
        return frozenset({self.settings.stats_port}) if self.settings.stats_port else frozenset()

    def close(self) -> None:
        """Leave HAProxy running with its last good configuration (see ``stop_process``).

        Servers still draining stay in drain in HAProxy (no new connections); a later discoverd
        on the same state directory frees them (see ``_sweep``)."""
        self._drainer.close()
        if self._child is not None:
            self._child.poll()  # reap it if it already ended; never stop it here

    # -- beyond the interface: for tests, the demo and benchmarks ------------------------------

    def status(self) -> ProcStatus | None:
        """What the master says of itself and its workers, or ``None`` if none runs."""
        return self._running()

    def draining(self) -> list[tuple[str, str]]:
        """(backend, server) of the servers being drained now."""
        return sorted(drain.key for drain in self._drainer.pending())

    def stop_process(self, *, graceful: bool = False, timeout: float | None = None) -> bool:
        """Stop the HAProxy master of this state directory and its workers; wait for them.

        ``graceful`` lets workers finish their connections (SIGUSR1) instead of stopping at once
        (SIGTERM). Returns ``False`` if no HAProxy was running.
        """
        timeout = self.stop_timeout if timeout is None else timeout
        with self._lock:
            self._drainer.clear()  # nothing left to drain in a stopped HAProxy
        status = show_proc(self.master_socket, timeout=1.0)
        pid = read_pid(self.pid_file)
        if (pid is None or not pid_alive(pid)) and status is not None:
            pid = status.master  # the pid file is gone, the master is not
        stopped = False
        if pid is not None and pid_alive(pid) and self._is_ours(pid):
            workers = status.workers if status is not None and status.master == pid else ()
            pids = {pid, *workers}
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1 if graceful else signal.SIGTERM)
            if not wait_gone(pids, timeout):
                log.warning("haproxy: pids %s did not stop in %gs; killing them", pids, timeout)
                for each in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(each, signal.SIGKILL)
                wait_gone(pids, 2.0)
            stopped = True
        if self._child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._child.wait(timeout=1.0)
            self._child = None
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        return stopped

    # -- internals -----------------------------------------------------------------------------

    def _ensure_dir(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.dir.stat().st_mode & 0o777 != 0o700:
            self.dir.chmod(0o700)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """Serialise applies on this state directory, across processes too."""
        return directory_lock(self.dir)

    def _binary(self) -> str:
        if self._binary_path is None:
            self._binary_path = find_executable(self.settings.binary, "haproxy", "haproxy.binary")
        return self._binary_path

    def _is_ours(self, pid: int) -> bool:
        """True if ``pid`` is a HAProxy master started on this state directory's socket."""
        argv = command_line(pid)
        if argv is None:
            return False
        return any(arg.startswith(f"{self.master_socket},") for arg in argv)

    def _running(self) -> ProcStatus | None:
        """The running master's status; ``None`` if none runs; ``Unavailable`` if it hangs."""
        pid = read_pid(self.pid_file)
        if pid is None or not pid_alive(pid) or not self._is_ours(pid):
            # A master from this directory may still run with its pid file gone: adopt it
            # rather than start a second one next to it.
            status = show_proc(self.master_socket, timeout=1.0)
            if status is not None and pid_alive(status.master) and self._is_ours(status.master):
                _write_atomic(self.pid_file, f"{status.master}\n".encode())
                return status
            return None
        deadline = time.monotonic() + self.answer_timeout
        while True:
            status = show_proc(self.master_socket, timeout=1.0)
            if status is not None and status.master == pid:
                return status
            if not pid_alive(pid):
                return None
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"the HAProxy master (pid {pid}) runs but does not answer on "
                    f"{self.master_socket}"
                )
            time.sleep(0.05)

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as handle:
                handle.seek(offset)
                text = handle.read(256 * 1024).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return text.replace(str(self.config_file), "haproxy.cfg")

    def _trim_log(self) -> None:
        """Keep haproxy.log short. HAProxy appends (O_APPEND), so truncating it is safe."""
        if self._log_size() > _LOG_MAX_BYTES:
            with open(self.log_file, "r+b") as handle:
                handle.truncate(0)

    def _reason(self, offset: int, pid: int) -> str:
        found = alerts(self._log_since(offset), pid=pid)
        return "; ".join(found) if found else f"no error message (see {self.log_file})"

    def _start(self) -> None:
        binary = self._binary()
        # A fresh start checks every server from scratch: no health states from a past run.
        for stale in (self.server_state, self.pid_file):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        offset = self._log_size()
        argv = [
            binary,
            "-W",
            "-S",
            f"{self.master_socket},mode,600",
            "-p",
            str(self.pid_file),
            "-f",
            str(self.config_file),
        ]
        with open(self.log_file, "ab") as output:
            try:
                child = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=self.dir,
                    start_new_session=True,  # no terminal, no signals meant for discoverd
                )
            except OSError as exc:
                raise PluginError(f"cannot run {binary}: {exc}") from None
        self._child = child
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = child.poll()
            if code is not None:
                self._child = None
                raise PluginError(
                    f"HAProxy did not start (exit status {code}): {self._reason(offset, child.pid)}"
                )
            status = show_proc(self.master_socket, timeout=1.0)
            if (
                status is not None
                and status.master == child.pid
                and status.workers
                and read_pid(self.pid_file) == child.pid
            ):
                log.info("haproxy: started, master pid %d, worker %s", child.pid, status.workers)
                return
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                self._child = None
                raise PluginError(
                    f"HAProxy did not answer on {self.master_socket} within "
                    f"{self.start_timeout:g}s; stopped it: {self._reason(offset, child.pid)}"
                )
            time.sleep(0.02)

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
            _write_atomic(self.server_state, state.encode())
        else:
            with contextlib.suppress(FileNotFoundError):
                self.server_state.unlink()

    def _reload(self, before: ProcStatus) -> None:
        offset = self._log_size()
        try:
            send_only(self.master_socket, "reload", timeout=self.answer_timeout)
        except OSError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(before.master, signal.SIGUSR2)
        deadline = time.monotonic() + self.reload_timeout
        while True:
            if not pid_alive(before.master):
                raise PluginError(
                    f"the HAProxy master (pid {before.master}) exited during the reload: "
                    f"{self._reason(offset, before.master)}"
                )
            status = show_proc(self.master_socket, timeout=1.0)
            if (
                status is not None
                and status.master == before.master
                and status.reloads > before.reloads
            ):
                if status.failed > 0 or "Loading failure" in self._log_since(offset):
                    raise PluginError(
                        "HAProxy could not load the new configuration and keeps serving the "
                        f"previous one: {self._reason(offset, before.master)}"
                    )
                fresh = sorted(set(status.workers) - set(before.workers))
                if fresh:
                    log.info("haproxy: reloaded, new worker %s", fresh)
                    return
            if time.monotonic() >= deadline:
                # It may still come through: forget what runs, so the next apply reloads.
                with contextlib.suppress(FileNotFoundError):
                    self.marker_file.unlink()
                reason = self._reason(offset, before.master)
                raise PluginError(
                    f"HAProxy did not confirm the reload within {self.reload_timeout:g}s "
                    f"(no new worker); the previous configuration is put back: {reason}"
                )
            time.sleep(0.03)

    def _restore(self, previous: bytes | None) -> None:
        """Put the previous configuration back on disk: the file must be what runs."""
        try:
            if previous is None:
                with contextlib.suppress(FileNotFoundError):
                    self.config_file.unlink()
            else:
                _write_atomic(self.config_file, previous)
        except OSError as exc:
            log.error("haproxy: could not restore the previous %s: %s", self.config_file, exc)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _read_text(path: Path) -> str:
    data = _read_bytes(path)
    return data.decode(errors="replace").strip() if data is not None else ""


def _write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write a temporary file next to ``path``, flush it to disk (with ``durable``), rename it
    over ``path``: readers see the old file or the new one, never a part of it."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(name, 0o600)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
    if not durable:
        return
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _last_lines(text: str, count: int = 5) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()][-count:]
