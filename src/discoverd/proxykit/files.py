"""Files of a proxy plugin: durable atomic writes, reads that tolerate a missing file, private
directories and the state-directory check."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from discoverd import PluginError


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: write a temporary file next to it (mode ``mode``), then
    rename it over ``path``. Readers see the old file or the new one, never a part of it.

    With ``durable`` (the default) the data and the rename are flushed to disk (``fsync`` of the
    file, then of its directory), so after a power loss the file is the old one or the new one.
    Without it the rename is as atomic, only not yet on disk. The temporary file is removed if
    anything fails."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(name, mode)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
    if not durable:
        return
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_bytes(path: Path) -> bytes | None:
    """The content of ``path``, or ``None`` if there is no such file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def read_text(path: Path) -> str:
    """The text of ``path`` stripped (undecodable bytes replaced), or ``""`` if it is missing."""
    data = read_bytes(path)
    return data.decode(errors="replace").strip() if data is not None else ""


def ensure_directory(path: Path, mode: int) -> None:
    """Create ``path`` (and its parents) if missing, and give it exactly ``mode``. Cheap when
    it is there already (one ``stat``: proxies call it before every apply)."""
    try:
        found = path.stat()
    except FileNotFoundError:
        found = None
    if found is None or not stat.S_ISDIR(found.st_mode):
        path.mkdir(mode=mode, parents=True, exist_ok=True)  # a file there: FileExistsError
        found = path.stat()
    if found.st_mode & 0o777 != mode:
        path.chmod(mode)


def check_state_dir(path: Path, *, forbidden: Iterable[str], used_by: str) -> Path:
    """``path`` (a plugin's folder in the state directory), refused with a ``PluginError`` when
    it holds a character of ``forbidden`` or a control character: characters that cannot
    appear in ``used_by`` (e.g. "HAProxy's configuration or command line"), where the plugin
    writes its paths."""
    text = str(path)
    bad = sorted(set(text) & set(forbidden))
    if bad or not text.isprintable():
        shown = ", ".join(repr(c) for c in bad) or "a control character"
        raise PluginError(
            f"state directory {text!r} contains {shown}, which cannot appear in {used_by}; "
            "choose another state_dir"
        )
    return path
