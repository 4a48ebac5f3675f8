"""The discover role's fault isolation and its hold on instances the registry lost at once,
driven by in-memory fakes (the core's own logic; the real proxies and registries have their own
tests, and tests/faults/ runs it all for real)."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path

from discoverd import PluginError, ProxyConfigError, Service, ServiceInstance
from discoverd.core.discover import DiscoverRole, ServedTexts, read_served, write_served
from discoverd.core.holding import Holds
from tests.core.test_agent import FakeProxy, FakeRegistry, eventually


def inst(service: str, n: int, frontend: int = 8000, host: str = "h") -> ServiceInstance:
    return ServiceInstance(
        service, f"{host}:{service}{n}:80:tcp", "127.0.0.1", 30000 + n, "tcp", frontend,
        host_id=host,
    )  # fmt: skip


class PickyProxy(FakeProxy):
    """Refuses to validate a config naming a service in ``invalid``; cannot serve ``blocked``;
    its apply fails while ``apply_refuses`` names a service of the candidate."""

    def __init__(self) -> None:
        super().__init__()
        self.invalid: set[str] = set()
        self.blocked: dict[str, str] = {}
        self.apply_refuses: set[str] = set()
        self.validations = 0

    def validate(self, config: str) -> None:
        self.validations += 1
        reason = self.refusal(config)
        if reason:
            raise ProxyConfigError(reason)

    def refusal(self, config: str) -> str:
        """What its checker says of ``config`` (empty: accepted)."""
        bad = sorted(name for name in self.invalid if f"{name}:" in config)
        return f"server of {bad[0]} already defined" if bad else ""

    def unservable(self, services: Sequence[Service]) -> dict[str, str]:
        return {s.name: self.blocked[s.name] for s in services if s.name in self.blocked}

    def apply(self, config: str, services: Sequence[Service]) -> str:
        if any(s.name in self.apply_refuses for s in services):
            self.apply_refuses = set()
            self.blocked.update({"late": "port taken meanwhile"})
            raise PluginError("HAProxy could not load the new configuration")
        return super().apply(config, services)


def names(config: str | None) -> list[str]:
    return [line.split(":")[0] for line in (config or "").splitlines()]


def role_for(registry: FakeRegistry, proxy: FakeProxy, **kwargs: object) -> DiscoverRole:
    return DiscoverRole(
        registry,
        proxy,
        min_wait=0.0,
        max_wait=0.01,
        retry_max=0.05,
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_service_the_proxy_cannot_serve_is_left_out_and_comes_back() -> None:
    registry, proxy = FakeRegistry(), PickyProxy()
    registry.entries = {i.id: i for i in (inst("a", 1), inst("b", 2, 8001), inst("c", 3, 8002))}
    proxy.blocked = {"b": "frontend port 8001 is held by another process"}
    role = role_for(registry, proxy)
    assert role.reconcile() == "applied"
    assert names(role.applied) == ["a", "c"]
    assert role.excluded == {"b": "frontend port 8001 is held by another process"}
    role.start()
    try:
        proxy.blocked = {}  # the other process let the port go
        eventually(lambda: names(role.applied) == ["a", "b", "c"])  # on its own, no event
        assert role.excluded == {}
    finally:
        role.stop()


def test_a_validation_failure_is_narrowed_to_the_services_that_cause_it() -> None:
    registry, proxy = FakeRegistry(), PickyProxy()
    good = [inst(name, n, 8000 + n) for n, name in enumerate("abcdefgh")]
    registry.entries = {i.id: i for i in good}
    role = role_for(registry, proxy)
    role.reconcile()
    proxy.invalid = {"dup", "bad"}  # e.g. two nodes registering one server name
    for new in (inst("dup", 20, 9000), inst("bad", 21, 9001), inst("new", 22, 9002)):
        registry.entries[new.id] = new
    assert role.reconcile() == "applied"
    assert "dup" not in names(role.applied) and "bad" not in names(role.applied)
    assert {"a", "h", "new"} <= set(names(role.applied))
    assert set(role.excluded) == {"dup", "bad"} and "already defined" in role.excluded["dup"]
    checked = proxy.validations
    assert role.reconcile() == "unchanged" and proxy.validations == checked  # not bisected again
    proxy.invalid = {"bad"}  # the cause went away, and dup changed: judged again
    registry.entries[inst("dup", 23, 9000).id] = inst("dup", 23, 9000)
    role.reconcile()
    assert "dup" in names(role.applied) and set(role.excluded) == {"bad"}


def test_a_refused_apply_is_retried_without_what_the_proxy_names_then() -> None:
    registry, proxy = FakeRegistry(), PickyProxy()
    registry.entries = {i.id: i for i in (inst("a", 1), inst("late", 2, 8001))}
    proxy.apply_refuses = {"late"}  # passes the probe, then fails to bind at the reload
    role = role_for(registry, proxy)
    assert role.reconcile() == "applied"
    assert names(role.applied) == ["a"] and "late" in role.excluded


class SelfCheckingProxy(PickyProxy):
    """Asks for no check before a first start (``Proxy.needs_check``): its start refuses what
    ``validate`` would refuse, and leaves nothing running then."""

    def __init__(self) -> None:
        super().__init__()
        self.running = False
        self.starts = 0

    def needs_check(self, config: str) -> bool:
        return self.running

    def apply(self, config: str, services: Sequence[Service]) -> str:
        if not self.running:
            self.starts += 1
            reason = self.refusal(config)
            if reason:
                raise PluginError(f"did not start: {reason}")
            self.running = True
        return super().apply(config, services)


def test_a_first_start_that_checks_itself_is_not_validated_twice() -> None:
    registry, proxy = FakeRegistry(), SelfCheckingProxy()
    registry.entries = {i.id: i for i in (inst("a", 1), inst("b", 2, 8001))}
    role = role_for(registry, proxy)
    assert role.reconcile() == "applied"
    assert (proxy.validations, proxy.starts) == (0, 1)  # the start was the only check
    registry.entries[inst("c", 3, 8002).id] = inst("c", 3, 8002)
    role.reconcile()
    assert proxy.validations == 1  # it runs now: every candidate is checked


def test_a_refused_first_start_is_checked_and_narrowed() -> None:
    registry, proxy = FakeRegistry(), SelfCheckingProxy()
    registry.entries = {i.id: i for i in (inst("a", 1), inst("bad", 2, 8001), inst("c", 3, 8002))}
    proxy.invalid = {"bad"}
    role = role_for(registry, proxy)
    assert role.reconcile() == "applied"
    assert names(role.applied) == ["a", "c"]
    assert "already defined" in role.excluded["bad"]
    assert proxy.starts == 2 and proxy.validations > 0


def hold_role(
    registry: FakeRegistry, proxy: FakeProxy, answers: set[str], **kw: object
) -> DiscoverRole:
    role = role_for(registry, proxy, removal_hold=30.0, **kw)
    role.holds = Holds(
        30.0, role.waker.notify, probe=lambda i: None if i.id in answers else "refused"
    )
    return role


def test_instances_lost_at_once_are_held_while_they_answer() -> None:
    registry, proxy = FakeRegistry(), FakeProxy()
    web = [inst("web", n) for n in (1, 2, 3)]
    registry.entries = {i.id: i for i in web}
    answers = {i.id for i in web}
    role = hold_role(registry, proxy, answers)
    role.reconcile()
    registry.entries = {}  # every lease expired while the registry was away
    assert role.reconcile() == "unchanged"  # nothing taken away: they still answer
    assert {i.id for i in role.holds.held()} == answers
    registry.entries = {web[0].id: web[0]}  # registered again, one by one
    role.reconcile()
    assert {i.id for i in role.holds.held()} == {web[1].id, web[2].id}
    answers.discard(web[2].id)  # that host really died
    role.start()
    try:
        eventually(lambda: "30003" not in (proxy.applied[-1] if proxy.applied else ""))
        assert "30001" in proxy.applied[-1] and "30002" in proxy.applied[-1]
    finally:
        role.stop()


def test_an_ordinary_removal_is_not_held() -> None:
    registry, proxy = FakeRegistry(), FakeProxy()
    web = [inst("web", n) for n in (1, 2)]
    registry.entries = {i.id: i for i in web}
    role = hold_role(registry, proxy, {i.id for i in web})
    role.reconcile()
    del registry.entries[web[1].id]  # docker stop of one of two
    assert role.reconcile() == "applied"
    assert "30002" not in (role.applied or "") and role.holds.held() == []


def test_a_restarted_agent_holds_what_it_served_before(tmp_path: Path) -> None:
    served = tmp_path / "discover" / "served.json"
    registry, proxy = FakeRegistry(), FakeProxy()
    web = [inst("web", n) for n in (1, 2)]
    registry.entries = {i.id: i for i in web}
    first = hold_role(registry, proxy, {i.id for i in web}, served_file=served)
    first.reconcile()
    first.shutdown()
    assert served.exists()
    registry.entries = {}  # killed; restarted after its TTL: its entries expired
    second = hold_role(registry, FakeProxy(), {i.id for i in web}, served_file=served)
    assert second.reconcile() == "applied"
    assert "127.0.0.1:30001,127.0.0.1:30002" in (second.applied or "")  # not an empty apply


def test_holds_release_what_fails_its_probe_and_do_not_take_it_back() -> None:
    events: list[str] = []
    answering = {"h:web1:80:tcp"}
    holds = Holds(30.0, events.append, probe=lambda i: None if i.id in answering else "refused")
    web = {"web": (inst("web", 1), inst("web", 2))}
    kept = holds.update(web, [])
    assert {i.id for i in kept} == {"h:web1:80:tcp", "h:web2:80:tcp"}
    deadline = time.monotonic() + 5
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events, "a failed probe must wake the discover role"
    served_after = {"web": tuple(holds.update(web, []))}
    assert {i.id for i in served_after["web"]} == {"h:web1:80:tcp"}
    assert {i.id for i in holds.update(web, [])} == {"h:web1:80:tcp"}  # not held again
    assert holds.update(web, [], now=time.monotonic() + 31) == []  # the hold is over
    holds.close()


def test_a_hold_of_zero_turns_it_off() -> None:
    holds = Holds(0.0, lambda _: None, probe=lambda _: None)
    assert holds.update({"web": (inst("web", 1),)}, []) == []
    holds.close()


def applied_has(proxy: FakeProxy, text: str) -> bool:
    return bool(proxy.applied) and text in proxy.applied[-1]


def test_the_last_served_set_is_kept_even_when_changes_come_quickly(tmp_path: Path) -> None:
    """Writes are rate-limited, but the last state must reach the file without another change
    and without a clean shutdown (an agent killed with SIGKILL writes nothing on the way out)."""
    served = tmp_path / "discover" / "served.json"
    registry, proxy = FakeRegistry(), FakeProxy()
    role = hold_role(registry, proxy, set(), served_file=served)
    role.start()
    try:
        for n in (1, 2, 3):  # three applies well within one write period
            registry.entries[inst("web", n).id] = inst("web", n)
            role.waker.notify("etcd watch")
            eventually(functools.partial(applied_has, proxy, f"3000{n}"))
        eventually(lambda: served.exists() and "30003" in served.read_text(), timeout=6)
    finally:
        role.stop()  # not shutdown(): as if killed, nothing written on the way out


def test_the_served_file_reuses_the_text_of_unchanged_services(tmp_path: Path) -> None:
    """A write with the last write's texts encodes only the services that changed, and the
    file reads back the same as a write from scratch."""
    path, fresh = tmp_path / "served.json", tmp_path / "fresh.json"
    web = Service("web", 8000, instances=(inst("web", 1), inst("web", 2)))
    api = Service("api", 8001, instances=(inst("api", 3, 8001),))
    empty = Service("nobody", 8002)
    texts: ServedTexts = {}
    write_served(path, [api, empty, web], texts)
    assert set(texts) == {"api", "nobody", "web"} and texts["nobody"][1] == ""
    api_text = texts["api"][1]
    moved = Service("web", 8000, instances=(inst("web", 1), inst("web", 4)))
    write_served(path, [api, empty, moved], texts)
    assert texts["api"][1] is api_text  # not encoded again
    assert "30004" in texts["web"][1] and "30002" not in texts["web"][1]
    write_served(fresh, [api, empty, moved])
    assert path.read_text() == fresh.read_text()
    assert read_served(path) == {"api": (inst("api", 3, 8001),), "web": moved.instances}
    write_served(path, [empty], texts)  # services gone are forgotten
    assert set(texts) == {"nobody"} and read_served(path) == {}
