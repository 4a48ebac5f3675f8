"""The state directory: created private whatever the umask, never through a symbolic link."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from discoverd.core.agent import (
    ROOT_STATE_DIR_MODE,
    USER_STATE_DIR_MODE,
    ensure_state_dir,
    state_dir_mode,
)
from discoverd.core.config import ConfigError, Settings, load_settings


def settings_for(path: Path) -> Settings:
    return load_settings({}, env={"DISCOVERD_STATE_DIR": str(path)})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(params=[False, True], ids=["user", "root"])
def as_root(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The mode discoverd would choose as root, or as another user (the owner stays us)."""
    wanted = ROOT_STATE_DIR_MODE if request.param else USER_STATE_DIR_MODE
    monkeypatch.setattr("discoverd.core.agent.state_dir_mode", lambda: wanted)
    return bool(request.param)


@pytest.mark.usefixtures("umask_000")
def test_missing_directories_are_created_private_whatever_the_umask(
    tmp_path: Path, as_root: bool
) -> None:
    """0700; as root 0711, because nginx's unprivileged workers must pass through the state
    directory to <state>/nginx/tmp (search, no listing)."""
    expected = 0o711 if as_root else 0o700
    before = mode(tmp_path)
    state = tmp_path / "a" / "b" / "state"
    assert ensure_state_dir(settings_for(state)) == state
    for path in (tmp_path / "a", tmp_path / "a" / "b", state):
        assert mode(path) == expected, path
    assert mode(tmp_path) == before  # an existing parent is left alone
    assert ensure_state_dir(settings_for(state)) == state  # idempotent


def test_a_narrow_umask_does_not_narrow_them_either(tmp_path: Path, as_root: bool) -> None:
    old = os.umask(0o777)
    try:
        ensure_state_dir(settings_for(tmp_path / "x" / "state"))
    finally:
        os.umask(old)
    expected = 0o711 if as_root else 0o700
    assert mode(tmp_path / "x") == expected and mode(tmp_path / "x" / "state") == expected


def test_the_modes() -> None:
    assert (ROOT_STATE_DIR_MODE, USER_STATE_DIR_MODE) == (0o711, 0o700)
    assert state_dir_mode() == (0o711 if os.geteuid() == 0 else 0o700)


@pytest.mark.parametrize("where", ["itself", "parent"])
def test_a_symbolic_link_is_refused(tmp_path: Path, where: str) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    state = link if where == "itself" else link / "state"
    with pytest.raises(ConfigError, match="symbolic link") as raised:
        ensure_state_dir(settings_for(state))
    assert str(link) in str(raised.value) and str(real) in str(raised.value)
    assert not (real / "state").exists()  # nothing was created through the link


def test_a_file_in_the_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        ensure_state_dir(settings_for(tmp_path / "file" / "state"))


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        ensure_state_dir(settings_for(shared))
