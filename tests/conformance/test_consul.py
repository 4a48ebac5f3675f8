"""The Consul registry plugin through the registry contract, against a real ``consul agent -dev``
(one per test)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from discoverd import HostInfo, PluginContext, Registry, build_config
from discoverd.plugins.consul import make_registry
from discoverd.plugins.consul.config import ConsulConfig
from discoverd.testing.conformance import BadEntryWriter, RegistryContract, RegistryFactory
from tests.conftest import service_unavailable
from tests.support.consul import Consul
from tests.support.services import ServiceUnavailable, require_binary


class ConsulServer:
    """The kit's view of one agent: kill it, start it again (it reloads the services it kept in
    its data directory), or start it empty."""

    def __init__(self, agent: Consul) -> None:
        self.agent = agent

    def stop(self) -> None:
        self.agent.kill()

    def start(self) -> None:
        self.agent.start()

    def restart(self) -> None:
        self.agent.restart(forget=True)  # a -dev agent with a wiped data directory: empty


@pytest.fixture
def consul_agent(tmp_path: Path) -> Iterator[Consul]:
    try:
        require_binary("consul")
    except ServiceUnavailable as exc:
        service_unavailable(str(exc))
    agent = Consul(tmp_path / "consul")
    try:
        agent.start()
    except ServiceUnavailable as exc:
        agent.stop()
        service_unavailable(str(exc))
    yield agent
    agent.stop()


class TestConsulRegistry(RegistryContract):
    short_ttl = 2

    @pytest.fixture
    def registry_server(self, consul_agent: Consul) -> ConsulServer:
        return ConsulServer(consul_agent)

    @pytest.fixture
    def make_registry(self, registry_server: ConsulServer, tmp_path: Path) -> RegistryFactory:
        address = registry_server.agent.address

        def build(*, host: HostInfo, ttl: int) -> Registry:
            values = {"address": address, "ttl": ttl, "timeout": 3.0}
            config = build_config(ConsulConfig, values, section="consul")
            return make_registry(PluginContext(config=config, host=host, state_dir=tmp_path))

        return build

    @pytest.fixture
    def write_bad_entry(self, registry_server: ConsulServer) -> BadEntryWriter:
        agent = registry_server.agent
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def put(body: dict[str, object]) -> None:
            request = urllib.request.Request(
                f"{agent.url}/v1/agent/service/register",
                data=json.dumps(body).encode(),
                method="PUT",
            )
            with opener.open(request, timeout=5) as response:
                assert response.status == 200

        def write(service: str) -> None:
            # What another tool or an operator with curl could register by hand.
            front = {"discoverd_frontend_port": "8000"}
            put({"ID": f"{service}-bad1", "Name": service, "Address": "example.org",
                 "Port": 80, "Meta": front})  # fmt: skip
            put({"ID": f"{service}-bad2", "Name": service, "Address": "127.0.0.1",
                 "Port": 99999, "Meta": front})  # fmt: skip
            put({"ID": f"{service}-bad3", "Name": service, "Address": "127.0.0.1",
                 "Port": 80, "Meta": {"discoverd_frontend_port": "http"}})  # fmt: skip

        return write
