"""Loading plugins, and a typed facade over pluggy's hook relay.

Nothing is loaded at import time: ``get_plugin_manager()`` builds a fresh manager. Built-in plugins
are found through the ``discoverd`` entry-point group exactly like third-party ones.

A third-party plugin that fails (its module raises on import, a hook has a bad signature or an
unknown name, a registration hook raises or returns something else than records) does not break
discoverd: it is recorded in ``PluginManager.broken`` and logged as one warning line. Only a
command that *selects* it fails, with :class:`BrokenPluginError` carrying the cause.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal, TypeVar

import pluggy

from discoverd.core import hookspecs
from discoverd.core.errors import BrokenPluginError, PluginLoadError, UnknownPluginError
from discoverd.core.interfaces import ProxyPlugin, RegistryPlugin, SourcePlugin
from discoverd.core.model import Service
from discoverd.core.schema import OptionInfo

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "discoverd"
DISABLE_ENV = "DISCOVERD_DISABLE_PLUGINS"

R = TypeVar("R", SourcePlugin, RegistryPlugin, ProxyPlugin)
Kind = Literal["source", "registry", "proxy"]
KINDS: tuple[Kind, ...] = ("source", "registry", "proxy")


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass
class PluginInfo:
    """One loaded plugin (an entry point, or an object given to ``get_plugin_manager``)."""

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
            "error": None,
        }


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point that failed: a warning unless the user selects what it provides.

    ``stage`` is ``"import"`` when importing its module raised, ``"load"`` when the module
    imported but its hooks could not be registered or called."""

    name: str
    distribution: str
    error: str
    version: str = ""
    stage: Literal["import", "load"] = "import"

    @property
    def origin(self) -> str:
        """``from distribution NAME VERSION``, for messages."""
        if not self.distribution:
            return "not from an installed distribution"
        return f"from distribution {self.distribution} {self.version}".rstrip()

    def warning(self) -> str:
        """The one-line warning shown by every command that does not select this plugin."""
        return (
            f"plugin entry point {self.name!r} ({self.origin}) failed to {self.stage} "
            f"and is ignored: {self.error}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "hooks": [],
            "sources": [],
            "registries": [],
            "proxies": [],
            "error": f"failed to {self.stage}: {self.error}",
        }


@dataclass(frozen=True)
class Component:
    """One record a plugin registered: a source, registry or proxy the user can select, with
    the options of its config-file section."""

    kind: Kind
    name: str
    description: str
    plugin: str
    distribution: str
    version: str
    options: tuple[OptionInfo, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "description": self.description,
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "options": [o.as_dict() for o in self.options],
        }


# -- warnings about broken plugins ---------------------------------------------------------------
# A command line collects them while it resolves its selection, and reports only those it did not
# select (a selected one fails the command instead). Outside such a block, they are logged at once,
# each one once per process (``--help`` builds several managers).
_DEFERRED: ContextVar[list[BrokenPlugin] | None] = ContextVar(
    "discoverd_deferred_plugin_warnings", default=None
)
_WARNED: set[tuple[str, str, str]] = set()


def _log_broken(broken: BrokenPlugin) -> None:
    key = (broken.name, broken.distribution, broken.error)
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s", broken.warning())


def _report_broken(broken: BrokenPlugin) -> None:
    pending = _DEFERRED.get()
    if pending is not None:
        pending.append(broken)
    else:
        _log_broken(broken)


@contextmanager
def deferred_plugin_warnings(
    report: Callable[[BrokenPlugin], None] | None = None,
) -> Iterator[None]:
    """Hold back the warnings of managers built inside the block; on exit, ``report`` (default:
    log) each broken plugin once, except one that the block failed to select with
    :class:`BrokenPluginError` (its error says it all)."""
    pending: list[BrokenPlugin] = []
    token = _DEFERRED.set(pending)
    selected: set[str] = set()
    try:
        yield
    except BrokenPluginError as exc:
        selected.add(exc.plugin.name)
        raise
    finally:
        _DEFERRED.reset(token)
        seen: set[tuple[str, str, str]] = set()
        for broken in pending:
            key = (broken.name, broken.distribution, broken.error)
            if broken.name in selected or key in seen:
                continue
            seen.add(key)
            (report or _report_broken)(broken)


