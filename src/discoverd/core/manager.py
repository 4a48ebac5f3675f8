"""Loading plugins, and a typed facade over pluggy's hook relay.

Nothing is loaded at import time: ``get_plugin_manager()`` builds a fresh manager. Built-in plugins
are found through the ``discoverd`` entry-point group exactly like third-party ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, TypeVar

import pluggy

from discoverd.core import hookspecs
from discoverd.core.interfaces import ProxyPlugin, RegistryPlugin, SourcePlugin
from discoverd.core.model import Service

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "discoverd"
DISABLE_ENV = "DISCOVERD_DISABLE_PLUGINS"

R = TypeVar("R", SourcePlugin, RegistryPlugin, ProxyPlugin)


class PluginLoadError(Exception):
    """Plugins could not be put together (duplicate names, a selected plugin that failed)."""


class UnknownPluginError(LookupError):
    """A selected name that no plugin provides. The message is one line for the operator."""


@dataclass
class PluginInfo:
    """One loaded plugin, as ``discoverd plugins`` lists it."""

    name: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    registries: list[str] = field(default_factory=list)
    proxies: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "hooks": self.hooks,
            "sources": self.sources,
            "registries": self.registries,
            "proxies": self.proxies,
        }


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point whose import failed: a warning unless the user selects what it provides."""

    name: str
    distribution: str
    error: str


class PluginManager:
    """Typed access to the loaded plugins; the rest of discoverd never touches ``pm.hook``."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.infos: list[PluginInfo] = []
        self.broken: list[BrokenPlugin] = []
        self._sources: dict[str, SourcePlugin] = {}
        self._registries: dict[str, RegistryPlugin] = {}
        self._proxies: dict[str, ProxyPlugin] = {}

    # -- loading ---------------------------------------------------------------------------
    def add(self, plugin: object, name: str, distribution: str = "", version: str = "") -> None:
        """Register a plugin object (module or instance) and collect its records."""
        self.pm.register(plugin, name=name)
        info = PluginInfo(name=name, distribution=distribution, version=version)
        info.hooks = sorted(
            caller.name
            for caller in self.pm.get_hookcallers(plugin) or []
            if caller.name.startswith("discoverd_")
        )
        self.infos.append(info)

    def collect(self) -> None:
        """Call the registration hooks once and index the records; duplicates fail loudly."""
        self.pm.check_pending()
        by_plugin = {id(p): n for n, p in self.pm.list_name_plugin()}
        info_by_name = {i.name: i for i in self.infos}
        for hook, table, attr in (
            (self.pm.hook.discoverd_register_sources, self._sources, "sources"),
            (self.pm.hook.discoverd_register_registries, self._registries, "registries"),
            (self.pm.hook.discoverd_register_proxies, self._proxies, "proxies"),
        ):
            providers: dict[str, list[str]] = {}
            for impl in hook.get_hookimpls():
                owner = by_plugin.get(id(impl.plugin), impl.plugin_name)
                records: Sequence[Any] = impl.function() or ()  # type: ignore[assignment]
                for record in records:
                    providers.setdefault(record.name, []).append(owner)
                    table[record.name] = record
                    if owner in info_by_name:
                        getattr(info_by_name[owner], attr).append(record.name)
            clashes = {n: p for n, p in providers.items() if len(p) > 1}
            if clashes:
                name, owners = sorted(clashes.items())[0]
                raise PluginLoadError(
                    f"{attr[:-1] if attr != 'registries' else 'registry'} name {name!r} is "
                    f"provided by several plugins: {', '.join(owners)}. "
                    f"Disable one with {DISABLE_ENV}."
                )

    # -- lookup ----------------------------------------------------------------------------
    def sources(self) -> dict[str, SourcePlugin]:
        return dict(sorted(self._sources.items()))

    def registries(self) -> dict[str, RegistryPlugin]:
        return dict(sorted(self._registries.items()))

    def proxies(self) -> dict[str, ProxyPlugin]:
        return dict(sorted(self._proxies.items()))

    def source(self, name: str) -> SourcePlugin:
        return self._lookup("source", name, self._sources)

    def registry(self, name: str) -> RegistryPlugin:
        return self._lookup("registry", name, self._registries)

    def proxy(self, name: str) -> ProxyPlugin:
        return self._lookup("proxy", name, self._proxies)

    def _lookup(self, kind: str, name: str, table: dict[str, R]) -> R:
        if name in table:
            return table[name]
        available = ", ".join(sorted(table)) or "none"
        message = f"Unknown {kind} {name!r}. Available: {available}. Is the plugin installed?"
        if self.broken:
            failed = "; ".join(f"{b.name} ({b.error})" for b in self.broken)
            message += f" Plugins that failed to load: {failed}"
        raise UnknownPluginError(message)

    # -- observer hooks ----------------------------------------------------------------------
    def services_changed(self, services: Sequence[Service]) -> None:
        self._observe(self.pm.hook.discoverd_services_changed, services=services)

    def after_apply(self, proxy: str, config: str, result: str) -> None:
        self._observe(self.pm.hook.discoverd_after_apply, proxy=proxy, config=config, result=result)

    @staticmethod
    def _observe(hook: Any, **kwargs: Any) -> None:
        try:
            hook(**kwargs)
        except Exception:  # an observer must never break the data plane
            log.exception("an observer hook (%s) failed; continuing", hook.name)


def _disabled_from_env() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def get_plugin_manager(
    extra_plugins: Iterable[tuple[str, object]] = (),
    *,
    entry_points: bool = True,
    disabled: Iterable[str] | None = None,
) -> PluginManager:
    """Build a new manager: every ``discoverd`` entry point (minus the disabled ones, from the
    argument or ``DISCOVERD_DISABLE_PLUGINS``), plus ``extra_plugins`` as ``(name, object)``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    manager = PluginManager(pm)
    blocked = set(disabled) if disabled is not None else _disabled_from_env()
    if entry_points:
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else ""
            version = ep.dist.version if ep.dist else ""
            if ep.name in blocked:
                log.info("plugin %s disabled by %s", ep.name, DISABLE_ENV)
                continue
            if pm.has_plugin(ep.name):
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
            except Exception as exc:  # any import failure of a third-party package
                error = f"{type(exc).__name__}: {exc}"
                manager.broken.append(BrokenPlugin(ep.name, dist, error))
                log.warning("plugin %s (%s) failed to load: %s", ep.name, dist or "?", error)
                continue
            manager.add(plugin, ep.name, dist, version)
    for name, plugin in extra_plugins:
        manager.add(plugin, name)
    manager.collect()
    return manager
