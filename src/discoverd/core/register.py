"""The register role: keep exactly this host's eligible instances in the registry."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection

from discoverd.core.checks import CheckSpec
from discoverd.core.errors import PluginError
from discoverd.core.interfaces import Registry, Source
from discoverd.core.logs import fields
from discoverd.core.model import Problem, ServiceInstance, SourceSnapshot
from discoverd.core.readiness import FIRST_PASS_MAX, Readiness
from discoverd.core.role import RESYNC, Role
from discoverd.core.scheduling import Backoff
from discoverd.core.telemetry import Contact

log = logging.getLogger("discoverd")


class RegisterRole(Role):
    """Source -> registry: keep exactly this host's eligible instances registered."""

    name = "register"

    def __init__(
        self,
        source: Source,
        registry: Registry,
        *,
        min_wait: float = 0.02,
        max_wait: float = 0.5,
        retry_max: float = 10.0,
        resync_interval: float = 30.0,
        checks: CheckSpec | None = None,
        first_check_wait: float = 0.1,
    ) -> None:
        super().__init__(min_wait, max_wait, retry_max)
        self.resync_interval = resync_interval
        self.source = source
        self.registry = registry
        #: The default readiness check; ``None`` registers every instance without checking.
        self.checks = checks
        self.first_check_wait = first_check_wait
        self.readiness: Readiness | None = None
        self.waiting: set[str] = set()  # wanted, but not answering (yet)
        self.registered: dict[str, ServiceInstance] = {}
        self.lock = threading.Lock()
        self.synced = threading.Event()
        #: When the source was last read (and the error since, if any).
        self.source_contact = Contact()
        self._source_problems: tuple[Problem, ...] = ()

    def start(self) -> None:
        self.waker.notify("start")
        self._spawn("reconcile", self._guarded("reconcile", self._reconcile_loop))
        self._spawn("watch", lambda: self._watch_forever("source watch", self._watch_once))
        self._spawn("keepalive", self._guarded("keepalive", self._keepalive_loop))

    def _watch_once(self) -> None:
        self.watch_live.set()
        try:
            self.source.watch(self._changed, self.stop_event)
        finally:
            self.watch_live.clear()

    def _changed(self, reason: str, services: Collection[str] | None = None) -> None:
        """The source's ``Notify``: count it, wake the loop."""
        self.counters.inc("watch_events")
        self.waker.notify(reason)

    def _reconcile_loop(self) -> None:
        backoff = Backoff(self.retry_max)
        while (reasons := self.waker.wait(self.stop_event)) is not None:
            log.debug("register: reconcile (%s)", ", ".join(reasons))
            if RESYNC in reasons:
                self.counters.inc("resyncs")
            try:
                self.reconcile()
                backoff.reset()
                if self.resync_interval > 0:
                    self.waker.retry_in(self.resync_interval, RESYNC)
            except PluginError as exc:
                delay = backoff.next()
                log.warning("register: %s; retrying in %.1fs", exc, delay)
                self.counters.inc("register_errors")
                self.waker.retry_in(delay)

    def reconcile(self) -> None:
        """One pass: read the source, register what is new or changed and answers its
        readiness check, remove what is gone or stopped answering."""
        try:
            snapshot = self.source.snapshot()
        except PluginError as exc:
            self.source_contact.failed(str(exc))
            raise
        self.source_contact.ok()
        try:
            self._apply(snapshot)
        except PluginError as exc:
            self.registry_contact.failed(str(exc))
            raise

    def _apply(self, snapshot: SourceSnapshot) -> None:
        stopping = self.source.stopping()
        desired = {i.id: i for i in snapshot.instances if i.id not in stopping}
        # What left the source goes first: a stopping container must not wait for the checks.
        self._remove(set(self.registered) - set(desired))
        if self.checks is not None:
            if self.readiness is None:
                self.readiness = Readiness(self.checks, self.source.check_target, self.waker.notify)
            # Only the first pass waits for every first check (an agent starting on a busy
            # host); later passes must not hold a stopping container's removal for long.
            settle = FIRST_PASS_MAX if not self.synced.is_set() else 0.0
            ready = self.readiness.update(desired, self.first_check_wait, settle)
            waiting = set(desired) - ready
            for iid in sorted(waiting - self.waiting):
                log.info(
                    "register: %s %s not answering yet; registered once it does",
                    desired[iid].service,
                    iid,
                    extra=fields(desired[iid]),
                )
            self.waiting = waiting
            desired = {iid: i for iid, i in desired.items() if iid in ready}
        self._remove(set(self.registered) - set(desired))
        with self.lock:
            todo = [desired[i] for i in sorted(desired) if self.registered.get(i) != desired[i]]
            if len(todo) == 1:
                self.registry.register(todo[0])
            elif todo:
                self.registry.register_many(todo)
            if todo:
                self.registry_contact.ok()
            for instance in todo:
                self.registered[instance.id] = instance
                self.counters.inc("registered")
                log.info(
                    "register: added %s %s (%s)",
                    instance.service,
                    instance.id,
                    instance.endpoint,
                    extra=fields(instance),
                )
        # What the source refused, and what the registry says of this host's claims.
        self._source_problems = snapshot.problems
        self.problems.update([*snapshot.problems, *self.registry.conflicts()])
        self.synced.set()

    def _remove(self, ids: set[str]) -> None:
        with self.lock:
            for iid in sorted(ids):
                instance = self.registered.get(iid)
                if instance is None:
                    continue
                self.registry.deregister(instance)
                del self.registered[iid]
                self.counters.inc("deregistered")
                log.info(
                    "register: removed %s %s (%s)",
                    instance.service,
                    iid,
                    instance.endpoint,
                    extra=fields(instance),
                )

    def _keepalive_loop(self) -> None:
        failing = False
        while not self.stop_event.wait(self._interval(failing)):
            try:
                alive = self.registry.keepalive()
            except PluginError as exc:
                self.registry_contact.failed(str(exc))
                if not failing:
                    log.warning("register: keepalive failed: %s; retrying", exc)
                failing = True
                continue
            self.registry_contact.ok()
            # A claim is won or lost at a keepalive too: report it now, not at the next pass.
            self.problems.update([*self._source_problems, *self.registry.conflicts()])
            if failing:
                log.info("register: registry reachable again")
            failing = False
            if not alive:
                log.warning("register: this host's entries were lost; registering them again")
                with self.lock:
                    self.registered.clear()
                self.counters.inc("reregistrations")
                self.waker.notify("entries lost")

    def _interval(self, failing: bool) -> float:
        interval = self.registry.keepalive_interval()
        return min(1.0, interval) if failing else interval

    def shutdown(self, deregister: bool = True) -> None:
        """Stop the loops; with ``deregister``, remove this host's entries at once."""
        self.stop_event.set()
        try:
            self.source.close()  # unblocks the source watch before the threads are joined
        finally:
            self.stop()
            if self.readiness is not None:
                self.readiness.close()
            try:
                self.registry.close(deregister=deregister)
                if deregister:
                    log.info("register: this host's instances deregistered")
            except PluginError as exc:
                log.warning("register: could not deregister on exit (%s); they will expire", exc)
