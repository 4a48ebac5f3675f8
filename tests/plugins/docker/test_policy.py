"""The host's exposure policy, applied by the Docker source to real containers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import pytest

from discoverd import HostInfo, PluginContext, ServiceInstance, SourceSnapshot, build_config
from discoverd.core.config import CoreConfig
from discoverd.plugins.docker import make_source
from discoverd.plugins.docker.config import DockerConfig
from discoverd.plugins.docker.source import DockerSource
from tests.support.services import BUSYBOX_IMAGE, WHOAMI_IMAGE, DockerDaemon, run_whoami

if TYPE_CHECKING:
    from docker.models.containers import Container

pytestmark = [pytest.mark.services, pytest.mark.usefixtures("cleanup_containers")]

HOST_ID = "policyhost"
HOST_IP = "127.0.0.5"

SourceWith = Callable[..., DockerSource]


@pytest.fixture
def source_with(docker_daemon: DockerDaemon) -> Iterator[SourceWith]:
    """Sources of the shared daemon with core options set (``expose="labelled"``, ...)."""
    made: list[DockerSource] = []

    def build(**core: Any) -> DockerSource:
        ctx = PluginContext(
            config=build_config(DockerConfig, {"host": docker_daemon.host}, section="docker"),
            host=HostInfo(ip=HOST_IP, id=HOST_ID),
            state_dir=Path("."),
            core=build_config(CoreConfig, core),
        )
        source = make_source(ctx)
        assert isinstance(source, DockerSource)
        made.append(source)
        return source

    yield build
    for source in made:
        source.close()


def of(snapshot: SourceSnapshot, container: Container) -> list[ServiceInstance]:
    return sorted(i for i in snapshot.instances if f":{container.id[:12]}:" in i.id)


def problems_of(snapshot: SourceSnapshot, container: Container) -> list[str]:
    return [str(p) for p in snapshot.problems if container.id[:12] in p.subject]


def test_labelled_exposure_registers_only_containers_that_ask(
    source_with: SourceWith, docker_client: docker.DockerClient
) -> None:
    everything = source_with()
    labelled = source_with(expose="labelled")
    silent = run_whoami(docker_client)
    by_label = run_whoami(docker_client, labels={"SERVICE_NAME": "asked"})
    by_env = run_whoami(docker_client, environment={"SERVICE_8000_NAME": "asked-too"})
    tags_only = run_whoami(docker_client, labels={"SERVICE_TAGS": "a", "SERVICE_PORT": "8000"})

    snapshot = labelled.snapshot()
    assert of(snapshot, silent) == [] and problems_of(snapshot, silent) == []
    assert of(snapshot, tags_only) == [] and problems_of(snapshot, tags_only) == []
    assert [i.service for i in of(snapshot, by_label)] == ["asked"]
    assert [i.service for i in of(snapshot, by_env)] == ["asked-too"]
    snapshot = everything.snapshot()
    for container in (silent, by_label, by_env, tags_only):
        assert len(of(snapshot, container)) == 1


def test_frontend_ports_outside_the_host_range_are_refused(
    source_with: SourceWith, docker_client: docker.DockerClient
) -> None:
    source = source_with(frontend_ports="8000-8999")
    inside = run_whoami(docker_client, labels={"SERVICE_PORT": "8080"})
    outside = run_whoami(docker_client, labels={"SERVICE_PORT": "22"})
    default = run_whoami(docker_client)  # the private port, 8000: inside
    snapshot = source.snapshot()
    assert [i.frontend_port for i in of(snapshot, inside)] == [8080]
    assert [i.frontend_port for i in of(snapshot, default)] == [8000]
    assert of(snapshot, outside) == []
    [problem] = problems_of(snapshot, outside)
    assert "SERVICE_PORT refused" in problem and "frontend_ports (8000-8999)" in problem


def test_a_service_name_joined_only_by_its_images(
    source_with: SourceWith, docker_client: docker.DockerClient
) -> None:
    """Both test images are one image under two names: the rule is the reference the
    container was started from, as Docker records it (see docs/configuration.md for what
    that does and does not prove)."""
    repository = WHOAMI_IMAGE.rsplit(":", 1)[0]
    source = source_with(service_images=[f"web={repository}"])
    member = run_whoami(docker_client, labels={"SERVICE_NAME": "web"}, image=WHOAMI_IMAGE)
    intruder = run_whoami(docker_client, labels={"SERVICE_NAME": "web"}, image=BUSYBOX_IMAGE)
    elsewhere = run_whoami(docker_client, labels={"SERVICE_NAME": "api"}, image=BUSYBOX_IMAGE)
    snapshot = source.snapshot()
    assert [i.service for i in of(snapshot, member)] == ["web"]
    assert [i.service for i in of(snapshot, elsewhere)] == ["api"]  # not listed: open
    assert of(snapshot, intruder) == []
    [problem] = problems_of(snapshot, intruder)
    assert "service web" in problem and "service_images" in problem
    assert f"docker.io/{BUSYBOX_IMAGE.rsplit(':', 1)[0]}" in problem
