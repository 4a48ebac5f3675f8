"""The etcd registry against real etcd servers (one fresh server per test)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from discoverd import (
    Catalog,
    ConfigError,
    HostInfo,
    PluginContext,
    PluginError,
    ServiceInstance,
    Unavailable,
    build_config,
)
from discoverd.plugins.etcd import discoverd_register_registries, make_registry
from discoverd.plugins.etcd.config import EtcdConfig
from discoverd.plugins.etcd.gateway import EndpointFailed, b64
from discoverd.plugins.etcd.registry import EtcdRegistry
from tests.plugins.etcd.raw import RawEtcd
from tests.support.services import Etcd, free_port, require_binary, wait_for

if TYPE_CHECKING:
    from tests.support.etcd import EtcdCluster

META = "/discoverd/instances"


# --------------------------------------------------------------------------------------------
# Helpers


def config(*endpoints: str, **options: Any) -> EtcdConfig:
    """A checked configuration, as the core builds it from the ``[etcd]`` section."""
    values: dict[str, Any] = dict(options)
    if endpoints:
        values["endpoints"] = list(endpoints)
    return build_config(EtcdConfig, values, section="etcd")


def ignore(reason: str, services: Collection[str] | None = None) -> None:
    """A notify for watches whose notifications do not matter."""


def etcdctl(server: Etcd, *args: str, user: str = "") -> str:
    """Run etcdctl (v3 API) against ``server``; fail the test if it fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    command = [require_binary("etcdctl"), f"--endpoints={server.url}"]
    if user:
        command.append(f"--user={user}")
    result = subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    assert result.returncode == 0, f"etcdctl {' '.join(args)}: {result.stderr}"
    return result.stdout


def raw_client(server: Etcd) -> RawEtcd:
    """A plain client, as another tool (or the seed's docker-register) would use."""
    return RawEtcd(server.url)


def keys_under(server: Etcd, prefix: str) -> dict[str, tuple[str, int]]:
    """``{key: (value, lease id)}`` for every key below ``prefix``."""
    found = {}
    for value, meta in raw_client(server).get_prefix(prefix):
        found[meta["key"].decode()] = (value.decode(), int(meta.get("lease", 0)))
    return found


def instance(
    service: str = "whoami",
    iid: str = "host1:0123456789ab:8000:tcp",
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
        **extra,
    )


class WatchRunner:
    """Runs ``registry.watch`` in a thread and records what happened: each notification's
    reason, and the services it named (``None``: read everything)."""

    def __init__(self, registry: EtcdRegistry, since: int) -> None:
        self.registry = registry
        self.since = since
        self.reasons: list[str] = []
        self.services: list[frozenset[str] | None] = []
        self.error: BaseException | None = None
        self.returned = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.registry.watch(self.notify, self.stop, self.since)
            self.returned = True
        except BaseException as exc:
            self.error = exc

    def notify(self, reason: str, services: Collection[str] | None = None) -> None:
        self.services.append(None if services is None else frozenset(services))
        self.reasons.append(reason)  # last: a waiter counting reasons sees both

    def wait_for_notifications(self, count: int, timeout: float = 10) -> None:
        wait_for(lambda: len(self.reasons) >= count, timeout, what=f"{count} notification(s)")

    def wait_ended(self, timeout: float = 15) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "watch did not end"

    def finish(self) -> None:
        self.stop.set()
        self.wait_ended()


@pytest.fixture
def registries(etcd: Etcd) -> Iterator[Callable[..., EtcdRegistry]]:
    """Build registries on the test's etcd (or other endpoints); all are closed afterwards."""
    made: list[EtcdRegistry] = []

    def make(*endpoints: str, host_id: str = "", **options: Any) -> EtcdRegistry:
        registry = EtcdRegistry(config(*(endpoints or [etcd.endpoint]), **options), host_id=host_id)
        made.append(registry)
        return registry

    yield make
    for registry in made:
        registry.close()


@pytest.fixture
def watchers() -> Iterator[Callable[[EtcdRegistry, int], WatchRunner]]:
    runners: list[WatchRunner] = []

    def start(registry: EtcdRegistry, since: int) -> WatchRunner:
        runner = WatchRunner(registry, since)
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.stop.set()
        runner.registry.close()
        runner.thread.join(10)
        assert not runner.thread.is_alive(), "a watch thread outlived its test"


# --------------------------------------------------------------------------------------------
# Plugin record and options


def test_plugin_record_and_factory(etcd: Etcd, tmp_path: Path) -> None:
    [record] = discoverd_register_registries()
    assert record.name == "etcd"
    assert record.factory is make_registry
    assert record.config is EtcdConfig
    options = {o.name: o for o in record.options}
    assert options["endpoints"].env == ("ETCD_HOST",)
    assert options["endpoints"].default == ("127.0.0.1:2379",)
    assert options["password"].secret
    registry = record.factory(
        PluginContext(
            config=config(etcd.endpoint), host=HostInfo(ip="", id="h9"), state_dir=tmp_path
        )
    )
    try:
        assert isinstance(registry, EtcdRegistry)
        assert registry.keepalive_interval() == pytest.approx(15 / 3)
        registry.register(instance(host_id=""))
        meta = json.loads(keys_under(etcd, META)[f"{META}/whoami/host1:0123456789ab:8000:tcp"][0])
        assert meta["host_id"] == "h9"  # the agent's id when the instance does not carry one
    finally:
        registry.close(deregister=True)


def test_endpoints_become_base_urls() -> None:
    assert config("127.0.0.1:2379").urls == ("http://127.0.0.1:2379",)
    assert config("10.0.0.1:1, 10.0.0.2:2,,").urls == ("http://10.0.0.1:1", "http://10.0.0.2:2")
    assert config("etcd.local").urls == ("http://etcd.local:2379",)
    assert config("https://[::1]:4001/").urls == ("https://[::1]:4001",)
    # TLS options mean https, even for an explicit http://.
    assert config("[::1]:4001", "http://a:1", ca_cert="/ca.pem").urls == (
        "https://[::1]:4001",
        "https://a:1",
    )
    for bad in (["ftp://a:1"], ["a:99999"], ["http://a:1/v3"], [" , "]):
        with pytest.raises(ConfigError, match="etcd"):
            config(*bad)


