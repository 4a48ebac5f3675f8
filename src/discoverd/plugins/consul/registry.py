"""The Consul registry: agent services with TTL checks, and a watch built on blocking queries.

Register side: each instance is a service of the local agent with a TTL check that starts
passing; ``keepalive`` passes every check, and notices when the agent no longer knows them (a
restarted ``-dev`` agent, or services reaped after ``deregister_after``).

Discover side, built for a registry with many services:

* ``snapshot`` reads ``/v1/catalog/services``, ``/v1/health/state/any`` and the claims
  (``<kv_prefix>/claims/``) first (the lowest of their indexes is the revision), then the
  instances, either service by service (``/v1/catalog/service/<name>``) or node by node
  (``/v1/catalog/node/<node>``), whichever takes fewer requests. An instance passes when every
  check of its service and of its node passes (what ``?passing`` means).
* ``watch`` holds three blocking queries: ``/v1/catalog/services`` (moves on every
  registration, deregistration or change of a service), ``/v1/health/state/any`` with a filter
  matching no check (moves on every check's status change, yet answers an empty list) and the
  claims' prefix (moves when a claim is taken or released). Three long polls, however many
  services there are, instead of one per service. Each answer is compared with the last one
  (the check list is read once when either of the first two moves) to name the services that
  changed; ``read_services`` then reads only those (``/v1/health/service/<name>`` and their
  claims). What cannot be named (see ``changes.py`` and ``_on_services``) means "read all".

Frontend-port claims (KV, see ``encoding.py`` for the keys): every agent serving a service holds
``<kv_prefix>/claims/<service>/<session>`` = port with its session (one per registry object,
``Behavior=delete``, a TTL renewed at each keepalive, bound to the node's ``serfHealth``), so a
claim lasts as long as one agent serving the service is alive and goes when the last one dies or
stops. ``<kv_prefix>/ports/<port>`` = service and ``<kv_prefix>/services/<service>`` = port are
the records every claim is checked against: one transaction sets both with check-and-set on the
indexes just read (``cas`` with index 0 creates only) and takes the holder's key, so two agents
can never give one port to two services, nor one service two ports. A record whose service has
no holder left means nothing and is taken over the same way. A service whose port another
service holds is registered all the same, reported by :meth:`ConsulRegistry.conflicts`, and
tried again at each keepalive.

Every call goes through py-consul's client and its HTTP layer (a ``requests`` session). Raw
requests go through that layer for what its helpers do not offer: a check registered as
passing with ``DeregisterCriticalServiceAfter``, blocking-query indexes with our own wait, and
sessions and transactions in the agent's own datacenter with the token in a header. Blocking
queries run in worker threads, so ``stop`` ends ``watch`` at once instead of after the query's
wait.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

import consul
import requests
from consul.callback import CB
from consul.exceptions import ACLPermissionDenied, ConsulException

from discoverd import (
    Catalog,
    Notify,
    PluginError,
    Problem,
    Registry,
    ServiceInstance,
    Unavailable,
    claim_problems,
    exception_chain,
)
from discoverd.plugins.consul.changes import (
    CheckKey,
    changed_names,
    check_changes,
    check_table,
    claim_table,
    claimed_services,
    service_tags,
)
from discoverd.plugins.consul.config import ConsulConfig
from discoverd.plugins.consul.encoding import (
    CONSUL_SERVICE,
    Claims,
    Entry,
    Health,
    KVEntry,
    check_id,
    claims_prefix,
    entries_from_health,
    entries_from_node,
    entries_from_service,
    holder_key,
    port_record,
    read_catalog,
    read_claims,
    registration,
    service_record,
)

log = logging.getLogger("discoverd.consul")
T = TypeVar("T")

#: A filter no check matches: the blocking query on the checks keeps its index, answers ``[]``.
NO_CHECK_FILTER = 'CheckID == "discoverd-watch-matches-nothing"'
#: Read-and-set rounds one claim may take before it is left to the next keepalive (each failed
#: round is a concurrent change of the same service or port by another agent).
CLAIM_ATTEMPTS = 8
#: Services kept from their port whose claim one keepalive looks at again.
UPKEEP_BLOCKED = 20
#: Above this many services, ``read_services`` declines: a full read takes fewer requests.
READ_SERVICES_MAX = 8
#: What Consul accepts as a session TTL, in seconds.
SESSION_TTL_MIN, SESSION_TTL_MAX = 10, 86400


class PermissionDenied(PluginError):
    """Consul refused a request for want of an ACL permission."""


@dataclass(frozen=True)
class _Blocked:
    """Another service, ``owner``, holds ``port``: the one this service should have."""

    port: int
    owner: str


@dataclass
class _Seen:
    """The lists a watch follows, as last read: where it blocks from, what it compares with."""

    services_index: int
    services: dict[str, frozenset[str]]
    checks_index: int
    checks: dict[CheckKey, tuple[int, str, str]]
    claims_index: int  # 0: the claims could not be read
    claims: dict[str, tuple[int, str]]

    @property
    def indexes(self) -> list[int]:
        """The index of each list that was read (the claims' only when they could be)."""
        indexes = [self.services_index, self.checks_index]
        return [*indexes, self.claims_index] if self.claims_index else indexes

    @property
    def revision(self) -> int:
        """The lowest index: a watch resumed from it cannot miss a change that landed between
        the reads (at worst it wakes once for nothing)."""
        return min(self.indexes)


class _WatchState:
    """What a watch's pollers share: the lists last seen, the client reading the check list,
    and the indexes at which checks were seen to change (to explain a service list move)."""

    def __init__(self, seen: _Seen, fetcher: consul.Consul) -> None:
        self.lock = threading.Lock()
        self.seen = dataclasses.replace(seen)  # its fields are replaced, never changed in place
        self.fetcher = fetcher
        self.recorded: set[int] = set()

    def explained(self, old: int, new: int) -> bool:
        """Whether a check changed at an index in (old, new], the service list's move; forgets
        those up to ``new``, the index the service list is watched from now on."""
        with self.lock:
            found = any(old < index <= new for index in self.recorded)
            self.recorded = {index for index in self.recorded if index > new}
            self.seen.services_index = new
            return found

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.fetcher.http.session.close()


#: A poller's handler: (index before, index now, answer) -> the services named (``None``:
#: unknown, read everything).
_Handler = Callable[[int, int, Any], "set[str] | None"]


def _txn_answer(response: Any) -> tuple[bool, Any]:
    """``/v1/txn``: (True, results) on 200, (False, errors) on 409 (a check failed)."""
    if response.code == 409:
        try:
            return False, json.loads(response.body).get("Errors")
        except (ValueError, AttributeError):
            return False, response.body
    CB._status(response, allow_404=False)
    return True, json.loads(response.body).get("Results") or []


def _kv_op(verb: str, key: str, value: str | None = None, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"Verb": verb, "Key": key, **extra}
    if value is not None:
        op["Value"] = base64.b64encode(value.encode()).decode("ascii")
    return {"KV": op}


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
        if config.token_in_clear:
            log.warning(
                "consul: the ACL token is sent without TLS to %s; use an https:// address "
                "(or ssl = true) or the local agent, so that it cannot be read on the network",
                config.url,
            )
        self._client = self._new_client()  # register side (calls serialised by _lock)
        self._reader = self._new_client()  # snapshots (serialised by _read_lock)
        self._lock = threading.RLock()
        self._read_lock = threading.Lock()
        self._owned: dict[str, ServiceInstance] = {}
        self._closed = threading.Event()
        # Claims (register side, under _lock): the session holding this agent's claim keys,
        # the services held (at which port), those kept from their port, and those whose claim
        # could not be settled ("": contention; otherwise why), tried again at keepalive.
        self._session: str | None = None
        self._held: dict[str, int] = {}
        self._blocked: dict[str, _Blocked] = {}
        self._pending: dict[str, str] = {}
        # Discover side: what the last snapshot read of the lists a watch follows.
        self._seen: _Seen | None = None

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
            return PermissionDenied(
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
            service = instance.service
            settled = service in self._held or service in self._blocked or service in self._pending
            if instance.frontend_port is not None and not settled:
                self._claim(service, instance.frontend_port)

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
            service = instance.service
            if any(i.service == service for i in self._owned.values()):
                return
            self._blocked.pop(service, None)
            self._pending.pop(service, None)
            port = self._held.get(service)
            if port is not None and self._session is not None:
                self._release(service, port, self._session)
            self._held.pop(service, None)

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
                    self._held.clear()
                    self._blocked.clear()
                    self._pending.clear()
                    return False
            try:
                self._upkeep()
            except PluginError as exc:
                # The instances are fine: the claims are looked at again at the next keepalive.
                log.warning("consul: could not keep this agent's port claims: %s", exc)
            return True

    def keepalive_interval(self) -> float:
        return self.config.ttl / 3

    # ----------------------------------------------------------------------------------------
    # Frontend-port claims (register side, called under _lock)

    def _put(self, what: str, path: str, body: Any = None) -> Any:
        """A raw PUT in the agent's own datacenter (sessions: the local node's)."""
        client = self._client
        data = "" if body is None else json.dumps(body)
        return self._call(
            what,
            lambda: client.http.put(
                CB.json(allow_404=False), path, data=data, headers=client.prepare_headers()
            ),
        )

    def _txn(self, what: str, ops: list[dict[str, Any]]) -> tuple[bool, Any]:
        client = self._client
        answer: tuple[bool, Any] = self._call(
            what,
            lambda: client.http.put(
                _txn_answer, "/v1/txn", data=json.dumps(ops), headers=client.prepare_headers()
            ),
        )
        ok, errors = answer
        if not ok and "permission denied" in str(errors).lower():
            # Consul answers a transaction the token may not make with 409, like a failed check.
            raise PermissionDenied(
                f"consul at {self.config.url}: {what}: permission denied; check the ACL token "
                "(option token, CONSUL_HTTP_TOKEN)"
            )
        return answer

    def _kv_read(self, prefixes: list[str]) -> dict[str, KVEntry]:
        """Every entry under each of ``prefixes``, in one transaction (one consistent read),
        by key. A prefix is matched as such: callers look up the exact keys they want."""
        ok, results = self._txn("read claims", [_kv_op("get-tree", p) for p in prefixes])
        if not ok:
            raise PluginError(f"consul at {self.config.url}: reading claims failed: {results}")
        found: dict[str, KVEntry] = {}
        for result in results if isinstance(results, list) else []:
            item = dict(result.get("KV") or {}) if isinstance(result, dict) else {}
            if isinstance(item.get("Value"), str):
                item["Value"] = base64.b64decode(item["Value"])
            entry = KVEntry.parse(item)
            if entry is not None:
                found[entry.key] = entry
        return found

    def _ensure_session(self) -> str:
        if self._session is None:
            ttl = min(max(self.config.ttl, SESSION_TTL_MIN), SESSION_TTL_MAX)
            answer = self._put(
                "create a session",
                "/v1/session/create",
                {
                    "Name": f"discoverd {self.host_id or 'agent'}",
                    "Behavior": "delete",  # its claims go with it
                    "TTL": f"{ttl}s",
                    "LockDelay": "0s",  # a restarted agent claims again at once
                },
            )
            session = answer.get("ID") if isinstance(answer, dict) else None
            if not isinstance(session, str) or not session:
                raise PluginError(f"consul at {self.config.url}: no session id in {answer!r:.80}")
            self._session = session
            log.debug("consul: session %s holds this agent's claims", session)
        return self._session

    def _claim(self, service: str, wanted: int) -> None:
        """Hold ``service``'s claim (see the module): at the port its holders hold, else at
        ``wanted``; unless another service holds that port."""
        try:
            self._try_claim(service, wanted)
        except PermissionDenied as exc:
            self._pending[service] = (
                f"frontend port {wanted} could not be claimed ({exc}): the token needs "
                f"key write on {self.config.kv_prefix}/ and session write"
            )

    def _try_claim(self, service: str, wanted: int) -> None:
        kv = self.config.kv_prefix
        holders_dir = f"{claims_prefix(kv)}{service}/"
        service_key = service_record(kv, service)
        for attempt in range(1, CLAIM_ATTEMPTS + 1):
            session = self._ensure_session()
            seen = self._kv_read([holders_dir, service_key, port_record(kv, wanted)])
            live = sorted(
                (e for k, e in seen.items() if k.startswith(holders_dir) and e.session),
                key=lambda e: (e.create_index, e.key),
            )
            port = next((e.port for e in live if e.port is not None), wanted)
            record_key = port_record(kv, port)
            if port != wanted:
                seen.update(self._kv_read([record_key]))
            record = seen.get(record_key)
            owner = record.text if record is not None else ""
            if owner and owner != service:
                others = self._kv_read([f"{claims_prefix(kv)}{owner}/"])
                if any(e.session for e in others.values()):
                    self._blocked[service] = _Blocked(port, owner)
                    self._pending.pop(service, None)
                    log.debug("consul: frontend port %d of %s is held by %s", port, service, owner)
                    return
                # The record is left over (its service has no holder any more): take it.
            record_of_service = seen.get(service_key)
            ok, errors = self._txn(
                "claim",
                [
                    _kv_op("cas", service_key, str(port),
                           Index=record_of_service.modify_index if record_of_service else 0),
                    _kv_op("cas", record_key, service,
                           Index=record.modify_index if record else 0),
                    _kv_op("lock", holder_key(kv, service, session), str(port), Session=session),
                ],
            )  # fmt: skip
            if ok:
                self._held[service] = port
                self._blocked.pop(service, None)
                self._pending.pop(service, None)
                log.debug("consul: claimed frontend port %d for %s", port, service)
                return
            if "session" in str(errors).lower():
                self._session = None  # invalidated meanwhile: a new one next round
            log.debug("consul: claim of %s changed under us (attempt %d)", service, attempt)
        self._pending[service] = ""

    def _release(self, service: str, port: int, session: str) -> None:
        """This agent serves ``service`` no more: drop its holder key; when it was the last
        holder, the records too (check-and-set: a holder joining meanwhile keeps them)."""
        kv = self.config.kv_prefix
        holders_dir = f"{claims_prefix(kv)}{service}/"
        mine = holder_key(kv, service, session)
        service_key, record_key = service_record(kv, service), port_record(kv, port)
        for _ in range(3):
            seen = self._kv_read([holders_dir, service_key, record_key])
            others = [e for k, e in seen.items() if k.startswith(holders_dir) and k != mine]
            ops = [_kv_op("delete", mine)]
            if not any(e.session for e in others):
                for key in (service_key, record_key):
                    entry = seen.get(key)
                    if entry is not None and (key == service_key or entry.text == service):
                        ops.append(_kv_op("delete-cas", key, Index=entry.modify_index))
            ok, _ = self._txn("release a claim", ops)
            if ok:
                return
        self._txn("release a claim", [_kv_op("delete", mine)])

    def _upkeep(self) -> None:
        """Renew the session (a new one, and every claim again, if Consul lost it); look again
        at the services kept from their port, and claim those that may now succeed."""
        if self._session is not None:
            session = self._session
            client = self._client
            renewed = self._call(
                "renew the session",
                lambda: client.http.put(
                    CB.json(), f"/v1/session/renew/{session}", headers=client.prepare_headers()
                ),
            )
            if not renewed:  # 404: invalidated (TTL run out, node failed, agent restarted)
                log.warning(
                    "consul: session %s is gone; claiming this agent's ports again", session
                )
                self._session = None
                for service in sorted(self._held):
                    self._held.pop(service)
                    self._pending[service] = ""
        retry = sorted(self._pending)[:UPKEEP_BLOCKED]
        blocked = sorted(self._blocked)[:UPKEEP_BLOCKED]
        if blocked:
            kv = self.config.kv_prefix
            prefixes = []
            for service in blocked:
                entry = self._blocked[service]
                prefixes += [f"{claims_prefix(kv)}{entry.owner}/", port_record(kv, entry.port)]
            seen = self._kv_read(prefixes)
            for service in blocked:
                entry = self._blocked[service]
                record = seen.get(port_record(kv, entry.port))
                holders = f"{claims_prefix(kv)}{entry.owner}/"
                held = any(k.startswith(holders) and e.session for k, e in seen.items())
                if not held or record is None or record.text != entry.owner:
                    retry.append(service)
        for service in retry:
            self._claim_again(service)

    def _claim_again(self, service: str) -> None:
        """Claim ``service`` for the instances this agent already registered."""
        ports = Counter(
            i.frontend_port
            for i in self._owned.values()
            if i.service == service and i.frontend_port is not None
        )
        self._blocked.pop(service, None)
        self._pending.pop(service, None)
        if not ports:
            return
        top = max(ports.values())
        self._claim(service, min(p for p, n in ports.items() if n == top))
        if service in self._held:
            log.info("consul: frontend port %d claimed for %s", self._held[service], service)

    def conflicts(self) -> list[Problem]:
        """Problems of this agent's registrations that the claims show (no I/O)."""
        with self._lock:
            return claim_problems(
                self._owned.values(),
                self._held,
                {service: (b.port, b.owner) for service, b in self._blocked.items()},
                self._pending,
            )

    # ----------------------------------------------------------------------------------------
    # Discover side

    def snapshot(self) -> Catalog:
        client = self._reader
        tag = self.config.tag
        with self._read_lock:
            # The lists first: every change up to the revision is then in the reads that follow,
            # and every later one moves one of the indexes the watch blocks on.
            seen, checks, claims = self._read_lists(client)
            names = sorted(
                name
                for name, tags in seen.services.items()
                if name != CONSUL_SERVICE and (not tag or tag in tags)
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
            self._seen = seen
        return read_catalog(entries, Health.from_checks(checks), seen.revision, tag, claims)

    def _read_lists(self, client: consul.Consul) -> tuple[_Seen, list[Any], Claims]:
        """The three lists a watch follows (services, checks, claims), read now."""
        services_index, services = self._call("list services", lambda: client.catalog.services())
        checks_index, checks = self._call("read checks", lambda: client.health.state("any"))
        claims_index, claim_entries, problem = self._claim_keys(client)
        claims = read_claims(self.config.kv_prefix, claim_entries)
        claims.problems.extend([problem] if problem else [])
        seen = _Seen(
            services_index=_index(services_index),
            services=service_tags(services),
            checks_index=_index(checks_index),
            checks=check_table(checks),
            claims_index=claims_index,
            claims=claim_table(claim_entries),
        )
        return seen, checks if isinstance(checks, list) else [], claims

    def _claim_keys(
        self, client: consul.Consul, service: str = ""
    ) -> tuple[int, list[KVEntry], Problem | None]:
        """The claim keys (of ``service`` only, if named) and the index of their prefix; a
        token that may not read them gives index 0 and a problem, not an error: the proxies
        then decide ports on their own."""
        prefix = claims_prefix(self.config.kv_prefix)
        if service:
            prefix = f"{prefix}{quote(service, safe='')}/"
        try:
            index, listed = self._call("read claims", lambda: client.kv.get(prefix, recurse=True))
        except PermissionDenied as exc:
            return 0, [], Problem(f"consul key {prefix}", f"{exc}; frontend-port claims not read")
        return _index(index), KVEntry.parse_all(listed), None

    def read_services(self, names: Collection[str]) -> Catalog | None:
        """The named services' instances and health (``/v1/health/service/<name>``) and their
        claims: two requests per service. More than ``READ_SERVICES_MAX`` services: ``None``
        (a full read then takes fewer requests)."""
        wanted = sorted({str(n) for n in names if n and n != CONSUL_SERVICE})
        if len(wanted) > READ_SERVICES_MAX:
            return None
        client = self._reader
        entries: list[Entry] = []
        checks: list[Any] = []
        keys: list[KVEntry] = []
        problems: list[Problem] = []
        revision = 1
        with self._read_lock:
            for name in wanted:
                index, answer = self._call(
                    f"read service {name}", partial(client.health.service, quote(name, safe=""))
                )
                revision = max(revision, _index(index))
                found, their_checks = entries_from_health(answer)
                entries.extend(found)
                checks.extend(their_checks)
                _, listed, problem = self._claim_keys(client, name)
                keys.extend(listed)
                problems.extend([problem] if problem else [])
        claims = read_claims(self.config.kv_prefix, keys)
        claims.problems.extend(problems)
        return read_catalog(entries, Health.from_checks(checks), revision, self.config.tag, claims)

    def watch(self, notify: Notify, stop: threading.Event, since: int) -> None:
        """Three blocking queries (services, checks, claims), each answer compared with the
        one before it to name the services that changed (see ``changes.py``). A watch from
        the revision of this registry's last snapshot starts from what that snapshot read;
        any other starts from the lists as they are now, and says at once if they moved
        since ``since``."""
        fetcher = self._new_client()  # the check lists (calls serialised by the state's lock)
        try:
            seen = self._seen if self._seen is not None and since == self._seen.revision else None
            if seen is None:
                seen, _, _ = self._read_lists(fetcher)
                if since > 0 and seen.revision < since:
                    log.info("consul: index went back from %d to %d", since, seen.revision)
                    notify("consul index reset")
                elif since > 0 and max(seen.indexes) > since:
                    notify("consul changed since the last read")
        except BaseException:
            fetcher.http.session.close()
            raise
        state = _WatchState(seen, fetcher)
        events: queue.Queue[tuple[str, Any, frozenset[str] | None]] = queue.Queue()
        halt = threading.Event()
        claims = claims_prefix(self.config.kv_prefix)
        pollers: list[tuple[str, Callable[..., Any], int, _Handler]] = [
            (
                "services",
                lambda c, **kw: c.catalog.services(**kw),
                seen.services_index,
                partial(self._on_services, state),
            ),
            (
                "checks",
                lambda c, **kw: c.health.state("any", filter_expr=NO_CHECK_FILTER, **kw),
                seen.checks_index,
                partial(self._on_checks, state),
            ),
        ]
        if seen.claims_index:
            pollers.append(
                (
                    "claims",
                    lambda c, **kw: c.kv.get(claims, recurse=True, **kw),
                    seen.claims_index,
                    partial(self._on_claims, state),
                )
            )
        for name, query, start, handle in pollers:
            threading.Thread(
                target=self._poll,
                args=(name, query, start, handle, events, halt),
                name=f"discoverd-consul-watch-{name}",
                daemon=True,
            ).start()
        try:
            while not (stop.is_set() or self._closed.is_set()):
                try:
                    kind, value, services = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if kind == "error":
                    raise value
                if services is None:
                    notify(value)
                else:
                    notify(value, services=services)
        finally:
            # The workers leave after their current query (at most ``wait``); their answers
            # are thrown away. watch() itself returns now.
            halt.set()
            state.close()

    def _on_services(self, state: _WatchState, old: int, new: int, answer: Any) -> set[str] | None:
        tags = service_tags(answer)
        with state.lock:
            names = changed_names(state.seen.services, tags)
            state.seen.services = tags
        moved = self._advance_checks(state, None if new < old else new)
        explained = state.explained(old, new)
        if new < old or moved is None:
            return None
        # An instance added, removed or changed in an existing service moves the service list's
        # index but not the list: it is named by its check, which changed at the same index.
        # A change no check explains (a service without checks, one changed in place) cannot
        # be named: everything is read again.
        if not names and not explained:
            return None
        return names | moved

    def _on_checks(self, state: _WatchState, old: int, new: int, answer: Any) -> set[str] | None:
        return self._advance_checks(state, None if new < old else new)

    def _on_claims(self, state: _WatchState, old: int, new: int, answer: Any) -> set[str] | None:
        table = claim_table(KVEntry.parse_all(answer))
        with state.lock:
            keys = changed_names(state.seen.claims, table)
            state.seen.claims = table
        if new < old:
            return None
        return claimed_services(claims_prefix(self.config.kv_prefix), keys)

    def _advance_checks(self, state: _WatchState, at_least: int | None) -> set[str] | None:
        """Read the check list unless one at ``at_least`` or later was read already (``None``:
        read it anyway), and name the services whose checks moved since the last one."""
        with state.lock:
            if at_least is not None and state.seen.checks_index >= at_least:
                return set()
            index, answer = self._call("read checks", lambda: state.fetcher.health.state("any"))
            new, table = _index(index), check_table(answer)
            went_back = new < state.seen.checks_index
            changes = check_changes(state.seen.checks, table, new)
            state.seen.checks, state.seen.checks_index = table, new
            # Kept only while a move of the service list may still ask about them.
            floor = state.seen.services_index
            state.recorded = {i for i in state.recorded | changes.indexes if i > floor}
            return None if went_back else changes.services

    def _poll(
        self,
        name: str,
        query: Callable[..., Any],
        start: int,
        handle: _Handler,
        events: queue.Queue[tuple[str, Any, frozenset[str] | None]],
        halt: threading.Event,
    ) -> None:
        client = self._new_client()
        wait = f"{self.config.wait:g}s"
        index = start
        try:
            while not (halt.is_set() or self._closed.is_set()):
                answer = self._call(f"watch {name}", partial(query, client, index=index, wait=wait))
                if halt.is_set():
                    return
                new = _index(answer[0])
                if new == index:
                    continue
                if new < index:
                    # Consul's index went back (a new or restarted -dev agent): start over.
                    log.info("consul: %s index went back from %d to %d", name, index, new)
                names = handle(index, new, answer[1])
                if new < index:
                    events.put(("change", f"consul {name} index reset", None))
                elif names is None:
                    events.put(("change", f"consul {name} changed", None))
                elif names:
                    events.put(("change", f"consul {name} changed", frozenset(names)))
                index = new
        except PermissionDenied as exc:
            if name == "claims":  # the token may not read them: the snapshot says so
                log.debug("consul: not watching the claims: %s", exc)
            elif not halt.is_set():
                events.put(("error", exc, None))
        except PluginError as exc:
            if not halt.is_set():
                events.put(("error", exc, None))
        finally:
            with contextlib.suppress(Exception):
                client.http.session.close()

    # ----------------------------------------------------------------------------------------

    def close(self, deregister: bool = False) -> None:
        self._closed.set()
        with self._lock:
            owned, self._owned = self._owned, {}
            session, self._session = self._session, None
            self._held.clear()
            self._blocked.clear()
            self._pending.clear()
            try:
                if deregister:
                    failures: list[str] = []
                    if session is not None:  # its claim keys go with it (Behavior=delete)
                        try:
                            self._put("destroy the session", f"/v1/session/destroy/{session}")
                        except PluginError as exc:
                            failures.append(str(exc))
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
