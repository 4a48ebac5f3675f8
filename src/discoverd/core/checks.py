"""One readiness check: how an instance is checked, and running that check once.

A check must reach the application itself. A port published by Docker goes through docker-proxy,
which accepts a TCP connection even before the application listens, so a source can name the
application's own network namespace and address (``Source.check_target``); the check then
connects from inside that namespace, in a thread of its own that is thrown away afterwards.
Without such a target the published address is dialled, and a TCP check also waits briefly for
the connection to be dropped (what docker-proxy does when nothing listens behind it).

Check kinds, from the instance's metadata (labels ``SERVICE_CHECK=tcp|http|none``,
``SERVICE_CHECK_HTTP=/path``, ``SERVICE_CHECK_TCP=true``, ``SERVICE_CHECK_INTERVAL=2s``,
``SERVICE_CHECK_TIMEOUT=1s``) or else from the agent's settings (``check``, ``check_path``,
``check_interval``, ``check_timeout``). UDP instances are not checked.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from discoverd.core.durations import parse_duration
from discoverd.core.interfaces import CheckTarget
from discoverd.core.model import ServiceInstance

CheckKind = Literal["tcp", "http", "none"]
CHECK_KINDS: tuple[CheckKind, ...] = ("tcp", "http", "none")

#: How long a TCP check through a forwarder waits for the connection to be dropped.
FORWARDER_GRACE = 0.05

_CLONE_NEWNET = 0x40000000


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
    native = getattr(os, "setns", None)  # Python >= 3.12
    if native is not None:
        native(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _in_netns(path: str, body: Callable[[], str | None], timeout: float) -> str | None:
    """Run ``body`` in a fresh thread that has joined the network namespace at ``path``.

    The namespace is a per-thread attribute: the thread is thrown away afterwards so no other
    code ever runs inside the container's namespace."""
    outcome: dict[str, str | BaseException | None] = {}

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            outcome["result"] = body()
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="discoverd-check-netns", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        return f"no answer within {timeout:g}s"
    error = outcome.get("error")
    if isinstance(error, BaseException):
        raise error
    result = outcome.get("result")
    return result if isinstance(result, str) else None


def _tcp(address: str, port: int, timeout: float, forwarded: bool) -> str | None:
    """``None`` when ready, else the reason."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
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


def _http(address: str, port: int, path: str, timeout: float) -> str | None:
    host = f"[{address}]" if ":" in address else address
    request = (
        f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n"
        "User-Agent: discoverd-check\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
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


def run_check(spec: CheckSpec, target: CheckTarget, *, forwarded: bool) -> str | None:
    """Run one check; ``None`` when the application is ready, else why it is not.

    ``forwarded`` says the target is a published port (no namespace given), where a TCP
    check must not trust a bare connect."""
    if spec.kind == "none":
        return None

    def body() -> str | None:
        if spec.kind == "http":
            return _http(target.address, target.port, spec.path, spec.timeout)
        return _tcp(target.address, target.port, spec.timeout, forwarded and not target.netns)

    if target.netns:
        return _in_netns(target.netns, body, spec.timeout)
    return body()
