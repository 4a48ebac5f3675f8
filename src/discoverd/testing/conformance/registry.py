"""The registry contract, :class:`RegistryContract`: subclass it in a test module (see
:mod:`discoverd.testing.conformance` for the outline).

Fixtures the subclass provides:

``registry_server`` (required) -> :class:`RegistryServer`
    The real server the registries talk to, running when the fixture returns, with three methods:
    ``stop()`` makes it unreachable (kill it), ``start()`` brings it back *with* its data on the
    same address, ``restart()`` stops it and starts it again on the same address having lost
    *all* its state (a fresh data directory, a ``-dev`` agent, ...). The fixture stops the server
    at teardown. A fresh server per test is best; a shared one works if the plugin's key space is
    the same for every registry of the test (the kit only looks at service names it made).

``make_registry`` (required) -> :class:`RegistryFactory`
    ``make_registry(host=HostInfo(...), ttl=seconds)`` returns a *new* ``Registry`` object of the
    plugin, connected to ``registry_server``, acting for ``host`` and registering with a TTL of
    ``ttl`` whole seconds. Every registry it makes must share one catalog (same server, same key
    prefix or namespace). The kit closes each registry it made at teardown (with
    ``deregister=True``, errors ignored); the fixture need not track them.

``write_bad_entry`` (optional) -> :class:`BadEntryWriter` or ``None``
    ``write_bad_entry(service)`` writes at least one malformed instance entry of the (valid)
    service name ``service`` straight into the server, bypassing the plugin: what another tool
    or an older version could leave behind (a value that is not ``IP:PORT``, an address that is
    a host name, broken JSON, ...). Without it, ``test_bad_entries_become_problems`` is skipped
    with a reason saying so.

Class attributes (seconds unless said otherwise; raise them for a slow server):

``short_ttl = 2``        TTL (whole seconds) of the registry whose agent "dies".
``long_ttl = 60``        TTL of every other registry; must exceed ``propagation_timeout``.
``expiry_slack = 15.0``  How long after ``short_ttl`` a dead agent's entries may linger.
``propagation_timeout = 20.0``  Deadline for a write to show in another registry's snapshot,
                         and for a watch to notify.
``watch_stop_timeout = 10.0``   Deadline for ``watch`` to return once ``stop`` is set or the
                         registry is closed.
``watch_loss_timeout = 45.0``   Deadline for ``watch`` to return or raise once the server died.
``restart_timeout = 60.0``      Deadline to recover after the server comes back.

The checks (each a test method):

- ``test_register_keeps_every_field``: what one registry registers shows in another one's
  snapshot, every field equal (service, id, IPv4 and IPv6 address, port, tcp and udp protocol,
  frontend port, tags, metadata, host id).
- ``test_register_is_idempotent_and_updates``: registering twice gives one entry; registering
  the same id with new values replaces the old ones.
- ``test_deregister_removes_only_that_instance``: and deregistering twice, or an instance never
  registered, is not an error.
- ``test_keepalive_keeps_entries_past_the_ttl``: with ``keepalive()`` called at the plugin's own
  ``keepalive_interval()``, entries outlive several TTLs and ``keepalive()`` returns True.
- ``test_entries_expire_after_the_agent_dies``: the agent stops renewing and its registry is
  closed *without* deregistering (as a crashed or killed agent): its entries are still there at
  first, and gone from another registry's snapshot within ``short_ttl + expiry_slack``.
- ``test_close_with_deregister_removes_entries_at_once``: ``close(deregister=True)`` removes this
  host's entries well before their TTL.
- ``test_two_hosts_share_the_catalog``: two registries with different ``HostInfo`` both see both
  hosts' instances (same service); closing one with ``deregister=True`` removes only its own.
- ``test_watch_delivers_a_change``: a watch on one registry calls ``notify`` when another
  registers, and returns promptly once ``stop`` is set.
- ``test_watch_resumes_from_the_snapshot_revision``: a change made *between* ``snapshot()`` and
  ``watch(since=catalog.revision)`` is still notified (nothing falls between the two).
- ``test_close_unblocks_watch``: ``close()`` makes a blocked ``watch`` return (or raise).
- ``test_watch_ends_when_the_server_dies``: ``watch`` returns or raises ``PluginError``
  (``Unavailable``) within ``watch_loss_timeout`` of the server's death; it never hangs.
- ``test_unavailable_server_raises_unavailable``: with the server down, ``snapshot()`` and
  ``keepalive()`` raise ``Unavailable`` (never an empty catalog); the same registry object
  works again once the server is back.
- ``test_reregister_after_server_restart``: after a restart that lost every entry,
  ``keepalive()`` returns False (possibly after raising ``Unavailable`` while the server was
  away), and once the instance is registered again -- as the core does -- it is back in the
  snapshot and ``keepalive()`` is True again. A plugin that re-registers by itself and returns
  True passes as well, provided the instance is back.
- ``test_bad_entries_become_problems``: malformed entries appear in ``Catalog.problems`` (a
  problem names the service), never as instances, and do not hide other services.
- ``test_watch_names_the_changed_services``: when a watch names services in its
  notifications (``notify(reason, services=...)``), a change of a service is notified either
  with that service named or with none named (meaning "anything may have changed"): the core
  re-reads only the named services, so naming the wrong ones would hide the change.
- ``test_read_services_matches_a_full_snapshot``: ``read_services(names)`` returns ``None``
  (not supported), or exactly what a full snapshot holds for those services: their instances,
  the problems of their entries (with ``Problem.service`` set, so the core can replace them),
  nothing of other services, nothing for a service without entries, and a revision.
- ``test_a_claimed_port_is_decided_once_for_the_fleet`` (skipped for a registry that keeps no
  claims: ``Catalog.claims`` empty and no ``conflicts()``): host A registers a service at a
  port, host B another service at the same port. Every host's snapshot claims the port for A's
  service (B's instance is listed all the same), ``read_services`` of that service has the
  claim, B's ``conflicts()`` names its service and A's says nothing; a new registry object for
  host A (a restart) keeps the claim; once every registry of host A is closed with
  ``deregister=True``, B takes the port through its ``keepalive()``.
- ``test_a_service_keeps_its_first_port`` (skipped likewise): host B registers A's service
  asking another frontend port. Every instance of it reads back with the first port, the claim
  stays, and B's ``conflicts()`` says so.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import pytest

from discoverd import (
    Catalog,
    HostInfo,
    PluginError,
    Problem,
    Registry,
    ServiceInstance,
    Unavailable,
)
from discoverd.testing.conformance.common import (
    BadEntryWriter,
    RegistryFactory,
    RegistryServer,
    _missing,
)

# --------------------------------------------------------------------------------------------
# Registry contract


def _unique(prefix: str = "ck") -> str:
    """A short random token for names that must not clash with other tests' (lowercase)."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


