"""Tests of the conformance kit itself: it passes a correct plugin and fails a broken one.

The plugins here are deliberately small in-memory fakes (a registry with leases and watches, a
proxy that really forwards TCP on 127.0.0.1): a unit test of the kit, which cannot rely on a
real server being broken in a chosen way. Each fake takes a set of *flaws*; the contract is run
in a separate pytest process against the fake, and the test asserts which checks passed and
which failed. A kit check that cannot fail would show up here as a flaw that goes unnoticed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from discoverd import (
    Catalog,
    HostInfo,
    Notify,
    PluginError,
    Problem,
    Proxy,
    ProxyConfigError,
    Registry,
    Service,
    ServiceInstance,
    Source,
    SourceSnapshot,
    Unavailable,
    ValidationError,
)
from discoverd.testing.conformance import (
    BadEntryWriter,
    ProxyContract,
    ProxyFactory,
    RegistryContract,
    RegistryFactory,
    SourceContract,
    SourceFactory,
    fresh_port,
)

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------------------
# An in-memory registry server and its plugin


class MemoryServer:
    """A TTL key-value store standing in for etcd or Consul (``stop``/``start``/``restart``)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.up = True
        self.revision = 1
        self.entries: dict[tuple[str, str], tuple[str, int]] = {}  # -> (raw value, lease)
        self.changes: list[tuple[int, str | None]] = []  # (revision, service or None: unknown)
        self.leases: dict[int, tuple[float, float]] = {}  # lease -> (expiry, ttl)
        #: Frontend-port claims: (service, host id) -> (port, lease, order taken).
        self.holders: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._next_lease = 1
        self._order = 0

    # the RegistryServer protocol
    def stop(self) -> None:
        with self.cond:
            self.up = False
            self.cond.notify_all()

    def start(self) -> None:
        with self.cond:
            self.up = True
            self.cond.notify_all()

    def restart(self) -> None:
        with self.cond:
            self.entries.clear()
            self.leases.clear()
            self.holders.clear()
            self.revision += 1
            self.up = True
            self.cond.notify_all()

    # what the plugin calls (with self.cond held)
    def check_up(self) -> None:
        if not self.up:
            raise Unavailable("memory server is down")

    def sweep(self) -> None:
        now = time.monotonic()
        dead = {lease for lease, (expiry, _) in self.leases.items() if expiry <= now}
        if not dead:
            return
        for lease in dead:
            del self.leases[lease]
        gone = {key for key, (_, lease) in self.entries.items() if lease in dead}
        for key in gone:
            del self.entries[key]
        for key in [k for k, (_, lease, _) in self.holders.items() if lease in dead]:
            del self.holders[key]
        self.bump(*(service for service, _ in gone))

    def hold(self, service: str, host: str, wanted: int, lease: int, last_wins: bool) -> str:
        """Take or join ``service``'s claim (at its oldest holder's port, else ``wanted``);
        return the service that holds that port instead, if one does."""
        held = sorted(
            (order, port) for (s, _), (port, _, order) in self.holders.items() if s == service
        )
        port = held[0][1] if held and not last_wins else wanted
        for (other, _), (other_port, _, _) in self.holders.items():
            if other != service and other_port == port:
                return other
        self._order += 1
        self.holders[(service, host)] = (port, lease, self._order)
        return ""

    def claims(self) -> tuple[dict[str, int], tuple[tuple[int, str], ...]]:
        """Each service's port (its oldest holder's; with ``last_wins``, see the flaw), and
        the ``(port, service)`` claims."""
        ports: dict[str, tuple[int, int]] = {}
        for (service, _), (port, _, order) in self.holders.items():
            if service not in ports or order < ports[service][0]:
                ports[service] = (order, port)
        return {s: p for s, (_, p) in ports.items()}, tuple(
            sorted((p, s) for s, (_, p) in ports.items())
        )

    def newest_ports(self) -> dict[str, int]:
        newest: dict[str, tuple[int, int]] = {}
        for (service, _), (port, _, order) in self.holders.items():
            if service not in newest or order > newest[service][0]:
                newest[service] = (order, port)
        return {s: p for s, (_, p) in newest.items()}

    def bump(self, *services: str) -> None:
        """A new revision; ``services`` changed in it (none named: unknown)."""
        self.revision += 1
        for service in services or (None,):
            self.changes.append((self.revision, service))
        self.cond.notify_all()

    def changed_since(self, revision: int) -> frozenset[str] | None:
        """The services changed after ``revision``; ``None`` when one change is unknown."""
        named = {service for rev, service in self.changes if rev > revision}
        return None if None in named else frozenset(s for s in named if s is not None)

    def grant(self, ttl: float) -> int:
        lease, self._next_lease = self._next_lease, self._next_lease + 1
        self.leases[lease] = (time.monotonic() + ttl, ttl)
        return lease

    def write_bad(self, service: str) -> None:
        """The ``write_bad_entry`` fixture: garbage behind the plugin's back."""
        with self.cond:
            self.entries[(service, "bad1")] = ("{not json", 0)
            self.entries[(service, "bad2")] = (json.dumps({"address": "example.org"}), 0)
            self.bump(service)


