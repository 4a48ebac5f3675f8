"""The discover role: keep the local proxy serving what the registry holds."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection

from discoverd.core.assignment import ServiceCache, build_services
from discoverd.core.catalog import CatalogReader
from discoverd.core.errors import PluginError, ProxyConfigError
from discoverd.core.interfaces import Proxy, Registry
from discoverd.core.manager import PluginManager
from discoverd.core.model import Mode, Service
from discoverd.core.role import RESYNC, ProblemLog, Role
from discoverd.core.scheduling import Backoff

log = logging.getLogger("discoverd")


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
        self.reader = CatalogReader(registry)
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
        self._watch_forever("registry watch", self._watch_once)

    def _watch_once(self) -> None:
        since = self.reader.revision
        self.reader.watching(True)
        try:
            self.registry.watch(self._changed, self.stop_event, since)
        finally:
            self.reader.watching(False)

    def _changed(self, reason: str, services: Collection[str] | None = None) -> None:
        """The registry's ``Notify``: remember what changed, wake the loop."""
        self.reader.changed(services)
        self.waker.notify(reason)

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
        catalog = self.reader.read()
        self.revision = self.reader.revision
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
