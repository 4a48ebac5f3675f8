"""The seed's walkthrough on one host: etcd, a Docker daemon, whoami containers, discoverd.

Run through ``scripts/demo.sh`` (which installs what is missing first), or as
``python -m scripts.demo`` from the repository root (the service launchers it uses live in
``tests/support``). Everything listens on 127.0.0.1: whoami on the frontend :8000, HAProxy's
stats page on :1936.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.services import (
    DockerDaemon,
    Etcd,
    ensure_images,
    http_get,
    run_whoami,
)


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def curl(port: int, count: int) -> list[str]:
    answers = curl_quiet(port, count)
    for answer in answers:
        print(f"    $ curl $HOST_IP:{port}\n    {answer}")
    return answers


def wait_until(check: object, timeout: float) -> bool:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except Exception:
            pass
        time.sleep(0.05)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000, help="whoami frontend port")
    parser.add_argument("--stats-port", type=int, default=1936)
    parser.add_argument("--keep", action="store_true", help="keep running until Ctrl-C")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ddemo"))
    host_ip = "127.0.0.1"
    say(f"starting etcd and a private Docker daemon under {root}")
    etcd = Etcd(root / "etcd")
    daemon = DockerDaemon(root / "docker")
    agent: subprocess.Popen[bytes] | None = None
    state = root / "state"
    try:
        etcd.start()
        daemon.start()
        client = daemon.client()
        ensure_images(client)

        command = [
            sys.executable, "-m", "discoverd",
            "--registry", "etcd", "--proxy", "haproxy",
            "--host-ip", host_ip, "--state-dir", str(state),
            "--set", "haproxy.bind=127.0.0.1",
            "--set", f"haproxy.stats_port={args.stats_port}",
        ]  # fmt: skip
        env = {
            **os.environ,
            "DOCKER_HOST": daemon.host,
            "ETCD_HOST": etcd.endpoint,
            "DISCOVERD_DEFAULT_MODE": "http",
        }
        say("starting discoverd: discoverd --registry etcd --proxy haproxy (both roles)")
        print(f"    DOCKER_HOST={daemon.host} ETCD_HOST={etcd.endpoint} HOST_IP={host_ip}")
        log = (root / "discoverd.log").open("ab")
        agent = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

        def names(containers: list[object]) -> set[str]:
            return {f"I am {c.id[:12]}" for c in containers}  # type: ignore[attr-defined]

        say("docker run -d -p 127.0.0.1::8000 whoami   (twice)")
        first = [run_whoami(client, host_ip=host_ip), run_whoami(client, host_ip=host_ip)]
        for c in first:
            print(f"    {c.id[:12]}")
        if not wait_until(lambda: set(curl_quiet(args.port, 6)) == names(first), 30):
            raise SystemExit(f"whoami did not become routable; see {root}/discoverd.log")
        say("requests alternate between both backends")
        curl(args.port, 4)

        say("two more: docker run -d -p 127.0.0.1::8000 whoami   (whoami-2, whoami-3)")
        more = [run_whoami(client, host_ip=host_ip), run_whoami(client, host_ip=host_ip)]
        everyone = first + more
        wait_until(lambda: set(curl_quiet(args.port, 12)) == names(everyone), 30)
        curl(args.port, 5)

        killed = [first[1], *more]
        say(f"docker kill {' '.join(c.id[:12] for c in killed)}")
        for c in killed:
            c.kill()
        config = state / "haproxy" / "haproxy.cfg"

        def servers() -> int:
            return sum(
                1 for ln in config.read_text().splitlines() if ln.strip().startswith("server ")
            )

        started = time.monotonic()
        if not wait_until(lambda: servers() == 1, 30):
            print((root / "discoverd.log").read_text()[-6000:])
            raise SystemExit("the killed backends were not removed")
        print(f"    (removed from the proxy within {time.monotonic() - started:.2f} s)")
        curl(args.port, 4)

        say(f"HAProxy stats page: http://127.0.0.1:{args.stats_port}/")
        page = http_get(f"http://127.0.0.1:{args.stats_port}/;csv")
        for line in page.splitlines():
            if line.startswith(("whoami", "# pxname")):
                print("    " + ",".join(line.split(",")[:2] + line.split(",")[17:18]))
        say(f"rendered HAProxy config: {state}/haproxy/haproxy.cfg")
        if args.keep:
            say("running; press Ctrl-C to stop")
            signal.pause()
        return 0
    finally:
        say("cleaning up")
        if agent is not None:
            agent.terminate()
            agent.wait(15)
        try:
            for container in daemon.client().containers.list(all=True):
                container.remove(force=True)
        except Exception:
            pass
        pid_file = state / "haproxy" / "haproxy.pid"
        if pid_file.exists():
            subprocess.run(["kill", "-USR1", pid_file.read_text().split()[0]], check=False)
        daemon.stop()
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)


def curl_quiet(port: int, count: int) -> list[str]:
    answers = []
    for _ in range(count):
        try:
            answers.append(http_get(f"http://127.0.0.1:{port}/", timeout=2).strip())
        except Exception as exc:
            answers.append(f"error: {exc}")
    return answers


if __name__ == "__main__":
    sys.exit(main())
