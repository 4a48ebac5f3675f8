"""The ``json-file`` proxy: writes the service map as a JSON file for other tools.

Select it with ``discoverd discover --proxy json-file``; every time the set of services or their
instances changes, ``<state_dir>/services.json`` (or the ``path`` option) is replaced atomically.
A plugin module only imports ``discoverd``'s public API and announces what it provides through a
``discoverd_register_*`` hook; the behaviour lives in
:class:`~discoverd_jsonfile.proxy.JsonFileProxy`.
"""

from __future__ import annotations

from pathlib import Path

from discoverd import Option, PluginContext, PluginError, Proxy, ProxyPlugin, hookimpl

__version__ = "0.1.0"

NAME = "json-file"
MAX_INDENT = 8

OPTIONS = (
    Option(
        "path",
        str,
        "",
        "File to write; relative paths are relative to the state directory "
        "(default: services.json there).",
    ),
    Option("indent", int, 2, f"Spaces of indentation, 0 for one compact line (0-{MAX_INDENT})."),
)


def make_proxy(ctx: PluginContext) -> Proxy:
    """The factory discoverd calls with this plugin's validated options. It checks the values
    and builds the proxy, but creates nothing yet (``discoverd render`` must change nothing)."""
    from discoverd_jsonfile.proxy import JsonFileProxy

    indent = ctx.options["indent"]
    if not 0 <= indent <= MAX_INDENT:
        raise PluginError(f"{NAME}.indent must be between 0 and {MAX_INDENT}, not {indent}")
    raw = ctx.options["path"].strip()
    path = Path(raw).expanduser() if raw else Path("services.json")
    if not path.is_absolute():
        path = ctx.state_dir / path
    if path.name in ("", ".", ".."):
        raise PluginError(f"{NAME}.path must name a file, not {raw!r}")
    return JsonFileProxy(path, indent=indent)


@hookimpl
def discoverd_register_proxies() -> list[ProxyPlugin]:
    return [
        ProxyPlugin(
            name=NAME,
            factory=make_proxy,
            description="Writes the service map (services, frontend ports, instances, meta) "
            "as a JSON file for other tools; carries no traffic.",
            options=OPTIONS,
        )
    ]
