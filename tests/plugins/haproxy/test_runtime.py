"""Changes without reloads, drain instead of drop, and the reload rate limit, against the real
haproxy binary. Backends are small Python HTTP servers on 127.0.0.1 (see conftest)."""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from discoverd import ProxyConfigError, Service, ServiceInstance
from discoverd.plugins.haproxy import sockets
from discoverd.plugins.haproxy.config_split import (
    checked_without_haproxy,
    runtime_changes,
    split_config,
)
from discoverd.plugins.haproxy.drain import drain_seconds
from discoverd.plugins.haproxy.proxy import HAProxy
from discoverd.plugins.haproxy.sockets import (
    CommandError,
    admin_many,
    cli,
    master_reload_count,
    server_ids,
    server_names,
    sessions,
    split_answers,
)
from tests.plugins.haproxy.conftest import NameServer
from tests.support.services import free_port, http_get, wait_for

GOLDEN = Path(__file__).parent / "golden" / "haproxy.cfg"
# The options of the golden file's server lines (HTTP and TCP backends).
HTTP_ARGS = "check inter 1s fastinter 100ms fall 2 rise 1 observe layer7 " + (
    "error-limit 1 on-error fastinter"
)
TCP_ARGS = "check inter 1s fastinter 100ms fall 2 rise 1 observe layer4 " + (
    "error-limit 1 on-error sudden-death"
)
MakeHAProxy = Callable[..., HAProxy]
Backends = Callable[..., NameServer]


# --------------------------------------------------------------------------------------------
# Helpers


def web(port: int, *members: NameServer | ServiceInstance, mode: str = "http") -> Service:
    instances = tuple(
        m if isinstance(m, ServiceInstance) else m.instance("web", port) for m in members
    )
    return Service("web", port, mode="http" if mode == "http" else "tcp", instances=instances)


def push(proxy: HAProxy, services: Sequence[Service]) -> str:
    """What the discover role does: render, validate, apply."""
    config = proxy.render(services)
    proxy.validate(config)
    return proxy.apply(config, services)


def reloads(proxy: HAProxy) -> int:
    count = master_reload_count(proxy.dir.parent)
    assert count is not None
    return count


def running_servers(proxy: HAProxy) -> dict[tuple[str, str], tuple[str, str, str]]:
    """(backend, server) -> (address, port, admin state) from ``show servers state``."""
    found = {}
    for line in cli(proxy.admin_socket, "show servers state", 5.0).splitlines()[2:]:
        f = line.split()
        if len(f) > 18:
            found[(f[1], f[3])] = (f[4], f[18], f[6])
    return found


def file_servers(proxy: HAProxy) -> dict[tuple[str, str], tuple[str, str]]:
    split = split_config(proxy.config_file.read_text())
    return {
        (section, name): (s.address, str(s.port))
        for section, servers in split.servers.items()
        for name, s in servers.items()
    }


def names_seen(port: int, count: int = 8) -> set[str]:
    return {http_get(f"http://127.0.0.1:{port}/").strip() for _ in range(count)}


def i_am(*servers: NameServer) -> set[str]:
    return {f"I am {s.name}" for s in servers}


class Getter(threading.Thread):
    """One GET through the proxy in the background; keeps the answer or the error."""

    def __init__(self, port: int, path: str) -> None:
        super().__init__(daemon=True)
        self.port, self.path = port, path
        self.answer: str | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", self.path)
            response = conn.getresponse()
            self.answer = f"{response.status} {response.read().decode().strip()}"
        except (OSError, http.client.HTTPException) as exc:
            self.error = exc
        finally:
            conn.close()


# --------------------------------------------------------------------------------------------
# Pure parts


