"""The etcd v3 registry: the lease writer (register role) and the catalog reader (discover role)
on one gateway to the cluster."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Sequence

from discoverd import Catalog, Notify, Problem, Registry, ServiceInstance
from discoverd.plugins.etcd.config import EtcdConfig
from discoverd.plugins.etcd.gateway import Gateway
from discoverd.plugins.etcd.keys import KeyScheme
from discoverd.plugins.etcd.reader import CatalogReader
from discoverd.plugins.etcd.writer import LeaseWriter

log = logging.getLogger("discoverd.etcd")


class EtcdRegistry(Registry):
    """Registry on etcd v3 (through its JSON gateway).

    Register side (:class:`LeaseWriter`): one lease per agent (``ttl`` seconds), granted on
    first use; every key this agent writes is attached to it, so a dead host's entries vanish
    together; the frontend-port claims are kept on it too (see ``writer.py``). Discover side
    (:class:`CatalogReader`): consistent reads of the prefixes, or of the services a watch
    named, and a watch on them from a catalog's revision.
    """

    def __init__(self, config: EtcdConfig, *, host_id: str = "") -> None:
        self.config = config
        clear = config.credentials_in_clear
        if clear:
            log.warning(
                "etcd: the password of user %r is sent without TLS to %s; set ca_cert (and "
                "https:// endpoints) so that it cannot be read on the network",
                config.user,
                ", ".join(clear),
            )
        self.gateway = Gateway(config)
        scheme = KeyScheme(config.prefix, config.meta_prefix, config.claim_prefix)
        self.writer = LeaseWriter(self.gateway, scheme, config.ttl, host_id)
        self.reader = CatalogReader(self.gateway, scheme)

    def __repr__(self) -> str:
        return f"EtcdRegistry({', '.join(self.gateway.urls)}, prefix={self.config.prefix!r})"

    @property
    def lease_id(self) -> int | None:
        """The lease this agent's keys are attached to (``None`` until the first register)."""
        return self.writer.lease_id

    def register(self, instance: ServiceInstance) -> None:
        self.writer.register(instance)

    def register_many(self, instances: Sequence[ServiceInstance]) -> None:
        """One transaction per service (and per ``PER_TXN`` instances), not one per instance."""
        self.writer.register_many(instances)

    def deregister(self, instance: ServiceInstance) -> None:
        self.writer.deregister(instance)

    def keepalive(self) -> bool:
        return self.writer.keepalive()

    def keepalive_interval(self) -> float:
        return self.config.ttl / 3

    def snapshot(self) -> Catalog:
        return self.reader.snapshot()

    def read_services(self, names: Collection[str]) -> Catalog:
        return self.reader.read_services(names)

    def watch(self, notify: Notify, stop: threading.Event, since: int) -> None:
        self.reader.watch(notify, stop, since)

    def conflicts(self) -> list[Problem]:
        return self.writer.conflicts()

    def close(self, deregister: bool = False) -> None:
        self.writer.refuse_writes()
        self.reader.close()
        try:
            self.writer.close(revoke=deregister)
        finally:
            self.gateway.close()
