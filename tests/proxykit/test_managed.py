"""The apply skeleton (:class:`discoverd.proxykit.ManagedProxy`), with a proxy whose "process"
lives in memory: each path of the skeleton (start, unchanged, in place, reload, refusal,
unknown outcome, adoption by a new object) and what it leaves on disk."""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from discoverd import PluginError, ProxyConfigError, Service, Unavailable
from discoverd.proxykit import APPLIED_MARKER, ManagedProxy, ProxyRefused


class Process:
    """The fake proxy process: what it serves, and what it will do next."""

    def __init__(self, *, startable: bool = True) -> None:
        self.startable = startable
        self.serving: bytes | None = None
        self.failed_reloads = 0


class FakeProxy(ManagedProxy[Process]):
    def __init__(self, root: Path, process: Process, *, private: bool = True) -> None:
        folder = root / "fake"
        super().__init__(
            "fake",
            folder / "fake.conf" if private else root / "out" / "fake.conf",
            private_dir=folder if private else None,
        )
        self.process = process
        self.calls: list[str] = []
        self.next_reload = "ok"  # "ok", "refuse" or "lose"
        self.in_place = False
        self.lock_seen_held = False

    def render(self, services: Sequence[Service]) -> str:
        ordered = sorted(services, key=lambda s: s.name)
        return "".join(f"{s.name} {s.frontend_port}\n" for s in ordered)

    def validate(self, config: str) -> None:
        if "bad" in config:
            raise ProxyConfigError("fake: bad")

    def find_running(self) -> Process | None:
        return self.process if self.process.serving is not None else None

    def serves_file(self, running: Process) -> bool:
        return running.failed_reloads == 0

    def start(self) -> None:
        self.calls.append("start")
        self._check_lock()
        if not self.process.startable:
            raise PluginError("fake did not start: no such port")
        self.process.serving = self.config_file.read_bytes()

    def reload(self, running: Process, services: Sequence[Service]) -> None:
        self.calls.append("reload")
        if self.next_reload == "refuse":
            running.failed_reloads += 1
            raise ProxyRefused("fake refused it: port in use")
        if self.next_reload == "lose":
            raise PluginError("fake did not confirm the reload")
        running.failed_reloads = 0
        running.serving = self.config_file.read_bytes()

    def apply_in_place(
        self, running: Process, previous: bytes, config: str, services: Sequence[Service]
    ) -> str | None:
        if not self.in_place:
            return None
        self.calls.append("in place")
        running.serving = config.encode()
        return "runtime"

    def _check_lock(self) -> None:
        if self.private_dir is None:
            return
        with open(self.private_dir / "lock", "a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.lock_seen_held = True
            else:
                fcntl.flock(other, fcntl.LOCK_UN)


def marker(proxy: FakeProxy) -> str:
    assert proxy.marker_file is not None
    return proxy.marker_file.read_text() if proxy.marker_file.exists() else ""


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_start_unchanged_and_reload_confirm_what_runs(tmp_path: Path) -> None:
    process = Process()
    proxy = FakeProxy(tmp_path, process)
    assert proxy.last_apply is None and proxy.last_reload is None
    assert proxy.apply("one\n", []) == "started"
    assert proxy.lock_seen_held  # the hooks run with the folder locked, across processes
    assert process.serving == b"one\n" and proxy.config_file.read_text() == "one\n"
    assert marker(proxy) == sha("one\n") and proxy.confirmed_config() == b"one\n"
    assert proxy.marker_file == tmp_path / "fake" / APPLIED_MARKER
    assert (tmp_path / "fake").stat().st_mode & 0o777 == 0o700
    assert proxy.last_apply is not None and proxy.last_apply.result == "started"
    assert proxy.last_reload is not None
    assert proxy.last_reload.began <= proxy.last_reload.ended

    assert proxy.apply("one\n", []) == "unchanged"
    assert proxy.calls == ["start"]
    assert proxy.apply("two\n", []) == "reloaded"
    assert process.serving == b"two\n" and marker(proxy) == sha("two\n")
    assert proxy.last_apply.result == "reloaded" and not proxy.last_apply.failed
    assert sorted(p.name for p in (tmp_path / "fake").iterdir()) == [
        APPLIED_MARKER,
        "fake.conf",
        "lock",
    ]


def test_a_new_object_adopts_what_runs(tmp_path: Path) -> None:
    process = Process()
    FakeProxy(tmp_path, process).apply("one\n", [])
    again = FakeProxy(tmp_path, process)
    assert again.apply("one\n", []) == "unchanged"
    assert again.calls == []
    # The marker is what says so: without it, the same file is reloaded.
    again.forget()
    assert again.confirmed_config() is None
    assert again.apply("one\n", []) == "reloaded"


def test_a_refused_reload_puts_the_previous_file_back_still_confirmed(tmp_path: Path) -> None:
    process = Process()
    proxy = FakeProxy(tmp_path, process)
    proxy.apply("one\n", [])
    proxy.next_reload = "refuse"
    with pytest.raises(ProxyRefused, match="port in use"):
        proxy.apply("two\n", [])
    assert proxy.config_file.read_text() == "one\n" and process.serving == b"one\n"
    assert marker(proxy) == sha("one\n")  # it still runs the previous one
    assert proxy.last_apply is not None and proxy.last_apply.failed
    assert proxy.last_apply.error == "fake refused it: port in use"
    # The process counts a failed reload (serves_file says no): even "one" is reloaded.
    proxy.next_reload = "ok"
    assert proxy.apply("one\n", []) == "reloaded"
    assert proxy.apply("one\n", []) == "unchanged"


def test_an_unknown_outcome_puts_the_file_back_unconfirmed(tmp_path: Path) -> None:
    process = Process()
    proxy = FakeProxy(tmp_path, process)
    proxy.apply("one\n", [])
    proxy.next_reload = "lose"
    with pytest.raises(PluginError, match="did not confirm"):
        proxy.apply("two\n", [])
    assert proxy.config_file.read_text() == "one\n"
    assert marker(proxy) == "" and proxy.confirmed_config() is None
    proxy.next_reload = "ok"
    assert proxy.apply("one\n", []) == "reloaded"  # what runs was unknown: not "unchanged"


def test_a_failed_start_leaves_no_file(tmp_path: Path) -> None:
    proxy = FakeProxy(tmp_path, Process(startable=False))
    with pytest.raises(PluginError, match="did not start"):
        proxy.apply("one\n", [])
    assert not proxy.config_file.exists() and marker(proxy) == ""
    assert proxy.last_apply is not None and proxy.last_apply.result == "failed"
    assert proxy.last_apply.error == "fake did not start: no such port"


def test_a_change_in_place_is_written_and_confirmed(tmp_path: Path) -> None:
    process = Process()
    proxy = FakeProxy(tmp_path, process)
    proxy.apply("one\n", [])
    proxy.in_place = True
    assert proxy.apply("two\n", []) == "runtime"
    assert proxy.calls == ["start", "in place"]
    assert proxy.config_file.read_text() == "two\n" and marker(proxy) == sha("two\n")
    assert proxy.last_apply is not None and proxy.last_apply.result == "runtime"


def test_without_a_private_dir_only_the_file_is_written(tmp_path: Path) -> None:
    process = Process()
    proxy = FakeProxy(tmp_path, process, private=False)
    assert proxy.marker_file is None
    assert proxy.apply("one\n", []) == "started"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fake.conf"]
    assert proxy.apply("one\n", []) == "unchanged"  # the file itself is what runs
    assert not (tmp_path / "fake").exists()


def test_filesystem_errors_name_what_failed(tmp_path: Path) -> None:
    proxy = FakeProxy(tmp_path, Process())
    (tmp_path / "fake").write_text("a file where the folder should be")
    with pytest.raises(PluginError, match="fake: cannot apply the configuration: "):
        proxy.apply("one\n", [])
    with pytest.raises(PluginError, match="fake: cannot stage the candidate configuration"):
        proxy.check_candidate("one\n", lambda path: ["true"], suffix=".conf", timeout=5, label="t")
    (tmp_path / "fake").unlink()
    proxy.prepare()
    proxy.config_file.mkdir()  # a folder where the file should be
    with pytest.raises(PluginError, match=f"fake: cannot write {proxy.config_file}: "):
        proxy.apply("one\n", [])


def test_check_candidate_runs_the_checker_on_a_staged_file(tmp_path: Path) -> None:
    proxy = FakeProxy(tmp_path, Process())
    done, name = proxy.check_candidate(
        "one\n", lambda path: ["cat", path], suffix=".conf", timeout=5, label="cat"
    )
    assert done.returncode == 0 and done.stdout == "one\n"
    assert Path(name).parent == tmp_path / "fake" and Path(name).name.startswith("candidate-")
    assert not Path(name).exists()
    with pytest.raises(Unavailable, match="'slow' did not finish"):
        proxy.check_candidate("x", lambda _: ["sleep", "5"], suffix="", timeout=0.2, label="slow")
    assert sorted(p.name for p in (tmp_path / "fake").iterdir()) == []