class MemoryRegistry(Registry):
    """A registry plugin on :class:`MemoryServer`; ``flaws`` break it on purpose."""

    def __init__(self, server: MemoryServer, host: HostInfo, ttl: int, flaws: Sequence[str]):
        self.server = server
        self.host = host
        self.ttl = float("inf") if "never_expires" in flaws else float(ttl)
        self.flaws = frozenset(flaws)
        self.lease: int | None = None
        self.lost = False
        self.owned: set[tuple[str, str]] = set()
        self.closed = threading.Event()
        self.asked: dict[tuple[str, str], int | None] = {}  # the frontend port of each owned
        self.held: dict[str, int] = {}
        self.blocked: dict[str, tuple[int, str]] = {}

    def _claim(self, service: str) -> None:
        """(With ``server.cond`` held.) Take ``service``'s claim for this host."""
        asked = [p for (s, _), p in self.asked.items() if s == service and p is not None]
        if not asked or self.lease is None:
            return
        wanted = min(asked)
        owner = self.server.hold(
            service, self.host.id, wanted, self.lease, "second_port_wins" in self.flaws
        )
        self.blocked.pop(service, None)
        if owner:
            self.blocked[service] = (wanted, owner)
        else:
            self.held[service] = self.server.holders[(service, self.host.id)][0]

    def register(self, instance: ServiceInstance) -> None:
        with self.server.cond:
            self.server.check_up()
            self.server.sweep()
            if self.lease is None or self.lease not in self.server.leases:
                self.lease = self.server.grant(self.ttl)
            document: dict[str, Any] = {
                "address": instance.address,
                "port": instance.port,
                "protocol": instance.protocol,
                "frontend_port": instance.frontend_port,
                "tags": list(instance.tags),
                "meta": instance.meta_dict,
                "host_id": instance.host_id,
            }
            if "drops_fields" in self.flaws:
                document.update(tags=[], meta={})
            key = (instance.service, instance.id)
            self.server.entries[key] = (json.dumps(document), self.lease)
            self.owned.add(key)
            self.asked[key] = instance.frontend_port
            if instance.service not in self.held and instance.service not in self.blocked:
                self._claim(instance.service)
            self.server.bump(instance.service)

    def deregister(self, instance: ServiceInstance) -> None:
        if "deregister_noop" in self.flaws:
            return
        with self.server.cond:
            self.server.check_up()
            key = (instance.service, instance.id)
            self.owned.discard(key)
            self.asked.pop(key, None)
            if not any(s == instance.service for s, _ in self.owned):
                self.held.pop(instance.service, None)
                self.blocked.pop(instance.service, None)
                self.server.holders.pop((instance.service, self.host.id), None)
            if self.server.entries.pop(key, None) is not None:
                self.server.bump(instance.service)

    def keepalive(self) -> bool:
        with self.server.cond:
            self.server.check_up()
            self.server.sweep()
            if "keepalive_lies" in self.flaws:
                return True
            if self.lease is not None:
                if self.lease in self.server.leases:
                    self.server.leases[self.lease] = (time.monotonic() + self.ttl, self.ttl)
                else:
                    self.lease = None
                    self.lost = bool(self.owned)
                    self.owned.clear()
            if self.lost:
                self.lost = False
                self.asked.clear()
                self.held.clear()
                self.blocked.clear()
                return False
            for service in sorted(self.blocked):  # kept from its port: try again
                self._claim(service)
            return True

    def keepalive_interval(self) -> float:
        return min(self.ttl / 3, 1.0)

    def conflicts(self) -> list[Problem]:
        if "conflicts_silent" in self.flaws:
            return []
        problems = [
            Problem(f"service {s}", f"port {port} is held by {owner}", service=s)
            for s, (port, owner) in sorted(self.blocked.items())
        ]
        for service, port in sorted(self.held.items()):
            asked = {p for (s, _), p in self.asked.items() if s == service and p is not None}
            if asked - {port}:
                problems.append(Problem(f"service {service}", f"served on {port}", service=service))
        return problems

    def snapshot(self) -> Catalog:
        with self.server.cond:
            if not self.server.up:
                if "empty_when_down" in self.flaws:
                    return Catalog()
                raise Unavailable("memory server is down")
            self.server.sweep()
            entries = dict(self.server.entries)
            revision = self.server.revision
            fleet, claims = self.server.claims()
            if "second_port_wins" in self.flaws:
                fleet = self.server.newest_ports()
            if "claims_per_host" in self.flaws:  # what this host holds: in its memory
                claims = tuple(sorted((p, s) for s, p in self.held.items()))
        instances: list[ServiceInstance] = []
        problems: list[Problem] = []
        for (service, iid), (raw, _) in sorted(entries.items()):
            try:
                document = json.loads(raw)
                instances.append(
                    ServiceInstance(
                        service=service,
                        id=iid,
                        address=document["address"],
                        port=document["port"],
                        protocol=document["protocol"],
                        frontend_port=fleet.get(service, document["frontend_port"]),
                        tags=tuple(document["tags"]),
                        meta=tuple(document["meta"].items()),
                        host_id=document["host_id"],
                    )
                )
            except (ValueError, KeyError, TypeError, ValidationError) as exc:
                if "bad_entry_raises" in self.flaws:
                    raise PluginError(f"bad entry {service}/{iid}") from None
                owner = "" if "partial_problems_unowned" in self.flaws else service
                problems.append(
                    Problem(f"{service}/{iid}", f"malformed entry ({exc!r})", service=owner)
                )
        return Catalog(tuple(instances), tuple(problems), revision, claims)

    def read_services(self, names: Collection[str]) -> Catalog | None:
        full = self.snapshot()
        if "partial_reads_everything" in self.flaws:
            return full
        wanted = set(names)
        return Catalog(
            tuple(i for i in full.instances if i.service in wanted),
            tuple(p for p in full.problems if p.subject.split("/")[0] in wanted),
            full.revision,
            tuple(c for c in full.claims if c[1] in wanted),
        )

    def watch(self, notify: Notify, stop: threading.Event, since: int) -> None:
        with self.server.cond:
            if "watch_from_now" in self.flaws:
                since = self.server.revision
            while True:
                ignore_stop = "watch_ignores_stop" in self.flaws
                if not ignore_stop and (stop.is_set() or self.closed.is_set()):
                    return
                if not self.server.up:
                    if ignore_stop:
                        self.server.cond.wait(0.1)
                        continue
                    raise Unavailable("memory server went down")
                self.server.sweep()
                if self.server.revision > since:
                    named = self.server.changed_since(since)
                    since = self.server.revision
                    if "watch_names_wrong" in self.flaws:
                        named = frozenset({"not-the-one"})
                    if "watch_silent" not in self.flaws:
                        notify("memory watch", services=named)
                self.server.cond.wait(0.1)

    def close(self, deregister: bool = False) -> None:
        self.closed.set()
        with self.server.cond:
            revoke = deregister != ("close_ignores_deregister" in self.flaws)
            if "close_always_revokes" in self.flaws:
                revoke = True
            if revoke and self.lease is not None and self.server.up:
                self.server.leases[self.lease] = (0.0, 0.0)
                self.server.sweep()
            self.server.cond.notify_all()


