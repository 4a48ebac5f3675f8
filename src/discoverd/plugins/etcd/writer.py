"""The register side of the etcd registry: one lease per agent, the keys on it, and the
frontend-port claims.

The lease is granted on first use; every key this agent writes is attached to it, so a dead
host's entries vanish together when it expires, and revoking it removes them all at once. What
this writer keeps between calls is what it owns: the lease, the instances written under it,
whether entries were lost since the last keepalive (reported once, so the core registers
everything again), and the state of its claims (which services it holds at which port, which
ones another service keeps from their port: :meth:`LeaseWriter.conflicts`).

**Port claims.** Every host serving a service holds its claim: two keys on the host's own lease,
``<claim_prefix>/services/<service>/<holder>`` = port and
``<claim_prefix>/ports/<port>/<service>/<holder>`` = service (``<holder>`` is the host id). A
claim therefore lasts exactly as long as one host serving the service is alive, and no
re-assertion is needed for it: when one holder dies the others still hold it. A host takes or
joins a claim with one transaction that compares

* that no other service holds the port (the two key ranges of ``.../ports/<port>/`` either side
  of the service's own directory are empty), and
* that the service's holders did not change since they were read (they decide the port),

and, only if both hold, writes its instance keys and its two claim keys. The port is the one the
service's holders hold; without holders, the seed's ``<prefix>/<service>/port`` key; without
either, the port the instances ask for. So a service keeps its port, on every host and across
restarts, as long as one instance of it is registered anywhere; a host asking another port for
it is told (:meth:`conflicts`) and its instances are served on the fleet's port.

The seed's shared ``port`` key is created once (compare ``create_revision == 0``), never
overwritten, on the lease of the host that created it. When that host leaves gracefully the key
is handed to the lease of another holder; when it dies, the key goes with its lease and every
other holder writes it again (create-only) at its next keepalive, which checks the port keys of
the services it holds (at most ``UPKEEP_SERVICES`` per keepalive, in turn). The original
docker-discover reads that key; discoverd's own readers take the port from the claim.

A service whose port another service holds is registered all the same (the core leaves it out of
the proxies, since the claim names the other service) and its claim is tried again at every
keepalive, so it gets the port as soon as the last holder of the other service is gone.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from discoverd import PluginError, Problem, ServiceInstance, claim_problems
from discoverd.plugins.etcd.gateway import (
    GRPC_NOT_FOUND,
    GRPC_PERMISSION_DENIED,
    EtcdError,
    Gateway,
    b64,
    unb64,
)
from discoverd.plugins.etcd.keys import KeyScheme, encode_metadata

log = logging.getLogger("discoverd.etcd")
T = TypeVar("T")

#: Instances written per transaction: two keys each, the two claim keys and the port key,
#: within etcd's limit of 128 operations per transaction.
PER_TXN = 40
#: Transactions one claim may take before it is left to the next keepalive (each failure is a
#: concurrent change of the same service or port by another host).
CLAIM_ATTEMPTS = 8
#: Held services whose ``port`` key one keepalive checks (one compare each, one transaction).
UPKEEP_SERVICES = 60
#: Services kept from their port whose claim one keepalive looks at again.
UPKEEP_BLOCKED = 20


@dataclass(frozen=True)
class _Held:
    """This host holds the claim of a service at ``port``, under the name ``holder``."""

    port: int
    holder: str


@dataclass(frozen=True)
class _Blocked:
    """Another service, ``owner``, holds ``port``: the one this service should have."""

    port: int
    owner: str


@dataclass(frozen=True)
class _HolderKey:
    key: bytes
    port: int | None
    create_revision: int
    lease: int


@dataclass(frozen=True)
class _Seen:
    """What a failed claim transaction read (at ``revision``)."""

    revision: int
    holders: tuple[_HolderKey, ...]
    port_key: int | None
    owner: str  # another service holding the port the transaction tried ("" if none)

    def fleet_port(self, wanted: int) -> int:
        """The service's port: its oldest holder's, else the ``port`` key's, else ``wanted``."""
        for holder in sorted(self.holders, key=lambda h: (h.create_revision, h.key)):
            if holder.port is not None:
                return holder.port
        return self.port_key if self.port_key is not None else wanted


