"""One readiness check: how an instance is checked, and running that check once.

A check must reach the application itself. A port published by Docker goes through docker-proxy,
which accepts a TCP connection even before the application listens, so a source can name the
application's own network namespace and address (``Source.check_target``); the check then
connects from inside that namespace. A socket stays in the namespace it was made in, so the thread
running a check enters the namespace only for the ``socket()`` call and returns to the agent's
own at once (:func:`socket_in`): nothing else ever runs inside a container's namespace, and no
thread is made per check. Without such a target the published address is dialled, and a TCP
check also waits briefly for the connection to be dropped (what docker-proxy does when nothing
listens behind it).

Between two checks, :class:`ListenProbe` asks the kernel (sock_diag, over a netlink socket made
inside the application's namespace) whether a connection would still find a listener: no
connection, nothing the application sees, a few microseconds. The readiness scheduler uses it to
notice within a fraction of a second that an application stopped listening (docker-proxy keeps
accepting on the published port meanwhile), and confirms with a real check.

Once per instance, after its first good check, :func:`detect_mode` finds whether the application
speaks HTTP/1 (the proxy mode of a service whose containers do not say, core option
``default_mode = "auto"``): it waits briefly for the server to speak first (a banner: SMTP, FTP,
SSH, MySQL...), and only if it said nothing sends the smallest HTTP/1.0 request and reads the
status line. It is made in the application's namespace only, never through a published port.

Check kinds, from the instance's metadata (labels ``SERVICE_CHECK=tcp|http|none``,
``SERVICE_CHECK_HTTP=/path``, ``SERVICE_CHECK_TCP=true``, ``SERVICE_CHECK_INTERVAL=2s``,
``SERVICE_CHECK_TIMEOUT=1s``) or else from the agent's settings (``check``, ``check_path``,
``check_interval``, ``check_timeout``). UDP instances are not checked.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import re
import resource
import socket
import struct
import threading
import time
from dataclasses import dataclass, replace
from typing import Literal, NoReturn

from discoverd.core.durations import parse_duration
from discoverd.core.interfaces import CheckTarget
from discoverd.core.model import ServiceInstance

CheckKind = Literal["tcp", "http", "none"]
CHECK_KINDS: tuple[CheckKind, ...] = ("tcp", "http", "none")

#: How long a TCP check through a forwarder waits for the connection to be dropped.
FORWARDER_GRACE = 0.05

_CLONE_NEWNET = 0x40000000
_libc: ctypes.CDLL | None = None
_home_fd: int | None = None
_home_lock = threading.Lock()


@dataclass(frozen=True)
class CheckSpec:
    """How one instance is checked."""

    kind: CheckKind = "tcp"
    path: str = "/"
    interval: float = 2.0
    timeout: float = 1.0


def spec_for(instance: ServiceInstance, default: CheckSpec) -> CheckSpec:
    """The check of ``instance``: its metadata (already validated by the metadata rules) over
    the agent's defaults."""
    meta = instance.meta_dict
    if instance.protocol != "tcp":
        return replace(default, kind="none")
    spec = default
    if meta.get("check_http"):
        spec = replace(spec, kind="http", path=meta["check_http"])
    elif meta.get("check_tcp", "").lower() in ("1", "true", "yes", "on"):
        spec = replace(spec, kind="tcp")
    kind = meta.get("check", "").lower()
    if kind in CHECK_KINDS:
        spec = replace(spec, kind=kind)
    # Refused earlier by the metadata rules when malformed: the default stays then.
    with contextlib.suppress(ValueError):
        if "check_interval" in meta:
            spec = replace(spec, interval=max(0.05, parse_duration(meta["check_interval"])))
        if "check_timeout" in meta:
            spec = replace(spec, timeout=max(0.05, parse_duration(meta["check_timeout"])))
    return spec


def _setns(fd: int) -> None:
    global _libc
    native = getattr(os, "setns", None)  # Python >= 3.12
    if native is not None:
        native(fd, _CLONE_NEWNET)
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _home() -> int:
    """A descriptor of the agent's own network namespace (opened once)."""
    global _home_fd
    with _home_lock:
        if _home_fd is None:
            _home_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        return _home_fd


def _stranded() -> NoReturn:
    """This thread could not return to the agent's namespace: it never runs anything again."""
    threading.Event().wait()
    raise AssertionError("unreachable")


