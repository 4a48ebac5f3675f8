"""The etcd registry plugin through the registry contract, against a real etcd (one per test)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from discoverd import HostInfo, PluginContext, Registry, build_config
from discoverd.plugins.etcd import make_registry
from discoverd.plugins.etcd.config import EtcdConfig
from discoverd.testing.conformance import BadEntryWriter, RegistryContract, RegistryFactory
from tests.plugins.etcd.raw import RawEtcd
from tests.support.services import Etcd


class EtcdServer:
    """The kit's view of one etcd member: kill it, start it again, or start it empty."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    def stop(self) -> None:
        self.etcd.kill()

    def start(self) -> None:
        self.etcd.start()

    def restart(self) -> None:
        self.etcd.kill()
        shutil.rmtree(self.etcd.data_dir, ignore_errors=True)  # a new member: every key is gone
        self.etcd.start()


class TestEtcdRegistry(RegistryContract):
    short_ttl = 2

    @pytest.fixture
    def registry_server(self, etcd: Etcd) -> EtcdServer:
        return EtcdServer(etcd)

    @pytest.fixture
    def make_registry(self, registry_server: EtcdServer, tmp_path: Path) -> RegistryFactory:
        endpoint = registry_server.etcd.endpoint

        def build(*, host: HostInfo, ttl: int) -> Registry:
            values = {"endpoints": [endpoint], "ttl": ttl, "timeout": 3.0}
            config = build_config(EtcdConfig, values, section="etcd")
            return make_registry(PluginContext(config=config, host=host, state_dir=tmp_path))

        return build

    @pytest.fixture
    def write_bad_entry(self, registry_server: EtcdServer) -> Iterator[BadEntryWriter]:
        client = RawEtcd(registry_server.etcd.url)

        def write(service: str) -> None:
            # What a hand-written entry or another tool could leave in the seed's layout.
            client.put(f"/backends/{service}/port", "8000")
            client.put(f"/backends/{service}/bad1", "not-an-endpoint")
            client.put(f"/backends/{service}/bad2", "example.org:80")
            client.put(f"/discoverd/instances/{service}/bad1", "{broken json")

        yield write
        client.close()