class LeaseWriter:
    """Writes this agent's instances and claims on its lease; keeps the lease alive; revokes
    it."""

    def __init__(self, gateway: Gateway, scheme: KeyScheme, ttl: int, host_id: str = "") -> None:
        self.gateway = gateway
        self.scheme = scheme
        self.ttl = ttl
        self.host_id = host_id
        self._lock = threading.RLock()
        self._lease: int | None = None
        self._lost = False  # entries were lost since the last keepalive: report it once
        self._owned: dict[str, ServiceInstance] = {}
        self._held: dict[str, _Held] = {}
        self._blocked: dict[str, _Blocked] = {}
        #: Services whose claim could not be settled (``""``: contention, retried quietly;
        #: otherwise why, e.g. permission denied), tried again at each keepalive.
        self._pending: dict[str, str] = {}
        self._cursor = 0
        self._closed = False

    @property
    def lease_id(self) -> int | None:
        """The lease this agent's keys are attached to (``None`` until the first register)."""
        return self._lease

    # ------------------------------------------------------------------------------------
    # Register and deregister

    def register(self, instance: ServiceInstance) -> None:
        with self._lock:
            previous = self._owned.get(instance.id)
            if previous is not None and previous.service != instance.service:
                self.deregister(previous)
            self._write(instance.service, instance.frontend_port, [instance])

    def register_many(self, instances: Sequence[ServiceInstance]) -> None:
        """One transaction per service (and per ``PER_TXN`` instances), not one per instance
        (a service's first registration on this host takes one more, to read its claim)."""
        with self._lock:
            groups: dict[tuple[str, int | None], list[ServiceInstance]] = {}
            for instance in instances:
                previous = self._owned.get(instance.id)
                if previous is not None and previous.service != instance.service:
                    self.deregister(previous)
                groups.setdefault((instance.service, instance.frontend_port), []).append(instance)
            for (service, frontend_port), members in sorted(
                groups.items(), key=lambda item: (item[0][0], item[0][1] or 0)
            ):
                for first in range(0, len(members), PER_TXN):
                    self._write(service, frontend_port, members[first : first + PER_TXN])

    def _write(
        self, service: str, frontend_port: int | None, instances: Sequence[ServiceInstance]
    ) -> None:
        """Put the keys of ``instances`` (all of ``service``) on this agent's lease, with the
        service's claim when this host does not hold it yet."""
        scheme = self.scheme
        puts: list[tuple[str, str]] = []
        for instance in instances:
            puts.append((scheme.backend_key(service, instance.id), instance.endpoint))
            puts.append(
                (scheme.meta_key(service, instance.id), encode_metadata(instance, self.host_id))
            )
        settled = service in self._held or service in self._blocked or service in self._pending
        if frontend_port is None or settled:
            self._on_lease(lambda lease: self._plain("register", puts, lease))
        else:
            self._on_lease(lambda lease: self._claim(service, frontend_port, puts, lease))
        for instance in instances:
            self._owned[instance.id] = instance

    def _on_lease(self, fn: Callable[[int], T]) -> T:
        """Run ``fn`` with this agent's lease; once more with a new one if etcd lost it."""
        lease = self._ensure_lease()
        try:
            return fn(lease)
        except EtcdError as exc:
            if exc.code != GRPC_NOT_FOUND:
                raise
            # The lease is gone (etcd was down longer than the TTL, or wiped): every key of
            # this agent went with it. Start a new lease and report the loss at keepalive.
            log.warning("etcd: lease %x no longer exists; granting a new one", lease)
            self._drop_lease()
            return fn(self._ensure_lease())

    def _plain(self, what: str, puts: list[tuple[str, str]], lease: int) -> None:
        if puts:
            self.gateway.txn(what, [], _puts(puts, lease), [])

    def _claim(self, service: str, wanted: int, puts: list[tuple[str, str]], lease: int) -> None:
        """Write ``puts`` together with this host's claim of ``service`` (see the module).

        The first transaction assumes the common case: the service is already held at
        ``wanted`` by other hosts and no other service holds that port. When it fails, its
        failure branch has read what decides (the service's holders, its ``port`` key, who
        else holds the port), and the next one compares against exactly that.
        """
        scheme = self.scheme
        holder = self.host_id or f"lease-{lease:x}"
        holders = scheme.holders_range(service)
        port = wanted
        compare = [_range_compare(holders, "VALUE", "EQUAL", value=b64(str(wanted)))]
        for attempt in range(1, CLAIM_ATTEMPTS + 1):
            claim = [
                (scheme.holder_key(service, holder), str(port)),
                (scheme.port_holder_key(port, service, holder), service),
            ]
            success = [
                *_puts([*puts, *claim], lease),
                _create(scheme.port_key(service), str(port), lease),
            ]
            failure = [
                _range(holders),
                _range((scheme.port_key(service).encode(), b"")),
                *(_range(r, keys_only=True, limit=1) for r in scheme.others_at(port, service)),
            ]
            compare = [
                *compare,
                *(_range_compare(r, "CREATE", "EQUAL", create_revision="0")
                  for r in scheme.others_at(port, service)),
            ]  # fmt: skip
            try:
                reply = self.gateway.txn("claim", compare, success, failure)
            except EtcdError as exc:
                if exc.code != GRPC_PERMISSION_DENIED:
                    raise
                # The user may write instances but not claims: register them unclaimed.
                self._plain("register", puts, lease)
                self._pending[service] = (
                    f"frontend port {wanted} could not be claimed ({exc}); give the etcd user "
                    f"write access to {scheme.claim_prefix}/"
                )
                return
            if reply.get("succeeded"):
                self._held[service] = _Held(port, holder)
                self._blocked.pop(service, None)
                self._pending.pop(service, None)
                log.debug("etcd: %s claims frontend port %d for %s", holder, port, service)
                return
            seen = _seen(reply, scheme)
            fleet = seen.fleet_port(wanted)
            if fleet == port and seen.owner:
                self._plain("register", puts, lease)
                self._blocked[service] = _Blocked(port, seen.owner)
                self._pending.pop(service, None)
                log.debug("etcd: frontend port %d of %s is held by %s", port, service, seen.owner)
                return
            log.debug("etcd: claim of %s changed under us (attempt %d)", service, attempt)
            port = fleet
            if seen.holders and all(h.port == fleet for h in seen.holders):
                # Held at that port: join, whoever else joins meanwhile.
                compare = [_range_compare(holders, "VALUE", "EQUAL", value=b64(str(fleet)))]
            else:
                # No holder yet (or holders that disagree): they must be those just read.
                compare = [
                    _range_compare(holders, "MOD", "LESS", mod_revision=str(seen.revision + 1))
                ]
        # Other hosts kept changing the claim: write the instances; the next keepalive claims.
        self._plain("register", puts, lease)
        self._pending[service] = ""

    def deregister(self, instance: ServiceInstance) -> None:
        with self._lock:
            owned = self._owned.get(instance.id)
            if owned is not None and owned.service == instance.service:
                del self._owned[instance.id]
            scheme = self.scheme
            service = instance.service
            deletes = [
                _delete(scheme.backend_key(service, instance.id)),
                _delete(scheme.meta_key(service, instance.id)),
            ]
            still_serving = any(i.service == service for i in self._owned.values())
            lease = self._lease
            if still_serving or lease is None:
                self.gateway.txn("deregister", [], deletes, [])
                return
            self._blocked.pop(service, None)
            self._pending.pop(service, None)
            held = self._held.get(service)
            if held is None:
                # Not ours to hand over: the port key goes only if it is on our lease.
                port_key = scheme.port_key(service)
                mine = [_lease_compare(port_key, lease)]
                self.gateway.txn("deregister", mine, [*deletes, _delete(port_key)], deletes)
                return
            # Forgotten only once its keys are gone: if this raises, the core deregisters
            # again and the claim is dropped then (it must not stay on our lease for good).
            self._leave(service, held, deletes, lease)
            self._held.pop(service, None)

    def _leave(self, service: str, held: _Held, deletes: list[dict[str, Any]], lease: int) -> None:
        """This host serves ``service`` no more: drop its claim; hand the ``port`` key, when it
        is on our lease, to another holder's lease (or delete it when there is none)."""
        scheme = self.scheme
        port_key = scheme.port_key(service)
        holders = scheme.holders_range(service)
        own_holder = scheme.holder_key(service, held.holder)
        drops = [
            *deletes,
            _delete(own_holder),
            _delete(scheme.port_holder_key(held.port, service, held.holder)),
        ]
        mine = [_lease_compare(port_key, lease)]
        reply = self.gateway.txn(
            "deregister",
            mine,
            [*drops, _range(holders), _range((port_key.encode(), b""))],
            drops,
        )
        if not reply.get("succeeded"):
            return  # the port key is not on our lease: nothing to hand over
        responses = _responses(reply)
        others = sorted(
            (
                h
                for h in _holder_keys(responses[len(drops)])
                if h.lease and h.key != own_holder.encode()
            ),
            key=lambda h: (h.create_revision, h.key),
        )
        value = next((v for _, v, _, _ in _kvs(responses[len(drops) + 1])), b"")
        if others and value:
            heir = others[0]
            handed = self.gateway.txn(
                "hand over the port key",
                [*mine, _lease_compare(heir.key.decode(), heir.lease)],
                _puts([(port_key, value.decode())], heir.lease),
                [],
            )
            if handed.get("succeeded"):
                log.debug("etcd: port key of %s handed to lease %x", service, heir.lease)
                return
        self.gateway.txn("deregister", mine, [_delete(port_key)], [])

    # ------------------------------------------------------------------------------------
    # Keepalive

    def keepalive(self) -> bool:
        with self._lock:
            if self._lease is not None:
                lease = self._lease
                ttl = self.gateway.lease_keepalive(lease)
                if ttl <= 0:
                    log.warning("etcd: lease %x expired or was revoked", lease)
                    self._drop_lease()
            if self._lost:
                if self._lease is None:
                    self._ensure_lease()
                self._lost = False
                return False
            try:
                self._upkeep()
            except PluginError as exc:
                # The lease is fine: the claims are checked again at the next keepalive.
                log.warning("etcd: could not check this host's port claims: %s", exc)
            return True

    def _upkeep(self) -> None:
        """One transaction: are the ``port`` keys of (some of) the services this host holds
        still there, and are the services kept from their port still kept? In the common case
        (yes and yes) it answers nothing more. Then write the missing port keys again and try
        the claims that may now succeed."""
        lease = self._lease
        if lease is None or not (self._held or self._blocked or self._pending):
            return
        scheme = self.scheme
        held = sorted(self._held)
        if len(held) > UPKEEP_SERVICES:
            start = self._cursor % len(held)
            held = (held[start:] + held[:start])[:UPKEEP_SERVICES]
            self._cursor = start + UPKEEP_SERVICES
        blocked = sorted(self._blocked)[:UPKEEP_BLOCKED]
        retry = sorted(self._pending)[:UPKEEP_BLOCKED]
        if held or blocked:
            compare = [
                *(_key_compare(scheme.port_key(s), "CREATE", "GREATER", create_revision="0")
                  for s in held),
                *(_range_compare(scheme.owner_range(b.port, b.owner), "CREATE", "GREATER",
                                 create_revision="0")
                  for b in (self._blocked[s] for s in blocked)),
            ]  # fmt: skip
            failure = [
                *(_range((scheme.port_key(s).encode(), b""), keys_only=True) for s in held),
                *(
                    _range(r, keys_only=True, limit=1)
                    for s in blocked
                    for r in scheme.others_at(self._blocked[s].port, s)
                ),
            ]
            reply = self.gateway.txn("claims check", compare, [], failure)
            if not reply.get("succeeded"):
                responses = _responses(reply)
                missing = [s for n, s in enumerate(held) if not _kvs(responses[n])]
                if missing:
                    creates = [
                        _create(scheme.port_key(s), str(self._held[s].port), lease) for s in missing
                    ]
                    self.gateway.txn("port keys", [], creates, [])
                    log.info(
                        "etcd: port key of %s was gone (its writer left); written again",
                        ", ".join(missing),
                    )
                for n, service in enumerate(blocked):
                    left, right = responses[len(held) + 2 * n : len(held) + 2 * n + 2]
                    owners = [scheme.service_at(k) for k, _, _, _ in (*_kvs(left), *_kvs(right))]
                    owner = next((o for o in owners if o), "")
                    if owner:
                        self._blocked[service] = _Blocked(self._blocked[service].port, owner)
                    else:
                        retry.append(service)
        for service in retry:
            self._claim_again(service, lease)

    def _claim_again(self, service: str, lease: int) -> None:
        """Claim ``service`` for the instances this host already registered."""
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
        wanted = min(p for p, n in ports.items() if n == top)
        self._claim(service, wanted, [], lease)
        if service in self._held:
            log.info("etcd: frontend port %d claimed for %s", self._held[service].port, service)

    # ------------------------------------------------------------------------------------
    # Conflicts

    def conflicts(self) -> list[Problem]:
        """Problems of this host's registrations that the claims show (no I/O)."""
        with self._lock:
            return claim_problems(
                self._owned.values(),
                {service: held.port for service, held in self._held.items()},
                {service: (b.port, b.owner) for service, b in self._blocked.items()},
                self._pending,
            )

    # ------------------------------------------------------------------------------------
    # The lease

    def _ensure_lease(self) -> int:
        if self._closed:
            # A register still running while the agent shuts down must not grant a new lease
            # after close() revoked ours: its entries would outlive the exit by a TTL.
            raise PluginError("etcd registry is closed; not registering")
        if self._lease is None:
            ttl = self.ttl
            self._lease = self.gateway.lease_grant(ttl)
            log.debug("etcd: granted lease %x (ttl %ds)", self._lease, ttl)
        return self._lease

    def _drop_lease(self) -> None:
        self._lease = None
        self._lost = bool(self._owned) or self._lost
        self._owned.clear()
        self._held.clear()
        self._blocked.clear()
        self._pending.clear()

    def refuse_writes(self) -> None:
        """From now on, write nothing (the registry is closing); a running call may finish."""
        self._closed = True

    def close(self, revoke: bool) -> None:
        """Forget the lease; with ``revoke``, revoke it (this agent's keys vanish at once)."""
        self.refuse_writes()
        with self._lock:
            lease, self._lease = self._lease, None
            self._owned.clear()
            self._held.clear()
            self._blocked.clear()
            self._pending.clear()
            if revoke and lease is not None:
                self._revoke(lease)

    def _revoke(self, lease: int) -> None:
        try:
            self.gateway.lease_revoke(lease)
        except EtcdError as exc:
            if exc.code != GRPC_NOT_FOUND:  # already gone: nothing left to remove
                raise


