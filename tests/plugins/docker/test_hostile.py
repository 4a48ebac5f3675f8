"""One odd container never stops the host's snapshot, and its values never reach the log.

The fuzz tests feed ``DockerSource._build`` what a hostile or broken daemon could answer (no
daemon needed); the last test runs 1 hostile container among 50 on a real daemon, through the
register role, and reads every log record.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import requests

from discoverd import (
    Catalog,
    HostInfo,
    Notify,
    PluginContext,
    Registry,
    ServiceInstance,
    Unavailable,
    build_config,
)
from discoverd.core.register import RegisterRole
from discoverd.plugins.docker import make_source
from discoverd.plugins.docker.config import DockerConfig
from discoverd.plugins.docker.source import DockerSource
from tests.support.services import DockerDaemon, run_whoami

HOST_ID = "fuzzhost"
HOST_IP = "10.0.0.9"
SECRET = "s3cr3t"


def fuzz_source(host: str = "unix:///nonexistent.sock") -> DockerSource:
    ctx = PluginContext(
        config=build_config(DockerConfig, {"host": host}, section="docker"),
        host=HostInfo(ip=HOST_IP, id=HOST_ID),
        state_dir=Path("."),
    )
    source = make_source(ctx)
    assert isinstance(source, DockerSource)
    return source


class StubClient:
    """The two calls a snapshot makes, answering from a table (an exception is raised)."""

    def __init__(self, inspections: Mapping[str, Any]) -> None:
        self.inspections = inspections
        self.lock = threading.Lock()
        self.calls = 0

    def inspect_container(self, cid: str) -> Any:
        with self.lock:
            self.calls += 1
        answer = self.inspections.get(cid, {"Config": {"Image": "local/whoami:1"}})
        if isinstance(answer, BaseException):
            raise answer
        return answer


def good_id(n: int) -> str:
    return f"{n:04d}" + "a" * 60


def good_entry(n: int) -> dict[str, Any]:
    return {
        "Id": good_id(n),
        "Names": [f"/good-{n}"],
        "State": "running",
        "Status": "Up 1 second",
        "Labels": {"SERVICE_NAME": "good"},
        "Ports": [{"PrivatePort": 8000, "PublicPort": 30000 + n, "Type": "tcp", "IP": ""}],
    }


def hostile_id(n: int) -> str:
    return f"{n:04d}" + "b" * 60


# What a hostile or broken daemon could put in the container list, one entry per case.
HOSTILE_ENTRIES: list[Any] = [
    None,
    "container",
    42,
    ["Id", "x"],
    {"Id": None},
    {"Id": 5},
    {"Id": ""},
    {"Id": ["list"]},
    {"Id": hostile_id(1), "Ports": "8000/tcp"},
    {
        "Id": hostile_id(2),
        "Ports": [{"PrivatePort": "\u00b2", "PublicPort": "\u00b3", "Type": "tcp"}],
    },
    {
        "Id": hostile_id(3),
        "Ports": [{"PrivatePort": 8000, "PublicPort": "9" * 400, "Type": "tcp", "IP": ["x"]}],
    },
    {"Id": hostile_id(4), "Ports": [{"PrivatePort": 2**80, "PublicPort": -1, "Type": None}]},
    {"Id": hostile_id(5), "Ports": [None, 3, {"PrivatePort": 8000}], "Labels": ["SERVICE_NAME"]},
    {
        "Id": hostile_id(6),
        "Labels": {"SERVICE_NAME": None, 5: "x", "SERVICE_PORT": ["a"], "SERVICE_TAGS": {}},
        "Ports": [{"PrivatePort": 8000, "PublicPort": 31000, "Type": "tcp"}],
    },
    {
        "Id": hostile_id(7),
        "Names": "not-a-list",
        "State": 5,
        "Status": ["x"],
        "Health": {"Status": ["unhashable"]},
        "Ports": [{"PrivatePort": 8000, "PublicPort": 31001, "Type": "tcp"}],
    },
    {
        "Id": hostile_id(8) + "\nWARNING forged",
        "Ports": [{"PrivatePort": 8000, "PublicPort": 31002, "Type": "tcp"}],
    },
    {
        "Id": hostile_id(9),
        "Names": [None, 7, "/evil\nWARNING forged"],
        "Labels": {
            "SERVICE_NAME": f"{SECRET}\n2024-01-01 WARNING discoverd: forged",
            "SERVICE_DB_PASSWORD": f"{SECRET}-password",
        },
        "Ports": [{"PrivatePort": 8000, "PublicPort": 31003, "Type": "tcp"}],
    },
    {
        "Id": hostile_id(10),
        "Labels": {"SERVICE_PORT": f"{SECRET}", "SERVICE_API_KEY": f"{SECRET}-key"},
        "Ports": [{"PrivatePort": 8000, "PublicPort": 31004, "Type": "tcp"}],
    },
    {"Id": hostile_id(11), "Ports": [{"PrivatePort": 8000, "PublicPort": 31005, "Type": "tcp"}]},
    {"Id": hostile_id(12), "Ports": [{"PrivatePort": 8000, "PublicPort": 31006, "Type": "tcp"}]},
    {"Id": hostile_id(13), "Ports": [{"PrivatePort": 8000, "PublicPort": 31007, "Type": "tcp"}]},
    {"Id": hostile_id(14), "Ports": [{"PrivatePort": 8000, "PublicPort": 31008, "Type": "tcp"}]},
    {"Id": hostile_id(15), "Ports": [{"PrivatePort": 8000, "PublicPort": 31009, "Type": "tcp"}]},
    {"Id": hostile_id(16), "Ports": [{"PrivatePort": 8000, "PublicPort": 31010, "Type": "tcp"}]},
]

# What it could answer to their inspects.
HOSTILE_INSPECTIONS: dict[str, Any] = {
    hostile_id(1): None,
    hostile_id(2): "inspect",
    hostile_id(3): {"Config": None, "State": None, "NetworkSettings": "x"},
    hostile_id(4): {"Config": {"Env": "SERVICE_NAME=x", "Image": 5, "StopSignal": "\u00b2"}},
    hostile_id(5): {"State": {"Pid": 2**70}, "Config": {"StopSignal": "SIGRTMIN+" + "9" * 50}},
    hostile_id(6): {"State": {"Pid": "12"}, "Config": {"Env": ["SERVICE_NAME=ok", 5, None]}},
    hostile_id(7): {"NetworkSettings": {"Networks": {1: {}, "a": {"IPAddress": 5}, None: 3}}},
    hostile_id(11): docker.errors.APIError("500 Server Error", explanation="boom"),
    hostile_id(12): docker.errors.NotFound("gone"),
    hostile_id(13): KeyError("the SDK tripped"),
    hostile_id(14): {"Config": {"StopSignal": ["SIGTERM"], "Env": [f"SERVICE_NAME={SECRET}\n"]}},
    hostile_id(15): {"State": {"Pid": True}, "Config": {"StopSignal": 10**30}},
    hostile_id(16): {"NetworkSettings": {"IPAddress": ["10.0.0.1"], "Networks": ["bridge"]}},
}


def check_snapshot_of(
    source: DockerSource, listed: list[Any], good: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    client = StubClient(HOSTILE_INSPECTIONS)
    with caplog.at_level(logging.DEBUG, logger="discoverd"):
        snapshot = source._build(client, listed)
    found = {i.id.split(":")[1] for i in snapshot.instances}
    assert {good_id(n)[:12] for n in good} <= found
    assert all("\n" not in str(p) for p in snapshot.problems)
    assert SECRET not in "".join(str(p) for p in snapshot.problems)
    assert [r for r in caplog.records if SECRET in r.getMessage()] == []


def test_hostile_entries_inspected_in_parallel_never_stop_the_snapshot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """50 entries, half of them hostile: the new ones are inspected by the pool."""
    source = fuzz_source()
    listed: list[Any] = []
    for n, hostile in enumerate(HOSTILE_ENTRIES):
        listed += [good_entry(n), hostile]
    listed += [good_entry(n) for n in range(len(HOSTILE_ENTRIES), 25)]
    check_snapshot_of(source, listed, list(range(25)), caplog)
    # an inspect the daemon refused, or that could not be read, is not cached
    assert hostile_id(11) not in source.inspected()
    assert hostile_id(13) not in source.inspected()
    assert good_id(0) in source.inspected()


@pytest.mark.parametrize("hostile", HOSTILE_ENTRIES)
def test_each_hostile_entry_inspected_alone_never_stops_the_snapshot(
    hostile: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Fewer than 4 new containers: inspected one by one, in the snapshot's own loop."""
    source = fuzz_source()
    check_snapshot_of(source, [good_entry(0), hostile, good_entry(1)], [0, 1], caplog)


