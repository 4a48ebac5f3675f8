"""One frontend that cannot bind holds no other service back (issue 9), against the real nginx
binary: ``NginxProxy.unservable`` names a service whose frontend port (tcp, or udp for a udp
service) another process holds, so the core leaves it out instead of a reload nginx refuses
(after retrying the port for about 2.5 s, during which no change of any service gets in)."""

from __future__ import annotations

import socket
from collections.abc import Callable

from discoverd import Service, ServiceInstance
from discoverd.core.discover import DiscoverRole
from discoverd.plugins.nginx.proxy import NginxProxy, listened_ports
from discoverd.proxykit import ProxyRefused
from tests.plugins.nginx.conftest import EchoServer, NameServer, http_service
from tests.plugins.traffic import (
    RequestLoop,
    StaticRegistry,
    apply_servable,
    held_reason,
    squatter,
)
from tests.support.services import free_port, http_get, wait_for

MakeNginx = Callable[..., NginxProxy]
Backends = Callable[[str], NameServer]
Echoes = Callable[[str], EchoServer]


def echo(port: int, payload: bytes = b"hi") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(payload)
        return conn.recv(100)


def test_a_taken_port_costs_the_other_services_no_request(
    make_nginx: MakeNginx, backends: Backends, echoes: Echoes
) -> None:
    proxy = make_nginx()
    a, b, c = backends("a"), backends("b"), backends("c")
    healthy = [http_service("alpha", free_port(), a), http_service("beta", free_port(), b)]
    assert apply_servable(proxy, healthy) == ({}, "started")
    with squatter() as taken, RequestLoop([s.frontend_port for s in healthy]) as loop:
        loop.wait_requests(100)
        # The third service's port is held; a fourth, good one (tcp, in the stream block)
        # comes at the same time and must get in.
        gamma = http_service("gamma", taken, c)
        delta = http_service("delta", free_port(), echoes("d"), mode="tcp")
        wanted = [*healthy, gamma, delta]
        assert apply_servable(proxy, wanted) == ({"gamma": held_reason(taken)}, "reloaded")
        assert echo(delta.frontend_port) == b"d:hi"
        for _ in range(3):  # the core asks again every 2 s while it is left out
            assert apply_servable(proxy, wanted) == ({"gamma": held_reason(taken)}, "unchanged")
        loop.wait_requests(200)
    assert loop.failures() == 0, loop.report()
    assert proxy.unservable(wanted) == {}
    assert apply_servable(proxy, wanted) == ({}, "reloaded")
    assert http_get(f"http://127.0.0.1:{taken}/") == "I am c\n"


def test_ports_nginx_itself_listens_on_are_not_reported(
    make_nginx: MakeNginx, backends: Backends
) -> None:
    proxy = make_nginx()
    a = backends("a")
    services = [
        http_service("alpha", free_port(), a),
        http_service("beta", free_port(), a, mode="tcp"),
        Service("dns", free_port(), protocol="udp"),
    ]
    apply_servable(proxy, services)
    assert proxy.unservable(services) == {}
    proxy.forget()  # what runs is unknown: the ports are probed, and found held by nginx
    assert proxy.unservable(services) == {}
    # Another nginx (another state directory) holding a port is another process.
    other = make_nginx(state_dir=proxy.dir.parent / "other", status_port=free_port())
    port = free_port()
    apply_servable(other, [http_service("theirs", port, a)])
    found = proxy.unservable([*services, http_service("mine", port, a)])
    assert list(found) == ["mine"]
    assert found["mine"].startswith(f"frontend port {port} is held by another process (nginx")


def test_a_udp_port_is_probed_as_udp(make_nginx: MakeNginx) -> None:
    proxy = make_nginx()
    with squatter(socket.SOCK_DGRAM) as port:
        backend = ServiceInstance(
            service="dns", id="h:dns:53:udp", address="127.0.0.1", port=53, protocol="udp"
        )
        dns = Service("dns", port, protocol="udp", instances=(backend,))
        tcp_twin = Service("web", port, mode="tcp")  # tcp on the same port number: free
        wanted = [dns, tcp_twin]
        assert apply_servable(proxy, wanted) == ({"dns": held_reason(port, "/udp")}, "started")
    assert apply_servable(proxy, wanted) == ({}, "reloaded")
    assert proxy.unservable(wanted) == {}


