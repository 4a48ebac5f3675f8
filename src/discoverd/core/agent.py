"""Putting an agent together from settings and plugins, and running it until a signal."""

from __future__ import annotations

import gc
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from discoverd.core import systemd
from discoverd.core.checks import CheckSpec
from discoverd.core.config import ConfigError, Settings
from discoverd.core.discover import DiscoverRole
from discoverd.core.errors import PluginError
from discoverd.core.interfaces import PluginContext, Proxy, Registry, Source
from discoverd.core.logs import configure_logging as configure_logging
from discoverd.core.manager import PluginManager
from discoverd.core.register import RegisterRole
from discoverd.core.role import Role

log = logging.getLogger("discoverd")
T = TypeVar("T")

ROLES = ("register", "discover")


#: Mode of the state directory, and of the parents discoverd creates for it, as root: the
#: proxies' unprivileged workers (nginx's) must pass through it to their temp folders, but
#: nobody else may list it. Otherwise 0700.
ROOT_STATE_DIR_MODE = 0o711
USER_STATE_DIR_MODE = 0o700


def state_dir_mode() -> int:
    """The mode discoverd creates the state directory (and its missing parents) with."""
    return ROOT_STATE_DIR_MODE if os.geteuid() == 0 else USER_STATE_DIR_MODE


def ensure_state_dir(settings: Settings) -> Path:
    """Create the state directory if needed, and refuse one that others could tamper with
    (the proxy runs what is written there, often as root).

    Missing directories of the path are created with :data:`ROOT_STATE_DIR_MODE` (as root) or
    0700, whatever the umask. A path that is, or goes through, a symbolic link is refused: the
    directory checked must be the directory used."""
    path = Path(os.path.abspath(settings.state_dir))
    try:
        _make_dirs(path, state_dir_mode())
        info = path.lstat()
    except OSError as exc:
        raise ConfigError(f"state_dir {path}: cannot be created ({exc.strerror})") from None
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"state_dir {path}: owned by uid {info.st_uid}, not by this user "
            f"(uid {os.geteuid()}); use a directory of your own"
        )
    if info.st_mode & 0o022:
        raise ConfigError(
            f"state_dir {path}: writable by group or others (mode {info.st_mode & 0o777:o}); "
            f"run: chmod go-w {path}"
        )
    if not os.access(path, os.W_OK):
        raise ConfigError(f"state_dir {path}: not writable by this user")
    return path


def _make_dirs(path: Path, mode: int) -> None:
    """Create ``path`` and its missing parents with ``mode`` exactly (the umask can neither
    widen nor narrow it); ``ConfigError`` when a component is a symbolic link or not a
    directory."""
    current = Path(path.anchor)
    for part in path.parts[1:]:
        current = current / part
        try:
            info = current.lstat()
        except FileNotFoundError:
            try:
                os.mkdir(current, mode)
            except FileExistsError:
                pass  # created meanwhile: examined below like any existing directory
            else:
                fd = os.open(current, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
            info = current.lstat()
        if stat.S_ISLNK(info.st_mode):
            raise ConfigError(
                f"state_dir {path}: {current} is a symbolic link (to {os.readlink(current)}); "
                f"symbolic links are refused: use the real path, {path.resolve()}"
            )
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"state_dir {path}: {current} is not a directory")


def settle_gc() -> None:
    """Tune the cyclic garbage collector for a long-running agent, once its modules are
    imported and its settings read (before its roles are built: a reload replaces those, and
    frozen objects are never examined for cycles again): what exists then is frozen out of
    every later collection, and collections come every 10,000 allocations instead of 700. A
    first pass over a large registry allocates hundreds of thousands of objects and no cycles;
    with the defaults, full collections of the growing heap cost it 60-100 ms of CPU (1,000
    services x 10 instances). Garbage without cycles is freed at once as always."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def local_direct(setting: str, proxy: Proxy) -> bool:
    """Whether the discover role serves this host's own instances at their container address:
    the core option ``local_direct`` (``true`` / ``false``), or with ``auto`` what the proxy
    plugin prefers (:meth:`Proxy.prefers_container_addresses`)."""
    if setting == "auto":
        return proxy.prefers_container_addresses()
    return setting == "true"


def context_for(settings: Settings, plugin: str, *, create: bool = True) -> PluginContext[Any]:
    """The factory's context. ``create=False`` (``render``, ``services``, ``check``) leaves the
    state directory alone: those commands change nothing."""
    return PluginContext(
        config=settings.config_for(plugin),
        host=settings.host(),
        state_dir=ensure_state_dir(settings) if create else settings.state_dir,
        core=settings.core,
    )


def _build(
    factory: Callable[[PluginContext[Any]], T], settings: Settings, name: str, create: bool
) -> T:
    return factory(context_for(settings, name, create=create))


def make_source(manager: PluginManager, settings: Settings, *, create: bool = True) -> Source:
    name = settings.core.source
    return _build(manager.source(name).factory, settings, name, create)


def make_registry(manager: PluginManager, settings: Settings, *, create: bool = True) -> Registry:
    name = settings.core.registry
    return _build(manager.registry(name).factory, settings, name, create)


def make_proxy(manager: PluginManager, settings: Settings, *, create: bool = True) -> Proxy:
    name = settings.core.proxy
    return _build(manager.proxy(name).factory, settings, name, create)


def plugin_schemas(manager: PluginManager) -> dict[str, type[Any]]:
    """Every plugin's configuration class, keyed by the plugin name (its config section)."""
    schemas: dict[str, type[Any]] = {}
    for table in (manager.sources(), manager.registries(), manager.proxies()):
        for name, record in table.items():
            schemas[name] = record.config
    return schemas