def test_a_daemon_that_cannot_be_reached_still_fails_the_whole_snapshot() -> None:
    """Only a container's own oddities are isolated; a daemon that stops answering keeps
    the registry as it is (Unavailable), instead of emptying this host."""
    source = fuzz_source()
    listed = [good_entry(n) for n in range(6)]
    client = StubClient({good_id(3): requests.exceptions.ConnectionError("refused")})
    with pytest.raises(requests.exceptions.ConnectionError):
        source._build(client, listed)


@pytest.mark.parametrize(
    "event",
    [
        None,
        [],
        {"Type": "container", "Action": ["kill"]},
        {"Action": "kill", "id": ["x"]},
        {"Action": "kill", "id": "c1", "Actor": None},
        {"Action": "kill", "Actor": {"ID": "c1", "Attributes": {"signal": "\u00b2"}}},
        {"Action": "kill", "Actor": {"ID": "c1", "Attributes": {"signal": "SIGRTMIN+" + "9" * 99}}},
        {"Action": "kill", "Actor": {"ID": "c1", "Attributes": {"signal": ["15"]}}},
        {"Action": "kill", "Actor": {"ID": "c1", "Attributes": ["signal"]}},
        {"Action": "die\nWARNING forged", "id": "c1"},
        {"Action": "start", "Actor": {"ID": 5}},
        {"status": "destroy", "id": "c1\n"},
    ],
)
def test_hostile_events_are_taken_in_without_error(event: Any) -> None:
    source = fuzz_source()
    action = source.note_event(event)
    assert action is None or "\n" not in action
    source.stopping()


