"""Hook specifications: how a plugin announces what it provides.

A plugin is a module (or object) with functions marked ``@hookimpl``, found through the
``discoverd`` entry-point group. Registration hooks return records; the behaviour lives in the
interfaces of ``discoverd.core.interfaces``. Observer hooks let a plugin react to what the core
does.

Example (a package's ``my_plugin.py``)::

    from discoverd import hookimpl, RegistryPlugin

    @hookimpl
    def discoverd_register_registries():
        return [RegistryPlugin(name="redis", factory=RedisRegistry, description="...")]
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from discoverd.core.interfaces import ProxyPlugin, RegistryPlugin, SourcePlugin
from discoverd.core.model import Service

PROJECT = "discoverd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def discoverd_register_sources() -> Sequence[SourcePlugin]:
    """Called once when the plugin manager is built. Return the container sources this plugin
    provides (an empty list if none). Names must be unique across all plugins."""
    raise NotImplementedError


@hookspec
def discoverd_register_registries() -> Sequence[RegistryPlugin]:
    """Called once when the plugin manager is built. Return the registries this plugin provides."""
    raise NotImplementedError


@hookspec
def discoverd_register_proxies() -> Sequence[ProxyPlugin]:
    """Called once when the plugin manager is built. Return the proxies this plugin provides."""
    raise NotImplementedError


@hookspec
def discoverd_services_changed(services: Sequence[Service]) -> None:
    """Called by the discover role when the proxy serves a set of services that differs from
    the previous one (after the apply, or when the new set renders the same configuration).
    Observers only: the return value is ignored."""


@hookspec
def discoverd_after_apply(proxy: str, config: str, result: str) -> None:
    """Called after the proxy named ``proxy`` took a new configuration; ``result`` is what its
    ``apply`` returned (e.g. "reloaded"). Not called for skipped, unchanged renders."""
