"""Local instances without the detour (core/local.py): the container address's rules, who may
set it, and the discover side's choice between it and the published port.

The reachability checks here dial listeners on 127.0.0.1, which the real rule refuses as a
container address (loopback is the discover host's own services): these tests put a permissive
parser in its place. tests/e2e/test_local_direct.py runs the real thing against containers.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from discoverd import (
    CONTAINER_ADDRESS_KEY,
    Catalog,
    ValidationError,
    check_container_address,
    with_container_address,
)
from discoverd.core import local as local_module
from discoverd.core.config import load_settings
from discoverd.core.discover import DiscoverRole
from discoverd.core.errors import ConfigError
from discoverd.core.local import LocalAddresses
from discoverd.core.metadata import (
    ContainerSpec,
    ExposurePolicy,
    PortBinding,
    check_meta_key_names,
    instances_for,
)
from discoverd.core.model import ServiceInstance, parse_endpoint
from tests.core.test_agent import FakeProxy, FakeRegistry

OWN = "hosta"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("172.17.0.5:8000", ("172.17.0.5", 8000)),
        ("10.1.2.3:80", ("10.1.2.3", 80)),
        ("[fd00::5]:8000", ("fd00::5", 8000)),
    ],
)
def test_a_container_address_is_ip_and_port(value: str, expected: tuple[str, int]) -> None:
    assert check_container_address(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "127.0.0.1:22",  # the discover host's own services
        "127.3.4.5:80",
        "[::1]:80",
        "[::ffff:127.0.0.1]:80",
        "0.0.0.0:80",  # unspecified
        "[::]:80",
        "169.254.169.254:80",  # link-local: the cloud metadata service
        "[fe80::1]:80",
        "224.0.0.1:80",  # multicast
        "255.255.255.255:80",  # broadcast
        "localhost:80",  # names are never resolved
        "172.17.0.5",  # no port
        "172.17.0.5:0",
        "172.17.0.5:70000",
        " 172.17.0.5:8000",  # canonical form only
        "172.17.0.05:8000",
        "172.17.0.5:08000",
        "fd00::5:8000",  # IPv6 without brackets
        "[fe80::1%eth0]:80",  # scope ids
        "1" * 80,
    ],
)
def test_hostile_container_addresses_are_refused(value: str) -> None:
    with pytest.raises(ValidationError):
        check_container_address(value)


def instance(
    n: int = 1, *, host: str = OWN, value: str | None = "172.17.0.5:8000", service: str = "web"
) -> ServiceInstance:
    meta = () if value is None else ((CONTAINER_ADDRESS_KEY, value),)
    return ServiceInstance(
        service, f"{host}:c{n}:8000:tcp", "10.0.0.1", 32000 + n, "tcp", 8000, meta=meta,
        host_id=host,
    )  # fmt: skip


def test_the_source_sets_it_and_labels_never_do() -> None:
    plain = instance(value=None)
    moved = with_container_address(plain, "172.17.0.5", 8000)
    assert moved.meta_dict == {CONTAINER_ADDRESS_KEY: "172.17.0.5:8000"}
    assert (moved.address, moved.port) == (plain.address, plain.port)  # published stays
    with pytest.raises(ValidationError):
        with_container_address(plain, "127.0.0.1", 8000)

    # Not a key the operator may publish from labels...
    with pytest.raises(ValueError, match="internal"):
        check_meta_key_names(["container_address"])
    with pytest.raises(ConfigError, match="meta_keys"):
        load_settings({}, env={"DISCOVERD_META_KEYS": '["container_address"]'})
    # ...and not published even by a policy built around that check.
    spec = ContainerSpec(
        id="c" * 64,
        name="web",
        image="web:1",
        labels={"SERVICE_CONTAINER_ADDRESS": "10.9.9.9:22"},
        env={"SERVICE_8000_CONTAINER_ADDRESS": "10.9.9.9:22"},
        ports=(PortBinding(8000, "tcp", "10.0.0.1", 32001),),
    )
    policy = ExposurePolicy(meta_keys=frozenset({"container_address"}))
    [found], problems = instances_for(spec, host_ip="10.0.0.1", host_id=OWN, policy=policy)
    assert problems == [] and CONTAINER_ADDRESS_KEY not in found.meta_dict


@pytest.fixture
def loopback_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accept 127.0.0.1 as a container address, so the checks can dial test listeners."""
    monkeypatch.setattr(local_module, "check_container_address", parse_endpoint)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield server


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port  # closed again: nothing listens there


def endpoints(catalog: Catalog) -> dict[str, str]:
    return {i.id: i.endpoint for i in catalog.instances}


@pytest.mark.usefixtures("loopback_allowed")
def test_own_reachable_instances_move_others_keep_their_published_port(
    listener: socket.socket,
) -> None:
    port = listener.getsockname()[1]
    schedule: list[tuple[float, str]] = []
    local = LocalAddresses(OWN, schedule=lambda d, r: schedule.append((d, r)))
    refused = closed_port()
    mine = instance(1, value=f"127.0.0.1:{port}")
    unreachable = instance(2, value=f"127.0.0.1:{refused}")
    theirs = instance(3, host="hostb", value=f"127.0.0.1:{port}")
    plain = instance(4, value=None)
    catalog = Catalog((mine, unreachable, theirs, plain))
    served = local.apply(catalog)
    assert endpoints(served) == {
        mine.id: f"127.0.0.1:{port}",
        unreachable.id: unreachable.endpoint,
        theirs.id: theirs.endpoint,
        plain.id: plain.endpoint,
    }
    assert local.verdicts() == {("127.0.0.1", port): True, ("127.0.0.1", refused): False}
    assert schedule and 1.0 <= schedule[-1][0] <= 2.0  # the failed one is tried again in 2 s
    [moved] = [i for i in served.instances if i.id == mine.id]
    assert moved.meta_dict == mine.meta_dict and moved.host_id == OWN

    # Checked once: a second pass dials nothing, and gives the very same object.
    listener.close()
    again = local.apply(catalog)
    assert next(i for i in again.instances if i.id == mine.id) is moved

    # Verified again once RECHECK_OK has passed: gone, so back at the published port.
    local._verdicts[("127.0.0.1", port)].next_check = 0.0
    assert endpoints(local.apply(catalog))[mine.id] == mine.endpoint
    # Gone from the registry: forgotten.
    local.apply(Catalog((plain,)))
    assert local.verdicts() == {}
    local.close()


