"""The docker source plugin through the source contract, against a real Docker daemon."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from discoverd import HostInfo, PluginContext, ServiceInstance, Source, build_config
from discoverd.plugins.docker import make_source
from discoverd.plugins.docker.config import DockerConfig
from discoverd.testing.conformance import SourceContract, SourceFactory
from tests.support.services import WHOAMI_IMAGE, DockerDaemon

pytestmark = pytest.mark.services

#: A whoami that takes 4 s to exit after TERM (so the kit can look while it shuts down).
SLOW_EXIT = [
    "/bin/sh",
    "-c",
    'mkdir -p /www; echo "I am $(hostname)" > /www/index.html; '
    'trap "sleep 4; exit 0" TERM; httpd -f -p 8000 -h /www & while true; do sleep 1; done',
]


class DockerWorkloads:
    """Containers of the test's Docker daemon, published on 127.0.0.1."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.started: list[Any] = []

    def start(self) -> Any:
        container = self.client.containers.run(
            WHOAMI_IMAGE, SLOW_EXIT, detach=True, ports={"8000/tcp": ("127.0.0.1", None)}
        )
        self.started.append(container)
        return container

    def owns(self, workload: Any, instance: ServiceInstance) -> bool:
        return f":{workload.id[:12]}:" in instance.id

    def begin_stop(self, workload: Any) -> None:
        workload.kill(signal="SIGTERM")  # what `docker stop` sends first

    def running(self, workload: Any) -> bool:
        try:
            workload.reload()
        except docker.errors.NotFound:
            return False
        return bool(workload.status == "running")

    def remove(self, workload: Any) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            workload.remove(force=True)

    def close(self) -> None:
        for container in self.started:
            self.remove(container)


class TestDockerSource(SourceContract):
    @pytest.fixture
    def make_source(self, docker_daemon: DockerDaemon, tmp_path: Path) -> SourceFactory:
        def build() -> Source:
            config = build_config(DockerConfig, {"host": docker_daemon.host}, section="docker")
            host = HostInfo(ip="127.0.0.1", id="kit-docker")
            return make_source(PluginContext(config=config, host=host, state_dir=tmp_path))

        return build

    @pytest.fixture
    def workloads(self, docker_client: docker.DockerClient) -> Iterator[DockerWorkloads]:
        found = DockerWorkloads(docker_client)
        yield found
        found.close()
