"""Talking to etcd's JSON gateway (etcd >= 3.4, ``/v3/``) with ``requests``: endpoints, failover,
TLS, user/password auth, lease calls and watch streams.

**One deadline per call, failover inside it.** A call (:meth:`Gateway.call`) has ``timeout``
seconds for all its attempts. An attempt that fails at once (connection refused or reset, "no
leader", "leader changed") goes to the next endpoint at once; after a round in which every
endpoint failed, a short pause (:data:`PAUSES`), then another round, until the deadline. Only
then is ``Unavailable`` raised, naming each endpoint and why it failed: a dead cluster surfaces
within ``timeout`` (the keepalive period, by default), never as a silent hang.

**Short attempts for writes.** When etcd's leader dies, a write that a follower forwarded to it
is lost, and etcd answers it only after its own request timeout (5 s plus two election
timeouts): a client that waits for that stalls far longer than the election (~1 s). So an
attempt of a write gets :data:`WRITE_ATTEMPT` (or four times the usual latency of that kind of
call, when that is longer), and each attempt that timed out while no other member was seen
failing (refused, no leader) doubles the next one: a cluster that is only slow still answers,
one that lost its leader is asked again, on the next member, soon after it has a new one. Once
a member is seen failing, the attempts are short again for the rest of the call: the timeouts
before it were the failover, not a slow cluster. Every
write discoverd makes can be sent twice (puts of the same values, deletes, compare-and-swap
transactions that read again when their compare fails; a lease granted twice leaves one unused
lease that expires). Reads get longer attempts
(:data:`READ_ATTEMPT`): etcd answers them itself once a leader is elected ("leader changed", or
the answer, within its own ReadIndex retry of 0.5 s).

**Require a leader.** Every request carries etcd's require-leader metadata
(:data:`REQUIRE_LEADER`, the ``hasleader`` metadata of etcd's own client, passed by the gateway
as a gRPC metadata header): a member without a leader answers "no leader" at once instead of
holding the request, and ends a watch stream it serves once it has lost its leader, so the
reader moves to another member.

**Connections.** One ``requests.Session`` per endpoint (its TLS files, no proxy or netrc from
the environment), a short connect timeout (:data:`CONNECT_TIMEOUT`); each watch stream has a
session and connection of its own, with TCP keepalives, and can be aborted from another thread.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import requests
import urllib3

from discoverd import PluginError, Unavailable, exception_chain
from discoverd.plugins.etcd.config import EtcdConfig

log = logging.getLogger("discoverd.etcd")
T = TypeVar("T")

API_PATH = "/v3"  # etcd >= 3.4

#: etcd's require-leader metadata ("hasleader"), sent through the gateway as a gRPC metadata
#: header: a member without a leader refuses the request at once ("no leader") and ends the
#: watch streams it serves once it has been without a leader for a few election timeouts.
REQUIRE_LEADER = {"Grpc-Metadata-Hasleader": "true"}
#: Seconds to open a TCP connection (and TLS) to one endpoint before trying the next.
CONNECT_TIMEOUT = 0.5
#: Shortest attempt of a write, in seconds (longer when this kind of call usually takes longer).
WRITE_ATTEMPT = 0.25
#: Shortest attempt of a read, in seconds.
READ_ATTEMPT = 0.5
#: An attempt lasts at least this many times the usual latency of its kind of call.
LATENCY_FACTOR = 4.0
#: Pauses between two rounds over every endpoint, in seconds (the last one repeats): while
#: the cluster elects a leader, its members are asked again at least every 0.2 s.
PAUSES = (0.05, 0.1, 0.15, 0.2)

# gRPC status codes the gateway puts in its error bodies ("code": N).
GRPC_CANCELED = 1
GRPC_UNKNOWN = 2
GRPC_INVALID_ARGUMENT = 3
GRPC_DEADLINE_EXCEEDED = 4
GRPC_NOT_FOUND = 5
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_FAILED_PRECONDITION = 9
GRPC_OUT_OF_RANGE = 11
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16
#: Codes that say "this member cannot serve it now": the next endpoint is tried.
RETRY_ELSEWHERE = frozenset(
    {GRPC_CANCELED, GRPC_DEADLINE_EXCEEDED, GRPC_RESOURCE_EXHAUSTED, GRPC_UNAVAILABLE}
)
#: The gRPC code of an error answer without one, from its HTTP status.
_CODE_OF_STATUS = {503: GRPC_UNAVAILABLE, 504: GRPC_DEADLINE_EXCEEDED, 408: GRPC_DEADLINE_EXCEEDED}
#: What etcd 3.4's gateway answers (HTTP 400, plain text) to a client certificate with a Common
#: Name while authentication is on.
_GATEWAY_CN = "CommonName of client"


def needs_auth(code: int, message: str) -> bool:
    """Whether etcd refused a request for want of a (valid) token: authenticate again.

    "user name is empty" is what etcd says (InvalidArgument) to a request without a token once
    authentication is enabled, e.g. after an operator turned it on while we were running.
    """
    text = message.lower()
    return code == GRPC_UNAUTHENTICATED or "auth token" in text or "user name is empty" in text


def retry_elsewhere(code: int, message: str) -> bool:
    """Whether an error answer means "this member cannot serve it now" (no leader, a leader
    change, its own deadline): the call goes on with the next endpoint."""
    if code in RETRY_ELSEWHERE:
        return True
    text = message.lower()
    return code == GRPC_UNKNOWN and ("deadline exceeded" in text or "timed out" in text)


def b64(data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


class EtcdError(PluginError):
    """etcd answered, with an error (``code`` is the gRPC status code, 0 if unknown)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class EndpointFailed(Exception):
    """This endpoint cannot serve the call now; try the next one. ``timed_out``: the attempt
    used its whole time (the next attempt gets longer)."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class ErrorAnswer(Exception):
    """An error answer of the gateway (``code`` from its body, else from the HTTP status)."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def new_session(config: EtcdConfig) -> requests.Session:
    """A session for one endpoint, with the TLS files of ``config``."""
    session = requests.Session()
    # No HTTP proxy from the environment, no credentials from ~/.netrc: etcd is dialled
    # directly, and only our own Authorization header is sent.
    session.trust_env = False
    if config.ca_cert:
        session.verify = config.ca_cert
    if config.cert and config.key:
        session.cert = (config.cert, config.key)
    elif config.cert:
        session.cert = config.cert
    session.headers.update(REQUIRE_LEADER)
    return session