@dataclass
class Agent:
    """The roles of one process; ``run`` blocks until SIGTERM/SIGINT or ``request_stop``."""

    settings: Settings
    manager: PluginManager
    roles: tuple[str, ...] = ROLES
    register: RegisterRole | None = None
    discover: DiscoverRole | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)
    #: Reads the settings again (flags, variables, the file) for a reload on SIGHUP; ``None``:
    #: SIGHUP is logged and ignored.
    reload_settings: Callable[[], Settings] | None = None
    reload_requested: threading.Event = field(default_factory=threading.Event)
    endpoint: Any = None

    def build(self) -> None:
        core = self.settings.core
        timing = {
            "min_wait": core.min_wait,
            "max_wait": core.max_wait,
            "retry_max": core.retry_max,
        }
        # Resolve every selected name first so a typo fails before anything starts.
        if "register" in self.roles:
            self.manager.source(core.source)
        self.manager.registry(core.registry)
        if "discover" in self.roles:
            self.manager.proxy(core.proxy)
        if "register" in self.roles:
            self.register = RegisterRole(
                make_source(self.manager, self.settings),
                make_registry(self.manager, self.settings),
                resync_interval=core.resync_interval,
                checks=CheckSpec(
                    kind=core.check,
                    path=core.check_path,
                    interval=core.check_interval,
                    timeout=core.check_timeout,
                ),
                detect_modes=core.default_mode == "auto",
                modes_file=self.settings.state_dir / "register" / "modes.json",
                **timing,
            )
        if "discover" in self.roles:
            proxy = make_proxy(self.manager, self.settings)
            proxy.preflight()  # what can never work fails the start, not every pass
            self.discover = DiscoverRole(
                make_registry(self.manager, self.settings),
                proxy,
                proxy_name=core.proxy,
                manager=self.manager,
                default_mode=core.default_mode,
                resync_interval=core.resync_interval,
                min_wait=core.min_wait,
                max_wait=core.max_wait,
                retry_max=core.retry_max,
                removal_hold=core.removal_hold,
                served_file=self.settings.state_dir / "discover" / "served.json",
                own_host_id=self.settings.host().id,
                single_machine=core.single_machine,
                local_direct=local_direct(core.local_direct, proxy),
            )

    def active(self) -> Iterable[Role]:
        return [r for r in (self.register, self.discover) if r is not None]

    def start(self) -> None:
        host = self.settings.host()
        log.info(
            "starting %s (source %s, registry %s, proxy %s, host %s, HOST_IP %s)",
            "+".join(self.roles),
            self.settings.core.source,
            self.settings.core.registry,
            self.settings.core.proxy,
            host.id,
            host.ip or "unset: each port binding's own address",
        )
        for role in self.active():
            role.start()

    def request_stop(self, *_: object) -> None:
        self.stop_requested.set()

    def shutdown(self) -> None:
        """Stop the loops and deregister this host's instances; the proxy keeps running.

        The discover role stops first: it must not see this host's own deregistration and
        leave the proxy serving a configuration without this host's instances."""
        systemd.notify("STOPPING=1")
        serving = self.discover is not None
        self._stop_roles(deregister=True)
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        log.info(
            "stopped; the proxy keeps serving its last configuration" if serving else "stopped"
        )

    def _stop_roles(self, *, deregister: bool) -> None:
        if self.discover is not None:
            self.discover.shutdown()
        if self.register is not None:
            self.register.shutdown(deregister=deregister)

    # -- the endpoint ---------------------------------------------------------------------

    def start_endpoint(self) -> None:
        """Start the HTTP endpoint on ``listen`` (when set). A port another process holds is
        logged, not fatal: the agent's work matters more than its reports."""
        address = self.settings.core.listen
        if not address:
            return
        from discoverd.core.endpoint import Endpoint

        host, _, port = address.rpartition(":")
        try:
            self.endpoint = Endpoint(self.active, host.strip("[]"), int(port))
        except OSError as exc:
            log.error(
                "cannot listen on %s (%s): no /healthz or /metrics; set listen to another "
                "address, or to empty to turn the endpoint off",
                address,
                exc.strerror or exc,
            )
            return
        self.endpoint.start()
        log.info("endpoint on http://%s/ (healthz/live, healthz/ready, metrics)", address)

    # -- running until a signal -----------------------------------------------------------

    def run(self) -> int:
        """Build (unless done), start, serve until SIGTERM/SIGINT (SIGHUP: reload the
        configuration), shut down; returns 0."""
        if self.register is None and self.discover is None:
            self.build()
        previous: dict[signal.Signals, Any] = {}

        def stop(signum: int, frame: FrameType | None) -> None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            self.request_stop()

        def reload(signum: int, frame: FrameType | None) -> None:
            log.info("received SIGHUP; reloading the configuration")
            self.reload_requested.set()

        for sig, handler in (
            (signal.SIGTERM, stop),
            (signal.SIGINT, stop),
            (signal.SIGHUP, reload),
        ):
            previous[sig] = signal.signal(sig, handler)
        watchdog = systemd.watchdog_interval()
        first_passes = False
        try:
            # The roles first: the endpoint's imports then overlap the first registry reads.
            self.start()
            self.start_endpoint()
            # Started: systemd's READY means the loops run (an agent that cannot reach the
            # registry at boot must not be restarted for it); readiness is /healthz/ready's.
            systemd.notify("READY=1", "STATUS=started; first passes under way")
            beat = time.monotonic()
            while not self.stop_requested.wait(0.2):
                if self.reload_requested.is_set():
                    self.reload()
                if not first_passes and self._first_passes_done():
                    first_passes = True
                    systemd.notify(f"STATUS={self._status_line()}")
                now = time.monotonic()
                if watchdog is not None and now - beat >= watchdog:
                    beat = now
                    if all(role.alive() for role in self.active()):
                        systemd.notify("WATCHDOG=1")
        finally:
            self.shutdown()
            for signum, old in previous.items():
                signal.signal(signum, old)
        return 0

    def _first_passes_done(self) -> bool:
        register_done = self.register is None or self.register.synced.is_set()
        discover_done = self.discover is None or self.discover.converged.is_set()
        return register_done and discover_done

    def _status_line(self) -> str:
        parts = []
        if self.register is not None:
            parts.append(f"{len(self.register.registered)} instances registered")
        if self.discover is not None:
            services = self.discover.services or ()
            parts.append(f"{len(services)} services served")
        return ", ".join(parts) or "running"

    def reload(self) -> bool:
        """Read the configuration again (SIGHUP). A bad one is logged and the running settings
        stay; a good one that differs replaces the roles, without deregistering anything (the
        new register role writes the same instances again, the proxy keeps serving)."""
        self.reload_requested.clear()
        if self.reload_settings is None:
            log.warning("reload: this agent was not started from a command line; ignored")
            return False
        systemd.notify("RELOADING=1")
        try:
            try:
                settings = self.reload_settings()
                candidate = Agent(settings, self.manager, roles=self.roles)
                candidate.build()
            except (ConfigError, PluginError) as exc:
                log.error("reload: %s; the running configuration stays", exc)
                return False
            if _same(settings, self.settings):
                log.info("reload: the configuration did not change")
                candidate._stop_roles(deregister=False)
                return False
            log.info("reload: applying the new configuration")
            configure_logging(settings.core.log_level, settings.core.log_format)
            self._stop_roles(deregister=False)
            listen_changed = settings.core.listen != self.settings.core.listen
            self.settings, self.register, self.discover = (
                settings,
                candidate.register,
                candidate.discover,
            )
            if listen_changed:
                if self.endpoint is not None:
                    self.endpoint.close()
                    self.endpoint = None
                self.start_endpoint()
            self.start()
            return True
        finally:
            systemd.notify("READY=1", f"STATUS={self._status_line()}")


def _same(a: Settings, b: Settings) -> bool:
    return (a.core, a.values, a.source_file) == (b.core, b.values, b.source_file)
