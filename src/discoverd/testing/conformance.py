"""Contract tests that every registry and proxy plugin runs against itself, on the real server.

A plugin's test module subclasses one of the two contract classes and provides a few fixtures;
pytest then runs every contract point as a separate test (``test_*`` method) of that class::

    from discoverd.testing.conformance import ProxyContract, RegistryContract

    class TestMyRegistry(RegistryContract):
        short_ttl = 2                     # optional class attributes, see below

        @pytest.fixture
        def registry_server(self, tmp_path): ...    # -> RegistryServer
        @pytest.fixture
        def make_registry(self, registry_server): ...  # -> RegistryFactory
        @pytest.fixture
        def write_bad_entry(self, registry_server): ...  # optional -> BadEntryWriter

    class TestMyProxy(ProxyContract):
        @pytest.fixture
        def make_proxy(self, tmp_path): ...     # -> ProxyFactory
        @pytest.fixture
        def proxy_probe(self, make_proxy): ...  # -> ProxyProbe

The contract classes are not collected themselves (their names do not start with ``Test``). A
fixture a subclass must provide and does not fails every check with a message naming it.

RegistryContract
================
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

ProxyContract
=============
Fixtures the subclass provides:

``make_proxy`` (required) -> :class:`ProxyFactory`
    ``make_proxy()`` returns a *new* ``Proxy`` object of the plugin each call, all managing the
    *same* proxy (same state directory, same process): a second object stands for a restarted
    discoverd. Frontends must listen on 127.0.0.1 (or every interface); other ports the proxy
    needs (a stats page) should be free ports, returned by ``reserved_ports()``. The fixture
    stops the real proxy process at teardown -- ``Proxy.close()`` leaves it running, by contract.

``proxy_probe`` (required) -> :class:`ProxyProbe`
    ``proxy_probe.reload_count()`` returns how many times the *running* proxy has reloaded its
    configuration, measured from the proxy itself rather than from the plugin's objects (HAProxy:
    the master's reload counter in ``show proc``; nginx: the generations of worker pids; a file
    exporter: how many times the file was replaced). It may raise while no proxy runs. It may
    also have ``running_config() -> str`` returning the configuration the proxy runs now, read
    from where the proxy reads it; the kit then checks it after every step.

Class attributes and methods:

``serves_traffic = True``  Set to False for a proxy that carries no traffic (a file exporter):
                           the checks then skip everything that connects to a frontend.
``service_mode = "http"``  The mode of the services the kit builds (``"http"`` or ``"tcp"``).
``traffic_timeout = 30.0``  Deadline for a change to be served, or a removed frontend to close.
``apply_delay_limit = 120.0``  Longest total wait the kit accepts from ``apply_delay()``.
``make_invalid_config(config) -> str``  A candidate the proxy's checker must refuse, made from
                           a valid one; by default the valid text plus a line of nonsense.
                           Override it if that is not invalid for your proxy.

The kit starts its own backends: small HTTP servers on 127.0.0.1 answering ``I am <name>``.
Every apply goes through the core's pipeline: ``render`` -> wait while ``apply_delay()`` asks ->
``validate`` -> ``apply``. After each apply the kit cross-checks the word ``apply`` returned with
the probe: ``"reloaded"`` must be seen as a reload, ``"runtime"`` and ``"unchanged"`` must not.

The checks (each a test method):

- ``test_render_is_deterministic``: the same services in any order render the same text;
  another instance, port, frontend port or service renders another text.
- ``test_rendered_configs_validate``: the renders of no service and of several services pass
  ``validate``.
- ``test_validate_rejects_an_invalid_config``: ``validate`` raises ``ProxyConfigError`` with a
  message, and neither reloads nor changes the running proxy, which keeps serving.
- ``test_apply_starts_the_proxy_and_serves``: the first apply starts the proxy, and each
  frontend answers from every one of its backends.
- ``test_empty_service_set``: the proxy starts with no service; a service added later is served
  and closes again when removed.
- ``test_apply_failure_keeps_the_previous_config`` (traffic only): a candidate whose new frontend
  port is held by another program is refused by ``validate`` or ``apply`` (``PluginError``);
  the previous services stay served, and once the port is free the same candidate applies.
- ``test_unchanged_input_causes_no_reload``: applying the same services again returns
  ``"unchanged"`` and the probe counts no reload.
- ``test_membership_change_is_served``: a backend replaced, a service added, a service removed:
  each change is served afterwards (exactly the new backends answer; a removed frontend closes).
- ``test_reserved_ports``: ``reserved_ports()`` is stable, holds valid ports that the running
  proxy really uses, and a service asking for one is refused before rendering.
- ``test_close_leaves_the_proxy_running``: after ``close()`` the proxy still serves its
  configuration, and a new proxy object adopts it: applying the same services is ``"unchanged"``
  with no reload.
"""

