"""The etcd v3 registry: one lease per agent, the seed's key layout, owned watch streams."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from etcd3gw.lease import Lease

from discoverd import (
    Catalog,
    Notify,
    PluginError,
    Problem,
    Registry,
    ServiceInstance,
    Unavailable,
)
from discoverd.plugins.etcd.gateway import (
    GRPC_NOT_FOUND,
    GRPC_UNAUTHENTICATED,
    ClientSettings,
    EtcdError,
    Gateway,
    StreamBroken,
    StreamIdle,
    WatchStream,
    b64,
    needs_auth,
    parse_endpoints,
    unb64,
)
from discoverd.plugins.etcd.layout import (
    Layout,
    encode_metadata,
    group_entries,
    range_of,
    read_service,
    service_of,
)

log = logging.getLogger("discoverd.etcd")

#: Seconds without any byte on a watch stream before it is re-established (from the last
#: revision seen, so nothing is lost): a silently dead (half-open) connection cannot block.
WATCH_IDLE_TIMEOUT = 30.0
#: Above this many changed services, a snapshot reads everything again instead of each one.
PARTIAL_MAX = 64
#: Even while the watch is live, a snapshot reads everything at least this often (seconds).
FULL_READ_EVERY = 300.0


@dataclass
class _Mirror:
    """What the last snapshots read, parsed, per service; kept current by the watch.

    While this registry's own watch runs (``live``), it marks the services its events touch
    as ``dirty`` (service -> revision of the latest event), and a snapshot re-reads only those
    services (one consistent read per batch) instead of every key: with 10,000 instances a
    change costs a few keys, not a full read and parse.
    """

    services: dict[str, tuple[tuple[ServiceInstance, ...], tuple[Problem, ...]]]
    stray: tuple[Problem, ...]  # keys that belong to no service directory
    revision: int
    dirty: dict[str, int]
    everything: bool = False  # an event that no service owns: read everything again
    live: bool = False
    read_at: float = field(default_factory=time.monotonic)  # when the last full read was

    def catalog(self) -> Catalog:
        instances: list[ServiceInstance] = []
        problems = list(self.stray)
        for service in sorted(self.services):
            found, trouble = self.services[service]
            instances.extend(found)
            problems.extend(trouble)
        return Catalog(tuple(instances), tuple(problems), self.revision)


@dataclass
class _Target:
    """One watched key range and the first revision not yet seen on it (0: from now)."""

    watch_id: int
    start: bytes
    end: bytes
    next_revision: int
    created: bool = False

    def create_request(self) -> dict[str, Any]:
        request: dict[str, Any] = {
            "key": b64(self.start),
            "range_end": b64(self.end),
            "watch_id": self.watch_id,
            "progress_notify": True,
        }
        if self.next_revision > 0:
            request["start_revision"] = self.next_revision
        return {"create_request": request}


class EtcdRegistry(Registry):
    """Registry on etcd v3 (through its JSON gateway).

    Register side: one lease per agent (``ttl`` seconds), granted on first use; every key this
    agent writes is attached to it, so a dead host's entries vanish together. Discover side: one
    consistent read of both prefixes, and a watch on both from the snapshot's revision.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] = ("127.0.0.1:2379",),
        *,
        prefix: str = "/backends",
        meta_prefix: str = "/discoverd/instances",
        ttl: int = 15,
        timeout: float = 5.0,
        ca_cert: str = "",
        cert: str = "",
        key: str = "",
        user: str = "",
        password: str = "",
        host_id: str = "",
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise PluginError(f"etcd option ttl={ttl!r}: must be a whole number of seconds >= 1")
        if not timeout > 0:
            raise PluginError(f"etcd option timeout={timeout!r}: must be a positive number")
        if key and not cert:
            raise PluginError("etcd option key is set but cert is not: give both (client TLS)")
        if password and not user:
            raise PluginError("etcd option password is set but user is not")
        self.layout = Layout(prefix, meta_prefix)
        settings = ClientSettings(
            timeout=float(timeout),
            ca_cert=ca_cert,
            cert=cert,
            key=key,
            user=user,
            password=password,
        )
        self.gateway = Gateway(parse_endpoints(endpoints, settings.tls), settings)
        self.ttl = ttl
        self.host_id = host_id
        self.watch_idle_timeout = WATCH_IDLE_TIMEOUT
        self._lock = threading.RLock()
        self._lease: int | None = None
        self._lost = False  # entries were lost since the last keepalive: report it once
        self._owned: dict[str, ServiceInstance] = {}
        self._streams: set[WatchStream] = set()
        self._closed = False
        self._mirror: _Mirror | None = None
        self._mirror_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EtcdRegistry({', '.join(self.gateway.urls)}, prefix={self.layout.prefix!r})"

    @property
    def lease_id(self) -> int | None:
        """The lease this agent's keys are attached to (``None`` until the first register)."""
        return self._lease

    # ------------------------------------------------------------------------------------
    # Register side

    def register(self, instance: ServiceInstance) -> None:
        with self._lock:
            previous = self._owned.get(instance.id)
            if previous is not None and previous.service != instance.service:
                self.deregister(previous)
            self._write(instance.service, instance.frontend_port, [instance])

    def register_many(self, instances: Sequence[ServiceInstance]) -> None:
        """One transaction per service (and per 40 instances), instead of one per instance."""
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
                for first in range(0, len(members), 40):
                    self._write(service, frontend_port, members[first : first + 40])

    def _write(
        self, service: str, frontend_port: int | None, instances: Sequence[ServiceInstance]
    ) -> None:
        """Put the keys of ``instances`` (all of ``service``) on this agent's lease."""
        layout = self.layout
        puts: list[tuple[str, str]] = []
        for instance in instances:
            puts.append((layout.backend_key(service, instance.id), instance.endpoint))
            puts.append(
                (layout.meta_key(service, instance.id), encode_metadata(instance, self.host_id))
            )
        # The port key is shared by every host of the service. When it already holds our
        # value it is left alone, so it stays with its writer (possibly a lease-less key of
        # the original docker-register) instead of moving onto our lease.
        compare: list[dict[str, str]] = []
        with_port = puts
        if frontend_port is not None:
            port_key = layout.port_key(service)
            value = str(frontend_port)
            compare = [{"key": b64(port_key), "target": "VALUE", "result": "EQUAL",
                        "value": b64(value)}]  # fmt: skip
            with_port = [*puts, (port_key, value)]
        lease = self._ensure_lease()
        try:
            self._txn("register", compare, _puts(puts, lease), _puts(with_port, lease))
        except EtcdError as exc:
            if exc.code != GRPC_NOT_FOUND:
                raise
            # The lease is gone (etcd was down longer than the TTL, or wiped): every key of
            # this agent went with it. Start a new lease and report the loss at keepalive.
            log.warning("etcd: lease %x no longer exists; granting a new one", lease)
            self._drop_lease()
            lease = self._ensure_lease()
            self._txn("register", compare, _puts(puts, lease), _puts(with_port, lease))
        for instance in instances:
            self._owned[instance.id] = instance

    def deregister(self, instance: ServiceInstance) -> None:
        with self._lock:
            owned = self._owned.get(instance.id)
            if owned is not None and owned.service == instance.service:
                del self._owned[instance.id]
            layout = self.layout
            deletes = [
                _delete(layout.backend_key(instance.service, instance.id)),
                _delete(layout.meta_key(instance.service, instance.id)),
            ]
            still_serving = any(i.service == instance.service for i in self._owned.values())
            if still_serving or self._lease is None:
                self._txn("deregister", [], deletes, [])
                return
            # The port key is shared by every host serving the service (last writer wins):
            # delete it only while it is attached to our own lease.
            port_key = layout.port_key(instance.service)
            compare = [
                {
                    "key": b64(port_key),
                    "target": "LEASE",
                    "result": "EQUAL",
                    "lease": str(self._lease),
                }
            ]
            self._txn("deregister", compare, [*deletes, _delete(port_key)], deletes)

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

    def keepalive_interval(self) -> float:
        return self.ttl / 3

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

    def _txn(
        self,
        what: str,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]],
    ) -> Mapping[str, Any]:
        request = {"compare": compare, "success": success, "failure": failure}
        result = self.gateway.call(what, lambda c: c.client.transaction(request))
        return result if isinstance(result, Mapping) else {}

    # ------------------------------------------------------------------------------------
    # Discover side

    def snapshot(self) -> Catalog:
        with self._mirror_lock:
            mirror = self._mirror
            partial = (
                mirror is not None
                and mirror.live
                and not mirror.everything
                and len(mirror.dirty) <= PARTIAL_MAX
            )
            dirty = dict(mirror.dirty) if mirror is not None else {}
        if partial and mirror is not None and time.monotonic() - mirror.read_at > FULL_READ_EVERY:
            partial = False  # defence in depth: a full read now and then, even when live
        if partial and not dirty:
            assert mirror is not None
            with self._mirror_lock:
                return mirror.catalog()
        if partial:
            return self._partial_snapshot(sorted(dirty))
        return self._full_snapshot()

    def _full_snapshot(self) -> Catalog:
        # One read-only transaction with a range per prefix: both are read at one revision,
        # in one round trip (a linearizable read; no raft proposal for read-only txns).
        ranges = [range_of(self.layout.prefix), range_of(self.layout.meta_prefix)]
        reply = self._read("snapshot", ranges)
        try:
            revision = int(reply["header"]["revision"])
            backend, meta = (_kvs(r["response_range"]) for r in reply.get("responses", []))
        except (KeyError, TypeError, ValueError) as exc:
            raise PluginError(f"etcd: unexpected answer to the snapshot read ({exc!r})") from None
        grouped = group_entries(self.layout, backend, meta)
        services: dict[str, tuple[tuple[ServiceInstance, ...], tuple[Problem, ...]]] = {}
        for service, entries in grouped.services.items():
            found, trouble = read_service(self.layout, service, entries, grouped.metadata)
            services[service] = (tuple(found), tuple(trouble))
        with self._mirror_lock:
            previous = self._mirror
            mirror = _Mirror(services, tuple(grouped.problems), revision, {})
            if previous is not None:
                # Changes the watch saw after this read are still to be read.
                mirror.dirty = {s: r for s, r in previous.dirty.items() if r > revision}
                mirror.live = previous.live
            self._mirror = mirror
            return mirror.catalog()

    def _partial_snapshot(self, services: list[str]) -> Catalog:
        """Re-read only ``services`` (changed since the last snapshot, says the watch).

        The catalog keeps the revision of the last full read: a partial read is current for
        the services it read only, and the core resumes a lost watch from the catalog's
        revision, so events of other services still in flight are delivered again."""
        fresh: dict[str, tuple[tuple[ServiceInstance, ...], tuple[Problem, ...]]] = {}
        read_at: dict[str, int] = {}  # the revision each service was read at
        per_read = 60  # two ranges per service; etcd allows 128 operations per transaction
        for first in range(0, len(services), per_read):
            chunk = services[first : first + per_read]
            ranges: list[tuple[bytes, bytes]] = []
            for service in chunk:
                ranges.append(range_of(f"{self.layout.prefix}/{service}"))
                ranges.append(range_of(f"{self.layout.meta_prefix}/{service}"))
            reply = self._read("snapshot", ranges)
            try:
                revision = int(reply["header"]["revision"])
                responses = [_kvs(r["response_range"]) for r in reply.get("responses", [])]
            except (KeyError, TypeError, ValueError) as exc:
                raise PluginError(f"etcd: unexpected answer to a snapshot read ({exc!r})") from None
            for index, service in enumerate(chunk):
                backend, meta = responses[2 * index], responses[2 * index + 1]
                grouped = group_entries(self.layout, backend, meta)
                entries = grouped.services.get(service)
                if entries is not None:
                    found, trouble = read_service(self.layout, service, entries, grouped.metadata)
                    fresh[service] = (tuple(found), tuple(trouble))
                else:
                    fresh[service] = ((), ())
                read_at[service] = revision
        with self._mirror_lock:
            mirror = self._mirror
            if mirror is not None:
                for service, result in fresh.items():
                    if result == ((), ()):
                        mirror.services.pop(service, None)
                    else:
                        mirror.services[service] = result
                    if mirror.dirty.get(service, 0) <= read_at[service]:
                        mirror.dirty.pop(service, None)
                return mirror.catalog()
        return self._full_snapshot()  # dropped meanwhile

    def _read(self, what: str, ranges: list[tuple[bytes, bytes]]) -> Mapping[str, Any]:
        success = [
            {"request_range": {"key": b64(start), "range_end": b64(end)}} for start, end in ranges
        ]
        return self._txn(what, [], success, [])

    def _mirror_live(self, live: bool) -> None:
        """The watch is (or is no longer) delivering every change after the mirror's base.

        A watch that stops and starts again resumes from the revision the core passes: the
        catalog's, which is the mirror's last full read (partial reads do not move it), so no
        change is lost in between; while no watch runs, snapshots read everything."""
        with self._mirror_lock:
            if self._mirror is not None:
                self._mirror.live = live

    def _read_everything(self) -> None:
        with self._mirror_lock:
            if self._mirror is not None:
                self._mirror.everything = True

    def _mark_dirty(self, events: list[Any]) -> None:
        with self._mirror_lock:
            mirror = self._mirror
            if mirror is None:
                return
            for event in events:
                kv = event.get("kv") if isinstance(event, Mapping) else None
                if not isinstance(kv, Mapping):
                    mirror.everything = True
                    continue
                try:
                    service = service_of(self.layout, unb64(kv.get("key", "")))
                    revision = int(kv.get("mod_revision", 0) or 0)
                except (ValueError, TypeError):
                    service, revision = None, 0
                if service is None:
                    mirror.everything = True
                else:
                    mirror.dirty[service] = max(mirror.dirty.get(service, 0), revision)

    def watch(self, notify: Notify, stop: threading.Event, since: int) -> None:
        first = since + 1 if since > 0 else 0
        targets = {
            1: _Target(1, *range_of(self.layout.prefix), first),
            2: _Target(2, *range_of(self.layout.meta_prefix), first),
        }
        try:
            self._watch(notify, stop, targets, tracked=since > 0)
        finally:
            self._mirror_live(False)

    def _watch(
        self, notify: Notify, stop: threading.Event, targets: dict[int, _Target], tracked: bool
    ) -> None:
        reauthenticated = False
        while not stop.is_set() and not self._closed:
            # An idle stream re-established here resumes from each target's next revision, so
            # the mirror stays live across it (no change can fall in between).
            for target in targets.values():
                target.created = not tracked  # untracked: the mirror never goes live
            stream = self._open_watch([t.create_request() for t in targets.values()])
            with self._tracked(stream, stop):
                try:
                    again = self._consume(stream, targets, notify, stop)
                except StreamIdle:
                    log.debug("etcd: watch on %s idle; re-establishing it", stream.url)
                    continue
                except StreamBroken as exc:
                    if stream.aborted or stop.is_set():
                        return
                    self.gateway.mark_failed(stream.url)
                    raise Unavailable(f"etcd watch stream from {stream.url} lost: {exc}") from None
                except EtcdError as exc:
                    if exc.code != GRPC_UNAUTHENTICATED:
                        raise
                    if reauthenticated or not self.gateway.settings.user:
                        hint = "check the etcd options user and password"
                        raise EtcdError(f"{exc} ({hint})", exc.code) from None
                    reauthenticated = True
                    stream.connection.token = None
                    continue
            if not again:
                return

    def _open_watch(self, body: list[dict[str, Any]]) -> WatchStream:
        idle = self.watch_idle_timeout
        return self.gateway.call("watch", lambda c: c.open_watch(body, idle))

    def _consume(
        self,
        stream: WatchStream,
        targets: dict[int, _Target],
        notify: Notify,
        stop: threading.Event,
    ) -> bool:
        """Read one stream. True: re-establish it from ``targets``; False: return to the core."""
        for message in stream.messages():
            if stop.is_set():
                return False
            if "error" in message:
                raise _stream_error(stream.url, message["error"])
            result = message.get("result")
            if not isinstance(result, dict):
                continue
            header = result.get("header") or {}
            revision = int(header.get("revision", 0) or 0)
            target = targets.get(int(result.get("watch_id", 0) or 0))
            if result.get("canceled"):
                compacted = int(result.get("compact_revision", 0) or 0)
                reason = result.get("cancel_reason")
                if compacted:
                    log.info("etcd: watch start revision compacted (now %d); re-listing", compacted)
                    self._read_everything()
                    return False
                if reason:
                    code = GRPC_UNAUTHENTICATED if needs_auth(0, str(reason)) else 0
                    raise EtcdError(f"etcd at {stream.url} canceled the watch: {reason}", code)
                return False
            if result.get("created"):
                if target is None:
                    continue
                if not target.created:
                    target.created = True
                    if all(t.created for t in targets.values()):
                        self._mirror_live(True)
                if target.next_revision == 0:
                    target.next_revision = revision + 1
                elif target.next_revision > revision + 1:
                    # The store's revision went back (a new or restored cluster): what we had is
                    # meaningless here. Re-list, and watch from now.
                    log.warning("etcd: revision went back to %d; re-listing", revision)
                    self._read_everything()
                    notify("etcd revision reset")
                    for each in targets.values():
                        each.next_revision = revision + 1
                    return True
                continue
            if target is None:
                continue
            events = result.get("events") or []
            if events:
                last = max(int(e.get("kv", {}).get("mod_revision", 0) or 0) for e in events)
                target.next_revision = max(target.next_revision, last + 1)
                self._mark_dirty(events)
                notify("etcd watch")
            elif revision:  # a progress notification: everything up to it was delivered
                target.next_revision = max(target.next_revision, revision + 1)
        if not stream.aborted and not stop.is_set():
            log.debug("etcd: watch stream from %s ended", stream.url)
        return False

    @contextmanager
    def _tracked(self, stream: WatchStream, stop: threading.Event) -> Iterator[None]:
        """Keep ``stream`` abortable by ``close()`` and by ``stop``; close it afterwards."""
        finished = threading.Event()

        def guard() -> None:
            while not finished.wait(0.2):
                if stop.is_set():
                    stream.abort()
                    return

        with self._lock:
            self._streams.add(stream)
            if self._closed:
                stream.abort()
        thread = threading.Thread(target=guard, name="discoverd-etcd-watch-stop", daemon=True)
        thread.start()
        try:
            yield
        finally:
            finished.set()
            with self._lock:
                self._streams.discard(stream)
            stream.close()

    # ------------------------------------------------------------------------------------

    def close(self, deregister: bool = False) -> None:
        with self._lock:
            self._closed = True
            streams = list(self._streams)
        for stream in streams:
            stream.abort()
        try:
            with self._lock:
                lease, self._lease = self._lease, None
                self._owned.clear()
                if deregister and lease is not None:
                    self._revoke(lease)
        finally:
            self.gateway.close()

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


def _kvs(response: Mapping[str, Any]) -> list[tuple[bytes, bytes]]:
    return [(unb64(kv["key"]), unb64(kv.get("value", ""))) for kv in response.get("kvs", [])]


def _stream_error(url: str, error: Any) -> EtcdError:
    if isinstance(error, dict):
        code = error.get("grpc_code", error.get("code", 0))
        message = error.get("message") or error.get("error") or str(error)
    else:
        code, message = 0, str(error)
    code = code if isinstance(code, int) else 0
    if needs_auth(code, str(message)):
        code = GRPC_UNAUTHENTICATED
    return EtcdError(f"etcd watch on {url} failed: {message}", code)
