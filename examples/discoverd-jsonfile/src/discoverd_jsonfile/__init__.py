"""The ``json-file`` proxy: writes the service map as a JSON file for other tools.

Select it with ``discoverd discover --proxy json-file``; every time the set of services or their
instances changes, ``<state_dir>/services.json`` (or the ``path`` option) is replaced atomically.
A plugin module only imports ``discoverd``'s public API and announces what it provides through a
``discoverd_register_*`` hook; the behaviour lives in
:class:`~discoverd_jsonfile.proxy.JsonFileProxy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from discoverd import PluginContext, Proxy, ProxyPlugin, hookimpl, option

__version__ = "0.1.0"

NAME = "json-file"
MAX_INDENT = 8


def _names_a_file(value: str) -> str:
    text = value.strip()
    if text and Path(text).expanduser().name in ("", ".", ".."):
        raise ValueError("must name a file")
    return text


@dataclass(frozen=True)
class JsonFileConfig:
    """The ``[json-file]`` section: each field is one option, checked by discoverd."""

    path: str = option(
        "",
        "File to write; relative paths are relative to the state directory "
        "(default: services.json there).",
        check=_names_a_file,
    )
    indent: int = option(
        2,
        f"Spaces of indentation, 0 for one compact line (0-{MAX_INDENT}).",
        min=0,
        max=MAX_INDENT,
    )


def make_proxy(ctx: PluginContext[JsonFileConfig]) -> Proxy:
    """The factory discoverd calls with this plugin's checked configuration. It builds the proxy
    but creates nothing yet (``discoverd render`` must change nothing)."""
    from discoverd_jsonfile.proxy import JsonFileProxy

    path = Path(ctx.config.path or "services.json").expanduser()
    return JsonFileProxy(ctx.state_dir / path, indent=ctx.config.indent)  # absolute wins


@hookimpl
def discoverd_register_proxies() -> list[ProxyPlugin]:
    return [
        ProxyPlugin(
            name=NAME,
            factory=make_proxy,
            description="Writes the service map (services, frontend ports, instances, meta) "
            "as a JSON file for other tools; carries no traffic.",
            config=JsonFileConfig,
        )
    ]
