"""Frontend-port claims in Consul's KV store (issue 9, "Ports decided once for the whole
fleet"): several registries acting as several hosts on one real agent."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from discoverd import ConfigError, PluginError, ServiceInstance, build_config
from discoverd.plugins.consul.config import ConsulConfig
from discoverd.plugins.consul.registry import ConsulRegistry
from tests.plugins.consul.conftest import ACL_TOKEN
from tests.support.consul import Consul
from tests.support.services import wait_for

P = 8000
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def config(agent: Consul | None = None, **options: Any) -> ConsulConfig:
    values: dict[str, Any] = dict(options)
    if agent is not None:
        values.setdefault("address", agent.address)
    return build_config(ConsulConfig, values, section="consul")


def put(agent: Consul, path: str, body: Any = None, token: str = "") -> Any:
    data = b"" if body is None else json.dumps(body).encode()
    request = urllib.request.Request(agent.url + path, data=data, method="PUT")
    if token or agent.acl_token:
        request.add_header("X-Consul-Token", token or agent.acl_token)
    with _OPENER.open(request, timeout=5) as response:
        return json.loads(response.read() or b"null")


def kv(agent: Consul, prefix: str) -> dict[str, tuple[str, int, str]]:
    """``{key: (value, modify index, session)}`` below ``prefix``."""
    try:
        listed = agent.get(f"/v1/kv/{prefix}?recurse=1")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return {}
        raise
    assert isinstance(listed, list)
    import base64

    return {
        item["Key"]: (
            base64.b64decode(item.get("Value") or "").decode(),
            int(item["ModifyIndex"]),
            str(item.get("Session") or ""),
        )
        for item in listed
    }


def instance(
    service: str, host: str, n: int = 1, frontend_port: int | None = P, **extra: Any
) -> ServiceInstance:
    return ServiceInstance(
        service=service,
        id=f"{host}:c{n:011d}:80:tcp",
        address=extra.pop("address", "127.0.0.1"),
        port=30000 + n,
        frontend_port=frontend_port,
        host_id=host,
        **extra,
    )


class Keeper:
    """Calls ``keepalive()`` at the registry's own interval in a thread, until stopped."""

    def __init__(self, registry: ConsulRegistry) -> None:
        self.registry = registry
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.registry.keepalive_interval()):
            try:
                self.registry.keepalive()
            except PluginError as exc:
                self.errors.append(exc)

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def hosts(consul: Consul) -> Iterator[Callable[..., ConsulRegistry]]:
    made: list[ConsulRegistry] = []

    def make(host_id: str, agent: Consul | None = None, **options: Any) -> ConsulRegistry:
        registry = ConsulRegistry(config(agent or consul, **options), host_id=host_id)
        made.append(registry)
        return registry

    yield make
    for registry in made:
        registry.close()


@pytest.fixture
def keepers() -> Iterator[Callable[[ConsulRegistry], Keeper]]:
    started: list[Keeper] = []

    def start(registry: ConsulRegistry) -> Keeper:
        keeper = Keeper(registry)
        started.append(keeper)
        return keeper

    yield start
    for keeper in started:
        keeper.halt()


# --------------------------------------------------------------------------------------------


def test_a_claimed_port_is_a_conflict_on_the_claimant_only(
    consul: Consul, hosts: Callable[..., ConsulRegistry]
) -> None:
    host_a, host_b = hosts("a"), hosts("b")
    web, api = instance("web", "a"), instance("api", "b", address="127.0.0.2")
    host_a.register(web)
    host_b.register(api)
    assert host_a.conflicts() == []
    [problem] = host_b.conflicts()
    assert problem.service == "api" and "8000" in problem.message and "web" in problem.message
    for reader in (host_a, host_b, hosts("reader")):
        catalog = reader.snapshot()
        assert catalog.claims == ((P, "web"),)
        assert set(catalog.instances) == {web, api}  # registered all the same
    records = kv(consul, "discoverd/")
    assert records["discoverd/ports/8000"][0] == "web"
    assert records["discoverd/services/web"][0] == "8000"
    assert "discoverd/services/api" not in records


def test_a_restarted_registry_keeps_the_port_for_its_service(
    consul: Consul, hosts: Callable[..., ConsulRegistry]
) -> None:
    first = hosts("a")
    first.register(instance("web", "a"))
    old_session = first._session
    first.close()  # a crash: the session is left to run out
    again = hosts("a")
    again.register(instance("web", "a"))
    put(consul, f"/v1/session/destroy/{old_session}")  # ... and it has run out
    other = hosts("b")
    other.register(instance("api", "b", address="127.0.0.2"))
    assert again.conflicts() == [] and len(other.conflicts()) == 1
    assert hosts("reader").snapshot().claims == ((P, "web"),)


