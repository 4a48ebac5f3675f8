"""The Consul registry: agent services with TTL checks, and a watch built on blocking queries.

Register side: each instance is a service of the local agent with a TTL check that starts
passing; ``keepalive`` passes every check, and notices when the agent no longer knows them (a
restarted ``-dev`` agent, or services reaped after ``deregister_after``).

Discover side, built for a registry with many services:

* ``snapshot`` reads ``/v1/catalog/services`` and ``/v1/health/state/any`` first (their indexes
  make the revision), then the instances, either service by service
  (``/v1/catalog/service/<name>``) or node by node (``/v1/catalog/node/<node>``), whichever
  takes fewer requests. An instance passes when every check of its service and of its node
  passes (what ``?passing`` means).
* ``watch`` holds two blocking queries: ``/v1/catalog/services`` (moves on every registration,
  deregistration or change of a service) and ``/v1/health/state/any`` with a filter matching no
  check (moves on every check's status change, yet answers an empty list). Two long polls,
  however many services there are, instead of one per service.

Every call goes through py-consul's client and its HTTP layer (a ``requests`` session). Raw
requests go through that layer for the two things its helpers do not offer: a check registered
as passing with ``DeregisterCriticalServiceAfter``, and blocking-query indexes with our own
wait. Blocking queries run in worker threads, so ``stop`` ends ``watch`` at once instead of after
the query's wait.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import consul
import requests
from consul.callback import CB
from consul.exceptions import ACLPermissionDenied, ConsulException

from discoverd import (
    Catalog,
    Notify,
    PluginError,
    Registry,
    ServiceInstance,
    Unavailable,
    exception_chain,
)
from discoverd.plugins.consul.config import ConsulConfig
from discoverd.plugins.consul.encoding import (
    CONSUL_SERVICE,
    Entry,
    Health,
    check_id,
    entries_from_node,
    entries_from_service,
    read_catalog,
    registration,
)

log = logging.getLogger("discoverd.consul")
T = TypeVar("T")

#: A filter no check matches: the blocking query on the checks keeps its index, answers ``[]``.
NO_CHECK_FILTER = 'CheckID == "discoverd-watch-matches-nothing"'


def reason(exc: BaseException) -> str:
    """One short line for an exception from requests, urllib3 or py-consul."""
    for item in exception_chain(exc):
        if isinstance(item, (TimeoutError, requests.Timeout)):
            return "timed out"
        if isinstance(item, OSError) and item.strerror:
            return item.strerror.lower()
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


class ConsulRegistry(Registry):
    """Agent services with TTL checks (register role), blocking queries (discover role)."""

    def __init__(self, config: ConsulConfig, *, host_id: str = "") -> None:
        self.config = config
        self.host_id = host_id
        if config.tls_files_unused:
            log.warning(
                "consul: TLS files are set but the address %s is plain http; they are not used "
                "(set ssl = true or an https:// address)",
                config.url,
            )
        self._client = self._new_client()  # register side (calls serialised by _lock)
        self._reader = self._new_client()  # snapshots (serialised by _read_lock)
        self._lock = threading.RLock()
        self._read_lock = threading.Lock()
        self._owned: dict[str, ServiceInstance] = {}
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return f"ConsulRegistry({self.config.url})"

    def _new_client(self) -> consul.Consul:
        c = self.config
        client = consul.Consul(
            host=c.host,
            port=c.port,
            scheme=c.scheme,
            verify=c.tls_verify,
            cert=c.client_cert,
            dc=c.datacenter or None,
            token=c.acl_token or None,
            connections_timeout=c.timeout,
        )
        # py-consul lets CONSUL_HTTP_TOKEN override a token given explicitly: the options
        # (which already read that variable, with the right precedence) win here.
        client.token = c.acl_token or None
        # Consul is dialled directly: no HTTP proxy, no ~/.netrc credentials from the environment.
        client.http.session.trust_env = False
        return client

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one request; map every failure to a one-line ``Unavailable``/``PluginError``."""
        try:
            return fn()
        except (ConsulException, requests.RequestException, OSError, ValueError) as exc:
            raise self._error(what, exc) from None

    def _error(self, what: str, exc: BaseException) -> PluginError:
        url = self.config.url
        if isinstance(exc, ACLPermissionDenied):
            return PluginError(
                f"consul at {url}: {what}: permission denied ({reason(exc)}); check the ACL "
                "token (option token, CONSUL_HTTP_TOKEN)"
            )
        if isinstance(exc, ConsulException):
            text = reason(exc)
            if text[:1] == "5":
                return Unavailable(f"consul at {url}: {what} failed: {text}")
            return PluginError(f"consul at {url}: {what} refused: {text}")
        return Unavailable(f"consul unreachable at {url} ({what}): {reason(exc)}")

    # ----------------------------------------------------------------------------------------
    # Register side

    def register(self, instance: ServiceInstance) -> None:
        c = self.config
        body = registration(
            instance,
            host_id=self.host_id,
            ttl=c.ttl,
            deregister_after=c.deregister_after,
            tag=c.tag,
        )
        client = self._client
        with self._lock:
            if self._closed.is_set():
                # A register still running while the agent shuts down must not leave a service
                # behind after close() deregistered ours.
                raise PluginError("consul registry is closed; not registering")
            self._call(
                f"register {instance.id}",
                lambda: client.http.put(
                    CB.boolean(),
                    "/v1/agent/service/register",
                    params=[("replace-existing-checks", "true")],
                    data=json.dumps(body),
                    headers=client.prepare_headers(),
                ),
            )
            # The agent saves a TTL check's state (for its TTL) only when the check is passed,
            # not the initial status: without this pass a restarted agent would bring the
            # instance back critical until the next keepalive.
            self._call(
                f"pass check of {instance.id}",
                partial(client.agent.check.ttl_pass, check_id(instance.id)),
            )
            self._owned[instance.id] = instance

    def deregister(self, instance: ServiceInstance) -> None:
        client = self._client

        def deregister() -> None:
            # The agent no longer has it (it lost its state): already gone. Consul 1.8 says so
            # with a 404, or, with ACLs on, a 500 "Unknown service".
            try:
                client.agent.service.deregister(instance.id)
            except consul.NotFound:
                return
            except ConsulException as exc:
                if "unknown service" not in str(exc).lower():
                    raise

        with self._lock:
            self._call(f"deregister {instance.id}", deregister)
            owned = self._owned.get(instance.id)
            if owned is not None and owned.service == instance.service:
                del self._owned[instance.id]

    def keepalive(self) -> bool:
        client = self._client
        with self._lock:
            for iid in sorted(self._owned):
                try:
                    passed = client.agent.check.ttl_pass(check_id(iid))
                except ConsulException as exc:
                    text = str(exc)
                    # 1.8 answers 500 "CheckID ... does not have associated TTL" for a check it
                    # does not know; newer agents say "Unknown check" (404, or 500).
                    if "associated TTL" not in text and "nknown check" not in text:
                        raise self._error(f"keepalive of {iid}", exc) from None
                    passed = False
                except (requests.RequestException, OSError, ValueError) as exc:
                    raise self._error(f"keepalive of {iid}", exc) from None
                if not passed:
                    log.warning("consul: the agent no longer knows check %s", check_id(iid))
                    self._owned.clear()
                    return False
            return True

    def keepalive_interval(self) -> float:
        return self.config.ttl / 3

    # ----------------------------------------------------------------------------------------
    # Discover side

    def snapshot(self) -> Catalog:
        client = self._reader
        tag = self.config.tag
        with self._read_lock:
            # Indexes first: every change up to the revision is then in the reads that follow,
            # and every later one moves one of the two indexes the watch blocks on.
            services_index, services = self._call(
                "list services", lambda: client.catalog.services()
            )
            checks_index, checks = self._call("read checks", lambda: client.health.state("any"))
            # The lower index: a watch resumed from it cannot miss a change that landed
            # between the two reads (at worst it wakes once for nothing).
            revision = min(_index(services_index), _index(checks_index))
            names = sorted(
                name
                for name, tags in (services or {}).items()
                if name != CONSUL_SERVICE and (not tag or tag in (tags or []))
            )
            entries: list[Entry] = []
            nodes: list[str] | None = None
            if len(names) > 1:
                _, listed = self._call("list nodes", lambda: client.catalog.nodes())
                nodes = sorted(str(n.get("Node", "")) for n in listed or [] if isinstance(n, dict))
            if nodes is not None and len(nodes) < len(names):
                for node in nodes:
                    _, answer = self._call(f"read node {node}", partial(client.catalog.node, node))
                    entries.extend(entries_from_node(answer))
            else:
                for name in names:
                    _, answer = self._call(
                        f"read service {name}", partial(client.catalog.service, name)
                    )
                    entries.extend(entries_from_service(answer))
        return read_catalog(entries, Health.from_checks(checks), revision, tag)

    def watch(self, notify: Notify, stop: threading.Event, since: int) -> None:
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        halt = threading.Event()
        pollers = [
            ("services", lambda c, **kw: c.catalog.services(**kw)),
            ("checks", lambda c, **kw: c.health.state("any", filter_expr=NO_CHECK_FILTER, **kw)),
        ]
        for name, query in pollers:
            threading.Thread(
                target=self._poll,
                args=(name, query, since, events, halt),
                name=f"discoverd-consul-watch-{name}",
                daemon=True,
            ).start()
        try:
            while not (stop.is_set() or self._closed.is_set()):
                try:
                    kind, value = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if kind == "error":
                    raise value
                notify(value)
        finally:
            # The workers leave after their current query (at most ``wait``); their answers
            # are thrown away. watch() itself returns now.
            halt.set()

    def _poll(
        self,
        name: str,
        query: Callable[..., Any],
        since: int,
        events: queue.Queue[tuple[str, Any]],
        halt: threading.Event,
    ) -> None:
        client = self._new_client()
        wait = f"{self.config.wait:g}s"
        index = since if since > 0 else 0
        try:
            while not (halt.is_set() or self._closed.is_set()):
                if index > 0:
                    answer = self._call(
                        f"watch {name}", partial(query, client, index=index, wait=wait)
                    )
                else:
                    answer = self._call(f"watch {name}", lambda: query(client))
                if halt.is_set():
                    return
                new = _index(answer[0])
                if index <= 0:
                    index = new  # watching from now
                elif new < index:
                    # Consul's index went back (a new or restarted -dev agent): start over.
                    log.info("consul: %s index went back from %d to %d", name, index, new)
                    events.put(("change", f"consul {name} index reset"))
                    index = new
                elif new > index:
                    events.put(("change", f"consul {name} changed"))
                    index = new
        except PluginError as exc:
            if not halt.is_set():
                events.put(("error", exc))
        finally:
            with contextlib.suppress(Exception):
                client.http.session.close()

    # ----------------------------------------------------------------------------------------

    def close(self, deregister: bool = False) -> None:
        self._closed.set()
        with self._lock:
            owned, self._owned = self._owned, {}
            try:
                if deregister:
                    failures: list[str] = []
                    for iid in sorted(owned):
                        try:
                            self._call(
                                f"deregister {iid}",
                                partial(self._client.agent.service.deregister, iid),
                            )
                        except PluginError as exc:
                            failures.append(str(exc))
                            if isinstance(exc, Unavailable):
                                break  # the agent is gone: the others would fail the same way
                    if failures:
                        raise Unavailable(failures[0])
            finally:
                for client in (self._client, self._reader):
                    with contextlib.suppress(Exception):
                        client.http.session.close()


def _index(value: Any) -> int:
    """A Consul index (sent as a string); an index must never be below 1."""
    try:
        return max(int(value), 1)
    except (TypeError, ValueError):
        raise Unavailable(f"consul sent no usable index ({value!r})") from None
