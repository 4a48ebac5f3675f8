"""The reconcile loops, driven by in-memory fakes (the core's own logic only; the plugins are
tested against the real services)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from discoverd import (
    Catalog,
    Notify,
    Problem,
    Proxy,
    ProxyConfigError,
    Registry,
    Service,
    ServiceInstance,
    Source,
    SourceSnapshot,
    Unavailable,
)
from discoverd.core.discover import DiscoverRole
from discoverd.core.register import RegisterRole
from discoverd.core.scheduling import Backoff, Waker


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached")


def inst(n: int, service: str = "whoami") -> ServiceInstance:
    return ServiceInstance(
        service=service,
        id=f"h:c{n}:8000:tcp",
        address="127.0.0.1",
        port=30000 + n,
        frontend_port=8000,
    )


class FakeSource(Source):
    def __init__(self) -> None:
        self.instances: list[ServiceInstance] = []
        self.leaving: set[str] = set()
        self.fail = False
        self.notify: Notify | None = None

    def snapshot(self) -> SourceSnapshot:
        if self.fail:
            raise Unavailable("source down")
        return SourceSnapshot(instances=tuple(self.instances))

    def stopping(self) -> frozenset[str]:
        return frozenset(self.leaving)

    def watch(self, notify: Notify, stop: threading.Event) -> None:
        self.notify = notify
        stop.wait()


class FakeRegistry(Registry):
    def __init__(self) -> None:
        self.entries: dict[str, ServiceInstance] = {}
        self.down = False
        self.alive = True
        self.closed_with: bool | None = None
        self.writes = 0

    def _check(self) -> None:
        if self.down:
            raise Unavailable("registry down")

    def register(self, instance: ServiceInstance) -> None:
        self._check()
        self.writes += 1
        self.entries[instance.id] = instance

    def deregister(self, instance: ServiceInstance) -> None:
        self._check()
        self.entries.pop(instance.id, None)

    def keepalive(self) -> bool:
        self._check()
        alive, self.alive = self.alive, True
        return alive

    def keepalive_interval(self) -> float:
        return 0.05

    def snapshot(self) -> Catalog:
        self._check()
        return Catalog(instances=tuple(self.entries.values()), revision=1)

    def watch(self, notify: Notify, stop: threading.Event, since: int) -> None:
        stop.wait()

    def close(self, deregister: bool = False) -> None:
        self.closed_with = deregister
        if deregister:
            self.entries.clear()


class FakeProxy(Proxy):
    def __init__(self) -> None:
        self.applied: list[str] = []
        self.refuse = False

    def render(self, services: Sequence[Service]) -> str:
        return "".join(
            f"{s.name}:{s.frontend_port}={','.join(i.endpoint for i in s.instances)}\n"
            for s in services
        )

    def validate(self, config: str) -> None:
        if self.refuse:
            raise ProxyConfigError("bad line 3")

    def apply(self, config: str, services: Sequence[Service]) -> str:
        self.applied.append(config)
        return "reloaded"


def test_backoff_doubles_to_its_maximum_with_jitter_below_each_step() -> None:
    none = Backoff(1.0, random=lambda: 0.0)
    assert [round(none.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    none.reset()
    assert none.next() == pytest.approx(0.1)
    most = Backoff(1.0, random=lambda: 0.999)
    assert [round(most.next(), 3) for _ in range(5)] == [0.05, 0.1, 0.2, 0.4, 0.5]
    # Agents that failed together come back spread over the step, never later than it.
    firsts = [Backoff(10.0).next() for _ in range(200)]
    assert all(0.05 <= d <= 0.1 for d in firsts)
    assert max(firsts) - min(firsts) > 0.03
    fourths = [[b.next() for _ in range(4)][-1] for b in (Backoff(10.0) for _ in range(200))]
    assert all(0.4 <= d <= 0.8 for d in fourths) and max(fourths) - min(fourths) > 0.2


def test_waker_coalesces_a_burst() -> None:
    waker = Waker(min_wait=0.05, max_wait=1.0)
    stop = threading.Event()
    for n in range(50):
        waker.notify(f"e{n}")
    reasons = waker.wait(stop)
    assert reasons is not None and len(reasons) == 20  # capped, but one batch
    waker.retry_in(0.01)
    assert waker.wait(stop) == ["retry"]
    stop.set()
    assert waker.wait(stop) is None


@pytest.fixture
def register() -> Iterator[tuple[RegisterRole, FakeSource, FakeRegistry]]:
    source, registry = FakeSource(), FakeRegistry()
    role = RegisterRole(source, registry, min_wait=0.0, max_wait=0.01, retry_max=0.05)
    yield role, source, registry
    role.stop()


def test_register_follows_the_source(
    register: tuple[RegisterRole, FakeSource, FakeRegistry],
) -> None:
    role, source, registry = register
    source.instances = [inst(1), inst(2)]
    role.start()
    eventually(lambda: set(registry.entries) == {inst(1).id, inst(2).id})
    writes = registry.writes
    source.instances = [inst(2)]
    assert source.notify is not None
    source.notify("docker die")
    eventually(lambda: set(registry.entries) == {inst(2).id})
    assert registry.writes == writes  # the unchanged instance is not written again


def test_register_removes_what_the_source_says_is_stopping_while_still_listed(
    register: tuple[RegisterRole, FakeSource, FakeRegistry],
) -> None:
    role, source, registry = register
    source.instances = [inst(1), inst(2)]
    role.start()
    eventually(lambda: set(registry.entries) == {inst(1).id, inst(2).id})
    source.leaving = {inst(1).id}  # its stop signal was seen; the listing still has it
    assert source.notify is not None
    source.notify("docker kill")
    eventually(lambda: set(registry.entries) == {inst(2).id})
    source.leaving = set()  # it ignored the signal and runs on: routed again
    source.notify("hold over")
    eventually(lambda: set(registry.entries) == {inst(1).id, inst(2).id})


def test_register_reregisters_after_lost_entries(
    register: tuple[RegisterRole, FakeSource, FakeRegistry],
) -> None:
    role, source, registry = register
    source.instances = [inst(1)]
    role.start()
    eventually(lambda: inst(1).id in registry.entries)
    registry.entries.clear()  # the lease expired while the registry was away
    registry.alive = False
    eventually(lambda: inst(1).id in registry.entries)
    assert role.counters["reregistrations"] >= 1


def test_register_retries_when_the_registry_is_down(
    register: tuple[RegisterRole, FakeSource, FakeRegistry],
) -> None:
    role, source, registry = register
    registry.down = True
    source.instances = [inst(1)]
    role.start()
    eventually(lambda: role.counters["register_errors"] >= 2)
    registry.down = False
    eventually(lambda: inst(1).id in registry.entries)


def test_register_keeps_entries_while_the_source_is_down(
    register: tuple[RegisterRole, FakeSource, FakeRegistry],
) -> None:
    role, source, registry = register
    source.instances = [inst(1)]
    role.start()
    eventually(lambda: inst(1).id in registry.entries)
    source.fail = True
    assert source.notify is not None
    source.notify("docker reconnect")
    eventually(lambda: role.counters["register_errors"] >= 1)
    assert inst(1).id in registry.entries  # an unreadable source removes nothing


def test_register_shutdown_deregisters(
    register: tuple[RegisterRole, FakeSource, FakeRegistry],
) -> None:
    role, source, registry = register
    source.instances = [inst(1)]
    role.start()
    eventually(lambda: bool(registry.entries))
    role.shutdown(deregister=True)
    assert registry.closed_with is True and registry.entries == {}


def make_discover(registry: FakeRegistry, proxy: FakeProxy) -> DiscoverRole:
    return DiscoverRole(registry, proxy, min_wait=0.0, max_wait=0.01, retry_max=0.05)


def test_discover_applies_once_and_skips_unchanged() -> None:
    registry, proxy = FakeRegistry(), FakeProxy()
    registry.entries = {i.id: i for i in (inst(1), inst(2))}
    role = make_discover(registry, proxy)
    assert role.reconcile() == "applied"
    assert role.reconcile() == "unchanged"
    assert len(proxy.applied) == 1
    assert "127.0.0.1:30001,127.0.0.1:30002" in proxy.applied[0]


def test_discover_keeps_last_good_config_when_validation_fails() -> None:
    registry, proxy = FakeRegistry(), FakeProxy()
    registry.entries = {inst(1).id: inst(1)}
    role = make_discover(registry, proxy)
    role.reconcile()
    good = role.applied
    proxy.refuse = True
    registry.entries[inst(2).id] = inst(2)
    assert role.reconcile() == "rejected"
    assert role.applied == good and len(proxy.applied) == 1
    assert role.counters["validation_failures"] == 1
    assert role.reconcile() == "rejected"  # same candidate: not validated or logged again
    assert role.counters["validation_failures"] == 1


def test_discover_never_applies_an_empty_set_because_of_an_error() -> None:
    registry, proxy = FakeRegistry(), FakeProxy()
    registry.entries = {inst(1).id: inst(1)}
    role = make_discover(registry, proxy)
    role.start()
    try:
        eventually(lambda: len(proxy.applied) == 1)
        registry.down = True
        role.waker.notify("etcd watch reconnect")
        eventually(lambda: role.counters["discover_errors"] >= 2)
        assert len(proxy.applied) == 1  # nothing applied while the registry is unreachable
        registry.down = False
        registry.entries[inst(2).id] = inst(2)
        role.waker.notify("etcd watch")
        eventually(lambda: len(proxy.applied) == 2)
    finally:
        role.stop()


def test_discover_periodic_pass_hands_the_proxy_its_config_again() -> None:
    registry, proxy = FakeRegistry(), FakeProxy()
    registry.entries = {inst(1).id: inst(1)}
    role = make_discover(registry, proxy)
    role.reconcile()
    assert role.reconcile() == "unchanged" and len(proxy.applied) == 1
    assert role.reconcile(force_apply=True) == "unchanged"
    assert len(proxy.applied) == 2 and proxy.applied[1] == proxy.applied[0]


def test_discover_periodic_pass_is_scheduled() -> None:
    registry, proxy = FakeRegistry(), FakeProxy()
    registry.entries = {inst(1).id: inst(1)}
    role = DiscoverRole(
        registry, proxy, min_wait=0.0, max_wait=0.01, retry_max=0.05, resync_interval=0.05
    )
    role.start()
    try:
        eventually(lambda: len(proxy.applied) >= 3)  # no event at all after the start
        assert set(proxy.applied) == {proxy.applied[0]}
    finally:
        role.stop()


class FlakySource(FakeSource):
    def __init__(self) -> None:
        super().__init__()
        self.explode = 1

    def snapshot(self) -> SourceSnapshot:
        if self.explode:
            self.explode -= 1
            raise RuntimeError("a bug in a plugin")
        return super().snapshot()


def test_an_unexpected_error_does_not_stop_the_loop_until_the_next_event() -> None:
    source, registry = FlakySource(), FakeRegistry()
    source.instances = [inst(1)]
    role = RegisterRole(
        source, registry, min_wait=0.0, max_wait=0.01, retry_max=0.05, resync_interval=0
    )
    role.start()
    try:
        eventually(lambda: inst(1).id in registry.entries)  # retried without any new event
    finally:
        role.stop()


def test_agent_shutdown_leaves_the_proxy_with_this_hosts_instances() -> None:
    """Both roles in one process: the deregistration on the way out must not reach the proxy."""
    from discoverd.core.agent import Agent

    class WatchedRegistry(FakeRegistry):
        def __init__(self) -> None:
            super().__init__()
            self.watchers: list[Callable[[str], None]] = []

        def watch(self, notify: Callable[[str], None], stop: threading.Event, since: int) -> None:
            self.watchers.append(notify)
            stop.wait()

        def close(self, deregister: bool = False) -> None:
            super().close(deregister)
            if deregister:
                for notify in self.watchers:
                    notify("etcd watch")
                time.sleep(0.3)  # room for a discover role still running to act on it

    source, registry, proxy = FakeSource(), WatchedRegistry(), FakeProxy()
    source.instances = [inst(1)]
    register = RegisterRole(source, registry, min_wait=0.0, max_wait=0.01, retry_max=0.05)
    discover = DiscoverRole(registry, proxy, min_wait=0.0, max_wait=0.01, retry_max=0.05)
    agent = Agent(settings=None, manager=None)  # type: ignore[arg-type]
    agent.register, agent.discover = register, discover
    register.start()
    discover.start()
    eventually(lambda: bool(proxy.applied) and "30001" in proxy.applied[-1])
    eventually(lambda: bool(registry.watchers))
    agent.shutdown()
    assert registry.entries == {}  # deregistered
    assert "30001" in proxy.applied[-1]  # but the proxy still serves the instance


def test_waker_acts_at_once_on_a_lone_event_and_batches_the_burst_after_it() -> None:
    # A quiescence window far longer than the test: only the leading edge can return at once.
    waker = Waker(min_wait=60.0, max_wait=120.0, calm=5.0)
    stop = threading.Event()
    waker.notify("first")  # nothing happened before: a calm period
    first: list[list[str] | None] = []
    leading = threading.Thread(target=lambda: first.append(waker.wait(stop)), daemon=True)
    leading.start()
    leading.join(10)  # without the leading edge it would wait the 60 s window
    assert first == [["first"]]
    waker.notify("second")  # right after a pass: a burst, held for the window
    waker.notify("third")
    got: list[list[str] | None] = []
    waiter = threading.Thread(target=lambda: got.append(waker.wait(stop)), daemon=True)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and got == []  # still batching (the window is 60 s)
    stop.set()
    waker.wake_all()
    waiter.join(5)
    assert got == [None]


def test_waker_a_timers_pass_does_not_hold_the_next_lone_event() -> None:
    # A pass only a timer asked for (a resync, a write put off) says nothing about a burst: the
    # lone change right after it is still acted on at once, not after the 60 s window.
    waker = Waker(min_wait=60.0, max_wait=120.0, calm=5.0)
    stop = threading.Event()
    waker.retry_in(0.0, "keep the served set")
    assert waker.wait(stop) == ["keep the served set"]
    waker.notify("docker start")
    got: list[list[str] | None] = []
    waiter = threading.Thread(target=lambda: got.append(waker.wait(stop)), daemon=True)
    waiter.start()
    waiter.join(10)
    assert got == [["docker start"]]
    # A pass that acted on events still starts a calm period: what follows it is batched.
    waker.notify("check passed")
    waiter = threading.Thread(target=lambda: got.append(waker.wait(stop)), daemon=True)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and got == [["docker start"]]
    stop.set()
    waker.wake_all()
    waiter.join(5)
    assert got == [["docker start"], None]


def test_register_hands_many_new_instances_over_at_once() -> None:
    class Batching(FakeRegistry):
        def __init__(self) -> None:
            super().__init__()
            self.batches: list[int] = []

        def register_many(self, instances: Sequence[ServiceInstance]) -> None:
            self.batches.append(len(instances))
            super().register_many(instances)

    source, registry = FakeSource(), Batching()
    role = RegisterRole(source, registry, min_wait=0.0, max_wait=0.01, retry_max=0.05)
    source.instances = [inst(n) for n in range(5)]
    role.reconcile()
    assert registry.batches == [5] and len(registry.entries) == 5
    source.instances = [inst(n) for n in range(6)]
    role.reconcile()  # one new instance: a plain register
    assert registry.batches == [5] and len(registry.entries) == 6


def test_register_reports_the_registrys_conflicts_once(
    register: tuple[RegisterRole, FakeSource, FakeRegistry],
    caplog: pytest.LogCaptureFixture,
) -> None:
    role, source, registry = register
    source.instances = [inst(1)]
    clash = Problem("service whoami", "frontend port 8000 is claimed by service web", "whoami")
    registry.conflicts = lambda: [clash]  # type: ignore[method-assign]
    with caplog.at_level("WARNING", "discoverd"):
        role.reconcile()
        role.reconcile()
    assert [r.getMessage() for r in caplog.records].count(str(clash)) == 1
    assert inst(1).id in registry.entries  # the instance itself is still registered
