"""Running discoverd itself as a subprocess, as an operator would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.services import free_port, http_get


class DiscoverdProcess:
    """``discoverd <args>`` in the background, logging to ``<root>/discoverd.log``."""

    def __init__(self, root: Path, args: list[str], env: dict[str, str]) -> None:
        self.root = root
        self.args = args
        self.env = env
        self.log_path = root / "discoverd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DiscoverdProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCOVERD_", "ETCD_"))}
        env.pop("HOST_IP", None)
        env.update(self.env)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "discoverd", *self.args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"discoverd ignored SIGTERM:\n{self.log()[-3000:]}") from None


def requests_through(port: int, count: int, host: str = "127.0.0.1") -> list[str]:
    """``count`` sequential requests to the proxy frontend; answers or ``ERROR: ...``."""
    answers = []
    for _ in range(count):
        try:
            answers.append(http_get(f"http://{host}:{port}/", timeout=3).strip())
        except Exception as exc:  # recorded, the test decides
            answers.append(f"ERROR: {type(exc).__name__}: {exc}")
    return answers


def until(check: object, timeout: float, what: str, interval: float = 0.1) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return
        except Exception as exc:  # a check may fail until the system converges
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


__all__ = ["DiscoverdProcess", "free_port", "requests_through", "until"]
