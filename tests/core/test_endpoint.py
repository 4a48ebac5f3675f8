"""The agent's HTTP endpoint: health answers and Prometheus metrics, from roles driven by
in-memory fakes (the endpoint against the real stack is in tests/e2e)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from discoverd.core.discover import DiscoverRole
from discoverd.core.endpoint import Endpoint
from discoverd.core.register import RegisterRole
from discoverd.core.role import Role
from tests.core.test_agent import FakeRegistry, FakeSource, eventually, inst
from tests.core.test_discover import PickyProxy
from tests.support.services import free_port


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(port, "/metrics")
    assert status == 200
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class Stack:
    def __init__(self) -> None:
        self.source, self.registry, self.proxy = FakeSource(), FakeRegistry(), PickyProxy()
        self.register = RegisterRole(
            self.source, self.registry, min_wait=0.0, max_wait=0.01, retry_max=0.05
        )
        self.discover = DiscoverRole(
            self.registry, self.proxy, min_wait=0.0, max_wait=0.01, retry_max=0.05
        )
        self.endpoint = Endpoint(self.roles, "127.0.0.1", free_port())

    def roles(self) -> list[Role]:
        return [self.register, self.discover]


@pytest.fixture
def stack() -> Iterator[Stack]:
    found = Stack()
    found.source.instances = [inst(1), inst(2)]
    found.endpoint.start()
    found.register.start()
    found.discover.start()
    yield found
    found.register.stop()
    found.discover.stop()
    found.endpoint.close()


def test_live_and_ready_once_both_roles_did_their_work(stack: Stack) -> None:
    port = stack.endpoint.port
    eventually(lambda: get(port, "/healthz/ready")[0] == 200)
    document = json.loads(get(port, "/healthz/ready")[1])
    assert document["status"] == "ready" and document["live"] is True
    assert document["roles"]["register"]["registered"] == 2
    assert document["roles"]["discover"]["instances"] == 2
    assert get(port, "/healthz/live")[0] == 200
    assert get(port, "/nothing")[0] == 404


def test_a_problem_of_one_service_is_degraded_not_unready(stack: Stack) -> None:
    port = stack.endpoint.port
    eventually(lambda: get(port, "/healthz/ready")[0] == 200)
    stack.proxy.blocked = {"whoami": "frontend port 8000 is held by another process"}
    stack.discover.waker.notify("test")
    eventually(lambda: json.loads(get(port, "/healthz/ready")[1])["status"] == "degraded")
    status, body = get(port, "/healthz/ready")
    assert status == 200
    [problem] = json.loads(body)["problems"]
    assert problem["kind"] == "service" and "held by another process" in problem["message"]


def test_an_unreachable_registry_makes_the_agent_unready(stack: Stack) -> None:
    port = stack.endpoint.port
    eventually(lambda: get(port, "/healthz/ready")[0] == 200)
    stack.registry.down = True
    stack.register.registry_contact.last_ok = 0.0  # long ago: past three keepalive periods
    eventually(lambda: get(port, "/healthz/ready")[0] == 503)
    reasons = json.loads(get(port, "/healthz/ready")[1])["reasons"]
    assert any("registry" in reason and "registry down" in reason for reason in reasons)
    assert get(port, "/healthz/live")[0] == 200  # alive all the same: nothing to restart


def test_every_family_moves_when_its_event_happens(stack: Stack) -> None:
    port = stack.endpoint.port
    eventually(lambda: get(port, "/healthz/ready")[0] == 200)
    before = metrics(port)
    assert before[("discoverd_instances", (("service", "whoami"),))] == 2
    assert before[("discoverd_registrations_total", ())] == 2
    assert before[("discoverd_passes_total", (("outcome", "reloaded"),))] >= 1
    assert before[("discoverd_apply_duration_seconds_count", ())] >= 1
    assert before[("discoverd_readiness_checks_total", (("result", "ok"),))] == 0  # no checks
    stack.source.instances = [inst(1)]
    assert stack.source.notify is not None
    stack.source.notify("docker die")
    eventually(lambda: len(stack.registry.entries) == 1)
    stack.discover.waker.notify("registry watch")  # the fake registry's watch is silent
    eventually(lambda: metrics(port)[("discoverd_instances", (("service", "whoami"),))] == 1)
    after = metrics(port)
    assert after[("discoverd_deregistrations_total", ())] == 1
    assert after[("discoverd_watch_events_total", (("role", "register"),))] >= 1
    assert (
        after[("discoverd_apply_duration_seconds_count", ())]
        > before[("discoverd_apply_duration_seconds_count", ())]
    )
    stack.proxy.blocked = {"whoami": "port held"}
    stack.discover.waker.notify("test")
    eventually(lambda: metrics(port)[("discoverd_services_left_out", ())] == 1)
    assert metrics(port)[("discoverd_problems", (("kind", "service"),))] == 1


def test_the_endpoint_is_not_imported_unless_it_is_on() -> None:
    import subprocess
    import sys

    code = (
        "import sys, discoverd.cli, discoverd.core.agent; "
        "print('prometheus_client' in sys.modules, 'http.server' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
