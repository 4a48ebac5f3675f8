"""Small helpers about local processes, shared by plugins that manage one (e.g. HAProxy):
finding the proxy's binary, running its checker, locking its state directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from discoverd import PluginError, Unavailable

#: Where a proxy's binary may live when a non-login PATH lacks the sbin directories.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live process; a zombie (exited, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    # The state follows the parenthesised command name, which may itself contain spaces.
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def find_executable(name: str, what: str, option: str) -> str:
    """The path of executable ``name``: on PATH, else in the sbin directories (unless ``name``
    is a path). ``PluginError`` naming ``what`` and the ``option`` to set when not found."""
    found = shutil.which(name) or (
        None if os.sep in name else shutil.which(name, path=os.pathsep.join(SBIN_DIRS))
    )
    if found is None:
        raise PluginError(
            f"{what} executable {name!r} not found (on PATH or in {', '.join(SBIN_DIRS)}); "
            f"install {what} or set {option}"
        )
    return found


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (its ``lock`` file), across processes too."""
    with open(directory / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_check_command(
    argv: list[str], timeout: float, label: str
) -> subprocess.CompletedProcess[str]:
    """Run a proxy's configuration checker (``haproxy -c``, ``nginx -t``) and return what it
    printed. A checker that hangs is ``Unavailable`` (``label`` names it in the message); one
    that cannot be started is a ``PluginError``."""
    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise Unavailable(f"'{label}' did not finish within {timeout:g}s") from None
    except OSError as exc:
        raise PluginError(f"cannot run {argv[0]}: {exc}") from None