def short_reason(exc: BaseException) -> str:
    """One short line for an exception from requests or urllib3."""
    text = str(exc) or type(exc).__name__
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if match:
        return match.group(1).strip().lower()
    if "timed out" in text.lower():
        return "timed out"
    lowered = text.lower()
    if "remotedisconnected" in lowered or "connection aborted" in lowered:
        return "connection closed by the server"
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


def _error_of(response: requests.Response) -> ErrorAnswer:
    """The gateway's error answer: ``{"error", "message", "code"}`` (etcd 3.4), or a plain
    text (etcd's own HTTP checks)."""
    text = response.text
    code, message = 0, ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        raw = body.get("code", 0)
        code = raw if isinstance(raw, int) else 0
        message = str(body.get("message") or body.get("error") or "")
    if not message:
        message = " ".join(text.split())[:200] or f"HTTP {response.status_code} {response.reason}"
    if not code:
        code = _CODE_OF_STATUS.get(response.status_code, 0)
    return ErrorAnswer(response.status_code, code, message)


def _timed_out(exc: BaseException) -> bool:
    """A read that waited its whole timeout (not a connection that could not be opened)."""
    if isinstance(exc, requests.ConnectTimeout):
        return False
    return any(
        isinstance(item, requests.ReadTimeout | urllib3.exceptions.ReadTimeoutError | TimeoutError)
        for item in exception_chain(exc)
    )