# --------------------------------------------------------------------------------------------
# 1 hostile container among 50, on a real daemon, through the register role


class MemoryRegistry(Registry):
    def __init__(self) -> None:
        self.entries: dict[str, ServiceInstance] = {}

    def register(self, instance: ServiceInstance) -> None:
        self.entries[instance.id] = instance

    def deregister(self, instance: ServiceInstance) -> None:
        self.entries.pop(instance.id, None)

    def keepalive(self) -> bool:
        return True

    def snapshot(self) -> Catalog:
        return Catalog(instances=tuple(self.entries.values()))

    def watch(self, notify: Notify, stop: threading.Event, since: int) -> None:
        stop.wait()


@pytest.fixture
def real_source(docker_daemon: DockerDaemon) -> Iterator[DockerSource]:
    source = fuzz_source(docker_daemon.host)
    yield source
    source.close()


@pytest.mark.services
@pytest.mark.usefixtures("cleanup_containers")
def test_one_hostile_container_among_fifty(
    real_source: DockerSource,
    docker_client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hostile_labels = {
        "SERVICE_NAME": f"{SECRET}-name\n2024-01-01 00:00:00,000 WARNING discoverd: forged",
        "SERVICE_DB_PASSWORD": f"{SECRET}-password",
        "SERVICE_API_KEY": f"{SECRET}-key",
        "SERVICE_X\nWARNING discoverd: forged": f"{SECRET}-in-a-key-with-a-newline",
    }

    def start(n: int) -> Any:
        if n == 17:
            return run_whoami(docker_client, name="hostile", labels=hostile_labels)
        return run_whoami(docker_client, labels={"SERVICE_NAME": "fleet"})

    with ThreadPoolExecutor(8) as pool:
        containers = list(pool.map(start, range(50)))
    hostile = containers[17]
    registry = MemoryRegistry()
    role = RegisterRole(real_source, registry, checks=None)
    with caplog.at_level(logging.DEBUG, logger="discoverd"):
        role.reconcile()
    mine = {c.id[:12] for c in containers}
    registered = [i for i in registry.entries.values() if i.id.split(":")[1] in mine]
    assert len(registered) == 49, f"{len(registered)} of 49 good containers registered"
    assert {i.service for i in registered} == {"fleet"}
    assert hostile.id[:12] not in {i.id.split(":")[1] for i in registered}
    leaked = [r.getMessage() for r in caplog.records if SECRET in r.getMessage()]
    assert leaked == [], f"{len(leaked)} log records show a label value: {leaked[:2]}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    [problem] = [w for w in warnings if hostile.id[:12] in w]  # one problem, logged once
    assert "container hostile" in problem and "SERVICE_NAME refused" in problem
    assert "\n" not in problem


def test_unavailable_is_still_what_a_dead_daemon_gives(tmp_path: Path) -> None:
    source = fuzz_source(f"unix://{tmp_path}/missing.sock")
    try:
        with pytest.raises(Unavailable):
            source.snapshot()
    finally:
        source.close()