def test_endpoint_credentials_are_never_shown() -> None:
    for bad in ("http://root:s3cret@10.0.0.1:2379", "root:s3cret@10.0.0.1:2379"):
        with pytest.raises(ConfigError) as caught:
            config("10.0.0.2:2379", bad)
        message = str(caught.value)
        assert "s3cret" not in message and "root" not in message, message
        assert "***@10.0.0.1:2379" in message and "endpoints" in message


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"ttl": 0}, ["etcd.ttl", "at least 1"]),
        ({"timeout": 0}, ["etcd.timeout", "above zero"]),
        ({"key": "/k.pem"}, ["key", "cert"]),
        ({"password": "s3cret"}, ["password", "user"]),
        ({"prefix": "/"}, ["etcd.prefix", "key prefix"]),
    ],
)
def test_bad_options_name_their_key(options: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        config(**options)
    message = str(caught.value)
    assert all(word in message for word in words), message
    assert "s3cret" not in message and "\n" not in message


def test_password_file_holds_the_password(tmp_path: Path) -> None:
    secret = tmp_path / "etcd-password"
    secret.write_text("s3cret with spaces\nsecond line\n")
    assert config(user="u", password_file=str(secret)).auth_password == "s3cret with spaces"
    # The file wins over password; an empty file leaves password.
    assert config(user="u", password="p", password_file=str(secret)).auth_password.startswith("s3")
    empty = tmp_path / "empty"
    empty.write_text("")
    assert config(user="u", password="p", password_file=str(empty)).auth_password == "p"
    crlf = tmp_path / "crlf"
    crlf.write_bytes(b"pw\r\n")
    assert config(user="u", password_file=str(crlf)).auth_password == "pw"
    for options, words in (
        ({"user": "u", "password_file": str(tmp_path / "missing")}, ["password_file", "file"]),
        ({"password_file": str(secret)}, ["password_file", "user"]),
    ):
        with pytest.raises(ConfigError) as caught:
            config(**options)
        message = str(caught.value)
        assert all(word in message for word in words), message
        assert "s3cret" not in message
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xffs3cret\n")
    with pytest.raises(ConfigError) as caught:
        config(user="u", password_file=str(binary))
    assert "UTF-8" in str(caught.value) and "s3cret" not in str(caught.value)


def test_overlapping_prefixes_are_refused() -> None:
    with pytest.raises(ConfigError, match="overlap"):
        config(prefix="/backends", meta_prefix="/backends/meta")
    with pytest.raises(ConfigError, match="overlap"):
        config(prefix="/x/", meta_prefix="/x")
    with pytest.raises(ConfigError, match="prefix"):
        config(prefix="/", meta_prefix="/meta")
    assert config(prefix="/a/", meta_prefix="/ab").prefix == "/a"  # "/ab" is not below "/a/"


# --------------------------------------------------------------------------------------------
# Register side


def test_register_writes_the_seed_layout_on_one_lease(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    registry = registries()
    one = instance(tags=("blue", "v2"), meta=(("mode", "http"),), host_id="host1")
    two = instance(iid="host1:ba9876543210:8000:tcp", port=32769)
    other = instance(service="redis", iid="host1:cafe:6379:tcp", port=32770, frontend_port=6379)
    for each in (one, two, other):
        registry.register(each)
    registry.register(one)  # idempotent

    lease = registry.lease_id
    assert lease is not None
    backends = keys_under(etcd, "/backends/")
    assert backends == {
        "/backends/whoami/host1:0123456789ab:8000:tcp": ("127.0.0.1:32768", lease),
        "/backends/whoami/host1:ba9876543210:8000:tcp": ("127.0.0.1:32769", lease),
        "/backends/whoami/port": ("8000", lease),
        "/backends/redis/host1:cafe:6379:tcp": ("127.0.0.1:32770", lease),
        "/backends/redis/port": ("6379", lease),
    }
    metadata = keys_under(etcd, META + "/")
    assert set(metadata) == {
        f"{META}/whoami/host1:0123456789ab:8000:tcp",
        f"{META}/whoami/host1:ba9876543210:8000:tcp",
        f"{META}/redis/host1:cafe:6379:tcp",
    }
    assert {lease_id for _, lease_id in metadata.values()} == {lease}
    assert json.loads(metadata[f"{META}/whoami/host1:0123456789ab:8000:tcp"][0]) == {
        "frontend_port": 8000,
        "protocol": "tcp",
        "tags": ["blue", "v2"],
        "meta": {"mode": "http"},
        "host_id": "host1",
    }
    # The lease as etcd sees it: every key of this agent, nothing else.
    listed = etcdctl(etcd, "lease", "timetolive", f"{lease:x}", "--keys")
    for key in (*backends, *metadata):
        assert key in listed
    # All keys of one instance were written in one transaction (one revision).
    revisions = {
        meta["key"].decode(): int(meta["mod_revision"])
        for prefix in ("/backends/redis/", f"{META}/redis/")
        for _, meta in raw_client(etcd).get_prefix(prefix)
    }
    assert len(set(revisions.values())) == 1, revisions


def test_snapshot_returns_instances_with_port_and_metadata(
    registries: Callable[..., EtcdRegistry],
) -> None:
    writer = registries()
    one = instance(tags=("blue",), meta=(("mode", "http"),), host_id="host1")
    dns = instance(
        service="dns", iid="host1:beef:53:udp", port=5353, frontend_port=53, protocol="udp"
    )
    writer.register(one)
    writer.register(dns)
    catalog = registries().snapshot()  # another agent's view
    assert catalog.problems == ()
    assert catalog.revision > 0
    assert sorted(catalog.instances) == sorted([one, dns])


def test_snapshot_reads_plain_entries_of_the_original_docker_register(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    raw = raw_client(etcd)
    raw.put("/backends/whoami/3f9a1c2b7d4e", "10.1.2.3:49153")
    raw.put("/backends/whoami/8e7d6c5b4a39", "10.1.2.4:49154")
    raw.put("/backends/whoami/port", "8000")
    catalog = registries().snapshot()
    assert catalog.problems == ()
    assert sorted(catalog.instances) == [
        ServiceInstance("whoami", "3f9a1c2b7d4e", "10.1.2.3", 49153, frontend_port=8000),
        ServiceInstance("whoami", "8e7d6c5b4a39", "10.1.2.4", 49154, frontend_port=8000),
    ]


def test_malformed_entries_become_problems_and_affect_only_themselves(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    raw = raw_client(etcd)
    raw.put("/backends/good/aaa", "10.0.0.1:80")
    raw.put("/backends/good/bbb", "garbage")  # a bad value: only this entry is dropped
    raw.put("/backends/good/port", "8080")
    raw.put("/backends/noport/ccc", "10.0.0.2:80")  # no port key and no metadata
    raw.put("/backends/Bad_Name/ddd", "10.0.0.3:80")  # service dir with an invalid name
    raw.put("/backends/Bad_Name/port", "9000")
    raw.put("/backends/good/sub/dir", "10.0.0.4:80")  # not <service>/<id>
    raw.put("/backends/good/-x", "10.0.0.5:80")  # invalid instance id
    raw.put("/backends/badport/eee", "10.0.0.6:80")
    raw.put("/backends/badport/port", "http")  # invalid, but the metadata knows the port
    raw.put(f"{META}/badport/eee", json.dumps({"frontend_port": 7000, "tags": ["x"]}))
    raw.put("/backends/badmeta/fff", "10.0.0.7:80")
    raw.put("/backends/badmeta/port", "7100")
    raw.put(f"{META}/badmeta/fff", "{not json")  # bad metadata: the plain entry still counts
    raw.put("/backends/good/ggg", "10.0.0.8:\u00b2")  # a digit that is not an ASCII digit
    raw.put("/backends/sup/hhh", "10.0.0.9:80")
    raw.put("/backends/sup/port", "\u00b2")  # ditto, in the port key
    # An IPv6 scope id may hold spaces: it must never carry proxy keywords into a config.
    raw.put("/backends/good/iii", "[fe80::1%lo init-addr none weight 256 send-proxy-v2 ]:80")

    catalog = registries().snapshot()
    assert sorted((i.service, i.id, i.frontend_port, i.tags) for i in catalog.instances) == [
        ("badmeta", "fff", 7100, ()),
        ("badport", "eee", 7000, ("x",)),
        ("good", "aaa", 8080, ()),
    ]
    problems = {p.subject: p.message for p in catalog.problems}
    assert set(problems) == {
        "/backends/good/bbb",
        "/backends/noport/port",
        "/backends/Bad_Name",
        "/backends/good/sub/dir",
        "/backends/good/-x",
        "/backends/badport/port",
        f"{META}/badmeta/fff",
        "/backends/good/ggg",
        "/backends/sup/port",
        "/backends/good/iii",
    }
    assert "IP:PORT" in problems["/backends/good/bbb"]
    assert "missing" in problems["/backends/noport/port"]
    assert "service noport" in problems["/backends/noport/port"]
    assert "service name" in problems["/backends/Bad_Name"]
    assert "metadata" in problems["/backends/badport/port"]


def test_entries_expire_when_keepalives_stop(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    registry = registries(ttl=2)
    assert registry.keepalive_interval() == pytest.approx(2 / 3)
    registry.register(instance())
    # Kept alive across more than one TTL ...
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert registry.keepalive() is True
        time.sleep(0.3)
    assert len(keys_under(etcd, "/backends/")) == 2
    # ... and gone soon after the keepalives stop.
    wait_for(lambda: not keys_under(etcd, "/backends/"), 10, what="entries to expire")
    assert keys_under(etcd, META + "/") == {}


def test_keepalive_reports_a_revoked_lease_and_registering_again_works(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    registry = registries()
    registry.register(instance())
    assert registry.keepalive() is True
    old = registry.lease_id
    assert old is not None
    etcdctl(etcd, "lease", "revoke", f"{old:x}")
    assert keys_under(etcd, "/backends/") == {}

    assert registry.keepalive() is False  # the core re-registers everything now
    new = registry.lease_id
    assert new is not None and new != old
    registry.register(instance())
    assert {lease for _, lease in keys_under(etcd, "/backends/").values()} == {new}
    assert registry.keepalive() is True


def test_register_after_a_lost_lease_uses_a_new_one_and_reports_the_loss(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    registry = registries()
    registry.register(instance())
    old = registry.lease_id
    assert old is not None
    etcdctl(etcd, "lease", "revoke", f"{old:x}")
    second = instance(iid="host1:second:8000:tcp", port=40000)
    registry.register(second)  # the lease is gone: a new one, and this instance is written
    assert registry.lease_id not in (None, old)
    assert "/backends/whoami/host1:second:8000:tcp" in keys_under(etcd, "/backends/")
    assert registry.keepalive() is False  # the first instance went with the old lease
    assert registry.keepalive() is True


def test_close_with_deregister_removes_entries_at_once(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    registry = registries()
    registry.register(instance())
    assert keys_under(etcd, "/backends/")
    registry.close(deregister=True)
    assert keys_under(etcd, "/backends/") == {}
    assert keys_under(etcd, META + "/") == {}
    # A register that comes late (a reconcile still running at shutdown) writes nothing.
    with pytest.raises(PluginError, match="closed"):
        registry.register(instance(iid="late:1:8000:tcp"))
    assert keys_under(etcd, "/backends/") == {}


def test_close_without_deregister_leaves_entries_to_expire(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    registry = registries(ttl=30)
    registry.register(instance())
    registry.close()
    assert len(keys_under(etcd, "/backends/")) == 2


def test_deregister_removes_own_keys_and_the_port_key_only_when_it_is_ours(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    host_a, host_b = registries(), registries()
    a1 = instance(iid="a:1:8000:tcp", port=41001)
    a2 = instance(iid="a:2:8000:tcp", port=41002)
    b1 = instance(iid="b:1:8000:tcp", port=42001, address="127.0.0.2")
    host_b.register(b1)  # B writes the port key first: it is on B's lease
    host_a.register(a1)  # the same value is already there: A leaves it with B
    host_a.register(a2)
    assert keys_under(etcd, "/backends/whoami/port")["/backends/whoami/port"][1] == host_b.lease_id

    host_a.deregister(a1)  # A still has a2
    host_a.deregister(a2)  # A has none left, but the port key is B's: it stays
    assert set(keys_under(etcd, "/backends/")) == {
        "/backends/whoami/b:1:8000:tcp",
        "/backends/whoami/port",
    }
    assert set(keys_under(etcd, META + "/")) == {f"{META}/whoami/b:1:8000:tcp"}
    host_a.deregister(a2)  # idempotent

    # B leaves while A serves again: the port key goes with B's lease, and A's instance is
    # still found through the frontend port in its metadata.
    host_a.register(a1)
    host_b.close(deregister=True)
    assert set(keys_under(etcd, "/backends/")) == {"/backends/whoami/a:1:8000:tcp"}
    catalog = registries().snapshot()
    assert catalog.instances == (a1,)
    assert catalog.problems == ()

    host_a.deregister(a1)
    assert keys_under(etcd, "/backends/") == {}


def test_a_port_key_of_the_original_docker_register_survives_our_leaving(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    raw = raw_client(etcd)
    raw.put("/backends/whoami/port", "8000")  # written by the seed's sidecar, no lease
    raw.put("/backends/whoami/736ab83847bb", "10.170.71.227:49153")
    ours = registries()
    ours.register(instance(iid="a:1:8000:tcp", port=41001))
    assert keys_under(etcd, "/backends/whoami/port")["/backends/whoami/port"] == ("8000", 0)
    ours.close(deregister=True)
    assert set(keys_under(etcd, "/backends/")) == {
        "/backends/whoami/port",
        "/backends/whoami/736ab83847bb",
    }
    [seed] = registries().snapshot().instances
    assert (seed.endpoint, seed.frontend_port) == ("10.170.71.227:49153", 8000)


def test_deregister_keeps_the_port_key_while_this_agent_has_instances(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    registry = registries()
    registry.register(instance(iid="x:1:8000:tcp"))
    registry.register(instance(iid="x:2:8000:tcp", port=32999))
    registry.deregister(instance(iid="x:1:8000:tcp"))
    assert set(keys_under(etcd, "/backends/")) == {
        "/backends/whoami/x:2:8000:tcp",
        "/backends/whoami/port",
    }


# --------------------------------------------------------------------------------------------
# Watch


def test_watch_notifies_on_put_and_delete(
    etcd: Etcd,
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    reader = registries()
    runner = watchers(reader, reader.snapshot().revision)
    raw = raw_client(etcd)
    raw.put("/backends/whoami/abc", "10.0.0.1:80")
    runner.wait_for_notifications(1)
    assert set(runner.reasons) == {"etcd watch"}
    assert set(runner.services) == {frozenset({"whoami"})}  # each names the service it touched
    count = len(runner.reasons)
    raw.delete("/backends/whoami/abc")
    runner.wait_for_notifications(count + 1)
    assert runner.services[count:] == [frozenset({"whoami"})]
    count = len(runner.reasons)
    raw.put(f"{META}/redis/abc", "{}")  # the metadata prefix is watched too
    runner.wait_for_notifications(count + 1)
    assert runner.services[count:] == [frozenset({"redis"})]
    count = len(runner.reasons)
    raw.put("/elsewhere/x", "1")  # outside both prefixes: no notification
    raw.put("/backends/whoami/def", "10.0.0.2:80")
    runner.wait_for_notifications(count + 1)
    assert len(runner.reasons) == count + 1
    assert runner.services[count:] == [frozenset({"whoami"})]
    count = len(runner.reasons)
    raw.put("/backends/stray-key", "x")  # in no service directory: read everything
    runner.wait_for_notifications(count + 1)
    assert runner.services[count:] == [None]
    assert runner.thread.is_alive()
    runner.finish()
    assert runner.returned and runner.error is None


def test_watch_resumes_from_the_snapshot_revision(
    etcd: Etcd,
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    reader = registries()
    revision = reader.snapshot().revision
    raw_client(etcd).put("/backends/whoami/abc", "10.0.0.1:80")  # between snapshot and watch
    runner = watchers(reader, revision)
    runner.wait_for_notifications(1)
    # Control: a watch "from now" does not see that earlier change.
    later = watchers(registries(), 0)
    time.sleep(0.5)
    assert later.reasons == []
    raw_client(etcd).put("/backends/whoami/def", "10.0.0.2:80")
    later.wait_for_notifications(1)


def views(catalog: Any) -> tuple[list[Any], list[str], list[Any]]:
    return (
        sorted(catalog.instances, key=lambda i: i.id),
        sorted(map(str, catalog.problems)),
        sorted(catalog.claims),
    )


def same_read(reader: EtcdRegistry, services: list[str]) -> None:
    """Wait until the mirror holds every message of the changes made so far (a change's
    instance keys, metadata and claims come in one message per watched range), then check
    that ``read_services`` answers what a read of etcd answers."""
    wait_for(
        lambda: (
            (mirrored := reader.reader._from_mirror(sorted(services))) is not None
            and views(mirrored) == views(reader.reader._read_services(sorted(services)))
        ),
        10,
        what="the mirror to hold every change",
    )
    assert views(reader.read_services(services)) == views(
        reader.reader._read_services(sorted(services))
    )


def test_read_services_answers_from_the_watch_without_reading_etcd(
    etcd: Etcd,
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    writer, reader = registries(host_id="host1"), registries()
    first = instance(host_id="host1", meta=(("mode", "http"),))
    writer.register(first)
    runner = watchers(reader, reader.snapshot().revision)
    second = instance(iid="host1:ba9876543210:8000:tcp", port=32769, host_id="host1")
    writer.register(second)
    runner.wait_for_notifications(2)  # the instance key and its metadata, one message each
    same_read(reader, ["whoami"])
    found = reader.read_services(["whoami"])
    assert {i.id for i in found.instances} == {first.id, second.id}
    assert (reader.reader.mirror_reads, reader.reader.etcd_reads) == (2, 0)
    assert dict(next(i for i in found.instances if i.id == first.id).meta)["mode"] == "http"

    count = len(runner.reasons)
    writer.deregister(first)
    runner.wait_for_notifications(count + 2)
    same_read(reader, ["whoami", "redis", "absent"])
    assert {i.id for i in reader.read_services(["whoami"]).instances} == {second.id}
    assert reader.reader.etcd_reads == 0

    # An entry without metadata (the seed's docker-register): the mirror cannot tell it from
    # a registration whose metadata is still on its way; after a short wait for that, etcd is
    # read, as before. The same entry is not waited for again.
    count = len(runner.reasons)
    waits = (reader.reader.companion_waits, reader.reader.companion_timeouts)  # same_read's
    raw_client(etcd).put("/backends/whoami/seedy", "10.0.0.9:80")
    runner.wait_for_notifications(count + 1)
    assert "seedy" in {i.id for i in reader.read_services(["whoami"]).instances}
    assert reader.reader.etcd_reads == 1
    after = (reader.reader.companion_waits, reader.reader.companion_timeouts)
    assert (after[0] - waits[0], after[1] - waits[1]) == (1, 1)
    assert "seedy" in {i.id for i in reader.read_services(["whoami"]).instances}
    assert reader.reader.etcd_reads == 2
    assert (reader.reader.companion_waits, reader.reader.companion_timeouts) == after


class HoldingRunner(WatchRunner):
    """A watch that, once armed, holds its thread in the next notification until released:
    the mirror then has that message and not the ones after it."""

    def __init__(self, registry: EtcdRegistry, since: int) -> None:
        self.armed = threading.Event()
        self.held = threading.Event()
        self.release = threading.Event()
        super().__init__(registry, since)

    def notify(self, reason: str, services: Collection[str] | None = None) -> None:
        super().notify(reason, services)
        if self.armed.is_set():
            self.armed.clear()
            self.held.set()
            self.release.wait(10)

    def arm(self) -> None:
        self.held.clear()
        self.release.clear()
        self.armed.set()


def test_a_read_between_a_registrations_two_messages_waits_for_the_second(
    registries: Callable[..., EtcdRegistry],
) -> None:
    writer, reader = registries(host_id="host1"), registries()
    # The host serves the service already: the changes below are an instance key and its
    # metadata key each (no claim), in one transaction and two watch messages.
    first = instance(host_id="host1")
    writer.register(first)
    runner = HoldingRunner(reader, reader.snapshot().revision)
    try:
        wait_for(lambda: reader.reader._targets is not None, 5, what="the watch")
        reader.reader.companion_wait = 10.0
        runner.arm()
        second = instance(iid="host1:ba9876543210:8000:tcp", port=32769, host_id="host1",
                          meta=(("mode", "http"),))  # fmt: skip
        writer.register(second)  # the watch stops after the first of its two messages
        runner.held.wait(10)
        found: list[Any] = []
        read = threading.Thread(target=lambda: found.append(reader.read_services(["whoami"])))
        read.start()
        wait_for(lambda: reader.reader.companion_waits == 1, 5, what="the read to wait")
        assert reader.reader.etcd_reads == 0 and read.is_alive()
        runner.release.set()  # the second message comes: the read answers from the mirror
        read.join(10)
        modes = {i.id: dict(i.meta).get("mode") for i in found[0].instances}
        assert modes == {first.id: None, second.id: "http"}
        assert (reader.reader.mirror_reads, reader.reader.etcd_reads) == (1, 0)
        assert reader.reader.companion_timeouts == 0
        runner.wait_for_notifications(2)  # none held from now

        # Control: without the wait, the same read between the two messages goes to etcd.
        reader.reader.companion_wait = 0.0
        runner.arm()
        third = instance(iid="host1:cccccccccccc:8000:tcp", port=32770, host_id="host1")
        writer.register(third)
        runner.held.wait(10)
        answer = reader.read_services(["whoami"])
        runner.release.set()
        assert {i.id for i in answer.instances} == {first.id, second.id, third.id}
        assert (reader.reader.mirror_reads, reader.reader.etcd_reads) == (1, 1)
        assert reader.reader.companion_timeouts == 1
        runner.wait_for_notifications(4)

        # A removal's two messages: the same wait.
        reader.reader.companion_wait = 10.0
        runner.arm()
        writer.deregister(second)
        runner.held.wait(10)
        read = threading.Thread(target=lambda: found.append(reader.read_services(["whoami"])))
        read.start()
        wait_for(lambda: reader.reader.companion_waits == 3, 5, what="the read to wait")
        runner.release.set()
        read.join(10)
        assert {i.id for i in found[-1].instances} == {first.id, third.id}
        assert (reader.reader.mirror_reads, reader.reader.etcd_reads) == (2, 1)
    finally:
        runner.release.set()
        runner.finish()


def test_read_services_reads_etcd_without_a_watch_from_the_last_snapshot(
    etcd: Etcd,
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    writer, reader = registries(host_id="host1"), registries()
    reader.snapshot()
    runner = watchers(reader, 0)  # from now: what came between is not in any mirror
    wait_for(lambda: reader.reader._targets is not None, 5, what="the watch")
    writer.register(instance(host_id="host1"))
    runner.wait_for_notifications(2)
    assert len(reader.read_services(["whoami"]).instances) == 1
    assert (reader.reader.mirror_reads, reader.reader.etcd_reads) == (0, 1)
    runner.finish()
    assert len(reader.read_services(["whoami"]).instances) == 1  # no watch at all
    assert (reader.reader.mirror_reads, reader.reader.etcd_reads) == (0, 2)


def test_the_mirror_follows_bursts_claims_and_a_watch_restarted_from_older_revisions(
    etcd: Etcd,
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    reader = registries()
    writers = [registries(host_id=f"host{n}") for n in range(3)]
    base = reader.snapshot().revision
    runner = watchers(reader, base)
    names = ["web", "api", "db"]
    made: list[tuple[EtcdRegistry, ServiceInstance]] = []
    for step in range(24):
        writer = writers[step % 3]
        service = names[step % 3]
        one = instance(
            service=service,
            iid=f"host{step % 3}:{step:012x}:80:tcp",
            port=20000 + step,
            frontend_port=9100 + step % 3,
            host_id=f"host{step % 3}",
        )
        writer.register(one)
        made.append((writer, one))
        if step % 4 == 3:  # and some go again
            gone_writer, gone = made.pop(0)
            gone_writer.deregister(gone)
    writers[1].close(deregister=True)  # a host leaves: its keys and claims go at once
    latest = reader.reader._read_services(names).revision
    same_read(reader, names)
    assert reader.reader.etcd_reads == 0

    # Restarted from the snapshot's revision: everything since is delivered again and skipped.
    runner.finish()
    again = watchers(reader, base)
    wait_for(lambda: reader.reader._targets is not None, 5, what="the new watch")
    assert reader.reader._mirror is not None and reader.reader._mirror.revision() >= latest
    writers[0].register(instance(service="web", iid="host0:ffffffffffff:80:tcp", host_id="host0",
                                 port=20999, frontend_port=9100))  # fmt: skip
    again.wait_for_notifications(2)
    same_read(reader, names)
    assert reader.reader.etcd_reads == 0
    assert reader.reader.mirror_reads == 2


def test_watch_returns_at_once_when_stop_is_set_or_the_registry_is_closed(
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    reader = registries()
    runner = watchers(reader, reader.snapshot().revision)
    time.sleep(0.3)  # let it block on the stream
    assert runner.thread.is_alive()
    runner.stop.set()  # no close(): the watch must notice stop by itself
    runner.wait_ended(timeout=3)
    assert runner.returned and runner.error is None

    other = registries()
    runner = watchers(other, other.snapshot().revision)
    time.sleep(0.3)
    assert runner.thread.is_alive()
    other.close()
    runner.wait_ended(timeout=3)
    assert runner.error is None


def test_watch_ends_promptly_when_etcd_is_killed(
    etcd: Etcd,
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    reader = registries()
    runner = watchers(reader, reader.snapshot().revision)
    raw_client(etcd).put("/backends/whoami/abc", "10.0.0.1:80")
    runner.wait_for_notifications(1)  # the stream is established
    etcd.kill()
    runner.wait_ended(timeout=10)
    assert runner.returned or isinstance(runner.error, Unavailable), runner.error
    # And the next watch (the core calls it again) fails fast, naming the endpoint.
    with pytest.raises(Unavailable, match=etcd.endpoint):
        reader.watch(ignore, threading.Event(), 1)


def test_watch_returns_when_its_start_revision_was_compacted(
    etcd: Etcd,
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    raw = raw_client(etcd)
    for n in range(5):
        raw.put("/backends/whoami/abc", f"10.0.0.1:{80 + n}")
    reader = registries()
    revision = reader.snapshot().revision
    etcdctl(etcd, "compaction", str(revision))
    runner = watchers(reader, 2)  # older than the compaction: the core must re-list
    runner.wait_ended(timeout=10)
    assert runner.returned and runner.error is None
    assert runner.services == [None]  # changes were lost: read everything, not some services


def test_watch_reestablishes_an_idle_stream_without_losing_events(
    etcd: Etcd,
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="discoverd.etcd")
    reader = registries()
    reader.reader.idle_timeout = 0.3
    runner = watchers(reader, reader.snapshot().revision)
    wait_for(
        lambda: sum("idle; re-establishing" in r.getMessage() for r in caplog.records) >= 2,
        10,
        what="the idle stream to be re-established twice",
    )
    assert runner.thread.is_alive() and runner.reasons == []
    raw_client(etcd).put("/backends/whoami/abc", "10.0.0.1:80")
    runner.wait_for_notifications(1)


def test_watch_notices_a_wiped_etcd(
    etcd: Etcd,
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    raw = raw_client(etcd)
    for n in range(20):
        raw.put("/backends/whoami/abc", f"10.0.0.1:{1000 + n}")
    reader = registries()
    registrar = registries()
    registrar.register(instance())
    revision = reader.snapshot().revision
    etcd.kill()
    shutil.rmtree(etcd.data_dir)
    etcd.start()
    # The stored revision is far behind ours now: the watch must say so, not wait for it.
    runner = watchers(reader, revision)
    runner.wait_for_notifications(1)
    assert "etcd revision reset" in runner.reasons
    assert runner.services[runner.reasons.index("etcd revision reset")] is None
    count = len(runner.reasons)
    raw_client(etcd).put("/backends/whoami/new", "10.0.0.9:80")
    runner.wait_for_notifications(count + 1)
    # The register side learns that its lease is gone, and can write again.
    assert registrar.keepalive() is False
    registrar.register(instance())
    assert len(keys_under(etcd, "/backends/whoami/")) == 3


# --------------------------------------------------------------------------------------------
# Availability and failover


def test_calls_raise_unavailable_naming_the_endpoint_when_etcd_is_down(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    registry = registries(timeout=2.0)
    registry.register(instance())
    etcd.kill()
    for call in (
        registry.snapshot,
        registry.keepalive,
        lambda: registry.register(instance(iid="other")),
        lambda: registry.deregister(instance()),
    ):
        with pytest.raises(Unavailable) as caught:
            call()
        message = str(caught.value)
        assert etcd.endpoint in message and "\n" not in message
    # Back up: the lease survived the short outage, so nothing was lost.
    etcd.start()
    assert registry.keepalive() is True
    assert len(registry.snapshot().instances) == 1


def test_failover_skips_a_dead_endpoint(
    etcd: Etcd,
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    registry = registries(dead, f"http://{etcd.endpoint}")
    registry.register(instance())
    assert registry.keepalive() is True
    catalog = registry.snapshot()
    assert [i.id for i in catalog.instances] == [instance().id]
    runner = watchers(registries(dead, etcd.endpoint), catalog.revision)
    raw_client(etcd).put("/backends/whoami/abc", "10.0.0.1:80")
    runner.wait_for_notifications(1)

    both_dead = registries(dead, f"127.0.0.1:{free_port()}", timeout=1.0)
    with pytest.raises(Unavailable) as caught:
        both_dead.snapshot()
    assert dead in str(caught.value) and str(caught.value).count("127.0.0.1:") == 2


def test_user_and_password_authentication(
    etcd: Etcd,
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    early = registries(user="root", password="s3cret")
    assert early.snapshot().instances == ()  # credentials while auth is off: plain requests
    etcdctl(etcd, "user", "add", "root", "--new-user-password=s3cret", "--interactive=false")
    etcdctl(etcd, "auth", "enable")
    assert early.snapshot().instances == ()  # auth turned on under it: it authenticates now
    registry = registries(user="root", password="s3cret")
    registry.register(instance())
    catalog = registry.snapshot()
    assert [i.id for i in catalog.instances] == [instance().id]
    assert "/backends/whoami/port" in etcdctl(
        etcd, "get", "--prefix", "--keys-only", "/backends/", user="root:s3cret"
    )
    runner = watchers(registry, catalog.revision)
    registry.deregister(instance())
    runner.wait_for_notifications(1)

    # A token the server no longer knows (expired, or from another member): authenticate again.
    registry.gateway.connections[0].token = "bogus"
    assert registry.snapshot().instances == ()

    with pytest.raises(PluginError, match="authentication"):
        registries(user="root", password="wrong").snapshot()
    password_file = etcd.root / "password"
    password_file.write_text("s3cret\n")
    from_file = registries(user="root", password_file=str(password_file))
    assert [i.id for i in from_file.snapshot().instances] == []
    anonymous = registries()
    for call in (
        anonymous.snapshot,
        lambda: anonymous.watch(ignore, threading.Event(), catalog.revision),
    ):
        with pytest.raises(PluginError, match="user and password") as caught:
            call()
        assert not isinstance(caught.value, Unavailable)


def test_a_member_without_a_leader_answers_at_once(etcd_cluster: EtcdCluster) -> None:
    """Every request requires a leader: a member that lost quorum says so at once ("no
    leader") instead of holding a write for etcd's own request timeout (about 6 s), and the
    call reports it within its deadline."""
    etcd_cluster.kill(0)
    etcd_cluster.kill(1)
    registry = EtcdRegistry(config(etcd_cluster.members[2].endpoint, timeout=1.5))
    connection = registry.gateway.connections[0]
    put = {"key": b64("/x"), "value": b64("1")}

    def refused_at_once() -> bool:
        began = time.monotonic()
        try:
            connection.post("/kv/put", put, 8.0)
        except EndpointFailed as exc:
            return "no leader" in str(exc) and time.monotonic() - began < 1.0
        return False

    try:
        # Until its election timeout the member still believes in the dead leader.
        wait_for(refused_at_once, 30, what="the last member to refuse a write at once")
        with pytest.raises(Unavailable, match="no leader"):
            registry.register(instance())
    finally:
        registry.close()


def test_failover_when_the_current_member_of_a_cluster_dies(
    etcd_cluster: EtcdCluster,
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    endpoints = etcd_cluster.endpoints
    registrar = EtcdRegistry(config(*endpoints, ttl=10, timeout=2.0))
    reader = EtcdRegistry(config(*endpoints, timeout=2.0))
    try:
        registrar.register(instance())
        catalog = reader.snapshot()
        assert len(catalog.instances) == 1
        runner = watchers(reader, catalog.revision)
        registrar.register(instance(iid="second", port=40002))
        runner.wait_for_notifications(1)  # streaming from the first member

        etcd_cluster.kill(0)  # the member both agents talk to
        # The other members take over (after an election if the leader died): the registrar
        # within one call, the watch on another member from the revision it had reached,
        # without returning to the core (nothing was lost, nothing must be read again).
        registrar.register(instance("after", iid="third", port=40003))
        assert registrar.keepalive() is True
        assert registrar.gateway.current != etcd_cluster.members[0].url
        wait_for(
            lambda: frozenset({"after"}) in runner.services, 10, what="the change after the kill"
        )
        assert runner.thread.is_alive() and runner.error is None
        assert reader.gateway.current != etcd_cluster.members[0].url
        ids = {i.id for i in reader.snapshot().instances}
        assert ids == {instance().id, "second", "third"}
    finally:
        registrar.close(deregister=True)
        reader.close()


def test_a_watch_leaves_a_frozen_member(
    etcd_cluster: EtcdCluster,
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A member that stops answering (SIGSTOP: its connections stay open, nothing comes) is
    left by the watch within about one keepalive period, not after the idle timeout."""
    caplog.set_level(logging.INFO, logger="discoverd.etcd")
    endpoints = etcd_cluster.endpoints
    registrar = EtcdRegistry(config(*reversed(endpoints), timeout=2.0))
    reader = EtcdRegistry(config(*endpoints, ttl=3, timeout=2.0))
    frozen = etcd_cluster.members[0]
    try:
        assert reader.reader.probe_interval == pytest.approx(1.0)
        runner = watchers(reader, reader.snapshot().revision)
        registrar.register(instance())
        runner.wait_for_notifications(1)
        assert frozen.pid is not None
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            wait_for(
                lambda: any("watch stream from" in r.getMessage() for r in caplog.records),
                10,
                what="the watch to leave the frozen member",
            )
            assert time.monotonic() - began < 6
            registrar.register(instance("after", iid="second", port=40002))
            wait_for(lambda: frozenset({"after"}) in runner.services, 15, what="the change after")
            assert runner.error is None and runner.thread.is_alive()
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
    finally:
        registrar.close(deregister=True)
        reader.close()


def test_a_write_lost_with_the_leader_is_sent_again_within_the_election(
    etcd_cluster: EtcdCluster,
) -> None:
    """A follower forwards a write to the leader; when the leader dies, etcd answers that
    write only after its own request timeout (about 6 s). The client asks again, and the write
    lands soon after a new leader is elected (about 1 s here)."""
    leader = etcd_cluster.leader()
    if leader is None:
        wait_for(lambda: etcd_cluster.leader() is not None, 15, what="an etcd leader")
        leader = etcd_cluster.leader()
    assert leader is not None
    followers = [m.endpoint for i, m in enumerate(etcd_cluster.members) if i != leader]
    registrar = EtcdRegistry(config(*followers, ttl=10))
    try:
        registrar.register(instance())
        etcd_cluster.kill(leader)
        began = time.monotonic()
        registrar.register(instance(iid="second", port=40002))
        took = time.monotonic() - began
        assert took < 4.0, f"the write took {took:.1f} s"
        assert registrar.keepalive() is True
    finally:
        registrar.close(deregister=True)


def _between_pages(
    registry: EtcdRegistry, monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]
) -> list[int]:
    """Read snapshots in pages of two keys; ``action`` runs once, right after the first page
    of the first snapshot. Returns the revisions the pages were read at."""
    from discoverd.plugins.etcd import reader as reader_module

    monkeypatch.setattr(reader_module, "SNAPSHOT_PAGE", 2)
    gateway = registry.reader.gateway
    real = gateway.txn
    revisions: list[int] = []
    done = threading.Event()
    lock = threading.Lock()

    def paged(what: str, compare: Any, success: Any, failure: Any) -> Any:
        answer = real(what, compare, success, failure)
        request = success[0].get("request_range", {}) if success else {}
        if what == "snapshot page":
            revisions.append(int(request["revision"]))
            with lock:
                if not done.is_set():
                    action()
                    done.set()
        return answer

    monkeypatch.setattr(gateway, "txn", paged)
    return revisions


def test_a_snapshot_read_in_pages_is_at_one_revision(
    etcd: Etcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large registry is read in pages, each at the revision of the snapshot's first read.
    A registration that lands between two pages is not half seen (an instance without its
    metadata, or the metadata of an instance missing): the snapshot is the registry as it was,
    and the next one has the new instance whole."""
    registry = EtcdRegistry(config(etcd.endpoint))
    first = [instance(iid=f"i{n}", port=40000 + n, tags=(f"t{n}",)) for n in range(5)]
    late = instance(iid="i2b", port=40009, tags=("late",), host_id="host2")
    try:
        registry.register_many(first)
        revisions = _between_pages(registry, monkeypatch, lambda: registry.register(late))
        catalog = registry.snapshot()
        assert len(revisions) > 4 and len(set(revisions)) == 1  # many pages, one revision
        assert sorted(catalog.instances) == sorted(first)
        assert catalog.problems == ()
        assert catalog.revision == revisions[0]
        monkeypatch.undo()
        after = registry.snapshot()
        assert after.revision > catalog.revision
        assert {i.id: i for i in after.instances}["i2b"] == late
        assert after.problems == ()
    finally:
        registry.close(deregister=True)


def test_a_snapshot_whose_revision_is_compacted_between_pages_is_read_again(
    etcd: Etcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The revision a snapshot reads its pages at is compacted away after the first page:
    the next page is refused, and the whole snapshot is read again, at the new revision."""
    registry = EtcdRegistry(config(etcd.endpoint))
    first = [instance(iid=f"i{n}", port=40000 + n) for n in range(4)]
    late = instance(iid="i9", port=40009)

    def register_and_compact() -> None:
        registry.register(late)
        revision = int(raw_client(etcd).post("/kv/range", {"key": b64("/")})["header"]["revision"])
        etcdctl(etcd, "compaction", str(revision))

    try:
        registry.register_many(first)
        revisions = _between_pages(registry, monkeypatch, register_and_compact)
        catalog = registry.snapshot()
        assert len(set(revisions)) == 2  # read again at the newer revision
        assert sorted(catalog.instances) == sorted([*first, late])
        assert catalog.problems == ()
    finally:
        registry.close(deregister=True)


def test_attempts_are_short_again_once_a_member_is_seen_failing_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client's own schedule (no server): two writes time out at followers that forwarded
    them to a dead leader, then the dead leader refuses. The timeouts were the failover, not a
    slow cluster, so the next attempts are short again instead of doubling to a second."""
    from discoverd.plugins.etcd.gateway import WRITE_ATTEMPT, Gateway

    gateway = Gateway(config("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", timeout=10))
    outcomes = iter(
        [
            EndpointFailed("timed out", timed_out=True),
            EndpointFailed("timed out", timed_out=True),
            EndpointFailed("connection refused"),
            EndpointFailed("timed out", timed_out=True),
        ]
    )
    budgets: list[float] = []

    def attempt(connection: Any, fn: Any, timeout: float) -> str:
        budgets.append(timeout)
        outcome = next(outcomes, None)
        if outcome is not None:
            raise outcome
        return "written"

    monkeypatch.setattr(gateway, "_attempt", attempt)
    try:
        assert gateway.call("put", lambda c, t: "unused", write=True) == "written"
    finally:
        gateway.close()
    assert budgets[:3] == [WRITE_ATTEMPT, 2 * WRITE_ATTEMPT, 4 * WRITE_ATTEMPT]
    assert budgets[3:] == [WRITE_ATTEMPT, WRITE_ATTEMPT], budgets


def test_tls_with_client_certificates(
    etcd_tls: EtcdCluster, watchers: Callable[[EtcdRegistry, int], WatchRunner]
) -> None:
    member = etcd_tls.members[0]
    tls = member.tls
    assert tls is not None
    registry = EtcdRegistry(  # no scheme in the endpoint: TLS options mean https
        config(
            member.endpoint,
            ca_cert=str(tls.ca),
            cert=str(tls.client_cert),
            key=str(tls.client_key),
        )
    )
    try:
        assert registry.gateway.urls == (member.url,)
        registry.register(instance())
        catalog = registry.snapshot()
        assert [i.id for i in catalog.instances] == [instance().id]
        runner = watchers(registry, catalog.revision)
        registry.deregister(instance())
        runner.wait_for_notifications(1)
    finally:
        registry.close(deregister=True)
    # etcd 3.4's gateway refuses a password from a client whose certificate has a Common
    # Name: said plainly, with what to do (tests/test_deploy.py keeps the strict xfail).
    tls_ctl = [
        f"--cacert={tls.ca}",
        f"--cert={tls.client_cert}",
        f"--key={tls.client_key}",
    ]
    for args in (
        ["user", "add", "root", "--new-user-password=r", "--interactive=false"],
        ["auth", "enable"],
    ):
        result = subprocess.run(
            [require_binary("etcdctl"), f"--endpoints={member.url}", *tls_ctl, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    with_password = EtcdRegistry(
        config(
            member.endpoint,
            ca_cert=str(tls.ca),
            cert=str(tls.client_cert),
            key=str(tls.client_key),
            user="root",
            password="r",
        )
    )
    try:
        with pytest.raises(PluginError, match="Common Name") as caught:
            with_password.snapshot()
        assert not isinstance(caught.value, Unavailable)
    finally:
        with_password.close()
    # Without a client certificate etcd refuses the connection.
    anonymous = EtcdRegistry(config(member.endpoint, ca_cert=str(tls.ca)))
    try:
        with pytest.raises(Unavailable, match=member.endpoint):
            anonymous.snapshot()
    finally:
        anonymous.close()


# --------------------------------------------------------------------------------------------
# Reading only the services a watch named


def in_directories(subject: str, services: Collection[str]) -> bool:
    """Whether a problem's subject (a key) lies in the directory of one of ``services``."""
    return any(
        subject in (f"/backends/{s}", f"{META}/{s}")
        or subject.startswith((f"/backends/{s}/", f"{META}/{s}/"))
        for s in services
    )


def view(catalog: Catalog, services: Collection[str]) -> tuple[list[Any], list[Any]]:
    """What ``catalog`` holds of ``services``: their instances, and the problems of their keys."""
    return (
        sorted(i for i in catalog.instances if i.service in services),
        sorted((p for p in catalog.problems if in_directories(p.subject, services)), key=str),
    )


def apply_partial(previous: Catalog, partial: Catalog, services: Collection[str]) -> Catalog:
    """What a reader (the core) holds after replacing ``services`` with ``partial``."""
    kept = [i for i in previous.instances if i.service not in services]
    known = [p for p in previous.problems if not in_directories(p.subject, services)]
    return Catalog(
        tuple(sorted([*kept, *partial.instances])),
        tuple(sorted([*known, *partial.problems], key=str)),
        partial.revision,
    )


def test_read_services_after_each_change_equals_a_full_read(
    etcd: Etcd,
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    """The watch names every service a change touched; reading only those
    (``read_services``) and keeping the rest gives what a full read gives, after every kind
    of change. A change in no service directory names no services: read everything."""
    raw = raw_client(etcd)
    writer = registries(host_id="w")
    for n in range(5):
        writer.register(instance(f"svc{n}", f"w:c{n}:8000:tcp", port=30000 + n))
    reader = registries()
    held = reader.snapshot()
    runner = watchers(reader, held.revision)

    def change(what: str, action: Callable[[], object], expected: set[str] | None) -> None:
        nonlocal held
        count = len(runner.reasons)
        action()
        runner.wait_for_notifications(count + 1)
        time.sleep(0.05)  # the rest of the events of that change
        named = runner.services[count:]
        if expected is None:
            assert None in named, what
            held = reader.snapshot()
            return
        assert None not in named, what
        touched: set[str] = set().union(*(n for n in named if n is not None))
        assert touched == expected, what
        full = registries().snapshot()
        # etcd answers from what its watch delivered: once every message of the change is in
        # (one per watched range), it answers what a read gives.
        wait_for(
            lambda: view(reader.read_services(touched), touched) == view(full, touched),
            10,
            what=f"{what}: the watch's view",
        )
        partial = reader.read_services(touched)
        assert partial.revision > held.revision, what
        assert view(partial, touched) == view(full, touched), what
        assert {i.service for i in partial.instances} <= touched, what
        assert all(in_directories(p.subject, touched) for p in partial.problems), what
        held = apply_partial(held, partial, touched)
        assert (held.instances, held.problems) == (
            tuple(sorted(full.instances)),
            tuple(sorted(full.problems, key=str)),
        ), what

    def one_transaction(*keys: str) -> None:
        puts = [{"request_put": {"key": b64(key), "value": b64("10.0.0.9:9")}} for key in keys]
        raw.transaction({"compare": [], "success": puts, "failure": []})

    change(
        "a new instance",
        lambda: writer.register(instance("svc1", "w:c9:8000:tcp", port=3)),
        {"svc1"},
    )
    change(
        "a removed service",
        lambda: writer.deregister(instance("svc2", "w:c2:8000:tcp", port=30002)),
        {"svc2"},
    )
    change(
        "a malformed value",
        lambda: raw.put("/backends/svc3/w:c3:8000:tcp", "not an endpoint"),
        {"svc3"},
    )
    change(
        "malformed metadata", lambda: raw.put(f"{META}/svc4/w:c4:8000:tcp", "{not json"), {"svc4"}
    )
    change("a new frontend port", lambda: raw.put("/backends/svc1/port", "9999"), {"svc1"})
    change("a key outside any service", lambda: raw.put("/backends/stray-key", "x"), None)
    change("a nested key", lambda: raw.put("/backends/svc0/a/b", "10.0.0.1:1"), {"svc0"})
    change("an empty instance id", lambda: raw.put("/backends/svc4/", "10.0.0.1:1"), {"svc4"})
    change("a deleted port key", lambda: raw.delete("/backends/svc0/port"), {"svc0"})
    change(
        "an invalid service name",
        lambda: raw.put("/backends/Bad_Name/x", "1.2.3.4:5"),
        {"Bad_Name"},
    )
    change(
        "one transaction over two services",
        lambda: one_transaction("/backends/svc1/multi", "/backends/svc3/multi"),
        {"svc1", "svc3"},
    )
    assert {i.service for i in held.instances} >= {"svc0", "svc1"}


def test_read_services_reads_many_services_at_one_revision(
    registries: Callable[..., EtcdRegistry],
) -> None:
    """More services than one transaction may read (etcd: 128 operations): read in several
    transactions at one revision, and equal to a full read."""
    writer = registries(host_id="w")
    batch = [
        instance(f"many{n:03d}", f"w:c{n:03d}:8000:tcp", port=31000 + n, host_id="w")
        for n in range(130)
    ]
    writer.register_many(batch)
    reader = registries()  # a fresh registry: reading a subset needs no earlier read
    names = [i.service for i in batch]
    partial = reader.read_services([*names, "absent", "a/b", ""])
    full = reader.snapshot()
    assert partial.revision == full.revision  # nothing was written in between
    assert view(partial, names) == view(full, names)
    assert sorted(partial.instances) == sorted(batch)  # an absent service is simply absent
    some = reader.read_services(["many007", "many100"])
    assert [i.service for i in some.instances] == ["many007", "many100"]
    nothing = reader.read_services([])
    assert nothing.instances == () and nothing.revision == full.revision


def test_snapshot_reads_everything_again_without_a_live_watch(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    reader = registries()
    assert reader.snapshot().instances == ()
    raw_client(etcd).put("/backends/web/x", "10.0.0.1:80")
    raw_client(etcd).put("/backends/web/port", "80")
    # No watch ran: nothing marked the service, yet the snapshot must see it.
    [found] = reader.snapshot().instances
    assert found.service == "web" and found.endpoint == "10.0.0.1:80"


def test_snapshot_is_a_full_read_while_the_watch_runs(
    etcd: Etcd,
    registries: Callable[..., EtcdRegistry],
    watchers: Callable[[EtcdRegistry, int], WatchRunner],
) -> None:
    reader = registries()
    runner = watchers(reader, reader.snapshot().revision)
    raw = raw_client(etcd)
    raw.put("/backends/web/x", "10.0.0.1:80")
    raw.put("/backends/web/port", "80")
    # Read at once, whether or not the watch has seen the change yet: the snapshot has it.
    [found] = reader.snapshot().instances
    assert found.service == "web" and found.endpoint == "10.0.0.1:80"
    runner.wait_for_notifications(1)
    raw.delete("/backends/web/x")
    assert reader.snapshot().instances == ()


def test_register_many_writes_one_transaction_per_service(
    etcd: Etcd, registries: Callable[..., EtcdRegistry]
) -> None:
    writer = registries(host_id="w")
    reader = registries()
    before = reader.snapshot().revision
    batch = [
        instance(
            f"bulk{n % 3}",
            f"w:c{n:03d}:8000:tcp",
            port=31000 + n,
            frontend_port=8000 + n % 3,
            host_id="w",
        )
        for n in range(90)
    ]
    writer.register_many(batch)
    after = reader.snapshot()
    # Every write of a transaction shares one revision: 3 services of 30 -> 3 revisions.
    assert after.revision - before == 3
    assert sorted(after.instances) == sorted(batch)
    leases = {lease for _, lease in keys_under(etcd, "/backends/").values()}
    assert leases == {writer.lease_id}
    writer.register_many(batch)  # idempotent
    assert sorted(reader.snapshot().instances) == sorted(batch)
