"""CatalogReader: full reads, partial reads of the services the watch named, and the fallbacks.

Driven by an in-memory registry that counts its reads (the core's own logic only; the etcd
plugin's ``read_services`` is tested against a real etcd)."""

from __future__ import annotations

import threading
from collections.abc import Collection

import pytest

from discoverd import Catalog, Notify, Problem, Registry, ServiceInstance, Unavailable
from discoverd.core.catalog import PARTIAL_MAX, CatalogReader


def inst(service: str, n: int) -> ServiceInstance:
    return ServiceInstance(service, f"h:{service}{n}:80:tcp", "10.0.0.1", 30000 + n, "tcp", 80)


class CountingRegistry(Registry):
    """Holds instances and problems by service; counts full and partial reads."""

    def __init__(self) -> None:
        self.instances: dict[str, list[ServiceInstance]] = {}
        self.problems: list[Problem] = []
        self.revision = 10
        self.full = 0
        self.partial: list[list[str]] = []
        self.down = False
        self.claims: list[tuple[int, str]] = []

    def register(self, instance: ServiceInstance) -> None:
        raise NotImplementedError

    def deregister(self, instance: ServiceInstance) -> None:
        raise NotImplementedError

    def keepalive(self) -> bool:
        return True

    def snapshot(self) -> Catalog:
        if self.down:
            raise Unavailable("down")
        self.full += 1
        everything = [i for name in sorted(self.instances) for i in self.instances[name]]
        return Catalog(tuple(everything), tuple(self.problems), self.revision, tuple(self.claims))

    def read_services(self, names: Collection[str]) -> Catalog | None:
        if self.down:
            raise Unavailable("down")
        self.partial.append(sorted(names))
        found = [i for name in sorted(names) for i in self.instances.get(name, [])]
        trouble = [p for p in self.problems if p.service in names]
        claims = tuple(c for c in self.claims if c[1] in names)
        return Catalog(tuple(found), tuple(trouble), self.revision + 5, claims)

    def watch(self, notify: Notify, stop: threading.Event, since: int) -> None:
        stop.wait()


class FullOnly(CountingRegistry):
    read_services = Registry.read_services  # the default: cannot read a subset


@pytest.fixture
def registry() -> CountingRegistry:
    registry = CountingRegistry()
    registry.instances = {"a": [inst("a", 1)], "b": [inst("b", 2)]}
    registry.problems = [Problem("/x/a/bad", "not IP:PORT", service="a"), Problem("/x/junk", "?")]
    return registry


def test_reads_in_full_until_a_watch_runs(registry: CountingRegistry) -> None:
    reader = CatalogReader(registry)
    first = reader.read()
    assert registry.full == 1 and first.revision == 10 and reader.revision == 10
    reader.changed({"a"})  # no watch yet: a notification names nothing reliable
    reader.read()
    assert registry.full == 2 and registry.partial == []


def test_only_the_named_services_are_read_again(registry: CountingRegistry) -> None:
    reader = CatalogReader(registry)
    reader.read()
    reader.watching(True)
    assert reader.read().instances == (inst("a", 1), inst("b", 2))  # nothing changed: no read
    assert registry.full == 1 and registry.partial == []

    registry.instances["a"] = [inst("a", 3)]
    registry.problems = [Problem("/x/junk", "?")]  # a's bad entry was fixed
    reader.changed({"a"})
    merged = reader.read()
    assert registry.partial == [["a"]] and registry.full == 1
    assert merged.instances == (inst("a", 3), inst("b", 2))
    assert [str(p) for p in merged.problems] == ["/x/junk: ?"]
    assert merged.revision == 10  # partial reads do not move the watch's base
    full = registry.snapshot()  # what a full read gives now: the same instances and problems
    assert (merged.instances, merged.problems) == (full.instances, full.problems)

    del registry.instances["b"]
    reader.changed({"b"})
    assert reader.read().instances == (inst("a", 3),)


@pytest.mark.parametrize(
    "event",
    ["no service named", "watch lost", "too many services", "stale", "cannot read subsets"],
)
def test_everything_else_reads_in_full(registry: CountingRegistry, event: str) -> None:
    if event == "cannot read subsets":
        registry = FullOnly()
        registry.instances = {"a": [inst("a", 1)]}
    reader = CatalogReader(registry)
    reader.read()
    reader.watching(True)
    reader.changed({"a"})
    if event == "no service named":
        reader.changed(None)
    elif event == "watch lost":
        reader.watching(False)
    elif event == "too many services":
        reader.changed({f"s{n}" for n in range(PARTIAL_MAX + 1)})
    elif event == "stale":
        reader.full_every = 0.0
    reader.read()
    assert registry.full == 2 and registry.partial == []


def test_a_failed_read_is_read_again(registry: CountingRegistry) -> None:
    reader = CatalogReader(registry)
    reader.read()
    reader.watching(True)
    reader.changed({"a"})
    registry.down = True
    with pytest.raises(Unavailable):
        reader.read()
    registry.down = False
    registry.instances["a"] = []
    assert reader.read().instances == (inst("b", 2),)
    assert registry.partial == [["a"]]
    reader.full_every = 0.0  # the last full read is too old now: read everything
    reader.read()
    assert registry.full == 2


def test_a_catalog_without_revisions_is_always_read_in_full(registry: CountingRegistry) -> None:
    registry.revision = 0
    reader = CatalogReader(registry)
    reader.read()
    reader.watching(True)
    reader.changed({"a"})
    reader.read()
    assert registry.full == 2 and registry.partial == []


def test_claims_follow_full_and_partial_reads(registry: CountingRegistry) -> None:
    registry.claims = [(80, "a"), (81, "b")]
    reader = CatalogReader(registry)
    assert reader.read().claims == ((80, "a"), (81, "b"))
    reader.watching(True)
    registry.claims = [(81, "b"), (82, "c")]  # a's claim gone, c claimed (no instance yet)
    reader.changed({"a", "c"})
    assert reader.read().claims == ((81, "b"), (82, "c"))
    assert registry.partial == [["a", "c"]]
    registry.claims = []
    reader.changed(None)  # a full read replaces them all
    assert reader.read().claims == ()
