"""Zero by default (issue 10), end to end: containers without a single label, discoverd with
its defaults (``default_mode = "auto"``) as a process, real Docker, etcd and HAProxy. A service
whose backends answer in HTTP/1 is proxied in http mode (HAProxy replays idempotent requests a
dying backend drops), one that does not (a busybox ``nc`` echo) in tcp mode."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.support.discoverd import DiscoverdProcess, requests_through, stop_proxies, until
from tests.support.services import BUSYBOX_IMAGE, DockerDaemon, Etcd, free_port, run_whoami

pytestmark = [pytest.mark.services, pytest.mark.usefixtures("cleanup_containers")]


class Agent:
    """discoverd, both roles, every option at its default but the test's ports."""

    def __init__(self, root: Path, daemon: DockerDaemon, etcd: Etcd) -> None:
        self.state = root / "state"
        self.args = [
            "--host-ip", "127.0.0.1", "--host-id", "modes", "--state-dir", str(self.state),
            "--set", "haproxy.bind=127.0.0.1", "--set", f"haproxy.stats_port={free_port()}",
            "--set", "listen=",
        ]  # fmt: skip
        self.env = {
            "DOCKER_HOST": daemon.host,
            "ETCD_HOST": etcd.endpoint,
            "DISCOVERD_ETCD_PREFIX": "/modes",
            "DISCOVERD_ETCD_META_PREFIX": "/modes-meta",
        }
        self.process = DiscoverdProcess(root, self.args, self.env)

    def services(self) -> dict[str, dict[str, Any]]:
        """``discoverd services --json``, by service name."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("DISCOVERD_", "ETCD_"))}
        done = subprocess.run(
            [sys.executable, "-m", "discoverd", "services", "--json", *self.args],
            env={**base, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return {row["name"]: row for row in json.loads(done.stdout)}

    def backend_mode(self, service: str) -> str:
        """The mode of ``service``'s backend in the configuration HAProxy runs."""
        text = (self.state / "haproxy" / "haproxy.cfg").read_text()
        if f"\nbackend {service}\n" not in text:
            return ""  # not applied yet
        section = text.split(f"\nbackend {service}\n", 1)[1].split("\nbackend ", 1)[0]
        for line in section.splitlines():
            if line.strip().startswith("mode "):
                return line.split()[1]
        return ""


@pytest.fixture
def agent(tmp_path: Path, docker_daemon: DockerDaemon, etcd: Etcd) -> Iterator[Agent]:
    found = Agent(tmp_path / "modes", docker_daemon, etcd)
    found.process.start()
    yield found
    if found.process.alive():
        found.process.terminate()
    stop_proxies(found.state)


def echo(port: int, text: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
        conn.sendall(text)
        conn.settimeout(3)
        return conn.recv(1024)


def test_no_labels_http_backends_are_proxied_in_http_mode_others_in_tcp(
    agent: Agent, docker_client: docker.DockerClient
) -> None:
    web_port, echo_port = free_port(), free_port()
    # No label at all: the service is named after the image, its frontend is the private port.
    webs = [run_whoami(docker_client, private_port=web_port) for _ in range(2)]
    echoes = docker_client.containers.run(
        BUSYBOX_IMAGE,
        ["nc", "-ll", "-p", str(echo_port), "-e", "/bin/cat"],
        detach=True,
        ports={f"{echo_port}/tcp": ("127.0.0.1", None)},
    )
    log = agent.process.log

    def modes() -> dict[str, str]:
        return {name: row["mode"] for name, row in agent.services().items()}

    until(lambda: modes() == {"whoami": "http", "busybox": "tcp"}, 60, f"modes\n{log()[-3000:]}")
    rows = agent.services()
    assert {i["meta"].get("detected_mode") for i in rows["whoami"]["instances"]} == {"http"}
    assert {i["meta"].get("detected_mode") for i in rows["busybox"]["instances"]} == {"tcp"}
    assert all("mode" not in i["meta"] for row in rows.values() for i in row["instances"])
    until(lambda: agent.backend_mode("whoami") == "http", 30, f"HAProxy in http\n{log()[-3000:]}")
    # The registry names both modes before the proxy applied the second service.
    until(lambda: agent.backend_mode("busybox") == "tcp", 30, f"HAProxy in tcp\n{log()[-3000:]}")
    answers = requests_through(web_port, 6)
    assert {a.removeprefix("I am ") for a in answers} == {w.id[:12] for w in webs}, answers
    until(lambda: echo(echo_port, b"ping\n") == b"ping\n", 20, "the echo through HAProxy")
    assert "checks: whoami" in log() and "speaks HTTP/1" in log()
    echoes.remove(force=True)
