"""The Consul registry against real Consul agents (a fresh ``-dev`` agent per test)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest

from discoverd import (
    ConfigError,
    HostInfo,
    PluginContext,
    PluginError,
    ServiceInstance,
    Unavailable,
    build_config,
)
from discoverd.core.catalog import CatalogReader
from discoverd.core.config import load_settings
from discoverd.core.manager import get_plugin_manager
from discoverd.plugins.consul import discoverd_register_registries, make_registry
from discoverd.plugins.consul.config import ConsulConfig, parse_address
from discoverd.plugins.consul.encoding import MAX_META_KEYS, foreign_id
from discoverd.plugins.consul.registry import READ_SERVICES_MAX, ConsulRegistry
from tests.plugins.consul.conftest import ACL_TOKEN
from tests.support.consul import Consul
from tests.support.services import free_port, wait_for

IID = "host1:0123456789ab:8000:tcp"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------------------------
# Helpers


def instance(
    service: str = "whoami",
    iid: str = IID,
    port: int = 32768,
    frontend_port: int | None = 8000,
    **extra: Any,
) -> ServiceInstance:
    return ServiceInstance(
        service=service,
        id=iid,
        address=extra.pop("address", "127.0.0.1"),
        port=port,
        frontend_port=frontend_port,
        host_id=extra.pop("host_id", "host1"),
        **extra,
    )


def config(agent: Consul | None = None, **options: Any) -> ConsulConfig:
    """A checked configuration, as the core builds it from the ``[consul]`` section."""
    values: dict[str, Any] = dict(options)
    if agent is not None:
        values.setdefault("address", agent.address)
    return build_config(ConsulConfig, values, section="consul")


def from_environment(env: dict[str, str]) -> ConsulConfig:
    """The configuration the core builds from these environment variables alone."""
    config: ConsulConfig = load_settings({"consul": ConsulConfig}, env=env).config_for("consul")
    return config


def consul_put(agent: Consul, path: str, body: Any = None, token: str = "") -> None:
    """A raw PUT to the agent, as another tool (or an operator with curl) would do it."""
    data = b"" if body is None else json.dumps(body).encode()
    request = urllib.request.Request(agent.url + path, data=data, method="PUT")
    if token or agent.acl_token:
        request.add_header("X-Consul-Token", token or agent.acl_token)
    with _OPENER.open(request, timeout=5) as response:
        assert response.status == 200


def agent_services(agent: Consul) -> dict[str, Any]:
    services = agent.get("/v1/agent/services")
    assert isinstance(services, dict)
    return services


def ids(registry: ConsulRegistry) -> set[str]:
    return {i.id for i in registry.snapshot().instances}


class WatchRunner:
    """Runs ``registry.watch`` in a thread and records what happened: each notification's
    reason, and the services it named (``None``: read everything)."""

    def __init__(self, registry: ConsulRegistry, since: int) -> None:
        self.registry = registry
        self.reasons: list[str] = []
        self.services: list[frozenset[str] | None] = []
        self.error: BaseException | None = None
        self.returned = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(since,), daemon=True)
        self.thread.start()

    def _run(self, since: int) -> None:
        try:
            self.registry.watch(self.notify, self.stop, since)
            self.returned = True
        except BaseException as exc:
            self.error = exc

    def notify(self, reason: str, services: Collection[str] | None = None) -> None:
        self.services.append(None if services is None else frozenset(services))
        self.reasons.append(reason)  # last: a waiter counting reasons sees both

    def wait_for_notifications(self, count: int, timeout: float = 15) -> None:
        wait_for(lambda: len(self.reasons) >= count, timeout, what=f"{count} notification(s)")

    def wait_ended(self, timeout: float = 15) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "watch did not end"


@pytest.fixture
def registries(consul: Consul) -> Iterator[Callable[..., ConsulRegistry]]:
    """Build registries on the test's agent (options as in the config file); closed afterwards."""
    made: list[ConsulRegistry] = []

    def make(host_id: str = "host1", **options: Any) -> ConsulRegistry:
        registry = ConsulRegistry(config(consul, **options), host_id=host_id)
        made.append(registry)
        return registry

    yield make
    for registry in made:
        registry.close()