from __future__ import annotations

import contextlib
import errno
import math
import random
import socket
import threading
import time
import urllib.error
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, NoReturn, Protocol

import pytest

from discoverd.core.interfaces import (
    HostInfo,
    PluginError,
    Proxy,
    ProxyConfigError,
    Registry,
    Unavailable,
)
from discoverd.core.model import Catalog, Mode, Problem, Service, ServiceInstance
from discoverd.core.services import build_services
from discoverd.testing.services import free_port, http_get

__all__ = [
    "BadEntryWriter",
    "HttpBackend",
    "ProxyContract",
    "ProxyFactory",
    "ProxyProbe",
    "RegistryContract",
    "RegistryFactory",
    "RegistryServer",
    "fresh_port",
    "poll_until",
]


# --------------------------------------------------------------------------------------------
# What a subclass provides


class RegistryServer(Protocol):
    """The real registry server of a :class:`RegistryContract` run."""

    def stop(self) -> None:
        """Make the server unreachable (kill it); its data stays for :meth:`start`."""

    def start(self) -> None:
        """Start it again on the same address, with its data; return once it answers."""

    def restart(self) -> None:
        """Stop it and start it again on the same address with *no* data (all state lost)."""


class RegistryFactory(Protocol):
    """``make_registry(host=..., ttl=...)``: a new registry object of the plugin."""

    def __call__(self, *, host: HostInfo, ttl: int) -> Registry: ...


#: ``write_bad_entry(service)``: write malformed entries of ``service`` behind the plugin's back.
BadEntryWriter = Callable[[str], None]

#: ``make_proxy()``: a new proxy object managing the one real proxy of the test.
ProxyFactory = Callable[[], Proxy]


class ProxyProbe(Protocol):
    """Reads the real proxy's own state (optionally also ``running_config() -> str``)."""

    def reload_count(self) -> int:
        """How many times the running proxy has reloaded (may raise when none runs)."""


def _missing(contract: str, fixture: str, what: str) -> NoReturn:
    pytest.fail(
        f"{contract} needs a `{fixture}` fixture: {what}. Define it in your subclass "
        f"(see the docstring of discoverd.testing.conformance).",
        pytrace=False,
    )


# --------------------------------------------------------------------------------------------
# Helpers (also used by the pytest plugin's fixtures)


def poll_until(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> Any:
    """Call ``check`` until it returns something true (returned) or ``timeout`` passes.

    An exception from ``check`` counts as "not yet". On timeout, fail the test naming ``what``
    and the last exception or value seen. A deadline, not a timing assertion.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            pytest.fail(f"after {timeout:g}s still waiting for {what} (last: {last!r})")
        time.sleep(interval)


_PORTS_TAKEN: set[int] = set()


def fresh_port(avoid: Iterable[int] = ()) -> int:
    """A free TCP port on 127.0.0.1 not handed out before in this process nor in ``avoid``."""
    blocked = set(avoid)
    for _ in range(200):
        port = free_port()
        if port not in _PORTS_TAKEN and port not in blocked:
            _PORTS_TAKEN.add(port)
            return port
    raise RuntimeError("no free port found")


class HttpBackend:
    """A tiny HTTP server on 127.0.0.1 answering ``I am <name>`` to every GET; :meth:`stop` it."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        body = f"I am {name}\n".encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # health checks connect every second; keep the test output clean

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},  # shutdown() waits up to one interval
            name=f"backend-{name}",
            daemon=True,
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"HttpBackend({self.name!r}, port={self.port})"

    def instance(
        self,
        service: str,
        frontend_port: int,
        *,
        host_id: str = "kit",
        meta: Iterable[tuple[str, str]] = (),
    ) -> ServiceInstance:
        """This backend as an instance of ``service`` (id ``<host_id>:<name>:8000:tcp``)."""
        return ServiceInstance(
            service=service,
            id=f"{host_id}:{self.name}:8000:tcp",
            address="127.0.0.1",
            port=self.port,
            frontend_port=frontend_port,
            meta=tuple(meta),
            host_id=host_id,
        )

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Backends:
    """Backends of one test, all stopped by :meth:`stop_all`."""

    def __init__(self) -> None:
        self.started: list[HttpBackend] = []

    def __call__(self, name: str) -> HttpBackend:
        backend = HttpBackend(name)
        self.started.append(backend)
        return backend

    def stop_all(self) -> None:
        for backend in self.started:
            with contextlib.suppress(Exception):
                backend.stop()
        self.started.clear()


