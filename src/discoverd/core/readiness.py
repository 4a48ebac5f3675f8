"""Ready before routed: the register role checks an instance before it registers it.

Like nerve, discoverd registers an instance only once its application answers, and keeps
checking it: an instance that stops answering leaves the registry, one that answers again
returns. :class:`Readiness` keeps every wanted instance checked (one scheduler thread, a worker
pool) and says which are ready; how one check is made is :mod:`discoverd.core.checks`.

How fast, and how damped:

- A ready instance is checked every ``check_interval`` (2 s). Between two checks, every
  :data:`PROBE_INTERVAL` (0.25 s), the kernel is asked whether anything still listens on its
  port inside its namespace (:class:`~discoverd.core.checks.ListenProbe`: no connection, a few
  microseconds, all instances in one wake-up). A probe that finds nothing is confirmed at
  once by a real check; two failures in a row (a probe and its check, or two checks
  :data:`CONFIRM` apart) take the instance out. docker-proxy keeps accepting on the published
  port meanwhile, so this is what takes a dead application out of rotation within a second.
- An instance that fell is not registered again at its next good check: it must answer for a
  *hold* period in a row, checked every :data:`HOLD_RECHECK` meanwhile (a failure starts the
  period again). The hold is :data:`HOLD` (2 s) after one fall and doubles with each further
  fall, up to :data:`HOLD_MAX` (60 s); the count of falls fades with a half-life of
  :data:`HALF_LIFE` (60 s). A flapping instance therefore changes the registry at most once
  per hold, and a hold longer than its good spells keeps it out until it is steady. A new
  instance (one that was never ready) is registered at its first good check, as before.

Mode detection (``detect``): after an instance's first good check, whether its application
speaks HTTP/1 is found once (:func:`~discoverd.core.checks.detect_mode`, in a small pool of its
own so that it never delays a check), for instances whose metadata names no ``mode``. It is
made in the application's own namespace only: an instance checked on its published port (no
namespace, or one that cannot be entered) is never detected. The register role registers the
instance at once and again with the mode found (:meth:`Readiness.modes`).

A check whose namespace is gone (``/proc/<pid>`` of a process that exited: the container
stopped, or restarted since the source named that process) fails with :data:`GONE` and asks
for a new snapshot; it never falls back to the published port, which may belong to another
container by then. Only a namespace that cannot be entered for want of privileges (not root)
falls back to the published port.
"""

from __future__ import annotations

import errno
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from discoverd.core.checks import (
    CheckSpec,
    Detected,
    ListenProbe,
    detect_mode,
    run_check,
    spec_for,
)
from discoverd.core.durations import format_seconds
from discoverd.core.interfaces import CheckTarget
from discoverd.core.model import ServiceInstance

log = logging.getLogger("discoverd.checks")


#: A ready instance leaves after this many failed checks in a row (one failure may be a blip).
FALL = 2
#: A ready instance whose check failed once is checked again this soon.
CONFIRM = 0.1
#: While an instance has never been ready, checks repeat at least this often (a slow starter
#: becomes routable within this long of listening), starting fast and doubling.
FIRST_RETRY = 0.02
NOT_READY_MAX = 0.5
#: The first retry of a new instance: its first check often comes a few ms before its
#: application listens, and the next one then comes 5, 10, 20, 40 ms... later (an instance
#: that fell starts again from :data:`FIRST_RETRY`).
NEW_RETRY = 0.005
#: The longest the register role's first pass waits for the first check of every instance.
FIRST_PASS_MAX = 3.0
#: Seconds between two listen probes of a ready instance (0: no probes).
PROBE_INTERVAL = 0.25
#: A probe that found nothing while the check right after it passed, this many times in a row,
#: is not used for that instance any more (it cannot read that application's listener).
PROBE_MISTRUST = 3
#: Damping: the hold after one fall, its ceiling, and the half-life of the count of falls.
HOLD = 2.0
HOLD_MAX = 60.0
HALF_LIFE = 60.0
#: During a hold, an answering instance is checked this often (shorter than the spells of a
#: fast flapper, so that one of its failures falls between two checks).
HOLD_RECHECK = 0.2
#: The reason of a check whose namespace is gone (its process exited).
GONE = "its process is gone"
#: Threads for mode detection (each may wait ``BANNER_WAIT`` plus a check timeout).
DETECT_WORKERS = 4
#: Detection attempts that get no byte back (a server that closes, or stays silent) before the
#: instance is taken for ``tcp``: it does not answer in HTTP.
DETECT_TRIES = 3


