"""A rendered configuration split into its structure and its server lines (pure, no I/O).

The runtime API can add, remove and move servers, but nothing else. So a candidate configuration
is compared with the one HAProxy runs in two parts:

- the *server lines* of ``backend`` and ``listen`` sections that have the plain shape
  ``server <name> <ip>:<port> <options>``, with a name, an address and options made of characters
  that cannot escape a command of the runtime API;
- the *structure*: every other line, in order (a server line of another shape stays here).

A server's options are those of the ``default-server`` lines of its section that come before it,
then its own (HAProxy reads them in that order, a later one overriding an earlier one): HAProxy
2.6 does not apply ``default-server`` to a server added at run time, so the command that adds it
spells them out. A ``default-server`` line elsewhere (a ``defaults`` section) or with other
characters cannot be spelled out so: servers are then added by a reload.

When the structures are equal and every common server kept its options, the difference is a set of
runtime commands (:func:`runtime_changes`); otherwise it takes a reload.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping, Sequence
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
        """True if the server has health checks: ``check`` comes after any ``no-check`` (a
        server line may turn off what its ``default-server`` line turned on)."""
        return _last_says(self.args, "check", "no-check")

    @property
    def agent_checked(self) -> bool:
        return _last_says(self.args, "agent-check", "no-agent-check")

    @property
    def runtime_args(self) -> str:
        """``args`` as ``add server`` takes them: HAProxy 2.6 refuses ``no-check`` and
        ``no-agent-check`` there, and a server added at run time has no checks unless asked,
        so a check the line turns off is left out with what turns it off."""
        words = self.args.split()
        if "no-check" not in words and "no-agent-check" not in words:
            return self.args
        drop = {"no-check", "no-agent-check"}
        if not self.checked:
            drop.add("check")
        if not self.agent_checked:
            drop.add("agent-check")
        return " ".join(word for word in words if word not in drop)


#: Server options HAProxy checks wholly where they are written, with the number of values each
#: takes: a default-server line made of these alone gives a server nothing left to check
#: (others are checked only on a server: ``agent-check`` needs a port, ``track`` a server,
#: ``ssl`` a CA file...).
_CHECKED_ALONE = {
    "check": 0,
    "inter": 1,
    "fastinter": 1,
    "downinter": 1,
    "rise": 1,
    "fall": 1,
    "observe": 1,
    "error-limit": 1,
    "on-error": 1,
    "on-marked-down": 1,
    "on-marked-up": 1,
    "weight": 1,
    "maxconn": 1,
    "minconn": 1,
    "maxqueue": 1,
    "slowstart": 1,
}


def _checked_alone(options: str) -> bool:
    """Whether ``options`` holds only keywords of ``_CHECKED_ALONE``, each with its values."""
    words = options.split()
    i = 0
    while i < len(words):
        count = _CHECKED_ALONE.get(words[i])
        if count is None:
            return False
        i += 1 + count
    return i == len(words)


def _last_says(args: str, on: str, off: str) -> bool:
    """Whether the last of the flags ``on`` and ``off`` in ``args`` is ``on``."""
    for word in reversed(args.split()):
        if word == on:
            return True
        if word == off:
            return False
    return False


@dataclass(frozen=True)
class ConfigSplit:
    """A configuration as :func:`split_config` splits it."""

    structure: str
    servers: Mapping[str, Mapping[str, ServerLine]]
    #: A server name used twice in a section (``haproxy -c`` must judge such a candidate).
    duplicates: bool = False
    #: A ``default-server`` line whose options the server lines do not carry (outside a
    #: ``backend`` or ``listen`` section, or not plain): HAProxy 2.6 does not apply it to servers
    #: added at run time, so such a server would differ from the same line loaded from the file.
    default_server: bool = False
    #: The (section, options) of every server line, and of the options each ``default-server``
    #: line leaves in effect when HAProxy checks all of them on that line (``_CHECKED_ALONE``):
    #: the first server of an empty backend then has options already checked there. Options
    #: HAProxy accepted in one backend may be refused in another (``track <server>`` names a
    #: server of the backend it is written in).
    args: frozenset[tuple[str, str]] = field(default=frozenset())

    def count(self) -> int:
        return sum(len(servers) for servers in self.servers.values())


@dataclass(frozen=True)
class Changes:
    """What the runtime API must do to go from one split to the next."""

    added: tuple[ServerLine, ...] = ()
    removed: tuple[ServerLine, ...] = ()
    moved: tuple[ServerLine, ...] = ()  # same name and options, new address or port

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.moved)


@functools.lru_cache(maxsize=1 << 15)
def _server_line(section: str, line: str, defaults: str = "") -> ServerLine | None:
    """The plain server line ``line`` is, its options after ``defaults`` (those of the
    section's ``default-server`` lines before it), or ``None`` if it has another shape. Cached:
    from one candidate to the next nearly every server line is the same."""
    fields = line.split()
    if len(fields) < 3 or not _NAME_RE.fullmatch(fields[1]):
        return None
    match = _ENDPOINT_RE.fullmatch(fields[2])
    if match is None:
        return None
    text = match.group(1) or match.group(2)
    port = int(match.group(3))
    address = _address(text)
    if address is None:
        return None
    if (address[0] == 6) != (match.group(1) is not None) or not 0 < port < 65536:
        return None
    args = " ".join(fields[3:])
    if not _ARGS_RE.fullmatch(args):
        return None
    if defaults:
        args = f"{defaults} {args}" if args else defaults
    return ServerLine(section, fields[1], address[1], port, args)


@functools.lru_cache(maxsize=1 << 12)
def _address(text: str) -> tuple[int, str] | None:
    """(IP version, normalised text) of an address, ``None`` if it is not one. Cached: the
    servers of a configuration share few addresses (one per host)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address.version, str(address)


@dataclass(frozen=True)
class Piece:
    """A part of a configuration (whole lines) split like :func:`split_config` splits the whole;
    :func:`join_pieces` puts the parts of a configuration back together into its split.

    How a part splits depends on the section it starts in (and on that section's
    ``default-server`` options so far) only when a ``server`` or ``default-server`` line comes
    before its first section keyword (``uses_start``).
    """

    structure: str  # its structure lines, joined by "\n"
    lines: int  # how many structure lines (0: none; a structure of one empty line is 1)
    servers: Mapping[str, Mapping[str, ServerLine]]
    other_names: Mapping[str, frozenset[str]]  # names of server lines kept in the structure
    duplicates: bool
    default_server: bool
    args: frozenset[tuple[str, str]]
    start: str  # the section it was split in at its first line
    end: str | None  # the section at its end; None: the one it started in
    uses_start: bool
    start_defaults: str = ""  # the start section's default-server options before its first line
    end_defaults: str = ""  # those of the section at its end, after its last line


def parse_piece(text: str, section: str = "", defaults: str = "") -> Piece:
    """Split the whole lines of ``text``, starting inside ``section`` ("" outside a backend),
    whose ``default-server`` lines so far gave the options ``defaults``."""
    start, start_defaults = section, defaults
    structure: list[str] = []
    servers: dict[str, dict[str, ServerLine]] = {}
    other_names: dict[str, set[str]] = {}  # server names of lines kept in the structure
    duplicates = default_server = uses_start = False
    keyword_seen = False
    args: set[tuple[str, str]] = set()
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            structure.append(line)
            continue
        keyword = fields[0]
        if keyword in _SECTIONS:
            keyword_seen = True
            named = keyword in ("backend", "listen") and len(fields) == 2
            section = fields[1] if named and _NAME_RE.fullmatch(fields[1]) else ""
            defaults = ""
        elif keyword == "default-server":
            uses_start = uses_start or not keyword_seen
            options = " ".join(fields[1:])
            if not section or not _ARGS_RE.fullmatch(options):
                default_server = True
            elif options:
                defaults = f"{defaults} {options}" if defaults else options
                if _checked_alone(defaults):
                    args.add((section, defaults))
        elif keyword == "server":
            uses_start = uses_start or not keyword_seen
            if section:
                server = _server_line(section, line, defaults)
                if server is not None:
                    own = servers.setdefault(section, {})
                    if server.name in own:
                        duplicates = True
                    own[server.name] = server
                    continue
                if len(fields) > 1:
                    other_names.setdefault(section, set()).add(fields[1])
        structure.append(line)
    return Piece(
        structure="\n".join(structure),
        lines=len(structure),
        servers=servers,
        other_names={name: frozenset(names) for name, names in other_names.items()},
        duplicates=duplicates,
        default_server=default_server,
        args=frozenset(
            args.union((s.section, s.args) for own in servers.values() for s in own.values())
        ),
        start=start,
        end=section if keyword_seen else None,
        uses_start=uses_start,
        start_defaults=start_defaults,
        end_defaults=defaults,
    )


def join_pieces(pieces: Sequence[Piece]) -> ConfigSplit:
    """The split of a configuration made of ``pieces`` (in order, each split in the section, and
    with the ``default-server`` options, the previous one ended in). The servers of a section
    that one piece holds are that piece's own mapping (not a copy): :func:`runtime_changes`
    skips those that are the same object."""
    servers: dict[str, Mapping[str, ServerLine]] = {}
    other_names: dict[str, set[str]] = {}
    duplicates = default_server = False
    for piece in pieces:
        duplicates = duplicates or piece.duplicates
        default_server = default_server or piece.default_server
        for section, own in piece.servers.items():
            earlier = servers.get(section)
            if earlier is None:
                servers[section] = own
                continue
            if not own.keys().isdisjoint(earlier):
                duplicates = True
            servers[section] = {**earlier, **own}
        for section, names in piece.other_names.items():
            other_names.setdefault(section, set()).update(names)
    for section, kept in other_names.items():
        if not kept.isdisjoint(servers.get(section, {})):
            duplicates = True
    structure = "\n".join(piece.structure for piece in pieces if piece.lines)
    args: set[tuple[str, str]] = set()
    for piece in pieces:
        args |= piece.args
    return ConfigSplit(structure, servers, duplicates, default_server, frozenset(args))


def split_config(text: str) -> ConfigSplit:
    """Split ``text`` into structure and plain server lines."""
    return join_pieces([parse_piece(text)])


def runtime_changes(old: ConfigSplit, new: ConfigSplit) -> Changes | None:
    """The runtime commands that turn ``old`` into ``new``; ``None`` if it takes a reload."""
    if old.structure != new.structure or new.duplicates:
        return None
    added: list[ServerLine] = []
    removed: list[ServerLine] = []
    moved: list[ServerLine] = []
    for section in sorted(set(old.servers) | set(new.servers)):
        before = old.servers.get(section, {})
        after = new.servers.get(section, {})
        if before is after:
            continue  # the same piece of the same cached section: nothing changed
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


def checked_without_haproxy(candidate: ConfigSplit, accepted: ConfigSplit | None) -> bool:
    """True if ``candidate`` needs no ``haproxy -c``: it differs from a configuration HAProxy
    accepted (``accepted``: the one confirmed running) only in plain server lines whose options
    that one had too, in the same backend."""
    return (
        accepted is not None
        and not candidate.duplicates
        and candidate.structure == accepted.structure
        and candidate.args <= accepted.args
    )
