"""Which frontend ports another process holds: the probe behind ``Proxy.unservable``.

A proxy's checker (``haproxy -c``, ``nginx -t``) binds nothing, so a frontend port another
program holds passes it and fails only the reload, where HAProxy pauses every listener for
about 2 s while it retries. :func:`held_ports` asks first: it binds each port the way the proxy
will, on the same address, and closes the socket at once. For a port in use it then finds the
socket (``sock_diag``, else ``/proc/net``) and the process holding it (``/proc/<pid>/fd``), so
that the reason can name it, and so that the proxy's own sockets are not reported.

- tcp is probed with ``SO_REUSEADDR``, as HAProxy and nginx bind their listeners: a connection
  left in TIME_WAIT does not hold a port. Without ``SO_REUSEPORT``: a process sharing a port
  with the proxy that way still holds it.
- udp is probed without ``SO_REUSEADDR``: any other socket on the port holds it (nginx would
  otherwise share the port with it and lose datagrams to it).
- The wildcard address (``""``) overlaps every address: a process bound to 127.0.0.1:P holds P
  for a wildcard frontend, and a dual-stack ``[::]:P`` socket holds P for IPv4 too.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from discoverd.proxykit.supervise import child_pids

__all__ = ["HeldPort", "OwnPage", "held_ports"]

log = logging.getLogger(__name__)

_PROTOCOLS = {"tcp": (socket.SOCK_STREAM, socket.IPPROTO_TCP), "udp": (socket.SOCK_DGRAM, 17)}
# sock_diag (linux/sock_diag.h, linux/inet_diag.h)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_NLMSG_HEADER = struct.Struct("=IHHII")
_DIAG_MESSAGE_SIZE = 72  # struct inet_diag_msg


@dataclass(frozen=True)
class HeldPort:
    """A port the proxy could not bind now: held by another process, or (``privileged``) one
    only root or ``CAP_NET_BIND_SERVICE`` may bind. ``pid`` and ``command`` name the holder
    when ``/proc`` tells (as root, or for a process of discoverd's own user), ``uid`` is the
    socket's owner when known."""

    port: int
    protocol: str = "tcp"
    pid: int | None = None
    command: str = ""
    uid: int | None = None
    privileged: bool = False

    def describe(self, label: str = "port") -> str:
        """One line: ``frontend port 8000 is held by another process (python3, pid 4242)``."""
        where = f"{label} {self.port}" + ("/udp" if self.protocol == "udp" else "")
        if self.privileged:
            return f"{where} can only be bound with root or CAP_NET_BIND_SERVICE"
        if self.pid is not None:
            return f"{where} is held by another process ({self.command or '?'}, pid {self.pid})"
        if self.uid is not None:  # a listening socket of a process discoverd may not look into
            return f"{where} is held by another process (uid {self.uid})"
        return f"{where} is in use by a socket no process listens on (e.g. a connection closing)"


class OwnPage:
    """A page the proxy serves for itself on a port of its own (HAProxy's stats page, nginx's
    status page), which no service needs: another process holding that port must not keep the
    services from being served. A proxy refuses to start, or to reload, when one of its
    listeners cannot bind, so the configuration leaves the page out while its port is held.

    :meth:`wanted` says whether the next configuration has the page: yes when it is enabled
    (``port`` > 0) and the running proxy already holds the port (``running_binds``), or when
    the port is free (:func:`held_ports`, on ``address``; the running proxy's master and its
    children do not count). A held port is said once at warning level (``reason`` keeps it)
    and probed again at most every ``recheck`` seconds, so the renders of one pass agree; once
    it is free the page is back from the next configuration (the next change, or the core's
    periodic pass), and that is said too. ``label`` names the port in messages (``"stats
    port"``).
    """

    def __init__(
        self,
        proxy: str,
        label: str,
        address: str,
        port: int,
        *,
        recheck: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proxy = proxy
        self.label = label
        self.address = address
        self.port = port
        self.recheck = recheck
        self._clock = clock
        #: Why the page is left out now (the held port, described), or ``None``.
        self.reason: str | None = None
        self._probe_after = 0.0

    def wanted(
        self,
        *,
        master: int | None = None,
        running_binds: bool = False,
        executable: str | None = None,
    ) -> bool:
        """Whether the next configuration has the page (see the class). ``master``: the
        running proxy's master process, if one runs (it and its children never count as
        another process); ``executable``: the proxy's binary, as for :func:`held_ports` (a
        privileged port it may bind)."""
        if not self.port:
            return False
        if running_binds:
            self._settle(None)
            return True
        now = self._clock()
        if self.reason is not None and now < self._probe_after:
            return False
        owners = {master, *child_pids(master)} if master is not None else set()
        held = held_ports(self.address, (self.port,), "tcp", owners=owners, executable=executable)
        found = held.get(self.port)
        self._settle(found.describe(self.label) if found is not None else None)
        self._probe_after = now + self.recheck
        return self.reason is None

    def _settle(self, reason: str | None) -> None:
        if reason == self.reason:
            return
        if reason is not None:
            log.warning(
                "%s: %s: the page is left out of the configuration until the port is free "
                "(every service is still served)",
                self.proxy,
                reason,
            )
        else:
            log.warning(
                "%s: %s %d is free: the page is back from the next configuration",
                self.proxy,
                self.label,
                self.port,
            )
        self.reason = reason


@dataclass(frozen=True)
class _Socket:
    port: int
    address: str
    uid: int
    inode: int


def held_ports(
    address: str,
    ports: Iterable[int],
    protocol: str = "tcp",
    *,
    owners: Collection[int] = (),
    v6only: bool | None = None,
    executable: str | None = None,
) -> dict[int, HeldPort]:
    """The ``ports`` the proxy could not bind on ``address`` now, each with its holder.

    ``address`` is the frontend's bind address (``""``: every IPv4 interface, as HAProxy's
    ``*`` and nginx's bare port). ``protocol`` is ``"tcp"`` or ``"udp"``. A port held only by
    the processes ``owners`` (the running proxy's master and workers) is not reported.
    ``v6only`` sets ``IPV6_V6ONLY`` on an IPv6 probe as the proxy sets it on its listener
    (``None``: the system's default; nginx sets it, HAProxy does not).

    A port discoverd itself may not bind (``EACCES``: below
    ``net.ipv4.ip_unprivileged_port_start`` without root) is reported as ``privileged``, unless
    ``executable`` (the proxy's binary) has file capabilities: the proxy may then be allowed
    what discoverd is not. Other errors (an address this host does not have) are left to the
    proxy to report. Cheap: one bind per port; ``/proc`` is read only for ports in use."""
    if protocol not in _PROTOCOLS:
        raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")
    family, host = _probe_address(address)
    in_use: list[int] = []
    denied: list[int] = []
    for port in sorted(set(ports)):
        code = _bind_error(family, host, port, protocol, v6only)
        if code == errno.EADDRINUSE:
            in_use.append(port)
        elif code in (errno.EACCES, errno.EPERM):
            denied.append(port)
    found: dict[int, HeldPort] = {}
    if denied and not _has_file_capabilities(executable):
        found.update({port: HeldPort(port, protocol, privileged=True) for port in denied})
    if not in_use:
        return found
    by_port: dict[int, list[_Socket]] = {}
    for entry in _sockets(protocol, set(in_use)):
        if _overlaps(entry.address, host):
            by_port.setdefault(entry.port, []).append(entry)
    inodes = {entry.inode for entries in by_port.values() for entry in entries}
    own = set(_socket_holders(inodes, owners)) if owners else set()
    strangers = _socket_holders(inodes - own, exclude=owners)
    for port in in_use:
        entries = by_port.get(port, [])
        if entries and all(entry.inode in own for entry in entries):
            continue  # the proxy's own listener
        other = next((e for e in entries if e.inode not in own and e.inode in strangers), None)
        other = other or next((e for e in entries if e.inode not in own), None)
        pid = strangers.get(other.inode) if other is not None else None
        found[port] = HeldPort(
            port,
            protocol,
            pid=pid,
            command=_command(pid) if pid is not None else "",
            uid=other.uid if other is not None else None,
        )
    return dict(sorted(found.items()))


def _socket_holders(
    inodes: Collection[int],
    pids: Iterable[int] | None = None,
    *,
    exclude: Collection[int] = (),
) -> dict[int, int]:
    """Which process holds each socket of ``inodes`` (as ``ss -p`` finds it: the links in
    ``/proc/<pid>/fd``), as {inode: pid}; only among ``pids`` when given, never among
    ``exclude``. Processes whose descriptors cannot be read (another user's, without root)
    are skipped."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    found: dict[int, int] = {}
    if not wanted:
        return found
    for pid in _all_pids() if pids is None else pids:
        if pid in exclude:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                inode = wanted.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if inode is not None:
                found.setdefault(inode, pid)
        if len(found) == len(wanted):
            break
    return found


def _all_pids() -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    except OSError:
        return []


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _probe_address(address: str) -> tuple[socket.AddressFamily, str]:
    if not address:
        return socket.AF_INET, "0.0.0.0"
    parsed = ipaddress.ip_address(address)
    family = socket.AF_INET6 if parsed.version == 6 else socket.AF_INET
    return family, str(parsed)


def _bind_error(
    family: socket.AddressFamily, host: str, port: int, protocol: str, v6only: bool | None
) -> int:
    """0 if ``host:port`` can be bound now, else the errno."""
    kind, _ = _PROTOCOLS[protocol]
    try:
        with socket.socket(family, kind) as probe:
            if protocol == "tcp":
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and v6only is not None:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            probe.bind((host, port))
    except OSError as exc:
        return exc.errno or -1
    return 0


def _has_file_capabilities(executable: str | None) -> bool:
    if not executable:
        return False
    try:
        return bool(os.getxattr(os.path.realpath(executable), "security.capability"))
    except OSError:
        return False


def _overlaps(held: str, probe: str) -> bool:
    """Whether a socket bound to ``held`` can keep the probe's address from being bound."""
    a, b = ipaddress.ip_address(held), ipaddress.ip_address(probe)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a.is_unspecified or b.is_unspecified or a == b


def _sockets(protocol: str, ports: set[int]) -> list[_Socket]:
    """The listening tcp sockets (or every udp socket) on ``ports``, both address families."""
    _, number = _PROTOCOLS[protocol]
    found: list[_Socket] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            entries = _diag(family, number, protocol)
        except OSError:
            entries = _proc_net(family, protocol)
        found.extend(entry for entry in entries if entry.port in ports)
    return found


def _diag(family: int, number: int, protocol: str) -> list[_Socket]:
    """A ``sock_diag`` dump (the kernel filters by state: listening sockets only for tcp)."""
    states = 1 << _TCP_LISTEN if protocol == "tcp" else 0xFFFFFFFF
    request = struct.pack("=BBBBI", family, number, 0, 0, states) + bytes(48)
    header = _NLMSG_HEADER.pack(
        _NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
    )
    found: list[_Socket] = []
    size = 4 if family == socket.AF_INET else 16
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as link:
        link.settimeout(2.0)
        link.sendto(header + request, (0, 0))
        while True:
            data = link.recv(1 << 16)
            if not data:
                return found
            offset = 0
            while offset + _NLMSG_HEADER.size <= len(data):
                length, kind = _NLMSG_HEADER.unpack_from(data, offset)[:2]
                if length < _NLMSG_HEADER.size:
                    return found
                body = offset + _NLMSG_HEADER.size
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, body)[0]
                    raise OSError(code, os.strerror(code))
                if length - _NLMSG_HEADER.size >= _DIAG_MESSAGE_SIZE:
                    port = struct.unpack_from("!H", data, body + 4)[0]
                    raw = data[body + 8 : body + 8 + size]
                    uid, inode = struct.unpack_from("=II", data, body + 64)
                    host = str(ipaddress.ip_address(raw))
                    found.append(_Socket(port, host, uid, inode))
                offset += (length + 3) & ~3


def _proc_net(family: int, protocol: str) -> list[_Socket]:
    """The same from ``/proc/net/{tcp,udp}[6]`` (slower: it lists every connection)."""
    name = f"/proc/net/{protocol}{'6' if family == socket.AF_INET6 else ''}"
    found: list[_Socket] = []
    with contextlib.suppress(OSError), open(name) as table:
        next(table, None)
        for line in table:
            fields = line.split()
            if len(fields) < 10 or (protocol == "tcp" and fields[3] != "0A"):
                continue
            local, _, port = fields[1].partition(":")
            raw = bytes.fromhex(local)
            if sys.byteorder == "little":  # each 32-bit word is in the host's byte order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            address = str(ipaddress.ip_address(raw))
            found.append(_Socket(int(port, 16), address, int(fields[7]), int(fields[9])))
    return found