def test_a_port_taken_after_the_probe_is_refused_and_named_next_time(
    make_nginx: MakeNginx, backends: Backends
) -> None:
    proxy = make_nginx()
    a, b = backends("a"), backends("b")
    alpha = http_service("alpha", free_port(), a)
    apply_servable(proxy, [alpha])
    port = free_port()
    wanted = [alpha, http_service("gamma", port, b)]
    assert proxy.unservable(wanted) == {}
    config = proxy.render(wanted)
    proxy.validate(config)
    with socket.socket() as late:
        late.bind(("127.0.0.1", port))
        late.listen()
        try:
            proxy.apply(config, wanted)
        except ProxyRefused as exc:
            assert "Address already in use" in str(exc) and str(port) in str(exc)
        else:
            raise AssertionError("nginx took a port another process holds")
        assert http_get(f"http://127.0.0.1:{alpha.frontend_port}/") == "I am a\n"
        assert proxy.unservable(wanted) == {"gamma": held_reason(port)}
        assert apply_servable(proxy, wanted) == ({"gamma": held_reason(port)}, "unchanged")
    assert apply_servable(proxy, wanted) == ({}, "reloaded")
    assert http_get(f"http://127.0.0.1:{port}/") == "I am b\n"


def test_a_fresh_host_starts_nginx_with_the_services_it_can_serve(
    make_nginx: MakeNginx, backends: Backends
) -> None:
    """End to end through the core's discover role: no nginx runs yet, one frontend port is
    taken; nginx starts with the others, and the left-out one comes in once the port is free."""
    proxy = make_nginx()
    a, b = backends("a"), backends("b")
    good = free_port()
    with socket.socket() as taker:
        taker.bind(("127.0.0.1", free_port()))
        taker.listen()
        taken = int(taker.getsockname()[1])
        registry = StaticRegistry([a.instance("alpha", good), b.instance("gamma", taken)])
        role = DiscoverRole(registry, proxy, proxy_name="nginx", min_wait=0.0, max_wait=0.05)
        try:
            assert role.reconcile() == "applied"
            assert proxy.last_apply is not None and proxy.last_apply.result == "started"
            assert [s.name for s in role.services or ()] == ["alpha"]
            assert role.excluded == {"gamma": held_reason(taken)}
            assert http_get(f"http://127.0.0.1:{good}/") == "I am a\n"
            role.start()
            taker.close()
            wait_for(
                lambda: http_get(f"http://127.0.0.1:{taken}/") == "I am b\n",
                15,
                what="the left-out service to come in on its own",
            )
            wait_for(lambda: role.excluded == {}, 10, what="the pass to end")
        finally:
            role.shutdown()


def test_listened_ports_reads_every_listen_directive() -> None:
    text = (
        b"    listen 8000;\n    listen 127.0.0.1:8001 reuseport;\n  listen [::1]:53 udp;\n"
        b"# listen 9;\n    server 10.0.0.1:80 max_fails=1;\n"
    )
    assert listened_ports(text) == {(8000, "tcp"), (8001, "tcp"), (53, "udp")}


def test_a_held_status_port_leaves_the_status_page_out_never_the_services(
    make_nginx: MakeNginx, backends: Backends
) -> None:
    """Another process on the status port: nginx would not start at all with the page, so the
    page is left out and every service served; once the port is free, the page comes back."""
    a = backends("a")
    with squatter() as status:
        proxy = make_nginx(status_port=status)
        proxy.status_page.recheck = 0.0  # probe at every render (1 s by default)
        alpha = http_service("alpha", free_port(), a)
        assert apply_servable(proxy, [alpha]) == ({}, "started")  # a fresh host
        assert http_get(f"http://127.0.0.1:{alpha.frontend_port}/") == "I am a\n"
        assert f"listen 127.0.0.1:{status};" not in proxy.config_file.read_text()
        assert proxy.status_page.reason == held_reason(status).replace("frontend", "status")
        assert apply_servable(proxy, [alpha]) == ({}, "unchanged")
    with RequestLoop([alpha.frontend_port]) as loop:
        loop.wait_requests(50)
        assert apply_servable(proxy, [alpha]) == ({}, "reloaded")
        wait_for(lambda: "alpha" in http_get(f"http://127.0.0.1:{status}/"), 5)
        assert apply_servable(proxy, [alpha]) == ({}, "unchanged")  # nginx holds it now
        loop.wait_requests(100)
    assert loop.failures() == 0, loop.report()
    assert proxy.status_page.reason is None
