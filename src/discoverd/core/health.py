"""Ready before routed: the register role checks an instance before it registers it.

Like nerve, discoverd registers an instance only once its application answers, and keeps
checking it: an instance that stops answering leaves the registry, one that answers again
returns. A check must reach the application itself. A port published by Docker goes through
docker-proxy, which accepts a TCP connection even before the application listens, so a source
can name the application's own network namespace and address (``Source.check_target``); the
check then connects from inside that namespace. Without such a target the published address is
dialled, and a TCP check also waits briefly for the connection to be dropped (what docker-proxy
does when nothing listens behind it).

Check kinds, from the instance's metadata (labels ``SERVICE_CHECK=tcp|http|none``,
``SERVICE_CHECK_HTTP=/path``, ``SERVICE_CHECK_TCP=true``, ``SERVICE_CHECK_INTERVAL=2s``,
``SERVICE_CHECK_TIMEOUT=1s``) or else from the agent's settings (``check``, ``check_path``,
``check_interval``, ``check_timeout``). UDP instances are not checked.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal

from discoverd.core.interfaces import CheckTarget
from discoverd.core.model import ServiceInstance, ValidationError

log = logging.getLogger("discoverd.health")

CheckKind = Literal["tcp", "http", "none"]
CHECK_KINDS: tuple[CheckKind, ...] = ("tcp", "http", "none")

#: A ready instance leaves after this many failed checks in a row (one failure may be a blip).
FALL = 2
#: While an instance has never been ready, checks repeat at least this often (a slow starter
#: becomes routable within this long of listening), starting fast and doubling.
FIRST_RETRY = 0.02
NOT_READY_MAX = 0.5
#: The longest the register role's first pass waits for the first check of every instance.
FIRST_PASS_MAX = 3.0
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


def parse_duration(text: str) -> float:
    """``"10s"``, ``"500ms"``, ``"1m"``, ``"2.5"`` (seconds) -> seconds; ``ValueError`` if not."""
    value = text.strip().lower()
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if value.endswith(suffix):
            number, scale = value[: -len(suffix)], factor
            break
    else:
        number, scale = value, 1.0
    try:
        seconds = float(number) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (e.g. 10s, 500ms, 1m)") from None
    if not (0 <= seconds < 86400) or seconds != seconds:
        raise ValueError(f"{text!r} is not a duration between 0 and 24h")
    return seconds


def format_seconds(seconds: float) -> str:
    """A duration as the shortest decimal string of seconds (``10``, ``0.5``)."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".") or "0"


def check_path(path: str) -> str:
    """An HTTP check path: absolute, printable ASCII without spaces."""
    if not (path.startswith("/") and len(path) <= 200 and path.isascii() and path.isprintable()):
        raise ValidationError(f"check path {path[:40]!r} must start with / (printable ASCII)")
    if any(c.isspace() for c in path):
        raise ValidationError(f"check path {path[:40]!r} must not contain spaces")
    return path


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


# -- running one check


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


# -- keeping every instance checked


@dataclass
class _State:
    instance: ServiceInstance
    spec: CheckSpec
    target: CheckTarget | None
    ready: bool = False
    checked: bool = False
    failures: int = 0
    due: float = 0.0
    retry: float = FIRST_RETRY
    running: Future[str | None] | None = None
    reason: str = ""


