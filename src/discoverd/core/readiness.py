"""Ready before routed: the register role checks an instance before it registers it.

Like nerve, discoverd registers an instance only once its application answers, and keeps
checking it: an instance that stops answering leaves the registry, one that answers again
returns. :class:`Readiness` keeps every wanted instance checked (one scheduler thread, a worker
pool) and says which are ready; how one check is made is :mod:`discoverd.core.checks`.
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

from discoverd.core.checks import CheckSpec, run_check, spec_for
from discoverd.core.interfaces import CheckTarget
from discoverd.core.model import ServiceInstance

log = logging.getLogger("discoverd.checks")


#: A ready instance leaves after this many failed checks in a row (one failure may be a blip).
FALL = 2
#: While an instance has never been ready, checks repeat at least this often (a slow starter
#: becomes routable within this long of listening), starting fast and doubling.
FIRST_RETRY = 0.02
NOT_READY_MAX = 0.5
#: The longest the register role's first pass waits for the first check of every instance.
FIRST_PASS_MAX = 3.0


@dataclass
class _State:
    instance: ServiceInstance
    spec: CheckSpec
    target: CheckTarget | None
    ready: bool = False
    checked: bool = False
    failures: int = 0
    due: float = 0.0
    retry: float = FIRST_RETRY
    running: Future[str | None] | None = None
    reason: str = ""


class Readiness:
    """Checks the instances the register role wants, and says which are ready.

    ``update`` hands over the desired instances after each snapshot and returns the ids that
    are ready now. Checks run in a worker pool driven by one scheduler thread; a change of
    readiness calls ``notify`` so the register role reconciles again.
    """

    def __init__(
        self,
        default: CheckSpec,
        target_of: Callable[[ServiceInstance], CheckTarget | None],
        notify: Callable[[str], None],
        *,
        workers: int = 16,
    ) -> None:
        self.default = default
        self._target_of = target_of
        self._notify = notify
        self._states: dict[str, _State] = {}
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="discoverd-check")
        self._stopped = False
        self._thread = threading.Thread(
            target=self._schedule, name="discoverd-register-checks", daemon=True
        )
        self._thread.start()
        self._netns_failed = False
        self._results = {"ok": 0, "failed": 0}

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
        with self._cond:
            for iid in list(self._states):
                if iid not in desired:
                    del self._states[iid]
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
                    state = _State(instance, spec, target, ready=kept, checked=kept, due=now)
                    self._states[iid] = state
                    if spec.kind == "none":
                        state.ready = state.checked = True
                    elif not kept:
                        fresh.append(iid)
                else:
                    state.target = target
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
            return {iid for iid, state in self._states.items() if state.ready}

    def reason(self, iid: str) -> str:
        with self._cond:
            state = self._states.get(iid)
            return state.reason if state is not None else ""

    def results(self) -> dict[str, int]:
        """How many checks answered (``ok``) and how many did not (``failed``), so far."""
        with self._cond:
            return dict(self._results)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _schedule(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                next_due = now + 5.0
                for iid, state in self._states.items():
                    if state.running is not None or state.spec.kind == "none":
                        continue
                    if state.due <= now:
                        future = self._pool.submit(self._check, state)
                        state.running = future
                        future.add_done_callback(functools.partial(self._done, iid, state))
                    else:
                        next_due = min(next_due, state.due)
                self._cond.wait(max(0.001, next_due - now))

    def _check(self, state: _State) -> str | None:
        target = state.target
        forwarded = target is None
        if target is None:
            target = CheckTarget(state.instance.address, state.instance.port)
        try:
            return run_check(state.spec, target, forwarded=forwarded)
        except OSError as exc:
            if target.netns and exc.errno in (errno.EPERM, errno.ENOENT, errno.EACCES):
                if not self._netns_failed:
                    log.warning(
                        "checks: cannot enter %s (%s); checking published ports instead",
                        target.netns,
                        exc.strerror,
                    )
                    self._netns_failed = True
                published = CheckTarget(state.instance.address, state.instance.port)
                return run_check(state.spec, published, forwarded=True)
            return exc.strerror or str(exc)

    def _done(self, iid: str, state: _State, future: Future[str | None]) -> None:
        try:
            reason = future.result()
        except Exception as exc:  # a bug in a check must not stop the others
            reason = f"check failed: {type(exc).__name__}: {exc}"
        changed = None
        with self._cond:
            self._results["ok" if reason is None else "failed"] += 1
            state.running = None
            if self._states.get(iid) is not state:
                return  # gone or replaced meanwhile
            now = time.monotonic()
            state.reason = reason or ""
            if reason is None:
                state.failures = 0
                if not state.ready:
                    changed = "ready"
                state.ready = True
                state.due = now + state.spec.interval
            else:
                state.failures += 1
                if state.ready and state.failures >= FALL:
                    state.ready = False
                    changed = "not ready"
                if state.ready:
                    state.due = now + min(state.spec.interval, 0.5)
                else:
                    state.due = now + min(state.retry, state.spec.interval, NOT_READY_MAX)
                    state.retry = min(state.retry * 2, NOT_READY_MAX)
            state.checked = True
            self._cond.notify_all()
        if changed == "ready":
            log.info("checks: %s %s answers", state.instance.service, iid)
            self._notify(f"check passed {iid}")
        elif changed == "not ready":
            log.warning("checks: %s %s stopped answering: %s", state.instance.service, iid, reason)
            self._notify(f"check failed {iid}")
