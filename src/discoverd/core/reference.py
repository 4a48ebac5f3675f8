"""The options reference, derived from the configuration classes (``docs/options.md``).

Regenerate it after changing an option: ``python -m discoverd.core.reference > docs/options.md``
(a test fails while it is out of date).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from discoverd.core.config import CoreConfig
from discoverd.core.schema import options_table

HEADER = """# Every option

Generated from the configuration classes of the core and of the installed plugins
(`python -m discoverd.core.reference > docs/options.md`); a test keeps it current. Core keys
go at the top level of the config file, a plugin's keys in its own `[section]`. Precedence:
`--set SECTION.KEY=VALUE` and flags, then the variables (the `DISCOVERD_*` one first), then the
file, then the default. See [configuration.md](configuration.md) for how values are read and
checked.
"""


def options_reference(schemas: Mapping[str, type[Any]]) -> str:
    """The Markdown reference: the core's options, then each plugin's, by name."""
    parts = [HEADER, "## Core (top level)\n", options_table(CoreConfig)]
    for name in sorted(schemas):
        table = options_table(schemas[name], name)
        if table.count("\n") > 2:  # a plugin with options
            parts += [f"\n## `[{name}]`\n", table]
    return "\n".join(parts)


def builtin_schemas() -> dict[str, type[Any]]:
    """The configuration classes of the plugins that ship with discoverd (not of third-party
    plugins that happen to be installed)."""
    from discoverd.core.manager import get_plugin_manager

    manager = get_plugin_manager()
    builtin = {c.name for c in manager.components() if c.distribution == "discoverd"}
    schemas: dict[str, type[Any]] = {}
    for table in (manager.sources(), manager.registries(), manager.proxies()):
        schemas.update({name: record.config for name, record in table.items() if name in builtin})
    return schemas


def main() -> None:
    print(options_reference(builtin_schemas()), end="")


if __name__ == "__main__":
    main()