def test_the_claim_outlives_a_dead_holder_and_is_never_handed_over(
    consul: Consul,
    hosts: Callable[..., ConsulRegistry],
    keepers: Callable[[ConsulRegistry], Keeper],
) -> None:
    dying, serving = hosts("a"), hosts("c", ttl=3)
    claimant = hosts("b", ttl=3)
    dying.register(instance("web", "a"))
    serving.register(instance("web", "c", address="127.0.0.3"))
    claimant.register(instance("api", "b", address="127.0.0.2"))
    keepers(serving)
    keepers(claimant)
    reader = hosts("reader")
    # Host A dies: Consul invalidates its session (node failure, or its TTL ran out).
    put(consul, f"/v1/session/destroy/{dying._session}")
    dying.close()
    seen: set[tuple[tuple[int, str], ...]] = set()
    deadline = time.monotonic() + 4 * claimant.keepalive_interval()
    while time.monotonic() < deadline:
        seen.add(reader.snapshot().claims)
        time.sleep(0.05)
    assert seen == {((P, "web"),)}, seen
    assert len(claimant.conflicts()) == 1
    # The last holder leaves: the claimant takes the port at its next keepalive.
    serving.deregister(instance("web", "c", address="127.0.0.3"))
    wait_for(
        lambda: reader.snapshot().claims == ((P, "api"),),
        2 * claimant.keepalive_interval() + 2,
        what="the claimant to take the free port",
    )
    assert claimant.conflicts() == []
    assert kv(consul, "discoverd/ports/")["discoverd/ports/8000"][0] == "api"


def test_two_ports_for_one_service_keep_the_first_and_never_flap(
    consul: Consul,
    hosts: Callable[..., ConsulRegistry],
    keepers: Callable[[ConsulRegistry], Keeper],
) -> None:
    host_a, host_b = hosts("a", ttl=3), hosts("b", ttl=3)
    host_a.register(instance("web", "a", frontend_port=8000))
    host_b.register(instance("web", "b", frontend_port=9000, address="127.0.0.2"))
    assert host_a.conflicts() == []
    [problem] = host_b.conflicts()
    assert "9000" in problem.message and "8000" in problem.message
    records = kv(consul, "discoverd/services/")
    keepers(host_a)
    keepers(host_b)
    reader = hosts("reader")
    deadline = time.monotonic() + 4 * host_a.keepalive_interval()
    while time.monotonic() < deadline:
        assert kv(consul, "discoverd/services/") == records  # not even rewritten
        catalog = reader.snapshot()
        assert {i.frontend_port for i in catalog.instances} == {8000}
        assert catalog.claims == ((8000, "web"),)
        time.sleep(0.1)
    host_a.close(deregister=True)
    catalog = reader.snapshot()
    assert catalog.claims == ((8000, "web"),)
    assert [i.frontend_port for i in catalog.instances] == [8000]  # host B's, on the fleet's


