"""The discover side of the etcd registry: consistent reads of the catalog, and the watch.

``snapshot`` reads the prefixes (instances, metadata, claims by service) at one revision, and
``watch`` names the services its events touched so the core knows what to read again.

**The mirror.** A watch event carries the key, its value and its revision: what a read of the
changed service would fetch again. So the last snapshot becomes a mirror of the three prefixes
when a watch starts from its revision, every event the watch delivers is applied to it, and
``read_services`` answers from it without a request, as long as the mirror is known to hold
every event since (a watch running, started within what the mirror holds). It reads the
directories from etcd instead (one linearizable transaction, as before the mirror) when there
is no such watch, and when an instance key and its metadata key disagree in a service asked
for: the two are written in one transaction, but their events come in two messages (one per
watched range), and the core may ask between them. In that case the read first waits a little
(``COMPANION_WAIT``) for the other message, when one still due can explain the difference (an
entry newer than what the other range has delivered): a read of etcd costs a round trip,
3-8 ms on a quiet host and far more on a busy one, where the second message is usually there
within 1-6 ms. An entry written without metadata (the seed's writers) is read from etcd every
time, as before, after that wait the first time each such entry is seen.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from discoverd import Catalog, Notify, PluginError, Unavailable
from discoverd.plugins.etcd.gateway import (
    GRPC_OUT_OF_RANGE,
    GRPC_UNAUTHENTICATED,
    Connection,
    EndpointFailed,
    ErrorAnswer,
    EtcdError,
    Gateway,
    StreamBroken,
    StreamIdle,
    WatchStream,
    b64,
    needs_auth,
    retry_elsewhere,
    unb64,
)
from discoverd.plugins.etcd.keys import (
    PORT_KEY,
    CatalogAssembler,
    Holder,
    KeyScheme,
    read_catalog,
)

log = logging.getLogger("discoverd.etcd")

#: Seconds without any byte on a watch stream before it is re-established (from the last
#: revision seen, so nothing is lost): a silently dead (half-open) connection cannot block.
WATCH_IDLE_TIMEOUT = 30.0
#: A stream silent for one keepalive period (``ttl / 3``, at least this) has its member
#: checked by a small read on another connection: a frozen or cut-off member is left then.
MIN_PROBE_INTERVAL = 1.0
#: Seconds the member check (or the check of a lagging member's revision) may take.
READ_CHECK = 2.0
#: A stream that breaks within this many seconds of opening is a quick break; after
#: ``QUICK_BREAKS`` of them in a row the watch gives up (``Unavailable``, the core retries).
QUICK_BREAK = 1.0
QUICK_BREAKS = 6
#: Services read per transaction: three ranges each (instances, metadata, claims), within
#: etcd's 128 operations.
SERVICES_PER_READ = 42
#: Attempts of a ``read_services`` or a ``snapshot`` whose revision was compacted between two
#: of its reads.
READ_ATTEMPTS = 3
#: Keys per page of a snapshot (see ``CatalogReader.snapshot``).
SNAPSHOT_PAGE = 2500
#: Seconds a read from the mirror may wait for the second message of a transaction (see the
#: module) before reading etcd instead.
COMPANION_WAIT = 0.02


_PORT_KEY = PORT_KEY.encode()

#: A snapshot as read: its revision, the instance and metadata keys, the claims.
_Snapshot = tuple[int, list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], list[Holder]]


@dataclass(frozen=True)
class _Event:
    """One watch event with its key decoded once, for the mirror and for the notification;
    ``service`` is ``None`` for a key in no service directory (or one that cannot be read)."""

    deleted: bool
    revision: int
    created: int
    key: bytes
    value: str  # base64, decoded when the mirror applies it
    service: str | None


class _Mirror:
    """The three watched prefixes as the watch has delivered them: for each range (instances,
    metadata, claims), ``service -> key -> (value, revision)``, and the first revision not
    applied yet on that range. The revision is the one of the event that wrote the key for
    instances and metadata (0 for a key of the snapshot), the key's create revision for the
    claims (what a ``Holder`` carries). Built from a snapshot at its first use (an event or a
    read), not when the watch starts: a cold start of 10,000 instances does not pay for it."""

    def __init__(self, scheme: KeyScheme, snapshot: _Snapshot) -> None:
        self.scheme = scheme
        self._source: _Snapshot | None = snapshot
        self._kinds: tuple[dict[str, dict[bytes, tuple[bytes, int]]], ...] = ()
        self.next = [snapshot[0] + 1] * 3

    @property
    def kinds(self) -> tuple[dict[str, dict[bytes, tuple[bytes, int]]], ...]:
        if self._source is not None:
            _, backend, meta, holders = self._source
            self._source = None
            ranges = [
                ((k, v, 0) for k, v in backend),
                ((k, v, 0) for k, v in meta),
                ((h.key, h.value, h.create_revision) for h in holders),
            ]
            kinds: list[dict[str, dict[bytes, tuple[bytes, int]]]] = []
            for found in ranges:
                kind: dict[str, dict[bytes, tuple[bytes, int]]] = {}
                for key, value, created in found:
                    service = self.scheme.service_of(key)
                    if service is not None:
                        kind.setdefault(service, {})[key] = (value, created)
                kinds.append(kind)
            self._kinds = tuple(kinds)
        return self._kinds

    def apply(self, index: int, events: list[_Event]) -> None:
        """Apply the events of one watch message on range ``index`` (those the mirror already
        holds, a stream resumed from an earlier revision sends again, are skipped)."""
        kind, first = self.kinds[index], self.next[index]
        last = first - 1
        for event in events:
            if event.revision < first:
                continue
            last = max(last, event.revision)
            service, key = event.service, event.key
            if service is None:
                continue  # the watch names no service for it: the core reads everything
            if event.deleted:
                entries = kind.get(service)
                if entries is not None:
                    entries.pop(key, None)
                    if not entries:
                        del kind[service]
            else:
                written = event.revision if index < 2 else event.created
                kind.setdefault(service, {})[key] = (unb64(event.value), written)
        self.next[index] = last + 1

    def revision(self) -> int:
        return max(self.next) - 1

    def companion_due(self, plain: Mapping[bytes, int], described: Mapping[bytes, int]) -> bool:
        """Whether every difference between a service's instances (``plain``) and metadata
        (``described``), ``instance id -> revision``, can be a transaction whose other half the
        watch has not delivered yet: a key written after what the other range has delivered
        (a registration), or a key left while the other range is ahead (a removal)."""
        sides = ((plain, described, self.next[0], self.next[1]),
                 (described, plain, self.next[1], self.next[0]))  # fmt: skip
        for mine, other, own, theirs in sides:
            for name, revision in mine.items():
                if name not in other and not (0 < theirs <= revision or own < theirs):
                    return False
        return True


@dataclass
class _Target:
    """One watched key range and the first revision not yet seen on it (0: from now)."""

    watch_id: int
    start: bytes
    end: bytes
    next_revision: int

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


def _again_if_compacted(read: Callable[[], Catalog], when: str) -> Catalog:
    """``read()``, again (up to ``READ_ATTEMPTS`` in all) while etcd answers that the revision
    it reads at was compacted ``when`` (between two of its requests)."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read()
        except EtcdError as exc:
            if exc.code != GRPC_OUT_OF_RANGE or attempt == READ_ATTEMPTS:
                raise
            log.debug("etcd: revision compacted %s; reading again", when)
    raise AssertionError("unreachable")  # pragma: no cover


