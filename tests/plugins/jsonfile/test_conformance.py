"""The example plugin, installed with pip and loaded through its entry point, passes the proxy
contract of discoverd's conformance kit (:mod:`discoverd.testing.conformance`).

The json-file proxy carries no traffic, so the kit's traffic checks are off; its probe counts the
times the file was replaced, read from the file itself (a new inode or a new change time).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from discoverd import HostInfo, PluginContext, Proxy, build_config
from discoverd.core.manager import PluginManager
from discoverd.testing.conformance import ProxyContract, ProxyFactory


class FileProbe:
    """Reads the written file: ``reload_count()`` is how many times it was replaced since the
    probe first saw it (raises while there is no file: no "proxy" runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self.last: tuple[int, int] | None = None

    def reload_count(self) -> int:
        info = self.path.stat()
        identity = (info.st_ino, info.st_ctime_ns)  # a rename gives a new inode and change time
        if self.last is not None and identity != self.last:
            self.count += 1
        self.last = identity
        return self.count

    def running_config(self) -> str:
        return self.path.read_text(encoding="utf-8")


class TestJsonFileProxy(ProxyContract):
    serves_traffic = False

    @pytest.fixture
    def state_dir(self, tmp_path: Path) -> Path:
        return tmp_path / "state"

    @pytest.fixture
    def make_proxy(self, jsonfile_manager: PluginManager, state_dir: Path) -> ProxyFactory:
        record = jsonfile_manager.proxy("json-file")  # found through the entry point
        context = PluginContext(
            config=build_config(record.config, {}, section="json-file"),
            host=HostInfo(ip="127.0.0.1", id="kit-host"),
            state_dir=state_dir,
        )

        def factory() -> Proxy:
            return record.factory(context)

        return factory

    @pytest.fixture
    def proxy_probe(self, state_dir: Path) -> FileProbe:
        return FileProbe(state_dir / "services.json")