# ----------------------------------------------------------------------------------------
# Transaction pieces (the JSON gateway's form of etcd's TxnRequest)


def _puts(items: list[tuple[str, str]], lease: int) -> list[dict[str, Any]]:
    return [
        {"request_put": {"key": b64(key), "value": b64(value), "lease": str(lease)}}
        for key, value in items
    ]


def _delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def _create(key: str, value: str, lease: int) -> dict[str, Any]:
    """Put ``key`` only if it does not exist (a nested transaction: the outer one goes on)."""
    return {
        "request_txn": {
            "compare": [_key_compare(key, "CREATE", "EQUAL", create_revision="0")],
            "success": _puts([(key, value)], lease),
            "failure": [],
        }
    }


def _range(
    key_range: tuple[bytes, bytes], *, keys_only: bool = False, limit: int = 0
) -> dict[str, Any]:
    start, end = key_range
    request: dict[str, Any] = {"key": b64(start)}
    if end:
        request["range_end"] = b64(end)
    if keys_only:
        request["keys_only"] = True
    if limit:
        request["limit"] = str(limit)
    return {"request_range": request}


def _key_compare(key: str, target: str, result: str, **value: str) -> dict[str, Any]:
    return {"key": b64(key), "target": target, "result": result, **value}


def _range_compare(
    key_range: tuple[bytes, bytes], target: str, result: str, **value: str
) -> dict[str, Any]:
    """A compare that holds when it holds for every key of the range. For an empty range it
    holds for ``CREATE``/``MOD`` against 0 and never for ``VALUE`` (etcd's rule)."""
    start, end = key_range
    return {"key": b64(start), "range_end": b64(end), "target": target, "result": result, **value}


