"""Supervision of the HAProxy master process of one state directory: start, adopt, ask, reload
(verified), stop. What to apply and how is decided in :mod:`.proxy`.

The master is started in a session of its own, with no controlling terminal and its output
going to ``haproxy.log``; it is not tied to discoverd, so it keeps serving when discoverd exits
or restarts, and the next discoverd adopts it through the pid file and the master socket. (It is
not started with ``-D``: a daemonised 2.6 master sends its output to /dev/null, and the reason
of a failed reload -- say a port another program holds -- would be lost.)

A reload is verified: HAProxy 2.6 answers ``reload`` by cutting the connection, whatever the
outcome. A reload succeeded when the master's ``show proc`` counts one more reload, no failed
one, and lists a worker pid it did not list before. When the new configuration cannot start
(``haproxy -c`` does not bind ports), the master keeps the old worker serving and counts a
failed reload: :class:`~discoverd.proxykit.ProxyRefused`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from discoverd import PluginError, Unavailable
from discoverd.plugins.haproxy.sockets import ProcStatus, send_only, show_proc
from discoverd.proxykit import (
    LogFile,
    PidFile,
    ProxyRefused,
    command_line,
    find_executable,
    pid_alive,
    read_pid,
    start_detached,
    stop_process,
    summarise,
)

log = logging.getLogger(__name__)

# "[ALERT]    (1234) : config : parsing [file:12] : message" -> "config : parsing ..."
_ALERT_RE = re.compile(r"^\[ALERT\]\s*(?:\((\d+)\)\s*)?:\s*(.*)$")


def alerts(text: str, *, pid: int | None = None, limit: int = 12, width: int = 300) -> list[str]:
    """HAProxy's ``[ALERT]`` lines without their prefix, at most ``limit``, each shortened.

    With ``pid``, only the lines of that process (the master: a worker's alerts about its servers
    at the same moment are not the reason a reload failed).
    """
    found: list[str] = []
    for line in text.splitlines():
        match = _ALERT_RE.match(line.strip())
        if match and match.group(2) and (pid is None or match.group(1) == str(pid)):
            found.append(match.group(2).strip())
    return summarise(found, limit=limit, width=width, distinct=False)


class Master:
    """The HAProxy master (and its workers) running ``config_file`` from ``directory``: its pid
    file ``haproxy.pid``, its master socket ``master.sock`` and its log ``log``."""

    #: Seconds allowed for a start, for a reload and for a stop.
    start_timeout = 15.0
    reload_timeout = 15.0
    stop_timeout = 10.0
    #: Seconds a running master may take to answer on its socket before it counts as hung.
    answer_timeout = 5.0

    def __init__(self, directory: Path, config_file: Path, binary: str, log_file: LogFile) -> None:
        self.dir = directory
        self.config_file = config_file
        self.binary = binary
        self.log = log_file
        self.master_socket = directory / "master.sock"
        self.pid_file = PidFile(
            directory / "haproxy.pid", self.is_ours, mode=0o600, executable=self.executable
        )
        self._executable: str | None = None
        self._child: subprocess.Popen[bytes] | None = None

    def executable(self) -> str:
        """The haproxy binary's path (looked up once)."""
        if self._executable is None:
            self._executable = find_executable(self.binary, "haproxy", "haproxy.binary")
        return self._executable

    def is_ours(self, pid: int) -> bool:
        """True if ``pid`` is a HAProxy master started on this directory's master socket (the
        last test of :attr:`pid_file`'s identity check, after its real uid and executable)."""
        argv = command_line(pid)
        if argv is None:
            return False
        return any(arg.startswith(f"{self.master_socket},") for arg in argv)

    def running_pid(self) -> int | None:
        """The running master's pid, or ``None``; cheap (the pid file, else ``show proc``),
        adopts nothing."""

        def on_socket() -> int | None:
            found = show_proc(self.master_socket, timeout=1.0)
            return found.master if found is not None else None

        return self.pid_file.find(on_socket, adopt=False)

    def status(self) -> ProcStatus | None:
        """The running master's ``show proc``; ``None`` if none runs; ``Unavailable`` if it
        hangs. A master of this directory whose pid file is gone is found through the master
        socket, and its pid file written again, rather than a second one started beside it."""

        def on_socket() -> int | None:
            found = show_proc(self.master_socket, timeout=1.0)
            return found.master if found is not None else None

        pid = self.pid_file.find(on_socket)
        if pid is None:
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

    def start(self) -> None:
        """Start a master on ``config_file``; return once it answers with a worker."""
        binary = self.executable()
        self.pid_file.remove()
        offset = self.log.size()
        argv = [
            binary,
            "-W",
            "-S",
            f"{self.master_socket},mode,600",
            "-p",
            str(self.pid_file.path),
            "-f",
            str(self.config_file),
        ]
        child = start_detached(argv, output=self.log.path, cwd=self.dir)
        self._child = child
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = child.poll()
            if code is not None:
                self._child = None
                raise PluginError(
                    f"HAProxy did not start (exit status {code}): {self.reason(offset, child.pid)}"
                )
            status = show_proc(self.master_socket, timeout=1.0)
            if (
                status is not None
                and status.master == child.pid
                and status.workers
                and read_pid(self.pid_file.path) == child.pid
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
                    f"{self.start_timeout:g}s; stopped it: {self.reason(offset, child.pid)}"
                )
            time.sleep(0.005)  # a refused connection costs microseconds; a late answer, a pass

    def reload(self, before: ProcStatus) -> None:
        """Reload the master ``before`` describes, and verify it. ``ProxyRefused`` if HAProxy
        could not load the configuration (it keeps serving the previous one); ``PluginError``
        if the master exited or did not confirm in time."""
        offset = self.log.size()
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
                    f"{self.reason(offset, before.master)}"
                )
            status = show_proc(self.master_socket, timeout=1.0)
            if (
                status is not None
                and status.master == before.master
                and status.reloads > before.reloads
            ):
                if status.failed > 0 or "Loading failure" in self.log_since(offset):
                    raise ProxyRefused(
                        "HAProxy could not load the new configuration and keeps serving the "
                        f"previous one: {self.reason(offset, before.master)}"
                    )
                fresh = sorted(set(status.workers) - set(before.workers))
                if fresh:
                    log.info("haproxy: reloaded, new worker %s", fresh)
                    return
            if time.monotonic() >= deadline:
                # It may still come through: what runs is unknown, the next apply reloads.
                reason = self.reason(offset, before.master)
                raise PluginError(
                    f"HAProxy did not confirm the reload within {self.reload_timeout:g}s "
                    f"(no new worker); the previous configuration is put back: {reason}"
                )
            time.sleep(0.03)

    def stop(self, *, graceful: bool = False, timeout: float | None = None) -> bool:
        """Stop the master of this directory and its workers; wait for them (killed if they
        outlast ``timeout``). ``graceful`` lets workers finish their connections (SIGUSR1)
        instead of stopping at once (SIGTERM). ``False`` if none was running."""
        timeout = self.stop_timeout if timeout is None else timeout
        status = show_proc(self.master_socket, timeout=1.0)
        # The pid file's process if it is ours, else the master the socket names (the pid
        # file is gone or stale, the master is not); never a process that is not ours.
        candidates = [read_pid(self.pid_file.path), status.master if status else None]
        pid = next((c for c in candidates if c is not None and self.pid_file.trusted(c)), None)
        stopped = False
        if pid is not None:
            workers = status.workers if status is not None and status.master == pid else ()
            sig = signal.SIGUSR1 if graceful else signal.SIGTERM
            stop_process([pid], sig, also=workers, timeout=timeout, what="haproxy")
            stopped = True
        if self._child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._child.wait(timeout=1.0)
            self._child = None
        self.pid_file.remove()
        return stopped

    def close(self) -> None:
        """Forget the master (it keeps running); reap it if it already ended."""
        if self._child is not None:
            self._child.poll()

    def log_since(self, offset: int) -> str:
        """What HAProxy logged after ``offset``, with the configuration's path shortened."""
        return self.log.since(offset).replace(str(self.config_file), "haproxy.cfg")

    def reason(self, offset: int, pid: int) -> str:
        """The alerts ``pid`` logged after ``offset``, as one line."""
        found = alerts(self.log_since(offset), pid=pid)
        return "; ".join(found) if found else f"no error message (see {self.log.path})"
