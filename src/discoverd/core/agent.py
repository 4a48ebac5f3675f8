"""The two roles as level-triggered reconcile loops, and the agent that runs them.

Events only wake a loop; the loop then reads a full snapshot and applies the difference, so a
missed event, a restart or an outage heals by itself at the next wake-up. Bursts are coalesced by
a quiescence window (``min_wait`` of calm, at most ``max_wait`` after the first event).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from discoverd.core.health import FIRST_PASS_MAX, CheckSpec, Readiness
from discoverd.core.interfaces import (
    PluginError,
    Proxy,
    ProxyConfigError,
    Registry,
    Source,
)
from discoverd.core.manager import PluginManager
from discoverd.core.model import Mode, Problem, Service, ServiceInstance
from discoverd.core.services import ServiceCache, build_services

log = logging.getLogger("discoverd")

#: The reason of the periodic pass each role makes even without events.
RESYNC = "periodic resync"


class Waker:
    """Coalesces wake-ups: ``notify`` from any thread, ``wait`` in the loop that acts.

    A batch is ready after ``min_wait`` seconds without a new event, and at most ``max_wait``
    after its first event. The first event after a calm period (``calm`` seconds without events
    or passes) is acted on at once: a lone change (a container starting) is not delayed, and the
    events that follow it in a burst are batched into the next pass.
    """

    def __init__(self, min_wait: float, max_wait: float, calm: float = 0.1) -> None:
        self.min_wait = min_wait
        self.max_wait = max_wait
        self.calm = calm
        self._cond = threading.Condition()
        self._first: float | None = None
        self._last = 0.0
        self._leading = False
        self._quiet_since = -float("inf")  # the last event or pass
        self._due: float | None = None  # a retry scheduled for later
        self._due_reason = ""
        self._reasons: list[str] = []

    def notify(self, reason: str) -> None:
        with self._cond:
            now = time.monotonic()
            if self._first is None:
                self._first = now
                self._leading = self.calm > 0 and now - self._quiet_since >= self.calm
            self._last = now
            self._quiet_since = now
            if len(self._reasons) < 20:
                self._reasons.append(reason)
            self._cond.notify_all()

    def retry_in(self, delay: float, reason: str = "retry") -> None:
        with self._cond:
            due = time.monotonic() + delay
            if self._due is None or due < self._due:
                self._due = due
                self._due_reason = reason
            self._cond.notify_all()

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, stop: threading.Event) -> list[str] | None:
        """Block until a batch is ready; return its reasons, or ``None`` once ``stop`` is set."""
        with self._cond:
            while not stop.is_set():
                now = time.monotonic()
                if self._first is not None:
                    ready_at = min(self._last + self.min_wait, self._first + self.max_wait)
                    if self._leading:
                        ready_at = self._first
                    if now >= ready_at:
                        return self._take()
                    self._cond.wait(ready_at - now)
                    continue
                if self._due is not None:
                    if now >= self._due:
                        self._reasons.append(self._due_reason)
                        return self._take()
                    self._cond.wait(self._due - now)
                    continue
                self._cond.wait(1.0)
            return None

    def _take(self) -> list[str]:
        reasons, self._reasons = self._reasons, []
        self._first = None
        self._due = None
        self._leading = False
        self._quiet_since = time.monotonic()
        return reasons


class Backoff:
    """Exponential backoff: 0.1 s, 0.2 s, ... up to ``maximum``; ``reset`` after a success."""

    def __init__(self, maximum: float, initial: float = 0.1) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class ProblemLog:
    """Logs each problem once while it persists (not at every reconcile)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._seen: set[str] = set()
        self._log = logger

    def update(self, problems: Iterable[Problem]) -> None:
        current = {str(p) for p in problems}
        for line in sorted(current - self._seen):
            self._log.warning("%s", line)
        self._seen = current