def _lease_compare(key: str, lease: int) -> dict[str, Any]:
    return _key_compare(key, "LEASE", "EQUAL", lease=str(lease))


def _responses(reply: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found = reply.get("responses") or []
    try:
        return [r.get("response_range") or {} for r in found]
    except AttributeError:
        raise PluginError(f"etcd: unexpected transaction answer ({reply!r:.120})") from None


def _kvs(response: Mapping[str, Any]) -> list[tuple[bytes, bytes, int, int]]:
    """``(key, value, create revision, lease)`` of each key of a range response."""
    found = []
    for kv in response.get("kvs") or []:
        found.append(
            (
                unb64(kv.get("key", "")),
                unb64(kv.get("value", "")),
                int(kv.get("create_revision", 0) or 0),
                int(kv.get("lease", 0) or 0),
            )
        )
    return found


def _holder_keys(response: Mapping[str, Any]) -> list[_HolderKey]:
    holders = []
    for key, value, created, lease in _kvs(response):
        text = value.decode("utf-8", errors="replace").strip()
        port = int(text) if text.isascii() and text.isdigit() and 0 < int(text) < 65536 else None
        holders.append(_HolderKey(key, port, created, lease))
    return holders


def _seen(reply: Mapping[str, Any], scheme: KeyScheme) -> _Seen:
    """Parse the failure branch of a claim transaction: holders, port key, other owners."""
    try:
        revision = int(reply["header"]["revision"])
        holders, port_key, left, right = _responses(reply)
    except (KeyError, TypeError, ValueError) as exc:
        raise PluginError(f"etcd: unexpected answer to a claim ({exc!r})") from None
    port: int | None = None
    for _, value, _, _ in _kvs(port_key):
        text = value.decode("utf-8", errors="replace").strip()
        if text.isascii() and text.isdigit() and 0 < int(text) < 65536:
            port = int(text)
    owners = [scheme.service_at(key) for key, _, _, _ in (*_kvs(left), *_kvs(right))]
    return _Seen(revision, tuple(_holder_keys(holders)), port, next((o for o in owners if o), ""))
