"""Template loading for proxy plugins: user overrides first, shipped templates second.

A user template directory may hold a file of the same name as a shipped template to replace it, or
extend the shipped one and replace a single block::

    {% extends "default:haproxy.cfg.j2" %}
    {% block defaults_extra %}timeout tunnel 1h{% endblock %}
"""

from __future__ import annotations

from pathlib import Path

import jinja2


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