def test_split_separates_server_lines_from_the_structure() -> None:
    text = GOLDEN.read_text()
    split = split_config(text)
    assert sorted(split.servers) == ["api", "redis", "whoami"]
    server = split.servers["api"]["host1:e5f6a1b2c3d4:8000:tcp"]
    assert (server.address, server.port, server.endpoint) == ("fd00::12", 32772, "[fd00::12]:32772")
    assert server.args == HTTP_ARGS and server.checked
    assert "    server " not in split.structure
    assert "backend billing" in split.structure
    assert not split.duplicates and not split.default_server

    # Servers only: runtime changes, no reload.
    fewer = text.replace("    server host1:a1b2c3d4e5f6:8000:tcp 127.0.0.1:32768\n", "")
    moved = fewer.replace("127.0.0.1:32773", "127.0.0.1:40000")
    added = moved.replace(  # the first backend without servers: billing
        f"    default-server {HTTP_ARGS}\n\n",
        f"    default-server {HTTP_ARGS}\n    server host1:new:9000:tcp 10.0.0.9:31000\n\n",
        1,
    )
    assert added != moved
    changes = runtime_changes(split, split_config(added))
    assert changes is not None
    assert [s.name for s in changes.removed] == ["host1:a1b2c3d4e5f6:8000:tcp"]
    assert [(s.section, s.port) for s in changes.moved] == [("redis", 40000)]
    assert [(s.section, s.name) for s in changes.added] == [("billing", "host1:new:9000:tcp")]
    # Added at run time with its backend's default-server options spelled out.
    assert changes.added[0].args == HTTP_ARGS
    assert checked_without_haproxy(split_config(added), split)

    # Anything else takes a reload.
    assert (
        runtime_changes(split, split_config(text.replace("balance leastconn", "balance first", 1)))
        is None
    )
    assert (
        runtime_changes(split, split_config(text.replace("fall 2 rise 1", "fall 3 rise 1", 1)))
        is None
    )
    assert runtime_changes(split, split_config(text.replace("bind *:8080", "bind *:8081"))) is None
    # New options, a duplicate name or an odd server line: haproxy -c must judge it.
    odd = split_config(text.replace("fall 2 rise 1", "fall 2 rise 1 frobnicate", 1))
    assert not checked_without_haproxy(odd, split)
    twice = text.replace(
        "    server host1:f6a1b2c3d4e5:8000:tcp 127.0.0.1:32773\n",
        "    server host1:f6a1b2c3d4e5:8000:tcp 127.0.0.1:32773\n" * 2,
    )
    assert split_config(twice).duplicates and not checked_without_haproxy(
        split_config(twice), split
    )
    quoted = split_config(text.replace("fall 2 rise 1", "fall 2 rise 1 ; disable server", 1))
    assert quoted.structure != split.structure  # not plain: kept in the structure
    hostname = split_config(text.replace("127.0.0.1:32773", "redis.local:32773"))
    assert runtime_changes(split, hostname) is None
    with_default = split_config(
        added.replace("defaults\n", "defaults\n    default-server maxconn 10\n")
    )
    assert with_default.default_server
    assert (
        runtime_changes(
            split_config(moved.replace("defaults\n", "defaults\n    default-server maxconn 10\n")),
            with_default,
        )
        is None
    )


def test_a_server_gets_the_default_server_options_of_its_backend_before_its_own() -> None:
    text = (
        "defaults\n    mode http\n"
        "backend a\n"
        "    server early 10.0.0.1:80 weight 5\n"
        "    default-server check inter 2s\n"
        "    server one 10.0.0.2:80\n"
        "    default-server fall 3\n"
        "    server two 10.0.0.3:80 inter 1s\n"
        "backend b\n"
        "    server three 10.0.0.4:80\n"
        "listen c\n"
        "    bind :81\n"
        "    default-server check\n"
        "    server four 10.0.0.5:80\n"
    )
    split = split_config(text)
    args = {name: s.args for servers in split.servers.values() for name, s in servers.items()}
    # As HAProxy reads them: the lines before a server, in order, then its own (a later
    # option overrides an earlier one); a new section starts from none.
    assert args == {
        "early": "weight 5",
        "one": "check inter 2s",
        "two": "check inter 2s fall 3 inter 1s",
        "three": "",
        "four": "check",
    }
    assert split.servers["a"]["one"].checked and not split.servers["b"]["three"].checked
    assert not split.default_server
    # Where HAProxy checked options: each server line, and each default-server line.
    on_lines = {(s.section, s.args) for own in split.servers.values() for s in own.values()}
    assert split.args == on_lines | {
        ("a", "check inter 2s"),
        ("a", "check inter 2s fall 3"),
        ("c", "check"),
    }
    # A new server of backend a is added at run time with those options.
    more = text.replace("    server two", "    server five 10.0.0.6:80\n    server two")
    changes = runtime_changes(split, split_config(more))
    assert changes is not None and [(s.name, s.args) for s in changes.added] == [
        ("five", "check inter 2s fall 3")
    ]
    # A changed default-server line changes every server after it: a reload.
    assert runtime_changes(split, split_config(text.replace("fall 3", "fall 4"))) is None
    # Options that cannot be spelled out in a runtime command, or a default-server line
    # outside a backend (HAProxy applies it; a runtime add would not): servers are added by a
    # reload.
    for odd in (
        text.replace("default-server fall 3", "default-server fall 3 # note"),
        text.replace("defaults\n", "defaults\n    default-server maxconn 10\n"),
    ):
        odd_split = split_config(odd)
        assert odd_split.default_server
        grown = odd.replace("    server two", "    server five 10.0.0.6:80\n    server two")
        assert runtime_changes(odd_split, split_config(grown)) is None


