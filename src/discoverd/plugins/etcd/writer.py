"""The register side of the etcd registry: one lease per agent, and the keys on it.

The lease is granted on first use; every key this agent writes is attached to it, so a dead
host's entries vanish together when it expires, and revoking it removes them all at once. What
this writer keeps between calls is what it owns: the lease, the instances written under it, and
whether entries were lost since the last keepalive (reported once, so the core registers
everything again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from etcd3gw.lease import Lease

from discoverd import PluginError, ServiceInstance
from discoverd.plugins.etcd.gateway import GRPC_NOT_FOUND, EtcdError, Gateway, b64
from discoverd.plugins.etcd.keys import KeyScheme, encode_metadata

log = logging.getLogger("discoverd.etcd")

#: Instances written per transaction: two keys each and the port key, within etcd's limit of
#: 128 operations per transaction.
PER_TXN = 40


class LeaseWriter:
    """Writes this agent's instances on its lease; keeps the lease alive; revokes it."""

    def __init__(self, gateway: Gateway, scheme: KeyScheme, ttl: int, host_id: str = "") -> None:
        self.gateway = gateway
        self.scheme = scheme
        self.ttl = ttl
        self.host_id = host_id
        self._lock = threading.RLock()
        self._lease: int | None = None
        self._lost = False  # entries were lost since the last keepalive: report it once
        self._owned: dict[str, ServiceInstance] = {}
        self._closed = False

    @property
    def lease_id(self) -> int | None:
        """The lease this agent's keys are attached to (``None`` until the first register)."""
        return self._lease

    def register(self, instance: ServiceInstance) -> None:
        with self._lock:
            previous = self._owned.get(instance.id)
            if previous is not None and previous.service != instance.service:
                self.deregister(previous)
            self._write(instance.service, instance.frontend_port, [instance])

    def register_many(self, instances: Sequence[ServiceInstance]) -> None:
        """One transaction per service (and per ``PER_TXN`` instances), not one per instance."""
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
        """Put the keys of ``instances`` (all of ``service``) on this agent's lease."""
        scheme = self.scheme
        puts: list[tuple[str, str]] = []
        for instance in instances:
            puts.append((scheme.backend_key(service, instance.id), instance.endpoint))
            puts.append(
                (scheme.meta_key(service, instance.id), encode_metadata(instance, self.host_id))
            )
        # The port key is shared by every host of the service. When it already holds our
        # value it is left alone, so it stays with its writer (possibly a lease-less key of
        # the original docker-register) instead of moving onto our lease.
        compare: list[dict[str, str]] = []
        with_port = puts
        if frontend_port is not None:
            port_key = scheme.port_key(service)
            value = str(frontend_port)
            compare = [{"key": b64(port_key), "target": "VALUE", "result": "EQUAL",
                        "value": b64(value)}]  # fmt: skip
            with_port = [*puts, (port_key, value)]
        lease = self._ensure_lease()
        try:
            self.gateway.txn("register", compare, _puts(puts, lease), _puts(with_port, lease))
        except EtcdError as exc:
            if exc.code != GRPC_NOT_FOUND:
                raise
            # The lease is gone (etcd was down longer than the TTL, or wiped): every key of
            # this agent went with it. Start a new lease and report the loss at keepalive.
            log.warning("etcd: lease %x no longer exists; granting a new one", lease)
            self._drop_lease()
            lease = self._ensure_lease()
            self.gateway.txn("register", compare, _puts(puts, lease), _puts(with_port, lease))
        for instance in instances:
            self._owned[instance.id] = instance

    def deregister(self, instance: ServiceInstance) -> None:
        with self._lock:
            owned = self._owned.get(instance.id)
            if owned is not None and owned.service == instance.service:
                del self._owned[instance.id]
            scheme = self.scheme
            deletes = [
                _delete(scheme.backend_key(instance.service, instance.id)),
                _delete(scheme.meta_key(instance.service, instance.id)),
            ]
            still_serving = any(i.service == instance.service for i in self._owned.values())
            if still_serving or self._lease is None:
                self.gateway.txn("deregister", [], deletes, [])
                return
            # The port key is shared by every host serving the service (last writer wins):
            # delete it only while it is attached to our own lease.
            port_key = scheme.port_key(instance.service)
            compare = [
                {
                    "key": b64(port_key),
                    "target": "LEASE",
                    "result": "EQUAL",
                    "lease": str(self._lease),
                }
            ]
            self.gateway.txn("deregister", compare, [*deletes, _delete(port_key)], deletes)

    def keepalive(self) -> bool:
        with self._lock:
            if self._lease is not None:
                lease = self._lease
                ttl = self.gateway.call(
                    "keepalive", lambda c: Lease(lease, client=c.client).refresh()
                )
                if ttl <= 0:
                    log.warning("etcd: lease %x expired or was revoked", lease)
                    self._drop_lease()
            if self._lost:
                if self._lease is None:
                    self._ensure_lease()
                self._lost = False
                return False
            return True

    def _ensure_lease(self) -> int:
        if self._closed:
            # A register still running while the agent shuts down must not grant a new lease
            # after close() revoked ours: its entries would outlive the exit by a TTL.
            raise PluginError("etcd registry is closed; not registering")
        if self._lease is None:
            ttl = self.ttl
            lease = self.gateway.call("lease grant", lambda c: c.client.lease(ttl).id)
            self._lease = int(lease)
            log.debug("etcd: granted lease %x (ttl %ds)", self._lease, ttl)
        return self._lease

    def _drop_lease(self) -> None:
        self._lease = None
        self._lost = bool(self._owned) or self._lost
        self._owned.clear()

    def refuse_writes(self) -> None:
        """From now on, write nothing (the registry is closing); a running call may finish."""
        self._closed = True

    def close(self, revoke: bool) -> None:
        """Forget the lease; with ``revoke``, revoke it (this agent's keys vanish at once)."""
        self.refuse_writes()
        with self._lock:
            lease, self._lease = self._lease, None
            self._owned.clear()
            if revoke and lease is not None:
                self._revoke(lease)

    def _revoke(self, lease: int) -> None:
        try:
            self.gateway.call("lease revoke", lambda c: Lease(lease, client=c.client).revoke())
        except EtcdError as exc:
            if exc.code != GRPC_NOT_FOUND:  # already gone: nothing left to remove
                raise


def _puts(items: list[tuple[str, str]], lease: int) -> list[dict[str, Any]]:
    return [
        {"request_put": {"key": b64(key), "value": b64(value), "lease": str(lease)}}
        for key, value in items
    ]


def _delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}
