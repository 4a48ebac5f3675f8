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

nginx runs as a daemon (``daemon on``) in a session of its own: it keeps serving when discoverd
exits or restarts, and the next discoverd adopts it through the pid file (or, if that is gone,
by the master's process title, which names this ``nginx.conf``).

A reload is SIGHUP to the master, and it is verified: it succeeded when a worker the master did
not have before appears; it failed when the master logs a final ``[emerg]`` (a port in use is
retried by nginx for about 2.5 s first). On failure nginx keeps its previous workers and
configuration, and the previous file is put back, so the file on disk always is what runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from discoverd import PluginError, Proxy, ProxyConfigError, Service
from discoverd.core.process import (
    directory_lock,
    find_executable,
    pid_alive,
    run_check_command,
)
from discoverd.plugins.nginx import render as rendering
from discoverd.plugins.nginx.runtime import (
    SERIOUS,
    holding,
    log_entries,
    masters_of,
    read_pid,
    reload_verdict,
    stderr_messages,
    summarise,
    title,
    wait_gone,
    workers,
)
from discoverd.plugins.nginx.settings import Settings, check_state_dir

log = logging.getLogger(__name__)

_LOG_MAX_BYTES = 1 << 20
_STUB_STATUS_FLAG = "--with-http_stub_status_module"


class NginxProxy(Proxy):
    """A local nginx, managed through its files, its pid and signals."""

    #: Seconds allowed for ``nginx -t``, for a start, for a reload and for a stop.
    check_timeout = 30.0
    start_timeout = 15.0
    reload_timeout = 20.0
    stop_timeout = 10.0

    def __init__(self, settings: Settings, state_dir: Path) -> None:
        self.settings = settings
        self.dir = check_state_dir(Path(state_dir) / "nginx")
        self.prefix = f"{self.dir}/"
        self.config_file = self.dir / "nginx.conf"
        self.pid_file = self.dir / "nginx.pid"
        self.error_log = self.dir / "error.log"
        self.marker_file = self.dir / "applied.sha256"
        self.status_dir = self.dir / "status"
        self.check_dir = self.dir / "check"
        self.start_output = self.dir / "start.out"
        self._template = rendering.load_template(rendering.environment(settings.template_dir))
        self._binary_path: str | None = None
        self._stub_status: bool | None = None
        self._last_change: float | None = None

    # -- Proxy interface ---------------------------------------------------------------------

    def render(self, services: Sequence[Service]) -> str:
        return rendering.render_config(
            self._template, self.settings, services, self.has_stub_status()
        )

    def validate(self, config: str) -> None:
        try:
            self._validate(config)
        except OSError as exc:  # a full disk, a state dir removed under us, ...
            raise PluginError(f"nginx: cannot stage the candidate configuration: {exc}") from None

    def apply(self, config: str, services: Sequence[Service]) -> str:
        try:
            return self._apply(config, services)
        except OSError as exc:
            raise PluginError(f"nginx: cannot apply the configuration: {exc}") from None

    def apply_delay(self, config: str, services: Sequence[Service]) -> float:
        """Time left before the next reload is allowed (``reload_interval`` after the last start
        or reload); 0 when nginx does not run (a start is never delayed)."""
        interval = self.settings.reload_interval
        if interval <= 0 or self._last_change is None:
            return 0.0
        pid = read_pid(self.pid_file)
        if pid is None or not pid_alive(pid):
            return 0.0
        return max(0.0, self._last_change + interval - time.monotonic())

    def reserved_ports(self) -> frozenset[int]:
        port = self.settings.status_port
        return frozenset({port}) if port else frozenset()

    def close(self) -> None:
        """Leave nginx running with its last good configuration (see ``stop_process``)."""

    # -- beyond the interface: for tests, the demo and benchmarks ------------------------------

    def master_pid(self) -> int | None:
        """The running master's pid, or ``None`` if no nginx of this state directory runs."""
        return self._running(adopt=False)

    def worker_pids(self) -> set[int]:
        """The running master's workers (those still draining after a reload included)."""
        master = self.master_pid()
        return workers(master) if master is not None else set()

    def has_stub_status(self) -> bool:
        """True if the nginx binary has the stub_status module (asked once, ``nginx -V``)."""
        if self._stub_status is None:
            try:
                done = subprocess.run(
                    [self._binary(), "-V"],
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
        timeout = self.stop_timeout if timeout is None else timeout
        master = self._running(adopt=False)
        pids = holding(self.error_log)
        if master is not None:
            pids |= {master, *workers(master)}
            with contextlib.suppress(ProcessLookupError):
                os.kill(master, signal.SIGQUIT if graceful else signal.SIGTERM)
        # Processes that are not the master's own workers (left behind by a dead master).
        for pid in pids - {master} - (workers(master) if master is not None else set()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT if graceful else signal.SIGTERM)
        if pids and not wait_gone(pids, timeout):
            log.warning("nginx: pids %s did not stop in %gs; killing them", sorted(pids), timeout)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_gone(pids, 2.0)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.marker_file.unlink()
        return bool(pids)

    # -- internals -----------------------------------------------------------------------------

    def _validate(self, config: str) -> None:
        self._ensure_dirs()
        binary = self._binary()
        fd, name = tempfile.mkstemp(prefix="candidate-", suffix=".conf", dir=self.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(config)
            argv = [binary, "-t", "-q", "-p", f"{self.check_dir}/", "-c", name, "-e", "stderr"]
            done = run_check_command(argv, self.check_timeout, f"{binary} -t")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        if done.returncode != 0:
            output = self._clean(done.stdout + "\n" + done.stderr, name)
            found = (
                stderr_messages(output)
                or [line.strip() for line in output.splitlines() if line.strip()][-3:]
            )
            found = [line for line in found if not line.endswith("test failed")] or found
            raise ProxyConfigError(
                "nginx -t refused the configuration: " + "; ".join(found)
                if found
                else f"nginx -t refused the configuration (exit status {done.returncode})"
            )

    def _clean(self, text: str, candidate: str | None = None) -> str:
        """nginx's output with our own paths shortened to what the operator knows."""
        if candidate:
            text = text.replace(candidate, "nginx.conf")
        return text.replace(str(self.config_file), "nginx.conf").replace(self.prefix, "")

    def _apply(self, config: str, services: Sequence[Service]) -> str:
        data = config.encode("utf-8")
        digest = hashlib.sha256(data).hexdigest()
        self._ensure_dirs()
        with self._locked():
            master = self._running(adopt=True)
            previous = _read_bytes(self.config_file)
            if master is not None and previous == data and _read_text(self.marker_file) == digest:
                if not (self.status_dir / "services.json").exists():
                    self._write_status(services)
                return "unchanged"
            self._trim_log()
            marker = _read_bytes(self.marker_file)
            with contextlib.suppress(FileNotFoundError):
                self.marker_file.unlink()
            _write_atomic(self.config_file, data)
            try:
                if master is None:
                    self._start()
                    result = "started"
                else:
                    self._reload(master)
                    result = "reloaded"
            except _Refused:
                # nginx said no and runs the previous configuration: file and marker go back.
                self._restore(previous)
                if marker is not None:
                    _write_atomic(self.marker_file, marker)
                raise
            except BaseException:
                self._restore(previous)
                raise
            finally:
                self._last_change = time.monotonic()
            _write_atomic(self.marker_file, digest.encode())
            self._write_status(services)
            return result

    def _ensure_dirs(self) -> None:
        # Workers may run as another user (root starts them as nobody): they must be able to
        # reach their temp folders and the status page, but not list or change anything.
        for path, mode in (
            (self.dir, 0o711),
            (self.dir / "tmp", 0o711),
            (self.status_dir, 0o711),
            (self.check_dir, 0o700),
            (self.check_dir / "tmp", 0o700),
        ):
            path.mkdir(mode=mode, parents=True, exist_ok=True)
            if path.stat().st_mode & 0o777 != mode:
                path.chmod(mode)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """Serialise applies on this state directory, across processes too."""
        return directory_lock(self.dir)

    def _binary(self) -> str:
        if self._binary_path is None:
            self._binary_path = find_executable(self.settings.binary, "nginx", "nginx.binary")
        return self._binary_path

    def _is_ours(self, pid: int) -> bool:
        """True if ``pid`` is an nginx master running this state directory's configuration."""
        text = title(pid)
        marker = f" -c {self.config_file}"
        return text.startswith("nginx: master process") and (
            text.endswith(marker) or f"{marker} " in text
        )

    def _running(self, *, adopt: bool) -> int | None:
        """The running master's pid, or ``None``. A master of this directory whose pid file is
        gone is found by its title (and, with ``adopt``, its pid file is written again) rather
        than a second one started beside it."""
        pid = read_pid(self.pid_file)
        if pid is not None and pid_alive(pid) and self._is_ours(pid):
            return pid
        found = masters_of(self.config_file)
        if not found:
            return None
        if adopt:
            _write_atomic(self.pid_file, f"{found[0]}\n".encode(), mode=0o644)
            log.info("nginx: adopted the running master (pid %d)", found[0])
        return found[0]

    def _log_size(self) -> int:
        try:
            return self.error_log.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.error_log, "rb") as handle:
                handle.seek(offset)
                text = handle.read(256 * 1024).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return self._clean(text)

    def _trim_log(self) -> None:
        """Keep error.log short. nginx appends (O_APPEND), so truncating it is safe."""
        if self._log_size() > _LOG_MAX_BYTES:
            with open(self.error_log, "r+b") as handle:
                handle.truncate(0)

    def _reason(self, offset: int, pid: int | None = None) -> str:
        found = summarise(
            msg for level, msg in log_entries(self._log_since(offset), pid=pid) if level in SERIOUS
        )
        return "; ".join(found) if found else f"no error message (see {self.error_log})"

    def _kill_strays(self) -> None:
        """Stop nginx processes left holding this directory's error log without their master
        (a master killed with SIGKILL leaves its workers serving, and holding the ports)."""
        strays = holding(self.error_log)
        if not strays:
            return
        log.warning("nginx: stopping processes %s left behind by a dead master", sorted(strays))
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not wait_gone(strays, 3.0):
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_gone(strays, 2.0)

    def _start(self) -> None:
        binary = self._binary()
        self._kill_strays()
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        offset = self._log_size()
        argv = [binary, "-p", self.prefix, "-c", str(self.config_file), "-e", str(self.error_log)]
        # With "daemon on" this command binds the ports, forks the master and exits; a file (not
        # a pipe) takes its output, so nothing waits on the daemon to close it.
        with open(self.start_output, "wb") as output:
            try:
                done = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=self.dir,
                    start_new_session=True,  # no terminal, no signals meant for discoverd
                    timeout=self.start_timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise PluginError(
                    f"nginx did not start within {self.start_timeout:g}s: {self._reason(offset)}"
                ) from None
            except OSError as exc:
                raise PluginError(f"cannot run {binary}: {exc}") from None
        if done.returncode != 0:
            printed = self._clean(self.start_output.read_text(errors="replace"))
            found = stderr_messages(printed)
            reason = "; ".join(found) if found else self._reason(offset)
            raise PluginError(f"nginx did not start (exit status {done.returncode}): {reason}")
        deadline = time.monotonic() + self.start_timeout
        while True:
            pid = read_pid(self.pid_file)
            if pid is not None and pid_alive(pid) and self._is_ours(pid) and workers(pid):
                log.info("nginx: started, master pid %d, workers %s", pid, sorted(workers(pid)))
                return
            if time.monotonic() >= deadline:
                reason = self._reason(offset)
                self.stop_process(timeout=2.0)
                raise PluginError(
                    f"nginx did not come up within {self.start_timeout:g}s (no master with "
                    f"workers); stopped it: {reason}"
                )
            time.sleep(0.02)

    def _reload(self, master: int) -> None:
        before = workers(master)
        offset = self._log_size()
        try:
            os.kill(master, signal.SIGHUP)
        except ProcessLookupError:
            raise PluginError(f"the nginx master (pid {master}) ended before the reload") from None
        deadline = time.monotonic() + self.reload_timeout
        while True:
            if not pid_alive(master):
                raise PluginError(
                    f"the nginx master (pid {master}) exited during the reload: "
                    f"{self._reason(offset, master)}"
                )
            verdict = reload_verdict(self._log_since(offset), master)
            if verdict:
                raise _Refused(
                    "nginx could not load the new configuration and keeps serving the previous "
                    "one: " + "; ".join(verdict)
                )
            fresh = workers(master) - before
            if fresh:
                self._wait_old_workers_stop_accepting(before, deadline)
                log.info("nginx: reloaded, new workers %s", sorted(fresh))
                return
            if time.monotonic() >= deadline:
                raise PluginError(
                    f"nginx did not confirm the reload within {self.reload_timeout:g}s (no new "
                    f"worker); the previous configuration is put back: "
                    f"{self._reason(offset, master)}"
                )
            time.sleep(0.02)

    def _wait_old_workers_stop_accepting(self, old: set[int], deadline: float) -> None:
        """The master tells the old workers to shut down about 100 ms after the new ones start;
        until then they still accept connections with the old configuration. A worker that got
        the signal retitles itself "... is shutting down" and closes its listening sockets."""
        while True:
            accepting = {pid for pid in old if pid_alive(pid) and "shutting down" not in title(pid)}
            if not accepting:
                return
            if time.monotonic() >= deadline:
                log.warning(
                    "nginx: old workers %s still accept connections after the reload",
                    sorted(accepting),
                )
                return
            time.sleep(0.01)

    def _restore(self, previous: bytes | None) -> None:
        """Put the previous configuration back on disk: the file must be what runs."""
        try:
            if previous is None:
                with contextlib.suppress(FileNotFoundError):
                    self.config_file.unlink()
            else:
                _write_atomic(self.config_file, previous)
        except OSError as exc:
            log.error("nginx: could not restore the previous %s: %s", self.config_file, exc)

    def _write_status(self, services: Sequence[Service]) -> None:
        try:
            documents = rendering.status_documents(services, self.settings)
            for name, content in documents.items():
                _write_atomic(self.status_dir / name, content, mode=0o644)
        except (OSError, PluginError) as exc:
            log.warning("nginx: cannot write the status page: %s", exc)


class _Refused(PluginError):
    """nginx refused a reload and keeps running its previous configuration."""


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _read_text(path: Path) -> str:
    data = _read_bytes(path)
    return data.decode(errors="replace").strip() if data is not None else ""


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a temporary file next to ``path``, flush it to disk, rename it over ``path``."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(name, mode)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