@pytest.fixture
def watchers() -> Iterator[Callable[[ConsulRegistry, int], WatchRunner]]:
    runners: list[WatchRunner] = []

    def start(registry: ConsulRegistry, since: int) -> WatchRunner:
        runner = WatchRunner(registry, since)
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.stop.set()
        runner.thread.join(10)
        assert not runner.thread.is_alive(), "a watch thread outlived its test"


# --------------------------------------------------------------------------------------------
# Plugin record and options


def test_plugin_record_and_factory(consul: Consul, tmp_path: Path) -> None:
    [record] = discoverd_register_registries()
    assert record.name == "consul"
    assert record.factory is make_registry
    assert record.config is ConsulConfig
    options = {o.name: o for o in record.options}
    assert options["address"].env == ("CONSUL_HTTP_ADDR",)
    assert options["token"].env == ("CONSUL_HTTP_TOKEN",) and options["token"].secret
    registry = record.factory(
        PluginContext(config=config(consul), host=HostInfo(ip="", id="h9"), state_dir=tmp_path)
    )
    try:
        assert isinstance(registry, ConsulRegistry)
        assert registry.keepalive_interval() == pytest.approx(15 / 3)
        registry.register(instance(host_id=""))
        meta = agent_services(consul)[IID]["Meta"]
        assert meta["discoverd_host_id"] == "h9"  # the agent's id when the instance has none
    finally:
        registry.close(deregister=True)
    assert IID not in agent_services(consul)


