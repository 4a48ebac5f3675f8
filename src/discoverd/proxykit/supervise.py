"""Supervising a proxy process that outlives discoverd: started detached, adopted through its
pid file, stopped.

A proxy such as HAProxy or nginx keeps serving while discoverd restarts, so discoverd never
holds it as a child it waits for. It starts it in a session of its own (:func:`start_detached`),
finds it again through its pid file and an identity check (:class:`PidFile`: a pid reused by an
unrelated program is not ours), and stops it only when asked (:func:`stop_process`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from discoverd import PluginError
from discoverd.proxykit.files import write_atomic
from discoverd.proxykit.process import pid_alive

log = logging.getLogger(__name__)


def wait_gone(pids: Iterable[int], timeout: float) -> bool:
    """Wait until none of ``pids`` is alive; ``False`` on timeout."""
    deadline = time.monotonic() + timeout
    remaining = list(pids)
    while True:
        remaining = [pid for pid in remaining if pid_alive(pid)]
        if not remaining:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def command_line(pid: int) -> list[str] | None:
    """The argv of ``pid``, or ``None`` if it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def process_title(pid: int) -> str:
    """The argv of ``pid`` joined by spaces (the title, for a program that rewrites its argv as
    nginx does), or ``""`` if it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def start_detached(
    argv: Sequence[str], *, output: Path, cwd: Path, append: bool = True
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own (no controlling terminal, no signal meant for
    discoverd reaches it), stdin from /dev/null, stdout and stderr into the file ``output``
    (appended, or replaced without ``append``). A file, not a pipe: nothing waits on the
    process to close it, and the reason of a failure can be read there afterwards.
    ``PluginError`` if it cannot be run."""
    with open(output, "ab" if append else "wb") as handle:
        try:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise PluginError(f"cannot run {argv[0]}: {exc}") from None


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, or ``None`` if there is no usable one."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


@dataclass(frozen=True)
class PidFile:
    """The pid file of a proxy process that outlives discoverd, and how to recognise that
    process: ``is_ours(pid)`` is the identity check (e.g. its command line names this state
    directory), so a pid that the system gave to another program since is never adopted."""

    path: Path
    is_ours: Callable[[int], bool]
    #: Mode of the file when discoverd writes it (when it adopts a process).
    mode: int = 0o644

    def live(self) -> int | None:
        """The pid in the file, if that process is alive and ours; else ``None``."""
        pid = read_pid(self.path)
        if pid is None or not pid_alive(pid) or not self.is_ours(pid):
            return None
        return pid

    def find(self, search: Callable[[], int | None], *, adopt: bool = True) -> int | None:
        """The running process: :meth:`live`, else the pid ``search()`` finds (by another way:
        a socket, the process table) if it is alive and ours. Such a process lost its pid file;
        with ``adopt`` the file is written again, rather than a second process started."""
        pid = self.live()
        if pid is not None:
            return pid
        found = search()
        if found is None or not pid_alive(found) or not self.is_ours(found):
            return None
        if adopt:
            write_atomic(self.path, f"{found}\n".encode(), mode=self.mode)
        return found

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def stop_process(
    pids: Iterable[int],
    sig: int,
    *,
    also: Iterable[int] = (),
    timeout: float,
    what: str,
) -> bool:
    """Send ``sig`` to each of ``pids``, then wait until they and the processes in ``also``
    (e.g. a master's workers, which the master stops itself) are gone. Those left after
    ``timeout`` seconds are killed (``SIGKILL``, with a warning naming ``what``). Returns
    ``False`` if some had to be killed."""
    signalled = set(pids)
    every = signalled | set(also)
    for pid in sorted(signalled):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    if not every or wait_gone(every, timeout):
        return True
    log.warning("%s: pids %s did not stop in %gs; killing them", what, sorted(every), timeout)
    for pid in sorted(every):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_gone(every, 2.0)
    return False
