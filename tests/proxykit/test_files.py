"""Files and logs of a proxy plugin: atomic writes, tolerant reads, private folders, the
state-directory check, and the log helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from discoverd import PluginError
from discoverd.proxykit import (
    LogFile,
    check_state_dir,
    ensure_directory,
    last_lines,
    read_bytes,
    read_text,
    summarise,
    write_atomic,
)


@pytest.mark.parametrize("durable", [True, False])
def test_write_atomic_replaces_the_file_by_a_rename(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "proxy.cfg"
    write_atomic(target, b"one\n", durable=durable)
    first = target.stat().st_ino
    assert target.read_bytes() == b"one\n" and target.stat().st_mode & 0o777 == 0o600
    write_atomic(target, b"two\n", mode=0o644, durable=durable)
    assert target.read_bytes() == b"two\n" and target.stat().st_mode & 0o777 == 0o644
    assert target.stat().st_ino != first  # a new file renamed over the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proxy.cfg"]


def test_write_atomic_leaves_no_temporary_file_when_it_fails(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()  # a folder in the way: the rename fails
    with pytest.raises(OSError):
        write_atomic(target, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_reads_tolerate_a_missing_file(tmp_path: Path) -> None:
    assert read_bytes(tmp_path / "none") is None and read_text(tmp_path / "none") == ""
    (tmp_path / "marker").write_bytes(b"  abc\xff\n")
    assert read_text(tmp_path / "marker") == "abc\ufffd"


def test_ensure_directory_creates_and_fixes_the_mode(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    ensure_directory(folder, 0o711)
    assert folder.stat().st_mode & 0o777 == 0o711
    os.chmod(folder, 0o755)
    ensure_directory(folder, 0o700)
    assert folder.stat().st_mode & 0o777 == 0o700
    ensure_directory(folder, 0o700)  # there already: nothing changes
    assert folder.stat().st_mode & 0o777 == 0o700
    taken = tmp_path / "file"
    taken.write_text("")
    with pytest.raises(FileExistsError):
        ensure_directory(taken, 0o700)  # a file is not a folder


def test_check_state_dir_refuses_characters_the_proxy_cannot_hold() -> None:
    assert check_state_dir(Path("/run/d"), forbidden="',", used_by="X") == Path("/run/d")
    with pytest.raises(PluginError, match=r"contains ',', which cannot appear in X's config"):
        check_state_dir(Path("/tmp/a,b"), forbidden="',", used_by="X's config")
    with pytest.raises(PluginError, match="a control character"):
        check_state_dir(Path("/tmp/a\tb"), forbidden="',", used_by="X")


def test_log_file_reads_from_an_offset_and_trims(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "proxy.log", max_bytes=10)
    assert log.size() == 0 and log.since(0) == ""
    log.trim()  # no file: nothing to do
    with open(log.path, "a") as handle:
        handle.write("before\n")
    offset = log.size()
    with open(log.path, "a") as handle:
        handle.write("[ALERT] bad\n")
    assert log.since(offset) == "[ALERT] bad\n"
    log.trim()
    assert log.size() == 0


def test_last_lines_and_summarise() -> None:
    assert last_lines("a\n\n b \nc\n", 2) == ["b", "c"]
    assert summarise(["x", "y", "x"]) == ["x", "y"]
    assert summarise(["x", "x"], distinct=False) == ["x", "x"]
    assert summarise(["a" * 10], width=6) == ["aaa..."]
    assert summarise([str(i) for i in range(5)], limit=3) == ["0", "1", "... (3 more)"]
