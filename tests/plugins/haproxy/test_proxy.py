"""The HAProxy proxy plugin, against the real haproxy binary.

Backends are small Python HTTP servers on 127.0.0.1 answering ``I am <name>``; every HAProxy a
test starts is stopped by the ``make_haproxy`` fixture.
"""

from __future__ import annotations

import http.client
import itertools
import logging
import os
import random
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from discoverd import (
    ConfigError,
    PluginError,
    ProxyConfigError,
    Service,
    ServiceInstance,
)
from discoverd.core.manager import get_plugin_manager
from discoverd.plugins.haproxy import make_proxy
from discoverd.plugins.haproxy.config import WorkerUser
from discoverd.plugins.haproxy.proxy import HAProxy
from discoverd.plugins.haproxy.sockets import (
    cli,
    filter_server_state,
    parse_show_proc,
)
from discoverd.proxykit import pid_alive
from tests.plugins.haproxy.conftest import NameServer, haproxy_context, http_service
from tests.plugins.traffic import apply_servable
from tests.support.services import free_port, http_get, wait_for

GOLDEN = Path(__file__).parent / "golden"
MakeHAProxy = Callable[..., HAProxy]
Backends = Callable[[str], NameServer]


# --------------------------------------------------------------------------------------------
# Helpers


def offline_proxy(**options: object) -> HAProxy:
    """A proxy for render-only tests (no binary needed, nothing written), rendering as when
    discoverd does not run as root (no user/group lines), so its render is the same on every
    machine."""
    ctx = haproxy_context(Path("/run/discoverd"), **options)
    return HAProxy(ctx.config, ctx.state_dir, workers=WorkerUser())


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
                instance("api", "d4e5f6a1b2c3", 32771, check_http="/healthz"),
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
        result.append(
            Service(
                service.name,
                service.frontend_port,
                protocol=service.protocol,
                mode=service.mode,
                instances=tuple(members),
            )
        )
    rng.shuffle(result)
    return result


def answers(port: int, count: int) -> list[str]:
    return [http_get(f"http://127.0.0.1:{port}/").strip() for _ in range(count)]


def master_cli(proxy: HAProxy, command: str) -> str:
    """The master CLI's raw answer (the tests read it themselves, not through the plugin)."""
    return cli(proxy.master_socket, command, timeout=5.0)


def proc(proxy: HAProxy) -> tuple[int, int, list[int]]:
    """(master pid, reload count, worker pids) as ``show proc`` prints them."""
    master, reloads, workers = 0, -1, []
    for line in master_cli(proxy, "show proc").splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0].isdigit():
            if fields[1] == "master":
                master, reloads = int(fields[0]), int(fields[2])
            elif fields[1] == "worker":
                workers.append(int(fields[0]))
    return master, reloads, sorted(workers)