def test_a_server_line_may_turn_off_what_its_default_server_line_turns_on() -> None:
    text = (
        "backend a\n"
        "    default-server check agent-check agent-port 9 inter 2s\n"
        "    server plain 10.0.0.1:80\n"
        "    server quiet 10.0.0.2:80 no-check no-agent-check\n"
        "    server again 10.0.0.3:80 no-check check\n"
        "    default-server\n"  # HAProxy accepts an empty one: it changes nothing
        "    server after 10.0.0.4:80\n"
    )
    servers = split_config(text).servers["a"]
    # add server of HAProxy 2.6 refuses no-check and no-agent-check: left out, with what they
    # cancel (a server added at run time has no checks unless asked).
    assert [s.runtime_args for s in servers.values()] == [
        "check agent-check agent-port 9 inter 2s",
        "agent-port 9 inter 2s",
        "check agent-check agent-port 9 inter 2s check",
        "check agent-check agent-port 9 inter 2s",
    ]
    assert [(n, s.checked, s.agent_checked) for n, s in servers.items()] == [
        ("plain", True, True),
        ("quiet", False, False),  # no "enable health" for it: HAProxy would refuse that
        ("again", True, True),
        ("after", True, True),
    ]
    assert servers["after"].args == servers["plain"].args  # single-spaced, nothing added


def test_options_seen_in_one_backend_do_not_spare_the_check_of_another() -> None:
    text = (
        "backend web\n    server w1 10.0.0.1:80 check\n    server w2 10.0.0.2:80 track w1\n"
        "backend db\n    server d1 10.0.0.3:5432 check\n"
    )
    accepted = split_config(text)
    assert checked_without_haproxy(
        split_config(text + "    server d2 10.0.0.4:5432 check\n"), accepted
    )
    # "track w1" names a server of backend web: haproxy -c refuses it in db, and must see it.
    assert not checked_without_haproxy(
        split_config(text + "    server d2 10.0.0.4:5432 track w1\n"), accepted
    )
    # The first server of an empty backend, with the options of its default-server line,
    # which HAProxy checked there.
    empty = "backend e\n    mode tcp\n    default-server check inter 2s\n"
    assert checked_without_haproxy(
        split_config(empty + "    server e1 10.0.0.4:80\n"), split_config(empty)
    )
    assert not checked_without_haproxy(
        split_config(empty + "    server e1 10.0.0.4:80 weight 3\n"), split_config(empty)
    )
    # Unless HAProxy checks some of them only on a server (a port for the agent, a tracked
    # server, a CA file): such a backend accepts them while it is empty.
    for options in ("check agent-check", "track other/x", "check ssl", "check resolvers r"):
        empty = f"backend e\n    default-server {options}\n"
        assert not checked_without_haproxy(
            split_config(empty + "    server e1 10.0.0.4:80\n"), split_config(empty)
        ), options


def test_drain_seconds_parsing() -> None:
    assert drain_seconds("10") == 10.0
    assert drain_seconds("2.5") == 2.5
    assert drain_seconds("10s") == 10.0
    assert drain_seconds("0") == 0.0
    assert drain_seconds(" 500ms ") == 0.5
    for bad in ("", "soon", "-1", "nan", "inf", "1e9", "10m", "5mss", "ms"):
        assert drain_seconds(bad) is None, bad


def test_runtime_answers_are_parsed() -> None:
    dump = (
        "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state\n"
        "3 web 1 host1:a:8000:tcp 127.0.0.1 2 0 1 1 0 6 3 2 6 0 0 0 - 18001 - 0 0 - - 0\n"
        "3 web 7 b 127.0.0.1 2 0 1 1 0 6 3 2 6 0 0 0 - 18002 - 0 0 - - 0\n"
        "4 api 1 c 127.0.0.1 2 0 1 1 0 6 3 2 6 0 0 0 - 18003 - 0 0 - - 0\n"
    )
    assert server_ids(dump) == {"host1:a:8000:tcp": (3, 1), "b": (3, 7), "c": (4, 1)}
    assert server_names(dump) == {"web": {"host1:a:8000:tcp", "b"}, "api": {"c"}}
    stat = "# pxname,svname,qcur,qmax,scur,smax\nweb,a,1,0,2,5\nweb,b,0,0,0,1\n"
    assert sessions(stat) == {"a": 3, "b": 0}
    assert sessions("") == {}


def test_the_answers_to_a_line_of_commands_are_split() -> None:
    """As HAProxy 2.6 answers ``add server ...; enable health ...; set server ... state ready``
    (each answer ends with an empty line), and a line whose first two commands failed."""
    assert split_answers("New server registered.\n\n\n\n") == ["New server registered.", "", ""]
    assert split_answers("Already exists a server.\n\nNo such server.\n\n\n") == [
        "Already exists a server.",
        "No such server.",
        "",
    ]
    assert split_answers("\n") == [""]
    assert split_answers("") == []
    assert split_answers("cut") == ["cut"]