class LivenessProbe(Protocol):
    """Says cheaply whether an application still listens (a :class:`ListenProbe`)."""

    def listening(self) -> bool: ...

    def close(self) -> None: ...


#: Runs one check of an instance: ``None`` when it answers, else why not.
CheckRun = Callable[[ServiceInstance, CheckSpec, CheckTarget | None], str | None]
#: Makes the probe of an instance (``None``: it has none). Raises ``OSError`` when it cannot.
ProbeMaker = Callable[[ServiceInstance, CheckSpec, CheckTarget | None], LivenessProbe | None]
#: Finds what an application speaks (``detect_mode(target, timeout)``): ``None`` when it
#: could not tell; raises ``OSError`` when the namespace cannot be entered.
Detector = Callable[[CheckTarget, float], Detected | None]


def listen_probe(
    instance: ServiceInstance, spec: CheckSpec, target: CheckTarget | None
) -> LivenessProbe | None:
    """The default probe: a :class:`ListenProbe` in the application's namespace, for
    instances checked in their namespace (none for published ports: docker-proxy's listener
    is not the application's)."""
    if target is None or not target.netns:
        return None
    return ListenProbe(target.netns, target.address, target.port, spec.timeout)


@dataclass
class _State:
    instance: ServiceInstance
    spec: CheckSpec
    target: CheckTarget | None
    ready: bool = False
    checked: bool = False
    failures: int = 0
    due: float = 0.0
    retry: float = NEW_RETRY
    running: Future[tuple[str | None, LivenessProbe | None]] | None = None
    reason: str = ""
    # Damping: the faded count of falls (as of ``penalty_at``); while ``hold`` > 0 the
    # instance fell and must answer that long in a row (since ``passing_since``) to be ready.
    penalty: float = 0.0
    penalty_at: float = 0.0
    hold: float = 0.0
    passing_since: float | None = None
    # The listen probe; ``suspect``: the last failure was the probe's, the next check says
    # whether it was right.
    probe: LivenessProbe | None = None
    probe_wanted: bool = True
    probe_misses: int = 0
    suspect: bool = False
    # Mode detection: wanted (no explicit mode), the mode found, a detection running, the
    # attempts that could not tell; ``gone_noted``: a snapshot was asked for a gone target.
    detect: bool = False
    mode: Detected | None = None
    detecting: bool = False
    detect_tries: int = 0
    gone_noted: bool = False


