"""Frontend-port claims in etcd (issue 9, "Ports decided once for the whole fleet"): several
registries acting as several hosts on one real etcd."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from discoverd import ConfigError, PluginError, ServiceInstance, build_config
from discoverd.plugins.etcd.config import EtcdConfig
from discoverd.plugins.etcd.registry import EtcdRegistry
from tests.plugins.etcd.raw import RawEtcd
from tests.support.services import Etcd, require_binary, wait_for

P = 8000
CLAIMS = "/discoverd/claims"


def config(*endpoints: str, **options: Any) -> EtcdConfig:
    values: dict[str, Any] = dict(options)
    if endpoints:
        values["endpoints"] = list(endpoints)
    return build_config(EtcdConfig, values, section="etcd")


def raw_client(server: Etcd) -> RawEtcd:
    return RawEtcd(server.url)


def port_key(server: Etcd, service: str) -> tuple[str, int, int] | None:
    """``(value, lease, mod revision)`` of ``/backends/<service>/port``, or None."""
    found = raw_client(server).get(f"/backends/{service}/port")
    if not found:
        return None
    value, meta = found[0]
    return value.decode(), int(meta.get("lease", 0)), int(meta["mod_revision"])


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
    """Calls ``registry.keepalive()`` at the registry's own interval in a thread (as the
    register role does), until stopped."""

    def __init__(self, registry: EtcdRegistry) -> None:
        self.registry = registry
        self.stop = threading.Event()
        self.results: list[bool] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.registry.keepalive_interval()):
            try:
                self.results.append(self.registry.keepalive())
            except PluginError as exc:
                self.errors.append(exc)

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def hosts(etcd: Etcd) -> Iterator[Callable[..., EtcdRegistry]]:
    """``hosts(host_id, ttl=...)``: a registry acting for that host; all closed afterwards."""
    made: list[EtcdRegistry] = []

    def make(host_id: str = "", **options: Any) -> EtcdRegistry:
        registry = EtcdRegistry(config(etcd.endpoint, **options), host_id=host_id)
        made.append(registry)
        return registry

    yield make
    for registry in made:
        registry.close()


@pytest.fixture
def keepers() -> Iterator[Callable[[EtcdRegistry], Keeper]]:
    started: list[Keeper] = []

    def start(registry: EtcdRegistry) -> Keeper:
        keeper = Keeper(registry)
        started.append(keeper)
        return keeper

    yield start
    for keeper in started:
        keeper.halt()


def messages(registry: EtcdRegistry) -> list[str]:
    return [str(p) for p in registry.conflicts()]


# --------------------------------------------------------------------------------------------


def test_a_claimed_port_is_a_conflict_on_the_claimant_only(
    etcd: Etcd, hosts: Callable[..., EtcdRegistry]
) -> None:
    host_a, host_b = hosts("a"), hosts("b")
    # "api" sorts before "web": without the claim, a fresh discover host would give it the port.
    web, api = instance("web", "a"), instance("api", "b", address="127.0.0.2")
    host_a.register(web)
    host_b.register(api)

    assert host_a.conflicts() == []
    [problem] = host_b.conflicts()
    assert problem.service == "api" and problem.subject == "service api"
    assert "8000" in problem.message and "web" in problem.message
    for reader in (host_a, host_b, hosts("reader")):
        catalog = reader.snapshot()
        assert catalog.claims == ((P, "web"),)
        # The claimant's instance is registered all the same: the core refuses it from the
        # claim, and takes it as soon as the port is free.
        assert sorted(catalog.instances) == sorted([web, api])
        assert catalog.problems == ()
    assert hosts("reader").read_services(["web"]).claims == ((P, "web"),)
    assert hosts("reader").read_services(["api"]).claims == ()
    # Only the host that holds the claim wrote the seed's port key.
    key = port_key(etcd, "web")
    assert key is not None and key[:2] == ("8000", host_a.lease_id)
    assert port_key(etcd, "api") is None


def test_a_restarted_registry_keeps_the_port_for_its_service(
    etcd: Etcd, hosts: Callable[..., EtcdRegistry]
) -> None:
    first = hosts("a", ttl=2)
    first.register(instance("web", "a"))
    first.close()  # a crash: nothing revoked, the lease runs out by itself
    again = hosts("a")  # the same host, a new process
    again.register(instance("web", "a"))
    other = hosts("b")
    other.register(instance("api", "b", address="127.0.0.2"))
    assert again.conflicts() == [] and len(other.conflicts()) == 1
    # Once the first process's lease has expired, the claim is the new one's.
    wait_for(lambda: port_key(etcd, "web") is None, 10, what="the first lease to expire")
    catalog = hosts("reader").snapshot()
    assert catalog.claims == ((P, "web"),)
    assert again.keepalive() is True  # and its keepalive writes the port key again
    key = port_key(etcd, "web")
    assert key is not None and key[:2] == ("8000", again.lease_id)


def test_the_claim_outlives_a_dead_holder_and_is_never_handed_over(
    etcd: Etcd,
    hosts: Callable[..., EtcdRegistry],
    keepers: Callable[[EtcdRegistry], Keeper],
) -> None:
    dying = hosts("a", ttl=2)
    serving = hosts("c", ttl=3)  # keepalive every second
    claimant = hosts("b", ttl=3)
    dying.register(instance("web", "a"))
    serving.register(instance("web", "c", address="127.0.0.3"))
    claimant.register(instance("api", "b", address="127.0.0.2"))
    assert port_key(etcd, "web") is not None
    assert port_key(etcd, "web")[1] == dying.lease_id  # type: ignore[index]
    keepers(serving)
    keepers(claimant)
    dead_lease = dying.lease_id
    dying.close()  # host A dies: its keepalives stop, its lease expires within 2 s

    reader = hosts("reader")
    seen_claims: set[tuple[tuple[int, str], ...]] = set()
    gone_at = back_at = 0.0
    held_at = time.monotonic()  # the last read that found the dead host's key
    deadline = time.monotonic() + 2 + 4 * serving.keepalive_interval() + 2
    while time.monotonic() < deadline:
        seen_claims.add(reader.snapshot().claims)
        key = port_key(etcd, "web")
        now = time.monotonic()
        if key is not None and key[1] == dead_lease:
            held_at = now
        elif key is None and not gone_at:
            gone_at = now
        elif key is not None and not back_at:
            # Another lease holds it: it went and came back, between two reads if no read
            # found it missing (the keepalive came right after the expiry).
            back_at = now
            gone_at = gone_at or held_at
            assert key[:2] == ("8000", serving.lease_id)
        time.sleep(0.05)
    # The claim never left "web", not even for one read, while host C served it.
    assert seen_claims == {((P, "web"),)}, seen_claims
    assert gone_at and back_at, "the port key of the dead host never went, or never came back"
    gap = back_at - gone_at
    assert gap <= serving.keepalive_interval() + 0.5, (
        f"the port key was missing {gap:.2f}s (keepalive every {serving.keepalive_interval()}s)"
    )
    assert {i.host_id for i in reader.snapshot().instances if i.service == "web"} == {"c"}
    assert len(claimant.conflicts()) == 1

    # The last holder leaves for good: the claimant gets the port at its next keepalive.
    serving.deregister(instance("web", "c", address="127.0.0.3"))
    wait_for(
        lambda: reader.snapshot().claims == ((P, "api"),),
        2 * claimant.keepalive_interval() + 2,
        what="the claimant to take the free port",
    )
    assert claimant.conflicts() == []
    assert port_key(etcd, "api") is not None


def test_two_ports_for_one_service_keep_the_first_and_never_flap(
    etcd: Etcd,
    hosts: Callable[..., EtcdRegistry],
    keepers: Callable[[EtcdRegistry], Keeper],
) -> None:
    host_a, host_b = hosts("a", ttl=3), hosts("b", ttl=3)
    host_a.register(instance("web", "a", frontend_port=8000))
    host_b.register(instance("web", "b", frontend_port=9000, address="127.0.0.2"))
    assert host_a.conflicts() == []
    [problem] = host_b.conflicts()
    assert "9000" in problem.message and "8000" in problem.message
    first = port_key(etcd, "web")
    assert first is not None and first[0] == "8000"
    keepers(host_a)
    keepers(host_b)
    reader = hosts("reader")
    deadline = time.monotonic() + 4 * host_a.keepalive_interval()
    while time.monotonic() < deadline:  # both hosts keep alive and check their claims
        assert port_key(etcd, "web") == first
        catalog = reader.snapshot()
        assert {i.frontend_port for i in catalog.instances} == {8000}  # B's too
        assert catalog.claims == ((8000, "web"),)
        time.sleep(0.1)
    # Host A leaves: B still serves web, on the fleet's port, not on its own.
    host_a.close(deregister=True)
    wait_for(
        lambda: (port_key(etcd, "web") or ("",))[0] == "8000",
        host_b.keepalive_interval() + 2,
        what="host B to write the port key again",
    )
    assert reader.snapshot().claims == ((8000, "web"),)
    assert {i.frontend_port for i in reader.snapshot().instances} == {8000}
    assert len(host_b.conflicts()) == 1


def test_first_registrations_racing_with_different_ports_agree(
    etcd: Etcd, hosts: Callable[..., EtcdRegistry]
) -> None:
    registries = [hosts(f"h{n}") for n in range(6)]
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
    assert service == "web"
    assert {i.frontend_port for i in catalog.instances} == {port}
    key = port_key(etcd, "web")
    assert key is not None and key[0] == str(port)
    unhappy = [r for r in registries if r.conflicts()]
    assert len(unhappy) == len(registries) - 1  # all but the one whose port won


def test_leaving_hands_the_port_key_to_another_holder(
    etcd: Etcd, hosts: Callable[..., EtcdRegistry]
) -> None:
    host_a, host_c = hosts("a"), hosts("c")
    web_a = instance("web", "a")
    host_a.register(web_a)
    host_c.register(instance("web", "c", address="127.0.0.3"))
    assert port_key(etcd, "web")[1] == host_a.lease_id  # type: ignore[index]
    host_a.deregister(web_a)
    # No gap: the key moved to host C's lease in the same breath.
    key = port_key(etcd, "web")
    assert key is not None and key[:2] == ("8000", host_c.lease_id)
    assert raw_client(etcd).get_prefix(f"{CLAIMS}/services/web/") != []
    host_c.deregister(instance("web", "c", address="127.0.0.3"))
    assert port_key(etcd, "web") is None
    assert raw_client(etcd).get_prefix(f"{CLAIMS}/") == []  # nothing outlives the service


def test_an_idle_host_costs_one_check_per_keepalive(
    etcd: Etcd, hosts: Callable[..., EtcdRegistry], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = hosts("a")
    registry.register_many([instance(f"svc{n}", "a", n, frontend_port=9000 + n) for n in range(80)])
    calls: list[str] = []
    original = registry.gateway.call

    def counting(what: str, fn: Any, *, write: bool = False) -> Any:
        calls.append(what)
        return original(what, fn, write=write)

    monkeypatch.setattr(registry.gateway, "call", counting)
    for _ in range(3):
        calls.clear()
        assert registry.keepalive() is True
        # The lease, and one transaction checking up to 60 port keys (in turn).
        assert calls == ["keepalive", "claims check"], calls
    interval = hosts("default").keepalive_interval()
    assert 2 / interval < 1.0, f"idle cost {2 / interval:.2f} requests/s with the default TTL"
    idle = hosts("b")
    idle.register(instance("x", "b", frontend_port=None))  # no claim: the lease only
    monkeypatch.setattr(idle.gateway, "call", counting)
    calls.clear()
    assert idle.keepalive() is True
    assert calls == ["keepalive"]


def test_every_missing_port_key_comes_back_within_two_keepalives(
    etcd: Etcd, hosts: Callable[..., EtcdRegistry]
) -> None:
    registry = hosts("a")
    registry.register_many([instance(f"svc{n}", "a", n, frontend_port=9000 + n) for n in range(80)])
    raw = raw_client(etcd)
    for n in range(80):
        raw.delete(f"/backends/svc{n}/port")
    registry.keepalive()
    registry.keepalive()
    for n in range(80):
        assert port_key(etcd, f"svc{n}") is not None, n


def test_watch_names_the_service_whose_claim_changed(
    etcd: Etcd, hosts: Callable[..., EtcdRegistry]
) -> None:
    reader = hosts("reader")
    named: list[frozenset[str] | None] = []
    stop = threading.Event()

    def notify(reason: str, services: Any = None) -> None:
        named.append(None if services is None else frozenset(services))

    thread = threading.Thread(
        target=reader.watch, args=(notify, stop, reader.snapshot().revision), daemon=True
    )
    thread.start()
    try:
        time.sleep(0.3)
        raw_client(etcd).put(f"{CLAIMS}/services/web/elsewhere", "8000")
        wait_for(lambda: bool(named), 10, what="a notification")
        assert named == [frozenset({"web"})]
        assert reader.read_services(["web"]).claims == ((P, "web"),)
    finally:
        stop.set()
        reader.close()
        thread.join(10)


def test_hand_written_claims_are_problems_of_their_service(
    etcd: Etcd, hosts: Callable[..., EtcdRegistry]
) -> None:
    raw = raw_client(etcd)
    raw.put(f"{CLAIMS}/services/web/h1", "8000")
    raw.put(f"{CLAIMS}/services/web/h2", "9000")  # disagrees with the older holder
    raw.put(f"{CLAIMS}/services/api/h3", "8000")  # a port "web" claimed first
    raw.put(f"{CLAIMS}/services/db/h4", "http")
    raw.put(f"{CLAIMS}/services/stray", "1")
    catalog = hosts("reader").snapshot()
    assert catalog.claims == ((P, "web"),)
    by_service = {(p.service, p.subject) for p in catalog.problems}
    assert by_service == {
        ("web", f"{CLAIMS}/services/web/h2"),
        ("api", f"{CLAIMS}/services/api"),
        ("db", f"{CLAIMS}/services/db/h4"),
        ("", f"{CLAIMS}/services/stray"),
    }


def test_a_user_without_access_to_the_claims_still_registers(
    etcd: Etcd, hosts: Callable[..., EtcdRegistry]
) -> None:
    import subprocess

    def etcdctl(*args: str) -> None:
        command = [require_binary("etcdctl"), f"--endpoints={etcd.url}", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr

    etcdctl("user", "add", "root", "--new-user-password=rootpw", "--interactive=false")
    etcdctl("user", "add", "reg", "--new-user-password=regpw", "--interactive=false")
    etcdctl("role", "add", "reg")
    for prefix in ("/backends/", "/discoverd/instances/"):
        etcdctl("role", "grant-permission", "reg", "--prefix=true", "readwrite", prefix)
    etcdctl("user", "grant-role", "reg", "reg")
    etcdctl("auth", "enable")
    registry = hosts("a", user="reg", password="regpw")
    registry.register(instance("web", "a"))
    [problem] = registry.conflicts()
    assert "could not be claimed" in problem.message and CLAIMS in problem.message
    assert "regpw" not in problem.message
    assert [i.id for i in hosts("r", user="root", password="rootpw").snapshot().instances] == [
        instance("web", "a").id
    ]
    assert registry.keepalive() is True  # the claim is tried again, quietly


# --------------------------------------------------------------------------------------------
# Options and messages


def test_claim_prefix_must_not_overlap_the_others() -> None:
    with pytest.raises(ConfigError, match="claim_prefix"):
        config(claim_prefix="/backends/claims")
    with pytest.raises(ConfigError, match="claim_prefix"):
        config(claim_prefix="/discoverd/instances/x")
    assert config(claim_prefix="/x/claims/").claim_prefix == "/x/claims"


def test_credentials_over_plain_http_are_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="discoverd.etcd")
    remote = EtcdRegistry(config("192.0.2.1:2379", "127.0.0.1:2379", user="root", password="pw"))
    remote.close()
    [record] = [r for r in caplog.records if "without TLS" in r.getMessage()]
    text = record.getMessage()
    assert "http://192.0.2.1:2379" in text and "127.0.0.1" not in text
    assert "pw" not in text.replace("password", "")
    caplog.clear()
    for quiet in (
        config("127.0.0.1:2379", "[::1]:2379", "localhost", user="root", password="pw"),
        config("192.0.2.1:2379"),  # no credentials
        config("192.0.2.1:2379", user="root", password="pw", ca_cert="/ca.pem"),  # https
    ):
        EtcdRegistry(quiet).close()
    assert not [r for r in caplog.records if "without TLS" in r.getMessage()]
