"""The nginx proxy plugin, against the real nginx binary.

Backends are small Python HTTP and TCP echo servers on 127.0.0.1 (real sockets), plus one test
with real whoami containers; every nginx a test starts is stopped by the ``make_nginx`` fixture.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import json
import os
import random
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import docker
import pytest

from discoverd import (
    ConfigError,
    PluginError,
    ProxyConfigError,
    Service,
    ServiceInstance,
)
from discoverd.core.manager import get_plugin_manager
from discoverd.plugins.nginx import make_proxy
from discoverd.plugins.nginx.config import WorkerSettings, worker_settings
from discoverd.plugins.nginx.messages import reload_verdict
from discoverd.plugins.nginx.processes import holding, masters_of
from discoverd.plugins.nginx.proxy import NginxProxy
from discoverd.proxykit import pid_alive
from tests.plugins.nginx.conftest import EchoServer, NameServer, http_service, nginx_context
from tests.support.services import free_port, http_get, published_port, run_whoami, wait_for

GOLDEN = Path(__file__).parent / "golden"
MakeNginx = Callable[..., NginxProxy]
Backends = Callable[[str], NameServer]
Echoes = Callable[[str], EchoServer]


# --------------------------------------------------------------------------------------------
# Helpers


def offline_proxy(**options: object) -> NginxProxy:
    """A proxy for render-only tests (no nginx run, nothing written)."""
    ctx = nginx_context(Path("/run/discoverd"), **options)
    # What the binary says (nginx -V) does not matter offline.
    return NginxProxy(ctx.config, ctx.state_dir, stub_status=True)


def pinned_proxy(**options: object) -> NginxProxy:
    """An offline proxy whose machine-dependent settings (root or not, fd limits) are fixed, so
    its render is the same on every machine."""
    ctx = nginx_context(Path("/run/discoverd"), **options)
    pinned = WorkerSettings(user="www-data", group="nogroup", rlimit_nofile=8256)
    return NginxProxy(ctx.config, ctx.state_dir, workers=pinned, stub_status=True)


def instance(
    service: str, name: str, port: int, address: str = "127.0.0.1", **meta: str
) -> ServiceInstance:
    return ServiceInstance(
        service=service,
        id=f"host1:{name}:8000:tcp",
        address=address,
        port=port,
        frontend_port=8000,
        meta=tuple(meta.items()),
        host_id="host1",
    )


def sample_services() -> list[Service]:
    """Two http services, one tcp, one udp, one with no instances."""
    return [
        Service(
            "whoami",
            8000,
            mode="http",
            instances=(
                instance("whoami", "b2c3d4e5f6a1", 32769),
                instance("whoami", "a1b2c3d4e5f6", 32768),
                instance("whoami", "c3d4e5f6a1b2", 32770, address="10.0.0.12"),
            ),
        ),
        Service(
            "api",
            8080,
            mode="http",
            instances=(
                instance("api", "d4e5f6a1b2c3", 32771, team="payments"),
                instance("api", "e5f6a1b2c3d4", 32772, address="fd00::12"),
            ),
        ),
        Service("redis", 6379, mode="tcp", instances=(instance("redis", "f6a1b2c3d4e5", 32773),)),
        Service(
            "dns",
            53,
            protocol="udp",
            instances=(
                ServiceInstance(
                    service="dns",
                    id="host1:0a1b2c3d4e5f:53:udp",
                    address="10.0.0.11",
                    port=32774,
                    protocol="udp",
                ),
            ),
        ),
        Service("billing", 9000, mode="http"),
    ]


def shuffled(services: list[Service], rng: random.Random) -> list[Service]:
    result = []
    for service in services:
        members = list(service.instances)
        rng.shuffle(members)
        result.append(dataclasses.replace(service, instances=tuple(members)))
    rng.shuffle(result)
    return result


def apply(proxy: NginxProxy, services: list[Service]) -> str:
    config = proxy.render(services)
    proxy.validate(config)
    return proxy.apply(config, services)


def status_code(url: str, method: str = "GET", data: bytes | None = None) -> int:
    """The HTTP status of one request (0 when the connection closed without an answer)."""
    request = urllib.request.Request(url, data=data, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (http.client.RemoteDisconnected, ConnectionResetError):
        return 0


def echo_once(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        return sock.recv(4096)


# --------------------------------------------------------------------------------------------
# Registration and options


def test_plugin_is_registered_through_its_entry_point_with_its_options() -> None:
    assert "nginx" in {ep.name for ep in entry_points(group="discoverd")}
    plugin = get_plugin_manager().proxy("nginx")
    assert plugin.name == "nginx"
    names = [o.name for o in plugin.options]
    for key in (
        "binary",
        "bind",
        "status_port",
        "template_dir",
        "max_fails",
        "fail_timeout",
        "connect_timeout",
        "next_upstream_tries",
        "worker_processes",
        "worker_connections",
        "reload_interval",
        "drain_timeout",
        "stream_module",
    ):
        assert key in names
    defaults = {o.name: o.default for o in plugin.options}
    assert defaults["balance"] == "roundrobin"
    assert {o.name: o.choices for o in plugin.options}["balance"] == (
        "roundrobin",
        "leastconn",
        "random",
    )
    assert defaults["status_port"] == 1937
    assert defaults["bind"] == ""
    assert defaults["reload_interval"] == 1.0


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"bind": "localhost"}, "bind"),
        ({"status_bind": "1.2.3"}, "status_bind"),
        ({"status_port": 70000}, "status_port"),
        ({"status_port": "x"}, "status_port"),
        ({"max_fails": -1}, "max_fails"),
        ({"fail_timeout": "0s"}, "fail_timeout"),
        ({"connect_timeout": "soon"}, "connect_timeout"),
        ({"proxy_timeout": "30 s"}, "proxy_timeout"),
        ({"client_timeout": "1s; include /etc/passwd"}, "client_timeout"),
        ({"drain_timeout": "10s\nuser root"}, "drain_timeout"),
        ({"next_upstream_tries": 1000}, "next_upstream_tries"),
        ({"worker_processes": "many"}, "worker_processes"),
        ({"worker_connections": 0}, "worker_connections"),
        ({"reload_interval": -1}, "reload_interval"),
        ({"reload_interval": "often"}, "reload_interval"),
        ({"stream_module": "modules/stream.so"}, "stream_module"),
        ({"stream_module": "/x/$y.so"}, "stream_module"),
        ({"user": "root; daemon off"}, "user"),
        ({"binary": ""}, "binary"),
        ({"template_dir": "/nonexistent/templates"}, "template_dir"),
        ({"colour": "blue"}, "colour"),
        ({"balance": "ip_hash"}, "balance"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        offline_proxy(**options)


def test_options_from_the_environment_are_text_and_still_accepted() -> None:
    text = {"status_port": "4000", "reload_interval": "0.25", "max_fails": "2", "user": "a b"}
    config = nginx_context(Path("/run/discoverd"), **text).config
    assert (config.status_port, config.reload_interval, config.max_fails) == (4000, 0.25, 2)
    # Not root: nginx would ignore it with a warning.
    assert worker_settings(config, is_root=False).user == ""


def test_state_dir_that_nginx_cannot_use_is_refused() -> None:
    for bad in ("/tmp/it's", "/tmp/a$b", "/tmp/a\nb"):
        with pytest.raises(PluginError, match="state"):
            NginxProxy(offline_proxy().config, Path(bad))


def test_reserved_ports_name_the_status_page() -> None:
    assert offline_proxy().reserved_ports() == frozenset({1937})
    assert offline_proxy(status_port=4000).reserved_ports() == frozenset({4000})
    assert offline_proxy(status_port=0).reserved_ports() == frozenset()
    assert "stub_status" not in offline_proxy(status_port=0).render([])


# --------------------------------------------------------------------------------------------
# Render


def test_render_matches_the_reviewed_golden_file() -> None:
    text = pinned_proxy().render(sample_services())
    golden = GOLDEN / "nginx.conf"
    if os.environ.get("DISCOVERD_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()


def test_render_is_deterministic_whatever_the_order() -> None:
    proxy = offline_proxy()
    expected = proxy.render(sample_services())
    rng = random.Random(7)
    for _ in range(10):
        assert proxy.render(shuffled(sample_services(), rng)) == expected
    # No path of this machine in the text: it is the same whatever the state directory.
    other = NginxProxy(proxy.config, Path("/var/tmp/elsewhere"), stub_status=True)
    assert other.render(sample_services()) == expected


def test_render_uses_the_options() -> None:
    text = offline_proxy(
        bind="127.0.0.2",
        status_bind="::1",
        status_port=4000,
        max_fails=3,
        fail_timeout="7s",
        connect_timeout="250ms",
        next_upstream_tries=5,
        proxy_timeout="45s",
        client_timeout="1m",
        keepalive_timeout="0",
        upstream_keepalive=0,
        worker_processes="3",
        worker_connections=100,
        drain_timeout="2s",
    ).render(sample_services())
    assert "        listen 127.0.0.2:8000;\n" in text
    assert "        listen 127.0.0.2:53 udp;\n" in text
    assert "        listen [::1]:4000;\n" in text
    assert "max_fails=3 fail_timeout=7s;" in text
    for line in (
        "proxy_connect_timeout 250ms;",
        "proxy_next_upstream_tries 5;",
        "proxy_read_timeout 45s;",
        "proxy_timeout 45s;",
        "client_header_timeout 1m;",
        "keepalive_timeout 0;",
    ):
        assert f"    {line}\n" in text
    assert "keepalive 16;" not in text
    for line in ("worker_processes 3;", "worker_shutdown_timeout 2s;"):
        assert f"{line}\n" in text
    assert "    worker_connections 100;\n" in text


def test_the_stream_module_is_loaded_only_for_tcp_or_udp_services() -> None:
    http_only = [s for s in sample_services() if s.mode == "http" and s.protocol == "tcp"]
    assert "load_module" not in offline_proxy().render(http_only)
    assert "stream {" not in offline_proxy().render(http_only)
    text = offline_proxy().render(sample_services())
    assert 'load_module "/usr/lib/nginx/modules/ngx_stream_module.so";\n' in text
    assert "load_module" not in offline_proxy(stream_module="").render(sample_services())


def test_two_services_on_one_port_are_refused_but_tcp_and_udp_may_share_it() -> None:
    with pytest.raises(PluginError, match="8000"):
        offline_proxy().render([Service("a", 8000), Service("b", 8000, mode="http")])
    with pytest.raises(PluginError, match="status page"):
        offline_proxy().render([Service("a", 1937)])
    both = offline_proxy().render([Service("a", 53), Service("b", 53, protocol="udp")])
    assert "listen 53;" in both and "listen 53 udp;" in both


def test_hostile_values_cannot_inject_directives() -> None:
    """The model refuses such names; even a Service that bypassed it is refused by render."""
    proxy = offline_proxy()
    for evil in ("web; include /etc/passwd", "web{", "a b", "x$host", "web\nuser root"):
        bad = Service("web", 8000, mode="http")
        object.__setattr__(bad, "name", evil)
        with pytest.raises(PluginError, match="refusing"):
            proxy.render([bad])
    member = instance("web", "a", 8001)
    object.__setattr__(member, "address", "127.0.0.1:1 backup; server 10.9.9.9")
    with pytest.raises(PluginError, match="refusing"):
        proxy.render([Service("web", 8000, mode="http", instances=(member,))])
    member = instance("web", "a", 8001)
    object.__setattr__(member, "id", "a;b")
    with pytest.raises(PluginError, match="refusing"):
        proxy.render([Service("web", 8000, mode="http", instances=(member,))])


def test_a_value_printed_by_a_user_template_is_checked(tmp_path: Path) -> None:
    """Metadata may hold '$' and spaces (the model allows them): printed, they are refused."""
    (tmp_path / "nginx.conf.j2").write_text(
        '{% extends "default:nginx.conf.j2" %}\n'
        "{% block http_server_extra %}\n"
        "        add_header X-Team {{ service.instances[0].meta.get('team', 'none') }};\n"
        "{% endblock %}\n"
    )
    proxy = offline_proxy(template_dir=str(tmp_path))
    plain = Service("web", 8000, mode="http", instances=(instance("web", "a", 1, team="blue"),))
    assert "        add_header X-Team blue;\n" in proxy.render([plain])
    for value in ("$request_uri", "blue always", "a,b=$x"):
        odd = Service("web", 8000, mode="http", instances=(instance("web", "a", 1, team=value),))
        with pytest.raises(PluginError, match="refusing"):
            proxy.render([odd])


def test_a_user_template_extends_the_shipped_one(tmp_path: Path) -> None:
    (tmp_path / "nginx.conf.j2").write_text(
        '{% extends "default:nginx.conf.j2" %}\n'
        "{% block http_extra %}\n"
        "    client_max_body_size 50m;\n"
        "{% endblock %}\n"
        "{% block http_upstream_extra %}\n"
        "        # owner of {{ service.name }}: team-{{ service.meta.get('team', 'none') }}\n"
        "{% endblock %}\n"
    )
    text = offline_proxy(template_dir=str(tmp_path)).render(sample_services())
    assert "    client_max_body_size 50m;\n" in text
    assert "        # owner of whoami: team-none\n" in text
    assert "    upstream whoami {\n" in text


def test_a_broken_user_template_is_refused_at_factory_time(tmp_path: Path) -> None:
    (tmp_path / "nginx.conf.j2").write_text("{% block http_extra %}\n")
    with pytest.raises(PluginError, match="template"):
        offline_proxy(template_dir=str(tmp_path))


def test_reload_verdict_waits_for_the_end_of_bind_retries() -> None:
    retry = "2026/11/26 21:51:23 [emerg] 23198#23198: bind() to 127.0.0.1:8 failed (98: in use)"
    other = '2026/11/26 21:51:23 [emerg] 777#777: unknown directive "x" in nginx.conf:3'
    final = "2026/11/26 21:51:25 [emerg] 23198#23198: still could not bind()"
    assert reload_verdict(retry, 23198) is None
    assert reload_verdict(f"{retry}\n{other}", 23198) is None  # another process's line
    assert reload_verdict(f"{retry}\n{retry}\n{final}", 23198) == [
        "bind() to 127.0.0.1:8 failed (98: in use)",
        "still could not bind()",
    ]


# --------------------------------------------------------------------------------------------
# Validate


def test_validate_accepts_a_render_and_leaves_nothing_behind(make_nginx: MakeNginx) -> None:
    proxy = make_nginx()
    proxy.validate(proxy.render(sample_services()))
    assert not list(proxy.dir.glob("candidate*"))
    assert not proxy.pid_file.exists()
    assert proxy.master_pid() is None


def test_a_refused_candidate_reports_nginx_s_message_and_keeps_the_running_config(
    make_nginx: MakeNginx, backends: Backends, tmp_path: Path
) -> None:
    proxy = make_nginx()
    a = backends("a")
    port = free_port()
    services = [http_service("one", port, a)]
    good = proxy.render(services)
    assert apply(proxy, services) == "started"
    master, workers = proxy.master_pid(), proxy.worker_pids()
    pid_file = proxy.pid_file.read_text()

    (tmp_path / "nginx.conf.j2").write_text(
        '{% extends "default:nginx.conf.j2" %}\n'
        "{% block http_server_extra %}\n        frobnicate {{ service.name }};\n{% endblock %}\n"
    )
    other = make_nginx(template_dir=str(tmp_path), status_port=proxy.config.status_port)
    with pytest.raises(ProxyConfigError) as caught:
        other.validate(other.render(services))
    message = str(caught.value)
    assert 'unknown directive "frobnicate" in nginx.conf:' in message
    assert "candidate" not in message and str(proxy.dir) not in message
    assert "\n" not in message
    assert not list(proxy.dir.glob("candidate*"))
    # The running nginx saw nothing: same file, same pid file, same processes, still serving.
    assert proxy.config_file.read_text() == good
    assert proxy.pid_file.read_text() == pid_file
    assert (proxy.master_pid(), proxy.worker_pids()) == (master, workers)
    assert http_get(f"http://127.0.0.1:{port}/") == "I am a\n"


# --------------------------------------------------------------------------------------------
# Apply, against a running nginx


def test_apply_starts_nginx_and_serves_http_tcp_and_an_empty_service(
    make_nginx: MakeNginx, backends: Backends, echoes: Echoes
) -> None:
    proxy = make_nginx()
    a, b = backends("a"), backends("b")
    e = echoes("e")
    web, raw, empty, empty_tcp = free_port(), free_port(), free_port(), free_port()
    services = [
        http_service("web", web, a, b),
        http_service("raw", raw, e, mode="tcp"),
        Service("nobody", empty, mode="http"),
        Service("nothing", empty_tcp, mode="tcp"),
    ]
    assert apply(proxy, services) == "started"
    assert proxy.config_file.read_text() == proxy.render(services)
    master = proxy.master_pid()
    assert master is not None and proxy.worker_pids()
    assert {http_get(f"http://127.0.0.1:{web}/") for _ in range(6)} == {"I am a\n", "I am b\n"}
    assert echo_once(raw, b"ping") == b"e:ping"
    # No instance: a clean 503 over http, a connection closed at once over tcp.
    assert status_code(f"http://127.0.0.1:{empty}/") == 503
    with socket.create_connection(("127.0.0.1", empty_tcp), timeout=5) as sock:
        assert sock.recv(10) == b""
    # Everything nginx writes stays in its directory.
    for name in ("nginx.pid", "error.log", "tmp/proxy", "tmp/client_body", "status"):
        assert (proxy.dir / name).exists(), name
    assert proxy.dir.stat().st_mode & 0o777 == 0o711


@pytest.mark.parametrize("balance", ["leastconn", "roundrobin", "random"])
def test_balance_leastconn_passes_a_server_busy_with_a_request(
    balance: str, make_nginx: MakeNginx, backends: Backends, echoes: Echoes
) -> None:
    """With leastconn, new requests go to the server without one in progress; with
    roundrobin (the default) each server gets its turn; random is accepted by nginx (one
    worker: each worker counts its own connections)."""
    proxy = make_nginx(balance=balance, worker_processes="1")
    a, b = backends("a"), backends("b")
    e = echoes("e")
    web, raw = free_port(), free_port()
    services = [http_service("web", web, a, b), http_service("raw", raw, e, mode="tcp")]
    assert apply(proxy, services) == "started"
    config = proxy.config_file.read_text()
    expected = {"leastconn": "least_conn;", "roundrobin": "", "random": "random two least_conn;"}
    lines = [line.strip() for line in config.splitlines()]
    if expected[balance]:
        assert lines.count(expected[balance]) == 2  # in the http and the stream upstream
    assert config.count("least_conn;") == (0 if balance == "roundrobin" else 2)
    assert echo_once(raw, b"ping") == b"e:ping"
    if balance == "random":
        return
    slow = threading.Thread(target=http_get, args=(f"http://127.0.0.1:{web}/slow?2", 30))
    slow.start()
    wait_for(lambda: a.slow_started.is_set() or b.slow_started.is_set(), 10, what="the slow one")
    free = b if a.slow_started.is_set() else a
    seen = {http_get(f"http://127.0.0.1:{web}/") for _ in range(6)}
    if balance == "leastconn":
        assert seen == {f"I am {free.name}\n"}
    else:
        assert seen == {"I am a\n", "I am b\n"}
    slow.join(10)


def test_the_status_page_answers_on_loopback(make_nginx: MakeNginx, backends: Backends) -> None:
    proxy = make_nginx()
    a = backends("a")
    web, empty = free_port(), free_port()
    services = [http_service("web", web, a), Service("nobody", empty, mode="http")]
    apply(proxy, services)
    base = f"http://127.0.0.1:{proxy.config.status_port}"
    page = http_get(f"{base}/")
    assert "web  http  listen 127.0.0.1:" in page
    assert f"127.0.0.1:{a.port}  host1:a:8000:tcp" in page
    listing = json.loads(http_get(f"{base}/services.json"))
    assert [s["name"] for s in listing["services"]] == ["nobody", "web"]
    assert listing["services"][1]["backends"] == [
        {"id": "host1:a:8000:tcp", "address": "127.0.0.1", "port": a.port}
    ]
    assert "Active connections:" in http_get(f"{base}/nginx_status")
    assert status_code(f"{base}/elsewhere") == 404
    # Loopback only: the status server listens on 127.0.0.1 and nowhere else.
    assert f"listen 127.0.0.1:{proxy.config.status_port};" in proxy.config_file.read_text()
    # It follows the membership.
    apply(proxy, [http_service("web", web, a)])
    assert [s["name"] for s in json.loads(http_get(f"{base}/services.json"))["services"]] == ["web"]


def test_same_config_is_unchanged_and_a_membership_change_reloads(
    make_nginx: MakeNginx, backends: Backends
) -> None:
    proxy = make_nginx()
    a, b = backends("a"), backends("b")
    port = free_port()
    first = [http_service("web", port, a)]
    assert apply(proxy, first) == "started"
    master, workers = proxy.master_pid(), proxy.worker_pids()

    assert apply(proxy, first) == "unchanged"
    assert (proxy.master_pid(), proxy.worker_pids()) == (master, workers)

    second = [http_service("web", port, a, b)]
    assert apply(proxy, second) == "reloaded"
    assert proxy.config_file.read_text() == proxy.render(second)
    assert proxy.master_pid() == master
    assert proxy.worker_pids() - workers
    wait_for(lambda: not proxy.worker_pids() & workers, 20, what="the old workers to leave")
    seen = {http_get(f"http://127.0.0.1:{port}/") for _ in range(6)}
    assert seen == {"I am a\n", "I am b\n"}


def test_a_reload_that_cannot_bind_is_reported_and_the_old_config_serves_on(
    make_nginx: MakeNginx, backends: Backends
) -> None:
    proxy = make_nginx()
    a, b = backends("a"), backends("b")
    port1 = free_port()
    first = [http_service("one", port1, a)]
    good = proxy.render(first)
    apply(proxy, first)
    master, workers = proxy.master_pid(), proxy.worker_pids()

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        second = [http_service("one", port1, a), http_service("two", taken, b)]
        candidate = proxy.render(second)
        proxy.validate(candidate)  # nginx -t does not bind: it passes
        with pytest.raises(PluginError) as caught:
            proxy.apply(candidate, second)
        assert "Address already in use" in str(caught.value)
        assert str(taken) in str(caught.value)
        # The status of the last apply says so (what a health endpoint serves).
        status = proxy.last_apply
        assert status is not None and status.failed and status.error == str(caught.value)
        assert proxy.config_file.read_text() == good
        assert (proxy.master_pid(), proxy.worker_pids()) == (master, workers)
        assert http_get(f"http://127.0.0.1:{port1}/") == "I am a\n"
        # Not taken for "unchanged" next time either.
        assert proxy.apply(good, first) == "unchanged"

    assert proxy.apply(candidate, second) == "reloaded"
    assert http_get(f"http://127.0.0.1:{taken}/") == "I am b\n"
    assert proxy.last_apply is not None and proxy.last_apply.result == "reloaded"


def test_a_start_that_cannot_bind_is_reported(make_nginx: MakeNginx, backends: Backends) -> None:
    proxy = make_nginx()
    a = backends("a")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        services = [http_service("one", squatter.getsockname()[1], a)]
        with pytest.raises(PluginError, match="Address already in use"):
            apply(proxy, services)
    assert not proxy.config_file.exists()
    assert proxy.master_pid() is None


def test_a_second_proxy_adopts_the_running_nginx(make_nginx: MakeNginx, backends: Backends) -> None:
    first_proxy = make_nginx()
    a, b = backends("a"), backends("b")
    port1, port2 = free_port(), free_port()
    first = [http_service("one", port1, a)]
    apply(first_proxy, first)
    first_proxy.close()  # discoverd exits: nginx keeps serving
    assert http_get(f"http://127.0.0.1:{port1}/") == "I am a\n"
    master = first_proxy.master_pid()

    adopter = make_nginx(status_port=first_proxy.config.status_port)
    assert apply(adopter, first) == "unchanged"
    second = [http_service("one", port1, a), http_service("two", port2, b)]
    assert apply(adopter, second) == "reloaded"
    assert http_get(f"http://127.0.0.1:{port2}/") == "I am b\n"
    assert masters_of(adopter.config_file) == [master]


def test_a_lost_pid_file_does_not_start_a_second_master(
    make_nginx: MakeNginx, backends: Backends
) -> None:
    proxy = make_nginx()
    a = backends("a")
    services = [http_service("one", free_port(), a)]
    apply(proxy, services)
    master = proxy.master_pid()
    proxy.pid_file.unlink()
    assert apply(proxy, services) == "unchanged"
    assert proxy.pid_file.read_text().strip() == str(master)
    assert masters_of(proxy.config_file) == [master]


def test_a_killed_nginx_is_started_again_by_the_next_apply(
    make_nginx: MakeNginx, backends: Backends
) -> None:
    proxy = make_nginx()
    a = backends("a")
    port = free_port()
    services = [http_service("one", port, a)]
    apply(proxy, services)
    master, workers = proxy.master_pid(), proxy.worker_pids()
    assert master is not None
    # SIGKILL leaves the workers running without their master, holding the port.
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: not pid_alive(master), 10, what="the master to die")
    assert proxy.master_pid() is None
    # The core's periodic pass applies the same configuration again: nginx starts.
    assert apply(proxy, services) == "started"
    new_master = proxy.master_pid()
    assert new_master not in (None, master)
    assert not any(pid_alive(pid) for pid in workers)
    assert http_get(f"http://127.0.0.1:{port}/") == "I am a\n"
    assert holding(proxy.error_log) == {new_master, *proxy.worker_pids()}


def test_close_leaves_nginx_running_and_stop_process_stops_it(
    make_nginx: MakeNginx, backends: Backends
) -> None:
    proxy = make_nginx()
    a = backends("a")
    port = free_port()
    services = [http_service("one", port, a)]
    apply(proxy, services)
    master, workers = proxy.master_pid(), proxy.worker_pids()
    assert master is not None
    proxy.close()
    assert http_get(f"http://127.0.0.1:{port}/") == "I am a\n"
    assert proxy.stop_process() is True
    assert not pid_alive(master)
    assert not any(pid_alive(pid) for pid in workers)
    assert not proxy.pid_file.exists()
    assert proxy.stop_process() is False
    assert apply(proxy, services) == "started"
    assert http_get(f"http://127.0.0.1:{port}/") == "I am a\n"


def test_apply_delay_allows_one_reload_per_interval(
    make_nginx: MakeNginx, backends: Backends
) -> None:
    proxy = make_nginx(reload_interval=0.5)
    a, b = backends("a"), backends("b")
    port = free_port()
    one = [http_service("web", port, a)]
    two = [http_service("web", port, a, b)]
    # Nothing runs: a start is never delayed.
    assert proxy.apply_delay(proxy.render(one), one) == 0
    assert apply(proxy, one) == "started"
    delay = proxy.apply_delay(proxy.render(two), two)
    assert 0 < delay <= 0.5
    # The core waits that long, then applies: every apply it makes respects the interval.
    for services in (two, one, two):
        while (delay := proxy.apply_delay(proxy.render(services), services)) > 0:
            time.sleep(delay)
        assert apply(proxy, services) == "reloaded"
    # The wait is the proxy's own arithmetic, not a measured duration of anything external.
    assert proxy.last_reload is not None
    three = [http_service("web", port, a, b, backends("c"))]
    assert proxy.apply_delay(proxy.render(three), three) > 0  # a server more: it waits
    # A change that only takes servers out is never held back (the server may be dead).
    assert proxy.apply_delay(proxy.render(one), one) == 0
    # No interval: never delayed.
    assert make_nginx(reload_interval=0).apply_delay(proxy.render(one), one) == 0


def test_a_reload_drains_requests_and_connections_started_before_it(
    make_nginx: MakeNginx, backends: Backends, echoes: Echoes
) -> None:
    proxy = make_nginx(drain_timeout="30s")
    a, b = backends("a"), backends("b")
    e, f = echoes("e"), echoes("f")
    web, raw = free_port(), free_port()
    apply(proxy, [http_service("web", web, a), http_service("raw", raw, e, mode="tcp")])
    old_workers = proxy.worker_pids()

    result: dict[str, object] = {}

    def slow_request() -> None:
        try:
            result["body"] = http_get(f"http://127.0.0.1:{web}/slow?2", timeout=30)
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=slow_request)
    thread.start()
    conn = socket.create_connection(("127.0.0.1", raw), timeout=10)
    try:
        conn.sendall(b"before")
        assert conn.recv(100) == b"e:before"
        assert a.slow_started.wait(10)
        # Both backends leave the configuration while the request and the connection are open.
        assert (
            apply(proxy, [http_service("web", web, b), http_service("raw", raw, f, mode="tcp")])
            == "reloaded"
        )
        assert http_get(f"http://127.0.0.1:{web}/") == "I am b\n"
        assert echo_once(raw, b"new") == b"f:new"
        # The old connection still reaches its backend through the draining worker.
        conn.sendall(b"after")
        assert conn.recv(100) == b"e:after"
        assert proxy.worker_pids() & old_workers
    finally:
        conn.close()
        thread.join(30)
    assert result == {"body": "I am a\n"}
    wait_for(lambda: not proxy.worker_pids() & old_workers, 30, what="old workers to finish")


def test_a_dead_backend_costs_http_clients_nothing(
    make_nginx: MakeNginx, backends: Backends
) -> None:
    good = backends("good")
    port = free_port()
    dead = ServiceInstance(
        service="web", id="host1:dead:8000:tcp", address="127.0.0.1", port=free_port()
    )
    web = Service("web", port, mode="http", instances=(good.instance("web", port), dead))
    proxy = make_nginx(max_fails=0)  # never skipped: every other request meets the dead one
    apply(proxy, [web])
    url = f"http://127.0.0.1:{port}/"
    assert [status_code(url) for _ in range(10)] == [200] * 10
    assert [status_code(url, "POST", b"x=1") for _ in range(4)] == [200] * 4  # nothing was sent


def test_a_backend_that_hangs_up_gets_gets_replayed_but_not_posts(
    make_nginx: MakeNginx, backends: Backends
) -> None:
    """A server that accepts and hangs up (a dying container behind docker-proxy): a GET is
    replayed on the good server; a POST that was sent to it is not (its client gets the 502)."""
    good = backends("good")
    with socket.socket() as closer:
        closer.bind(("127.0.0.1", 0))
        closer.listen(64)
        closer.settimeout(0.1)
        stop = threading.Event()

        def hang_up() -> None:
            while not stop.is_set():
                try:
                    conn, _ = closer.accept()
                except OSError:
                    continue
                conn.recv(65536)  # read the request, then close without an answer
                conn.close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        try:
            port = free_port()
            bad = ServiceInstance(
                service="web",
                id="host1:bad:8000:tcp",
                address="127.0.0.1",
                port=closer.getsockname()[1],
            )
            web = Service("web", port, mode="http", instances=(good.instance("web", port), bad))
            proxy = make_nginx(max_fails=0, upstream_keepalive=0)
            apply(proxy, [web])
            url = f"http://127.0.0.1:{port}/"
            assert [status_code(url) for _ in range(6)] == [200] * 6
            statuses = [status_code(url, "POST", b"x=1") for _ in range(4)]
            # Round robin sends two of the four POSTs to the server that hangs up: nginx does not
            # replay them on the good server.
            assert statuses.count(200) == 2, statuses
            assert statuses.count(502) == 2, statuses
        finally:
            stop.set()
            thread.join()


def answers_whoami(port: int) -> bool:
    return "I am" in http_get(f"http://127.0.0.1:{port}/")


def test_whoami_containers_are_reached_through_http_and_tcp_frontends(
    make_nginx: MakeNginx, docker_client: docker.DockerClient, cleanup_containers: None
) -> None:
    containers = [run_whoami(docker_client) for _ in range(2)]
    ports = [published_port(c) for c in containers]
    for port in ports:
        wait_for(functools.partial(answers_whoami, port), 30, what="whoami")
    web, raw = free_port(), free_port()
    members = [
        ServiceInstance(
            service=name,
            id=f"host1:{c.id[:12]}:8000:tcp",
            address="127.0.0.1",
            port=port,
            frontend_port=front,
        )
        for name, front in (("whoami", web), ("whoami-tcp", raw))
        for c, port in zip(containers, ports, strict=True)
    ]
    services = [
        Service("whoami", web, mode="http", instances=tuple(members[:2])),
        Service("whoami-tcp", raw, mode="tcp", instances=tuple(members[2:])),
    ]
    proxy = make_nginx()
    assert apply(proxy, services) == "started"
    names = {f"I am {c.id[:12]}\n" for c in containers}
    assert {http_get(f"http://127.0.0.1:{web}/") for _ in range(6)} == names
    assert {http_get(f"http://127.0.0.1:{raw}/") for _ in range(6)} == names


def test_filesystem_errors_are_reported_as_plugin_errors(tmp_path: Path, nginx_binary: str) -> None:
    (tmp_path / "nginx").write_text("a file where the directory should be")
    proxy = make_proxy(nginx_context(tmp_path, binary=nginx_binary))
    config = proxy.render([])
    with pytest.raises(PluginError, match="nginx: cannot stage"):
        proxy.validate(config)
    with pytest.raises(PluginError, match="nginx: cannot apply"):
        proxy.apply(config, [])