@dataclass
class Counters:
    """What happened so far; read by tests, ``/metrics`` later, and the logs."""

    values: dict[str, int] = field(default_factory=dict)

    def inc(self, name: str, by: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + by

    def __getitem__(self, name: str) -> int:
        return self.values.get(name, 0)


def _thread(name: str, target: Callable[[], None]) -> threading.Thread:
    return threading.Thread(target=target, name=f"discoverd-{name}", daemon=True)


class Role:
    """Common plumbing: a stop event, threads, a waker, backoff for the loops."""

    name = "role"

    def __init__(self, min_wait: float, max_wait: float, retry_max: float) -> None:
        self.stop_event = threading.Event()
        self.waker = Waker(min_wait, max_wait)
        self.retry_max = retry_max
        self.counters = Counters()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        raise NotImplementedError

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = _thread(f"{self.name}-{name}", target)
        self._threads.append(thread)
        thread.start()

    def _guarded(self, what: str, body: Callable[[], None]) -> Callable[[], None]:
        """Run ``body`` until stop; an unexpected exception is logged and the loop restarted."""

        def run() -> None:
            backoff = Backoff(self.retry_max)
            while not self.stop_event.is_set():
                try:
                    body()
                    return
                except Exception:
                    log.exception("%s: unexpected error in %s; restarting it", self.name, what)
                    delay = backoff.next()
                    # The batch that failed was consumed: make sure the loop runs again.
                    self.waker.retry_in(delay, "restart after an error")
                    self.stop_event.wait(delay)

        return run

    def _watch_forever(self, what: str, watch: Callable[[], None]) -> None:
        """Keep a watch running: when it returns or fails, resync and start it again."""
        backoff = Backoff(self.retry_max)
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                watch()
                if self.stop_event.is_set():
                    return
                log.warning("%s: %s stream ended; reconnecting", self.name, what)
            except PluginError as exc:
                log.warning("%s: %s lost: %s; reconnecting", self.name, what, exc)
            except Exception:
                log.exception("%s: %s failed; reconnecting", self.name, what)
            self.waker.notify(f"{what} reconnect")
            if time.monotonic() - started > 30:
                backoff.reset()
            self.stop_event.wait(backoff.next())

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.waker.wake_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


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
        self._problems = ProblemLog(log)

    def start(self) -> None:
        self.waker.notify("start")
        self._spawn("reconcile", self._guarded("reconcile", self._reconcile_loop))
        self._spawn(
            "watch",
            lambda: self._watch_forever(
                "source watch", lambda: self.source.watch(self.waker.notify, self.stop_event)
            ),
        )
        self._spawn("keepalive", self._guarded("keepalive", self._keepalive_loop))

    def _reconcile_loop(self) -> None:
        backoff = Backoff(self.retry_max)
        while (reasons := self.waker.wait(self.stop_event)) is not None:
            log.debug("register: reconcile (%s)", ", ".join(reasons))
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
        snapshot = self.source.snapshot()
        self._problems.update(snapshot.problems)
        desired = {i.id: i for i in snapshot.instances}
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
            for instance in todo:
                self.registered[instance.id] = instance
                self.counters.inc("registered")
                log.info(
                    "register: added %s %s (%s)", instance.service, instance.id, instance.endpoint
                )
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
                log.info("register: removed %s %s (%s)", instance.service, iid, instance.endpoint)

    def _keepalive_loop(self) -> None:
        failing = False
        while not self.stop_event.wait(self._interval(failing)):
            try:
                alive = self.registry.keepalive()
            except PluginError as exc:
                if not failing:
                    log.warning("register: keepalive failed: %s; retrying", exc)
                failing = True
                continue
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


class DiscoverRole(Role):
    """Registry -> proxy: keep the proxy serving what the registry holds."""

    name = "discover"

    def __init__(
        self,
        registry: Registry,
        proxy: Proxy,
        *,
        proxy_name: str = "proxy",
        manager: PluginManager | None = None,
        default_mode: Mode = "tcp",
        min_wait: float = 0.02,
        max_wait: float = 0.5,
        retry_max: float = 10.0,
        resync_interval: float = 30.0,
    ) -> None:
        super().__init__(min_wait, max_wait, retry_max)
        self.resync_interval = resync_interval
        self.registry = registry
        self.proxy = proxy
        self.proxy_name = proxy_name
        self.manager = manager
        self.default_mode = default_mode
        self.services: tuple[Service, ...] | None = None
        self.applied: str | None = None
        self.rejected: str | None = None
        self.revision = 0
        self.owners: dict[int, str] = {}
        self.first_snapshot = threading.Event()
        self.converged = threading.Event()
        self._service_cache = ServiceCache()
        self._problems = ProblemLog(log)

    def start(self) -> None:
        self.waker.notify("start")
        self._spawn("reconcile", self._guarded("reconcile", self._reconcile_loop))
        self._spawn("watch", self._watch_loop)

    def _watch_loop(self) -> None:
        while not self.first_snapshot.wait(0.5):
            if self.stop_event.is_set():
                return
        self._watch_forever(
            "registry watch",
            lambda: self.registry.watch(self.waker.notify, self.stop_event, self.revision),
        )

    def _reconcile_loop(self) -> None:
        backoff = Backoff(self.retry_max)
        while (reasons := self.waker.wait(self.stop_event)) is not None:
            log.debug("discover: reconcile (%s)", ", ".join(reasons))
            try:
                # The periodic pass also hands the proxy its configuration again, so a proxy
                # that died while nothing changed is started again.
                self.reconcile(force_apply=RESYNC in reasons)
                backoff.reset()
                if self.resync_interval > 0:
                    self.waker.retry_in(self.resync_interval, RESYNC)
            except PluginError as exc:
                delay = backoff.next()
                log.warning(
                    "discover: %s; the proxy keeps its last good configuration; retry in %.1fs",
                    exc,
                    delay,
                )
                self.counters.inc("discover_errors")
                self.waker.retry_in(delay)

    def reconcile(self, force_apply: bool = False) -> str:
        """One pass; returns what happened: "applied", "unchanged", "rejected" or "deferred".

        With ``force_apply`` an unchanged configuration is still handed to the proxy (whose
        ``apply`` is cheap when it already runs it, and starts it again when it died)."""
        catalog = self.registry.snapshot()
        self.revision = catalog.revision
        self.first_snapshot.set()
        assignment = build_services(
            catalog,
            default_mode=self.default_mode,
            reserved_ports=self.proxy.reserved_ports(),
            previous_owners=self.owners,
            cache=self._service_cache,
        )
        self._problems.update(assignment.problems)
        self.owners = assignment.owners
        services = assignment.services
        config = self.proxy.render(services)
        if config == self.applied:
            self._publish(services)
            if force_apply:
                result = self.proxy.apply(config, services)
                if result != "unchanged":
                    log.warning("discover: %s was not running its configuration: %s",
                                self.proxy_name, result)  # fmt: skip
                    self.counters.inc("proxy_restarts")
            self.converged.set()
            return "unchanged"
        if config == self.rejected:
            return "rejected"  # already reported; wait for the input to change
        delay = self.proxy.apply_delay(config, services)
        if delay > 0:
            self.counters.inc("deferred_applies")
            log.debug("discover: %s asks to wait %.3fs before applying", self.proxy_name, delay)
            self.waker.retry_in(delay, "deferred apply")
            return "deferred"  # observers hear of these services once they are applied
        try:
            self.proxy.validate(config)
        except ProxyConfigError as exc:
            self.rejected = config
            self.counters.inc("validation_failures")
            log.error(
                "discover: candidate configuration refused by %s; keeping the running one: %s",
                self.proxy_name,
                exc,
            )
            return "rejected"
        result = self.proxy.apply(config, services)
        self._publish(services)
        self.applied = config
        self.rejected = None
        self.counters.inc("applies")
        log.info(
            "discover: %s %s (%d services, %d instances)",
            self.proxy_name,
            result,
            len(services),
            sum(len(s.instances) for s in services),
        )
        if self.manager is not None:
            self.manager.after_apply(self.proxy_name, config, result)
        self.converged.set()
        return "applied"

    def _publish(self, services: tuple[Service, ...]) -> None:
        """Remember ``services`` and tell the ``discoverd_services_changed`` observers."""
        if services != self.services and self.manager is not None:
            self.manager.services_changed(services)
        self.services = services

    def shutdown(self) -> None:
        self.stop_event.set()
        try:
            self.registry.close()  # unblocks the registry watch before the threads are joined
        finally:
            self.stop()
            self.proxy.close()
