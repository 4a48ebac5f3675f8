"""Finding a running nginx in the process table: its master, its workers, and processes left
behind by a master that was killed.

Checked against nginx 1.22 (Debian's nginx-light):

- With ``daemon on`` the command that starts nginx binds every listening socket, forks the master
  and exits 0; a configuration or bind error makes it exit 1 first, with ``nginx: [emerg] ...``
  on its stderr. The master then writes the pid file and starts its workers.
- The master's title (``/proc/<pid>/cmdline``) becomes ``nginx: master process <argv...>``, its
  workers' ``nginx: worker process`` (``... is shutting down`` while they drain). Every one of
  them holds the error log open for writing, which identifies workers left behind by a killed
  master (a process of another user can open it only for reading).
"""

from __future__ import annotations

import os
from pathlib import Path

from discoverd.proxykit import child_pids, executable_of, pid_alive, process_title, writes_to

#: The title of an nginx master, before its arguments.
MASTER_TITLE = "nginx: master process"


def _pids() -> list[int]:
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []


def workers(master: int) -> set[int]:
    """The worker processes of an nginx master (draining ones included)."""
    return {p for p in child_pids(master) if process_title(p).startswith("nginx: worker process")}


def holding(path: Path, executable: str | None = None) -> set[int]:
    """Live nginx processes that hold ``path`` open for writing (the error log: a master and
    its workers, or workers whose master was killed). With ``executable`` (the nginx binary),
    only processes running it.

    Workers run as another user (``nobody``), so their uid proves nothing; holding the error
    log open for writing does: only discoverd's user can open it so, and nginx's processes get
    it from their master. A process of another user that opens the log for reading, or that
    calls itself ``nginx:``, is not counted (it is never signalled)."""
    real = os.path.realpath(executable) if executable is not None else None
    found: set[int] = set()
    for pid in _pids():
        if not process_title(pid).startswith("nginx:"):
            continue
        if real is not None and executable_of(pid) != real:
            continue
        if writes_to(pid, path):
            found.add(pid)
    return {p for p in found if pid_alive(p)}


def is_master_of(pid: int, config_file: Path) -> bool:
    """True if ``pid`` is an nginx master started with ``-c config_file`` (by its title)."""
    text = process_title(pid)
    marker = f" -c {config_file}"
    return text.startswith(MASTER_TITLE) and (text.endswith(marker) or f"{marker} " in text)


def masters_of(config_file: Path) -> list[int]:
    """Live nginx masters started with ``-c config_file`` (found by their title)."""
    return sorted(pid for pid in _pids() if is_master_of(pid, config_file) and pid_alive(pid))