def test_first_registrations_racing_with_different_ports_agree(
    hosts: Callable[..., ConsulRegistry],
) -> None:
    registries = [hosts(f"h{n}") for n in range(5)]
    start = threading.Barrier(len(registries))

    def register(n: int) -> None:
        start.wait()
        registries[n].register(instance("web", f"h{n}", frontend_port=8000 + n))

    threads = [threading.Thread(target=register, args=(n,)) for n in range(len(registries))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    catalog = hosts("reader").snapshot()
    [(port, service)] = catalog.claims
    assert service == "web" and {i.frontend_port for i in catalog.instances} == {port}
    assert len([r for r in registries if r.conflicts()]) == len(registries) - 1


def test_the_last_holder_leaving_clears_the_records(
    consul: Consul, hosts: Callable[..., ConsulRegistry]
) -> None:
    host_a, host_c = hosts("a"), hosts("c")
    host_a.register(instance("web", "a"))
    host_c.register(instance("web", "c", address="127.0.0.3"))
    host_a.deregister(instance("web", "a"))
    assert set(kv(consul, "discoverd/")) == {
        f"discoverd/claims/web/{host_c._session}",
        "discoverd/ports/8000",
        "discoverd/services/web",
    }
    host_c.deregister(instance("web", "c", address="127.0.0.3"))
    assert kv(consul, "discoverd/") == {}


def test_a_lost_session_is_replaced_and_the_claims_come_back(
    consul: Consul, hosts: Callable[..., ConsulRegistry]
) -> None:
    registry = hosts("a")
    registry.register(instance("web", "a"))
    put(consul, f"/v1/session/destroy/{registry._session}")
    assert hosts("reader").snapshot().claims == ()
    assert registry.keepalive() is True
    assert hosts("reader").snapshot().claims == ((P, "web"),)


def test_the_claims_cost_one_request_per_keepalive(
    hosts: Callable[..., ConsulRegistry], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = hosts("a")
    registry.register(instance("web", "a"))
    requests: list[str] = []
    http = registry._client.http
    original = http.put

    def counting(callback: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        requests.append(path)
        return original(callback, path, *args, **kwargs)

    monkeypatch.setattr(http, "put", counting)
    assert registry.keepalive() is True
    # The instance's own TTL check, and the session: nothing else while nothing changes.
    assert [p.split("/")[2] for p in requests] == ["agent", "session"], requests


def test_watch_wakes_when_a_claim_changes(
    consul: Consul, hosts: Callable[..., ConsulRegistry]
) -> None:
    reader = hosts("reader")
    writer = hosts("a")
    writer.register(instance("web", "a"))
    reasons: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=reader.watch,
        args=(lambda reason, services=None: reasons.append(reason), stop, 0),
        daemon=True,
    )
    thread.start()
    try:
        time.sleep(0.5)
        put(consul, f"/v1/session/destroy/{writer._session}")  # the claim goes
        wait_for(lambda: "consul claims changed" in reasons, 10, what="the claims to wake")
    finally:
        stop.set()
        thread.join(10)


def test_a_token_without_kv_rights_registers_and_reads_without_claims(
    consul_acl: Consul, hosts: Callable[..., ConsulRegistry]
) -> None:
    rules = 'service_prefix "" { policy = "write" }\nnode_prefix "" { policy = "read" }\n'
    put(consul_acl, "/v1/acl/policy", {"Name": "services-only", "Rules": rules})
    token = put(consul_acl, "/v1/acl/token", {"Policies": [{"Name": "services-only"}]})
    secret = token["SecretID"]
    registry = hosts("a", consul_acl, token=secret)
    registry.register(instance("web", "a"))
    [problem] = registry.conflicts()
    assert "could not be claimed" in problem.message and "session" in problem.message
    assert secret not in problem.message
    catalog = registry.snapshot()
    assert [i.service for i in catalog.instances] == ["web"] and catalog.claims == ()
    assert registry.keepalive() is True
    # With sessions but no KV rights, Consul refuses the transactions (409): the same problem.
    rules += 'session_prefix "" { policy = "write" }\n'
    put(consul_acl, "/v1/acl/policy", {"Name": "sessions-too", "Rules": rules})
    token = put(consul_acl, "/v1/acl/token", {"Policies": [{"Name": "sessions-too"}]})
    sessions = hosts("c", consul_acl, token=token["SecretID"])
    sessions.register(instance("db", "c", address="127.0.0.3", frontend_port=7000))
    [problem] = sessions.conflicts()
    assert "could not be claimed" in problem.message and "permission denied" in problem.message
    full = hosts("b", consul_acl, token=ACL_TOKEN)
    full.register(instance("api", "b", address="127.0.0.2", frontend_port=9000))
    assert full.snapshot().claims == ((9000, "api"),)


# --------------------------------------------------------------------------------------------
# Options and messages


def test_kv_prefix_option() -> None:
    assert config(kv_prefix="/team-a/discoverd/").kv_prefix == "team-a/discoverd"
    for bad in ("", "/", "a b", "a//b"):
        with pytest.raises(ConfigError, match="kv_prefix"):
            config(kv_prefix=bad)


def test_a_token_over_plain_http_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="discoverd.consul")
    ConsulRegistry(config(address="192.0.2.1:8500", token="s3cr3t-token")).close()
    [record] = [r for r in caplog.records if "without TLS" in r.getMessage()]
    assert "http://192.0.2.1:8500" in record.getMessage()
    assert "s3cr3t" not in record.getMessage()
    caplog.clear()
    for quiet in (
        config(address="127.0.0.1:8500", token="s3cr3t-token"),  # the local agent
        config(address="localhost", token="s3cr3t-token"),
        config(address="192.0.2.1:8500"),  # no token
        config(address="https://192.0.2.1:8501", token="s3cr3t-token"),
    ):
        ConsulRegistry(quiet).close()
    assert not [r for r in caplog.records if "without TLS" in r.getMessage()]


def test_a_token_file_that_is_not_text_is_refused_without_quoting_it(tmp_path: Any) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(b"s3cr\xfft-token")
    with pytest.raises(ConfigError, match="token_file") as caught:
        config(token_file=str(token_file))
    assert "\\xff" not in str(caught.value) and "0xff" not in str(caught.value)