@pytest.mark.usefixtures("loopback_allowed")
def test_an_address_that_fails_is_retried_and_moves_when_it_answers() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    local = LocalAddresses(OWN)
    mine = instance(1, value=f"127.0.0.1:{port}")
    catalog = Catalog((mine,))
    try:
        assert endpoints(local.apply(catalog))[mine.id] == mine.endpoint  # refused: published
        server.listen(8)
        assert endpoints(local.apply(catalog))[mine.id] == mine.endpoint  # not due yet
        for verdict in local._verdicts.values():
            verdict.next_check = 0.0  # the retry is due
        assert endpoints(local.apply(catalog))[mine.id] == f"127.0.0.1:{port}"
    finally:
        server.close()
        local.close()


def test_a_hostile_value_is_a_problem_and_the_published_port_is_kept() -> None:
    local = LocalAddresses(OWN)
    hostile = instance(1, value="127.0.0.1:22")
    served = local.apply(Catalog((hostile,)))
    assert endpoints(served) == {hostile.id: hostile.endpoint}
    [problem] = served.problems
    assert problem.service == "web" and "container_address refused" in problem.message
    assert "loopback" in problem.message
    assert local.verdicts() == {}  # nothing was dialled


def test_without_a_host_id_nothing_moves() -> None:
    unnamed = ServiceInstance("web", "x:c1:8000:tcp", "10.0.0.1", 32001, meta=(
        (CONTAINER_ADDRESS_KEY, "172.17.0.5:8000"),
    ))  # fmt: skip
    catalog = Catalog((unnamed,))
    assert LocalAddresses("").apply(catalog) is catalog  # no host id: no instance is ours


@pytest.mark.usefixtures("loopback_allowed")
@pytest.mark.parametrize("direct", [True, False])
def test_the_discover_role_serves_them_unless_told_not_to(
    listener: socket.socket, direct: bool
) -> None:
    port = listener.getsockname()[1]
    registry, proxy = FakeRegistry(), FakeProxy()
    mine, theirs = instance(1, value=f"127.0.0.1:{port}"), instance(2, host="hostb")
    registry.entries = {i.id: i for i in (mine, theirs)}
    role = DiscoverRole(
        registry, proxy, min_wait=0.0, max_wait=0.01, own_host_id=OWN, local_direct=direct
    )
    assert role.reconcile() == "applied"
    expected = f"127.0.0.1:{port}" if direct else mine.endpoint
    assert proxy.applied[-1] == f"web:8000={expected},{theirs.endpoint}\n"
    role.shutdown()


def test_both_registries_store_it_and_readers_without_the_feature_ignore_it() -> None:
    from discoverd.core.assignment import build_services
    from discoverd.plugins.consul import encoding as consul
    from discoverd.plugins.etcd import keys as etcd

    mine = instance(1)
    # etcd: in the instance's JSON metadata, outside the seed's /backends key.
    scheme = etcd.KeyScheme()
    [read] = etcd.read_catalog(
        scheme,
        [(scheme.backend_key("web", mine.id).encode(), mine.endpoint.encode())],
        [(scheme.meta_key("web", mine.id).encode(), etcd.encode_metadata(mine).encode())],
        revision=1,
    ).instances
    assert read == mine
    # Consul: one plain service meta key.
    body = consul.registration(mine, host_id=OWN, ttl=10, deregister_after=0)
    assert body["Meta"][CONTAINER_ADDRESS_KEY] == "172.17.0.5:8000"
    assert (body["Address"], body["Port"]) == (mine.address, mine.port)
    entry = consul.Entry(
        node="n1", node_address="10.0.0.1", id=body["ID"], name="web", tags=[],
        address=body["Address"], port=body["Port"], meta=body["Meta"],
    )  # fmt: skip
    [back] = consul.read_catalog([entry], consul.Health(), revision=1).instances
    assert back == mine
    # A reader without the feature (or local_direct off) builds services from the published
    # address; the key is one more metadata pair, which no shipped template renders.
    [service] = build_services(Catalog((mine,))).services
    assert [i.endpoint for i in service.instances] == ["10.0.0.1:32001"]


class _Proxy:
    """Only what ``local_direct`` asks of a proxy."""

    def __init__(self, prefers: bool) -> None:
        self.prefers = prefers

    def prefers_container_addresses(self) -> bool:
        return self.prefers


@pytest.mark.parametrize(
    ("setting", "prefers", "expected"),
    [
        ("auto", True, True),
        ("auto", False, False),
        ("true", False, True),
        ("false", True, False),
    ],
)
def test_local_direct_follows_the_option_and_with_auto_the_proxy(
    setting: str, prefers: bool, expected: bool
) -> None:
    from discoverd.core.agent import local_direct

    assert local_direct(setting, _Proxy(prefers)) is expected  # type: ignore[arg-type]