def socket_in(netns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket made inside the network namespace at ``netns`` (a path such as
    ``/proc/<pid>/ns/net``). The calling thread enters the namespace for the ``socket()`` call
    alone and returns to the agent's own. Raises ``OSError`` when the namespace cannot be
    entered (``ENOENT``: the process is gone; ``EPERM``: not root)."""
    home = _home()
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)
    try:
        return socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
    finally:
        try:
            _setns(home)
        except OSError:  # back to one's own namespace: cannot fail, but never go on inside
            _stranded()


def _connect(address: str, port: int, timeout: float, sock: socket.socket | None) -> socket.socket:
    """A TCP connection to ``address:port``: ``sock`` connected (a socket made inside the
    application's namespace), else a new one from the agent's namespace."""
    if sock is None:
        return socket.create_connection((address, port), timeout=timeout)
    try:
        sock.settimeout(timeout)
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _tcp(
    address: str, port: int, timeout: float, forwarded: bool, sock: socket.socket | None = None
) -> str | None:
    """``None`` when ready, else the reason."""
    try:
        with _connect(address, port, timeout, sock) as sock:
            if not forwarded:
                return None
            # A forwarder that cannot reach the application closes (or resets) at once.
            sock.settimeout(FORWARDER_GRACE)
            try:
                data = sock.recv(1)
            except TimeoutError:
                return None
            except OSError as exc:
                return f"connection dropped: {exc.strerror or exc}"
            return None if data else "connection closed at once (nothing listens behind it)"
    except TimeoutError:
        return f"no connection within {timeout:g}s"
    except OSError as exc:
        return exc.strerror or str(exc)


def _http(
    address: str, port: int, path: str, timeout: float, sock: socket.socket | None = None
) -> str | None:
    host = f"[{address}]" if ":" in address else address
    request = (
        f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n"
        "User-Agent: discoverd-check\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    deadline = time.monotonic() + timeout
    try:
        with _connect(address, port, timeout, sock) as sock:
            sock.sendall(request)
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
    except TimeoutError:
        return f"no HTTP answer within {timeout:g}s"
    except OSError as exc:
        return exc.strerror or str(exc)
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return "no HTTP answer" if not head else f"not an HTTP answer: {status_line[:60]!r}"
    status = int(parts[1])
    return None if 200 <= status < 400 else f"HTTP {status}"


#: What :func:`detect_mode` finds an application speaks: ``http`` (HTTP/1) or ``tcp`` (anything
#: else).
Detected = Literal["http", "tcp"]
#: How long mode detection waits for a server that speaks first (a banner) before it asks.
BANNER_WAIT = 0.15
# The smallest request: HTTP/1.0 needs no Host header (a Redis server takes a "Host:" line for
# a cross-protocol attack, logs it and closes), HEAD has no body, and every line is one an
# inline text protocol (Redis, memcached) answers with a plain error.
_DETECT_REQUEST = b"HEAD / HTTP/1.0\r\nUser-Agent: discoverd-detect\r\n\r\n"
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9](?:[ \r]|$)")
_STATUS_HEAD = b"HTTP/1."
_STATUS_LEN = 13  # "HTTP/1.1 200 " or "HTTP/1.1 200\r"


def detect_mode(
    target: CheckTarget, timeout: float, *, banner_wait: float = BANNER_WAIT
) -> Detected | None:
    """Whether the application at ``target`` speaks HTTP/1: ``"http"``, ``"tcp"``, or ``None``
    when this attempt could not tell (no connection, or not a byte back).

    Careful with servers that are not HTTP: it first waits ``banner_wait`` seconds for the
    server to speak first (SMTP, FTP, SSH, MySQL, POP3... send a banner), which makes it
    ``tcp`` without a byte sent; only a server that said nothing gets ``HEAD / HTTP/1.0``, and
    the first bytes of its answer decide: an HTTP/1 status line (any status) is ``http``,
    anything else (``-ERR unknown command``, a TLS alert, a binary frame) ``tcp``. A server that
    closes or stays silent gives ``None``. Made inside ``target.netns`` when given (raises
    ``OSError`` when the namespace cannot be entered), else from the agent's namespace."""
    sock = None
    if target.netns:
        family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
        sock = socket_in(target.netns, family, socket.SOCK_STREAM)
    try:
        conn = _connect(target.address, target.port, timeout, sock)
    except OSError:
        return None
    with conn:
        try:
            conn.settimeout(banner_wait)
            try:
                first = conn.recv(64)
            except TimeoutError:
                first = None  # silent: it waits for the client, as HTTP servers do
            if first is not None:
                return "tcp" if first else None  # a banner; or closed without a word
            conn.sendall(_DETECT_REQUEST)
            deadline = time.monotonic() + timeout
            head = b""
            while len(head) < _STATUS_LEN:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                conn.settimeout(left)
                try:
                    chunk = conn.recv(_STATUS_LEN - len(head))
                except TimeoutError:
                    break
                if not chunk:
                    break
                head += chunk
                if not _STATUS_HEAD.startswith(head[: len(_STATUS_HEAD)]):
                    return "tcp"  # not the beginning of an HTTP/1 status line
        except OSError:
            return None
    if not head:
        return None
    return "http" if _STATUS_LINE.match(head) else "tcp"


def run_check(spec: CheckSpec, target: CheckTarget, *, forwarded: bool) -> str | None:
    """Run one check; ``None`` when the application is ready, else why it is not.

    ``forwarded`` says the target is a published port (no namespace given), where a TCP
    check must not trust a bare connect."""
    if spec.kind == "none":
        return None

    sock = None
    if target.netns:
        # A namespace that cannot be entered raises here, to the caller (which may fall back
        # to the published port); a connection that fails is a reason, returned.
        family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
        sock = socket_in(target.netns, family, socket.SOCK_STREAM)
    if spec.kind == "http":
        return _http(target.address, target.port, spec.path, spec.timeout, sock)
    return _tcp(target.address, target.port, spec.timeout, forwarded and sock is None, sock)


# sock_diag (linux/sock_diag.h, linux/inet_diag.h): the kernel looks a socket up.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLMSG_ERROR = 2
_TCP_LISTEN = 10
_NO_COOKIE = 0xFFFFFFFF
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
# inet_diag_req_v2: family, protocol, extensions, pad, states, then inet_diag_sockid: source
# port and destination port (network order), source and destination addresses, interface,
# cookie.
_DIAG_REQUEST = struct.Struct("=BBBBI2s2s16s16s")
_SOCKID_TAIL = struct.Struct("=III")  # interface, cookie (two halves)
_DIAG_STATE = struct.Struct("=BB")  # inet_diag_msg: family, state


def _held_budget() -> int:
    """How many netlink sockets the listen probes may keep open: a quarter of the process's
    descriptor limit (256 of the usual 1,024), so that probes never starve the rest."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else max(0, soft // 4)


class ListenProbe:
    """Whether a TCP connection to ``address:port`` inside the network namespace ``netns``
    would find a listener, asked of the kernel without connecting: a sock_diag lookup of that
    address and port as an incoming connection's, so the same listeners match as for a real
    one (bound to that address or to the wildcard address, an IPv6 wildcard one without
    ``IPV6_V6ONLY`` for IPv4), in constant time whatever else the namespace or the host has.

    The netlink socket is made inside the namespace (:func:`socket_in`); a socket stays in the
    namespace it was made in, so each :meth:`listening` is a plain request and answer from any
    thread. Probes keep their socket open (about 6 microseconds a question) while the probes
    of this process hold fewer than :func:`_held_budget` of them; beyond, a probe makes one per
    question (about 25 microseconds). A kept socket holds the namespace open: :meth:`close` the
    probe when the instance goes. Raises ``OSError`` when the namespace cannot be entered or the
    kernel cannot answer."""

    _held = 0
    _held_lock = threading.Lock()

    def __init__(self, netns: str, address: str, port: int, timeout: float = 1.0) -> None:
        ip = ipaddress.ip_address(address)
        self.address, self.port = ip, port
        self._netns, self._timeout = netns, timeout
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        # Looked up as the destination of a connection from 0.0.0.0:0, which matches no
        # established connection: only a listener can answer.
        request = _DIAG_REQUEST.pack(
            family,
            socket.IPPROTO_TCP,
            0,
            0,
            1 << _TCP_LISTEN,
            port.to_bytes(2, "big"),
            b"",
            ip.packed,
            b"",
        ) + _SOCKID_TAIL.pack(0, _NO_COOKIE, _NO_COOKIE)
        self._request = request
        self._sequence = 0
        self._sock: socket.socket | None = None
        with ListenProbe._held_lock:
            keep = ListenProbe._held < _held_budget()
            if keep:
                ListenProbe._held += 1
        try:
            if keep:
                self._sock = self._open()
            self.listening()  # fails here if the kernel cannot answer
        except BaseException:
            if keep:
                self.close()
            raise

    @property
    def kept(self) -> bool:
        """True if this probe keeps its socket open."""
        return self._sock is not None

    def listening(self) -> bool:
        """True if a listener would take the connection now. Raises ``OSError`` if the
        namespace is gone (a probe without a kept socket) or the kernel fails."""
        if self._sock is not None:
            return self._ask(self._sock)
        with self._open() as sock:
            return self._ask(sock)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            with ListenProbe._held_lock:
                ListenProbe._held -= 1

    def _open(self) -> socket.socket:
        sock = socket_in(self._netns, socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
        sock.settimeout(self._timeout)
        return sock

    def _ask(self, sock: socket.socket) -> bool:
        self._sequence += 1
        header = _NLMSG_HEADER.pack(
            _NLMSG_HEADER.size + len(self._request),
            _SOCK_DIAG_BY_FAMILY,
            _NLM_F_REQUEST,
            self._sequence,
            0,
        )
        sock.send(header + self._request)
        while True:
            data = sock.recv(8192)
            if len(data) < _NLMSG_HEADER.size:
                raise OSError("sock_diag: short answer")
            _length, kind, _flags, sequence, _pid = _NLMSG_HEADER.unpack_from(data)
            if sequence != self._sequence:
                continue  # the answer to an earlier request that timed out
            body = _NLMSG_HEADER.size
            if kind == _NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, body)
                if code in (0, -errno.ENOENT):
                    return False  # no such socket
                raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
            if kind != _SOCK_DIAG_BY_FAMILY or len(data) < body + _DIAG_STATE.size:
                raise OSError("sock_diag: unexpected answer")
            _family, state = _DIAG_STATE.unpack_from(data, body)
            return bool(state == _TCP_LISTEN)
