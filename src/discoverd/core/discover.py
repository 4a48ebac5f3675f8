"""The discover role: keep the local proxy serving what the registry holds.

One pass reads the registry (in full, or the services the watch named: :mod:`.catalog`), adds
the instances held while they still answer (:mod:`.holding`), groups everything into services
(:mod:`.assignment`), leaves out what the proxy cannot serve now, renders, validates and
applies. One service never holds the others back:

- the proxy names the services it cannot serve now (``Proxy.unservable``: a frontend port
  another process holds); they are left out, reported, and asked about again every
  ``EXCLUDED_RETRY`` seconds until they can be served;
- when the candidate fails validation, the services that differ from the last applied set are
  bisected until the ones that cause it are found; those are left out (until they change) and
  the rest is applied;
- when the proxy refuses an apply that passed validation (a port taken between the probe and
  the reload), ``unservable`` is asked again and the apply retried once without what it names.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from discoverd.core.assignment import ServiceCache, build_services
from discoverd.core.catalog import CatalogReader
from discoverd.core.errors import PluginError, ProxyConfigError, Unavailable, ValidationError
from discoverd.core.holding import Holds
from discoverd.core.interfaces import Proxy, Registry
from discoverd.core.local import LocalAddresses
from discoverd.core.manager import PluginManager
from discoverd.core.model import (
    Catalog,
    ModeSetting,
    Problem,
    Service,
    ServiceInstance,
    backend_problem,
)
from discoverd.core.role import RESYNC, Role
from discoverd.core.scheduling import Backoff
from discoverd.core.telemetry import Histogram, Stages, now_ms

log = logging.getLogger("discoverd")

#: Seconds between two looks at services left out because the proxy could not serve them.
EXCLUDED_RETRY = 2.0
#: At most one write of the served set per this many seconds (it is read after a restart).
SERVED_WRITE_EVERY = 0.5


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
        default_mode: ModeSetting = "auto",
        min_wait: float = 0.02,
        max_wait: float = 0.5,
        retry_max: float = 10.0,
        resync_interval: float = 30.0,
        removal_hold: float = 0.0,
        served_file: Path | None = None,
        own_host_id: str = "",
        single_machine: bool = True,
        local_direct: bool = True,
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
        #: Services left out of the last pass, with the reason (unservable or invalid).
        self.excluded: dict[str, str] = {}
        self.holds = Holds(removal_hold, self.waker.notify)
        #: Durations of every apply, and of those that started or reloaded the proxy.
        self.apply_seconds = Histogram()
        self.reload_seconds = Histogram()
        #: Where the served set is kept across restarts (``None``: not kept).
        self.served_file = served_file
        self._served: dict[str, tuple[ServiceInstance, ...]] = read_served(served_file)
        self._served_written = -SERVED_WRITE_EVERY
        self._served_dirty = False
        self._served_texts: ServedTexts = {}
        self._invalid: dict[str, tuple[Service, str]] = {}  # refused by validation, until changed
        #: Who this host is, for the address policy (loopback only from this host's own
        #: instances, unless every agent runs on one machine).
        self.own_host_id = own_host_id
        self.single_machine = single_machine
        self._address_verdicts: dict[tuple[str, str, str], Problem | None] = {}
        #: This host's own instances at their container address (:mod:`.local`); ``None``
        #: with the core option ``local_direct`` off, or without a host id.
        self.local = (
            LocalAddresses(own_host_id, schedule=self.waker.retry_in)
            if local_direct and own_host_id
            else None
        )
        self._service_cache = ServiceCache()

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
            self.watch_live.set()
            self.registry.watch(self._changed, self.stop_event, since)
        finally:
            self.watch_live.clear()
            self.reader.watching(False)

    def _changed(self, reason: str, services: Collection[str] | None = None) -> None:
        """The registry's ``Notify``: remember what changed, wake the loop."""
        self.counters.inc("watch_events")
        if log.isEnabledFor(logging.DEBUG):
            named = "" if services is None else f", {len(services)} services"
            log.debug("discover: watch: %s%s (t=%s)", reason, named, now_ms())
        self.reader.changed(services)
        self.waker.notify(reason)

    def _reconcile_loop(self) -> None:
        backoff = Backoff(self.retry_max)
        while (reasons := self.waker.wait(self.stop_event)) is not None:
            self._log_wake(reasons)
            if RESYNC in reasons:
                self.counters.inc("resyncs")
            try:
                # The periodic pass also hands the proxy its configuration again, so a proxy
                # that died while nothing changed is started again.
                self.reconcile(force_apply=RESYNC in reasons)
                backoff.reset()
                if self.resync_interval > 0:
                    self.waker.retry_in(self.resync_interval, RESYNC)
            except PluginError as exc:
                delay = backoff.next()
                self.counters.inc("passes", outcome="failed")
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
        stages = Stages()
        try:
            catalog = self.reader.read()
        except PluginError as exc:
            self.registry_contact.failed(str(exc))
            raise
        self.registry_contact.ok()
        self.revision = self.reader.revision
        self.first_snapshot.set()
        stages.mark("read")
        held = self.holds.update(self._served, catalog.instances)
        if held:
            catalog = Catalog(
                (*catalog.instances, *held), catalog.problems, catalog.revision, catalog.claims
            )
        if self.local is not None:
            catalog = self.local.apply(catalog)
        assignment = build_services(
            catalog,
            default_mode=self.default_mode,
            reserved_ports=self.proxy.reserved_ports(),
            previous_owners=self.owners,
            cache=self._service_cache,
            accept=None if self.single_machine else self._acceptable,
        )
        self.owners = assignment.owners
        stages.mark("build")
        services, excluded = self._servable(assignment.services)
        stages.mark("servable")
        config = self.proxy.render(services)
        stages.mark("render")
        try:
            if config == self.applied:
                self._publish(services)
                self.counters.inc("passes", outcome="unchanged")
                if force_apply:
                    result = self._apply(config, services)
                    if result != "unchanged":
                        log.warning("discover: %s was not running its configuration: %s",
                                    self.proxy_name, result)  # fmt: skip
                        self.counters.inc("proxy_restarts")
                self.converged.set()
                if log.isEnabledFor(logging.DEBUG):
                    stages.mark("publish")
                    log.debug("discover: pass unchanged: %s", stages.line())
                return "unchanged"
            if config == self.rejected:
                self.counters.inc("passes", outcome="refused")
                return "rejected"  # already reported; wait for the input to change
            delay = self.proxy.apply_delay(config, services)
            if delay > 0:
                self.counters.inc("deferred_applies")
                self.counters.inc("passes", outcome="deferred")
                log.debug("discover: %s asks to wait %.3fs before applying", self.proxy_name, delay)
                self.waker.retry_in(delay, "deferred apply")
                return "deferred"  # observers hear of these services once they are applied
            checked = False
            for attempt in (1, 2):
                if attempt == 2 or self.proxy.needs_check(config):
                    checked = True
                    try:
                        self.proxy.validate(config)
                    except ProxyConfigError as exc:
                        narrowed = self._narrow(services, exc)
                        if narrowed is None:
                            self.rejected = config
                            self.counters.inc("validation_failures")
                            self.counters.inc("passes", outcome="refused")
                            log.error(
                                "discover: candidate configuration refused by %s; keeping the "
                                "running one: %s",
                                self.proxy_name,
                                exc,
                            )
                            return "rejected"
                        services = narrowed
                        excluded.update({n: r for n, (_, r) in self._invalid.items()})
                        config = self.proxy.render(services)
                stages.mark("validate")
                try:
                    result = self._apply(config, services)
                except Unavailable:
                    raise
                except PluginError as exc:
                    if not checked:  # a first start that was its own check (Proxy.needs_check)
                        log.info("discover: %s did not start (%s); checking the candidate",
                                 self.proxy_name, exc)  # fmt: skip
                        continue
                    # Refused although it passed validation: a port taken since the probe?
                    late = self.proxy.unservable(services)
                    if not late:
                        raise
                    log.warning("discover: %s refused the configuration (%s); leaving out %s",
                                self.proxy_name, exc, ", ".join(sorted(late)))  # fmt: skip
                    excluded.update(late)
                    services = tuple(s for s in services if s.name not in late)
                    config = self.proxy.render(services)
                    self.proxy.validate(config)
                    result = self._apply(config, services)
                break
        finally:
            self._settle(assignment.problems, excluded)
        stages.mark("apply")
        # Applied: said at once; remembering the set (and writing it down) comes after.
        log.info(
            "discover: %s %s (%d services, %d instances)",
            self.proxy_name,
            result,
            len(services),
            sum(len(s.instances) for s in services),
        )
        self._publish(services)
        self.applied = config
        self.rejected = None
        self.counters.inc("applies")
        self.counters.inc("passes", outcome="runtime" if result == "runtime" else result)
        stages.mark("publish")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("discover: pass %s: %s", result, stages.line())
        if self.manager is not None:
            self.manager.after_apply(self.proxy_name, config, result)
        self.converged.set()
        return "applied"

    def _acceptable(self, instance: ServiceInstance) -> Problem | None:
        """The address policy (:func:`~discoverd.core.model.backend_problem`), remembered by
        address and registering host (a registry of 10,000 instances has few of those)."""
        key = (instance.address, instance.host_id, instance.id)
        if key not in self._address_verdicts:
            if len(self._address_verdicts) > 100_000:
                self._address_verdicts.clear()
            self._address_verdicts[key] = backend_problem(
                instance, self.own_host_id, single_machine=self.single_machine
            )
        return self._address_verdicts[key]

    def _apply(self, config: str, services: Sequence[Service]) -> str:
        """``proxy.apply``, timed (reloads and starts apart)."""
        began = time.monotonic()
        try:
            result = self.proxy.apply(config, services)
        except Exception:
            self.counters.inc("apply_failures")
            raise
        spent = time.monotonic() - began
        self.apply_seconds.observe(spent)
        if result in ("reloaded", "started"):
            self.reload_seconds.observe(spent)
            self.counters.inc("proxy_reloads", proxy=self.proxy_name, result=result)
        return result

    def _servable(
        self, candidates: Sequence[Service]
    ) -> tuple[tuple[Service, ...], dict[str, str]]:
        """``candidates`` without what the proxy cannot serve now and what validation refused
        (until it changes); and what was left out, with the reason."""
        by_name = {s.name: s for s in candidates}
        for name in [n for n, (service, _) in self._invalid.items() if by_name.get(n) != service]:
            del self._invalid[name]  # changed or gone: judged again
        excluded = {name: reason for name, (_, reason) in self._invalid.items()}
        rest = [s for s in candidates if s.name not in excluded]
        excluded.update(self.proxy.unservable(rest) if rest else {})
        return tuple(s for s in candidates if s.name not in excluded), excluded

    def _narrow(
        self, services: Sequence[Service], error: ProxyConfigError
    ) -> tuple[Service, ...] | None:
        """The largest part of ``services`` the proxy accepts, found by bisecting the services
        that differ from the last applied set; the others go to ``_invalid``. ``None`` when
        even the unchanged services are refused (nothing to narrow)."""
        known = {s.name: s for s in self.services or ()}
        good = [s for s in services if known.get(s.name) == s]
        suspects = [s for s in services if known.get(s.name) != s]
        if not suspects or not self._accepted(good):
            return None
        accepted, culprits = self._bisect(good, suspects, str(error))
        for service, reason in culprits:
            self._invalid[service.name] = (service, f"refused by {self.proxy_name}: {reason}")
        self.counters.inc("validation_failures")
        kept = {s.name for s in (*good, *accepted)}
        return tuple(s for s in services if s.name in kept)

    def _bisect(
        self, base: list[Service], suspects: list[Service], error: str
    ) -> tuple[list[Service], list[tuple[Service, str]]]:
        """``suspects`` split into those ``base`` accepts and the culprits (with the reason)."""
        if len(suspects) == 1:
            return [], [(suspects[0], error)]
        middle = len(suspects) // 2
        accepted: list[Service] = []
        culprits: list[tuple[Service, str]] = []
        for part in (suspects[:middle], suspects[middle:]):
            reason = self._refusal([*base, *accepted, *part])
            if reason is None:
                accepted.extend(part)
                continue
            ok, bad = self._bisect([*base, *accepted], part, reason)
            accepted.extend(ok)
            culprits.extend(bad)
        return accepted, culprits

    def _refusal(self, services: Sequence[Service]) -> str | None:
        try:
            self.proxy.validate(self.proxy.render(services))
        except ProxyConfigError as exc:
            return str(exc)
        return None

    def _accepted(self, services: Sequence[Service]) -> bool:
        return self._refusal(services) is None

    def _settle(self, problems: Sequence[Problem], excluded: dict[str, str]) -> None:
        """Report the pass's problems (each once while it lasts) and what was left out; look
        again at left-out services that may come back on their own."""
        if set(excluded) - set(self.excluded):
            self.counters.inc("services_left_out", len(set(excluded) - set(self.excluded)))
        self.excluded = excluded
        left_out = [
            Problem(f"service {name}", f"not served: {reason}", service=name)
            for name, reason in sorted(excluded.items())
        ]
        self.problems.update([*problems, *left_out])
        if any(name not in self._invalid for name in excluded):
            self.waker.retry_in(EXCLUDED_RETRY, "services left out")

    def _publish(self, services: tuple[Service, ...]) -> None:
        """Remember ``services`` (and keep them across restarts) and tell the
        ``discoverd_services_changed`` observers."""
        if services != self.services and self.manager is not None:
            self.manager.services_changed(services)
        if services != self.services:
            self._served = {s.name: s.instances for s in services}
            self._served_dirty = self.served_file is not None
        self.services = services
        if self._served_dirty and self.served_file is not None:
            now = time.monotonic()
            wait = self._served_written + SERVED_WRITE_EVERY - now
            if wait <= 0:
                self._served_written = now
                self._served_dirty = False
                write_served(self.served_file, services, self._served_texts)
            else:  # at most one write per period, but the last state always gets written
                self.waker.retry_in(wait, "keep the served set")

    def shutdown(self) -> None:
        self.stop_event.set()
        try:
            self.registry.close()  # unblocks the registry watch before the threads are joined
        finally:
            self.stop()
            self.holds.close()
            if self.local is not None:
                self.local.close()
            if self.served_file is not None and self.services is not None:
                write_served(self.served_file, self.services, self._served_texts)
            self.proxy.close()


