"""Talking to a running HAProxy: its unix-socket CLIs, its processes, its server state.

Everything here was checked against HAProxy 2.6 in master-worker mode:

- The master CLI (``-S master.sock``) answers ``show proc``: a ``master`` line whose reload
  column reads ``<reloads> [failed: <n>]`` and one line per worker (``<pid> worker <reloads>``).
  ``failed`` counts reloads that failed since the last good one; a new worker (a pid not seen
  before) appears only when a reload succeeded.
- ``reload`` on the master CLI re-executes the master; the connection is cut without an answer,
  and the master socket answers again (sometimes with an empty first answer) once the new
  configuration is loaded -- or refused, in which case the old worker keeps serving.
- ``show servers state`` on the admin socket prints the server-state file format. Loading it
  restores each server's address and port too, not only its health, so a state line must be
  dropped when the server moved.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from discoverd.core.process import pid_alive

_FAILED_RE = re.compile(r"\[failed:\s*(\d+)\]")
# "[ALERT]    (1234) : config : parsing [file:12] : message" -> "config : parsing ..."
_ALERT_RE = re.compile(r"^\[ALERT\]\s*(?:\((\d+)\)\s*)?:\s*(.*)$")


def cli(path: Path, command: str, timeout: float = 2.0) -> str:
    """Send one command to a HAProxy unix-socket CLI and return the whole answer.

    Raises ``OSError`` if the socket cannot be reached or does not answer within ``timeout``.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)  # non-interactive: the CLI closes after answering
        chunks: list[bytes] = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def send_only(path: Path, command: str, timeout: float = 2.0) -> None:
    """Send a command whose answer does not matter (``reload`` cuts the connection)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                pass


@dataclass(frozen=True)
class ProcStatus:
    """What the master CLI's ``show proc`` says."""

    master: int
    reloads: int
    failed: int
    workers: tuple[int, ...]


def parse_show_proc(text: str) -> ProcStatus | None:
    """Parse ``show proc``; ``None`` if the answer has no master line (e.g. mid-reload)."""
    master: tuple[int, int, int] | None = None
    workers: list[int] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or line.startswith("#") or not fields[0].isdigit():
            continue
        pid, kind = int(fields[0]), fields[1]
        if kind == "master":
            reloads = int(fields[2]) if fields[2].isdigit() else 0
            failed = _FAILED_RE.search(line)
            master = (pid, reloads, int(failed.group(1)) if failed else 0)
        elif kind == "worker":
            workers.append(pid)
    if master is None:
        return None
    return ProcStatus(master[0], master[1], master[2], tuple(sorted(workers)))


def show_proc(master_socket: Path, timeout: float = 2.0) -> ProcStatus | None:
    """``show proc`` through the master socket; ``None`` if it cannot answer now."""
    try:
        return parse_show_proc(cli(master_socket, "show proc", timeout))
    except OSError:
        return None


def command_line(pid: int) -> list[str] | None:
    """The argv of ``pid``, or ``None`` if it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, or ``None`` if there is no usable one."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


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


def alerts(text: str, *, pid: int | None = None, limit: int = 12, width: int = 300) -> list[str]:
    """HAProxy's ``[ALERT]`` lines without their prefix, at most ``limit``, each shortened.

    With ``pid``, only the lines of that process (the master: a worker's alerts about its servers
    at the same moment are not the reason a reload failed).
    """
    found: list[str] = []
    for line in text.splitlines():
        match = _ALERT_RE.match(line.strip())
        if match and match.group(2) and (pid is None or match.group(1) == str(pid)):
            message = match.group(2).strip()
            found.append(message if len(message) <= width else message[: width - 3] + "...")
    if len(found) > limit:
        found = [*found[: limit - 1], f"... ({len(found) - limit + 1} more)"]
    return found


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def filter_server_state(dump: str, servers: Mapping[tuple[str, str], tuple[str, int]]) -> str:
    """Keep the lines of a ``show servers state`` dump whose server is still at the same place.

    ``servers`` maps (backend, server) of the next configuration to its (address, port). A line
    for a server that is gone or moved is dropped: HAProxy would otherwise restore the old address
    and port over the new configuration. Returns a server-state file (possibly with no servers).
    """
    lines = dump.splitlines()
    version = next((line.strip() for line in lines if line.strip()), "1")
    header = next((line for line in lines if line.startswith("# be_id")), "")
    if not header or version != "1":
        return ""
    columns = header.lstrip("#").split()
    try:
        be, srv, addr, port = (
            columns.index(name) for name in ("be_name", "srv_name", "srv_addr", "srv_port")
        )
    except ValueError:
        return ""
    kept = [version, header]
    for line in lines:
        fields = line.split()
        if line.startswith("#") or len(fields) != len(columns):
            continue
        wanted = servers.get((fields[be], fields[srv]))
        if wanted is None or not fields[port].isdigit():
            continue
        if _same_address(fields[addr], wanted[0]) and int(fields[port]) == wanted[1]:
            kept.append(line)
    return "\n".join(kept) + "\n"