class CatalogReader:
    """Reads the catalog under ``scheme``'s prefixes and watches them for changes."""

    def __init__(self, gateway: Gateway, scheme: KeyScheme) -> None:
        self.gateway = gateway
        self.scheme = scheme
        #: Seconds of silence after which a watch stream is re-established.
        self.idle_timeout = WATCH_IDLE_TIMEOUT
        #: Seconds of silence after which a watch stream's member is checked.
        self.probe_interval = max(MIN_PROBE_INTERVAL, gateway.config.ttl / 3)
        self._lock = threading.Lock()
        #: Notified (under ``_lock``) whenever the mirror or the watch changes.
        self._changed = threading.Condition(self._lock)
        #: Seconds a read from the mirror may wait for a transaction's second message.
        self.companion_wait = COMPANION_WAIT
        #: The services whose difference the last wait did not resolve, with the revisions of
        #: their entries then: not waited for again until one of them changes.
        self._unresolved: dict[str, tuple[int, int]] = {}
        self._streams: set[WatchStream] = set()
        self._closed = False
        #: The mirror (see the module), the last snapshot waiting for a watch from its
        #: revision to become one, and the ranges of the running watch (under ``_lock``).
        self._mirror: _Mirror | None = None
        self._pending: _Snapshot | None = None
        self._targets: dict[int, _Target] | None = None
        #: ``read_services`` answered from the mirror, and from etcd; reads that waited for
        #: a transaction's second message, and those that waited in vain (for tests and
        #: metrics).
        self.mirror_reads = 0
        self.etcd_reads = 0
        self.companion_waits = 0
        self.companion_timeouts = 0

    # ------------------------------------------------------------------------------------
    # Reads

    def snapshot(self) -> Catalog:
        return _again_if_compacted(self._snapshot, "during the snapshot")

    def _snapshot(self) -> Catalog:
        # The claims first, in a linearizable read: its revision is the snapshot's. Then the
        # instance keys and the metadata keys at that revision, each in pages on a thread of
        # its own, while this thread parses the pages as they come (``CatalogAssembler``).
        # The whole answer and its decoded form are never held at once (105,000 keys: a peak
        # RSS of 139 MB instead of 213), and parsing overlaps etcd's encoding of the next
        # page (a snapshot of 1,000 services x 10 instances alone: median 287 ms instead of
        # 317; no gain in a whole cold start, where etcd counts the range again per page).
        plain_range, meta_range, holders_range = self.scheme.ranges()
        first = self._read("snapshot", [holders_range])
        try:
            revision = int(first["header"]["revision"])
            holders = _holders(_responses(first)[0]["response_range"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise PluginError(f"etcd: unexpected answer to the snapshot read ({exc!r})") from None
        assembler = CatalogAssembler(self.scheme, holders)
        backend: list[tuple[bytes, bytes]] = []
        meta: list[tuple[bytes, bytes]] = []
        pages: queue.SimpleQueue[tuple[int, list[tuple[bytes, bytes]], bytes | None]] = (
            queue.SimpleQueue()
        )
        failed: list[BaseException] = []
        stop = threading.Event()

        def read_pages(stream: int, key_range: tuple[bytes, bytes]) -> None:
            try:
                self._read_pages(
                    key_range, revision, stop, lambda kvs, last: pages.put((stream, kvs, last))
                )
            except BaseException as exc:  # raised below, in the caller's thread
                failed.append(exc)
                pages.put((stream, [], None))

        threads = [
            threading.Thread(
                target=read_pages, args=(n, r), name="discoverd-etcd-read", daemon=True
            )
            for n, r in enumerate((plain_range, meta_range))
        ]
        try:
            for thread in threads:
                thread.start()
            open_streams = len(threads)
            while open_streams:
                stream, kvs, last = pages.get()
                if failed:
                    raise failed[0]
                if last is None:
                    open_streams -= 1
                if stream == 0:
                    backend.extend(kvs)
                    assembler.add_backend(kvs, last)
                else:
                    meta.extend(kvs)
                    assembler.add_meta(kvs, last)
        finally:
            stop.set()  # a thread still reading stops after its page
        self._keep(revision, backend, meta, holders)
        return assembler.catalog(revision)

    def _read_pages(
        self,
        key_range: tuple[bytes, bytes],
        revision: int,
        stop: threading.Event,
        deliver: Callable[[list[tuple[bytes, bytes]], bytes | None], None],
    ) -> None:
        """Read ``key_range`` at ``revision``, ``SNAPSHOT_PAGE`` keys at a time; ``deliver``
        each page with its last key (``None`` with the last page)."""
        start, end = key_range
        while not stop.is_set():
            request = {
                "key": b64(start),
                "range_end": b64(end),
                "revision": str(revision),
                "limit": str(SNAPSHOT_PAGE),
            }
            reply = self.gateway.txn("snapshot page", [], [{"request_range": request}], [])
            try:
                response = _responses(reply)[0]["response_range"]
                kvs = _kvs(response)
                more = bool(response.get("more", False)) and bool(kvs)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise PluginError(
                    f"etcd: unexpected answer to the snapshot read ({exc!r})"
                ) from None
            if not more:
                deliver(kvs, None)
                return
            last = kvs[-1][0]
            deliver(kvs, last)
            start = last + b"\0"  # the next key after the last one

    def _keep(
        self,
        revision: int,
        backend: list[tuple[bytes, bytes]],
        meta: list[tuple[bytes, bytes]],
        holders: list[Holder],
    ) -> None:
        """Keep a snapshot for the mirror: until a watch from its revision starts, or at once
        when the running watch has no mirror and has delivered nothing after the snapshot."""
        with self._lock:
            targets = self._targets
            if targets is None:
                self._pending = (revision, backend, meta, holders)
            elif self._mirror is None and all(
                0 < t.next_revision <= revision + 1 for t in targets.values()
            ):
                self._mirror = _Mirror(self.scheme, (revision, backend, meta, holders))

    def read_services(self, names: Collection[str]) -> Catalog:
        """The directories of ``names`` under both prefixes and their claims: from the
        mirror when it can answer (see the module), else read from etcd at one revision, the
        first read's, which the following reads (``SERVICES_PER_READ`` services each) ask
        for. ``claims`` are those of ``names``."""
        # A name that is not one path segment names no service directory: nothing to read.
        services = sorted({name for name in names if name and "/" not in name})
        mirrored = self._from_mirror(services)
        if mirrored is not None:
            self.mirror_reads += 1
            return mirrored
        self.etcd_reads += 1
        return _again_if_compacted(lambda: self._read_services(services), "between two reads")

    def _from_mirror(self, services: list[str]) -> Catalog | None:
        """``services`` from the mirror, or ``None`` when it cannot answer (see the module)."""
        backend: list[tuple[bytes, bytes]] = []
        meta: list[tuple[bytes, bytes]] = []
        holders: list[Holder] = []
        deadline = 0.0
        with self._lock:
            while True:
                mirror = self._mirror
                if mirror is None or self._targets is None:
                    return None
                torn = self._torn(mirror, services)
                if torn is None:
                    break
                now = time.monotonic()
                if not deadline:
                    if not torn:
                        return None
                    self.companion_waits += 1
                    deadline = now + self.companion_wait
                elif now >= deadline or not torn:
                    self.companion_timeouts += 1
                    self._unresolved.update(torn)
                    return None
                self._changed.wait(deadline - now)
            plain_kind, meta_kind, holder_kind = mirror.kinds
            for service in services:
                self._unresolved.pop(service, None)
                backend.extend((k, v) for k, (v, _) in plain_kind.get(service, {}).items())
                meta.extend((k, v) for k, (v, _) in meta_kind.get(service, {}).items())
                holders.extend(
                    Holder(k, v, c) for k, (v, c) in holder_kind.get(service, {}).items()
                )
            revision = mirror.revision()
        holders.sort(key=lambda holder: holder.key)
        return read_catalog(self.scheme, sorted(backend), sorted(meta), revision, holders)

    def _torn(self, mirror: _Mirror, services: list[str]) -> dict[str, tuple[int, int]] | None:
        """``None`` when the instance keys and the metadata keys of ``services`` name the same
        instances in the mirror; else those whose difference a message still due can explain
        (with the newest revisions of their entries), empty when one cannot be so explained or
        was already waited for in vain in the state it is in (under ``_lock``)."""
        plain_kind, meta_kind, _ = mirror.kinds
        due: dict[str, tuple[int, int]] = {}
        for service in services:
            plain = _instances(self.scheme.prefix, service, plain_kind.get(service, {}))
            described = _instances(self.scheme.meta_prefix, service, meta_kind.get(service, {}))
            if plain.keys() == described.keys():
                continue
            state = (max(plain.values(), default=0), max(described.values(), default=0))
            if self._unresolved.get(service) == state or not mirror.companion_due(plain, described):
                return {}
            due[service] = state
        return due or None

    def _read_services(self, services: list[str]) -> Catalog:
        backend: list[tuple[bytes, bytes]] = []
        meta: list[tuple[bytes, bytes]] = []
        holders: list[Holder] = []
        revision = 0
        chunks = [
            services[first : first + SERVICES_PER_READ]
            for first in range(0, len(services), SERVICES_PER_READ)
        ]
        for chunk in chunks or [[]]:
            ranges = [r for service in chunk for r in self.scheme.service_ranges(service)]
            reply = self._read("read services", ranges, revision)
            try:
                revision = revision or int(reply["header"]["revision"])
                responses = [r["response_range"] for r in reply.get("responses", [])]
                for index in range(len(chunk)):
                    backend.extend(_kvs(responses[3 * index]))
                    meta.extend(_kvs(responses[3 * index + 1]))
                    holders.extend(_holders(responses[3 * index + 2]))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise PluginError(f"etcd: unexpected answer to a services read ({exc!r})") from None
        return read_catalog(self.scheme, backend, meta, revision, holders)

    def _read(
        self, what: str, ranges: list[tuple[bytes, bytes]], revision: int = 0
    ) -> Mapping[str, Any]:
        """One read-only transaction of ``ranges``, at ``revision`` (0: the latest)."""
        success: list[dict[str, Any]] = []
        for start, end in ranges:
            request: dict[str, Any] = {"key": b64(start), "range_end": b64(end)}
            if revision > 0:
                request["revision"] = str(revision)
            success.append({"request_range": request})
        return self.gateway.txn(what, [], success, [])

    # ------------------------------------------------------------------------------------
    # Watch

    def watch(self, notify: Notify, stop: threading.Event, since: int) -> None:
        """Watch the prefixes from ``since + 1``; notify the core of each change.

        A stream that breaks (its member died, lost its leader, stopped answering the liveness
        check) is opened again on the next member, from the first revision not yet seen on
        each range: no change is lost, and the core is not involved. ``Unavailable`` only when
        no member accepts a stream within the deadline of one call, or streams keep breaking
        as soon as they are opened.
        """
        first = since + 1 if since > 0 else 0
        targets = {
            n: _Target(n, start, end, first)
            for n, (start, end) in enumerate(self.scheme.ranges(), start=1)
        }
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None and first == pending[0] + 1:
                self._mirror = _Mirror(self.scheme, pending)
            elif self._mirror is None or not 0 < first <= min(self._mirror.next):
                self._mirror = None  # it may lack what happened before the watch's start
            self._targets = targets
        try:
            self._watch(targets, notify, stop)
        finally:
            with self._lock:
                self._targets = None
                self._changed.notify_all()

    def _watch(self, targets: dict[int, _Target], notify: Notify, stop: threading.Event) -> None:
        reauthenticated = False
        quick_breaks = 0
        while not stop.is_set() and not self._closed:
            # A stream re-established here (idle, broken, or after a new token) resumes from
            # each target's next revision: no change can fall in between.
            stream = self._open_watch([t.create_request() for t in targets.values()])
            with self._tracked(stream, stop):
                try:
                    again = self._consume(stream, targets, notify, stop)
                except StreamIdle:
                    log.debug("etcd: watch on %s idle; re-establishing it", stream.url)
                    continue
                except StreamBroken as exc:
                    if stream.aborted or stop.is_set() or self._closed:
                        return
                    self.gateway.mark_failed(stream.url)
                    if time.monotonic() - stream.opened < QUICK_BREAK:
                        quick_breaks += 1
                        if quick_breaks > QUICK_BREAKS:
                            raise Unavailable(
                                f"etcd watch streams keep breaking (last from {stream.url}: {exc})"
                            ) from None
                        stop.wait(min(1.0, 0.05 * 2**quick_breaks))
                    else:
                        quick_breaks = 0
                    log.info(
                        "etcd: watch stream from %s lost (%s); resuming on %s from revision %d",
                        stream.url,
                        exc,
                        self.gateway.current,
                        min(t.next_revision for t in targets.values()),
                    )
                    continue
                except EtcdError as exc:
                    if exc.code != GRPC_UNAUTHENTICATED:
                        raise
                    if reauthenticated or not self.gateway.config.user:
                        hint = "check the etcd options user and password"
                        raise EtcdError(f"{exc} ({hint})", exc.code) from None
                    reauthenticated = True
                    stream.connection.token = None
                    continue
            if not again:
                return

    def _open_watch(self, body: list[dict[str, Any]]) -> WatchStream:
        idle = self.idle_timeout
        return self.gateway.call("watch", lambda c, timeout: c.open_watch(body, timeout, idle))

    def _consume(
        self,
        stream: WatchStream,
        targets: dict[int, _Target],
        notify: Notify,
        stop: threading.Event,
    ) -> bool:
        """Read one stream. True: re-establish it from ``targets``; False: return to the core.
        ``StreamBroken`` when the stream ended or its member cannot serve it."""
        for message in stream.messages():
            if stop.is_set():
                return False
            if "error" in message:
                code, text = _error_parts(message["error"])
                if retry_elsewhere(code, text):
                    raise StreamBroken(text)
                if needs_auth(code, text):
                    code = GRPC_UNAUTHENTICATED
                raise EtcdError(f"etcd watch on {stream.url} failed: {text}", code)
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
                    # Changes between the start revision and the compaction are lost: the
                    # core must read everything again.
                    log.info("etcd: watch start revision compacted (now %d); re-listing", compacted)
                    self._drop_mirror()
                    notify("etcd watch compacted")
                    return False
                if reason:
                    code = GRPC_UNAUTHENTICATED if needs_auth(0, str(reason)) else 0
                    if retry_elsewhere(0, str(reason)) or "no leader" in str(reason):
                        raise StreamBroken(str(reason))
                    raise EtcdError(f"etcd at {stream.url} canceled the watch: {reason}", code)
                return False
            if target is None:
                continue
            if result.get("created"):
                if target.next_revision == 0:
                    target.next_revision = revision + 1
                elif target.next_revision > revision + 1 and not self._lagging(
                    stream, target.next_revision - 1
                ):
                    # The store's revision went back (a new or restored cluster): what we had is
                    # meaningless here. Re-list, and watch from now.
                    log.warning("etcd: revision went back to %d; re-listing", revision)
                    self._drop_mirror()
                    notify("etcd revision reset")
                    for each in targets.values():
                        each.next_revision = revision + 1
                    return True
                continue
            events = self._decode(result.get("events") or [])
            if events:
                last = max(event.revision for event in events)
                with self._lock:
                    target.next_revision = max(target.next_revision, last + 1)
                    if self._mirror is not None:
                        self._mirror.apply(target.watch_id - 1, events)
                        self._changed.notify_all()
                services = _services_of(events)
                if services is None:
                    notify("etcd watch")
                else:
                    notify("etcd watch", services=services)
            elif revision:  # a progress notification: everything up to it was delivered
                with self._lock:
                    target.next_revision = max(target.next_revision, revision + 1)
                    if self._mirror is not None:
                        index = target.watch_id - 1
                        self._mirror.next[index] = max(self._mirror.next[index], revision + 1)
                        self._changed.notify_all()
        if stream.aborted or stop.is_set():
            return False
        raise StreamBroken("the stream ended")

    def _drop_mirror(self) -> None:
        with self._lock:
            self._mirror = None
            self._changed.notify_all()

    def _lagging(self, stream: WatchStream, seen: int) -> bool:
        """Whether the member of ``stream``, whose store is behind revision ``seen`` that we
        saw, is only behind (a follower that has not applied the last entries yet) and not a
        store that went back: a linearizable read there waits until it caught up with the
        leader. ``StreamBroken`` when the member does not answer it."""
        try:
            answer = stream.connection.post("/kv/range", self._probe_request(False), READ_CHECK)
        except EndpointFailed as exc:
            raise StreamBroken(f"revision check failed: {exc}") from None
        except ErrorAnswer:
            return False
        try:
            current = int(answer["header"]["revision"])
        except (KeyError, TypeError, ValueError):
            return False
        if current >= seen:
            log.debug("etcd: %s was behind revision %d; it caught up", stream.url, seen)
            return True
        return False

    def _probe_request(self, serializable: bool) -> dict[str, Any]:
        """A read of one key that does not exist: what the member serves without work."""
        return {"key": b64(self.scheme.prefix), "keys_only": True, "serializable": serializable}

    def _alive(self, connection: Connection) -> str:
        """Check that the member behind a silent stream still serves (a small local read with
        the require-leader header): ``""`` when it does, else why not."""
        try:
            connection.post("/kv/range", self._probe_request(True), READ_CHECK)
        except EndpointFailed as exc:
            return str(exc)
        except ErrorAnswer:
            return ""  # it answered (an auth error is the next stream's business)
        return ""

    @contextmanager
    def _tracked(self, stream: WatchStream, stop: threading.Event) -> Iterator[None]:
        """Keep ``stream`` abortable by ``close()`` and by ``stop``, and its member checked
        after each ``probe_interval`` of silence; close it afterwards."""
        finished = threading.Event()

        def guard() -> None:
            checked = time.monotonic()
            while not finished.wait(0.2):
                if stop.is_set():
                    stream.abort()
                    return
                now = time.monotonic()
                if now - max(checked, stream.last_activity) < self.probe_interval:
                    continue
                checked = now
                problem = self._alive(stream.connection)
                if problem and not finished.is_set():
                    stream.fail(f"the member does not answer ({problem})")
                    return

        with self._lock:
            self._streams.add(stream)
            if self._closed:
                stream.abort()
        thread = threading.Thread(target=guard, name="discoverd-etcd-watch-guard", daemon=True)
        thread.start()
        try:
            yield
        finally:
            finished.set()
            with self._lock:
                self._streams.discard(stream)
            stream.close()

    def close(self) -> None:
        """Abort every watch stream; a running ``watch`` returns, later ones return at once."""
        with self._lock:
            self._closed = True
            streams = list(self._streams)
        for stream in streams:
            stream.abort()

    def _decode(self, events: list[Any]) -> list[_Event]:
        """The events of one watch message, each key decoded and its service found once."""
        decoded: list[_Event] = []
        for event in events:
            kv = event.get("kv") if isinstance(event, Mapping) else None
            if not isinstance(kv, Mapping):
                decoded.append(_Event(False, 0, 0, b"", "", None))
                continue
            try:
                key = unb64(kv.get("key", ""))
                service = self.scheme.service_of(key)
            except (ValueError, TypeError):
                key, service = b"", None
            decoded.append(
                _Event(
                    deleted=event.get("type") == "DELETE",
                    revision=int(kv.get("mod_revision", 0) or 0),
                    created=int(kv.get("create_revision", 0) or 0),
                    key=key,
                    value=kv.get("value", ""),
                    service=service,
                )
            )
        return decoded


def _services_of(events: list[_Event]) -> frozenset[str] | None:
    """The services ``events`` touched; ``None`` when one of them belongs to no service
    directory (the core then reads everything)."""
    services: set[str] = set()
    for event in events:
        if event.service is None:
            return None
        services.add(event.service)
    return frozenset(services)


def _instances(
    prefix: str, service: str, entries: Mapping[bytes, tuple[bytes, int]]
) -> dict[bytes, int]:
    """``instance id -> revision`` of the keys ``<prefix>/<service>/<id>`` of ``entries`` (the
    service-level ``port`` key of the seed's layout is not an instance)."""
    head = f"{prefix}/{service}/".encode()
    return {
        key[len(head) :]: revision
        for key, (_, revision) in entries.items()
        if key.startswith(head) and key[len(head) :] != _PORT_KEY
    }


def _responses(reply: Mapping[str, Any]) -> list[Any]:
    responses = reply.get("responses", [])
    if not isinstance(responses, list):
        raise TypeError("responses is not a list")
    return responses


def _kvs(response: Mapping[str, Any]) -> list[tuple[bytes, bytes]]:
    return [(unb64(kv["key"]), unb64(kv.get("value", ""))) for kv in response.get("kvs", [])]


def _holders(response: Mapping[str, Any]) -> list[Holder]:
    return [
        Holder(unb64(kv["key"]), unb64(kv.get("value", "")), int(kv.get("create_revision", 0)))
        for kv in response.get("kvs", [])
    ]


def _error_parts(error: Any) -> tuple[int, str]:
    """The gRPC code and message of an error message on a watch stream."""
    if isinstance(error, dict):
        code = error.get("grpc_code", error.get("code", 0))
        message = error.get("message") or error.get("error") or str(error)
    else:
        code, message = 0, str(error)
    return (code if isinstance(code, int) else 0), str(message)
