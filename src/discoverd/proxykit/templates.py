"""Templates of a proxy plugin: user overrides first, shipped templates second.

A user template directory may hold a file of the same name as a shipped template to replace it, or
extend the shipped one and replace a single block::

    {% extends "default:haproxy.cfg.j2" %}
    {% block defaults_extra %}timeout tunnel 1h{% endblock %}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2

from discoverd import PluginError


def template_environment(package: str, user_dir: str | Path | None = None) -> jinja2.Environment:
    """A strict jinja2 environment for ``package``'s ``templates/`` folder.

    Lookup order: ``user_dir`` (if given), the package's templates, and under the ``default:``
    prefix always the package's own, so an override can extend the shipped template.
    """
    shipped = jinja2.PackageLoader(package, "templates")
    loaders: list[jinja2.BaseLoader] = []
    if user_dir:
        path = Path(user_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"template directory {path} does not exist")
        loaders.append(jinja2.FileSystemLoader(str(path)))
    loaders.append(shipped)
    loaders.append(jinja2.PrefixLoader({"default": shipped}, delimiter=":"))
    return jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # proxy configs, not HTML; every value is validated by the model
    )


def plugin_environment(
    plugin: str,
    package: str,
    user_dir: str | None,
    *,
    finalize: Callable[[Any], Any],
    filters: Mapping[str, Callable[..., Any]],
) -> jinja2.Environment:
    """``template_environment`` for a proxy plugin, with the check every printed value goes
    through (``finalize``) and its filters; a missing ``user_dir`` names the plugin's option."""
    try:
        env = template_environment(package, user_dir or None)
    except FileNotFoundError as exc:
        raise PluginError(f"{plugin} option template_dir: {exc}") from None
    # Set before any template is compiled: finalize is applied at compile time.
    env.finalize = finalize
    env.filters.update(filters)
    return env


def load_template(env: jinja2.Environment, name: str, what: str) -> jinja2.Template:
    """``env.get_template(name)``; a broken template is a one-line ``PluginError`` naming the
    file and line (``what`` names the proxy, e.g. "HAProxy")."""
    try:
        return env.get_template(name)
    except jinja2.TemplateError as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, jinja2.TemplateSyntaxError) else ""
        broken = getattr(exc, "name", None) or name
        raise PluginError(f"{what} template {broken}{where}: {exc.message}") from None
