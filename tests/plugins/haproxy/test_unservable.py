"""One frontend that cannot bind costs the other services nothing (issue 9), against the real
haproxy binary: ``HAProxy.unservable`` names a service whose frontend port another process
holds, so the core leaves it out instead of starting a reload that fails (and pauses every
listener for about 2 s while HAProxy retries)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from discoverd import Service, ServiceInstance
from discoverd.core.discover import DiscoverRole
from discoverd.plugins.haproxy.proxy import HAProxy, bound_ports
from discoverd.proxykit import ProxyRefused
from tests.plugins.haproxy.conftest import NameServer, http_service
from tests.plugins.traffic import RequestLoop, StaticRegistry, apply_servable, held_reason, squatter
from tests.support.services import free_port, http_get, wait_for

MakeHAProxy = Callable[..., HAProxy]
Backends = Callable[[str], NameServer]


def test_a_taken_port_costs_the_other_services_no_request(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy()
    a, b, c, d = backends("a"), backends("b"), backends("c"), backends("d")
    healthy = [http_service("alpha", free_port(), a), http_service("beta", free_port(), b)]
    assert apply_servable(proxy, healthy) == ({}, "started")
    ports = [service.frontend_port for service in healthy]
    with squatter() as taken, RequestLoop(ports) as loop:
        loop.wait_requests(100)
        # A third service whose port a plain Python listener holds, and a fourth, good one at
        # the same time: the fourth takes a reload, which must not be the failing one.
        gamma = http_service("gamma", taken, c)
        delta = http_service("delta", free_port(), d)
        wanted = [*healthy, gamma, delta]
        assert apply_servable(proxy, wanted) == ({"gamma": held_reason(taken)}, "reloaded")
        assert http_get(f"http://127.0.0.1:{delta.frontend_port}/") == "I am d\n"
        for _ in range(3):  # the core asks again every 2 s while it is left out
            assert apply_servable(proxy, wanted) == ({"gamma": held_reason(taken)}, "unchanged")
        loop.wait_requests(200)
    assert loop.failures() == 0, loop.report()
    assert proxy.status() is not None and proxy.status().failed == 0  # type: ignore[union-attr]
    # The listener is gone: the service is no longer named, and comes in.
    assert proxy.unservable(wanted) == {}
    assert apply_servable(proxy, wanted) == ({}, "reloaded")
    assert http_get(f"http://127.0.0.1:{taken}/") == "I am c\n"


def test_ports_haproxy_itself_binds_are_not_reported(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy()
    a = backends("a")
    services = [http_service("alpha", free_port(), a), http_service("beta", free_port(), a)]
    apply_servable(proxy, services)
    assert proxy.unservable(services) == {}
    # Even when the configuration running is unknown (a reload whose outcome was not seen):
    # the ports are probed, and found held by this HAProxy's own workers.
    proxy.forget()
    assert proxy.unservable(services) == {}
    # Another HAProxy (another state directory) holding a port is another process.
    other = make_haproxy(state_dir=proxy.dir.parent / "other", stats_port=free_port())
    port = free_port()
    apply_servable(other, [http_service("theirs", port, a)])
    found = proxy.unservable([*services, http_service("mine", port, a)])
    assert list(found) == ["mine"]
    assert found["mine"].startswith(f"frontend port {port} is held by another process (haproxy")


def test_a_port_taken_after_the_probe_is_refused_and_named_next_time(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy()
    a, b = backends("a"), backends("b")
    alpha = http_service("alpha", free_port(), a)
    apply_servable(proxy, [alpha])
    before = proxy.status()
    port = free_port()
    wanted = [alpha, http_service("gamma", port, b)]
    assert proxy.unservable(wanted) == {}  # free when probed ...
    config = proxy.render(wanted)
    proxy.validate(config)
    with socket.socket() as late:  # ... taken before the reload
        late.bind(("127.0.0.1", port))
        late.listen()
        with pytest.raises(ProxyRefused) as caught:
            proxy.apply(config, wanted)
        # HAProxy's own reason; the old worker serves on.
        assert "cannot bind socket" in str(caught.value) and str(port) in str(caught.value)
        after = proxy.status()
        assert after is not None and before is not None
        assert (after.master, after.workers) == (before.master, before.workers)
        assert http_get(f"http://127.0.0.1:{alpha.frontend_port}/") == "I am a\n"
        # What the core asks next: the service is named, the rest is what runs.
        assert proxy.unservable(wanted) == {"gamma": held_reason(port)}
        assert apply_servable(proxy, wanted) == ({"gamma": held_reason(port)}, "reloaded")
    assert apply_servable(proxy, wanted) == ({}, "reloaded")
    assert http_get(f"http://127.0.0.1:{port}/") == "I am b\n"


def test_udp_services_are_not_probed(make_haproxy: MakeHAProxy) -> None:
    proxy = make_haproxy()
    with squatter(socket.SOCK_DGRAM) as port:
        dns = Service(
            "dns",
            port,
            protocol="udp",
            instances=(
                ServiceInstance(
                    service="dns", id="h:dns:53:udp", address="127.0.0.1", port=53, protocol="udp"
                ),
            ),
        )
        assert proxy.unservable([dns]) == {}  # HAProxy does not serve udp at all


def test_bound_ports_reads_every_bind_line() -> None:
    text = (
        b"frontend a\n    bind *:8000\n    bind 127.0.0.1:8001 name x\n"
        b"listen Stats\n  bind [::1]:1936,:1937\n# bind 9\n    server bind 10.0.0.1:80\n"
    )
    assert bound_ports(text) == {8000, 8001, 1936, 1937}


def test_a_fresh_host_starts_haproxy_with_the_services_it_can_serve(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    """End to end through the core's discover role: no HAProxy runs yet, one frontend port is
    taken; HAProxy starts with the others, and the left-out one comes in on its own once the
    port is free."""
    proxy = make_haproxy()
    a, b = backends("a"), backends("b")
    good = free_port()
    with socket.socket() as taker:
        taker.bind(("127.0.0.1", free_port()))
        taker.listen()
        taken = int(taker.getsockname()[1])
        registry = StaticRegistry([a.instance("alpha", good), b.instance("gamma", taken)])
        role = DiscoverRole(registry, proxy, proxy_name="haproxy", min_wait=0.0, max_wait=0.05)
        try:
            assert role.reconcile() == "applied"
            assert proxy.last_apply is not None and proxy.last_apply.result == "started"
            assert [s.name for s in role.services or ()] == ["alpha"]
            assert role.excluded == {"gamma": held_reason(taken)}
            assert http_get(f"http://127.0.0.1:{good}/") == "I am a\n"
            role.start()
            taker.close()  # the other process lets the port go
            wait_for(
                lambda: http_get(f"http://127.0.0.1:{taken}/") == "I am b\n",
                15,
                what="the left-out service to come in on its own",
            )
            wait_for(lambda: role.excluded == {}, 10, what="the pass to end")
        finally:
            role.shutdown()


def test_a_held_stats_port_leaves_the_stats_page_out_never_the_services(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    """Another process on the stats port: HAProxy would not start at all with the page, so the
    page is left out and every service served; once the port is free, the page comes back."""
    a = backends("a")
    with squatter() as stats:
        proxy = make_haproxy(stats_port=stats)
        proxy.stats_page.recheck = 0.0  # probe at every render (1 s by default)
        alpha = http_service("alpha", free_port(), a)
        assert apply_servable(proxy, [alpha]) == ({}, "started")  # a fresh host
        assert http_get(f"http://127.0.0.1:{alpha.frontend_port}/") == "I am a\n"
        assert "listen Stats" not in proxy.config_file.read_text()
        assert proxy.stats_page.reason == held_reason(stats).replace("frontend", "stats")
        assert apply_servable(proxy, [alpha]) == ({}, "unchanged")
    with RequestLoop([alpha.frontend_port]) as loop:
        loop.wait_requests(50)
        assert apply_servable(proxy, [alpha]) == ({}, "reloaded")
        assert "Statistics Report" in http_get(f"http://127.0.0.1:{stats}/")
        assert apply_servable(proxy, [alpha]) == ({}, "unchanged")  # HAProxy holds it now
        loop.wait_requests(100)
    assert loop.failures() == 0, loop.report()
    assert proxy.stats_page.reason is None
