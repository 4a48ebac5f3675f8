"""Supervising a process that outlives discoverd: started detached, adopted through its pid
file with an identity check, stopped (signal, wait, kill)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from discoverd import PluginError
from discoverd.proxykit import (
    PidFile,
    command_line,
    pid_alive,
    process_title,
    read_pid,
    start_detached,
    stop_process,
    wait_gone,
)

SLEEPER = "import sys, time; print('up', flush=True); time.sleep(60)"


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A detached python process that prints ``up`` into ``tmp_path/out.log`` and sleeps."""
    child = start_detached(
        [sys.executable, "-c", SLEEPER, "discoverd-test-marker"],
        output=tmp_path / "out.log",
        cwd=tmp_path,
    )
    yield child
    if child.poll() is None:
        child.kill()
    child.wait()


def test_start_detached_runs_in_its_own_session_with_output_in_a_file(
    sleeper: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    deadline = time.monotonic() + 10
    while "up" not in (tmp_path / "out.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (tmp_path / "out.log").read_text() == "up\n"
    assert os.getsid(sleeper.pid) == sleeper.pid != os.getsid(0)
    argv = command_line(sleeper.pid)
    assert argv is not None and argv[-1] == "discoverd-test-marker"
    assert process_title(sleeper.pid).endswith(" discoverd-test-marker")
    assert command_line(2**22 + 1) is None and process_title(2**22 + 1) == ""
    with pytest.raises(PluginError, match="cannot run"):
        start_detached([str(tmp_path / "missing")], output=tmp_path / "x.log", cwd=tmp_path)


def test_pid_file_adopts_only_a_live_process_that_is_ours(
    sleeper: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    def ours(pid: int) -> bool:
        return (command_line(pid) or [""])[-1] == "discoverd-test-marker"

    pid_file = PidFile(tmp_path / "x.pid", ours, mode=0o640)
    assert pid_file.live() is None and read_pid(pid_file.path) is None
    # Found another way (a socket, the process table): adopted, the pid file written again.
    assert pid_file.find(lambda: sleeper.pid) == sleeper.pid
    assert read_pid(pid_file.path) == sleeper.pid
    assert pid_file.path.stat().st_mode & 0o777 == 0o640
    assert pid_file.live() == sleeper.pid
    # A pid that is not ours (this test process) is never adopted, nor trusted from the file.
    pid_file.path.write_text(f"{os.getpid()}\n")
    assert pid_file.live() is None
    assert pid_file.find(lambda: os.getpid()) is None
    pid_file.remove()
    assert pid_file.find(lambda: sleeper.pid, adopt=False) == sleeper.pid
    assert not pid_file.path.exists()
    pid_file.remove()  # twice is fine


def test_stop_process_signals_waits_and_kills_what_stays(tmp_path: Path) -> None:
    stubborn = start_detached(
        [sys.executable, "-c", "import signal, time; signal.signal(15, signal.SIG_IGN); "
         "print('up', flush=True); time.sleep(60)"],
        output=tmp_path / "stubborn.log",
        cwd=tmp_path,
    )  # fmt: skip
    polite = start_detached(
        [sys.executable, "-c", SLEEPER], output=tmp_path / "polite.log", cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 10
        while "up" not in (tmp_path / "stubborn.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert stop_process([polite.pid], signal.SIGTERM, timeout=5, what="demo") is True
        polite.wait(5)
        # SIGTERM ignored: killed once the timeout is over.
        assert stop_process([stubborn.pid], signal.SIGTERM, timeout=0.3, what="demo") is False
        stubborn.wait(5)
        assert stubborn.returncode == -signal.SIGKILL
        assert wait_gone([stubborn.pid, polite.pid], 1.0)
        assert not pid_alive(stubborn.pid)
        assert stop_process([], signal.SIGTERM, timeout=1, what="demo") is True
    finally:
        for child in (stubborn, polite):
            if child.poll() is None:
                child.kill()
            child.wait()
