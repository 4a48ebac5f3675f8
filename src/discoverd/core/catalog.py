"""How the discover role reads the registry: in full, or only the services that changed.

A full ``snapshot`` of a registry of 10,000 instances is a large read. While a watch runs that
started from the revision of the last full read, every change after it is notified, and a
registry that can (``Registry.read_services``) names the services its events touched. Then only
those services are read again and merged into the last catalog. Everything else falls back to a
full read: no watch running (before the first one, after one was lost), a notification that
names no service, more than ``PARTIAL_MAX`` changed services, a registry that cannot read a
subset (it does not override ``read_services``, or it returns ``None``), a catalog without
revisions, and, as a safety net, a full read at least every
``FULL_READ_EVERY`` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from discoverd.core.interfaces import Registry
from discoverd.core.model import Catalog, Problem, ServiceInstance

#: Above this many changed services, a read covers everything instead of each one.
PARTIAL_MAX = 64
#: Even while the watch is live, a read covers everything at least this often (seconds).
FULL_READ_EVERY = 300.0


@dataclass(frozen=True)
class _Part:
    instances: tuple[ServiceInstance, ...]
    problems: tuple[Problem, ...]
    ports: tuple[int, ...] = ()  # the frontend ports claimed for the service fleet-wide


class CatalogReader:
    """The discover role's view of the registry, read in full or in part (see the module)."""

    def __init__(self, registry: Registry, *, full_every: float = FULL_READ_EVERY) -> None:
        self.registry = registry
        self.full_every = full_every
        #: Whether the registry reads subsets at all (it overrides ``read_services``); if not,
        #: every read is a full one, as the watch's notifications then say nothing more.
        self.partial = type(registry).read_services is not Registry.read_services
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self._everything = True
        self._watching = False
        self._services: dict[str, _Part] = {}
        self._stray: tuple[Problem, ...] = ()
        self._base = 0  # the revision of the last full read
        self._full_at = -float("inf")
        #: Reads so far, by kind (for tests and metrics).
        self.full_reads = 0
        self.partial_reads = 0

    @property
    def revision(self) -> int:
        """The revision of the last full read: where a watch must start for partial reads."""
        return self._base

    # -- what the watch says --------------------------------------------------------------------

    def changed(self, services: Collection[str] | None) -> None:
        """The watch saw changes of ``services`` (``None``: of unknown services)."""
        with self._lock:
            if services is None:
                self._everything = True
            else:
                self._dirty.update(services)

    def watching(self, running: bool) -> None:
        """A watch from :attr:`revision` started (``True``), or ended or failed (``False``):
        until the next one starts, reads cover everything."""
        with self._lock:
            self._watching = running
            if not running:
                self._everything = True

    # -- reading ------------------------------------------------------------------------------

    def read(self) -> Catalog:
        """The current catalog. Raises what the registry raises (``Unavailable``, ...): the
        changes not read yet are then read at the next call."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            full = (
                not self.partial
                or self._everything
                or not self._watching
                or self._base <= 0
                or len(dirty) > PARTIAL_MAX
                or time.monotonic() - self._full_at > self.full_every
            )
            self._everything = False
        try:
            if not full and not dirty:
                return self._catalog()
            if not full:
                part = self.registry.read_services(sorted(dirty))
                if part is not None:
                    self.partial_reads += 1
                    self._merge(dirty, part)
                    return self._catalog()
            catalog = self.registry.snapshot()
        except BaseException:
            with self._lock:  # not read: read again next time
                self._dirty |= dirty
                self._everything = self._everything or full
            raise
        self.full_reads += 1
        self._replace(catalog)
        return catalog

    def _replace(self, catalog: Catalog) -> None:
        instances: dict[str, list[ServiceInstance]] = {}
        for instance in catalog.instances:
            instances.setdefault(instance.service, []).append(instance)
        problems: dict[str, list[Problem]] = {}
        stray: list[Problem] = []
        for problem in catalog.problems:
            if problem.service:
                problems.setdefault(problem.service, []).append(problem)
            else:
                stray.append(problem)
        ports = _ports_by_service(catalog.claims)
        with self._lock:
            self._services = {
                name: _Part(
                    tuple(instances.get(name, ())),
                    tuple(problems.get(name, ())),
                    tuple(ports.get(name, ())),
                )
                for name in sorted(set(instances) | set(problems) | set(ports))
            }
            self._stray = tuple(stray)
            self._base = catalog.revision
            self._full_at = time.monotonic()

    def _merge(self, names: Iterable[str], part: Catalog) -> None:
        fresh: dict[str, tuple[list[ServiceInstance], list[Problem]]] = {
            name: ([], []) for name in names
        }
        for instance in part.instances:
            fresh.setdefault(instance.service, ([], []))[0].append(instance)
        for problem in part.problems:
            fresh.setdefault(problem.service, ([], []))[1].append(problem)
        ports = _ports_by_service(part.claims)
        for name in ports:
            fresh.setdefault(name, ([], []))
        with self._lock:
            for name, (instances, problems) in fresh.items():
                if not name:
                    continue  # a problem of no service in a partial read: kept for the log
                claimed = tuple(ports.get(name, ()))
                if instances or problems or claimed:
                    self._services[name] = _Part(tuple(instances), tuple(problems), claimed)
                else:
                    self._services.pop(name, None)
            stray = [p for p in part.problems if not p.service]
            if stray:
                self._stray = tuple(dict.fromkeys((*self._stray, *stray)))

    def _catalog(self) -> Catalog:
        with self._lock:
            instances: list[ServiceInstance] = []
            problems: list[Problem] = list(self._stray)
            claims: list[tuple[int, str]] = []
            for name in sorted(self._services):
                part = self._services[name]
                instances.extend(part.instances)
                problems.extend(part.problems)
                claims.extend((port, name) for port in part.ports)
            return Catalog(tuple(instances), tuple(problems), self._base, tuple(sorted(claims)))


def _ports_by_service(claims: Iterable[tuple[int, str]]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for port, service in claims:
        found.setdefault(service, []).append(port)
    return found