class _Registries:
    """The registries of one test: made through ``make_registry``, closed at teardown."""

    def __init__(self, factory: RegistryFactory) -> None:
        self._factory = factory
        self._open: list[Registry] = []

    def new(self, host: HostInfo, ttl: int) -> Registry:
        registry = self._factory(host=host, ttl=ttl)
        if not isinstance(registry, Registry):
            pytest.fail(f"make_registry returned {registry!r}, not a discoverd Registry")
        self._open.append(registry)
        return registry

    def close(self, registry: Registry, *, deregister: bool) -> None:
        """Close ``registry`` (exceptions propagate); teardown will not close it again."""
        if registry in self._open:
            self._open.remove(registry)
        registry.close(deregister=deregister)

    def forget(self, registry: Registry) -> None:
        """Stop tracking ``registry`` without closing it (an agent that "died")."""
        if registry in self._open:
            self._open.remove(registry)

    def close_all(self) -> None:
        for registry in reversed(self._open):
            with contextlib.suppress(Exception):
                registry.close(deregister=True)
        self._open.clear()


def _claims(catalog: Catalog, prefix: str) -> list[tuple[int, str]]:
    """The claims of the services this test made, sorted."""
    return sorted((port, service) for port, service in catalog.claims if service.startswith(prefix))


def _conflicts(registry: Registry, prefix: str) -> list[Problem]:
    return [p for p in registry.conflicts() if p.service.startswith(prefix)]


def _ours(catalog: Catalog, prefix: str) -> dict[str, ServiceInstance]:
    """Instances of the services this test made (their names start with ``prefix``), by id."""
    return {i.id: i for i in catalog.instances if i.service.startswith(prefix)}


def _describe(instances: Iterable[ServiceInstance]) -> str:
    shown = sorted(instances)
    return "\n".join(f"    {i!r}" for i in shown) if shown else "    (none)"


def _field_diff(expected: ServiceInstance, got: ServiceInstance) -> str:
    names = (
        "service",
        "id",
        "address",
        "port",
        "protocol",
        "frontend_port",
        "tags",
        "meta",
        "host_id",
    )
    lines = [
        f"    {name}: registered {getattr(expected, name)!r}, read back {getattr(got, name)!r}"
        for name in names
        if getattr(expected, name) != getattr(got, name)
    ]
    return "\n".join(lines)


