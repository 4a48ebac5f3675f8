"""Supervising a proxy process that outlives discoverd: started detached, adopted through its
pid file, stopped.

A proxy such as HAProxy or nginx keeps serving while discoverd restarts, so discoverd never
holds it as a child it waits for. It starts it in a session of its own (:func:`start_detached`),
finds it again through its pid file and an identity check (:class:`PidFile`: a pid reused by an
unrelated program is not ours), and stops it only when asked (:func:`stop_process`).

The identity check rests on what another local user cannot fake: the process's real uid (it
must be discoverd's effective uid) and the file it executes (``/proc/<pid>/exe`` must be the
configured binary). A title or a command line is only the last test: any process can choose
its own.
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


def real_uid(pid: int) -> int | None:
    """The real uid of ``pid`` (``/proc/<pid>/status``), or ``None`` if it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
    return None


def executable_of(pid: int) -> str | None:
    """The file ``pid`` executes (``/proc/<pid>/exe``), or ``None`` if it cannot be read
    (another user's process, without root). A binary replaced since the process started (a
    package upgrade) still counts as its path: only who may write there could have run it."""
    try:
        target = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return target.removesuffix(" (deleted)")


def child_pids(pid: int) -> set[int]:
    """The live child processes of ``pid`` (a master's workers)."""
    found: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found.update(int(x) for x in text.split())
    except OSError:
        found = {other for other in _all_pids() if _parent(other) == pid}
    return {child for child in found if pid_alive(child)}


def writes_to(pid: int, path: Path) -> bool:
    """True if ``pid`` holds ``path`` open for writing (``/proc/<pid>/fd`` and ``fdinfo``). A
    file only discoverd's user may write (a proxy's log) then proves the process got it from
    discoverd's proxy, whatever user it runs as now."""
    target = str(path)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != target:
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        flags = next((ln.split()[1] for ln in info.splitlines() if ln.startswith("flags:")), "0")
        if (int(flags, 8) & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR):
            return True
    return False


def _all_pids() -> list[int]:
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0


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
    process, so that a pid the system gave to another program since, or a process another
    local user dressed up as the proxy, is never adopted, signalled or trusted.

    A process is ours (:meth:`trusted`) when it is alive, its real uid is discoverd's effective
    uid, ``/proc/<pid>/exe`` is the proxy's binary (``executable()``, resolved with
    ``realpath``; skipped when ``None``), and ``is_ours(pid)`` (e.g. its command line names
    this state directory)."""

    path: Path
    is_ours: Callable[[int], bool]
    #: Mode of the file when discoverd writes it (when it adopts a process).
    mode: int = 0o644
    #: The proxy's binary, asked when first needed (looking it up may fail: not installed).
    executable: Callable[[], str] | None = None

    def trusted(self, pid: int) -> bool:
        """True if ``pid`` is alive and is our proxy (see the class)."""
        if not pid_alive(pid) or real_uid(pid) != os.geteuid():
            return False
        if self.executable is not None:
            running = executable_of(pid)
            if running is None or running != os.path.realpath(self.executable()):
                return False
        return self.is_ours(pid)

    def live(self) -> int | None:
        """The pid in the file, if that process is alive and ours; else ``None``."""
        pid = read_pid(self.path)
        if pid is None or not self.trusted(pid):
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
        if found is None or not self.trusted(found):
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
