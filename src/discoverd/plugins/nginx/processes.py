"""Finding a running nginx in the process table: its master, its workers, and processes left
behind by a master that was killed.

Checked against nginx 1.22 (Debian's nginx-light):

- With ``daemon on`` the command that starts nginx binds every listening socket, forks the master
  and exits 0; a configuration or bind error makes it exit 1 first, with ``nginx: [emerg] ...``
  on its stderr. The master then writes the pid file and starts its workers.
- The master's title (``/proc/<pid>/cmdline``) becomes ``nginx: master process <argv...>``, its
  workers' ``nginx: worker process`` (``... is shutting down`` while they drain). Every one of
  them holds the error log open, which identifies workers left behind by a killed master.
"""

from __future__ import annotations

import os
from pathlib import Path

from discoverd.proxykit import pid_alive, process_title

#: The title of an nginx master, before its arguments.
MASTER_TITLE = "nginx: master process"


def _pids() -> list[int]:
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []


def parent(pid: int) -> int:
    """The parent pid of ``pid`` (0 if unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0


def children(pid: int) -> set[int]:
    """Live child processes of ``pid``."""
    found: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found.update(int(x) for x in text.split())
    except OSError:
        found = {p for p in _pids() if parent(p) == pid}
    return {p for p in found if pid_alive(p)}


def workers(master: int) -> set[int]:
    """The worker processes of an nginx master (draining ones included)."""
    return {p for p in children(master) if process_title(p).startswith("nginx: worker process")}


def holding(path: Path) -> set[int]:
    """Live nginx processes that hold ``path`` open (the error log: a master and its workers,
    or workers whose master was killed)."""
    target = str(path)
    found: set[int] = set()
    for pid in _pids():
        if not process_title(pid).startswith("nginx:"):
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    found.add(pid)
                    break
            except OSError:
                continue
    return {p for p in found if pid_alive(p)}


def is_master_of(pid: int, config_file: Path) -> bool:
    """True if ``pid`` is an nginx master started with ``-c config_file`` (by its title)."""
    text = process_title(pid)
    marker = f" -c {config_file}"
    return text.startswith(MASTER_TITLE) and (text.endswith(marker) or f"{marker} " in text)


def masters_of(config_file: Path) -> list[int]:
    """Live nginx masters started with ``-c config_file`` (found by their title)."""
    return sorted(pid for pid in _pids() if is_master_of(pid, config_file) and pid_alive(pid))
