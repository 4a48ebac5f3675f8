"""Running discoverd itself as a subprocess, as an operator would, and ending what it leaves.

Used by the end-to-end tests (``tests/e2e``) and the fault suite (``tests/faults``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.services import free_port, http_get

__all__ = [
    "DiscoverdProcess",
    "free_port",
    "requests_through",
    "stop_proxies",
    "until",
]


class DiscoverdProcess:
    """``discoverd <args>`` in the background, logging to ``<root>/discoverd.log``.

    :meth:`start` may be called again after the process ended (or was killed): the same
    command starts again and appends to the same log.
    """

    def __init__(self, root: Path, args: list[str], env: dict[str, str]) -> None:
        self.root = root
        self.args = args
        self.env = env
        self.log_path = root / "discoverd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False

    def start(self) -> DiscoverdProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DISCOVERD_", "ETCD_", "CONSUL_", "DOCKER_"))
        }
        env.pop("HOST_IP", None)
        env.update(self.env)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} launched: discoverd\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "discoverd", *self.args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.frozen = False
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.alive() and self.proc is not None else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        self.thaw()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"discoverd ignored SIGTERM:\n{self.log()[-3000:]}") from None

    def kill(self) -> None:
        """SIGKILL now, as in a crash (the proxy it started keeps running)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        self.frozen = False

    def freeze(self) -> None:
        """SIGSTOP: every thread stops, the process stays (as a host that hangs)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)
            self.frozen = True

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        if self.frozen and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.frozen = False

    def close(self, timeout: float = 10) -> None:
        """End the process whatever its state, never raising: SIGTERM, then SIGKILL."""
        if self.proc is None:
            return
        self.thaw()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def stop_proxies(state_dir: Path, *, kill: bool = False, timeout: float = 10) -> list[int]:
    """End the HAProxy and nginx that discoverd left running for ``state_dir`` (they outlive
    discoverd on purpose), with their workers; returns the pids that were signalled.

    A process is ended only if its command line names ``state_dir``. Gracefully (HAProxy
    SIGUSR1, nginx SIGQUIT) with SIGKILL after ``timeout`` seconds, or with ``kill`` at once
    (as when the host dies)."""
    signalled: list[int] = []
    for pid_file, graceful in (
        ("haproxy/haproxy.pid", signal.SIGUSR1),
        ("nginx/nginx.pid", signal.SIGQUIT),
    ):
        path = state_dir / pid_file
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if str(state_dir) not in _cmdline(pid):
            continue
        family = [pid, *_children(pid)]
        for sig in (signal.SIGKILL,) if kill else (graceful, signal.SIGKILL):
            for member in family:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, sig)
            signalled.extend(family)
            deadline = time.monotonic() + (1 if kill else timeout)
            while time.monotonic() < deadline and not all(_gone(p) for p in family):
                time.sleep(0.05)
            if all(_gone(p) for p in family):
                break
    return sorted(set(signalled))


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