# --------------------------------------------------------------------------------------------
# An in-memory proxy that really forwards TCP on 127.0.0.1


class Listener:
    """Accepts on 127.0.0.1:``port`` and pipes each connection to the next backend."""

    def __init__(self, port: int, backends: list[tuple[str, int]]) -> None:
        self.port = port
        self.backends = backends
        self._next = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.bind(("127.0.0.1", port))
            self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            backends = list(self.backends)
            if not backends:
                client.close()
                continue
            target = backends[self._next % len(backends)]
            self._next += 1
            threading.Thread(target=self._serve, args=(client, target), daemon=True).start()

    @staticmethod
    def _serve(client: socket.socket, target: tuple[str, int]) -> None:
        try:
            upstream = socket.create_connection(target, timeout=5)
        except OSError:
            client.close()
            return

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        back.start()
        pipe(client, upstream)
        back.join(10)
        client.close()
        upstream.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class MemoryRuntime:
    """The "running proxy": outlives the proxy objects that manage it (one per test)."""

    def __init__(self, flaws: frozenset[str], stats_port: int, traffic: bool) -> None:
        self.flaws = flaws
        self.traffic = traffic
        self.config: str | None = None
        self.reloads = 0
        self.listeners: dict[int, Listener] = {}
        self.stats_port = stats_port
        self.stats: Listener | None = None

    def run(self, config: str, services: Sequence[Service]) -> None:
        if self.traffic:
            self._serve(services)
        if self.config is not None:
            self.reloads += 1
        self.config = config

    def _serve(self, services: Sequence[Service]) -> None:
        if self.stats is None and "reserves_unused" not in self.flaws:
            self.stats = Listener(self.stats_port, [])
        wanted = {
            s.frontend_port: [(i.address, i.port) for i in s.instances]
            for s in services
            if s.protocol == "tcp"
        }
        opened: dict[int, Listener] = {}
        try:
            for port in sorted(set(wanted) - set(self.listeners)):
                opened[port] = Listener(port, wanted[port])
        except OSError as exc:
            for listener in opened.values():
                listener.close()
            if "half_apply" in self.flaws:
                self.stop()
            raise PluginError(f"cannot listen: {exc}") from None
        for port, listener in self.listeners.items():
            if port in wanted and "sticky_members" not in self.flaws:
                listener.backends = wanted[port]
        for port in sorted(set(self.listeners) - set(wanted)):
            if "keeps_removed" not in self.flaws:
                self.listeners.pop(port).close()
        self.listeners.update(opened)

    def stop(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()
        if self.stats is not None:
            self.stats.close()
            self.stats = None


_LINE_RE = re.compile(r"(#.*|service [a-z0-9_.-]+ \d+ (http|tcp)|  server \S+ \S+|)")


class MemoryProxy(Proxy):
    """A proxy plugin managing a :class:`MemoryRuntime`; ``flaws`` break it on purpose."""

    def __init__(self, runtime: MemoryRuntime) -> None:
        self.runtime = runtime
        self.flaws = runtime.flaws
        self.last: str | None = runtime.config if "no_adopt" not in self.flaws else None

    def render(self, services: Sequence[Service]) -> str:
        ordered = (
            list(services)
            if "render_unordered" in self.flaws
            else sorted(services, key=lambda s: s.name)
        )
        lines = ["# memory proxy"]
        for service in ordered:
            lines.append(f"service {service.name} {service.frontend_port} {service.mode}")
            if "render_ignores_instances" in self.flaws:
                continue
            lines += [f"  server {i.id} {i.endpoint}" for i in service.instances]
        return "\n".join(lines) + "\n"

    def validate(self, config: str) -> None:
        if "validate_touches_running" in self.flaws and self.runtime.config is not None:
            self.runtime.run(config, [])
        if "validate_accepts_all" in self.flaws:
            return
        for number, line in enumerate(config.splitlines(), 1):
            if not _LINE_RE.fullmatch(line):
                raise ProxyConfigError(f"line {number}: cannot parse {line!r}")

    def apply(self, config: str, services: Sequence[Service]) -> str:
        if config == self.last and self.runtime.config == config:
            if "lies_unchanged" in self.flaws:
                self.runtime.run(config, services)
            if "always_reload" not in self.flaws:
                return "unchanged"
        started = self.runtime.config is None
        self.runtime.run(config, services)
        self.last = config
        return "started" if started else "reloaded"

    def reserved_ports(self) -> frozenset[int]:
        return frozenset({self.runtime.stats_port})

    def close(self) -> None:
        if "close_stops" in self.flaws:
            self.runtime.stop()
            self.runtime.config = None


class MemoryProbe:
    def __init__(self, runtime: MemoryRuntime) -> None:
        self.runtime = runtime

    def reload_count(self) -> int:
        if self.runtime.config is None:
            raise RuntimeError("no proxy runs")
        return self.runtime.reloads

    def running_config(self) -> str | None:
        return self.runtime.config


# --------------------------------------------------------------------------------------------
# An in-memory container host and its source plugin


class MemoryHost:
    """Workloads that start, get a stop signal, and exit ``grace`` seconds later."""

    def __init__(self, grace: float = 1.0) -> None:
        self.cond = threading.Condition()
        self.grace = grace
        self.next = 1
        self.running: dict[int, float] = {}  # workload -> exit time (inf: not stopping)
        self.signalled: set[int] = set()  # the "events" a source learns stops from
        self.changes = 0

    # the Workloads protocol
    def start(self) -> int:
        with self.cond:
            workload, self.next = self.next, self.next + 1
            self.running[workload] = float("inf")
            self._changed()
            return workload

    def owns(self, workload: int, instance: ServiceInstance) -> bool:
        return instance.id == f"mem:w{workload}:80:tcp"

    def begin_stop(self, workload: int) -> None:
        with self.cond:
            self.running[workload] = time.monotonic() + self.grace
            self.signalled.add(workload)
            self._changed()

    def running_now(self) -> set[int]:
        now = time.monotonic()
        return {w for w, ends in self.running.items() if ends > now}

    def is_running(self, workload: int) -> bool:
        with self.cond:
            return workload in self.running_now()

    def remove(self, workload: int) -> None:
        with self.cond:
            self.running.pop(workload, None)
            self.signalled.discard(workload)
            self._changed()

    def _changed(self) -> None:
        self.changes += 1
        self.cond.notify_all()


class MemoryWorkloads:
    """The ``workloads`` fixture over a :class:`MemoryHost` (``running`` is its own name)."""

    def __init__(self, host: MemoryHost) -> None:
        self.host = host
        self.start = host.start
        self.owns = host.owns
        self.begin_stop = host.begin_stop
        self.remove = host.remove

    def running(self, workload: int) -> bool:
        return self.host.is_running(workload)


class MemorySource(Source):
    """A source plugin on :class:`MemoryHost`; ``flaws`` break it on purpose."""

    def __init__(self, host: MemoryHost, flaws: Sequence[str]) -> None:
        self.host = host
        self.flaws = frozenset(flaws)
        self.listed: set[int] = set()
        self.closed = threading.Event()
        self.forgotten: set[int] = set()

    def snapshot(self) -> SourceSnapshot:
        with self.host.cond:
            running = self.host.running_now()
        self.listed = running
        return SourceSnapshot(
            tuple(
                ServiceInstance("mem", f"mem:w{w}:80:tcp", "127.0.0.1", 30000 + w, "tcp", 80)
                for w in sorted(running)
            )
        )

    def stopping(self) -> frozenset[str]:
        if "stopping_ignored" in self.flaws:
            return frozenset()
        with self.host.cond:
            told = set(self.host.signalled)
        if "stopping_everything" in self.flaws:
            told = set(self.listed)
        if "stopping_stale" in self.flaws:
            self.forgotten |= told
            told |= self.forgotten
        else:
            told &= self.listed
        return frozenset(f"mem:w{w}:80:tcp" for w in told)

    def watch(self, notify: Notify, stop: threading.Event) -> None:
        with self.host.cond:
            seen = self.host.changes
            while not stop.is_set():
                if self.closed.is_set() and "close_ignored" not in self.flaws:
                    return
                if self.host.changes != seen:
                    seen = self.host.changes
                    if "watch_silent" not in self.flaws:
                        notify("memory host")
                self.host.cond.wait(0.05)

    def close(self) -> None:
        self.closed.set()


# --------------------------------------------------------------------------------------------
# The contract bound to the fakes (not collected here: the names do not start with "Test")


class MemorySourceRun(SourceContract):
    flaws: ClassVar[tuple[str, ...]] = ()
    propagation_timeout = 2.0
    watch_stop_timeout = 2.0
    stop_grace = 1.0

    @pytest.fixture
    def memory_host(self) -> MemoryHost:
        return MemoryHost(grace=2.0)

    @pytest.fixture
    def make_source(self, memory_host: MemoryHost) -> SourceFactory:
        return lambda: MemorySource(memory_host, self.flaws)

    @pytest.fixture
    def workloads(self, memory_host: MemoryHost) -> MemoryWorkloads:
        return MemoryWorkloads(memory_host)


class MemoryRegistryRun(RegistryContract):
    flaws: ClassVar[tuple[str, ...]] = ()
    short_ttl = 1
    expiry_slack = 2.0
    propagation_timeout = 2.0
    watch_stop_timeout = 2.0
    watch_loss_timeout = 3.0
    restart_timeout = 3.0

    @pytest.fixture
    def registry_server(self) -> MemoryServer:
        return MemoryServer()

    @pytest.fixture
    def make_registry(self, registry_server: MemoryServer) -> RegistryFactory:
        def build(*, host: HostInfo, ttl: int) -> Registry:
            return MemoryRegistry(registry_server, host, ttl, self.flaws)

        return build

    @pytest.fixture
    def write_bad_entry(self, registry_server: MemoryServer) -> BadEntryWriter:
        return registry_server.write_bad


class MemoryProxyRun(ProxyContract):
    flaws: ClassVar[tuple[str, ...]] = ()
    traffic_timeout = 3.0

    @pytest.fixture
    def runtime(self) -> Iterator[MemoryRuntime]:
        runtime = MemoryRuntime(frozenset(self.flaws), fresh_port(), self.serves_traffic)
        yield runtime
        runtime.stop()

    @pytest.fixture
    def make_proxy(self, runtime: MemoryRuntime) -> ProxyFactory:
        return lambda: MemoryProxy(runtime)

    @pytest.fixture
    def proxy_probe(self, runtime: MemoryRuntime) -> MemoryProbe:
        return MemoryProbe(runtime)


# Each flaw, and the contract checks that must fail because of it (and only those are run).
REGISTRY_FLAWS = {
    "drops_fields": ["test_register_keeps_every_field"],
    "deregister_noop": ["test_deregister_removes_only_that_instance"],
    "never_expires": ["test_entries_expire_after_the_agent_dies"],
    "close_always_revokes": ["test_entries_expire_after_the_agent_dies"],
    "close_ignores_deregister": [
        "test_close_with_deregister_removes_entries_at_once",
        "test_two_hosts_share_the_catalog",
    ],
    "watch_silent": ["test_watch_delivers_a_change", "test_watch_names_the_changed_services"],
    "watch_from_now": ["test_watch_resumes_from_the_snapshot_revision"],
    "watch_ignores_stop": [
        "test_watch_delivers_a_change",
        "test_close_unblocks_watch",
        "test_watch_ends_when_the_server_dies",
    ],
    "empty_when_down": ["test_unavailable_server_raises_unavailable"],
    "keepalive_lies": ["test_reregister_after_server_restart"],
    "bad_entry_raises": [
        "test_bad_entries_become_problems",
        "test_read_services_matches_a_full_snapshot",
    ],
    "watch_names_wrong": ["test_watch_names_the_changed_services"],
    "partial_reads_everything": ["test_read_services_matches_a_full_snapshot"],
    "partial_problems_unowned": ["test_read_services_matches_a_full_snapshot"],
    "claims_per_host": [
        "test_a_claimed_port_is_decided_once_for_the_fleet",
        "test_a_service_keeps_its_first_port",
    ],
    "conflicts_silent": [
        "test_a_claimed_port_is_decided_once_for_the_fleet",
        "test_a_service_keeps_its_first_port",
    ],
    "second_port_wins": ["test_a_service_keeps_its_first_port"],
}

PROXY_FLAWS = {
    "render_unordered": ["test_render_is_deterministic"],
    "render_ignores_instances": ["test_render_is_deterministic"],
    "validate_accepts_all": ["test_validate_rejects_an_invalid_config"],
    "validate_touches_running": ["test_validate_rejects_an_invalid_config"],
    "always_reload": ["test_unchanged_input_causes_no_reload"],
    "lies_unchanged": ["test_unchanged_input_causes_no_reload"],
    "no_adopt": ["test_close_leaves_the_proxy_running"],
    "close_stops": ["test_close_leaves_the_proxy_running"],
    "sticky_members": ["test_membership_change_is_served"],
    "keeps_removed": ["test_membership_change_is_served", "test_empty_service_set"],
    "half_apply": ["test_apply_failure_keeps_the_previous_config"],
    "reserves_unused": ["test_reserved_ports"],
}

SOURCE_FLAWS = {
    "stopping_ignored": ["test_a_stop_signal_is_named_before_the_workload_exits"],
    "stopping_stale": ["test_a_stop_signal_is_named_before_the_workload_exits"],
    "stopping_everything": ["test_stopping_names_only_instances_of_the_snapshot"],
    "watch_silent": ["test_watch_notifies_starts_and_stops"],
    "close_ignored": ["test_close_unblocks_watch"],
}

# --------------------------------------------------------------------------------------------
# Running them all in one separate pytest process


def _fake_plugin_module() -> tuple[str, str]:
    """The test module of the fake plugins, and the -k expression selecting what runs."""
    lines = [
        "from tests.conformance.test_kit import MemoryProxyRun, MemoryRegistryRun",
        "from tests.conformance.test_kit import MemorySourceRun",
        "",
        "class TestSourceCorrect(MemorySourceRun):",
        "    pass",
        "",
        "class TestRegistryCorrect(MemoryRegistryRun):",
        "    pass",
        "",
        "class TestProxyCorrect(MemoryProxyRun):",
        "    pass",
        "",
        "class TestProxyNoTraffic(MemoryProxyRun):",
        "    serves_traffic = False",
    ]
    select = ["TestSourceCorrect", "TestRegistryCorrect", "TestProxyCorrect", "TestProxyNoTraffic"]
    families = (("Source", SOURCE_FLAWS), ("Registry", REGISTRY_FLAWS), ("Proxy", PROXY_FLAWS))
    for family, flaws in families:
        for flaw, checks in flaws.items():
            name = f"Test{family}_{flaw}"
            lines += ["", f"class {name}(Memory{family}Run):", f"    flaws = ({flaw!r},)"]
            select.append(f"({name} and ({' or '.join(checks)}))")
    return "\n".join(lines) + "\n", " or ".join(select)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], str]:
    """``{(class, check): passed|failed|error|skipped}`` of one run over every fake."""
    root = tmp_path_factory.mktemp("kit")
    source, select = _fake_plugin_module()
    module = root / "test_fake_plugins.py"
    module.write_text(source)
    (root / "pytest.ini").write_text("[pytest]\n")
    report = root / "report.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "src")]))
    command = [sys.executable, "-m", "pytest", str(module), "-q", "-p", "no:cacheprovider"]
    # The kit's plugin deselects the traffic checks of TestProxyNoTraffic: opt in, as users do.
    command += ["-p", "discoverd.testing"]
    command += ["-c", str(root / "pytest.ini"), "--rootdir", str(root)]
    command += [f"--junitxml={report}", "-k", select]
    done = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    if not report.exists():
        pytest.fail(f"the contract run produced no report:\n{done.stdout}\n{done.stderr}")
    found: dict[tuple[str, str], str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        cls = case.attrib["classname"].rpartition(".")[2]
        found[(cls, case.attrib["name"])] = {"failure": "failed"}.get(outcome, outcome)
    assert found, f"no contract check ran:\n{done.stdout}\n{done.stderr}"
    return found


def _of(outcomes: dict[tuple[str, str], str], cls: str) -> dict[str, str]:
    return {name: outcome for (each, name), outcome in outcomes.items() if each == cls}


# --------------------------------------------------------------------------------------------
# The tests


def test_correct_source_passes_every_check(outcomes: dict[tuple[str, str], str]) -> None:
    ran = _of(outcomes, "TestSourceCorrect")
    checks = {name for name in dir(SourceContract) if name.startswith("test_")}
    assert ran == dict.fromkeys(checks, "passed")


@pytest.mark.parametrize("flaw", sorted(SOURCE_FLAWS))
def test_broken_source_fails_its_check(outcomes: dict[tuple[str, str], str], flaw: str) -> None:
    ran = _of(outcomes, f"TestSource_{flaw}")
    assert ran == dict.fromkeys(SOURCE_FLAWS[flaw], "failed")


def test_correct_registry_passes_every_check(outcomes: dict[tuple[str, str], str]) -> None:
    ran = _of(outcomes, "TestRegistryCorrect")
    checks = {name for name in dir(RegistryContract) if name.startswith("test_")}
    assert set(ran) == checks
    assert {name: o for name, o in ran.items() if o != "passed"} == {}


@pytest.mark.parametrize("cls", ["TestProxyCorrect", "TestProxyNoTraffic"])
def test_correct_proxy_passes_every_check(outcomes: dict[tuple[str, str], str], cls: str) -> None:
    ran = _of(outcomes, cls)
    checks = {name for name in dir(ProxyContract) if name.startswith("test_")}
    if cls == "TestProxyNoTraffic":  # the checks that need traffic are deselected, not skipped
        checks -= ProxyContract.traffic_only_checks
    assert set(ran) == checks
    assert {name: o for name, o in ran.items() if o != "passed"} == {}


@pytest.mark.parametrize("flaw", sorted(REGISTRY_FLAWS))
def test_broken_registry_fails_its_check(outcomes: dict[tuple[str, str], str], flaw: str) -> None:
    ran = _of(outcomes, f"TestRegistry_{flaw}")
    assert ran == dict.fromkeys(REGISTRY_FLAWS[flaw], "failed")


@pytest.mark.parametrize("flaw", sorted(PROXY_FLAWS))
def test_broken_proxy_fails_its_check(outcomes: dict[tuple[str, str], str], flaw: str) -> None:
    ran = _of(outcomes, f"TestProxy_{flaw}")
    assert ran == dict.fromkeys(PROXY_FLAWS[flaw], "failed")


def test_missing_fixture_fails_with_its_name(tmp_path: Path) -> None:
    module = tmp_path / "test_incomplete.py"
    module.write_text(
        "from discoverd.testing.conformance import ProxyContract\n\n\n"
        "class TestIncomplete(ProxyContract):\n    pass\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "src")]))
    command = [sys.executable, "-m", "pytest", str(module), "-q", "-p", "no:cacheprovider"]
    command += ["-c", str(tmp_path / "pytest.ini"), "-k", "test_render_is_deterministic"]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode != 0
    assert "ProxyContract needs a `make_proxy` fixture" in done.stdout
