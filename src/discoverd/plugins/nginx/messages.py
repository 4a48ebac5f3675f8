"""What nginx says: its error log lines and what ``nginx -t`` or a start print, turned into
one-line reasons.

Checked against nginx 1.22: SIGHUP makes the master read its configuration again. If the new one
loads, it starts new workers and asks the old ones to finish gracefully; otherwise it logs
``[emerg]`` lines and keeps the old workers. A port another process holds is retried 5 times,
500 ms apart, each failure logged as ``[emerg] bind() ... failed (98: ...)``, before the final
``[emerg] still could not bind()``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from discoverd.proxykit import summarise

# "2026/11/26 21:51:23 [emerg] 23198#23198: message" (the error log)
_LOG_RE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(\w+)\] (\d+)#\d+: (?:\*\d+ )?(.*)$")
# "nginx: [emerg] message" (stderr of the starting command or of nginx -t)
_STDERR_RE = re.compile(r"^nginx: \[(\w+)\] (.*)$")
SERIOUS = ("emerg", "alert", "crit")
_RETRIED_BIND = re.compile(r"^bind\(\) to \S+ failed \(98: ")


def log_entries(text: str, *, pid: int | None = None) -> list[tuple[str, str]]:
    """``(level, message)`` of the error log lines in ``text`` (of process ``pid`` only)."""
    found = []
    for line in text.splitlines():
        match = _LOG_RE.match(line.strip())
        if match and (pid is None or match.group(2) == str(pid)):
            found.append((match.group(1), match.group(3).strip()))
    return found


def serious(text: str, *, pid: int | None = None) -> list[str]:
    """The serious messages (emerg, alert, crit) of the error log lines in ``text``, shortened
    and without repeats."""
    return summarise(msg for level, msg in log_entries(text, pid=pid) if level in SERIOUS)


def reload_verdict(text: str, master: int) -> list[str] | None:
    """The serious messages that end a reload in failure, or ``None`` while there is none.

    A port in use is retried by nginx: its ``bind() failed (98: ...)`` lines are final only once
    ``still could not bind()`` follows.
    """
    found = [msg for level, msg in log_entries(text, pid=master) if level in SERIOUS]
    final = [msg for msg in found if not _RETRIED_BIND.match(msg)]
    return summarise(found) if final else None


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
