"""HAProxy's unix-socket CLIs: the master CLI (``master.sock``) and the runtime API (the admin
socket, ``admin.sock``), and how to read their answers. No process handling here (see
:mod:`.master`).

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_FAILED_RE = re.compile(r"\[failed:\s*(\d+)\]")


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


def master_reload_count(state_dir: Path | str) -> int | None:
    """How many reloads the HAProxy master of a discoverd state directory has done since it
    started (its ``show proc`` count), or ``None`` if no master answers.

    ``state_dir`` is the agent's state directory (the one holding ``haproxy/``) or the plugin's
    own ``haproxy`` folder. For tests and benchmarks: pure membership churn must leave it as is.
    """
    base = Path(state_dir)
    folder = base if (base / "master.sock").exists() else base / "haproxy"
    status = show_proc(folder / "master.sock")
    return None if status is None else status.reloads


class CommandError(Exception):
    """A runtime API command failed: HAProxy refused it, or the socket could not be used."""


def admin(path: Path, command: str, *, expect: str = "", timeout: float = 2.0) -> str:
    """Run one command on the admin socket; raise ``CommandError`` unless it succeeded.

    HAProxy answers most commands that succeed with nothing, and the others with a known
    sentence: ``expect`` is a part of that sentence (empty: the answer must be empty).
    """
    try:
        answer = cli(path, command, timeout)
    except OSError as exc:
        raise CommandError(f"{command!r}: {exc}") from None
    return _checked(command, answer, expect)


def _checked(command: str, answer: str, expect: str) -> str:
    """``answer`` stripped if it says ``command`` succeeded (see :func:`admin`), else raise
    ``CommandError`` naming the command and quoting the answer."""
    answer = answer.strip()
    if (expect and expect not in answer) or (not expect and answer):
        raise CommandError(f"{command!r}: HAProxy answered {answer[:200]!r}")
    return answer


#: The longest line :func:`admin_many` sends on one connection (HAProxy reads a CLI line into
#: one buffer, 16 KiB by default: far below it).
BATCH_BYTES = 4096


def split_answers(text: str) -> list[str]:
    """The answers to a line of ``;``-separated commands: HAProxy ends each command's answer
    with an empty line (an empty answer is the empty line alone). Only for commands whose
    answers hold no empty line (every command :func:`admin_many` is used for)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the text ends with a newline
    answers: list[str] = []
    current: list[str] = []
    for line in lines:
        if line:
            current.append(line)
        else:
            answers.append("\n".join(current))
            current = []
    if current:
        answers.append("\n".join(current))  # no final empty line: a cut answer
    return answers


def admin_many(
    path: Path, commands: Sequence[tuple[str, str]], *, timeout: float = 2.0
) -> list[str]:
    """Run ``(command, expect)`` pairs on the admin socket as :func:`admin` would, one line of
    ``;``-separated commands per connection (up to :data:`BATCH_BYTES` a line) instead of a
    connection per command: the three commands of a new server cost one round trip. Raise
    ``CommandError`` naming the first command that failed; HAProxy has run the others of its
    line too (callers reload on any failure, as after :func:`admin`)."""
    for command, _ in commands:
        if ";" in command or "\n" in command:
            raise CommandError(f"{command!r}: not one runtime command")
    answers: list[str] = []
    first = 0
    while first < len(commands):
        size = len(commands[first][0])
        last = first + 1
        while last < len(commands) and size + 2 + len(commands[last][0]) <= BATCH_BYTES:
            size += 2 + len(commands[last][0])
            last += 1
        batch = commands[first:last]
        line = "; ".join(command for command, _ in batch)
        try:
            got = split_answers(cli(path, line, timeout))
        except OSError as exc:
            raise CommandError(f"{batch[0][0]!r}: {exc}") from None
        if len(got) != len(batch):
            raise CommandError(f"{line[:200]!r}: HAProxy answered {'; '.join(got)[:200]!r}")
        answers += [
            _checked(command, answer, expect)
            for (command, expect), answer in zip(batch, got, strict=True)
        ]
        first = last
    return answers


def server_ids(dump: str) -> dict[str, tuple[int, int]]:
    """``show servers state <backend>`` -> {server name: (backend id, server id)}."""
    found: dict[str, tuple[int, int]] = {}
    for line in dump.splitlines():
        fields = line.split()
        numbered = len(fields) > 4 and fields[0].isdigit() and fields[2].isdigit()
        if numbered and not line.startswith("#"):
            found[fields[3]] = (int(fields[0]), int(fields[2]))
    return found


def server_names(dump: str) -> dict[str, set[str]]:
    """``show servers state`` -> {backend name: its server names}."""
    found: dict[str, set[str]] = {}
    for line in dump.splitlines():
        fields = line.split()
        if len(fields) > 4 and not line.startswith("#") and fields[0].isdigit():
            found.setdefault(fields[1], set()).add(fields[3])
    return found


def sessions(stat_csv: str) -> dict[str, int]:
    """``show stat <backend id> 4 -1`` (CSV) -> {server name: current plus queued sessions}."""
    lines = stat_csv.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    columns = lines[0][2:].split(",")
    try:
        name, queued, current = (columns.index(c) for c in ("svname", "qcur", "scur"))
    except ValueError:
        return {}
    found: dict[str, int] = {}
    for line in lines[1:]:
        fields = line.split(",")
        if len(fields) > max(name, queued, current):
            count = sum(int(fields[i]) for i in (queued, current) if fields[i].isdigit())
            found[fields[name]] = count
    return found


def server_status(stat_csv: str, backend: str) -> dict[str, str]:
    """``show stat`` (CSV) -> {server name: its status} for the servers of ``backend``
    (``UP``, ``DOWN``, ``DRAIN``, ``MAINT``, ``no check``, ``UP 1/2``, ...)."""
    lines = stat_csv.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    columns = lines[0][2:].split(",")
    try:
        proxy, name, status = (columns.index(c) for c in ("pxname", "svname", "status"))
    except ValueError:
        return {}
    found: dict[str, str] = {}
    for line in lines[1:]:
        fields = line.split(",")
        if len(fields) <= max(proxy, name, status) or fields[proxy] != backend:
            continue
        if fields[name] not in ("FRONTEND", "BACKEND"):
            found[fields[name]] = fields[status]
    return found
