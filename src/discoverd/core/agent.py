"""Putting an agent together from settings and plugins, and running it until a signal."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from discoverd.core.checks import CheckSpec
from discoverd.core.config import ConfigError, Settings
from discoverd.core.discover import DiscoverRole
from discoverd.core.interfaces import PluginContext, Proxy, Registry, Source
from discoverd.core.manager import PluginManager
from discoverd.core.register import RegisterRole
from discoverd.core.role import Role

log = logging.getLogger("discoverd")
T = TypeVar("T")

ROLES = ("register", "discover")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def ensure_state_dir(settings: Settings) -> Path:
    """Create the state directory if needed, and refuse one that others could tamper with
    (the proxy runs what is written there, often as root)."""
    path = settings.state_dir
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o755 if os.geteuid() == 0 else 0o700)
        info = path.stat()
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
                **timing,
            )
        if "discover" in self.roles:
            self.discover = DiscoverRole(
                make_registry(self.manager, self.settings),
                make_proxy(self.manager, self.settings),
                proxy_name=core.proxy,
                manager=self.manager,
                default_mode=core.default_mode,
                resync_interval=core.resync_interval,
                min_wait=core.min_wait,
                max_wait=core.max_wait,
                retry_max=core.retry_max,
                removal_hold=core.removal_hold,
                served_file=self.settings.state_dir / "discover" / "served.json",
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
        if self.discover is not None:
            self.discover.shutdown()
        if self.register is not None:
            self.register.shutdown(deregister=True)
        log.info("stopped; the proxy keeps serving its last configuration")

    def run(self) -> int:
        """Build (unless done), start, wait for SIGTERM/SIGINT, shut down; returns 0."""
        if self.register is None and self.discover is None:
            self.build()
        previous: dict[signal.Signals, Any] = {}

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            self.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        try:
            self.start()
            while not self.stop_requested.wait(1.0):
                pass
        finally:
            self.shutdown()
            for signum, old in previous.items():
                signal.signal(signum, old)
        return 0
