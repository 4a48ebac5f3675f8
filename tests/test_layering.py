"""The architecture's import rules, checked on the source (like an import-linter contract).

- The core knows no plugin, no proxy toolkit, no test kit, no command line.
- A plugin imports only the public API (``discoverd``, ``discoverd.proxykit``) and its own
  package: never the core's modules, another plugin, the test kit or the command line.
- The proxy toolkit is built on the public API only, and knows no plugin.
- The example third-party plugin imports only the public API.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "discoverd"
PUBLIC = ("discoverd", "discoverd.proxykit")


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, base: Path) -> Iterator[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, relative imports resolved."""
    here = module_name(path, base)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                target = ".".join([*parent, node.module] if node.module else parent)
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:  # "from discoverd import plugins" imports a module too
                yield node.lineno, f"{target}.{alias.name}"


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def allowed(target: str, public: tuple[str, ...], own: str) -> bool:
    """Whether a module of ``own`` may import ``target``."""
    if not under(target, "discoverd") or under(target, own) or target == "discoverd":
        return True
    name = target.partition(".")[2]
    if "." not in name and name not in SUBMODULES:
        return "discoverd" in public  # "from discoverd import X": an attribute of the root
    return any(under(target, p) for p in public if p != "discoverd")


def violations(folder: Path, base: Path, public: tuple[str, ...], own: str) -> list[str]:
    return [
        f"{path.relative_to(base)}:{line} imports {target}"
        for path in sources(folder)
        for line, target in imports(path, base)
        if not allowed(target, public, own)
    ]


#: The modules and packages directly inside ``discoverd`` (anything else imported from the
#: root is one of its attributes).
SUBMODULES = {
    p.stem if p.suffix == ".py" else p.name
    for p in PACKAGE.iterdir()
    if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()
}


def plugin_folders() -> list[Path]:
    return sorted(p for p in (PACKAGE / "plugins").iterdir() if (p / "__init__.py").exists())


def test_the_core_knows_no_plugin_toolkit_test_kit_or_cli() -> None:
    bad = []
    for path in sources(PACKAGE / "core"):
        for line, target in imports(path, PACKAGE.parent):
            forbidden = ("discoverd.plugins", "discoverd.proxykit", "discoverd.testing")
            if any(under(target, f) for f in forbidden) or target == "discoverd.cli":
                bad.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert bad == []


@pytest.mark.parametrize("folder", plugin_folders(), ids=lambda p: p.name)
def test_a_plugin_imports_only_the_public_api_and_itself(folder: Path) -> None:
    own = f"discoverd.plugins.{folder.name}"
    assert violations(folder, PACKAGE.parent, PUBLIC, own) == []


def test_the_proxy_toolkit_is_built_on_the_public_api_only() -> None:
    folder = PACKAGE / "proxykit"
    if not folder.exists():
        pytest.fail("discoverd.proxykit is missing")
    assert violations(folder, PACKAGE.parent, ("discoverd",), "discoverd.proxykit") == []


def test_the_example_plugin_imports_only_the_public_api() -> None:
    folder = ROOT / "examples" / "discoverd-jsonfile" / "src"
    assert violations(folder, folder, PUBLIC, "discoverd_jsonfile") == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The rules above can fail: a plugin reaching into the core or another plugin is found."""
    plugin = tmp_path / "discoverd" / "plugins" / "bad"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text(
        "from discoverd import hookimpl\n"
        "from discoverd.core.model import Service\n"
        "from discoverd.plugins import etcd\n"
        "import discoverd.plugins.haproxy.render\n"
        "from . import sibling\n"
        "from ..nginx import render\n"
    )
    found = violations(plugin, tmp_path, PUBLIC, "discoverd.plugins.bad")
    assert [f.split(" imports ")[1] for f in found] == [
        "discoverd.core.model",
        "discoverd.core.model.Service",
        "discoverd.plugins",
        "discoverd.plugins.etcd",
        "discoverd.plugins.haproxy.render",
        "discoverd.plugins.nginx",
        "discoverd.plugins.nginx.render",
    ]
