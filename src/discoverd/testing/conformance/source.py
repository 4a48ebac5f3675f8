"""The source contract, :class:`SourceContract`: subclass it in a test module (see
:mod:`discoverd.testing.conformance` for the outline).

Fixtures the subclass provides:

``make_source`` (required) -> :class:`SourceFactory`
    ``make_source()`` returns a *new* ``Source`` object of the plugin, watching the host where
    ``workloads`` starts its workloads. The kit closes each source it made at teardown.

``workloads`` (required) -> :class:`Workloads`
    Starts and stops real workloads (containers) on that host: ``start()`` starts one that
    publishes one TCP port and returns a handle; ``owns(handle, instance)`` says whether an
    instance of a snapshot belongs to it; ``begin_stop(handle)`` sends it the signal a stop
    sends first (``docker stop``'s TERM) and returns at once, the workload then taking a few
    seconds (at least ``stop_grace``) to exit; ``running(handle)`` says whether it still runs;
    ``remove(handle)`` removes it at once. The fixture removes what is left at teardown.

Class attributes (seconds):

``propagation_timeout = 20.0``  Deadline for a change to show in a snapshot or a watch.
``watch_stop_timeout = 10.0``   Deadline for ``watch`` to return once ``stop`` is set or the
                         source is closed.
``knows_stopping = True``       Whether the source can tell a stopping workload before it exits
                         (``Source.stopping``); with False, that check is skipped with a reason.
``stop_grace = 3.0``     How long a workload keeps running after ``begin_stop`` (at least).

The checks (each a test method):

- ``test_snapshot_lists_a_started_workload``: a started workload shows in a snapshot within
  ``propagation_timeout``, and a removed one leaves it.
- ``test_stopping_names_only_instances_of_the_snapshot``: ``stopping()`` holds only ids the last
  snapshot listed, and none of a workload nobody stopped.
- ``test_a_stop_signal_is_named_before_the_workload_exits``: after ``begin_stop`` and while the
  workload still runs, its instances are named by ``stopping()`` (or gone from the snapshot):
  the register role then deregisters them before the process exits, and the proxies drain
  them. ``stopping()`` forgets them once they are gone.
- ``test_watch_notifies_starts_and_stops``: a running watch calls ``notify`` when a workload
  starts and when it is removed, and returns promptly once ``stop`` is set.
- ``test_close_unblocks_watch``: ``close()`` makes a blocked ``watch`` return (or raise).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, ClassVar, Protocol

import pytest

from discoverd import ServiceInstance, Source
from discoverd.testing.conformance.common import _missing


class SourceFactory(Protocol):
    """``make_source()``: a new source object of the plugin."""

    def __call__(self) -> Source: ...


class Workloads(Protocol):
    """Real workloads (containers) on the host a :class:`SourceContract` run watches."""

    def start(self) -> Any:
        """Start a workload publishing one TCP port; return a handle for the other methods."""

    def owns(self, workload: Any, instance: ServiceInstance) -> bool:
        """Whether ``instance`` (of a snapshot) belongs to ``workload``."""

    def begin_stop(self, workload: Any) -> None:
        """Send the first signal of a stop and return at once; the workload exits later."""

    def running(self, workload: Any) -> bool:
        """Whether the workload still runs."""

    def remove(self, workload: Any) -> None:
        """Remove the workload at once (whatever its state)."""


class _Sources:
    def __init__(self, factory: SourceFactory) -> None:
        self._factory = factory
        self._open: list[Source] = []

    def new(self) -> Source:
        source = self._factory()
        if not isinstance(source, Source):
            pytest.fail(f"make_source returned {source!r}, not a discoverd Source")
        self._open.append(source)
        return source

    def close_all(self) -> None:
        for source in reversed(self._open):
            with contextlib.suppress(Exception):
                source.close()
        self._open.clear()


class _SourceWatch:
    """``source.watch`` in a thread, recording notifications and how it ended."""

    def __init__(self, source: Source) -> None:
        self.stop = threading.Event()
        self.notified = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(source,), name="contract-source-watch", daemon=True
        )
        self.thread.start()

    def _notify(self, reason: str, services: Collection[str] | None = None) -> None:
        self.notified.set()

    def _run(self, source: Source) -> None:
        try:
            source.watch(self._notify, self.stop)
        except BaseException as exc:
            self.error = exc

    def ended(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


class SourceContract:
    """The contract every source plugin passes; see the module docstring for how to use it."""

    propagation_timeout: ClassVar[float] = 20.0
    watch_stop_timeout: ClassVar[float] = 10.0
    knows_stopping: ClassVar[bool] = True
    stop_grace: ClassVar[float] = 3.0

    # -- fixtures a subclass provides ------------------------------------------------------

    @pytest.fixture
    def make_source(self) -> SourceFactory:
        _missing("SourceContract", "make_source", "make_source() returning a new Source")

    @pytest.fixture
    def workloads(self) -> Workloads:
        _missing(
            "SourceContract",
            "workloads",
            "start(), owns(w, instance), begin_stop(w), running(w) and remove(w) on the host "
            "the sources watch",
        )

    # -- the kit's own fixtures ------------------------------------------------------------

    @pytest.fixture
    def contract_sources(self, make_source: SourceFactory) -> Iterator[_Sources]:
        pool = _Sources(make_source)
        yield pool
        pool.close_all()

    # -- helpers ---------------------------------------------------------------------------

    def until(self, check: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        timeout = self.propagation_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() >= deadline:
                pytest.fail(f"after {timeout:g}s still waiting for {what}", pytrace=False)
            time.sleep(0.05)

    @staticmethod
    def instances_of(source: Source, workloads: Workloads, workload: Any) -> list[ServiceInstance]:
        return [i for i in source.snapshot().instances if workloads.owns(workload, i)]

    # -- the checks ------------------------------------------------------------------------

    def test_snapshot_lists_a_started_workload(
        self, contract_sources: _Sources, workloads: Workloads
    ) -> None:
        source = contract_sources.new()
        workload = workloads.start()
        self.until(
            lambda: bool(self.instances_of(source, workloads, workload)),
            "the started workload's instance in a snapshot",
        )
        workloads.remove(workload)
        self.until(
            lambda: not self.instances_of(source, workloads, workload),
            "the removed workload to leave the snapshot",
        )

    def test_stopping_names_only_instances_of_the_snapshot(
        self, contract_sources: _Sources, workloads: Workloads
    ) -> None:
        source = contract_sources.new()
        workload = workloads.start()
        self.until(
            lambda: bool(self.instances_of(source, workloads, workload)),
            "the started workload's instance in a snapshot",
        )
        snapshot = source.snapshot()
        listed = {i.id for i in snapshot.instances}
        stopping = source.stopping()
        assert isinstance(stopping, frozenset), f"stopping() returned {stopping!r}, not a frozenset"
        assert stopping <= listed, (
            f"stopping() names ids the snapshot does not list: {sorted(stopping - listed)}"
        )
        ours = {i.id for i in snapshot.instances if workloads.owns(workload, i)}
        assert not (ours & stopping), (
            f"stopping() names {sorted(ours & stopping)} of a workload nobody stopped"
        )

    def test_a_stop_signal_is_named_before_the_workload_exits(
        self, contract_sources: _Sources, workloads: Workloads
    ) -> None:
        if not self.knows_stopping:
            pytest.skip(
                f"{type(self).__name__}.knows_stopping is False: the source cannot tell a "
                "stopping workload before it exits (its instances are then not drained)"
            )
        source = contract_sources.new()
        run = _SourceWatch(source)
        try:
            workload = workloads.start()
            self.until(
                lambda: bool(self.instances_of(source, workloads, workload)),
                "the started workload's instance in a snapshot",
            )
            ids = {i.id for i in self.instances_of(source, workloads, workload)}
            started = time.monotonic()
            workloads.begin_stop(workload)

            def named() -> bool:
                listed = {i.id for i in self.instances_of(source, workloads, workload)}
                return not (listed - source.stopping())

            deadline = started + self.stop_grace
            while not named():
                if time.monotonic() >= deadline or not workloads.running(workload):
                    break
                time.sleep(0.05)
            assert named(), (
                f"{time.monotonic() - started:.1f}s after its stop signal the workload "
                f"(running: {workloads.running(workload)}) is still listed and not named by "
                f"stopping() ({sorted(ids)}): it would be routed until it exits"
            )
            assert workloads.running(workload), (
                f"the workload exited within {self.stop_grace:g}s of its stop signal: the "
                "Workloads fixture must give stop_grace seconds (raise stop_grace or slow it)"
            )
            workloads.remove(workload)

            def forgotten() -> bool:
                listed = self.instances_of(source, workloads, workload)  # snapshot first,
                return not listed and not (ids & source.stopping())  # as the core reads them

            self.until(forgotten, "the removed workload to leave both the snapshot and stopping()")
        finally:
            run.stop.set()
            run.ended(self.watch_stop_timeout)

    def test_watch_notifies_starts_and_stops(
        self, contract_sources: _Sources, workloads: Workloads
    ) -> None:
        source = contract_sources.new()
        run = _SourceWatch(source)
        try:
            time.sleep(0.5)  # notifications before the change do not count
            run.notified.clear()
            workload = workloads.start()
            assert run.notified.wait(self.propagation_timeout), (
                f"watch did not call notify within {self.propagation_timeout:g}s of a start"
            )
            self.until(
                lambda: bool(self.instances_of(source, workloads, workload)),
                "the started workload's instance in a snapshot",
            )
            time.sleep(0.3)
            run.notified.clear()
            workloads.remove(workload)
            assert run.notified.wait(self.propagation_timeout), (
                f"watch did not call notify within {self.propagation_timeout:g}s of a removal"
            )
            run.stop.set()
            assert run.ended(self.watch_stop_timeout), (
                f"watch did not return within {self.watch_stop_timeout:g}s of stop being set"
            )
            assert run.error is None, f"watch raised after stop was set: {run.error!r}"
        finally:
            run.stop.set()

    def test_close_unblocks_watch(self, contract_sources: _Sources) -> None:
        source = contract_sources.new()
        run = _SourceWatch(source)
        try:
            time.sleep(0.5)
            assert not run.ended(0), "watch ended with nothing to do"
            source.close()
            assert run.ended(self.watch_stop_timeout), (
                f"watch was still blocked {self.watch_stop_timeout:g}s after close()"
            )
        finally:
            run.stop.set()