# -- the served set, kept across restarts ---------------------------------------------------------
# A discover role that restarts (after a crash, an upgrade, a kill) has not served anything
# yet; what the proxy still serves is what it served before. It reads that back, so that
# instances the registry lost meanwhile (their leases expired while the agent was away) are
# held like any others instead of being removed by the first pass.


#: The served file's text of each service, kept between writes: ``name -> (instances, text)``.
ServedTexts = dict[str, tuple[tuple[ServiceInstance, ...], str]]


def write_served(path: Path, services: Sequence[Service], texts: ServedTexts | None = None) -> None:
    """Write the instances of ``services`` to ``path`` (a JSON list). With ``texts``, a
    service whose instances are those of the last write reuses that write's text (one
    change among 10,000 instances encodes one service, not all of them); ``texts`` is
    updated to this write."""
    pieces: list[str] = []
    kept: ServedTexts = {}
    for service in services:
        instances = service.instances
        known = texts.get(service.name) if texts is not None else None
        if known is not None and (known[0] is instances or known[0] == instances):
            text = known[1]
        else:
            text = _served_text(instances)
        kept[service.name] = (instances, text)
        if text:
            pieces.append(text)
    if texts is not None:
        texts.clear()
        texts.update(kept)
    text = "[" + ",".join(pieces) + "]"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, name = tempfile.mkstemp(prefix=".served.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(name, path)
    except OSError as exc:
        log.warning("discover: cannot keep the served set in %s: %s", path, exc)


def _served_text(instances: Sequence[ServiceInstance]) -> str:
    """The items of ``instances`` in the served file, without the list's brackets."""
    document = [
        {
            "service": i.service,
            "id": i.id,
            "address": i.address,
            "port": i.port,
            "protocol": i.protocol,
            "frontend_port": i.frontend_port,
            "tags": list(i.tags),
            "meta": i.meta_dict,
            "host_id": i.host_id,
        }
        for i in instances
    ]
    # json.dumps, not json.dump: only the one-shot encoder is the C one (10x faster).
    return json.dumps(document, separators=(",", ":"))[1:-1]


def read_served(path: Path | None) -> dict[str, tuple[ServiceInstance, ...]]:
    if path is None:
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("discover: ignoring the served set in %s: %s", path, exc)
        return {}
    served: dict[str, list[ServiceInstance]] = {}
    for entry in document if isinstance(document, list) else ():
        try:
            instance = ServiceInstance(
                service=entry["service"],
                id=entry["id"],
                address=entry["address"],
                port=entry["port"],
                protocol=entry["protocol"],
                frontend_port=entry["frontend_port"],
                tags=tuple(entry["tags"]),
                meta=tuple(entry["meta"].items()),
                host_id=entry["host_id"],
            )
        except (KeyError, TypeError, AttributeError, ValidationError):
            continue  # a damaged entry holds nothing back
        served.setdefault(instance.service, []).append(instance)
    return {name: tuple(instances) for name, instances in served.items()}
