"""Time from `docker run` returning to the first request answered by the new container through
the proxy, with discoverd (both roles, etcd + HAProxy) on one host.

    .venv/bin/python bench/time_to_routable.py [--runs 10]

Starts its own etcd, Docker daemon and discoverd on loopback ports, keeps one whoami running so
the service exists, then starts `--runs` more, one at a time, and for each polls the frontend
(a new connection per request) until the new container answers. Prints min, median, p90, max.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from discoverd.testing.services import DockerDaemon, Etcd, ensure_images, free_port, run_whoami


def get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return str(response.read().decode())
    except Exception:
        return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--log-level", default="warning", help="discoverd's log level")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dbench"))
    etcd, daemon = Etcd(root / "etcd"), DockerDaemon(root / "docker")
    frontend, stats = free_port(), free_port()
    state = root / "state"
    agent = None
    samples: list[float] = []
    try:
        etcd.start()
        daemon.start()
        client = daemon.client()
        ensure_images(client)
        labels = {"SERVICE_8000_PORT": str(frontend), "SERVICE_MODE": "http"}
        env = {**os.environ, "DOCKER_HOST": daemon.host, "ETCD_HOST": etcd.endpoint}
        agent = subprocess.Popen(
            [
                sys.executable, "-m", "discoverd", "--host-ip", "127.0.0.1",
                "--state-dir", str(state), "--set", "haproxy.bind=127.0.0.1",
                "--set", f"haproxy.stats_port={stats}", "--log-level", args.log_level,
            ],
            env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{frontend}/"
        base = run_whoami(client, host_ip="127.0.0.1", labels=labels)
        deadline = time.monotonic() + 60
        while base.id[:12] not in get(url):
            if time.monotonic() > deadline:
                raise SystemExit("the first container never became routable")
            time.sleep(0.05)
        for n in range(args.runs):
            container = run_whoami(client, host_ip="127.0.0.1", labels=labels)
            start = time.monotonic()
            wanted = f"I am {container.id[:12]}"
            while wanted not in get(url):
                if time.monotonic() - start > 30:
                    raise SystemExit(f"run {n}: not routable after 30 s")
            samples.append((time.monotonic() - start) * 1000)
            print(f"run {n + 1}: {samples[-1]:.0f} ms", flush=True)
        samples.sort()
        p90 = samples[min(len(samples) - 1, round(0.9 * (len(samples) - 1)))]
        median = statistics.median(samples)
        print(
            f"time to routable over {len(samples)} runs: min {samples[0]:.0f} ms, "
            f"median {median:.0f} ms, p90 {p90:.0f} ms, max {samples[-1]:.0f} ms"
        )
        return 0
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(15)
        pid = state / "haproxy" / "haproxy.pid"
        if pid.exists():
            subprocess.run(["kill", "-USR1", pid.read_text().split()[0]], check=False)
        try:
            for container in daemon.client().containers.list(all=True):
                container.remove(force=True)
        except Exception:
            pass
        daemon.stop()
        etcd.stop()


if __name__ == "__main__":
    sys.exit(main())
