"""What an operator meets, against the real stack (Docker, etcd, HAProxy, discoverd as a
process): the endpoint's health and metrics moving with real events, SIGHUP, JSON logs,
``explain``, ``plan``, and what can never work failing at start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.discoverd import DiscoverdProcess, stop_proxies, until
from tests.support.services import DockerDaemon, Etcd, free_port, run_whoami

pytestmark = [pytest.mark.services, pytest.mark.usefixtures("cleanup_containers")]


class Agent:
    """One discoverd (both roles) on the test's Docker daemon and etcd, with its endpoint."""

    def __init__(self, root: Path, daemon: DockerDaemon, etcd: Etcd) -> None:
        self.root = root
        self.state = root / "state"
        self.listen = free_port()
        self.stats = free_port()
        self.config = root / "discoverd.toml"
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text("[haproxy]\nreload_interval = 0.5\n")
        args = [
            "--config", str(self.config), "--host-ip", "127.0.0.1", "--host-id", "ops",
            "--state-dir", str(self.state), "--log-format", "json",
            "--set", f"listen=127.0.0.1:{self.listen}",
            "--set", "haproxy.bind=127.0.0.1", "--set", f"haproxy.stats_port={self.stats}",
        ]  # fmt: skip
        self.env = {
            "DOCKER_HOST": daemon.host,
            "ETCD_HOST": etcd.endpoint,
            "DISCOVERD_ETCD_PREFIX": f"/ops{self.listen}",
            "DISCOVERD_ETCD_META_PREFIX": f"/ops-meta{self.listen}",
        }
        self.args = args
        self.process = DiscoverdProcess(root, args, self.env)

    def cli(self, *command: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("DISCOVERD_", "ETCD_"))}
        common = [a for a in self.args if a not in ("--log-format", "json")]
        return subprocess.run(
            [sys.executable, "-m", "discoverd", *command, *common],
            env={**base, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.listen}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return int(answer.status), answer.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def ready(self) -> dict[str, Any]:
        status, body = self.get("/healthz/ready")
        return json.loads(body) if status in (200, 503) else {"status": f"no answer ({body})"}

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get("/metrics")
        assert status == 200, text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@pytest.fixture
def agent(tmp_path: Path, docker_daemon: DockerDaemon, etcd: Etcd) -> Iterator[Agent]:
    found = Agent(tmp_path / "ops", docker_daemon, etcd)
    found.process.start()
    yield found
    if found.process.alive():
        found.process.terminate()
    stop_proxies(found.state)


def whoami(client: docker.DockerClient, frontend: int) -> Any:
    labels = {"SERVICE_NAME": "opsweb", "SERVICE_PORT": str(frontend), "SERVICE_MODE": "http"}
    return run_whoami(client, host_ip="127.0.0.1", labels=labels)


def test_health_and_metrics_follow_real_events(
    agent: Agent, docker_client: docker.DockerClient
) -> None:
    until(lambda: agent.ready().get("status") == "ready", 40, "ready\n" + agent.process.log())
    assert agent.get("/healthz/live")[0] == 200
    before = agent.metrics()
    frontend = free_port()
    container = whoami(docker_client, frontend)
    key = ("discoverd_instances", (("service", "opsweb"),))
    until(lambda: agent.metrics().get(key) == 1, 30, "the instance served\n" + agent.process.log())
    after = agent.metrics()
    assert (
        after[("discoverd_registrations_total", ())]
        == before[("discoverd_registrations_total", ())] + 1
    )
    assert after[("discoverd_readiness_checks_total", (("result", "ok"),))] >= 1
    assert (
        after[("discoverd_watch_events_total", (("role", "register"),))]
        > before[("discoverd_watch_events_total", (("role", "register"),))]
    )
    assert (
        after[("discoverd_apply_duration_seconds_count", ())]
        > before[("discoverd_apply_duration_seconds_count", ())]
    )
    assert after[("discoverd_proxy_reloads_total", (("proxy", "haproxy"), ("result", "reloaded")))]
    assert after[("discoverd_registry_contact_age_seconds", (("role", "register"),))] < 15

    # One service's problem: degraded, not unready.
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other = free_port()
    holder.bind(("127.0.0.1", other))
    holder.listen()
    try:
        labels = {"SERVICE_NAME": "opsblocked", "SERVICE_PORT": str(other)}
        run_whoami(docker_client, host_ip="127.0.0.1", labels=labels)
        until(lambda: agent.ready().get("status") == "degraded", 30, "degraded")
        status, body = agent.get("/healthz/ready")
        assert status == 200 and "opsblocked" in body
        until(lambda: agent.metrics()[("discoverd_services_left_out", ())] == 1, 10, "left out")
    finally:
        holder.close()
    until(lambda: agent.ready().get("status") == "ready", 30, "the blocked service comes back")

    container.stop(timeout=10)
    until(lambda: agent.metrics().get(key, 0) == 0, 30, "the instance gone")
    assert agent.metrics()[("discoverd_deregistrations_total", ())] >= 1


def test_json_logs_sighup_and_the_commands(
    agent: Agent, docker_client: docker.DockerClient
) -> None:
    until(lambda: agent.ready().get("status") == "ready", 40, "ready\n" + agent.process.log())
    frontend = free_port()
    container = whoami(docker_client, frontend)
    until(lambda: "register: added opsweb" in agent.process.log(), 30, "registered")
    # JSON logs: every line of the agent's output after the launch marker is one object.
    records = [
        json.loads(line) for line in agent.process.log().splitlines() if line.startswith("{")
    ]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    added = next(r for r in records if r["message"].startswith("register: added opsweb"))
    assert added["service"] == "opsweb" and added["container"] == container.id[:12]

    # explain: the service and the container.
    story = agent.cli("explain", "opsweb", "--json")
    assert story.returncode == 0, story.stderr
    document = json.loads(story.stdout)
    assert document["served"] and document["frontend_port"] == frontend
    [instance] = document["instances"]
    until(lambda: "routed: UP" in agent.cli("explain", "opsweb").stdout, 20, "routed UP")
    box = agent.cli("explain", container.name)
    assert box.returncode == 0, box.stderr
    assert "answers" in box.stdout and "registered: yes" in box.stdout, box.stdout
    assert instance["id"] in box.stdout
    missing = agent.cli("explain", "no-such-thing")
    assert missing.returncode != 0 and "no service 'no-such-thing'" in missing.stderr

    # plan: nothing to change while the agent keeps up.
    until(lambda: agent.cli("plan").returncode == 0, 20, "plan says no changes")

    # SIGHUP with a broken file: logged, the agent runs on with its settings.
    assert agent.process.proc is not None
    agent.config.write_text("[haproxy]\nreload_interval = 'soon'\n")
    agent.process.proc.send_signal(signal.SIGHUP)
    until(lambda: "the running configuration stays" in agent.process.log(), 20, "refused")
    assert agent.process.alive() and agent.ready()["status"] == "ready"
    # SIGHUP with a good, different file: applied, nothing deregistered on the way.
    agent.config.write_text("log_level = 'debug'\n[haproxy]\nreload_interval = 0.5\n")
    agent.process.proc.send_signal(signal.SIGHUP)
    until(lambda: "applying the new configuration" in agent.process.log(), 20, "reloaded")
    until(lambda: agent.ready().get("status") == "ready", 30, "ready after the reload")
    assert "register: removed opsweb" not in agent.process.log()
    assert agent.cli("plan").returncode == 0


def test_what_can_never_work_fails_at_start(tmp_path: Path, etcd: Etcd) -> None:
    state = str(tmp_path / "never" / "state")
    args = ["discover", "--state-dir", state, "--set", "listen="]
    args += ["--set", "haproxy.binary=/nonexistent/haproxy"]
    process = DiscoverdProcess(tmp_path / "never", args, {"ETCD_HOST": etcd.endpoint}).start()
    assert process.proc is not None
    assert process.proc.wait(30) == 2
    assert "haproxy executable '/nonexistent/haproxy' not found" in process.log()
