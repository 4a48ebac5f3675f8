"""The apply skeleton of a proxy that runs from one configuration file: :class:`ManagedProxy`.

Every proxy plugin applies a configuration the same way, and the details are where bugs hide,
so they are written once here::

    prepare the folder -> lock it (across processes) -> is the file on disk confirmed running,
    and equal to the candidate? then "unchanged" -> else a change in place (optional hook) ->
    else write the file atomically -> start or reload (hooks) -> refused? put the previous file
    back -> confirm: write the marker

The **marker** (``applied.sha256`` in the plugin's private folder) holds the SHA-256 of the
file last confirmed running. It is what lets a new discoverd (or a new proxy object) adopt a
proxy left running: the file on disk is trusted to be what runs only while its digest is the
marker's. Writing a new file makes the marker stale by itself, so a crash in the middle of a
reload leaves nothing that says "confirmed"; the marker is removed when the outcome of a start
or reload is unknown, and left alone when the proxy refused the change (:class:`ProxyRefused`)
and the previous file, which it still runs, is put back.

A subclass implements :meth:`~ManagedProxy.find_running`, :meth:`~ManagedProxy.start` and
:meth:`~ManagedProxy.reload` (plus ``render`` and ``validate`` of :class:`~discoverd.Proxy`);
``apply`` is inherited. Each call of ``apply`` leaves :attr:`~ManagedProxy.last_apply`, the
status of the last apply (result word, time, error), for health endpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import tempfile
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from discoverd import PluginError, Proxy, Service
from discoverd.proxykit.files import ensure_directory, read_bytes, read_text, write_atomic
from discoverd.proxykit.logs import LogFile
from discoverd.proxykit.process import directory_lock, run_check_command

log = logging.getLogger(__name__)

#: The marker's file name in the private folder.
APPLIED_MARKER = "applied.sha256"

R = TypeVar("R")


class ProxyRefused(PluginError):
    """Raised by :meth:`ManagedProxy.reload` when the proxy refused the new configuration and
    still serves the previous one (e.g. a port another program holds): the previous file is
    put back and stays confirmed. Any other exception from ``start`` or ``reload`` means the
    outcome is unknown: the previous file is put back, unconfirmed, and the next ``apply``
    starts or reloads again."""


@dataclass(frozen=True)
class ApplyStatus:
    """What the last ``apply`` did.

    ``result`` is the word it returned (``"started"``, ``"reloaded"``, ``"runtime"``,
    ``"unchanged"``) or ``"failed"``; ``at`` the wall-clock time it ended (``time.time()``);
    ``seconds`` how long it took; ``error`` the message of the error it raised, if it failed."""

    result: str
    at: float
    seconds: float
    error: str = ""

    @property
    def failed(self) -> bool:
        return self.result == "failed"


@dataclass(frozen=True)
class ReloadAttempt:
    """The last start or reload of the proxy process (succeeded or not): when it began and
    ended, on the ``time.monotonic()`` clock. A proxy that rate-limits its reloads counts its
    interval from one of them."""

    began: float
    ended: float


class ManagedProxy(Proxy, Generic[R]):
    """A :class:`~discoverd.Proxy` whose ``apply`` is the skeleton above.

    ``R`` is whatever :meth:`find_running` returns to name the running proxy (a pid, a status
    read from its socket) and :meth:`reload` receives back.

    ``name`` starts every error message. ``config_file`` is the file the proxy runs.
    ``private_dir`` is a folder only this plugin writes to, created with ``dir_mode``: applies
    are serialised on it across processes (its ``lock`` file), and it holds the marker and the
    candidates of :meth:`check_candidate`. Without one (a proxy whose output is the file itself,
    such as a JSON map other tools read), the file's own folder is created if missing, nothing
    else is written beside it, and the file on disk counts as running whenever
    :meth:`find_running` says so. ``file_mode`` is the mode the file is written with. ``log``
    is the proxy's own log file, trimmed before each change.
    """

    def __init__(
        self,
        name: str,
        config_file: Path,
        *,
        private_dir: Path | None = None,
        dir_mode: int = 0o700,
        file_mode: int = 0o600,
        log: LogFile | None = None,
    ) -> None:
        self.name = name
        self.config_file = config_file
        self.private_dir = private_dir
        self.dir_mode = dir_mode
        self.file_mode = file_mode
        self.log = log
        #: The marker: the digest of the configuration last confirmed running.
        self.marker_file = private_dir / APPLIED_MARKER if private_dir is not None else None
        #: What the last ``apply`` did (``None`` before the first).
        self.last_apply: ApplyStatus | None = None
        #: The last start or reload attempted (``None`` before the first).
        self.last_reload: ReloadAttempt | None = None
        self._digests: list[tuple[bytes, str]] = []  # memo: content -> its SHA-256

    # -- hooks for the subclass ---------------------------------------------------------------

    @abstractmethod
    def find_running(self) -> R | None:
        """The running proxy, or ``None`` if none runs (``apply`` then calls :meth:`start`).
        Called with the lock held; a proxy left running by an earlier discoverd is found (and
        adopted) here. Raise ``Unavailable`` if one runs but does not answer."""

    def serves_file(self, running: R) -> bool:
        """``False`` if ``running`` may not serve the confirmed file (e.g. HAProxy counts a
        failed reload since its last good one): the next apply then reloads even an
        unchanged file. Default ``True``."""
        return True

    def start(self) -> None:
        """Start the proxy on :attr:`config_file`, already written; return once it serves.
        Raise ``PluginError`` (with the proxy's reason) if it did not start."""

    def reload(self, running: R, services: Sequence[Service]) -> None:
        """Make ``running`` load :attr:`config_file`, already written; return once it serves
        it. Raise :class:`ProxyRefused` if it refused and still serves the previous one,
        ``PluginError`` if the outcome is unknown."""

    def apply_in_place(
        self, running: R, previous: bytes, config: str, services: Sequence[Service]
    ) -> str | None:
        """Change the running proxy from ``previous`` (the confirmed file) to ``config``
        without a reload, if it can (e.g. through a runtime API), and return the result word
        (``"runtime"``); the file is then written and confirmed, without a flush to disk (the
        proxy runs it already; after a power loss neither runs). ``None`` (the default): not
        possible, reload. Called with the lock held."""
        return None

    def changes_in_place(self, previous: bytes, config: str) -> bool:
        """Whether :meth:`apply_in_place` could take the running proxy from ``previous`` (the
        confirmed file) to ``config`` (for :meth:`plan`; it changes nothing). Default: no."""
        return False

    def applied(self, result: str, services: Sequence[Service]) -> None:
        """Called after every successful apply, ``"unchanged"`` included, lock held."""

    def prepare(self) -> None:
        """Create the folders the proxy needs (default: the private folder with ``dir_mode``,
        or the file's own folder). Called before each validate and apply."""
        if self.private_dir is not None:
            ensure_directory(self.private_dir, self.dir_mode)
        elif not self.config_file.parent.is_dir():  # a stat: called before every apply
            self.config_file.parent.mkdir(parents=True, exist_ok=True, mode=0o755)

    # -- the skeleton -------------------------------------------------------------------------

    def plan(self, config: str) -> str:
        """What :meth:`apply` would do now: ``"start"`` when no proxy runs, ``"unchanged"``
        when the confirmed file is ``config``, ``"runtime"`` when :meth:`changes_in_place`
        says so, else ``"reload"``. Reads files and asks :meth:`find_running`; writes
        nothing the running proxy uses."""
        running = self.find_running()
        if running is None:
            return "start"
        confirmed = self.confirmed_config() if self.serves_file(running) else None
        if confirmed is None:
            return "reload"
        if confirmed == config.encode("utf-8"):
            return "unchanged"
        return "runtime" if self.changes_in_place(confirmed, config) else "reload"

    def apply(self, config: str, services: Sequence[Service]) -> str:
        began = time.monotonic()
        try:
            try:
                result = self._apply(config, services)
            except OSError as exc:  # a full disk, a state dir removed under us, ...
                raise PluginError(f"{self.name}: cannot apply the configuration: {exc}") from None
        except Exception as exc:
            self._record("failed", began, str(exc) or type(exc).__name__)
            raise
        self._record(result, began)
        return result

    def _apply(self, config: str, services: Sequence[Service]) -> str:
        data = config.encode("utf-8")
        self.prepare()
        with self.locked():
            running = self.find_running()
            try:
                previous = read_bytes(self.config_file)
            except OSError:
                previous = None  # unreadable (a folder in its place, ...): replace it
            confirmed = (
                running is not None
                and previous is not None
                and self.serves_file(running)
                and self.is_confirmed(previous)
            )
            if confirmed and previous == data:
                self.applied("unchanged", services)
                return "unchanged"
            if self.log is not None:
                self.log.trim()
            if confirmed and running is not None and previous is not None:
                word = self.apply_in_place(running, previous, config, services)
                if word is not None:
                    self._write(data, durable=False)
                    self._confirm(data, durable=False)
                    self.applied(word, services)
                    return word
            self._write(data, durable=True)
            began = time.monotonic()
            try:
                if running is None:
                    self.start()
                    result = "started"
                else:
                    self.reload(running, services)
                    result = "reloaded"
            except ProxyRefused:
                self._restore(previous)  # still confirmed: it is what the proxy serves
                raise
            except BaseException:
                self._restore(previous)
                self.forget()
                raise
            finally:
                self.last_reload = ReloadAttempt(began, time.monotonic())
            self._confirm(data, durable=True)
            self.applied(result, services)
            return result

    def _record(self, result: str, began: float, error: str = "") -> None:
        now = time.monotonic()
        self.last_apply = ApplyStatus(result, time.time(), now - began, error)

    def _write(self, data: bytes, *, durable: bool) -> None:
        try:
            write_atomic(self.config_file, data, mode=self.file_mode, durable=durable)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise PluginError(f"{self.name}: cannot write {self.config_file}: {reason}") from None

    def _restore(self, previous: bytes | None) -> None:
        """Put the previous configuration back on disk: the file must be what runs."""
        try:
            if previous is None:
                with contextlib.suppress(FileNotFoundError):
                    self.config_file.unlink()
            else:
                write_atomic(self.config_file, previous, mode=self.file_mode)
        except OSError as exc:
            # The error being raised matters more; the file no longer matches the marker.
            log.error("%s: could not restore the previous %s: %s", self.name, self.config_file, exc)

    def _confirm(self, data: bytes, *, durable: bool) -> None:
        if self.marker_file is not None:
            write_atomic(self.marker_file, self.digest(data).encode(), durable=durable)

    # -- for subclasses (and tests) -----------------------------------------------------------

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Serialise applies on the private folder, across processes too."""
        if self.private_dir is None:
            return contextlib.nullcontext()
        return directory_lock(self.private_dir)

    def digest(self, data: bytes) -> str:
        """The SHA-256 of ``data`` in hex (the last few remembered: files are large)."""
        for known, digest in self._digests:
            if known is data or known == data:
                return digest
        digest = hashlib.sha256(data).hexdigest()
        self._digests = [(data, digest), *self._digests[:1]]
        return digest

    def is_confirmed(self, content: bytes) -> bool:
        """True if ``content`` (of the file on disk) is the configuration last confirmed
        running: its digest is the marker's. Without a private folder, always true."""
        if self.marker_file is None:
            return True
        return read_text(self.marker_file) == self.digest(content)

    def confirmed_config(self) -> bytes | None:
        """The file on disk if it is confirmed running (see :meth:`is_confirmed`), else
        ``None``; reads only files, asks no process. A configuration the proxy itself loaded:
        a candidate equal to it in what the checker judges needs no check."""
        try:
            content = read_bytes(self.config_file)
        except OSError:
            return None
        return content if content is not None and self.is_confirmed(content) else None

    def forget(self) -> None:
        """Remove the marker: what runs is unknown, the next apply starts or reloads."""
        if self.marker_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.marker_file.unlink()

    @contextlib.contextmanager
    def staged(self, config: str, suffix: str) -> Iterator[str]:
        """A short-lived file ``candidate-*<suffix>`` in the private folder holding
        ``config``, removed on exit; yields its path."""
        if self.private_dir is None:
            raise RuntimeError(f"{self.name}: staging a candidate needs a private_dir")
        fd, name = tempfile.mkstemp(prefix="candidate-", suffix=suffix, dir=self.private_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(config)
            yield name
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def check_candidate(
        self,
        config: str,
        argv: Callable[[str], list[str]],
        *,
        suffix: str,
        timeout: float,
        label: str,
    ) -> tuple[subprocess.CompletedProcess[str], str]:
        """Run the proxy's checker (``argv(path)``, e.g. ``haproxy -c -f path``) on ``config``
        staged in the private folder; returns what it printed and the candidate's path (gone
        by then; to shorten it in messages). A checker that hangs is ``Unavailable``; a
        candidate that cannot be written is a ``PluginError`` ("cannot stage")."""
        try:
            self.prepare()
            with self.staged(config, suffix) as name:
                return run_check_command(argv(name), timeout, label), name
        except OSError as exc:
            raise PluginError(
                f"{self.name}: cannot stage the candidate configuration: {exc}"
            ) from None
