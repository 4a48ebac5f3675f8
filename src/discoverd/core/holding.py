"""No cliff at the TTL: instances the registry lost at once keep being served while they answer.

A registry entry leaves for two kinds of reasons. Its host deregistered it (``docker stop``, the
check failed, the agent shut down cleanly), or its lease expired. A lease expires because its
host died, or because the registry was away longer than the TTL (frozen, stopped, restarted
empty) or the agent was restarted after it: then every instance of that host, or of every host,
leaves at once while the backends are perfectly healthy, and a proxy that follows the registry
to the letter empties its frontends until the register roles have written everything again.

The discover role cannot tell the two apart from the registry alone, so it asks the backends,
like Envoy's panic threshold: when one pass would take away more than half of a service's
instances (all of them, typically), those instances are *held*. A held instance stays in the
proxy while it answers a probe from this host (a TCP connect that docker-proxy cannot fake:
:func:`~discoverd.core.checks.run_check` on the published address), and leaves as soon as a
probe fails, as soon as the registry has it again (it is then served from the registry), or
after ``hold`` seconds. A host that really died fails its probes at once (its address refuses
or times out within the probe's timeout), so it leaves within the TTL plus about a second; a
``docker stop`` of one instance among several takes away too few to be held and leaves at once,
as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from discoverd.core.checks import CheckSpec, run_check
from discoverd.core.interfaces import CheckTarget
from discoverd.core.model import ServiceInstance

log = logging.getLogger("discoverd.holding")

#: Seconds between two probes of a held instance.
PROBE_INTERVAL = 1.0
#: How long one probe may take.
PROBE_TIMEOUT = 1.0

Probe = Callable[[ServiceInstance], str | None]


def probe_published(instance: ServiceInstance) -> str | None:
    """``None`` if the instance answers at its published address, else why not. A TCP check
    that also waits briefly for a forwarder (docker-proxy) to drop the connection."""
    spec = CheckSpec(kind="tcp", timeout=PROBE_TIMEOUT)
    return run_check(spec, CheckTarget(instance.address, instance.port), forwarded=True)


@dataclass
class _Held:
    instance: ServiceInstance
    since: float
    answered: bool = True  # served until a probe says otherwise
    probing: bool = False
    next_probe: float = 0.0


class Holds:
    """The held instances of one discover role (see the module docstring).

    :meth:`update` is called by each pass with what the proxy served last and what the registry
    holds now; it returns the held instances to serve on top of the registry's. Probes run in a
    small pool; a probe that changes an instance's fate calls ``notify`` so a pass follows."""

    def __init__(
        self,
        hold: float,
        notify: Callable[[str], None],
        *,
        probe: Probe = probe_published,
        workers: int = 8,
    ) -> None:
        self.hold = hold
        self._notify = notify
        self._probe = probe
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], _Held] = {}
        # Released for good (a failed probe, the hold over): not held again until the registry
        # has them back, even though the proxy still served them at the last pass.
        self._released: set[tuple[str, str]] = set()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="discoverd-hold-probe")
        self._timer: threading.Timer | None = None
        self._closed = False

    def update(
        self,
        served: Mapping[str, Sequence[ServiceInstance]],
        current: Iterable[ServiceInstance],
        now: float | None = None,
    ) -> list[ServiceInstance]:
        """The instances to serve besides ``current`` (the registry's), given ``served`` (what
        the proxy served last, by service)."""
        if self.hold <= 0:
            return []
        now = time.monotonic() if now is None else now
        present: dict[str, set[str]] = {}
        for instance in current:
            present.setdefault(instance.service, set()).add(instance.id)
        started: list[str] = []
        with self._lock:
            for key in list(self._held):
                held = self._held[key]
                service, iid = key
                if iid in present.get(service, ()):
                    del self._held[key]  # registered again: the registry serves it
                elif not held.answered:
                    del self._held[key]
                    self._released.add(key)
                    log.info("holding: %s %s does not answer; removed", service, iid)
                elif now - held.since >= self.hold:
                    del self._held[key]
                    self._released.add(key)
                    log.info("holding: %s %s not registered again in %gs; removed",
                             service, iid, self.hold)  # fmt: skip
            if self._released:
                was_served = {(name, i.id) for name, each in served.items() for i in each}
                self._released = {
                    key for key in self._released
                    if key in was_served and key[1] not in present.get(key[0], ())
                }  # fmt: skip
            for service, instances in served.items():
                still = present.get(service, set())
                if all(i.id in still for i in instances):
                    continue  # the common case, every pass: nothing of it lost
                had = {i.id: i for i in instances}
                lost = [iid for iid in had if iid not in still]
                fresh = [
                    iid
                    for iid in lost
                    if (service, iid) not in self._held and (service, iid) not in self._released
                ]
                if not fresh or 2 * len(set(had) & still) >= len(had):
                    continue  # at most half lost: an ordinary removal
                for iid in fresh:
                    self._held[(service, iid)] = _Held(had[iid], since=now)
                started.append(f"{service} ({len(fresh)} of {len(had)})")
            result = [held.instance for held in self._held.values()]
        if started:
            log.warning(
                "holding instances the registry lost at once while they still answer: %s",
                ", ".join(started),
            )
        self._schedule(now)
        return result

    def held(self) -> list[ServiceInstance]:
        """The instances held now (for tests, logs and ``explain``)."""
        with self._lock:
            return [h.instance for h in self._held.values()]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- probing ----------------------------------------------------------------------------

    def _schedule(self, now: float) -> None:
        """Probe what is due; arrange to be called again when the next probe is."""
        with self._lock:
            if self._closed:
                return
            due = [h for h in self._held.values() if not h.probing and h.next_probe <= now]
            for held in due:
                held.probing = True
                self._pool.submit(self._run_probe, held)
            waiting = [h.next_probe for h in self._held.values() if not h.probing]
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if waiting:
                delay = max(0.01, min(waiting) - now)
                self._timer = threading.Timer(delay, self._tick)
                self._timer.daemon = True
                self._timer.start()

    def _tick(self) -> None:
        self._schedule(time.monotonic())

    def _run_probe(self, held: _Held) -> None:
        try:
            reason = self._probe(held.instance)
        except Exception as exc:  # a probe that breaks must not keep a dead backend
            reason = f"probe failed: {type(exc).__name__}: {exc}"
        with self._lock:
            held.probing = False
            held.next_probe = time.monotonic() + PROBE_INTERVAL
            changed = reason is not None and held.answered
            if reason is not None:
                held.answered = False
            current = self._held.get((held.instance.service, held.instance.id)) is held
        if changed and current:
            self._notify(f"held instance {held.instance.id} does not answer ({reason})")
        self._schedule(time.monotonic())
