"""Supervision of the nginx master process of one state directory: start, adopt, verified
reload, stop. What is applied is decided in :mod:`.proxy`.

nginx runs as a daemon (``daemon on``) in a session of its own: it keeps serving when discoverd
exits or restarts, and the next discoverd adopts it through the pid file (or, if that is gone,
by the master's process title, which names this ``nginx.conf``).

A reload is SIGHUP to the master, and it is verified: it succeeded when a worker the master did
not have before appears; it failed when the master logs a final ``[emerg]`` (a port in use is
retried by nginx for about 2.5 s first): :class:`~discoverd.proxykit.ProxyRefused`, nginx keeps
its previous workers and configuration.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from discoverd import PluginError
from discoverd.plugins.nginx.messages import reload_verdict, serious, stderr_messages
from discoverd.plugins.nginx.processes import holding, is_master_of, masters_of, workers
from discoverd.proxykit import (
    LogFile,
    PidFile,
    ProxyRefused,
    find_executable,
    pid_alive,
    process_title,
    start_detached,
    stop_process,
)

log = logging.getLogger(__name__)


class Master:
    """The nginx master (and its workers) running ``config_file`` with the prefix
    ``directory``: its pid file ``nginx.pid`` and its error log ``log``."""

    #: Seconds allowed for a start, for a reload and for a stop.
    start_timeout = 15.0
    reload_timeout = 20.0
    stop_timeout = 10.0

    def __init__(self, directory: Path, config_file: Path, binary: str, log_file: LogFile) -> None:
        self.dir = directory
        self.prefix = f"{directory}/"
        self.config_file = config_file
        self.binary = binary
        self.log = log_file
        self.pid_file = PidFile(
            directory / "nginx.pid", self.is_ours, mode=0o644, executable=self.executable
        )
        self.start_output = directory / "start.out"
        self._executable: str | None = None

    def executable(self) -> str:
        """The nginx binary's path (looked up once)."""
        if self._executable is None:
            self._executable = find_executable(self.binary, "nginx", "nginx.binary")
        return self._executable

    def is_ours(self, pid: int) -> bool:
        """True if ``pid`` is an nginx master running this directory's configuration, by its
        title (the last test of :attr:`pid_file`'s identity check, after its real uid and
        executable)."""
        return is_master_of(pid, self.config_file)

    def running(self, *, adopt: bool) -> int | None:
        """The running master's pid, or ``None``. A master of this directory whose pid file is
        gone is found by its title (and, with ``adopt``, its pid file is written again) rather
        than a second one started beside it."""

        def by_title() -> int | None:
            found = masters_of(self.config_file)
            return found[0] if found else None

        pid = self.pid_file.live()
        if pid is not None:
            return pid
        pid = self.pid_file.find(by_title, adopt=adopt)
        if pid is not None and adopt:
            log.info("nginx: adopted the running master (pid %d)", pid)
        return pid

    def clean(self, text: str, candidate: str | None = None) -> str:
        """nginx's output with our own paths shortened to what the operator knows."""
        if candidate:
            text = text.replace(candidate, "nginx.conf")
        return text.replace(str(self.config_file), "nginx.conf").replace(self.prefix, "")

    def log_since(self, offset: int) -> str:
        return self.clean(self.log.since(offset))

    def reason(self, offset: int, pid: int | None = None) -> str:
        """The serious messages logged after ``offset`` (by ``pid``), as one line."""
        found = serious(self.log_since(offset), pid=pid)
        return "; ".join(found) if found else f"no error message (see {self.log.path})"

    def kill_strays(self) -> None:
        """Stop nginx processes left holding this directory's error log without their master
        (a master killed with SIGKILL leaves its workers serving, and holding the ports)."""
        strays = holding(self.log.path, self.executable())
        if not strays:
            return
        log.warning("nginx: stopping processes %s left behind by a dead master", sorted(strays))
        stop_process(strays, signal.SIGTERM, timeout=3.0, what="nginx")

    def start(self) -> None:
        """Start nginx on ``config_file``; return once its master has workers."""
        binary = self.executable()
        self.kill_strays()
        self.pid_file.remove()
        offset = self.log.size()
        argv = [binary, "-p", self.prefix, "-c", str(self.config_file), "-e", str(self.log.path)]
        # With "daemon on" this command binds the ports, forks the master and exits; a file (not
        # a pipe) takes its output, so nothing waits on the daemon to close it.
        child = start_detached(argv, output=self.start_output, cwd=self.dir, append=False)
        try:
            code = child.wait(timeout=self.start_timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise PluginError(
                f"nginx did not start within {self.start_timeout:g}s: {self.reason(offset)}"
            ) from None
        if code != 0:
            printed = self.clean(self.start_output.read_text(errors="replace"))
            found = stderr_messages(printed)
            reason = "; ".join(found) if found else self.reason(offset)
            raise PluginError(f"nginx did not start (exit status {code}): {reason}")
        deadline = time.monotonic() + self.start_timeout
        while True:
            pid = self.pid_file.live()
            if pid is not None and workers(pid):
                log.info("nginx: started, master pid %d, workers %s", pid, sorted(workers(pid)))
                return
            if time.monotonic() >= deadline:
                reason = self.reason(offset)
                self.stop(timeout=2.0)
                raise PluginError(
                    f"nginx did not come up within {self.start_timeout:g}s (no master with "
                    f"workers); stopped it: {reason}"
                )
            time.sleep(0.02)

    def reload(self, master: int) -> None:
        """SIGHUP to ``master``, verified. ``ProxyRefused`` if nginx refused the configuration
        (it keeps its previous workers); ``PluginError`` if the master exited or did not
        confirm in time."""
        before = workers(master)
        offset = self.log.size()
        try:
            os.kill(master, signal.SIGHUP)
        except ProcessLookupError:
            raise PluginError(f"the nginx master (pid {master}) ended before the reload") from None
        deadline = time.monotonic() + self.reload_timeout
        while True:
            if not pid_alive(master):
                raise PluginError(
                    f"the nginx master (pid {master}) exited during the reload: "
                    f"{self.reason(offset, master)}"
                )
            verdict = reload_verdict(self.log_since(offset), master)
            if verdict:
                raise ProxyRefused(
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
                    f"{self.reason(offset, master)}"
                )
            time.sleep(0.02)

    def _wait_old_workers_stop_accepting(self, old: set[int], deadline: float) -> None:
        """The master tells the old workers to shut down about 100 ms after the new ones start;
        until then they still accept connections with the old configuration. A worker that got
        the signal retitles itself "... is shutting down" and closes its listening sockets."""
        while True:
            accepting = {
                pid for pid in old if pid_alive(pid) and "shutting down" not in process_title(pid)
            }
            if not accepting:
                return
            if time.monotonic() >= deadline:
                log.warning(
                    "nginx: old workers %s still accept connections after the reload",
                    sorted(accepting),
                )
                return
            time.sleep(0.01)

    def stop(self, *, graceful: bool = False, timeout: float | None = None) -> bool:
        """Stop the nginx of this directory (master, workers, and processes a dead master left
        behind); wait for them (killed if they outlast ``timeout``). ``graceful`` lets workers
        finish their connections (SIGQUIT) instead of stopping at once (SIGTERM). ``False``
        if none was running."""
        timeout = self.stop_timeout if timeout is None else timeout
        master = self.running(adopt=False)
        own = workers(master) if master is not None else set()
        strays = holding(self.log.path, self.executable())
        pids = strays | ({master, *own} if master is not None else set())
        # The master stops its own workers; the others (left behind by a dead master) are
        # signalled one by one.
        signalled = pids - own
        sig = signal.SIGQUIT if graceful else signal.SIGTERM
        stop_process(signalled, sig, also=own, timeout=timeout, what="nginx")
        self.pid_file.remove()
        return bool(pids)