class _WatchRun:
    """``registry.watch`` running in a thread, recording notifications and how it ended."""

    def __init__(self, registry: Registry, since: int) -> None:
        self.registry = registry
        self.stop = threading.Event()
        self.notified = threading.Event()
        self.reasons: list[str] = []
        #: The ``services`` of each notification (``None``: none named).
        self.named: list[frozenset[str] | None] = []
        self.error: BaseException | None = None
        self.returned = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(
            target=self._run, args=(since,), name="contract-watch", daemon=True
        )
        self.thread.start()

    def _notify(self, reason: str, services: Collection[str] | None = None) -> None:
        with self._lock:
            self.reasons.append(reason)
            self.named.append(None if services is None else frozenset(services))
        self.notified.set()

    def _run(self, since: int) -> None:
        try:
            self.registry.watch(self._notify, self.stop, since)
            self.returned = True
        except BaseException as exc:
            self.error = exc

    def reset(self) -> None:
        with self._lock:
            self.reasons.clear()
            self.named.clear()
        self.notified.clear()

    def covers(self, service: str) -> bool:
        """Whether a notification so far named ``service``, or named no service at all."""
        with self._lock:
            return any(named is None or service in named for named in self.named)

    def ended(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def describe_end(self) -> str:
        if self.thread.is_alive():
            return "still running"
        if self.error is not None:
            return f"raised {self.error!r}"
        return "returned"

    def halt(self) -> None:
        """Best-effort stop at the end of a test (never raises)."""
        self.stop.set()


class RegistryContract:
    """The contract every registry plugin passes; see the module docstring for how to use it."""

    short_ttl: ClassVar[int] = 2
    long_ttl: ClassVar[int] = 60
    expiry_slack: ClassVar[float] = 15.0
    propagation_timeout: ClassVar[float] = 20.0
    watch_stop_timeout: ClassVar[float] = 10.0
    watch_loss_timeout: ClassVar[float] = 45.0
    restart_timeout: ClassVar[float] = 60.0

    # -- fixtures a subclass provides ------------------------------------------------------

    @pytest.fixture
    def registry_server(self) -> RegistryServer:
        _missing(
            "RegistryContract",
            "registry_server",
            "the running real server, with stop(), start() (same data) and restart() "
            "(all state lost)",
        )

    @pytest.fixture
    def make_registry(self) -> RegistryFactory:
        _missing(
            "RegistryContract",
            "make_registry",
            "make_registry(host=HostInfo, ttl=int) returning a new Registry of your plugin "
            "connected to registry_server",
        )

    @pytest.fixture
    def write_bad_entry(self) -> BadEntryWriter | None:
        return None

    # -- the kit's own fixtures ------------------------------------------------------------

    @pytest.fixture
    def contract_registries(
        self, registry_server: RegistryServer, make_registry: RegistryFactory
    ) -> Iterator[_Registries]:
        if self.long_ttl <= self.propagation_timeout:
            pytest.fail(
                f"{type(self).__name__}: long_ttl ({self.long_ttl}s) must exceed "
                f"propagation_timeout ({self.propagation_timeout:g}s)",
                pytrace=False,
            )
        pool = _Registries(make_registry)
        yield pool
        pool.close_all()

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def host(name: str = "kit-host-1", ip: str = "127.0.0.1") -> HostInfo:
        return HostInfo(ip=ip, id=name)

    def instance(
        self,
        service: str,
        host: HostInfo,
        container: str,
        port: int,
        **fields: Any,
    ) -> ServiceInstance:
        """An instance of ``host`` with an id built as the register role builds it."""
        protocol = fields.pop("protocol", "tcp")
        return ServiceInstance(
            service=service,
            id=f"{host.id}:{container}:8000:{protocol}",
            address=fields.pop("address", host.ip),
            port=port,
            protocol=protocol,
            frontend_port=fields.pop("frontend_port", 8000),
            host_id=host.id,
            **fields,
        )

    def snapshot_until(
        self,
        registry: Registry,
        prefix: str,
        check: Callable[[dict[str, ServiceInstance]], bool],
        what: str,
        timeout: float | None = None,
    ) -> Catalog:
        """Poll ``registry.snapshot()`` until ``check(our instances by id)``; fail otherwise."""
        timeout = self.propagation_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last: Catalog | None = None
        error: Exception | None = None
        while True:
            try:
                last = registry.snapshot()
                error = None
                if check(_ours(last, prefix)):
                    return last
            except PluginError as exc:
                error = exc
            if time.monotonic() >= deadline:
                seen = _describe(_ours(last, prefix).values()) if last else "    (no snapshot)"
                extra = f"\n  last error: {error!r}" if error else ""
                pytest.fail(
                    f"after {timeout:g}s still waiting for {what}; the snapshot held:\n{seen}"
                    f"{extra}",
                    pytrace=False,
                )
            time.sleep(0.1)

    # -- the checks ------------------------------------------------------------------------

    def test_register_keeps_every_field(self, contract_registries: _Registries) -> None:
        prefix = _unique()
        host = self.host()
        writer = contract_registries.new(host, self.long_ttl)
        reader = contract_registries.new(self.host("kit-reader"), self.long_ttl)
        full = self.instance(
            f"{prefix}-web",
            host,
            "0a1b2c3d4e5f",
            32768,
            frontend_port=8080,
            tags=("blue", "v1.2", "zone=a"),
            meta=(("mode", "http"), ("check_http", "/healthz"), ("owner", "team-a b")),
        )
        # A service has one frontend port (registries may store it once per service).
        ipv6 = self.instance(
            f"{prefix}-web", host, "1a2b3c4d5e6f", 32769, address="::1", frontend_port=8080
        )
        udp = self.instance(f"{prefix}-dns", host, "2a3b4c5d6e7f", 32770, protocol="udp",
                            frontend_port=5353)  # fmt: skip
        registered = [full, ipv6, udp]
        for each in registered:
            writer.register(each)
        ids = {i.id for i in registered}
        self.snapshot_until(
            reader, prefix, lambda ours: ids <= set(ours), "all three instances in the snapshot"
        )
        catalog = reader.snapshot()
        ours = _ours(catalog, prefix)
        problems = []
        for expected in registered:
            diff = _field_diff(expected, ours[expected.id])
            if diff:
                problems.append(f"  {expected.id}:\n{diff}")
        assert not problems, "fields changed on the way through the registry:\n" + "\n".join(
            problems
        )
        assert set(ours) == ids, f"unexpected instances:\n{_describe(ours.values())}"

    def test_register_is_idempotent_and_updates(self, contract_registries: _Registries) -> None:
        prefix = _unique()
        host = self.host()
        registry = contract_registries.new(host, self.long_ttl)
        first = self.instance(f"{prefix}-web", host, "0a1b2c3d4e5f", 32768, tags=("v1",))
        registry.register(first)
        registry.register(first)
        self.snapshot_until(
            registry, prefix, lambda ours: first.id in ours, "the instance in the snapshot"
        )
        ours = _ours(registry.snapshot(), prefix)
        assert list(ours.values()) == [first], (
            f"registering twice must leave exactly one entry:\n{_describe(ours.values())}"
        )
        moved = self.instance(
            f"{prefix}-web", host, "0a1b2c3d4e5f", 32999, tags=("v2",), meta=(("k", "v"),)
        )
        registry.register(moved)
        self.snapshot_until(
            registry,
            prefix,
            lambda ours: list(ours.values()) == [moved],
            "the re-registered instance to replace the old values (port, tags, metadata)",
        )

    def test_deregister_removes_only_that_instance(self, contract_registries: _Registries) -> None:
        prefix = _unique()
        host = self.host()
        registry = contract_registries.new(host, self.long_ttl)
        gone = self.instance(f"{prefix}-web", host, "0a1b2c3d4e5f", 32768)
        kept = self.instance(f"{prefix}-web", host, "1a2b3c4d5e6f", 32769)
        registry.register(gone)
        registry.register(kept)
        self.snapshot_until(
            registry, prefix, lambda ours: {gone.id, kept.id} <= set(ours), "both instances"
        )
        registry.deregister(gone)
        self.snapshot_until(
            registry,
            prefix,
            lambda ours: gone.id not in ours and kept.id in ours,
            f"{gone.id} to leave the snapshot while {kept.id} stays",
        )
        registry.deregister(gone)  # again: idempotent
        never = self.instance(f"{prefix}-web", host, "2a3b4c5d6e7f", 32770)
        registry.deregister(never)  # never registered: not an error either
        ours = _ours(registry.snapshot(), prefix)
        assert set(ours) == {kept.id}, f"unexpected snapshot:\n{_describe(ours.values())}"

    def test_keepalive_keeps_entries_past_the_ttl(self, contract_registries: _Registries) -> None:
        prefix = _unique()
        host = self.host()
        registry = contract_registries.new(host, self.short_ttl)
        observer = contract_registries.new(self.host("kit-observer"), self.long_ttl)
        item = self.instance(f"{prefix}-web", host, "0a1b2c3d4e5f", 32768)
        registry.register(item)
        self.snapshot_until(observer, prefix, lambda ours: item.id in ours, "the instance")
        interval = registry.keepalive_interval()
        assert 0 < interval < self.short_ttl, (
            f"keepalive_interval() is {interval!r} for a TTL of {self.short_ttl}s: entries "
            "would expire between two keepalives"
        )
        until = time.monotonic() + 2.5 * self.short_ttl
        while time.monotonic() < until:
            time.sleep(interval)
            assert registry.keepalive() is True, "keepalive() returned False with no outage"
        ours = _ours(observer.snapshot(), prefix)
        assert item.id in ours, (
            f"the instance expired although keepalive() ran every {interval:g}s "
            f"(TTL {self.short_ttl}s)"
        )

    def test_entries_expire_after_the_agent_dies(self, contract_registries: _Registries) -> None:
        prefix = _unique()
        host = self.host()
        dying = contract_registries.new(host, self.short_ttl)
        observer = contract_registries.new(self.host("kit-observer"), self.long_ttl)
        items = [
            self.instance(f"{prefix}-web", host, "0a1b2c3d4e5f", 32768),
            self.instance(f"{prefix}-api", host, "1a2b3c4d5e6f", 32769, frontend_port=8081),
        ]
        for each in items:
            dying.register(each)
        ids = {i.id for i in items}
        self.snapshot_until(observer, prefix, lambda ours: ids <= set(ours), "both instances")
        assert dying.keepalive() is True
        renewed = time.monotonic()
        # The agent dies: no more keepalives, and its registry goes away without deregistering.
        contract_registries.close(dying, deregister=False)
        if time.monotonic() - renewed < self.short_ttl / 2:
            ours = _ours(observer.snapshot(), prefix)
            assert ids <= set(ours), (
                "close(deregister=False) removed the entries at once; they must be left to "
                f"expire with their TTL. Snapshot:\n{_describe(ours.values())}"
            )
        self.snapshot_until(
            observer,
            prefix,
            lambda ours: not (ids & set(ours)),
            f"the dead agent's entries to expire (TTL {self.short_ttl}s)",
            timeout=self.short_ttl + self.expiry_slack,
        )

    def test_close_with_deregister_removes_entries_at_once(
        self, contract_registries: _Registries
    ) -> None:
        prefix = _unique()
        host = self.host()
        registry = contract_registries.new(host, self.long_ttl)
        observer = contract_registries.new(self.host("kit-observer"), self.long_ttl)
        items = [
            self.instance(f"{prefix}-web", host, "0a1b2c3d4e5f", 32768),
            self.instance(f"{prefix}-web", host, "1a2b3c4d5e6f", 32769),
        ]
        for each in items:
            registry.register(each)
        ids = {i.id for i in items}
        self.snapshot_until(observer, prefix, lambda ours: ids <= set(ours), "both instances")
        contract_registries.close(registry, deregister=True)
        self.snapshot_until(
            observer,
            prefix,
            lambda ours: not (ids & set(ours)),
            f"close(deregister=True) to remove the entries (long before their {self.long_ttl}s "
            "TTL)",
        )

    def test_two_hosts_share_the_catalog(self, contract_registries: _Registries) -> None:
        prefix = _unique()
        host_a = self.host("kit-host-a", "127.0.0.1")
        host_b = self.host("kit-host-b", "127.0.0.2")
        reg_a = contract_registries.new(host_a, self.long_ttl)
        reg_b = contract_registries.new(host_b, self.long_ttl)
        item_a = self.instance(f"{prefix}-web", host_a, "0a1b2c3d4e5f", 32768)
        item_b = self.instance(f"{prefix}-web", host_b, "0a1b2c3d4e5f", 32768)
        reg_a.register(item_a)
        reg_b.register(item_b)
        both = {item_a.id, item_b.id}
        for reader in (reg_a, reg_b):
            self.snapshot_until(reader, prefix, lambda ours: both <= set(ours), "both hosts")
            ours = _ours(reader.snapshot(), prefix)
            assert ours[item_a.id] == item_a and ours[item_b.id] == item_b, (
                f"the two hosts' instances changed:\n{_describe(ours.values())}"
            )
        contract_registries.close(reg_a, deregister=True)
        self.snapshot_until(
            reg_b,
            prefix,
            lambda ours: item_a.id not in ours and ours.get(item_b.id) == item_b,
            "host A's instance to go while host B's stays (with its frontend port)",
        )
        assert reg_b.keepalive() is True, "host B lost its entries when host A left"

    def test_watch_delivers_a_change(self, contract_registries: _Registries) -> None:
        prefix = _unique()
        host = self.host()
        writer = contract_registries.new(host, self.long_ttl)
        watcher = contract_registries.new(self.host("kit-watcher"), self.long_ttl)
        run = _WatchRun(watcher, watcher.snapshot().revision)
        try:
            time.sleep(0.5)  # let the watch settle; notifications before the change do not count
            run.reset()
            writer.register(self.instance(f"{prefix}-web", host, "0a1b2c3d4e5f", 32768))
            assert run.notified.wait(self.propagation_timeout), (
                f"watch did not call notify within {self.propagation_timeout:g}s of a register "
                f"({run.describe_end()})"
            )
            run.stop.set()
            assert run.ended(self.watch_stop_timeout), (
                f"watch did not return within {self.watch_stop_timeout:g}s of stop being set"
            )
            assert run.error is None, f"watch raised after stop was set: {run.error!r}"
        finally:
            run.halt()

    def test_watch_resumes_from_the_snapshot_revision(
        self, contract_registries: _Registries
    ) -> None:
        prefix = _unique()
        host = self.host()
        writer = contract_registries.new(host, self.long_ttl)
        watcher = contract_registries.new(self.host("kit-watcher"), self.long_ttl)
        revision = watcher.snapshot().revision
        writer.register(self.instance(f"{prefix}-web", host, "0a1b2c3d4e5f", 32768))
        time.sleep(0.2)
        run = _WatchRun(watcher, revision)
        try:
            assert run.notified.wait(self.propagation_timeout), (
                "a change made after snapshot() and before watch(since=catalog.revision) was "
                f"not notified within {self.propagation_timeout:g}s ({run.describe_end()}); "
                "the core would miss it until its next periodic resync"
            )
        finally:
            run.halt()
            run.ended(self.watch_stop_timeout)

    def test_close_unblocks_watch(self, contract_registries: _Registries) -> None:
        watcher = contract_registries.new(self.host("kit-watcher"), self.long_ttl)
        run = _WatchRun(watcher, watcher.snapshot().revision)
        try:
            time.sleep(0.5)
            assert not run.ended(0), f"watch ended with nothing to do: {run.describe_end()}"
            contract_registries.close(watcher, deregister=False)
            assert run.ended(self.watch_stop_timeout), (
                f"watch was still blocked {self.watch_stop_timeout:g}s after close()"
            )
        finally:
            run.halt()

    def test_watch_ends_when_the_server_dies(
        self, contract_registries: _Registries, registry_server: RegistryServer
    ) -> None:
        watcher = contract_registries.new(self.host("kit-watcher"), self.long_ttl)
        run = _WatchRun(watcher, watcher.snapshot().revision)
        try:
            time.sleep(0.5)
            registry_server.stop()
            assert run.ended(self.watch_loss_timeout), (
                f"watch neither returned nor raised within {self.watch_loss_timeout:g}s of the "
                "server's death: the core would never notice"
            )
            if run.error is not None and not isinstance(run.error, PluginError):
                pytest.fail(
                    f"watch raised {run.error!r} when the server died; raise Unavailable (or "
                    "return) instead"
                )
        finally:
            run.halt()
            registry_server.start()

    def test_unavailable_server_raises_unavailable(
        self, contract_registries: _Registries, registry_server: RegistryServer
    ) -> None:
        prefix = _unique()
        host = self.host()
        registry = contract_registries.new(host, self.long_ttl)
        item = self.instance(f"{prefix}-web", host, "0a1b2c3d4e5f", 32768)
        registry.register(item)
        self.snapshot_until(registry, prefix, lambda ours: item.id in ours, "the instance")
        registry_server.stop()
        try:
            try:
                catalog = registry.snapshot()
            except Unavailable:
                pass
            else:
                pytest.fail(
                    "snapshot() returned a catalog while the server was down "
                    f"({len(catalog.instances)} instances); it must raise Unavailable"
                )
            with pytest.raises(Unavailable):
                registry.keepalive()
        finally:
            registry_server.start()
        self.snapshot_until(
            registry,
            prefix,
            lambda ours: item.id in ours,
            "the same registry object to read the catalog again after the server came back",
            timeout=self.restart_timeout,
        )

    def test_reregister_after_server_restart(
        self, contract_registries: _Registries, registry_server: RegistryServer
    ) -> None:
        prefix = _unique()
        host = self.host()
        registry = contract_registries.new(host, self.long_ttl)
        item = self.instance(f"{prefix}-web", host, "0a1b2c3d4e5f", 32768)
        registry.register(item)
        self.snapshot_until(registry, prefix, lambda ours: item.id in ours, "the instance")
        registry_server.restart()
        deadline = time.monotonic() + self.restart_timeout
        history: list[str] = []
        while True:
            try:
                alive = registry.keepalive()
                history.append(repr(alive))
            except Unavailable as exc:
                history.append(f"Unavailable({exc})")
                alive = None
            if alive is False:
                registry.register(item)  # what the core does when keepalive() says "lost"
                break
            if alive is True:
                # Either the plugin restored its entries by itself, or it has not noticed yet.
                with contextlib.suppress(PluginError):
                    if item.id in _ours(registry.snapshot(), prefix):
                        break
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"after the server restarted without its data, keepalive() never returned "
                    f"False within {self.restart_timeout:g}s and the instance did not come back "
                    f"(keepalive results: {', '.join(history[-6:])})",
                    pytrace=False,
                )
            time.sleep(0.2)
        self.snapshot_until(
            registry,
            prefix,
            lambda ours: ours.get(item.id) == item,
            "the re-registered instance after the restart",
            timeout=self.restart_timeout,
        )
        assert registry.keepalive() is True, "keepalive() is not True after re-registering"

    def test_bad_entries_become_problems(
        self, contract_registries: _Registries, write_bad_entry: BadEntryWriter | None
    ) -> None:
        if write_bad_entry is None:
            pytest.skip(
                f"{type(self).__name__} provides no `write_bad_entry` fixture, so malformed "
                "entries written behind the plugin's back are not checked"
            )
        prefix = _unique()
        host = self.host()
        registry = contract_registries.new(host, self.long_ttl)
        good = self.instance(f"{prefix}-good", host, "0a1b2c3d4e5f", 32768)
        bad_service = f"{prefix}-bad"
        registry.register(good)
        write_bad_entry(bad_service)

        def reported(problems: Sequence[Problem]) -> bool:
            return any(bad_service in str(p) for p in problems)

        deadline = time.monotonic() + self.propagation_timeout
        while True:
            catalog = registry.snapshot()  # bad data must never make snapshot() raise
            ours = _ours(catalog, prefix)
            if reported(catalog.problems) and good.id in ours:
                break
            if time.monotonic() >= deadline:
                shown = "\n".join(f"    {p}" for p in catalog.problems) or "    (none)"
                pytest.fail(
                    f"after {self.propagation_timeout:g}s: expected a problem naming "
                    f"{bad_service!r} and the good instance {good.id!r}.\n  problems:\n{shown}\n"
                    f"  instances:\n{_describe(ours.values())}",
                    pytrace=False,
                )
            time.sleep(0.1)
        assert ours[good.id] == good
        leaked = [i for i in ours.values() if i.service == bad_service]
        assert not leaked, f"malformed entries became instances:\n{_describe(leaked)}"

    def test_watch_names_the_changed_services(self, contract_registries: _Registries) -> None:
        prefix = _unique()
        host = self.host()
        writer = contract_registries.new(host, self.long_ttl)
        watcher = contract_registries.new(self.host("kit-watcher"), self.long_ttl)
        run = _WatchRun(watcher, watcher.snapshot().revision)
        changed = f"{prefix}-web"
        try:
            time.sleep(0.5)
            run.reset()
            item = self.instance(changed, host, "0a1b2c3d4e5f", 32768)
            writer.register(item)
            deadline = time.monotonic() + self.propagation_timeout
            while not run.covers(changed) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert run.covers(changed), (
                f"the watch named only {sorted(set().union(*(n for n in run.named if n)))} "
                f"after {changed} was registered ({run.describe_end()}): the core would "
                "re-read those and miss the change"
            )
            run.reset()
            writer.deregister(item)
            deadline = time.monotonic() + self.propagation_timeout
            while not run.covers(changed) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert run.covers(changed), f"a deregistration of {changed} was not notified"
        finally:
            run.halt()
            run.ended(self.watch_stop_timeout)

    def test_read_services_matches_a_full_snapshot(
        self, contract_registries: _Registries, write_bad_entry: BadEntryWriter | None
    ) -> None:
        prefix = _unique()
        host = self.host()
        registry = contract_registries.new(host, self.long_ttl)
        web = [self.instance(f"{prefix}-web", host, f"0a1b2c3d4e{n}f", 32768 + n) for n in (1, 2)]
        other = self.instance(f"{prefix}-db", host, "0a1b2c3d4e9f", 32790)
        registry.register_many([*web, other])
        bad = f"{prefix}-bad"
        if write_bad_entry is not None:
            write_bad_entry(bad)
        full = self.snapshot_until(
            registry,
            prefix,
            lambda ours: {i.id for i in [*web, other]} <= set(ours),
            "the three instances in a snapshot",
        )
        names = [f"{prefix}-web", bad, f"{prefix}-none"]
        part = registry.read_services(names)
        if part is None:
            return  # not supported: the core reads everything, which is always right
        assert sorted(part.instances) == sorted(web), (
            f"read_services({names}) gave instances:\n{_describe(part.instances)}\n"
            f"expected those of {prefix}-web only:\n{_describe(web)}"
        )
        expected = sorted(str(p) for p in full.problems if bad in str(p))
        got = sorted(str(p) for p in part.problems)
        assert got == expected, (
            f"read_services gave problems {got}, the full snapshot {expected} for {bad}"
        )
        unowned = [str(p) for p in part.problems if p.service not in names]
        assert not unowned, (
            f"problems of read_services must name their service (Problem.service): {unowned}"
        )
        assert part.revision > 0, "read_services must give the revision it read at"

    # -- frontend-port claims (optional: skipped for a registry that keeps none) -----------

    @staticmethod
    def _claim_port(prefix: str) -> int:
        """A frontend port no other test of a shared server uses (derived from the prefix)."""
        return 20000 + int(prefix[-6:], 16) % 20000

    def _skip_without_claims(self, prefix: str, *registries: Registry) -> None:
        for registry in registries:
            with contextlib.suppress(PluginError):
                if _claims(registry.snapshot(), prefix) or _conflicts(registry, prefix):
                    return
        pytest.skip(
            f"{type(self).__name__}: the registry keeps no frontend-port claims "
            "(Catalog.claims stays empty, conflicts() says nothing): each discover host "
            "decides ports on its own"
        )

    def test_a_claimed_port_is_decided_once_for_the_fleet(
        self, contract_registries: _Registries
    ) -> None:
        prefix = _unique()
        port = self._claim_port(prefix)
        host_a = self.host("kit-host-a", "127.0.0.1")
        host_b = self.host("kit-host-b", "127.0.0.2")
        reg_a = contract_registries.new(host_a, self.long_ttl)
        reg_b = contract_registries.new(host_b, self.long_ttl)
        reader = contract_registries.new(self.host("kit-reader"), self.long_ttl)
        # "api" sorts before "web": a host deciding in memory would give it the port.
        web, api = f"{prefix}-web", f"{prefix}-api"
        item_a = self.instance(web, host_a, "0a1b2c3d4e5f", 32768, frontend_port=port)
        item_b = self.instance(api, host_b, "0a1b2c3d4e5f", 32769, frontend_port=port)
        reg_a.register(item_a)
        reg_b.register(item_b)
        both = {item_a.id, item_b.id}
        self.snapshot_until(
            reader,
            prefix,
            lambda ours: both <= set(ours),
            "both instances (a service kept from its port is still registered)",
        )
        self._skip_without_claims(prefix, reader, reg_a, reg_b)
        for who, registry in (("host A", reg_a), ("host B", reg_b), ("a third host", reader)):
            got = _claims(registry.snapshot(), prefix)
            assert got == [(port, web)], (
                f"{who}'s snapshot claims {got}, expected [({port}, {web!r})]: host A registered "
                f"{web} at {port} first, then host B {api} at the same port"
            )
        problems = _conflicts(reg_b, prefix)
        assert [p.service for p in problems] == [api], (
            f"host B's conflicts() must name {api}, whose port {web} holds: {problems}"
        )
        assert not _conflicts(reg_a, prefix), (
            f"host A holds the port, yet its conflicts() says {_conflicts(reg_a, prefix)}"
        )
        part = reader.read_services([web])
        if part is not None:
            assert (port, web) in part.claims, (
                f"read_services([{web!r}]) must give the claims of {web}: {part.claims}"
            )
        restarted = contract_registries.new(host_a, self.long_ttl)  # host A restarted
        restarted.register(item_a)
        got = _claims(reader.snapshot(), prefix)
        assert got == [(port, web)], f"after host A restarted the claims are {got}"
        contract_registries.close(reg_a, deregister=True)
        contract_registries.close(restarted, deregister=True)
        deadline = time.monotonic() + self.propagation_timeout
        while True:
            with contextlib.suppress(Unavailable):
                reg_b.keepalive()  # as the register role does
            got = _claims(reader.snapshot(), prefix)
            if got == [(port, api)] and not _conflicts(reg_b, prefix):
                break
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"host A left for good, yet after {self.propagation_timeout:g}s of host B's "
                    f"keepalives the claims are {got} (expected [({port}, {api!r})]) and host "
                    f"B's conflicts() says {_conflicts(reg_b, prefix)}",
                    pytrace=False,
                )
            time.sleep(min(reg_b.keepalive_interval(), 0.5))

    def test_a_service_keeps_its_first_port(self, contract_registries: _Registries) -> None:
        prefix = _unique()
        first = self._claim_port(prefix)
        second = first + 1
        host_a = self.host("kit-host-a", "127.0.0.1")
        host_b = self.host("kit-host-b", "127.0.0.2")
        reg_a = contract_registries.new(host_a, self.long_ttl)
        reg_b = contract_registries.new(host_b, self.long_ttl)
        reader = contract_registries.new(self.host("kit-reader"), self.long_ttl)
        web = f"{prefix}-web"
        item_a = self.instance(web, host_a, "0a1b2c3d4e5f", 32768, frontend_port=first)
        item_b = self.instance(web, host_b, "0a1b2c3d4e5f", 32769, frontend_port=second)
        reg_a.register(item_a)
        reg_b.register(item_b)
        both = {item_a.id, item_b.id}
        self.snapshot_until(reader, prefix, lambda ours: both <= set(ours), "both instances")
        self._skip_without_claims(prefix, reader, reg_a, reg_b)
        for _ in range(3):  # keepalives must not move it either
            reg_a.keepalive()
            reg_b.keepalive()
            catalog = reader.snapshot()
            ports = {i.id: i.frontend_port for i in catalog.instances if i.id in both}
            assert ports == dict.fromkeys(both, first), (
                f"{web} was registered at {first} by host A, then at {second} by host B: every "
                f"instance must be served on {first}, the snapshot says {ports}"
            )
            assert _claims(catalog, prefix) == [(first, web)], _claims(catalog, prefix)
        assert [p.service for p in _conflicts(reg_b, prefix)] == [web], (
            f"host B asked {second} for {web}, served on {first}: its conflicts() must say so "
            f"({_conflicts(reg_b, prefix)})"
        )
        assert not _conflicts(reg_a, prefix), _conflicts(reg_a, prefix)