@contextlib.contextmanager
def _backends() -> Iterator[_Backends]:
    pool = _Backends()
    try:
        yield pool
    finally:
        pool.stop_all()


def _unique(prefix: str = "ck") -> str:
    """A short random token for names that must not clash with other tests' (lowercase)."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------------------------
# Registry contract


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
        self.error: BaseException | None = None
        self.returned = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(
            target=self._run, args=(since,), name="contract-watch", daemon=True
        )
        self.thread.start()

    def _notify(self, reason: str) -> None:
        with self._lock:
            self.reasons.append(reason)
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
        self.notified.clear()

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


# --------------------------------------------------------------------------------------------
# Proxy contract


def _answer(port: int, timeout: float = 2.0) -> str:
    """The backend name answering on the proxy's ``port`` (``I am <name>``), or raise."""
    body = http_get(f"http://127.0.0.1:{port}/", timeout=timeout).strip()
    if not body.startswith("I am "):
        raise AssertionError(f"unexpected answer on port {port}: {body[:80]!r}")
    return body.removeprefix("I am ")


def _port_in_use(port: int) -> bool:
    """True if something listens on 127.0.0.1:``port`` or holds it on every interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


class ProxyContract:
    """The contract every proxy plugin passes; see the module docstring for how to use it."""

    serves_traffic: ClassVar[bool] = True
    #: Checks that mean nothing for a proxy carrying no traffic; the pytest plugin deselects
    #: them (instead of skipping them) when ``serves_traffic`` is False.
    traffic_only_checks: ClassVar[frozenset[str]] = frozenset(
        {"test_apply_failure_keeps_the_previous_config"}
    )
    service_mode: ClassVar[Mode] = "http"
    traffic_timeout: ClassVar[float] = 30.0
    apply_delay_limit: ClassVar[float] = 120.0

    # -- fixtures a subclass provides ------------------------------------------------------

    @pytest.fixture
    def make_proxy(self) -> ProxyFactory:
        _missing(
            "ProxyContract",
            "make_proxy",
            "make_proxy() returning a new Proxy object of your plugin each call, all managing "
            "the same real proxy (one state directory); stop that proxy at teardown",
        )

    @pytest.fixture
    def proxy_probe(self) -> ProxyProbe:
        _missing(
            "ProxyContract",
            "proxy_probe",
            "an object whose reload_count() reads how many times the running proxy reloaded, "
            "from the proxy itself (e.g. HAProxy's `show proc`)",
        )

    def make_invalid_config(self, config: str) -> str:
        """A candidate the proxy's own checker must refuse (default: a line of nonsense)."""
        return config + "\nthis-is-not-a-valid-directive on;\n"

    # -- the kit's own fixtures ------------------------------------------------------------

    @pytest.fixture
    def contract_backends(self) -> Iterator[_Backends]:
        with _backends() as pool:
            yield pool

    # -- helpers ---------------------------------------------------------------------------

    def services(
        self,
        proxy: Proxy,
        wanted: Mapping[str, tuple[int, Sequence[HttpBackend]]],
    ) -> tuple[Service, ...]:
        """Services built as the core builds them: ``{name: (frontend port, backends)}``."""
        instances = [
            backend.instance(name, port)
            for name, (port, backends) in wanted.items()
            for backend in backends
        ]
        assignment = build_services(
            Catalog(instances=tuple(instances)),
            default_mode=self.service_mode,
            reserved_ports=proxy.reserved_ports(),
        )
        built = {s.name for s in assignment.services}
        missing = [name for name, (_, backends) in wanted.items() if backends and name not in built]
        assert not missing, f"services refused by build_services: {assignment.problems}"
        return assignment.services

    def ports(self, proxy: Proxy, count: int) -> list[int]:
        """``count`` free frontend ports, none of them reserved by ``proxy``."""
        reserved = proxy.reserved_ports()
        return [fresh_port(reserved) for _ in range(count)]

    def _reload_count(self, probe: ProxyProbe) -> int | None:
        try:
            return int(probe.reload_count())
        except Exception:
            return None  # no proxy runs yet

    def check_running_config(self, probe: ProxyProbe, expected: str, when: str) -> None:
        """If the probe can read the running configuration, it must be ``expected``."""
        reader = getattr(probe, "running_config", None)
        if reader is None:
            return
        running = reader()
        assert running == expected, (
            f"{when}: the proxy does not run the expected configuration "
            f"(running {len(running or '')} characters, expected {len(expected)})"
        )

    def wait_apply_delay(self, proxy: Proxy, config: str, services: Sequence[Service]) -> None:
        """Wait as long as ``apply_delay`` asks, as the core does (within apply_delay_limit)."""
        deadline = time.monotonic() + self.apply_delay_limit
        while True:
            delay = proxy.apply_delay(config, services)
            assert isinstance(delay, int | float) and math.isfinite(delay) and delay >= 0, (
                f"apply_delay() returned {delay!r}; expected a finite number of seconds >= 0"
            )
            if delay == 0:
                return
            if time.monotonic() + delay > deadline:
                pytest.fail(
                    f"apply_delay() still asks to wait {delay:g}s after "
                    f"{self.apply_delay_limit:g}s of waiting"
                )
            time.sleep(min(delay, 5.0))

    def apply(self, proxy: Proxy, probe: ProxyProbe, services: Sequence[Service]) -> str:
        """The core's pipeline: render -> apply_delay -> validate -> apply, cross-checked."""
        config = proxy.render(services)
        self.wait_apply_delay(proxy, config, services)
        proxy.validate(config)
        before = self._reload_count(probe)
        result = proxy.apply(config, services)
        assert result in ("started", "reloaded", "runtime", "unchanged"), (
            f"apply() returned {result!r}; expected started, reloaded, runtime or unchanged"
        )
        if before is not None and result == "reloaded":
            poll_until(
                lambda: (self._reload_count(probe) or 0) > before,
                self.traffic_timeout,
                f"the probe to count the reload apply() reported (count was {before})",
            )
        elif before is not None and result in ("runtime", "unchanged"):
            after = self._reload_count(probe)
            assert after == before, (
                f"apply() returned {result!r} but the proxy reloaded (reload count "
                f"{before} -> {after})"
            )
        elif result == "started":
            assert self._reload_count(probe) is not None, (
                "apply() returned 'started' but proxy_probe.reload_count() cannot read the "
                "running proxy"
            )
        self.check_running_config(probe, config, f"after apply() returned {result!r}")
        return result

    def wait_served(self, port: int, names: Iterable[str]) -> None:
        """Wait until the frontend on ``port`` answers from exactly the backends ``names``."""
        expected = set(names)
        rounds = 4 * max(len(expected), 1)

        def one_round() -> bool:
            seen = {_answer(port) for _ in range(rounds)}
            if seen != expected:
                raise AssertionError(f"answers came from {sorted(seen)}")
            return True

        poll_until(
            one_round, self.traffic_timeout, f"port {port} to be served by {sorted(expected)}"
        )

    def wait_closed(self, port: int) -> None:
        """Wait until nothing answers HTTP on ``port`` any more."""

        def closed() -> bool:
            try:
                _answer(port, timeout=1.0)
            except (OSError, urllib.error.URLError, AssertionError):
                return True
            return False

        poll_until(closed, self.traffic_timeout, f"the frontend on port {port} to close")

    # -- the checks ------------------------------------------------------------------------

    def test_render_is_deterministic(
        self, make_proxy: ProxyFactory, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b, c, d = (contract_backends(n) for n in ("a", "b", "c", "d"))
        p1, p2, p3 = self.ports(proxy, 3)
        base = {"web": (p1, [a, b]), "api": (p2, [c])}
        services = list(self.services(proxy, base))
        text = proxy.render(services)
        rng = random.Random(7)
        for _ in range(5):
            shuffled = list(self.services(proxy, base))
            rng.shuffle(shuffled)
            assert proxy.render(shuffled) == text, (
                "the same services in another order rendered another configuration"
            )
        variants = {
            "one instance less": {"web": (p1, [a]), "api": (p2, [c])},
            "another backend": {"web": (p1, [a, d]), "api": (p2, [c])},
            "another frontend port": {"web": (p3, [a, b]), "api": (p2, [c])},
            "one more service": {**base, "db": (p3, [d])},
        }
        for what, wanted in variants.items():
            assert proxy.render(self.services(proxy, wanted)) != text, (
                f"{what} rendered the same configuration"
            )

    def test_rendered_configs_validate(
        self, make_proxy: ProxyFactory, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b, c = (contract_backends(n) for n in ("a", "b", "c"))
        p1, p2 = self.ports(proxy, 2)
        proxy.validate(proxy.render([]))
        proxy.validate(proxy.render(self.services(proxy, {"web": (p1, [a, b]), "api": (p2, [c])})))

    def test_validate_rejects_an_invalid_config(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b = contract_backends("a"), contract_backends("b")
        p1, p2 = self.ports(proxy, 2)
        running = self.services(proxy, {"web": (p1, [a])})
        self.apply(proxy, proxy_probe, running)
        candidate = proxy.render(self.services(proxy, {"web": (p1, [a]), "api": (p2, [b])}))
        invalid = self.make_invalid_config(candidate)
        assert invalid != candidate, "make_invalid_config() returned the valid configuration"
        before = self._reload_count(proxy_probe)
        with pytest.raises(ProxyConfigError) as refused:
            proxy.validate(invalid)
        assert str(refused.value).strip(), "ProxyConfigError carries no message for the operator"
        assert self._reload_count(proxy_probe) == before, "validate() reloaded the running proxy"
        self.check_running_config(proxy_probe, proxy.render(running), "after a refused candidate")
        if self.serves_traffic:
            self.wait_served(p1, ["a"])

    def test_apply_starts_the_proxy_and_serves(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b, c = (contract_backends(n) for n in ("a", "b", "c"))
        p1, p2 = self.ports(proxy, 2)
        services = self.services(proxy, {"web": (p1, [a, b]), "api": (p2, [c])})
        result = self.apply(proxy, proxy_probe, services)
        assert result != "unchanged", "the first apply() with no proxy running did nothing"
        if self.serves_traffic:
            self.wait_served(p1, ["a", "b"])
            self.wait_served(p2, ["c"])

    def test_empty_service_set(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a = contract_backends("a")
        (p1,) = self.ports(proxy, 1)
        assert self.apply(proxy, proxy_probe, []) != "unchanged"
        assert self._reload_count(proxy_probe) is not None, "no proxy runs after applying []"
        self.apply(proxy, proxy_probe, self.services(proxy, {"web": (p1, [a])}))
        if self.serves_traffic:
            self.wait_served(p1, ["a"])
        self.apply(proxy, proxy_probe, [])
        if self.serves_traffic:
            self.wait_closed(p1)

    def test_apply_failure_keeps_the_previous_config(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        if not self.serves_traffic:
            pytest.skip(f"{type(self).__name__}.serves_traffic is False: no port to conflict on")
        proxy = make_proxy()
        a, b = contract_backends("a"), contract_backends("b")
        p1, p2 = self.ports(proxy, 2)
        running = self.services(proxy, {"web": (p1, [a])})
        self.apply(proxy, proxy_probe, running)
        self.wait_served(p1, ["a"])
        wanted = self.services(proxy, {"web": (p1, [a]), "api": (p2, [b])})
        config = proxy.render(wanted)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
            squatter.bind(("127.0.0.1", p2))  # another program holds the new frontend's port
            squatter.listen(1)
            self.wait_apply_delay(proxy, config, wanted)
            try:
                proxy.validate(config)
            except ProxyConfigError:
                pass  # refused up front: fine
            else:
                with pytest.raises(PluginError):
                    proxy.apply(config, wanted)
            self.wait_served(p1, ["a"])
            self.check_running_config(
                proxy_probe, proxy.render(running), "after a configuration the proxy refused"
            )
        result = self.apply(proxy, proxy_probe, wanted)
        assert result != "unchanged", (
            "once the port was free, apply() of the refused configuration returned 'unchanged': "
            "the plugin took the failed configuration for the running one"
        )
        self.wait_served(p1, ["a"])
        self.wait_served(p2, ["b"])

    def test_unchanged_input_causes_no_reload(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b, c = (contract_backends(n) for n in ("a", "b", "c"))
        p1, p2 = self.ports(proxy, 2)
        wanted = {"web": (p1, [a, b]), "api": (p2, [c])}
        self.apply(proxy, proxy_probe, self.services(proxy, wanted))
        if self.serves_traffic:
            self.wait_served(p1, ["a", "b"])
        before = self._reload_count(proxy_probe)
        again = list(self.services(proxy, wanted))
        random.Random(3).shuffle(again)
        for _ in range(2):
            assert self.apply(proxy, proxy_probe, again) == "unchanged", (
                "applying the configuration that already runs did not return 'unchanged'"
            )
        assert self._reload_count(proxy_probe) == before, "unchanged input caused a reload"

    def test_membership_change_is_served(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b, c, d = (contract_backends(n) for n in ("a", "b", "c", "d"))
        p1, p2 = self.ports(proxy, 2)
        steps: list[tuple[str, Mapping[str, tuple[int, Sequence[HttpBackend]]]]] = [
            ("start", {"web": (p1, [a, b])}),
            ("a backend replaced", {"web": (p1, [b, c])}),
            ("a service added", {"web": (p1, [b, c]), "api": (p2, [d])}),
            ("a backend added", {"web": (p1, [a, b, c]), "api": (p2, [d])}),
            ("a service removed", {"web": (p1, [a, b, c])}),
        ]
        for what, wanted in steps:
            result = self.apply(proxy, proxy_probe, self.services(proxy, wanted))
            assert result != "unchanged", f"{what}: apply() returned 'unchanged'"
            if not self.serves_traffic:
                continue
            for _, (port, backends) in wanted.items():
                self.wait_served(port, [x.name for x in backends])
            if what == "a service removed":
                self.wait_closed(p2)

    def test_reserved_ports(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        reserved = proxy.reserved_ports()
        assert isinstance(reserved, frozenset), "reserved_ports() must return a frozenset"
        assert all(isinstance(p, int) and 1 <= p <= 65535 for p in reserved), (
            f"reserved_ports() holds invalid ports: {sorted(reserved)}"
        )
        assert make_proxy().reserved_ports() == reserved, "reserved_ports() is not stable"
        a = contract_backends("a")
        (p1,) = self.ports(proxy, 1)
        self.apply(proxy, proxy_probe, self.services(proxy, {"web": (p1, [a])}))
        if not reserved:
            return
        port = min(reserved)
        claim = build_services(
            Catalog(instances=(a.instance("squatter", port), a.instance("web", p1))),
            default_mode=self.service_mode,
            reserved_ports=proxy.reserved_ports(),
        )
        assert [s.name for s in claim.services] == ["web"], (
            "a service asking for a reserved port was not refused"
        )
        proxy.validate(proxy.render(claim.services))
        if self.serves_traffic:
            unused = [p for p in sorted(reserved) if not _port_in_use(p)]
            assert not unused, (
                f"reserved_ports() names {unused}, which the running proxy does not use"
            )

    def test_close_leaves_the_proxy_running(
        self, make_proxy: ProxyFactory, proxy_probe: ProxyProbe, contract_backends: _Backends
    ) -> None:
        proxy = make_proxy()
        a, b = contract_backends("a"), contract_backends("b")
        (p1,) = self.ports(proxy, 1)
        services = self.services(proxy, {"web": (p1, [a, b])})
        self.apply(proxy, proxy_probe, services)
        config = proxy.render(services)
        proxy.close()
        before = self._reload_count(proxy_probe)
        assert before is not None, "no proxy runs any more after close()"
        self.check_running_config(proxy_probe, config, "after close()")
        if self.serves_traffic:
            self.wait_served(p1, ["a", "b"])
        successor = make_proxy()  # a restarted discoverd adopts the running proxy
        assert successor.render(services) == config
        result = self.apply(successor, proxy_probe, services)
        assert result == "unchanged", (
            f"a new proxy object applying the running configuration returned {result!r}; it "
            "should adopt the running proxy"
        )
        assert self._reload_count(proxy_probe) == before
        if self.serves_traffic:
            self.wait_served(p1, ["a", "b"])