class Connection:
    """One endpoint: a prepared session and its auth token."""

    def __init__(self, url: str, config: EtcdConfig) -> None:
        self.url = url
        self.config = config
        self.session = new_session(config)
        self.token: str | None = None  # None: not authenticated yet ("" when auth is off)
        self.auth_lock = threading.Lock()

    def endpoint(self, path: str) -> str:
        return f"{self.url}{API_PATH}{path}"

    def _headers(self) -> dict[str, str]:
        token = self.token
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        return headers

    def post(self, path: str, payload: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """POST ``payload`` to ``/v3<path>``; the decoded answer. Raises ``EndpointFailed`` when
        the endpoint cannot serve it now, ``ErrorAnswer`` for an error answer of etcd."""
        body = json.dumps(payload, separators=(",", ":"))
        try:
            response = self.session.post(
                self.endpoint(path),
                data=body,
                headers=self._headers(),
                timeout=(min(CONNECT_TIMEOUT, timeout), timeout),
            )
        except requests.RequestException as exc:
            raise EndpointFailed(short_reason(exc), _timed_out(exc)) from None
        if response.status_code != 200:
            error = _error_of(response)
            if retry_elsewhere(error.code, error.message) or response.status_code in (502, 503):
                raise EndpointFailed(error.message, error.code == GRPC_DEADLINE_EXCEEDED)
            raise error
        try:
            answer = json.loads(response.content)
        except ValueError:
            raise EndpointFailed("not an etcd gateway answer (not JSON)") from None
        if not isinstance(answer, dict):
            raise EndpointFailed("not an etcd gateway answer (not a JSON object)")
        return answer

    def authenticate(self, timeout: float) -> None:
        config = self.config
        self.token = None
        try:
            reply = self.post(
                "/auth/authenticate",
                {"name": config.user, "password": config.auth_password},
                timeout,
            )
        except ErrorAnswer as exc:
            if exc.code == GRPC_FAILED_PRECONDITION and "not enabled" in exc.message:
                self.token = ""  # auth is off on this cluster: plain requests work
                return
            raise EtcdError(
                f"etcd at {self.url}: authentication as {config.user!r} failed: {_explain(exc)}",
                exc.code,
            ) from None
        token = reply.get("token")
        if not isinstance(token, str) or not token:
            raise EtcdError(f"etcd at {self.url}: authentication returned no token")
        self.token = token

    def open_watch(
        self, requests_: Sequence[Mapping[str, Any]], timeout: float, idle: float
    ) -> WatchStream:
        """Start a watch stream (several create requests, one HTTP request, own session).

        ``timeout`` bounds the wait for the answer's headers; ``idle`` then bounds each read
        (silence for longer ends the stream with :class:`StreamIdle`)."""
        session = new_session(self.config)
        body = "".join(json.dumps(r, separators=(",", ":")) for r in requests_)
        try:
            response = session.post(
                self.endpoint("/watch"),
                data=body,
                headers=self._headers(),
                stream=True,
                timeout=(min(CONNECT_TIMEOUT, timeout), timeout),
            )
        except requests.RequestException as exc:
            session.close()
            raise EndpointFailed(short_reason(exc), _timed_out(exc)) from None
        except BaseException:
            session.close()
            raise
        if response.status_code != 200:
            error = _error_of(response)
            response.close()
            session.close()
            if retry_elsewhere(error.code, error.message) or response.status_code in (502, 503):
                raise EndpointFailed(error.message)
            raise error
        return WatchStream(self, session, response, idle)

    def close(self) -> None:
        self.session.close()


def _explain(error: ErrorAnswer) -> str:
    """An error answer for the operator; etcd 3.4's refusal of a certificate with a Common Name
    gets what to do about it."""
    if _GATEWAY_CN in error.message:
        return (
            "etcd's JSON gateway refuses a password from a client whose certificate has a Common "
            "Name (etcd 3.4); use a client certificate without a Common Name, or authenticate "
            "by the certificate alone (no user and password)"
        )
    return error.message


class _Latency:
    """The usual duration of each kind of call (an exponential moving average)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}

    def get(self, what: str) -> float | None:
        with self._lock:
            return self._seconds.get(what)

    def add(self, what: str, seconds: float) -> None:
        with self._lock:
            previous = self._seconds.get(what)
            self._seconds[what] = seconds if previous is None else 0.8 * previous + 0.2 * seconds


class Gateway:
    """All endpoints, with failover: a call goes to the current endpoint, then the next ones,
    round after round, within its deadline (see the module)."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self.connections = [Connection(url, config) for url in config.urls]
        self._current = 0
        self._lock = threading.Lock()
        self._latency = _Latency()
        self._closed = threading.Event()

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(c.url for c in self.connections)

    @property
    def current(self) -> str:
        return self.connections[self._current].url

    def attempt_timeout(self, what: str, write: bool, slow: int, left: float) -> float:
        """How long the next attempt of ``what`` may take (``slow``: attempts of this call that
        timed out while no member was failing over; ``left``: seconds to the deadline)."""
        usual = self._latency.get(what)
        if usual is not None:
            floor = WRITE_ATTEMPT if write else READ_ATTEMPT
            base = max(floor, LATENCY_FACTOR * usual)
        elif write:
            base = WRITE_ATTEMPT
        else:
            # A read of unknown size (the first full read): the deadline split over the
            # endpoints, so that each one gets a fair chance.
            base = max(READ_ATTEMPT, left / len(self.connections))
        return max(0.05, min(left, base * float(2**slow)))

    def call(self, what: str, fn: Callable[[Connection, float], T], *, write: bool = False) -> T:
        """Run ``fn(connection, attempt timeout)`` on the current endpoint, failing over to the
        others, within one deadline (``timeout``).

        Raises ``Unavailable`` (one line naming every endpoint tried) when none answered in
        time, and ``EtcdError`` when etcd answered with an error.
        """
        count = len(self.connections)
        deadline = time.monotonic() + self.config.timeout
        start = self._current
        failures: dict[str, str] = {}
        slow = 0  # attempts that timed out while no member was seen failing over
        failing_over = False  # a member refused, or had no leader: not a slow cluster
        step = 0
        while not self._closed.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            index = (start + step) % count
            connection = self.connections[index]
            budget = self.attempt_timeout(what, write, slow, left)
            began = time.monotonic()
            try:
                result = self._attempt(connection, fn, budget)
            except EndpointFailed as exc:
                failures[connection.url] = str(exc)
                if not exc.timed_out:
                    # A member refused or has no leader: the attempts that timed out before
                    # were lost in a failover, not slow; the next ones are short again, so a
                    # write soon meets the new leader (doubling here cost up to a second).
                    failing_over = True
                    slow = 0
                elif not failing_over:
                    slow += 1  # the cluster may be slow: give the next attempt longer
                log.debug("etcd %s: %s failed (%s)", what, connection.url, exc)
                step += 1
                if step % count == 0:  # every endpoint failed in this round: pause
                    pause = PAUSES[min(step // count - 1, len(PAUSES) - 1)]
                    if deadline - time.monotonic() <= pause:
                        break
                    self._closed.wait(pause)
                continue
            self._latency.add(what, time.monotonic() - began)
            if index != self._current:
                with self._lock:
                    self._current = index
                if count > 1:
                    log.info("etcd: now using %s", connection.url)
            return result
        if self._closed.is_set() and not failures:
            raise Unavailable(f"etcd {what}: the registry is closed")
        tried = ", ".join(f"{url} ({why})" for url, why in failures.items())
        raise Unavailable(f"etcd unreachable for {what}: {tried or 'no time left'}")

    def post(
        self, what: str, path: str, payload: Mapping[str, Any], *, write: bool = False
    ) -> dict[str, Any]:
        """POST to ``/v3<path>`` with failover; the decoded answer."""
        return self.call(what, lambda c, timeout: c.post(path, payload, timeout), write=write)

    def mark_failed(self, url: str) -> None:
        """A stream from ``url`` broke: start the next call at the following endpoint."""
        with self._lock:
            if self.connections[self._current].url == url:
                self._current = (self._current + 1) % len(self.connections)

    def txn(
        self,
        what: str,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]],
    ) -> Mapping[str, Any]:
        """One transaction (``/v3/kv/txn``), with failover; its answer. A transaction that
        writes gets short attempts (see the module); a read-only one does not."""
        request: dict[str, Any] = {"compare": compare, "success": success, "failure": failure}
        write = any("request_range" not in op for op in (*success, *failure))
        return self.post(what, "/kv/txn", request, write=write)

    # -- leases -----------------------------------------------------------------------------

    def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        answer = self.post("lease grant", "/lease/grant", {"TTL": ttl}, write=True)
        try:
            return int(answer["ID"])
        except (KeyError, TypeError, ValueError):
            raise PluginError(f"etcd: unexpected lease grant answer ({answer!r:.120})") from None

    def lease_keepalive(self, lease: int) -> int:
        """Refresh ``lease``; its TTL now, or -1 when it no longer exists."""
        answer = self.post("keepalive", "/lease/keepalive", {"ID": str(lease)}, write=True)
        result = answer.get("result")
        if isinstance(answer.get("error"), Mapping):
            error = answer["error"]
            raise EtcdError(
                f"etcd keepalive failed: {error.get('message') or error}",
                int(error.get("grpc_code", 0) or 0),
            )
        if not isinstance(result, Mapping):
            raise PluginError(f"etcd: unexpected answer to a keepalive ({answer!r:.120})")
        try:
            return int(result.get("TTL", -1))
        except (TypeError, ValueError):
            return -1

    def lease_revoke(self, lease: int) -> None:
        """Revoke ``lease`` (its keys go at once). ``EtcdError`` with ``GRPC_NOT_FOUND`` when
        it no longer exists."""
        self.post("lease revoke", "/lease/revoke", {"ID": str(lease)}, write=True)

    # -- internals --------------------------------------------------------------------------

    def _attempt(
        self, connection: Connection, fn: Callable[[Connection, float], T], timeout: float
    ) -> T:
        for attempt in (1, 2):
            try:
                if self.config.user and connection.token is None:
                    with connection.auth_lock:  # one authentication per endpoint at a time
                        if connection.token is None:
                            connection.authenticate(timeout)
                return fn(connection, timeout)
            except ErrorAnswer as exc:
                if needs_auth(exc.code, exc.message):
                    if attempt == 2 or not self.config.user:
                        raise EtcdError(
                            f"etcd at {connection.url}: {exc.message} (check the etcd options "
                            "user and password)",
                            GRPC_UNAUTHENTICATED,
                        ) from None
                    connection.token = None  # expired, from another member, or auth now on
                    continue
                raise EtcdError(f"etcd at {connection.url}: {_explain(exc)}", exc.code) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Stop retrying (a running call ends at its next pause) and close the connections."""
        self._closed.set()
        for connection in self.connections:
            connection.close()


def _is_read_timeout(exc: BaseException) -> bool:
    return any(
        isinstance(item, urllib3.exceptions.ReadTimeoutError | socket.timeout)
        for item in exception_chain(exc)
    )


class StreamIdle(Exception):
    """Nothing arrived for the idle timeout: the connection may be silently dead."""


class StreamBroken(Exception):
    """The connection broke in the middle of the stream (or the member stopped serving it)."""


#: TCP keepalive of a watch connection: first probe after this many idle seconds, then one a
#: second, three unanswered ones end it (a peer host that is gone, a half-open connection).
TCP_KEEPIDLE = 5
TCP_KEEPINTVL = 1
TCP_KEEPCNT = 3


class WatchStream:
    """One streaming POST to ``/v3/watch``: yields the gateway's JSON messages.

    ``abort()`` (from any thread) shuts the socket down, which wakes a blocked reader at once;
    ``fail(reason)`` does the same and makes the reader raise :class:`StreamBroken`.
    ``last_activity`` is when the last bytes arrived (``time.monotonic()``).
    """

    def __init__(
        self,
        connection: Connection,
        session: requests.Session,
        response: requests.Response,
        idle: float,
    ) -> None:
        self.connection = connection
        self.url = connection.url
        self._session = session
        self._response = response
        self._aborted = threading.Event()
        self._failure = ""
        self.opened = time.monotonic()
        self.last_activity = self.opened
        self._sock = _socket_of(response)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.settimeout(idle)  # the answer came: from now on, the idle timeout
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for name, value in (
                    ("TCP_KEEPIDLE", TCP_KEEPIDLE),
                    ("TCP_KEEPINTVL", TCP_KEEPINTVL),
                    ("TCP_KEEPCNT", TCP_KEEPCNT),
                ):
                    if hasattr(socket, name):
                        self._sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)

    @property
    def aborted(self) -> bool:
        """Stopped on purpose (``abort``), not by ``fail`` or the connection."""
        return self._aborted.is_set() and not self._failure

    def messages(self) -> Iterator[dict[str, Any]]:
        """Yield each message; return at EOF; raise StreamIdle / StreamBroken."""
        buffer = b""
        try:
            for chunk in self._response.iter_content(chunk_size=None):
                self.last_activity = time.monotonic()
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield _load(line)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            self._raise_failure()
            if self.aborted:
                return
            if _is_read_timeout(exc):
                raise StreamIdle() from None
            raise StreamBroken(short_reason(exc)) from None
        except ValueError as exc:  # TLS shut down under our feet, or a torn read after abort
            self._raise_failure()
            if self.aborted:
                return
            raise StreamBroken(short_reason(exc)) from None
        self._raise_failure()
        if buffer.strip() and not self.aborted:
            yield _load(buffer)

    def _raise_failure(self) -> None:
        if self._failure:
            raise StreamBroken(self._failure)

    def fail(self, reason: str) -> None:
        """End the stream from another thread; its reader raises ``StreamBroken(reason)``."""
        if self._aborted.is_set():
            return
        self._failure = reason
        self._shutdown()

    def abort(self) -> None:
        """Stop the stream now (idempotent, any thread)."""
        if self._aborted.is_set():
            return
        self._shutdown()

    def _shutdown(self) -> None:
        self._aborted.set()
        if self._sock is not None:
            # The plain socket's shutdown (not SSLSocket's): wakes the blocked reader at once.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def close(self) -> None:
        self.abort()
        try:
            self._response.close()
        finally:
            self._session.close()


def _load(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        raise StreamBroken(f"not a JSON message: {line[:80]!r}") from None
    if not isinstance(message, dict):
        raise StreamBroken(f"not a JSON object: {line[:80]!r}")
    return message


def _socket_of(response: requests.Response) -> socket.socket | None:
    """The socket under a streaming response (urllib3 2: ``raw._connection.sock``)."""
    raw: Any = response.raw
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if not isinstance(sock, socket.socket):
        # Older urllib3: http.client's response -> buffered reader -> SocketIO -> socket.
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None
