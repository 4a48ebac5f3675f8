"""Supervising a process that outlives discoverd: started detached, adopted through its pid
file with an identity check, stopped (signal, wait, kill)."""

from __future__ import annotations

import os
import shutil
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
    child_pids,
    command_line,
    executable_of,
    pid_alive,
    process_title,
    read_pid,
    real_uid,
    start_detached,
    stop_process,
    wait_gone,
    writes_to,
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


def test_identity_needs_discoverd_s_uid_and_the_configured_binary(
    sleeper: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    def ours(pid: int) -> bool:
        return (command_line(pid) or [""])[-1] == "discoverd-test-marker"

    assert executable_of(sleeper.pid) == os.path.realpath(sys.executable)
    assert real_uid(sleeper.pid) == os.geteuid()
    assert sleeper.pid in child_pids(os.getpid())
    assert executable_of(2**22 + 1) is None and real_uid(2**22 + 1) is None
    right = PidFile(tmp_path / "a.pid", ours, executable=lambda: sys.executable)
    assert right.trusted(sleeper.pid)
    # The same title with another binary configured: not ours, not adopted.
    wrong = PidFile(tmp_path / "b.pid", ours, executable=lambda: "/bin/sh")
    assert not wrong.trusted(sleeper.pid)
    assert wrong.find(lambda: sleeper.pid) is None and not wrong.path.exists()
    wrong.path.write_text(f"{sleeper.pid}\n")
    assert wrong.live() is None


def test_a_replaced_binary_still_identifies_its_process(tmp_path: Path) -> None:
    """A package upgrade replaces the binary under a running proxy: /proc says "(deleted)"."""
    binary = tmp_path / "sleep"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    child = subprocess.Popen([str(binary), "60"])
    try:
        wait_for_exec = time.monotonic() + 10
        while executable_of(child.pid) != str(binary):
            assert time.monotonic() < wait_for_exec
            time.sleep(0.01)
        binary.unlink()
        assert os.readlink(f"/proc/{child.pid}/exe").endswith(" (deleted)")
        assert executable_of(child.pid) == str(binary)
        assert PidFile(
            tmp_path / "x.pid", lambda pid: True, executable=lambda: str(binary)
        ).trusted(child.pid)
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_a_process_of_another_user_is_never_ours(tmp_path: Path) -> None:
    sleep = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
    pid_file = PidFile(tmp_path / "x.pid", lambda pid: True, executable=lambda: sleep)
    mine = subprocess.Popen([sleep, "60"])
    other = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sleep, "60"]
    )
    try:
        deadline = time.monotonic() + 10
        while real_uid(other.pid) != 65534 or executable_of(other.pid) != sleep:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert pid_file.trusted(mine.pid)
        assert not pid_file.trusted(other.pid)  # same binary, same title: another uid
        assert pid_file.find(lambda: other.pid) is None
    finally:
        for child in (mine, other):
            child.kill()
            child.wait()


def test_writes_to_tells_a_writer_from_a_reader(tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    log.write_text("")
    assert not writes_to(os.getpid(), log)
    with open(log) as reading:
        assert not writes_to(os.getpid(), log)
        with open(log, "a"):
            assert writes_to(os.getpid(), log)
        assert not reading.closed
    assert not writes_to(2**22 + 1, log)


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
