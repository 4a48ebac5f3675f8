"""The register role: keep exactly this host's eligible instances in the registry."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Collection, Mapping
from pathlib import Path

from discoverd.core.checks import CheckSpec, Detected
from discoverd.core.errors import PluginError
from discoverd.core.interfaces import Registry, Source
from discoverd.core.logs import fields
from discoverd.core.model import DETECTED_MODE_KEY, Problem, ServiceInstance, SourceSnapshot
from discoverd.core.readiness import FIRST_PASS_MAX, Readiness
from discoverd.core.role import RESYNC, Role
from discoverd.core.scheduling import Backoff
from discoverd.core.telemetry import Contact, Stages, now_ms

log = logging.getLogger("discoverd")


def _with_mode(instance: ServiceInstance, mode: str | None) -> ServiceInstance:
    """``instance`` with metadata ``detected_mode`` = ``mode`` (unchanged without one)."""
    if mode is None:
        return instance
    meta = tuple(kv for kv in instance.meta if kv[0] != DETECTED_MODE_KEY)
    return dataclasses.replace(instance, meta=(*meta, (DETECTED_MODE_KEY, mode)))


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
        detect_modes: bool = False,
        modes_file: Path | None = None,
    ) -> None:
        super().__init__(min_wait, max_wait, retry_max)
        self.resync_interval = resync_interval
        self.source = source
        self.registry = registry
        #: The default readiness check; ``None`` registers every instance without checking.
        self.checks = checks
        self.first_check_wait = first_check_wait
        #: Detect the proxy mode of instances without a ``mode`` label (core option
        #: ``default_mode = "auto"``) and publish it as metadata ``detected_mode``; the modes
        #: found are kept in ``modes_file`` across restarts (not detected again, and never
        #: registered without their mode by a restarted agent).
        self.detect_modes = detect_modes
        self.modes_file = modes_file
        self._modes_saved: dict[str, str] | None = None
        self.readiness: Readiness | None = None
        self.waiting: set[str] = set()  # wanted, but not answering (yet)
        self.registered: dict[str, ServiceInstance] = {}
        self.lock = threading.Lock()
        self.synced = threading.Event()
        #: When the source was last read (and the error since, if any).
        self.source_contact = Contact()
        self._source_problems: tuple[Problem, ...] = ()
        self._stages = Stages()

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
        if log.isEnabledFor(logging.DEBUG):
            log.debug("register: watch: %s (t=%s)", reason, now_ms())
        self.waker.notify(reason)

    def _reconcile_loop(self) -> None:
        backoff = Backoff(self.retry_max)
        while (reasons := self.waker.wait(self.stop_event)) is not None:
            self._log_wake(reasons)
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
        self._stages = Stages()  # where the pass's time goes, for a debug line
        try:
            snapshot = self.source.snapshot()
        except PluginError as exc:
            self.source_contact.failed(str(exc))
            raise
        self.source_contact.ok()
        self._stages.mark("snapshot")
        try:
            self._apply(snapshot)
        except PluginError as exc:
            self.registry_contact.failed(str(exc))
            raise
        if log.isEnabledFor(logging.DEBUG):
            log.debug("register: pass: %s", self._stages.line())

    def _apply(self, snapshot: SourceSnapshot) -> None:
        stopping = self.source.stopping()
        desired = {i.id: i for i in snapshot.instances if i.id not in stopping}
        # What left the source goes first: a stopping container must not wait for the checks.
        self._remove(set(self.registered) - set(desired))
        if self.checks is not None:
            if self.readiness is None:
                self.readiness = Readiness(
                    self.checks,
                    self.source.check_target,
                    self.waker.notify,
                    detect=self.detect_modes,
                    remembered=self._load_modes() if self.detect_modes else None,
                )
            # Only the first pass waits for every first check (an agent starting on a busy
            # host); later passes must not hold a stopping container's removal for long.
            settle = FIRST_PASS_MAX if not self.synced.is_set() else 0.0
            ready = self.readiness.update(desired, self.first_check_wait, settle)
            self._stages.mark("checks")
            waiting = set(desired) - ready
            for iid in sorted(waiting - self.waiting):
                log.info(
                    "register: %s %s not answering yet; registered once it does",
                    desired[iid].service,
                    iid,
                    extra=fields(desired[iid]),
                )
            self.waiting = waiting
            if self.detect_modes:
                desired = self._with_modes(desired)
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
                self._stages.mark("registry")
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

    def _with_modes(self, desired: Mapping[str, ServiceInstance]) -> dict[str, ServiceInstance]:
        """``desired`` with the mode detected for each instance (metadata ``detected_mode``),
        and the modes saved when they changed."""
        assert self.readiness is not None
        modes = {iid: mode for iid, mode in self.readiness.modes().items() if iid in desired}
        if modes != self._modes_saved:
            self._save_modes(modes)
        return {iid: _with_mode(i, modes.get(iid)) for iid, i in desired.items()}

    def _load_modes(self) -> dict[str, Detected]:
        if self.modes_file is None:
            return {}
        try:
            document = json.loads(self.modes_file.read_text())
        except (OSError, ValueError):
            return {}
        found = document.get("modes") if isinstance(document, dict) else None
        if not isinstance(found, dict):
            return {}
        modes: dict[str, Detected] = {}
        for iid, mode in found.items():
            if isinstance(iid, str) and mode in ("http", "tcp"):
                modes[iid] = "http" if mode == "http" else "tcp"
        return modes

    def _save_modes(self, modes: dict[str, Detected]) -> None:
        self._modes_saved = dict(modes)
        if self.modes_file is None:
            return
        path = self.modes_file
        temporary = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary.write_text(json.dumps({"modes": dict(sorted(modes.items()))}) + "\n")
            os.replace(temporary, path)
        except OSError as exc:
            log.debug("register: cannot keep the detected modes in %s: %s", path, exc)
            with contextlib.suppress(OSError):
                temporary.unlink()

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