class Readiness:
    """Checks the instances the register role wants, and says which are ready.

    ``update`` hands over the desired instances after each snapshot and returns the ids that
    are ready now. Checks run in a worker pool driven by one scheduler thread, which also runs
    the listen probes; a change of readiness calls ``notify`` so the register role reconciles
    again. ``check`` and ``probe`` replace how one check is run and how a probe is made (tests
    pass fakes); the timing arguments default to this module's constants.
    """

    def __init__(
        self,
        default: CheckSpec,
        target_of: Callable[[ServiceInstance], CheckTarget | None],
        notify: Callable[[str], None],
        *,
        workers: int = 16,
        check: CheckRun | None = None,
        probe: ProbeMaker | None = listen_probe,
        probe_interval: float = PROBE_INTERVAL,
        hold: float = HOLD,
        hold_max: float = HOLD_MAX,
        half_life: float = HALF_LIFE,
        hold_recheck: float = HOLD_RECHECK,
        detect: bool = False,
        detector: Detector | None = None,
        remembered: Mapping[str, Detected] | None = None,
    ) -> None:
        self.default = default
        self._target_of = target_of
        self._notify = notify
        self._run = check or self._run_check
        self._make_probe = probe if probe_interval > 0 else None
        self._probe_interval = probe_interval
        self._hold = hold
        self._hold_max = max(hold, hold_max)
        self._half_life = half_life
        self._hold_recheck = hold_recheck
        self._states: dict[str, _State] = {}
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="discoverd-check")
        self._detect = detect
        self._detector: Detector = detector or _detect
        self._remembered = dict(remembered or {})
        self._detect_pool = ThreadPoolExecutor(
            DETECT_WORKERS, thread_name_prefix="discoverd-detect"
        )
        self._detect_failed = False
        self._stopped = False
        self._next_probe = 0.0
        self._netns_failed = False
        self._probe_failed = False
        #: Counters for tests and benchmarks: checks run, probes asked, falls, readmissions,
        #: mode detections made.
        self.counts = {"checks": 0, "probes": 0, "fell": 0, "readmitted": 0, "detections": 0}
        self._results = {"ok": 0, "failed": 0}
        self._thread = threading.Thread(
            target=self._schedule, name="discoverd-register-checks", daemon=True
        )
        self._thread.start()

    def update(
        self,
        desired: Mapping[str, ServiceInstance],
        first_wait: float,
        check_all_within: float = 0.0,
    ) -> set[str]:
        """Track ``desired``; wait up to ``first_wait`` seconds for new instances to answer
        (a container usually listens within milliseconds of its start event, and registering
        it in this pass saves a whole round); return the ids of the ready ones."""
        now = time.monotonic()
        fresh: list[str] = []
        closing: list[LivenessProbe] = []
        with self._cond:
            for iid in list(self._states):
                if iid not in desired:
                    gone = self._states.pop(iid)
                    if gone.probe is not None:
                        closing.append(gone.probe)
            for iid, instance in desired.items():
                spec = spec_for(instance, self.default)
                state = self._states.get(iid)
                target = self._target_of(instance)
                if state is None or state.spec != spec or state.instance != instance:
                    kept = (
                        state is not None
                        and state.ready
                        and state.instance.endpoint == (instance.endpoint)
                    )
                    new = _State(instance, spec, target, ready=kept, checked=kept, due=now)
                    new.detect = self._wants_detection(instance, spec)
                    if state is not None:  # the damping outlives a change of metadata
                        new.penalty, new.penalty_at = state.penalty, state.penalty_at
                        new.hold = state.hold
                        if state.target == target:  # the same process: what it speaks
                            new.mode = state.mode
                        if state.probe is not None:
                            closing.append(state.probe)
                    elif new.detect:
                        new.mode = self._remembered.pop(iid, None)
                    if not new.detect:
                        new.mode = None
                    state = new
                    self._states[iid] = state
                    if spec.kind == "none":
                        state.ready = state.checked = True
                    elif not kept:
                        fresh.append(iid)
                elif state.target != target:
                    state.target = target
                    # Another process (a restart, its events late or missed): a new start, as
                    # when the events are read in time. What it speaks is found again, and
                    # the damping of the old process is forgotten.
                    state.mode, state.detect_tries, state.gone_noted = None, 0, False
                    state.hold = state.penalty = 0.0
                    state.passing_since, state.due, state.retry = None, now, NEW_RETRY
                    if state.probe is not None:  # made for the old target
                        closing.append(state.probe)
                        state.probe = None
            self._cond.notify_all()
            # Wait for the new instances to answer, up to ``first_wait``; and, with
            # ``check_all_within`` (the agent's first pass on a busy host), until each was
            # checked once, so they are registered in this pass rather than one at a time.
            deadline = now + first_wait
            hard_deadline = now + max(first_wait, check_all_within)
            while fresh and not self._stopped:
                states = [self._states[i] for i in fresh if i in self._states]
                unchecked = any(not st.checked for st in states)
                not_ready = any(not st.ready for st in states)
                now_ = time.monotonic()
                if unchecked and now_ < hard_deadline:
                    self._cond.wait(hard_deadline - now_)
                elif not_ready and now_ < deadline:
                    self._cond.wait(deadline - now_)
                else:
                    break
            ready = {iid for iid, state in self._states.items() if state.ready}
        for probe in closing:
            probe.close()
        return ready

    def modes(self) -> dict[str, Detected]:
        """The mode found for each instance whose mode was detected (see ``detect``)."""
        with self._cond:
            return {iid: st.mode for iid, st in self._states.items() if st.mode is not None}

    def _wants_detection(self, instance: ServiceInstance, spec: CheckSpec) -> bool:
        return (
            self._detect
            and spec.kind != "none"
            and not any(key == "mode" for key, _ in instance.meta)
        )

    def reason(self, iid: str) -> str:
        with self._cond:
            state = self._states.get(iid)
            return state.reason if state is not None else ""

    def results(self) -> dict[str, int]:
        """How many checks answered (``ok``) and how many did not (``failed``), so far."""
        with self._cond:
            return dict(self._results)

    def hold_of(self, iid: str) -> float:
        """How long the instance must answer in a row to be ready again (0: it is not held)."""
        with self._cond:
            state = self._states.get(iid)
            return state.hold if state is not None else 0.0

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            probes = [st.probe for st in self._states.values() if st.probe is not None]
            for state in self._states.values():
                state.probe = None
            self._cond.notify_all()
        self._thread.join(5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._detect_pool.shutdown(wait=False, cancel_futures=True)
        for probe in probes:
            probe.close()

    # -- the scheduler thread

    def _schedule(self) -> None:
        while True:
            probes: list[tuple[_State, LivenessProbe]] = []
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                next_due = now + 5.0
                probing = False
                for iid, state in self._states.items():
                    if state.running is not None or state.spec.kind == "none":
                        continue
                    if state.due <= now:
                        future = self._pool.submit(self._work, state)
                        state.running = future
                        # Runs ``_done`` here and now if the check already ended.
                        future.add_done_callback(functools.partial(self._done, iid, state))
                        if state.running is not None:
                            continue
                    next_due = min(next_due, state.due)
                    if state.ready and state.probe is not None:
                        probing = True
                        if self._next_probe <= now:
                            probes.append((state, state.probe))
                if probes:
                    self._next_probe = now + self._probe_interval
                elif probing:
                    next_due = min(next_due, self._next_probe)
                if not probes:
                    self._cond.wait(max(0.001, next_due - now))
                    continue
            # All due probes in one wake-up, outside the lock (each is a netlink exchange).
            answers = [(state, probe, self._ask(probe)) for state, probe in probes]
            with self._cond:
                self._probed(answers)

    def _ask(self, probe: LivenessProbe) -> bool | str:
        """The probe's answer, or why it could not give one."""
        try:
            return probe.listening()
        except OSError as exc:
            return exc.strerror or str(exc)

    def _probed(self, answers: list[tuple[_State, LivenessProbe, bool | str]]) -> None:
        """Apply probe answers (lock held): nothing listening counts as a failure, checked
        at once by a real check."""
        now = time.monotonic()
        for state, probe, answer in answers:
            self.counts["probes"] += 1
            current = self._states.get(state.instance.id) is state and state.probe is probe
            if not current or not state.ready or state.running is not None:
                continue
            if isinstance(answer, str):  # e.g. its namespace is gone: the checks will say
                log.debug("checks: %s: listen probe failed (%s)", state.instance.id, answer)
                probe.close()
                state.probe, state.probe_wanted = None, False
            elif not answer:
                state.failures += 1
                state.suspect = True
                state.reason = f"nothing listens on port {_port(state)}"
                state.due = now
        self._cond.notify_all()

    # -- the workers

    def _work(self, state: _State) -> tuple[str | None, LivenessProbe | None]:
        """One check; and, once the instance answers, its probe if it has none yet."""
        reason = self._run(state.instance, state.spec, state.target)
        probe: LivenessProbe | None = None
        make = self._make_probe
        if reason is None and make is not None and state.probe_wanted and state.probe is None:
            try:
                probe = make(state.instance, state.spec, state.target)
                if probe is not None and not probe.listening():
                    # The application answers, yet the probe sees no listener: it cannot
                    # read this one (an unusual binding); checks alone then.
                    probe.close()
                    probe, state.probe_wanted = None, False
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ESRCH):
                    return reason, None  # its process exited since: the next check says so
                if not self._probe_failed:
                    log.info(
                        "checks: listen probes unavailable (%s); checks only",
                        exc.strerror or exc,
                    )
                    self._probe_failed = True
                state.probe_wanted = False
        return reason, probe

    def _run_check(
        self, instance: ServiceInstance, spec: CheckSpec, target: CheckTarget | None
    ) -> str | None:
        forwarded = target is None
        if target is None:
            target = CheckTarget(instance.address, instance.port)
        try:
            return run_check(spec, target, forwarded=forwarded)
        except OSError as exc:
            if target.netns and exc.errno in (errno.ENOENT, errno.ESRCH):
                # The process the source named exited (the container stopped, or restarted
                # since): its published port may belong to another container by now.
                return f"{GONE} ({target.netns}): the container stopped or restarted"
            if target.netns and exc.errno in (errno.EPERM, errno.EACCES):
                # Not allowed to enter namespaces (not root): the published port, always.
                if not self._netns_failed:
                    log.warning(
                        "checks: cannot enter %s (%s); checking published ports instead",
                        target.netns,
                        exc.strerror,
                    )
                    self._netns_failed = True
                published = CheckTarget(instance.address, instance.port)
                return run_check(spec, published, forwarded=True)
            return exc.strerror or str(exc)

    def _done(
        self,
        iid: str,
        state: _State,
        future: Future[tuple[str | None, LivenessProbe | None]],
    ) -> None:
        probe: LivenessProbe | None = None
        try:
            reason, probe = future.result()
        except Exception as exc:  # a bug in a check must not stop the others
            reason = f"check failed: {type(exc).__name__}: {exc}"
        changed, detail = None, ""
        gone = False
        unused: list[LivenessProbe] = []
        with self._cond:
            state.running = None
            self.counts["checks"] += 1
            self._results["ok" if reason is None else "failed"] += 1
            if self._states.get(iid) is not state or self._stopped:
                if probe is not None:
                    unused.append(probe)  # gone or replaced meanwhile
            else:
                if probe is not None:
                    if state.probe is None and state.probe_wanted:
                        state.probe = probe
                    else:
                        unused.append(probe)
                changed, detail = self._judge(state, reason, unused)
                state.checked = True
                if reason is None:
                    self._start_detection(iid, state)
                elif reason.startswith(GONE) and not state.gone_noted:
                    state.gone_noted = True
                    gone = True
                self._cond.notify_all()
        for each in unused:
            each.close()
        if gone:  # a new snapshot names the current process, or drops the container
            self._notify(f"check target gone {iid}")
        if changed == "ready":
            log.info("checks: %s %s answers%s", state.instance.service, iid, detail)
            self._notify(f"check passed {iid}")
        elif changed == "not ready":
            log.warning(
                "checks: %s %s stopped answering: %s%s", state.instance.service, iid, reason, detail
            )
            self._notify(f"check failed {iid}")

    # -- mode detection

    def _start_detection(self, iid: str, state: _State) -> None:
        """After a good check (lock held): detect the mode, once, in the namespace only."""
        target = state.target
        if (
            not state.detect
            or state.mode is not None
            or state.detecting
            or self._stopped
            or target is None
            or not target.netns  # never through a published port (a forwarder's answer)
        ):
            return
        state.detecting = True
        timeout = state.spec.timeout
        future = self._detect_pool.submit(self._detector, target, timeout)
        future.add_done_callback(functools.partial(self._detected, iid, state, target))

    def _detected(
        self, iid: str, state: _State, target: CheckTarget, future: Future[Detected | None]
    ) -> None:
        if future.cancelled():  # at close
            return
        found: Detected | None = None
        problem: OSError | None = None
        try:
            found = future.result()
        except OSError as exc:
            problem = exc
        except Exception as exc:  # a bug must not stop the checks
            log.warning("checks: %s: mode detection failed: %s: %s", iid, type(exc).__name__, exc)
        with self._cond:
            state.detecting = False
            self.counts["detections"] += 1
            if self._states.get(iid) is not state or state.target != target or self._stopped:
                return  # gone, or another process since: its result says nothing now
            if problem is not None:
                if problem.errno in (errno.EPERM, errno.EACCES):
                    state.detect = False  # never on the published port
                    if not self._detect_failed:
                        log.info(
                            "checks: cannot enter %s (%s): modes are not detected",
                            target.netns,
                            problem.strerror,
                        )
                        self._detect_failed = True
                return  # ENOENT: the process is gone, the checks say so
            if found is None:
                state.detect_tries += 1
                if state.detect_tries < DETECT_TRIES:
                    return  # tried again after the next good check
                found = "tcp"  # never a byte back: it does not answer in HTTP
            state.mode = found
        log.info(
            "checks: %s %s speaks %s: %s mode unless labelled",
            state.instance.service,
            iid,
            "HTTP/1" if found == "http" else "something else than HTTP/1",
            found,
        )
        self._notify(f"mode detected {iid}")

    def _judge(
        self, state: _State, reason: str | None, unused: list[LivenessProbe]
    ) -> tuple[str | None, str]:
        """Apply one check's result (lock held): "ready", "not ready" or None (no change), and
        what the log says about the hold."""
        now = time.monotonic()
        suspect, state.suspect = state.suspect, False
        interval = state.spec.interval
        changed: str | None = None
        detail = ""
        if reason is None:
            state.reason = ""
            state.failures = 0
            if suspect:  # the probe found nothing, yet the application answers
                state.probe_misses += 1
                if state.probe is not None and state.probe_misses >= PROBE_MISTRUST:
                    log.debug("checks: %s: listen probe disagrees; checks only", state.instance.id)
                    unused.append(state.probe)
                    state.probe, state.probe_wanted = None, False
            if not state.ready:
                if state.passing_since is None:
                    state.passing_since = now
                passed = now - state.passing_since
                if passed >= state.hold:
                    if state.hold > 0:
                        detail = f" again, for {format_seconds(round(passed, 1))}s in a row"
                        self.counts["readmitted"] += 1
                    state.ready, state.hold = True, 0.0
                    changed = "ready"
                else:
                    state.due = now + min(self._hold_recheck, state.hold - passed)
            if state.ready:
                state.due = now + interval
                state.retry = FIRST_RETRY
                state.passing_since = None
            return changed, detail
        state.reason = reason
        if suspect:
            state.probe_misses = 0  # the probe was right
        state.failures += 1
        if reason.startswith(GONE):
            state.failures = max(state.failures, FALL)  # that process can never answer again
        state.passing_since = None
        if state.ready and state.failures >= FALL:
            state.ready = False
            changed = "not ready"
            self._fell(state, now)
            detail = f"; out until it answers for {format_seconds(round(state.hold, 1))}s in a row"
        if state.ready:
            state.due = now + min(interval, CONFIRM)
        else:
            state.due = now + min(state.retry, interval, NOT_READY_MAX)
            state.retry = min(state.retry * 2, NOT_READY_MAX)
        return changed, detail

    def _fell(self, state: _State, now: float) -> None:
        """A ready instance stopped answering: count the fall, set the hold."""
        faded = state.penalty * 0.5 ** ((now - state.penalty_at) / self._half_life)
        state.penalty, state.penalty_at = faded + 1.0, now
        state.hold = min(self._hold_max, self._hold * 2.0 ** (state.penalty - 1.0))
        state.retry = FIRST_RETRY
        self.counts["fell"] += 1


def _detect(target: CheckTarget, timeout: float) -> Detected | None:
    return detect_mode(target, timeout)


def _port(state: _State) -> int:
    return state.target.port if state.target is not None else state.instance.port
