"""Process helpers the proxy plugins share: finding their binary, locking their state dir."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from discoverd import PluginError, Unavailable
from discoverd.proxykit import directory_lock, find_executable, run_check_command


def test_find_executable_on_path_or_says_which_option_to_set() -> None:
    assert Path(find_executable("sh", "sh", "demo.binary")).name == "sh"
    with pytest.raises(
        PluginError, match=r"demo executable 'no-such-tool-x' not found.*demo\.binary"
    ):
        find_executable("no-such-tool-x", "demo", "demo.binary")


def test_directory_lock_is_exclusive_while_held(tmp_path: Path) -> None:
    with (
        directory_lock(tmp_path),
        open(tmp_path / "lock", "a") as other,
        pytest.raises(BlockingIOError),
    ):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "lock", "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released afterwards


def test_run_check_command_returns_output_and_maps_failures(tmp_path: Path) -> None:
    done = run_check_command(["sh", "-c", "echo bad line 3 >&2; exit 1"], 10, "sh -c")
    assert done.returncode == 1 and "bad line 3" in done.stderr
    with pytest.raises(Unavailable, match=r"'slow -c' did not finish within 0\.2s"):
        run_check_command(["sleep", "5"], 0.2, "slow -c")
    with pytest.raises(PluginError, match="cannot run"):
        run_check_command([str(tmp_path / "missing")], 1, "missing")