class PluginManager:
    """Typed access to the loaded plugins; the rest of discoverd never touches ``pm.hook``."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.infos: list[PluginInfo] = []
        self.broken: list[BrokenPlugin] = []
        self._sources: dict[str, SourcePlugin] = {}
        self._registries: dict[str, RegistryPlugin] = {}
        self._proxies: dict[str, ProxyPlugin] = {}
        self._owners: dict[tuple[Kind, str], str] = {}

    # -- loading ---------------------------------------------------------------------------
    def add(
        self,
        plugin: object,
        name: str,
        distribution: str = "",
        version: str = "",
        *,
        strict: bool = True,
    ) -> None:
        """Register a plugin object (module or instance).

        pluggy refuses a hook with a wrong signature. With ``strict=False`` (entry points), a hook
        that no spec declares (a typo) is refused here too, so the plugin can be set aside alone;
        with ``strict=True`` it is left for ``collect`` to reject (``check_pending``)."""
        self.pm.register(plugin, name=name)
        callers = self.pm.get_hookcallers(plugin) or []
        if not strict:
            unknown = sorted(
                caller.name
                for caller in callers
                if not caller.has_spec()
                and any(i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls())
            )
            if unknown:
                self.pm.unregister(plugin)
                raise pluggy.PluginValidationError(
                    plugin, f"unknown hook {', '.join(unknown)} (no such discoverd hook)"
                )
        info = PluginInfo(name=name, distribution=distribution, version=version)
        info.hooks = sorted(c.name for c in callers if c.name.startswith("discoverd_"))
        self.infos.append(info)

    def set_aside(self, broken: BrokenPlugin) -> None:
        """Record a plugin that failed, and warn about it (see ``deferred_plugin_warnings``)."""
        self.broken.append(broken)
        _report_broken(broken)

    def collect(self) -> None:
        """Call the registration hooks once and index the records; duplicates fail loudly.

        A plugin whose registration hook raises, or returns something else than records of the
        right type, is set aside as broken (with everything it registered)."""
        self.pm.check_pending()
        by_plugin = {id(p): n for n, p in self.pm.list_name_plugin()}
        hooks: tuple[tuple[Kind, Any, type], ...] = (
            ("source", self.pm.hook.discoverd_register_sources, SourcePlugin),
            ("registry", self.pm.hook.discoverd_register_registries, RegistryPlugin),
            ("proxy", self.pm.hook.discoverd_register_proxies, ProxyPlugin),
        )
        found: list[tuple[str, Kind, Any]] = []
        failed: dict[str, str] = {}
        for kind, hook, record_type in hooks:
            for impl in hook.get_hookimpls():
                owner = by_plugin.get(id(impl.plugin), impl.plugin_name)
                try:
                    records = list(impl.function() or ())
                except Exception as exc:  # a third-party hook must not break the others
                    failed.setdefault(owner, f"{hook.name} raised {_describe(exc)}")
                    continue
                wrong = [r for r in records if not isinstance(r, record_type)]
                if wrong:
                    failed.setdefault(
                        owner,
                        f"{hook.name} returned {type(wrong[0]).__name__}, "
                        f"not {record_type.__name__}",
                    )
                    continue
                found.extend((owner, kind, record) for record in records)
        for owner, error in failed.items():
            info = next((i for i in self.infos if i.name == owner), None)
            self.pm.unregister(name=owner)
            if info is not None:
                self.infos.remove(info)
            self.set_aside(
                BrokenPlugin(
                    owner,
                    info.distribution if info else "",
                    error,
                    info.version if info else "",
                    stage="load",
                )
            )
        info_by_name = {i.name: i for i in self.infos}
        tables: dict[Kind, dict[str, Any]] = {
            "source": self._sources,
            "registry": self._registries,
            "proxy": self._proxies,
        }
        lists = {"source": "sources", "registry": "registries", "proxy": "proxies"}
        providers: dict[tuple[Kind, str], list[str]] = {}
        for owner, kind, record in found:
            if owner in failed:
                continue
            providers.setdefault((kind, record.name), []).append(owner)
            tables[kind][record.name] = record
            self._owners[(kind, record.name)] = owner
            if owner in info_by_name:
                getattr(info_by_name[owner], lists[kind]).append(record.name)
        clashes = sorted((k, p) for k, p in providers.items() if len(p) > 1)
        if clashes:
            (kind, name), owners = clashes[0]
            raise PluginLoadError(
                f"{kind} name {name!r} is provided by several plugins: {', '.join(owners)}. "
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

    def components(self) -> list[Component]:
        """Every selectable record, by kind (source, registry, proxy) then name."""
        by_name = {i.name: i for i in self.infos}
        rows: list[Component] = []
        tables: tuple[tuple[Kind, dict[str, Any]], ...] = (
            ("source", self._sources),
            ("registry", self._registries),
            ("proxy", self._proxies),
        )
        for kind, table in tables:
            for name, record in sorted(table.items()):
                owner = self._owners.get((kind, name), "")
                info = by_name.get(owner)
                rows.append(
                    Component(
                        kind=kind,
                        name=name,
                        description=record.description,
                        plugin=owner,
                        distribution=info.distribution if info else "",
                        version=info.version if info else "",
                        options=record.options,
                    )
                )
        return rows

    def _lookup(self, kind: Kind, name: str, table: dict[str, R]) -> R:
        if name in table:
            return table[name]
        for broken in self.broken:
            if broken.name == name:  # the entry point is named like what it provides
                raise BrokenPluginError(kind, broken)
        available = ", ".join(sorted(table)) or "none"
        message = f"Unknown {kind} {name!r}. Available: {available}. Is the plugin installed?"
        if self.broken:
            failed = "; ".join(f"{b.name} ({b.origin}: {b.error})" for b in self.broken)
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


def _describe(exc: BaseException) -> str:
    return _one_line(f"{type(exc).__name__}: {exc}")


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
            if pm.has_plugin(ep.name) or any(b.name == ep.name for b in manager.broken):
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
            except Exception as exc:  # any import failure of a third-party package
                manager.set_aside(BrokenPlugin(ep.name, dist, _describe(exc), version))
                continue
            try:
                manager.add(plugin, ep.name, dist, version, strict=False)
            except (pluggy.PluginValidationError, ValueError) as exc:
                if pm.has_plugin(ep.name):  # pluggy keeps what it registered before the error
                    pm.unregister(name=ep.name)
                error = _one_line(str(exc))
                manager.set_aside(BrokenPlugin(ep.name, dist, error, version, stage="load"))
    for name, plugin in extra_plugins:
        manager.add(plugin, name)
    manager.collect()
    return manager
