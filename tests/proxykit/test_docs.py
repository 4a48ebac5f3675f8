"""docs/proxykit.md stays honest: every public name of ``discoverd.proxykit``, and every public
method of its classes, has an entry (a heading or a list item starting with its name)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from discoverd import proxykit

DOC = Path(__file__).resolve().parents[2] / "docs" / "proxykit.md"


def documented() -> set[str]:
    """The names that start a heading's or a list item's first code span."""
    names: set[str] = set()
    fenced = False
    for line in DOC.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"(?:#+|[-*])\s+`([A-Za-z_][A-Za-z0-9_]*)", stripped)
        if match:
            names.add(match.group(1))
    return names


def methods(cls: type) -> list[str]:
    return [
        name
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and member.__qualname__.split(".")[0] == cls.__name__
    ]


@pytest.mark.parametrize("name", proxykit.__all__)
def test_every_public_name_is_documented(name: str) -> None:
    assert name in documented(), f"docs/proxykit.md has no entry for {name}"


@pytest.mark.parametrize(
    "name",
    [
        f"{cls.__name__}.{method}"
        for cls in (proxykit.ManagedProxy, proxykit.PidFile, proxykit.LogFile)
        for method in methods(cls)
    ],
)
def test_every_method_of_the_toolkit_classes_is_documented(name: str) -> None:
    method = name.split(".")[1]
    text = DOC.read_text()
    assert f"`{method}(" in text, f"docs/proxykit.md does not describe {name}"
