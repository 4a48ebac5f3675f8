"""Watching a running nginx: its processes and its error log.

Checked against nginx 1.22 (Debian's nginx-light):

- With ``daemon on`` the command that starts nginx binds every listening socket, forks the master
  and exits 0; a configuration or bind error makes it exit 1 first, with ``nginx: [emerg] ...``
  on its stderr. The master then writes the pid file and starts its workers.
- The master's title (``/proc/<pid>/cmdline``) becomes ``nginx: master process <argv...>``, its
  workers' ``nginx: worker process`` (``... is shutting down`` while they drain). Every one of
  them holds the error log open, which identifies workers left behind by a killed master.
- SIGHUP makes the master read its configuration again. If the new one loads, it starts new
  workers and asks the old ones to finish gracefully; otherwise it logs ``[emerg]`` lines and
  keeps the old workers. A port another process holds is retried 5 times, 500 ms apart, each
  failure logged as ``[emerg] bind() ... failed (98: ...)``, before the final ``[emerg] still
  could not bind()``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from discoverd.core.process import pid_alive

# "2026/11/26 21:51:23 [emerg] 23198#23198: message" (the error log)
_LOG_RE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(\w+)\] (\d+)#\d+: (?:\*\d+ )?(.*)$")
# "nginx: [emerg] message" (stderr of the starting command or of nginx -t)
_STDERR_RE = re.compile(r"^nginx: \[(\w+)\] (.*)$")
SERIOUS = ("emerg", "alert", "crit")
_RETRIED_BIND = re.compile(r"^bind\(\) to \S+ failed \(98: ")


def title(pid: int) -> str:
    """The process title (nginx rewrites its argv), or ``""`` if it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, or ``None`` if there is no usable one."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


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
    return {p for p in children(master) if title(p).startswith("nginx: worker process")}


def holding(path: Path) -> set[int]:
    """Live nginx processes that hold ``path`` open (the error log: a master and its workers,
    or workers whose master was killed)."""
    target = str(path)
    found: set[int] = set()
    for pid in _pids():
        if not title(pid).startswith("nginx:"):
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


def masters_of(config_file: Path) -> list[int]:
    """Live nginx masters started with ``-c config_file`` (found by their title)."""
    marker = f" -c {config_file}"
    return sorted(
        pid
        for pid in _pids()
        if (text := title(pid)).startswith("nginx: master process")
        and (text.endswith(marker) or f"{marker} " in text)
        and pid_alive(pid)
    )


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


def log_entries(text: str, *, pid: int | None = None) -> list[tuple[str, str]]:
    """``(level, message)`` of the error log lines in ``text`` (of process ``pid`` only)."""
    found = []
    for line in text.splitlines():
        match = _LOG_RE.match(line.strip())
        if match and (pid is None or match.group(2) == str(pid)):
            found.append((match.group(1), match.group(3).strip()))
    return found


def reload_verdict(text: str, master: int) -> list[str] | None:
    """The serious messages that end a reload in failure, or ``None`` while there is none.

    A port in use is retried by nginx: its ``bind() failed (98: ...)`` lines are final only once
    ``still could not bind()`` follows.
    """
    serious = [msg for level, msg in log_entries(text, pid=master) if level in SERIOUS]
    final = [msg for msg in serious if not _RETRIED_BIND.match(msg)]
    return summarise(serious) if final else None


def stderr_messages(text: str, levels: Iterable[str] = SERIOUS) -> list[str]:
    """The messages of ``nginx: [level] ...`` lines (what nginx -t and a start print)."""
    wanted = set(levels)
    found = []
    for line in text.splitlines():
        match = _STDERR_RE.match(line.strip())
        if match and match.group(1) in wanted:
            found.append(match.group(2).strip())
        else:
            entry = _LOG_RE.match(line.strip())
            if entry and entry.group(1) in wanted:
                found.append(entry.group(3).strip())
    return summarise(found)


def summarise(messages: Iterable[str], *, limit: int = 8, width: int = 300) -> list[str]:
    """Distinct messages in order, each shortened, at most ``limit``."""
    seen: list[str] = []
    for message in messages:
        short = message if len(message) <= width else message[: width - 3] + "..."
        if short not in seen:
            seen.append(short)
    if len(seen) > limit:
        seen = [*seen[: limit - 1], f"... ({len(seen) - limit + 1} more)"]
    return seen