def masters_on(proxy: HAProxy) -> list[int]:
    """Live haproxy masters naming this proxy's master socket (workers carry the same command
    line: a master is one whose parent is not among them)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        ours = any(arg.startswith(f"{proxy.master_socket},".encode()) for arg in argv)
        if ours and pid_alive(int(entry.name)):
            ppid = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid"))
            found[int(entry.name)] = int(ppid)
    return sorted(pid for pid, parent in found.items() if parent not in found)


# --------------------------------------------------------------------------------------------
# Registration and options


def test_plugin_is_registered_with_its_options() -> None:
    plugin = get_plugin_manager().proxy("haproxy")
    assert [o.name for o in plugin.options] == [
        "binary",
        "bind",
        "stats_bind",
        "stats_port",
        "template_dir",
        "user",
        "group",
        "balance",
        "check_interval",
        "retries",
        "timeout_connect",
        "timeout_client",
        "timeout_server",
        "maxconn",
        "drain_timeout",
        "reload_interval",
        "httpclient_verify",
    ]
    defaults = {o.name: o.default for o in plugin.options}
    assert defaults["balance"] == "leastconn"
    assert {o.name: o.choices for o in plugin.options}["balance"] == (
        "leastconn",
        "roundrobin",
        "random",
    )
    assert defaults["drain_timeout"] == 10.0
    assert defaults["reload_interval"] == 0.5
    assert defaults["stats_port"] == 1936
    assert defaults["stats_bind"] == "127.0.0.1"
    assert defaults["bind"] == ""


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"bind": "localhost"}, "bind"),
        ({"stats_bind": "1.2.3"}, "stats_bind"),
        ({"stats_port": 70000}, "stats_port"),
        ({"stats_port": "x"}, "stats_port"),
        ({"retries": -1}, "retries"),
        ({"maxconn": 0}, "maxconn"),
        ({"check_interval": "0s"}, "check_interval"),
        ({"check_interval": "fast"}, "check_interval"),
        ({"timeout_client": "30 s"}, "timeout_client"),
        ({"timeout_server": "1s\ntimeout tunnel 1h"}, "timeout_server"),
        ({"binary": ""}, "binary"),
        ({"template_dir": "/nonexistent/templates"}, "template_dir"),
        ({"colour": "blue"}, "colour"),
        ({"drain_timeout": -1}, "drain_timeout"),
        ({"drain_timeout": "soon"}, "drain_timeout"),
        ({"drain_timeout": float("nan")}, "drain_timeout"),
        ({"reload_interval": 7200}, "reload_interval"),
        ({"user": "nobody\n    user root"}, "user"),
        ({"group": "wheel;"}, "group"),
        ({"balance": "source"}, "balance"),
    ],
)
def test_bad_options_are_refused_at_factory_time(options: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        offline_proxy(**options)


def test_state_dir_that_haproxy_cannot_use_is_refused() -> None:
    for bad in ("/tmp/it's", "/tmp/a,b", "/tmp/" + "x" * 100):
        with pytest.raises(PluginError, match="state"):
            HAProxy(offline_proxy().config, Path(bad))


def test_reserved_ports_name_the_stats_page() -> None:
    assert offline_proxy().reserved_ports() == frozenset({1936})
    assert offline_proxy(stats_port=4000).reserved_ports() == frozenset({4000})
    assert offline_proxy(stats_port=0).reserved_ports() == frozenset()
    assert "listen Stats" not in offline_proxy(stats_port=0).render([])


# --------------------------------------------------------------------------------------------
# Render


def test_render_matches_the_reviewed_golden_file() -> None:
    text = offline_proxy().render(sample_services())
    golden = GOLDEN / "haproxy.cfg"
    if os.environ.get("DISCOVERD_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()


def test_render_is_deterministic_whatever_the_order() -> None:
    proxy = offline_proxy()
    expected = proxy.render(sample_services())
    rng = random.Random(7)
    for _ in range(10):
        assert proxy.render(shuffled(sample_services(), rng)) == expected


def test_render_uses_the_options() -> None:
    text = offline_proxy(
        bind="127.0.0.2",
        stats_bind="::1",
        stats_port=4000,
        check_interval="250ms",
        retries=5,
        timeout_connect="2s",
        timeout_client="1m",
        timeout_server="45s",
        maxconn=100,
    ).render(sample_services())
    assert "    bind 127.0.0.2:8000\n" in text
    assert "    bind [::1]:4000\n" in text
    assert "check inter 250ms fastinter 100ms fall 2 rise 1" in text
    for line in ("retries 5", "timeout connect 2s", "timeout client 1m", "timeout server 45s"):
        assert f"    {line}\n" in text
    assert "    maxconn 100\n" in text
    assert "    balance leastconn\n" in text  # the default
    rendered = offline_proxy(balance="roundrobin").render(sample_services())
    assert "    balance roundrobin\n" in rendered


def test_udp_services_are_a_comment_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    proxy = offline_proxy()
    with caplog.at_level(logging.WARNING):
        first = proxy.render(sample_services())
        proxy.render(sample_services())
    warnings = [r for r in caplog.records if "dns" in r.getMessage()]
    assert len(warnings) == 1
    assert "udp" in warnings[0].getMessage()
    assert "frontend dns" not in first
    assert "# service dns: udp port 53 is not served" in first


def test_two_services_on_one_port_are_refused_by_render() -> None:
    services = [Service("a", 8000), Service("b", 8000)]
    with pytest.raises(PluginError, match="8000"):
        offline_proxy().render(services)
    with pytest.raises(PluginError, match="stats page"):
        offline_proxy().render([Service("a", 1936)])


def test_a_user_template_extends_the_shipped_one(tmp_path: Path) -> None:
    (tmp_path / "haproxy.cfg.j2").write_text(
        '{% extends "default:haproxy.cfg.j2" %}\n'
        "{% block defaults_extra %}\n"
        "    timeout tunnel 1h\n"
        "{% endblock %}\n"
        "{% block service_extra %}\n"
        "    # owner of {{ service.name }}: team-{{ service.meta.get('team', 'none') }}\n"
        "{% endblock %}\n"
    )
    text = offline_proxy(template_dir=str(tmp_path)).render(sample_services())
    assert "    timeout tunnel 1h\n" in text
    assert "    # owner of whoami: team-none\n" in text
    assert "frontend whoami" in text


@pytest.mark.parametrize("escape", ["\\n", "\\r", "\\x00"])
@pytest.mark.parametrize(
    ("printed", "refusal"), [("'a{}bind :1'", "line break"), ("'a{}b' | quote", "cannot quote")]
)
def test_no_line_break_reaches_the_output(
    tmp_path: Path, escape: str, printed: str, refusal: str
) -> None:
    (tmp_path / "haproxy.cfg.j2").write_text(
        '{% extends "default:haproxy.cfg.j2" %}\n'
        f"{{% block global_extra %}}    description {{{{ {printed.format(escape)} }}}}\n"
        "{% endblock %}\n"
    )
    proxy = offline_proxy(template_dir=str(tmp_path))
    with pytest.raises(PluginError, match=refusal):
        proxy.render([])


def test_a_broken_user_template_is_refused_at_factory_time(tmp_path: Path) -> None:
    (tmp_path / "haproxy.cfg.j2").write_text("{% block global_extra %}\n")
    with pytest.raises(PluginError, match="template"):
        offline_proxy(template_dir=str(tmp_path))


def test_filter_server_state_drops_servers_that_moved_or_left() -> None:
    header = "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_port"
    dump = "\n".join(
        [
            "1",
            header,
            "3 web 1 a 127.0.0.1 0 8001",
            "3 web 2 b 127.0.0.1 2 8002",
            "3 web 3 c 127.0.0.1 2 8003",
            "4 db 1 d ::1 2 5432",
            "",
        ]
    )
    servers = {
        ("web", "a"): ("127.0.0.1", 8001),  # same place: kept
        ("web", "b"): ("127.0.0.1", 9002),  # moved: dropped
        ("db", "d"): ("0:0::1", 5432),  # same address, spelled differently: kept
    }
    assert filter_server_state(dump, servers) == (
        f"1\n{header}\n3 web 1 a 127.0.0.1 0 8001\n4 db 1 d ::1 2 5432\n"
    )
    assert filter_server_state("garbage", servers) == ""


def test_parse_show_proc_of_haproxy_2_6() -> None:
    text = (
        "#<PID>          <type>          <reloads>       <uptime>        <version>\n"
        "20551           master          1 [failed: 1]   0d00h00m46s     2.6.12-1+deb12u4\n"
        "# workers\n"
        "20553           worker          1               0d00h00m46s     2.6.12-1+deb12u4\n"
        "# programs\n"
    )
    status = parse_show_proc(text)
    assert status is not None
    assert (status.master, status.reloads, status.failed, status.workers) == (
        20551,
        1,
        1,
        (20553,),
    )
    assert parse_show_proc("") is None


# --------------------------------------------------------------------------------------------
# Validate


def test_validate_accepts_a_render(make_haproxy: MakeHAProxy) -> None:
    proxy = make_haproxy()
    proxy.validate(proxy.render(sample_services()))
    assert not list(proxy.dir.glob("candidate*"))


@pytest.mark.parametrize("verify", [False, True])
def test_the_system_s_ca_certificates_are_read_only_when_asked(
    make_haproxy: MakeHAProxy, verify: bool
) -> None:
    """HAProxy 2.6 reads the system's CA store at every start and check for its HTTP client,
    unless the client does not verify; both renders are valid configurations."""
    proxy = make_haproxy(httpclient_verify=verify)
    config = proxy.render(sample_services())
    assert ("\n    httpclient.ssl.verify none\n" in config) is not verify
    proxy.validate(config)


def test_lua_with_an_unverifying_http_client_is_warned_once(
    make_haproxy: MakeHAProxy,
    backends: Backends,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = tmp_path / "noop.lua"
    script.write_text("-- nothing\n")
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "haproxy.cfg.j2").write_text(
        '{% extends "default:haproxy.cfg.j2" %}\n'
        f"{{% block global_extra %}}    lua-load {script}\n{{% endblock %}}\n"
    )
    proxy = make_haproxy(template_dir=str(templates))
    one = http_service("one", free_port(), backends("a"))
    two = http_service("two", free_port(), backends("b"))
    with caplog.at_level(logging.WARNING):
        assert apply_servable(proxy, [one]) == ({}, "started")
        assert apply_servable(proxy, [one, two]) == ({}, "reloaded")
    warned = [r for r in caplog.records if "httpclient_verify" in r.getMessage()]
    assert len(warned) == 1
    caplog.clear()
    quiet = make_haproxy(template_dir=str(templates), httpclient_verify=True)
    with caplog.at_level(logging.WARNING):
        left_out, _ = apply_servable(quiet, [http_service("three", free_port(), backends("c"))])
    assert left_out == {}
    assert not [r for r in caplog.records if "httpclient_verify" in r.getMessage()]


def test_validate_reports_haproxy_s_own_message(make_haproxy: MakeHAProxy, tmp_path: Path) -> None:
    (tmp_path / "haproxy.cfg.j2").write_text(
        '{% extends "default:haproxy.cfg.j2" %}\n'
        "{% block defaults_extra %}\n    frobnicate now\n{% endblock %}\n"
    )
    proxy = make_haproxy(template_dir=str(tmp_path))
    config = proxy.render(sample_services())
    with pytest.raises(ProxyConfigError) as caught:
        proxy.validate(config)
    message = str(caught.value)
    assert "unknown keyword 'frobnicate'" in message
    assert "\n" not in message
    assert not list(proxy.dir.glob("candidate*"))


def test_a_first_start_is_its_own_check(make_haproxy: MakeHAProxy, tmp_path: Path) -> None:
    """Nothing runs: no haproxy -c before the start (HAProxy checks as it starts, and a refused
    start leaves nothing running). Once it runs, every candidate is checked again."""
    (tmp_path / "haproxy.cfg.j2").write_text(
        '{% extends "default:haproxy.cfg.j2" %}\n'
        "{% block defaults_extra %}\n    frobnicate now\n{% endblock %}\n"
    )
    broken = make_haproxy(template_dir=str(tmp_path))
    config = broken.render(sample_services())
    assert broken.needs_check(config) is False
    with pytest.raises(PluginError, match="frobnicate") as refused:
        broken.apply(config, sample_services())
    assert not isinstance(refused.value, ProxyConfigError)  # the core checks it next
    assert broken.status() is None  # nothing was left running
    assert broken.needs_check(config) is False
    with pytest.raises(ProxyConfigError, match="unknown keyword 'frobnicate'"):
        broken.validate(config)

    proxy = make_haproxy()
    services = [http_service("web", free_port())]
    config = proxy.render(services)
    assert proxy.needs_check(config) is False
    assert proxy.apply(config, services) == "started"
    assert proxy.needs_check(config) is True


# --------------------------------------------------------------------------------------------
# Apply, against a running HAProxy


def test_apply_starts_haproxy_and_balances_round_robin(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy()
    a, b = backends("a"), backends("b")
    port = free_port()
    services = [http_service("web", port, a, b)]
    config = proxy.render(services)
    proxy.validate(config)
    assert proxy.apply(config, services) == "started"
    assert proxy.config_file.read_text() == config
    assert proxy.dir.stat().st_mode & 0o777 == 0o700
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/").startswith("I am"), 10, what="web")
    seen = answers(port, 6)
    assert set(seen) == {"I am a", "I am b"}
    assert all(x != y for x, y in itertools.pairwise(seen)), seen
    page = http_get(f"http://127.0.0.1:{proxy.config.stats_port}/")
    assert "Statistics Report" in page
    assert "web" in page


@pytest.mark.parametrize("balance", ["leastconn", "roundrobin"])
def test_leastconn_passes_a_server_busy_with_a_request(
    balance: str, make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    """With the default, new requests go to the server without one in progress (a server slow
    to answer, or to accept, gets fewer); with roundrobin each server gets its turn."""
    proxy = make_haproxy(balance=balance)
    a, b = backends("a"), backends("b")
    port = free_port()
    services = [http_service("web", port, a, b)]
    assert apply_servable(proxy, services) == ({}, "started")
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/").startswith("I am"), 10, what="web")
    slow = threading.Thread(target=http_get, args=(f"http://127.0.0.1:{port}/sleep/20",))
    slow.start()
    wait_for(lambda: a.slow.is_set() or b.slow.is_set(), 10, what="the slow request")
    busy, free = (a, b) if a.slow.is_set() else (b, a)
    seen = set(answers(port, 6))
    if balance == "leastconn":
        assert seen == {f"I am {free.name}"}
    else:
        assert seen == {"I am a", "I am b"}
    busy.stop()  # ends the slow request
    slow.join(10)


def test_a_tcp_service_and_an_empty_one(make_haproxy: MakeHAProxy, backends: Backends) -> None:
    proxy = make_haproxy()
    a = backends("a")
    tcp_port, empty_port = free_port(), free_port()
    services = [
        http_service("plain", tcp_port, a, mode="tcp"),
        Service("nobody", empty_port, mode="http"),
    ]
    proxy.apply(proxy.render(services), services)
    wait_for(lambda: http_get(f"http://127.0.0.1:{tcp_port}/") == "I am a\n", 10, what="tcp")
    # No instance: the frontend still answers, with a clean 503, not a refused connection.
    with socket.create_connection(("127.0.0.1", empty_port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 503")


def test_same_config_is_unchanged_and_a_new_one_reloads(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy()
    a, b = backends("a"), backends("b")
    port1, port2 = free_port(), free_port()
    first = [http_service("one", port1, a)]
    proxy.apply(proxy.render(first), first)
    master, reloads, workers = proc(proxy)

    assert proxy.apply(proxy.render(first), first) == "unchanged"
    assert proc(proxy) == (master, reloads, workers)

    second = [http_service("one", port1, a), http_service("two", port2, b)]
    assert proxy.apply(proxy.render(second), second) == "reloaded"
    assert proxy.config_file.read_text() == proxy.render(second)
    assert http_get(f"http://127.0.0.1:{port2}/") == "I am b\n"
    assert http_get(f"http://127.0.0.1:{port1}/") == "I am a\n"
    new_master, new_reloads, _ = proc(proxy)
    assert (new_master, new_reloads) == (master, reloads + 1)
    wait_for(
        lambda: not set(proc(proxy)[2]) & set(workers) and len(proc(proxy)[2]) == 1,
        15,
        what="the old worker to leave",
    )
    for pid in workers:
        assert not pid_alive(pid)


def test_a_reload_that_cannot_bind_is_reported_and_the_old_config_serves_on(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy()
    a, b = backends("a"), backends("b")
    port1 = free_port()
    first = [http_service("one", port1, a)]
    good = proxy.render(first)
    proxy.apply(good, first)
    master, _, workers = proc(proxy)

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        second = [http_service("one", port1, a), http_service("two", taken, b)]
        candidate = proxy.render(second)
        proxy.validate(candidate)  # haproxy -c does not bind: it passes
        with pytest.raises(PluginError) as caught:
            proxy.apply(candidate, second)
        assert "Address already in use" in str(caught.value)
        assert str(taken) in str(caught.value)
        # The status of the last apply says so (what a health endpoint serves).
        status = proxy.last_apply
        assert status is not None and status.failed and status.error == str(caught.value)
        assert proxy.config_file.read_text() == good
        assert http_get(f"http://127.0.0.1:{port1}/") == "I am a\n"
        assert proc(proxy)[0] == master
        assert proc(proxy)[2] == workers

        # The same candidate again is tried again (and fails again), never "unchanged".
        with pytest.raises(PluginError):
            proxy.apply(candidate, second)

    # Once the port is free the same candidate goes through.
    assert proxy.apply(candidate, second) == "reloaded"
    assert http_get(f"http://127.0.0.1:{taken}/") == "I am b\n"
    assert proxy.last_apply is not None and proxy.last_apply.result == "reloaded"


def test_a_refused_candidate_leaves_the_running_haproxy_alone(
    make_haproxy: MakeHAProxy, backends: Backends, tmp_path: Path
) -> None:
    proxy = make_haproxy()
    a = backends("a")
    port = free_port()
    services = [http_service("one", port, a)]
    good = proxy.render(services)
    proxy.apply(good, services)
    before = proc(proxy)

    (tmp_path / "haproxy.cfg.j2").write_text(
        '{% extends "default:haproxy.cfg.j2" %}\n'
        "{% block service_extra %}\n    frobnicate {{ service.name }}\n{% endblock %}\n"
    )
    other = make_haproxy(template_dir=str(tmp_path), stats_port=proxy.config.stats_port)
    with pytest.raises(ProxyConfigError, match="frobnicate"):
        other.validate(other.render(services))
    assert proxy.config_file.read_text() == good
    assert proc(proxy) == before
    assert http_get(f"http://127.0.0.1:{port}/") == "I am a\n"


def test_a_second_proxy_adopts_the_running_master(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    first_proxy = make_haproxy()
    a, b = backends("a"), backends("b")
    port1, port2 = free_port(), free_port()
    first = [http_service("one", port1, a)]
    first_proxy.apply(first_proxy.render(first), first)
    first_proxy.close()  # discoverd exits: HAProxy keeps serving
    assert http_get(f"http://127.0.0.1:{port1}/") == "I am a\n"
    master, reloads, _ = proc(first_proxy)

    adopter = make_haproxy(stats_port=first_proxy.config.stats_port)
    assert adopter.apply(adopter.render(first), first) == "unchanged"
    second = [http_service("one", port1, a), http_service("two", port2, b)]
    assert adopter.apply(adopter.render(second), second) == "reloaded"
    assert http_get(f"http://127.0.0.1:{port2}/") == "I am b\n"
    assert proc(adopter)[:2] == (master, reloads + 1)
    assert masters_on(adopter) == [master]


def test_a_lost_pid_file_does_not_start_a_second_master(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy()
    a = backends("a")
    services = [http_service("one", free_port(), a)]
    proxy.apply(proxy.render(services), services)
    master = proc(proxy)[0]
    proxy.pid_file.unlink()
    assert proxy.apply(proxy.render(services), services) == "unchanged"
    assert proxy.pid_file.read_text().strip() == str(master)
    assert masters_on(proxy) == [master]


def test_health_states_survive_a_reload(make_haproxy: MakeHAProxy, backends: Backends) -> None:
    proxy = make_haproxy(check_interval="100ms")
    a = backends("a")
    dead_port = free_port()  # nothing listens there
    dead = ServiceInstance(
        service="web", id="host1:dead:8000:tcp", address="127.0.0.1", port=dead_port
    )
    port = free_port()
    web = Service("web", port, mode="http", instances=(a.instance("web", port), dead))
    proxy.apply(proxy.render([web]), [web])

    def op_state(server: str) -> str:
        for line in cli(proxy.admin_socket, "show servers state web").splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "web" and fields[3] == server:
                return fields[5]  # srv_op_state: 0 stopped, 2 running
        return "?"

    wait_for(lambda: op_state(dead.id) == "0", 10, what="the dead server to go down")
    more = [web, http_service("more", free_port(), a)]
    assert proxy.apply(proxy.render(more), more) == "reloaded"
    # Without the saved state the new worker would start the dead server as up.
    assert op_state(dead.id) == "0"
    assert op_state(a.instance("web", port).id) == "2"
    saved = [line.split() for line in proxy.server_state.read_text().splitlines()[2:]]
    assert ["web", dead.id, "0"] in [[f[1], f[3], f[5]] for f in saved]
    assert all(http_get(f"http://127.0.0.1:{port}/") == "I am a\n" for _ in range(4))


def test_close_leaves_haproxy_running_and_stop_process_stops_it(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy()
    a = backends("a")
    port = free_port()
    services = [http_service("one", port, a)]
    proxy.apply(proxy.render(services), services)
    master, _, workers = proc(proxy)
    proxy.close()
    assert http_get(f"http://127.0.0.1:{port}/") == "I am a\n"
    assert proxy.stop_process() is True
    assert not pid_alive(master)
    assert not any(pid_alive(pid) for pid in workers)
    assert not proxy.pid_file.exists()
    assert proxy.stop_process() is False
    # And a later apply starts it again.
    assert proxy.apply(proxy.render(services), services) == "started"
    assert http_get(f"http://127.0.0.1:{port}/") == "I am a\n"


def test_a_start_that_fails_is_reported_with_haproxy_s_reason(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy()
    a = backends("a")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        services = [http_service("one", taken, a)]
        with pytest.raises(PluginError, match="Address already in use"):
            proxy.apply(proxy.render(services), services)
    assert not proxy.config_file.exists()
    assert proxy.status() is None


def test_http_mode_replays_gets_but_not_posts(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    """A server that accepts and hangs up at once (a dying container behind docker-proxy): a GET
    is replayed on the good server; a POST that reached it is not (its client gets the 502).
    It answers HAProxy's health checks (OPTIONS), so that it stays in rotation."""
    good = backends("good")
    with socket.socket() as closer:
        closer.bind(("127.0.0.1", 0))
        closer.listen(64)
        stop = threading.Event()

        def hang_up() -> None:
            closer.settimeout(0.1)
            while not stop.is_set():
                try:
                    conn, _ = closer.accept()
                except OSError:
                    continue
                with conn:
                    try:
                        conn.settimeout(1.0)
                        if conn.recv(4096).startswith(b"OPTIONS "):
                            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
                    except OSError:
                        pass

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
            proxy = make_haproxy()
            proxy.apply(proxy.render([web]), [web])
            url = f"http://127.0.0.1:{port}/"
            wait_for(lambda: http_get(url) == "I am good\n", 10, what="web")
            assert [http_get(url) for _ in range(6)] == ["I am good\n"] * 6

            statuses = []
            for _ in range(4):
                request = urllib.request.Request(url, data=b"x=1", method="POST")
                try:
                    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        request, timeout=5
                    ) as response:
                        statuses.append(response.status)
                except urllib.error.HTTPError as exc:
                    statuses.append(exc.code)
                except (http.client.RemoteDisconnected, ConnectionResetError):
                    statuses.append(0)  # closed without a status: not replayed either
            # Roundrobin sends two of the four POSTs to the server that hangs up: those fail
            # (502, or a closed connection) instead of being replayed on the good server.
            assert statuses.count(200) == 2, statuses
            assert sorted(s for s in statuses if s != 200) in ([0, 0], [0, 502], [502, 502])
        finally:
            stop.set()
            thread.join()


def test_an_http_check_path_that_is_not_a_plain_path_is_ignored() -> None:
    odd = Service("web", 8000, instances=(instance("web", "a", 1, check_http="/x if TRUE"),))
    assert "httpchk" not in offline_proxy().render([odd])
    plain = Service("web", 8000, instances=(instance("web", "a", 1, check_http="/ok?x=1"),))
    assert "    option httpchk GET /ok?x=1\n" in offline_proxy().render([plain])


def test_filesystem_errors_are_reported_as_plugin_errors(tmp_path: Path) -> None:
    """A state directory that cannot be used is an error for the operator, not a traceback."""
    (tmp_path / "haproxy").write_text("a file where the directory should be")
    proxy = make_proxy(haproxy_context(tmp_path))
    config = proxy.render([])
    with pytest.raises(PluginError, match="haproxy: cannot stage"):
        proxy.validate(config)
    with pytest.raises(PluginError, match="haproxy: cannot apply"):
        proxy.apply(config, [])
