"""Talking to etcd's JSON gateway: endpoints, failover, TLS, user/password auth, watch streams.

Ordinary calls go through ``etcd3gw`` clients (one per endpoint, each on a prepared
``requests.Session``). The watch stream is owned here instead: etcd3gw's watch iterator blocks
forever when etcd dies, so :class:`WatchStream` reads the gateway's JSON lines itself and can be
aborted from another thread.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import etcd3gw
import requests
import urllib3
from etcd3gw import exceptions as etcd_exc

from discoverd import PluginError, Unavailable, exception_chain
from discoverd.plugins.etcd.config import DEFAULT_PORT, EtcdConfig

log = logging.getLogger("discoverd.etcd")
T = TypeVar("T")

API_PATH = "/v3/"  # etcd >= 3.4

# gRPC status codes the gateway puts in its error bodies ("code": N).
GRPC_NOT_FOUND = 5
GRPC_FAILED_PRECONDITION = 9
GRPC_OUT_OF_RANGE = 11
GRPC_UNAVAILABLE = 14
GRPC_DEADLINE_EXCEEDED = 4
GRPC_UNAUTHENTICATED = 16
_RETRY_ELSEWHERE = {GRPC_UNAVAILABLE, GRPC_DEADLINE_EXCEEDED}


def needs_auth(code: int, message: str) -> bool:
    """Whether etcd refused a request for want of a (valid) token: authenticate again.

    "user name is empty" is what etcd says (InvalidArgument) to a request without a token once
    authentication is enabled, e.g. after an operator turned it on while we were running.
    """
    text = message.lower()
    return code == GRPC_UNAUTHENTICATED or "auth token" in text or "user name is empty" in text


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


class _Unreachable(Exception):
    """This endpoint cannot serve the call now; try the next one."""


def new_session(config: EtcdConfig, headers: Mapping[str, str] | None = None) -> requests.Session:
    """A session for one endpoint: the TLS files of ``config``, and ``headers``."""
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
    if headers:
        session.headers.update(headers)
    return session


def short_reason(exc: BaseException) -> str:
    """One short line for an exception from requests, urllib3 or etcd3gw."""
    if isinstance(exc, etcd_exc.Etcd3Exception):
        detail = exc.detail_text or ""
        try:
            body = json.loads(detail)
        except ValueError:
            body = None
        if isinstance(body, dict) and (body.get("message") or body.get("error")):
            return str(body.get("message") or body.get("error"))
        text = detail or " ".join(str(a) for a in exc.args) or type(exc).__name__
    else:
        text = str(exc) or type(exc).__name__
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if match:
        return match.group(1).strip().lower()
    if "timed out" in text.lower():
        return "timed out"
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


def _grpc_code(exc: etcd_exc.Etcd3Exception) -> tuple[int, str]:
    try:
        body = json.loads(exc.detail_text or "")
    except ValueError:
        return 0, short_reason(exc)
    if not isinstance(body, dict):
        return 0, short_reason(exc)
    code = body.get("code", 0)
    message = str(body.get("message") or body.get("error") or short_reason(exc))
    return (code if isinstance(code, int) else 0), message


class Connection:
    """One endpoint: a prepared session, an etcd3gw client on it, and its auth token."""

    def __init__(self, url: str, config: EtcdConfig) -> None:
        self.url = url
        self.config = config
        parts = urlsplit(url)
        assert parts.hostname is not None
        self.session = new_session(config)
        self.client = etcd3gw.client(
            host=parts.hostname,
            port=parts.port or DEFAULT_PORT,
            protocol=parts.scheme,
            timeout=config.timeout,
            api_path=API_PATH,
            session=self.session,
        )
        self.token: str | None = None  # None: not authenticated yet ("" when auth is off)
        self.auth_lock = threading.Lock()

    def post(self, path: str, payload: Mapping[str, Any]) -> Any:
        """POST to the v3 API through etcd3gw (its error mapping, our session)."""
        return self.client.post(self.client.get_url(path), json=payload)

    def authenticate(self) -> None:
        config = self.config
        self.session.headers.pop("Authorization", None)
        try:
            reply = self.post(
                "/auth/authenticate", {"name": config.user, "password": config.password}
            )
        except etcd_exc.Etcd3Exception as exc:
            code, message = _grpc_code(exc)
            if code == GRPC_FAILED_PRECONDITION and "not enabled" in message:
                self.token = ""  # auth is off on this cluster: plain requests work
                return
            if isinstance(exc, (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError)):
                raise
            raise EtcdError(
                f"etcd at {self.url}: authentication as {config.user!r} failed: {message}", code
            ) from None
        token = reply.get("token") if isinstance(reply, dict) else None
        if not isinstance(token, str) or not token:
            raise EtcdError(f"etcd at {self.url}: authentication returned no token")
        self.token = token
        self.session.headers["Authorization"] = token

    def open_watch(self, requests_: Sequence[Mapping[str, Any]], idle: float) -> WatchStream:
        """Start a watch stream (several create requests, one HTTP request, own session)."""
        headers = {"Authorization": self.token} if self.token else None
        session = new_session(self.config, headers)
        body = "".join(json.dumps(r, separators=(",", ":")) for r in requests_)
        try:
            response = session.post(
                self.client.get_url("/watch"),
                data=body,
                headers={"Content-Type": "application/json"},
                stream=True,
                timeout=(self.config.timeout, idle),
            )
        except BaseException:
            session.close()
            raise
        if response.status_code != 200:
            text = response.text
            response.close()
            session.close()
            raise _http_error(response.status_code, response.reason, text)
        return WatchStream(self, session, response)

    def close(self) -> None:
        self.session.close()


def _http_error(status: int, reason: str, text: str) -> etcd_exc.Etcd3Exception:
    if status == 503:
        return etcd_exc.ConnectionFailedError(text, reason)
    if status in (408, 504):
        return etcd_exc.ConnectionTimeoutError(text, reason)
    return etcd_exc.Etcd3Exception(text, reason)


class Gateway:
    """All endpoints, with failover: a call goes to the current endpoint, then the next ones."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self.connections = [Connection(url, config) for url in config.urls]
        self._current = 0
        self._lock = threading.Lock()

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(c.url for c in self.connections)

    @property
    def current(self) -> str:
        return self.connections[self._current].url

    def call(self, what: str, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` on the current endpoint, failing over to the others on connection errors.

        Raises ``Unavailable`` (one line naming every endpoint tried) when none answered, and
        ``EtcdError`` when etcd answered with an error.
        """
        count = len(self.connections)
        start = self._current
        failures: list[str] = []
        for step in range(count):
            index = (start + step) % count
            connection = self.connections[index]
            try:
                result = self._attempt(connection, fn)
            except _Unreachable as exc:
                failures.append(f"{connection.url} ({exc})")
                if count > 1:
                    log.debug("etcd %s: %s failed (%s); trying the next", what, connection.url, exc)
                continue
            if index != self._current:
                with self._lock:
                    self._current = index
                if count > 1:
                    log.info("etcd: now using %s", connection.url)
            return result
        raise Unavailable(f"etcd unreachable for {what}: {', '.join(failures)}")

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
        """One transaction (``/v3/kv/txn``), with failover; its answer."""
        request = {"compare": compare, "success": success, "failure": failure}
        result = self.call(what, lambda c: c.client.transaction(request))
        return result if isinstance(result, Mapping) else {}

    def _attempt(self, connection: Connection, fn: Callable[[Connection], T]) -> T:
        for attempt in (1, 2):
            try:
                if self.config.user and connection.token is None:
                    with connection.auth_lock:  # one authentication per endpoint at a time
                        if connection.token is None:
                            connection.authenticate()
                return fn(connection)
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError) as exc:
                raise _Unreachable(short_reason(exc)) from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise _Unreachable(short_reason(exc)) from None
            except requests.RequestException as exc:
                raise _Unreachable(short_reason(exc)) from None
            except ValueError as exc:  # a body that is not JSON: not an etcd gateway
                raise _Unreachable(f"not an etcd gateway answer ({short_reason(exc)})") from None
            except etcd_exc.Etcd3Exception as exc:
                code, message = _grpc_code(exc)
                if code in _RETRY_ELSEWHERE:
                    raise _Unreachable(message) from None
                if needs_auth(code, message):
                    if attempt == 2 or not self.config.user:
                        raise EtcdError(
                            f"etcd at {connection.url}: {message} (check the etcd options user "
                            "and password)",
                            GRPC_UNAUTHENTICATED,
                        ) from None
                    connection.token = None  # expired, from another member, or auth now on
                    continue
                raise EtcdError(f"etcd at {connection.url}: {message}", code) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
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
    """The connection broke in the middle of the stream."""


class WatchStream:
    """One streaming POST to ``/v3/watch``: yields the gateway's JSON messages.

    ``abort()`` (from any thread) shuts the socket down, which wakes a blocked reader at once.
    """

    def __init__(
        self, connection: Connection, session: requests.Session, response: requests.Response
    ) -> None:
        self.connection = connection
        self.url = connection.url
        self._session = session
        self._response = response
        self._aborted = threading.Event()
        self._sock = _socket_of(response)

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def messages(self) -> Iterator[dict[str, Any]]:
        """Yield each message; return at EOF; raise StreamIdle / StreamBroken."""
        buffer = b""
        try:
            for chunk in self._response.iter_content(chunk_size=None):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield _load(line)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if self.aborted:
                return
            if _is_read_timeout(exc):
                raise StreamIdle() from None
            raise StreamBroken(short_reason(exc)) from None
        except ValueError as exc:  # TLS shut down under our feet, or a torn read after abort
            if self.aborted:
                return
            raise StreamBroken(short_reason(exc)) from None
        if buffer.strip() and not self.aborted:
            yield _load(buffer)

    def abort(self) -> None:
        """Stop the stream now (idempotent, any thread)."""
        if self._aborted.is_set():
            return
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