class Readiness:
    """Checks the instances the register role wants, and says which are ready.

    ``update`` hands over the desired instances after each snapshot and returns the ids that
    are ready now. Checks run in a worker pool driven by one scheduler thread; a change of
    readiness calls ``notify`` so the register role reconciles again.
    """

    def __init__(
        self,
        default: CheckSpec,
        target_of: Callable[[ServiceInstance], CheckTarget | None],
        notify: Callable[[str], None],
        *,
        workers: int = 16,
    ) -> None:
        self.default = default
        self._target_of = target_of
        self._notify = notify
        self._states: dict[str, _State] = {}
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="discoverd-check")
        self._stopped = False
        self._thread = threading.Thread(
            target=self._schedule, name="discoverd-register-checks", daemon=True
        )
        self._thread.start()
        self._netns_failed = False

    def update(
        self,
        desired: Mapping[str, ServiceInstance],
        first_wait: float,
        check_all_within: float = 0.0,
    ) -> set[str]:
        """Track ``desired``; wait up to ``first_wait`` seconds for new instances to answer
        (a container usually listens within milliseconds of its start event, and registering
        it in this pass saves a whole round); return the ids of the ready ones."""
        now = time.monotonic()
        fresh: list[str] = []
        with self._cond:
            for iid in list(self._states):
                if iid not in desired:
                    del self._states[iid]
            for iid, instance in desired.items():
                spec = spec_for(instance, self.default)
                state = self._states.get(iid)
                target = self._target_of(instance)
                if state is None or state.spec != spec or state.instance != instance:
                    kept = (
                        state is not None
                        and state.ready
                        and state.instance.endpoint == (instance.endpoint)
                    )
                    state = _State(instance, spec, target, ready=kept, checked=kept, due=now)
                    self._states[iid] = state
                    if spec.kind == "none":
                        state.ready = state.checked = True
                    elif not kept:
                        fresh.append(iid)
                else:
                    state.target = target
            self._cond.notify_all()
            # Wait for the new instances to answer, up to ``first_wait``; and, with
            # ``check_all_within`` (the agent's first pass on a busy host), until each was
            # checked once, so they are registered in this pass rather than one at a time.
            deadline = now + first_wait
            hard_deadline = now + max(first_wait, check_all_within)
            while fresh and not self._stopped:
                states = [self._states[i] for i in fresh if i in self._states]
                unchecked = any(not st.checked for st in states)
                not_ready = any(not st.ready for st in states)
                now_ = time.monotonic()
                if unchecked and now_ < hard_deadline:
                    self._cond.wait(hard_deadline - now_)
                elif not_ready and now_ < deadline:
                    self._cond.wait(deadline - now_)
                else:
                    break
            return {iid for iid, state in self._states.items() if state.ready}

    def reason(self, iid: str) -> str:
        with self._cond:
            state = self._states.get(iid)
            return state.reason if state is not None else ""

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _schedule(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                next_due = now + 5.0
                for iid, state in self._states.items():
                    if state.running is not None or state.spec.kind == "none":
                        continue
                    if state.due <= now:
                        future = self._pool.submit(self._check, state)
                        state.running = future
                        future.add_done_callback(functools.partial(self._done, iid, state))
                    else:
                        next_due = min(next_due, state.due)
                self._cond.wait(max(0.001, next_due - now))

    def _check(self, state: _State) -> str | None:
        target = state.target
        forwarded = target is None
        if target is None:
            target = CheckTarget(state.instance.address, state.instance.port)
        try:
            return run_check(state.spec, target, forwarded=forwarded)
        except OSError as exc:
            if target.netns and exc.errno in (errno.EPERM, errno.ENOENT, errno.EACCES):
                if not self._netns_failed:
                    log.warning(
                        "checks: cannot enter %s (%s); checking published ports instead",
                        target.netns,
                        exc.strerror,
                    )
                    self._netns_failed = True
                published = CheckTarget(state.instance.address, state.instance.port)
                return run_check(state.spec, published, forwarded=True)
            return exc.strerror or str(exc)

    def _done(self, iid: str, state: _State, future: Future[str | None]) -> None:
        try:
            reason = future.result()
        except Exception as exc:  # a bug in a check must not stop the others
            reason = f"check failed: {type(exc).__name__}: {exc}"
        changed = None
        with self._cond:
            state.running = None
            if self._states.get(iid) is not state:
                return  # gone or replaced meanwhile
            now = time.monotonic()
            state.reason = reason or ""
            if reason is None:
                state.failures = 0
                if not state.ready:
                    changed = "ready"
                state.ready = True
                state.due = now + state.spec.interval
            else:
                state.failures += 1
                if state.ready and state.failures >= FALL:
                    state.ready = False
                    changed = "not ready"
                if state.ready:
                    state.due = now + min(state.spec.interval, 0.5)
                else:
                    state.due = now + min(state.retry, state.spec.interval, NOT_READY_MAX)
                    state.retry = min(state.retry * 2, NOT_READY_MAX)
            state.checked = True
            self._cond.notify_all()
        if changed == "ready":
            log.info("checks: %s %s answers", state.instance.service, iid)
            self._notify(f"check passed {iid}")
        elif changed == "not ready":
            log.warning("checks: %s %s stopped answering: %s", state.instance.service, iid, reason)
            self._notify(f"check failed {iid}")