def test_plugin_loads_through_the_entry_point() -> None:
    manager = get_plugin_manager()
    assert "consul" in manager.registries()
    assert manager.registry("consul").factory is make_registry
    listed = subprocess.run(
        [sys.executable, "-m", "discoverd", "plugins", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    by_name = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert by_name["consul"]["registries"] == ["consul"]


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:8501") == ("http", "127.0.0.1", 8501)
    assert parse_address("consul.local") == ("http", "consul.local", 8500)
    assert parse_address("https://10.0.0.1:8501/") == ("https", "10.0.0.1", 8501)
    assert parse_address("http://10.0.0.1:1", ssl=True) == ("https", "10.0.0.1", 1)
    assert parse_address("[::1]:8500") == ("http", "[::1]", 8500)
    for bad in ("", "ftp://a:1", "a:99999", "http://a:1/v1", "unix:///tmp/consul.sock", ":80"):
        with pytest.raises(ValueError, match="address"):
            parse_address(bad)
    with pytest.raises(ConfigError, match="address"):
        config(address="http://a:1/v1")


def test_address_credentials_are_never_shown() -> None:
    for bad in ("http://root:s3cret@10.0.0.1:8500", "root:s3cret@10.0.0.1"):
        with pytest.raises(ConfigError) as caught:
            config(address=bad)
        message = str(caught.value)
        assert "s3cret" not in message and "root" not in message, message
        assert "***@10.0.0.1" in message and "address" in message


def test_options_from_the_environment_as_consul_does() -> None:
    plain = from_environment({"CONSUL_HTTP_ADDR": "10.1.2.3:8600", "CONSUL_HTTP_TOKEN": "t0k"})
    assert (plain.url, plain.acl_token) == ("http://10.1.2.3:8600", "t0k")
    with_scheme = from_environment({"CONSUL_HTTP_ADDR": "https://10.1.2.3"})
    assert with_scheme.url == "https://10.1.2.3:8500"
    upgraded = from_environment(
        {
            "CONSUL_HTTP_ADDR": "10.1.2.3:8501",
            "CONSUL_HTTP_SSL": "true",
            "CONSUL_HTTP_SSL_VERIFY": "false",
        }
    )
    assert (upgraded.url, upgraded.tls_verify) == ("https://10.1.2.3:8501", False)
    # discoverd's own variable wins over Consul's.
    ours = from_environment(
        {"CONSUL_HTTP_ADDR": "10.1.2.3:8600", "DISCOVERD_CONSUL_ADDRESS": "10.9.9.9:1"}
    )
    assert ours.url == "http://10.9.9.9:1"
    with pytest.raises(ConfigError, match="CONSUL_HTTP_SSL"):
        from_environment({"CONSUL_HTTP_SSL": "maybe"})


def test_tls_options_and_token_file(tmp_path: Path) -> None:
    ca, cert, key, token_file = (tmp_path / n for n in ("ca.pem", "c.pem", "k.pem", "token"))
    for path in (ca, cert, key):
        path.write_text("x")
    token_file.write_text("from-file\n")
    tls = config(
        address="https://127.0.0.1:8501",
        ca_file=str(ca),
        cert_file=str(cert),
        key_file=str(key),
        token="from-option",
        token_file=str(token_file),
    )
    assert tls.tls_verify == str(ca)
    assert tls.client_cert == (str(cert), str(key))
    assert tls.acl_token == "from-file"  # as Consul's CLI: a non-empty token file wins
    token_file.write_text("")
    assert config(token="from-option", token_file=str(token_file)).acl_token == "from-option"
    token_file.write_text("two words\n")
    with pytest.raises(ConfigError, match="token_file") as caught:
        config(token_file=str(token_file))
    assert "two words" not in str(caught.value)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"ttl": 0}, "ttl"),
        ({"deregister_after": 30}, "deregister_after"),
        ({"wait": 0.5}, "wait"),
        ({"wait": 601.0}, "wait"),
        ({"timeout": 0.0}, "timeout"),
        ({"datacenter": "dc 1"}, "datacenter"),
        ({"tag": "a b"}, "tag"),
        ({"ca_file": "/nonexistent/ca.pem"}, "ca_file"),
        ({"key_file": __file__}, "key_file"),
        ({"token": "a\nb"}, "token"),
        ({"address": "http://h:1/x"}, "address"),
    ],
)
def test_bad_options_name_their_key(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(**options)
    message = str(caught.value)
    assert f"'consul.{key}'" in message or message.startswith(f"[consul] {key} "), message
    assert "\n" not in message


# --------------------------------------------------------------------------------------------
# Register, snapshot, deregister


def test_round_trip_keeps_every_field(
    consul: Consul, registries: Callable[..., ConsulRegistry]
) -> None:
    registry = registries()
    first = instance(
        tags=("blue", "v=2"),
        meta=(("mode", "http"), ("team", "core")),
        host_id="host1",
    )
    second = instance(
        service="dns",
        iid="host1:0123456789ab:53:udp",
        port=40053,
        frontend_port=53,
        protocol="udp",
        address="127.0.0.2",
    )
    registry.register(first)
    registry.register(second)
    catalog = registry.snapshot()
    assert set(catalog.instances) == {first, second}
    assert catalog.problems == ()
    assert catalog.revision > 0
    # What other Consul tools see: a plain service with a TTL check.
    raw = agent_services(consul)[IID]
    assert (raw["Service"], raw["Address"], raw["Port"]) == ("whoami", "127.0.0.1", 32768)
    assert raw["Tags"] == ["blue", "v=2"] and raw["Meta"]["mode"] == "http"
    checks = consul.get("/v1/agent/checks")
    assert isinstance(checks, dict)
    assert checks[f"service:{IID}"]["Status"] == "passing"  # routable at once

    registry.deregister(first)
    registry.deregister(first)  # idempotent
    assert set(registry.snapshot().instances) == {second}
    assert IID not in agent_services(consul)


def test_re_registering_an_id_under_another_service_moves_it(
    registries: Callable[..., ConsulRegistry],
) -> None:
    registry = registries()
    registry.register(instance(service="old"))
    registry.register(instance(service="new"))
    assert [i.service for i in registry.snapshot().instances] == ["new"]


def test_metadata_beyond_consul_limits_survives(
    consul: Consul, registries: Callable[..., ConsulRegistry]
) -> None:
    meta = {f"k{n:02d}": f"value {n}" for n in range(80)}
    meta["discoverd_own"] = "looks like ours"
    meta["consul-x"] = "reserved by Consul"
    meta["wide"] = "\u20ac" * 256  # 768 bytes: over Consul's 512-byte value limit
    big = instance(meta=tuple(meta.items()))
    registry = registries()
    registry.register(big)
    raw = agent_services(consul)[IID]["Meta"]
    assert len(raw) <= MAX_META_KEYS
    [read] = registry.snapshot().instances
    assert read == big
    assert read.meta_dict == meta


def test_only_passing_instances_are_read(
    consul: Consul, registries: Callable[..., ConsulRegistry]
) -> None:
    short = registries(ttl=1)
    short.register(instance())
    assert ids(short) == {IID}
    # No keepalive: the check turns critical after its TTL and the instance leaves the catalog
    # while the agent still holds the service.
    wait_for(lambda: ids(short) == set(), 30, interval=0.2, what="the instance to stop passing")
    assert IID in agent_services(consul)
    # A keepalive brings it back.
    assert short.keepalive() is True
    assert ids(short) == {IID}


def test_keepalive_keeps_instances_passing(registries: Callable[..., ConsulRegistry]) -> None:
    registry = registries(ttl=1)
    registry.register(instance())
    deadline = time.monotonic() + 4  # four TTLs
    while time.monotonic() < deadline:
        assert registry.keepalive() is True
        assert ids(registry) == {IID}
        time.sleep(registry.keepalive_interval())


def test_close_with_deregister_removes_this_hosts_instances(
    consul: Consul, registries: Callable[..., ConsulRegistry]
) -> None:
    ours = registries(host_id="host1")
    other = registries(host_id="host2")
    ours.register(instance())
    other.register(instance(iid="host2:0123456789ab:8000:tcp"))
    kept = registries(host_id="host3")
    kept.register(instance(iid="host3:0123456789ab:8000:tcp"))
    kept.close()  # no deregister: the entries stay (their TTL will run out)
    ours.close(deregister=True)
    assert set(agent_services(consul)) == {
        "host2:0123456789ab:8000:tcp",
        "host3:0123456789ab:8000:tcp",
    }
    with pytest.raises(PluginError, match="closed"):
        ours.register(instance())


def test_keepalive_reports_lost_entries_after_a_restart(
    consul: Consul, registries: Callable[..., ConsulRegistry]
) -> None:
    registry = registries()
    registry.register(instance())
    assert registry.keepalive() is True
    consul.restart()  # a -dev agent forgets everything
    assert IID not in agent_services(consul)
    assert registry.keepalive() is False
    assert registry.keepalive() is True  # reported once: nothing is owned any more
    registry.register(instance())  # what the core does next
    assert ids(registry) == {IID}
    assert registry.keepalive() is True


def test_agent_restart_with_its_data_keeps_instances_passing(
    consul: Consul, registries: Callable[..., ConsulRegistry]
) -> None:
    # A real (non -dev) agent, or one restarted with its data directory, loads its services
    # again; the check's state comes back passing only if it was passed (not just registered).
    registry = registries(ttl=60)
    registry.register(instance())
    consul.kill()
    consul.start()
    wait_for(lambda: ids(registry) == {IID}, 20, what="the instance to be read again")
    checks = consul.get("/v1/agent/checks")
    assert isinstance(checks, dict) and checks[f"service:{IID}"]["Status"] == "passing"
    assert registry.keepalive() is True


def test_unreachable_consul_is_one_line_unavailable(
    consul: Consul, registries: Callable[..., ConsulRegistry]
) -> None:
    registry = registries()
    registry.register(instance())
    consul.kill()
    for call in (registry.snapshot, registry.keepalive, lambda: registry.register(instance())):
        with pytest.raises(Unavailable) as caught:
            call()
        message = str(caught.value)
        assert consul.address in message and "\n" not in message
        assert "refused" in message
    nowhere = ConsulRegistry(config(address=f"127.0.0.1:{free_port()}", timeout=2.0))
    with pytest.raises(Unavailable, match="consul unreachable"):
        nowhere.snapshot()
    nowhere.close()


# --------------------------------------------------------------------------------------------
# Entries other tools registered


def test_foreign_and_malformed_entries(
    consul: Consul, registries: Callable[..., ConsulRegistry]
) -> None:
    registry = registries()
    good = instance()
    registry.register(good)
    foreign = {
        "ID": "web-1",
        "Name": "web",
        "Address": "127.0.0.5",
        "Port": 8080,
        "Tags": ["ok", "bad tag"],
        "Meta": {"discoverd_frontend_port": "8081", "Version": "1", "mode": "http"},
    }
    consul_put(consul, "/v1/agent/service/register", foreign)
    consul_put(consul, "/v1/agent/service/register", {"ID": "b", "Name": "Bad Name!", "Port": 1})
    consul_put(consul, "/v1/agent/service/register", {"ID": "p", "Name": "noport"})
    consul_put(
        consul,
        "/v1/agent/service/register",
        {"ID": "f", "Name": "nofront", "Address": "127.0.0.6", "Port": 99},
    )
    consul_put(
        consul,
        "/v1/agent/service/register",
        {"ID": "big", "Name": "big", "Port": 99999, "Meta": {"discoverd_frontend_port": "1"}},
    )
    catalog = registry.snapshot()
    web = ServiceInstance(
        service="web",
        id="discoverd-test:web-1",
        address="127.0.0.5",
        port=8080,
        frontend_port=8081,
        tags=("ok",),
        meta=(("mode", "http"),),
    )
    assert set(catalog.instances) == {good, web}
    problems = {p.subject: p.message for p in catalog.problems}
    assert "ignored" in problems["consul service 'Bad Name!'"]
    assert "no port" in problems["consul service noport id p on node discoverd-test"]
    assert "discoverd_frontend_port" in problems["consul service nofront"]
    assert "99999" in problems["consul service big id big on node discoverd-test"]
    notes = problems["consul service web id web-1 on node discoverd-test"]
    assert "'bad tag'" in notes and "'Version'" in notes
    assert not any("consul service consul" in s for s in problems)  # Consul's own service


def test_foreign_id_is_valid_and_deterministic() -> None:
    assert foreign_id("node1", "web-1") == "node1:web-1"
    odd = foreign_id("node1", "web/1 with spaces")
    assert odd == foreign_id("node1", "web/1 with spaces")
    assert odd != foreign_id("node1", "web/1 with spaces!")
    ServiceInstance(service="web", id=odd, address="127.0.0.1", port=1)  # valid


def test_tag_marks_ours_and_filters_what_is_read(
    consul: Consul, registries: Callable[..., ConsulRegistry]
) -> None:
    tagged = registries(tag="discoverd")
    plain = registries()
    mine = instance(tags=("blue",))
    tagged.register(mine)
    plain.register(instance(service="other", iid="host1:0123456789ab:9000:tcp"))
    assert agent_services(consul)[IID]["Tags"] == ["blue", "discoverd"]
    assert tagged.snapshot().instances == (mine,)  # the marker is not an instance tag
    assert {i.service for i in plain.snapshot().instances} == {"whoami", "other"}


def test_many_services_read_node_by_node(registries: Callable[..., ConsulRegistry]) -> None:
    # One node and several services: the snapshot reads the node instead of each service.
    registry = registries()
    made = {
        instance(service=f"svc{n}", iid=f"host1:0123456789ab:{n}:tcp", frontend_port=9000 + n)
        for n in range(1, 6)
    }
    for each in made:
        registry.register(each)
    assert set(registry.snapshot().instances) == made


# --------------------------------------------------------------------------------------------
# ACL token


def test_acl_token_is_sent(consul_acl: Consul) -> None:
    anonymous = ConsulRegistry(config(consul_acl))
    with pytest.raises(PluginError, match="permission denied") as caught:
        anonymous.register(instance())
    assert "token" in str(caught.value)
    anonymous.close()
    env = {"CONSUL_HTTP_ADDR": consul_acl.url, "CONSUL_HTTP_TOKEN": ACL_TOKEN}
    registry = ConsulRegistry(from_environment(env), host_id="host1")
    try:
        registry.register(instance())
        assert registry.keepalive() is True
        assert ids(registry) == {IID}
        # Without the token the catalog is filtered empty (default policy deny).
        blind = ConsulRegistry(config(consul_acl))
        assert blind.snapshot().instances == ()
        blind.close()
        # Deregistering what the agent does not have (it lost its state) is not an error:
        # with ACLs on, the agent answers 404 for an unknown service id.
        registry.deregister(instance(iid="host1:feedfacecafe:8000:tcp"))
    finally:
        registry.close(deregister=True)
    assert agent_services(consul_acl) == {}


# --------------------------------------------------------------------------------------------
# Watch


def test_watch_delivers_registrations_and_health_changes(
    registries: Callable[..., ConsulRegistry],
    watchers: Callable[[ConsulRegistry, int], WatchRunner],
) -> None:
    reader = registries()
    writer = registries(ttl=1)
    runner = watchers(reader, reader.snapshot().revision)
    writer.register(instance())
    runner.wait_for_notifications(1)
    assert ids(reader) == {IID}
    seen = len(runner.reasons)
    # The TTL runs out: a check status change wakes the watch too.
    runner.wait_for_notifications(seen + 1)
    wait_for(lambda: ids(reader) == set(), 15, what="the critical instance to leave")
    assert runner.error is None and not runner.returned
    # Each answer is compared with the one before: the notifications name the service.
    assert set(runner.services) == {frozenset({"whoami"})}


def test_watch_from_an_old_revision_notifies_at_once(
    registries: Callable[..., ConsulRegistry],
    watchers: Callable[[ConsulRegistry, int], WatchRunner],
) -> None:
    reader = registries()
    before = reader.snapshot().revision
    registries(host_id="host2").register(instance())
    runner = watchers(reader, before)
    runner.wait_for_notifications(1)


def test_watch_resets_when_the_index_goes_back(
    registries: Callable[..., ConsulRegistry],
    watchers: Callable[[ConsulRegistry, int], WatchRunner],
) -> None:
    # A revision from a previous agent, far ahead of this fresh one's index.
    reader = registries(wait=1.0)
    runner = watchers(reader, reader.snapshot().revision + 1_000_000)
    runner.wait_for_notifications(1)
    assert any("reset" in r for r in runner.reasons)
    count = len(runner.reasons)
    registries(host_id="host2").register(instance())
    runner.wait_for_notifications(count + 1)  # and it keeps watching from the new index


def test_stop_ends_the_watch_without_waiting_for_the_query(
    registries: Callable[..., ConsulRegistry],
    watchers: Callable[[ConsulRegistry, int], WatchRunner],
) -> None:
    reader = registries(wait=300.0)
    runner = watchers(reader, reader.snapshot().revision)
    time.sleep(0.5)  # let both blocking queries reach the agent
    assert runner.thread.is_alive()
    runner.stop.set()
    runner.wait_ended(timeout=10)  # a deadline far below the 300 s the queries may be held
    assert runner.error is None and runner.returned


def test_close_ends_the_watch(
    registries: Callable[..., ConsulRegistry],
    watchers: Callable[[ConsulRegistry, int], WatchRunner],
) -> None:
    reader = registries(wait=300.0)
    runner = watchers(reader, reader.snapshot().revision)
    time.sleep(0.5)
    reader.close()
    runner.wait_ended(timeout=10)
    assert runner.error is None


def test_watch_fails_when_consul_dies(
    consul: Consul,
    registries: Callable[..., ConsulRegistry],
    watchers: Callable[[ConsulRegistry, int], WatchRunner],
) -> None:
    reader = registries()
    runner = watchers(reader, reader.snapshot().revision)
    time.sleep(0.5)
    consul.kill()
    runner.wait_ended()
    assert isinstance(runner.error, Unavailable) or runner.returned
    # Started again while Consul is down, it fails at once instead of spinning.
    again = watchers(reader, 1)
    again.wait_ended()
    assert isinstance(again.error, Unavailable)


# --------------------------------------------------------------------------------------------
# Reading only the services a watch named


def test_partial_reads_after_each_change_equal_a_full_read(
    consul: Consul,
    registries: Callable[..., ConsulRegistry],
    watchers: Callable[[ConsulRegistry, int], WatchRunner],
) -> None:
    """The watch names the services each kind of change touched; the core's reader, re-reading
    only those (``read_services``), then holds what a full read gives. A change no check
    explains (a service changed in place) or a node's own check names nothing: read all."""
    writer = registries(host_id="w", ttl=300)  # no check runs out during the test
    for n in range(3):
        writer.register(instance(f"svc{n}", f"w:c{n}:8000:tcp", 30000 + n, 8100 + n))
    watched = registries()
    catalog = CatalogReader(watched)
    catalog.read()
    runner = watchers(watched, catalog.revision)
    catalog.watching(True)

    def change(what: str, action: Callable[[], object], expected: set[str] | None) -> None:
        count = len(runner.reasons)
        action()
        runner.wait_for_notifications(count + 1)
        time.sleep(0.3)  # the other blocking queries' answers to the same change
        named = runner.services[count:]
        if expected is None:
            assert None in named, f"{what}: {named}"
        else:
            assert None not in named, f"{what}: {named}"
            assert set().union(*(n for n in named if n is not None)) == expected, what
        for services in named:
            catalog.changed(services)
        partial_reads = catalog.partial_reads
        got = catalog.read()
        assert catalog.partial_reads == partial_reads + (expected is not None), what
        full = registries().snapshot()
        assert sorted(got.instances) == sorted(full.instances), what
        assert sorted(map(str, got.problems)) == sorted(map(str, full.problems)), what
        assert got.claims == full.claims, what

    def foreign(body: dict[str, Any]) -> Callable[[], None]:
        return lambda: consul_put(consul, "/v1/agent/service/register", body)

    change(
        "a new instance",
        lambda: writer.register(instance("svc1", "w:c9:8000:tcp", 30009, 8101)),
        {"svc1"},
    )
    change(
        "a new service",
        lambda: writer.register(instance("svc9", "w:c8:8000:tcp", 30008, 8109)),
        {"svc9"},
    )
    change(
        "a removed instance",
        lambda: writer.deregister(instance("svc1", "w:c9:8000:tcp", 30009, 8101)),
        {"svc1"},
    )
    change(
        "a failing check",
        lambda: consul_put(consul, "/v1/agent/check/fail/service:w:c0:8000:tcp"),
        {"svc0"},
    )
    change(
        "a malformed instance of another tool",
        foreign(
            {
                "ID": "odd",
                "Name": "svc2",
                "Port": 1,
                "Meta": {"discoverd_frontend_port": "not a port"},
                "Check": {"TTL": "60s", "Status": "passing"},
            }
        ),
        {"svc2"},
    )
    change(
        "a service without checks", foreign({"ID": "plain", "Name": "plain", "Port": 7}), {"plain"}
    )
    change(
        "that service changed in place",
        foreign({"ID": "plain", "Name": "plain", "Port": 8}),
        None,
    )
    change(
        "a node's own check",
        lambda: consul_put(consul, "/v1/agent/check/register", {"Name": "node-disk", "TTL": "60s"}),
        None,
    )
    change(
        "the last instance of a service, and its claim",
        lambda: writer.deregister(instance("svc9", "w:c8:8000:tcp", 30008, 8109)),
        {"svc9"},
    )
    assert catalog.partial_reads >= 6


def test_read_services_declines_many_services(
    registries: Callable[..., ConsulRegistry],
) -> None:
    registry = registries()
    many = [f"svc{n}" for n in range(READ_SERVICES_MAX + 1)]
    assert registry.read_services(many) is None
    registry.register(instance("svc1", "host1:c1:8000:tcp", 30001, 8101))
    part = registry.read_services([*many[: READ_SERVICES_MAX - 1], "consul", "absent"])
    assert part is not None
    assert [i.id for i in part.instances] == ["host1:c1:8000:tcp"]
    assert part.claims == ((8101, "svc1"),)
