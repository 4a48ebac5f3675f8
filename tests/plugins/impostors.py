"""Processes dressed up as a proxy discoverd runs: the title or command line it looks for,
another binary or another user. For the identity tests of both proxy plugins."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence

import pytest

from discoverd.proxykit import executable_of, process_title, real_uid

NOBODY = 65534


def can_run_as_nobody() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


@contextlib.contextmanager
def impostor(
    argv0: str,
    argv: Sequence[str],
    *,
    as_nobody: bool = False,
    pass_fds: Sequence[int] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` with ``argv0`` as its argv[0] (bash's ``exec -a``), as this user or as
    nobody (``setpriv``); killed on exit. Yields once the program runs (its executable is
    ``argv[0]``'s, its title holds ``argv0``)."""
    binary = os.path.realpath(shutil.which(argv[0]) or argv[0])
    script = 'exec -a "$0" "$@"'
    command = ["bash", "-c", script, argv0, binary, *argv[1:]]
    if as_nobody:
        if not can_run_as_nobody():
            pytest.skip("needs root and setpriv to run a process as nobody")
        command = [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            *command,
        ]
    child = subprocess.Popen(command, pass_fds=tuple(pass_fds), start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while argv0 not in process_title(child.pid) or executable_of(child.pid) != binary:
            assert child.poll() is None, f"the impostor exited with status {child.returncode}"
            assert time.monotonic() < deadline, "the impostor did not start"
            time.sleep(0.01)
        assert real_uid(child.pid) == (NOBODY if as_nobody else os.geteuid())
        yield child
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, 9)
        child.wait()