def test_a_bad_drain_value_is_warned_once(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    from tests.plugins.haproxy.test_proxy import offline_proxy

    proxy = offline_proxy()
    instance = ServiceInstance(
        "web", "host1:a:8000:tcp", "127.0.0.1", 1000, meta=(("drain", "a while"),)
    )
    good = ServiceInstance("web", "host1:b:8000:tcp", "127.0.0.1", 1001, meta=(("drain", "3"),))
    services = [Service("web", 8000, instances=(instance, good))]
    with caplog.at_level(logging.WARNING):
        periods = proxy.drain_periods.of(services)
        proxy.drain_periods.of(services)
    assert periods == {("web", "host1:b:8000:tcp"): 3.0}
    warned = [r for r in caplog.records if "a while" in r.getMessage()]
    assert len(warned) == 1 and "drain_timeout" in warned[0].getMessage()


# --------------------------------------------------------------------------------------------
# Changes without reloads


@pytest.mark.parametrize("balance", ["leastconn", "roundrobin", "random"])
def test_membership_changes_apply_at_runtime_without_a_reload(
    balance: str, make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    """Every balance choice keeps servers changeable at run time (HAProxy's dynamic
    algorithms). 30 requests: random may pass a server over a few times in a row."""
    proxy = make_haproxy(drain_timeout=0, balance=balance)
    a, b, c, d = (backends(n) for n in "abcd")
    port = free_port()
    assert push(proxy, [web(port, a, b)]) == "started"
    assert f"    balance {balance}\n" in proxy.config_file.read_text()
    wait_for(lambda: names_seen(port) == i_am(a, b), 10, what="a and b")
    before = reloads(proxy)

    assert push(proxy, [web(port, a, b, c)]) == "runtime"
    assert names_seen(port, 30) == i_am(a, b, c)

    assert push(proxy, [web(port, b, c)]) == "runtime"
    assert names_seen(port, 30) == i_am(b, c)

    # c moves to d's port (same instance id, new address): set server addr.
    moved = ServiceInstance("web", c.instance("web", port).id, "127.0.0.1", d.port)
    assert push(proxy, [web(port, b, moved)]) == "runtime"
    assert names_seen(port, 30) == {"I am b", "I am d"}

    assert reloads(proxy) == before
    assert proxy.reloads == 0 and proxy.runtime_applies == 3 and proxy.fallbacks == 0
    assert proxy.config_file.read_text() == proxy.render([web(port, b, moved)])
    wait_for(lambda: not proxy.draining(), 10, what="a to be freed")
    assert set(running_servers(proxy)) == {("web", b.instance("web", port).id), ("web", moved.id)}


def test_a_new_service_a_port_or_a_mode_change_reloads_once(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy(reload_interval=0)
    a, b = backends("a"), backends("b")
    port, other = free_port(), free_port()
    push(proxy, [web(port, a)])
    count = reloads(proxy)
    two = Service("two", other, mode="http", instances=(b.instance("two", other),))
    assert push(proxy, [web(port, a), two]) == "reloaded"
    assert reloads(proxy) == count + 1
    moved_port = free_port()
    two = Service("two", moved_port, mode="http", instances=(b.instance("two", moved_port),))
    assert push(proxy, [web(port, a), two]) == "reloaded"
    assert reloads(proxy) == count + 2
    assert push(proxy, [web(port, a, mode="tcp"), two]) == "reloaded"
    assert reloads(proxy) == count + 3
    assert http_get(f"http://127.0.0.1:{moved_port}/") == "I am b\n"
    assert http_get(f"http://127.0.0.1:{port}/") == "I am a\n"
    assert proxy.reloads == 3


def test_operator_maintenance_survives_a_reload(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy(reload_interval=0)
    a, b, c = backends("a"), backends("b"), backends("c")
    port = free_port()
    push(proxy, [web(port, a, b)])
    assert push(proxy, [web(port, a, b, c)]) == "runtime"  # c is a server added at run time
    a_id, c_id = a.instance("web", port).id, c.instance("web", port).id
    for server in (a_id, c_id):
        assert cli(proxy.admin_socket, f"set server web/{server} state maint").strip() == ""
    assert names_seen(port) == {"I am b"}

    other = free_port()
    more = [web(port, a, b, c), Service("two", other, instances=(b.instance("two", other),))]
    assert push(proxy, more) == "reloaded"
    servers = running_servers(proxy)
    assert int(servers[("web", a_id)][2]) & 1  # srv_admin_state: forced maintenance
    assert int(servers[("web", c_id)][2]) & 1
    assert names_seen(port) == {"I am b"}


def test_the_file_on_disk_is_what_runs_after_runtime_changes(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy(drain_timeout=0)
    members = [backends(n) for n in ("a", "b", "c", "d", "e")]
    port = free_port()
    push(proxy, [web(port, *members[:2])])
    push(proxy, [web(port, *members[1:4])])
    moved = ServiceInstance(
        "web", members[3].instance("web", port).id, "127.0.0.1", members[4].port
    )
    final = [web(port, members[1], members[2], moved)]
    assert push(proxy, final) == "runtime"
    wait_for(lambda: not proxy.draining(), 10, what="a to be freed")

    def live() -> dict[tuple[str, str], tuple[str, str]]:
        return {key: value[:2] for key, value in running_servers(proxy).items()}

    assert live() == file_servers(proxy)
    text = proxy.config_file.read_text()
    assert proxy.stop_process()
    # A new discoverd, or HAProxy started again from the file alone, runs the same servers.
    again = make_haproxy(stats_port=proxy.config.stats_port)
    assert again.apply(text, []) == "started"
    assert live() == file_servers(proxy)
    assert names_seen(port, 9) == {"I am b", "I am c", "I am e"}


def test_commands_sent_together_are_each_checked(
    make_haproxy: MakeHAProxy, backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    """:func:`admin_many` against the running HAProxy: many commands over few connections
    (lines cut at ``BATCH_BYTES``, made small here), every answer checked; a refused command is
    named, even in the middle of a line; a command that would be two is not sent."""
    proxy = make_haproxy(drain_timeout=0)
    a, b = backends("a"), backends("b")
    port = free_port()
    push(proxy, [web(port, a)])
    monkeypatch.setattr(sockets, "BATCH_BYTES", 300)
    sent: list[str] = []
    real_cli = sockets.cli

    def counting_cli(path: Path, command: str, timeout: float = 2.0) -> str:
        sent.append(command)
        return real_cli(path, command, timeout)

    monkeypatch.setattr(sockets, "cli", counting_cli)
    commands: list[tuple[str, str]] = []
    for i in range(12):
        commands.append((f"add server web/extra{i} 127.0.0.1:{b.port}", "New server registered"))
        commands.append((f"set server web/extra{i} state ready", ""))
    answers = admin_many(proxy.admin_socket, commands)
    assert len(answers) == 24 and answers[0] == "New server registered."
    assert 1 < len(sent) < 24 and all(len(line) <= 300 for line in sent)
    running = running_servers(proxy)
    assert all(("web", f"extra{i}") in running for i in range(12))
    assert names_seen(port, 40) == i_am(a, b)

    sent.clear()
    with pytest.raises(CommandError, match="web/nosuch"):
        admin_many(
            proxy.admin_socket,
            [
                ("set server web/extra0 state drain", ""),
                ("set server web/nosuch state drain", ""),
                ("set server web/extra1 state drain", ""),
            ],
        )
    assert len(sent) == 1
    assert running_servers(proxy)[("web", "extra1")][2] == "8"  # drain: sent on the same line
    with pytest.raises(CommandError, match="not one runtime command"):
        admin_many(proxy.admin_socket, [("set server web/extra2 state drain; help", "")])
    assert len(sent) == 1


def test_many_changes_converge(make_haproxy: MakeHAProxy, backends: Backends) -> None:
    proxy = make_haproxy(drain_timeout=0)
    pool = [backends(f"n{i}") for i in range(24)]
    port = free_port()
    push(proxy, [web(port, pool[0])])
    before = reloads(proxy)
    for i in range(1, 12):  # one at a time
        assert push(proxy, [web(port, *pool[: i + 1])]) == "runtime"
    assert push(proxy, [web(port, *pool[6:])]) == "runtime"  # a burst: -6 +12
    expected = {("web", s.instance("web", port).id) for s in pool[6:]}
    wait_for(lambda: set(running_servers(proxy)) == expected, 10, what="the old servers to go")
    assert reloads(proxy) == before
    assert names_seen(port, 36) == i_am(*pool[6:])


def test_a_refused_runtime_command_falls_back_to_a_reload(
    make_haproxy: MakeHAProxy, backends: Backends, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Sticky sessions: HAProxy 2.6 refuses 'cookie' on a server added at run time."""
    (tmp_path / "haproxy.cfg.j2").write_text(
        '{% extends "default:haproxy.cfg.j2" %}\n'
        "{% block service_extra %}\n    cookie SRV insert indirect nocache\n{% endblock %}\n"
        "{% block server %}\n"
        "    server {{ instance.id }} {{ instance.endpoint }} cookie s{{ instance.port }} check\n"
        "{% endblock %}\n"
    )
    proxy = make_haproxy(template_dir=str(tmp_path), reload_interval=0)
    a, b = backends("a"), backends("b")
    port = free_port()
    push(proxy, [web(port, a)])
    before = reloads(proxy)
    with caplog.at_level(logging.WARNING):
        assert push(proxy, [web(port, a, b)]) == "reloaded"
    assert reloads(proxy) == before + 1
    assert proxy.fallbacks == 1 and proxy.runtime_applies == 0
    assert any(
        "reloading instead" in r.getMessage() and "cookie" in r.getMessage() for r in caplog.records
    )
    assert names_seen(port) == i_am(a, b)
    assert proxy.config_file.read_text() == proxy.render([web(port, a, b)])


def test_a_lost_admin_socket_falls_back_to_a_reload(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    """The admin socket file removed under HAProxy (a careless cleanup of the state directory):
    the runtime API cannot be reached, so every change goes through a verified reload on the
    master socket instead. (Reloads hand the listening socket over, so the file stays missing
    until HAProxy is started again.)"""
    proxy = make_haproxy(reload_interval=0)
    a, b = backends("a"), backends("b")
    port = free_port()
    push(proxy, [web(port, a)])
    before = reloads(proxy)
    proxy.admin_socket.unlink()
    assert push(proxy, [web(port, a, b)]) == "reloaded"
    assert reloads(proxy) == before + 1 and proxy.fallbacks == 1
    assert names_seen(port) == i_am(a, b)
    assert push(proxy, [web(port, b)]) == "reloaded"
    assert names_seen(port) == {"I am b"}
    assert proxy.fallbacks == 2


# --------------------------------------------------------------------------------------------
# Validation fast path and the reload rate limit


def test_validate_skips_haproxy_c_only_for_server_changes(
    make_haproxy: MakeHAProxy, backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = make_haproxy()
    a, b = backends("a"), backends("b")
    port = free_port()
    push(proxy, [web(port, a)])
    good = proxy.render([web(port, a, b)])
    with caplog.at_level(logging.DEBUG, logger="discoverd.plugins.haproxy.proxy"):
        proxy.validate(good)
    assert any("haproxy -c skipped" in r.getMessage() for r in caplog.records)

    # The same server change with a bad structural line: haproxy -c runs and refuses it.
    with pytest.raises(ProxyConfigError, match="balance"):
        proxy.validate(good.replace("balance leastconn", "balance frobnicate"))
    # A server option never checked before: haproxy -c runs and refuses it.
    bad_option = good.replace("fall 2 rise 1", "fall 2 rise 1 frobnicate", 1)
    with pytest.raises(ProxyConfigError, match="frobnicate"):
        proxy.validate(bad_option)
    # Two servers of one name.
    line = next(x for x in good.splitlines() if x.strip().startswith("server "))
    with pytest.raises(ProxyConfigError):
        proxy.validate(good.replace(line, f"{line}\n{line}"))


def test_the_validate_fast_path_reads_what_is_confirmed_running(
    make_haproxy: MakeHAProxy, backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing remembered from earlier calls decides it: a new proxy object on the same state
    directory skips haproxy -c for a change of servers only, because the file on disk is
    confirmed running (its digest is the marker's); once it is not, haproxy -c runs. A candidate
    that was only validated, never applied, does not count."""
    proxy = make_haproxy()
    a, b, c = backends("a"), backends("b"), backends("c")
    port = free_port()
    push(proxy, [web(port, a)])
    fresh = make_haproxy(stats_port=proxy.config.stats_port)

    def skipped(candidate: str) -> bool:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="discoverd.plugins.haproxy.proxy"):
            fresh.validate(candidate)
        return any("haproxy -c skipped" in r.getMessage() for r in caplog.records)

    servers_only = fresh.render([web(port, a, b)])
    assert fresh.running_split() is not None
    assert skipped(servers_only)
    # A new structure (a second service) is checked; validated, it is still not running, so
    # a later candidate differing from it only in servers is checked too.
    api = Service("api", free_port(), instances=())
    assert not skipped(fresh.render([web(port, a), api]))
    assert not skipped(fresh.render([web(port, a, c), api]))
    fresh.forget()  # what runs is unknown now
    assert fresh.running_split() is None
    assert not skipped(servers_only)


def test_apply_delay_limits_reloads_but_never_runtime_changes(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy(reload_interval=60)
    a, b = backends("a"), backends("b")
    port, other = free_port(), free_port()
    first = [web(port, a)]
    config = proxy.render(first)
    assert proxy.apply_delay(config, first) == 0  # nothing ran yet
    push(proxy, first)

    membership = [web(port, a, b)]
    assert proxy.apply_delay(proxy.render(membership), membership) == 0
    new_service = [web(port, a), Service("two", other, instances=(b.instance("two", other),))]
    delay = proxy.apply_delay(proxy.render(new_service), new_service)
    assert 0 < delay <= 60
    assert push(proxy, membership) == "runtime"
    assert 0 < proxy.apply_delay(proxy.render(new_service), new_service) <= delay

    short = make_haproxy(state_dir=proxy.dir.parent / "short", reload_interval=0.2)
    push(short, first)
    delayed = short.apply_delay(short.render(new_service), new_service)
    wait_for(
        lambda: short.apply_delay(short.render(new_service), new_service) == 0, 10, what="delay"
    )
    assert delayed >= 0
    assert push(short, new_service) == "reloaded"
    unlimited = make_haproxy(state_dir=proxy.dir.parent / "free", reload_interval=0)
    push(unlimited, first)
    assert unlimited.apply_delay(unlimited.render(new_service), new_service) == 0


# --------------------------------------------------------------------------------------------
# Drain instead of drop


def test_a_removed_server_finishes_its_request_then_is_freed(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    # Round robin: with leastconn a server busy with the slow request gets no new ones anyway,
    # so "new requests go elsewhere" would not show the drain.
    proxy = make_haproxy(balance="roundrobin")
    a, b = backends("a"), backends("b")
    port = free_port()
    a_inst = a.instance("web", port, drain="600")  # long: freed because idle, not by the timer
    push(proxy, [web(port, a_inst)])
    wait_for(lambda: names_seen(port, 2) == {"I am a"}, 10, what="a")
    slow = Getter(port, "/sleep/1.5")
    assert a.slow.wait(10)
    assert push(proxy, [web(port, b)]) == "runtime"
    assert ("web", a_inst.id) in proxy.draining()
    assert int(running_servers(proxy)[("web", a_inst.id)][2]) & 0x08  # forced drain
    assert names_seen(port, 6) == {"I am b"}  # new requests go elsewhere
    slow.join(30)
    assert slow.answer == "200 I am a", slow.error
    wait_for(lambda: ("web", a_inst.id) not in running_servers(proxy), 20, what="a to be freed")
    assert not proxy.draining()


def test_a_drained_tcp_connection_keeps_working(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy()
    a, b = backends("a", keep_alive=True), backends("b", keep_alive=True)
    port = free_port()
    a_inst = a.instance("web", port, drain="600")
    push(proxy, [web(port, a_inst, mode="tcp")])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/") == "I am a\n", 10, what="a")
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"I am a\n"
        assert push(proxy, [web(port, b, mode="tcp")]) == "runtime"
        assert names_seen(port, 4) == {"I am b"}
        for _ in range(3):  # the established connection still reaches a
            conn.request("GET", "/")
            assert conn.getresponse().read() == b"I am a\n"
        assert ("web", a_inst.id) in running_servers(proxy)
    finally:
        conn.close()
    wait_for(lambda: ("web", a_inst.id) not in running_servers(proxy), 20, what="a to be freed")


def test_the_drain_period_cuts_what_is_left(make_haproxy: MakeHAProxy, backends: Backends) -> None:
    """A tcp connection still open on a drained server at the end of its drain period is cut."""
    proxy = make_haproxy()
    a, b = backends("a", keep_alive=True), backends("b", keep_alive=True)
    port = free_port()
    a_inst = a.instance("web", port, drain="0.3")
    push(proxy, [web(port, a_inst, mode="tcp")])
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/") == "I am a\n", 10, what="a")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"I am a\n"
        assert push(proxy, [web(port, b, mode="tcp")]) == "runtime"
        wait_for(lambda: ("web", a_inst.id) not in running_servers(proxy), 20, what="a freed")
        with pytest.raises((OSError, http.client.HTTPException)):
            conn.request("GET", "/")
            conn.getresponse().read()
    finally:
        conn.close()
    assert not proxy.draining()
    assert names_seen(port, 4) == {"I am b"}


def test_a_server_that_comes_back_while_draining_is_ready_again(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    # Round robin: with leastconn a server busy with the slow request would get no new ones
    # until it ends, whether it was ready again or not.
    proxy = make_haproxy(balance="roundrobin")
    a, b = backends("a"), backends("b")
    port = free_port()
    a_inst = a.instance("web", port, drain="600")
    push(proxy, [web(port, a_inst)])
    wait_for(lambda: names_seen(port, 2) == {"I am a"}, 10, what="a")
    slow = Getter(port, "/sleep/1")  # a session keeps a draining
    assert a.slow.wait(10)
    assert push(proxy, [web(port, b)]) == "runtime"
    assert ("web", a_inst.id) in proxy.draining()
    assert push(proxy, [web(port, a_inst, b)]) == "runtime"
    assert not proxy.draining()
    assert names_seen(port) == i_am(a, b)
    slow.join(30)
    assert slow.answer == "200 I am a"
    assert ("web", a_inst.id) in running_servers(proxy)


def test_no_request_fails_while_backends_come_and_go(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy(drain_timeout=5)
    port = free_port()
    live = [backends(f"s{i}") for i in range(2)]
    push(proxy, [web(port, *live)])
    wait_for(lambda: names_seen(port, 4) == i_am(*live), 10, what="the first servers")
    before = reloads(proxy)
    stop = threading.Event()
    results: dict[str, list[str]] = {"keep-alive": [], "close": []}

    def keep_alive() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read().decode()
                results["keep-alive"].append(
                    "ok" if response.status == 200 else f"{response.status} {body}"
                )
            except (OSError, http.client.HTTPException) as exc:
                results["keep-alive"].append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.close()

    def close() -> None:
        while not stop.is_set():
            try:
                body = http_get(f"http://127.0.0.1:{port}/")
                results["close"].append("ok" if body.startswith("I am") else body)
            except OSError as exc:
                results["close"].append(repr(exc))

    threads = [threading.Thread(target=f, daemon=True) for f in (keep_alive, close)]
    for thread in threads:
        thread.start()
    try:
        for i in range(2, 12):
            new = backends(f"s{i}")
            live.append(new)
            assert push(proxy, [web(port, *live)]) == "runtime"
            gone = live.pop(0)
            assert push(proxy, [web(port, *live)]) == "runtime"
            time.sleep(0.05)  # the container's process exits a moment after the stop event
            gone.stop()
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    for kind, outcomes in results.items():
        failures = [x for x in outcomes if x != "ok"]
        assert len(outcomes) > 20, kind
        assert failures == [], (kind, failures[:5])
    assert reloads(proxy) == before


def test_a_server_added_at_run_time_is_health_checked(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy(check_interval="100ms")
    a = backends("a")
    port = free_port()
    push(proxy, [web(port, a)])
    dead = ServiceInstance("web", "host1:dead:8000:tcp", "127.0.0.1", free_port())  # no listener
    assert push(proxy, [web(port, a, dead)]) == "runtime"

    def op_state() -> str:
        for line in cli(proxy.admin_socket, "show servers state web", 5.0).splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[3] == dead.id:
                return fields[5]  # srv_op_state: 0 stopped, 2 running
        return "?"

    wait_for(lambda: op_state() == "0", 10, what="the check to mark the dead server down")
    assert names_seen(port, 6) == {"I am a"}


def test_a_server_without_the_default_checks_is_added_at_run_time(
    make_haproxy: MakeHAProxy, backends: Backends, tmp_path: Path
) -> None:
    (tmp_path / "haproxy.cfg.j2").write_text(
        '{% extends "default:haproxy.cfg.j2" %}\n'
        "{% block server %}    server {{ instance.id }} {{ instance.endpoint }} no-check\n"
        "{% endblock %}\n"
    )
    proxy = make_haproxy(template_dir=str(tmp_path))
    a, b = backends("a"), backends("b")
    port = free_port()
    assert push(proxy, [web(port, a)]) in ("started", "reloaded")
    before = reloads(proxy)
    assert push(proxy, [web(port, a, b)]) == "runtime"  # not a refused command and a reload
    assert reloads(proxy) == before
    states = proxy.server_states("web")
    assert states is not None and sorted(states.values()) == ["no check", "no check"], states
    wait_for(lambda: names_seen(port, 8) == {"I am a", "I am b"}, 10, what="both servers")


@pytest.mark.parametrize("verify", [False, True])
def test_haproxy_holds_the_system_s_ca_certificates_only_when_asked(
    make_haproxy: MakeHAProxy, backends: Backends, verify: bool
) -> None:
    """HAProxy 2.6 loads the system's CA store for its HTTP client at every start, unless the
    client does not verify (option httpclient_verify): ``show ssl ca-file`` lists it."""
    proxy = make_haproxy(httpclient_verify=verify)
    assert push(proxy, [web(free_port(), backends("a"))]) in ("started", "reloaded")
    listed = cli(proxy.admin_socket, "show ssl ca-file", 5.0)
    assert ("@system-ca" in listed) is verify, listed


def test_a_new_discoverd_frees_servers_left_draining(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    first = make_haproxy()
    a, b, c = backends("a"), backends("b"), backends("c")
    port = free_port()
    a_inst = a.instance("web", port, drain="600")
    push(first, [web(port, a_inst)])
    wait_for(lambda: names_seen(port, 2) == {"I am a"}, 10, what="a")
    slow = Getter(port, "/sleep/1")
    assert a.slow.wait(10)
    assert push(first, [web(port, b)]) == "runtime"
    first.close()  # discoverd exits while a drains
    assert ("web", a_inst.id) in running_servers(first)

    second = make_haproxy(stats_port=first.config.stats_port)
    assert push(second, [web(port, b, c)]) == "runtime"
    assert ("web", a_inst.id) in second.draining()
    slow.join(30)
    assert slow.answer == "200 I am a"
    wait_for(lambda: ("web", a_inst.id) not in running_servers(second), 20, what="a freed")
    assert names_seen(port) == i_am(b, c)
