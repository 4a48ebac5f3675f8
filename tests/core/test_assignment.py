from discoverd.core.assignment import ServiceCache, build_services
from discoverd.core.model import Catalog, Problem, ServiceInstance


def inst(service: str, n: int, frontend: int | None = 8000, **kw: object) -> ServiceInstance:
    return ServiceInstance(
        service=service,
        id=f"h:{service}{n}:8000:tcp",
        address="127.0.0.1",
        port=30000 + n,
        frontend_port=frontend,
        **kw,  # type: ignore[arg-type]
    )


def test_groups_and_sorts_deterministically() -> None:
    a = [inst("b", 2, 9000), inst("a", 1), inst("b", 1, 9000)]
    one = build_services(Catalog(instances=tuple(a)))
    two = build_services(Catalog(instances=tuple(reversed(a))))
    assert one.services == two.services
    assert [s.name for s in one.services] == ["a", "b"]
    assert [i.port for i in one.services[1].instances] == [30001, 30002]


def test_port_conflict_first_keeps_it() -> None:
    catalog = Catalog(instances=(inst("zeta", 1), inst("alpha", 2)))
    first = build_services(catalog, previous_owners={8000: "zeta"})
    assert [s.name for s in first.services] == ["zeta"]
    assert any(
        "alpha" in p.subject and "taken by service zeta" in p.message for p in first.problems
    )
    fresh = build_services(catalog)
    assert [s.name for s in fresh.services] == ["alpha"]


def test_reserved_port_and_missing_port() -> None:
    catalog = Catalog(
        instances=(inst("stats", 1, 1936), inst("noport", 2, None), inst("ok", 3, 8000)),
        problems=(Problem("key /backends/x/1", "bad"),),
    )
    result = build_services(catalog, reserved_ports={1936})
    assert [s.name for s in result.services] == ["ok"]
    text = " | ".join(str(p) for p in result.problems)
    assert "reserved" in text and "no frontend port" in text and "/backends/x/1" in text


def test_mode_from_metadata_or_default() -> None:
    catalog = Catalog(instances=(inst("a", 1, meta=(("mode", "http"),)), inst("b", 2, 9000)))
    services = {s.name: s for s in build_services(catalog, default_mode="tcp").services}
    assert services["a"].mode == "http" and services["b"].mode == "tcp"


def test_frontend_port_majority() -> None:
    catalog = Catalog(instances=(inst("a", 1, 8000), inst("a", 2, 8001), inst("a", 3, 8001)))
    [service] = build_services(catalog).services
    assert service.frontend_port == 8001


def test_cache_gives_what_a_fresh_build_gives_and_reuses_unchanged_services() -> None:
    cache = ServiceCache()
    first = Catalog(instances=(inst("a", 1), inst("a", 2), inst("b", 1, frontend=9000)))
    cached = build_services(first, cache=cache)
    assert cached.services == build_services(first).services
    # One instance of "a" changes; "b" is untouched and keeps its very object.
    second = Catalog(instances=(inst("a", 1), inst("a", 3), inst("b", 1, frontend=9000)))
    again = build_services(second, cache=cache)
    assert again.services == build_services(second).services
    assert again.services[1] is cached.services[1]
    assert again.services[0] != cached.services[0]
    # Another default mode is another result, not a stale one.
    http = build_services(second, cache=cache, default_mode="http")
    assert [s.mode for s in http.services] == ["http", "http"]
    # Problems come back on every pass, not only on the first.
    mixed = Catalog(instances=(inst("c", 1), inst("c", 2, protocol="udp")))
    assert build_services(mixed, cache=cache).problems == build_services(mixed).problems
    assert build_services(mixed, cache=cache).problems == build_services(mixed).problems


def test_a_fleet_wide_claim_wins_on_every_host() -> None:
    catalog = Catalog(instances=(inst("zeta", 1), inst("alpha", 2)), claims=((8000, "zeta"),))
    fresh = build_services(catalog)  # a host that saw nothing before: the claim decides
    assert [s.name for s in fresh.services] == ["zeta"]
    held = build_services(catalog, previous_owners={8000: "alpha"})  # over memory too
    assert [s.name for s in held.services] == ["zeta"]
    assert any(p.service == "alpha" and "claimed fleet-wide" in p.message for p in held.problems)
    # The claimant has no instance now: the port stays its own, nobody else gets it.
    orphan = build_services(Catalog(instances=(inst("alpha", 2),), claims=((8000, "zeta"),)))
    assert orphan.services == ()
    assert [p.service for p in orphan.problems] == ["alpha"]


def test_two_entries_with_one_id_keep_the_first_and_name_both() -> None:
    a = ServiceInstance("web", "dup:1", "10.0.0.1", 30001, "tcp", 8000, host_id="node-a")
    b = ServiceInstance("web", "dup:1", "10.0.0.2", 30002, "tcp", 8000, host_id="node-b")
    ok = ServiceInstance("web", "ok:1", "10.0.0.3", 30003, "tcp", 8000, host_id="node-c")
    for order in ((a, b, ok), (ok, b, a)):
        result = build_services(Catalog(instances=order))
        [service] = result.services
        assert [i.id for i in service.instances] == ["dup:1", "ok:1"]
        assert service.instances[0] == a  # the same one on every host
        [problem] = result.problems
        assert (
            problem.service == "web"
            and "node-a" in problem.message
            and "node-b" in (problem.message)
        )
