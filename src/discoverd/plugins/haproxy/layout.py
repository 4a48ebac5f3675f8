"""A rendered configuration split into its structure and its server lines (pure, no I/O).

The runtime API can add, remove and move servers, but nothing else. So a candidate configuration
is compared with the one HAProxy runs in two parts:

- the *server lines* of ``backend`` and ``listen`` sections that have the plain shape
  ``server <name> <ip>:<port> <options>``, with a name, an address and options made of characters
  that cannot escape a command of the runtime API;
- the *structure*: every other line, in order (a server line of another shape stays here).

When the structures are equal and every common server kept its options, the difference is a set of
runtime commands (:func:`runtime_changes`); otherwise it takes a reload.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

# Keywords that open a section of haproxy.cfg.
_SECTIONS = frozenset(
    {
        "global",
        "defaults",
        "frontend",
        "backend",
        "listen",
        "peers",
        "resolvers",
        "userlist",
        "mailers",
        "program",
        "http-errors",
        "ring",
        "cache",
        "fcgi-app",
    }
)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}")
# Options of a server line that may be sent to the runtime API as they are: no quotes, no
# backslashes, no ';' (which separates CLI commands), no '#'.
_ARGS_RE = re.compile(r"[A-Za-z0-9 _.:/,=@%+-]*")
_ENDPOINT_RE = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)):([0-9]{1,5})")


@dataclass(frozen=True)
class ServerLine:
    """One plain server line of a backend (``section``)."""

    section: str
    name: str
    address: str
    port: int
    args: str  # the options after the address, single-spaced

    @property
    def endpoint(self) -> str:
        if ":" in self.address:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"

    @property
    def checked(self) -> bool:
        """True if the line asks for health checks (``check``)."""
        return "check" in self.args.split()

    @property
    def agent_checked(self) -> bool:
        return "agent-check" in self.args.split()


@dataclass(frozen=True)
class Layout:
    """A configuration as :func:`parse_layout` splits it."""

    structure: str
    servers: Mapping[str, Mapping[str, ServerLine]]
    #: A server name used twice in a section (``haproxy -c`` must judge such a candidate).
    duplicates: bool = False
    #: A ``default-server`` line exists: HAProxy 2.6 does not apply it to servers added at run
    #: time, so such a server would differ from the same line loaded from the file.
    default_server: bool = False
    args: frozenset[str] = field(default=frozenset())

    def count(self) -> int:
        return sum(len(servers) for servers in self.servers.values())


@dataclass(frozen=True)
class Changes:
    """What the runtime API must do to go from one layout to the next."""

    added: tuple[ServerLine, ...] = ()
    removed: tuple[ServerLine, ...] = ()
    moved: tuple[ServerLine, ...] = ()  # same name and options, new address or port

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.moved)


@functools.lru_cache(maxsize=1 << 15)
def _server_line(section: str, line: str) -> ServerLine | None:
    """The plain server line ``line`` is, or ``None`` if it has another shape. Cached: from one
    candidate to the next nearly every server line is the same."""
    fields = line.split()
    if len(fields) < 3 or not _NAME_RE.fullmatch(fields[1]):
        return None
    match = _ENDPOINT_RE.fullmatch(fields[2])
    if match is None:
        return None
    text = match.group(1) or match.group(2)
    port = int(match.group(3))
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if (address.version == 6) != (match.group(1) is not None) or not 0 < port < 65536:
        return None
    args = " ".join(fields[3:])
    if not _ARGS_RE.fullmatch(args):
        return None
    return ServerLine(section, fields[1], str(address), port, args)


def parse_layout(text: str) -> Layout:
    """Split ``text`` into structure and plain server lines."""
    structure: list[str] = []
    servers: dict[str, dict[str, ServerLine]] = {}
    other_names: dict[str, set[str]] = {}  # server names of lines kept in the structure
    duplicates = default_server = False
    section = ""  # the current backend or listen section, "" in any other section
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            structure.append(line)
            continue
        keyword = fields[0]
        if keyword in _SECTIONS:
            named = keyword in ("backend", "listen") and len(fields) == 2
            section = fields[1] if named and _NAME_RE.fullmatch(fields[1]) else ""
        elif keyword == "default-server":
            default_server = True
        elif keyword == "server" and section:
            server = _server_line(section, line)
            if server is not None:
                own = servers.setdefault(section, {})
                if server.name in own:
                    duplicates = True
                own[server.name] = server
                continue
            if len(fields) > 1:
                other_names.setdefault(section, set()).add(fields[1])
        structure.append(line)
    for name, names in other_names.items():
        if names & set(servers.get(name, {})):
            duplicates = True
    args = frozenset(s.args for own in servers.values() for s in own.values())
    return Layout("\n".join(structure), servers, duplicates, default_server, args)


def runtime_changes(old: Layout, new: Layout) -> Changes | None:
    """The runtime commands that turn ``old`` into ``new``; ``None`` if it takes a reload."""
    if old.structure != new.structure or new.duplicates:
        return None
    added: list[ServerLine] = []
    removed: list[ServerLine] = []
    moved: list[ServerLine] = []
    for section in sorted(set(old.servers) | set(new.servers)):
        before = old.servers.get(section, {})
        after = new.servers.get(section, {})
        for name, server in after.items():
            previous = before.get(name)
            if previous is None:
                added.append(server)
            elif previous.args != server.args:
                return None
            elif (previous.address, previous.port) != (server.address, server.port):
                moved.append(server)
        removed.extend(server for name, server in before.items() if name not in after)
    if added and new.default_server:
        return None
    return Changes(tuple(added), tuple(removed), tuple(moved))


def checked_without_haproxy(candidate: Layout, validated: Layout | None) -> bool:
    """True if ``candidate`` needs no ``haproxy -c``: it differs from a configuration HAProxy
    accepted (``validated``) only in plain server lines whose options that one had too."""
    return (
        validated is not None
        and not candidate.duplicates
        and candidate.structure == validated.structure
        and candidate.args <= validated.args
    )
