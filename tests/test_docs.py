"""The plugin-author guide stays honest: every hook and every public method of the three
interfaces has an entry in docs/plugins.md with its exact signature."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from discoverd.core import hookspecs
from discoverd.core.interfaces import Proxy, Registry, Source

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDE = DOCS / "plugins.md"
INTERFACES: tuple[type, ...] = (Source, Registry, Proxy)
#: Other public names a plugin author meets, each needing a heading or a list entry.
REFERENCE_NAMES = (
    "SourcePlugin", "RegistryPlugin", "ProxyPlugin", "option", "PluginContext", "HostInfo",
    "PluginError", "Unavailable", "ProxyConfigError", "ValidationError", "ServiceInstance",
    "Service", "Catalog", "SourceSnapshot", "Problem", "Notify", "ConfigError", "OptionError",
)  # fmt: skip

CODE = re.compile(r"`([^`]+)`")


def hooks() -> dict[str, Callable[..., Any]]:
    """Every hook specification (``discoverd_*`` functions marked ``@hookspec``)."""
    return {
        name: func
        for name, func in vars(hookspecs).items()
        if name.startswith("discoverd_") and hasattr(func, f"{hookspecs.PROJECT}_spec")
    }


def methods(cls: type) -> dict[str, Callable[..., Any]]:
    """Every public method of an interface, abstract or not."""
    return {n: f for n, f in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}


def signature(func: Callable[..., Any]) -> str:
    """``name(arg: type, opt: type = default) -> type``, as the docs must write it."""
    sig = inspect.signature(func)
    parts = []
    for param in sig.parameters.values():
        if param.name == "self":
            continue
        text = param.name
        if param.annotation is not inspect.Parameter.empty:
            text += f": {param.annotation}"
        if param.default is not inspect.Parameter.empty:
            text += f" = {param.default!r}"
        parts.append(text)
    result = sig.return_annotation
    arrow = "" if result is inspect.Signature.empty else f" -> {result}"
    return f"{func.__name__}({', '.join(parts)}){arrow}"


def entries(text: str) -> list[tuple[int, str, list[str]]]:
    """The defining lines of a markdown text: ``(heading level or 0 for a list item, heading
    title, code spans)`` for each heading, and for each list item its *leading* code span."""
    found: list[tuple[int, str, list[str]]] = []
    fenced = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        heading = re.match(r"(#+)\s+(.*)", stripped)
        if heading:
            found.append((len(heading.group(1)), heading.group(2), CODE.findall(stripped)))
        elif item := re.match(r"[-*]\s+`([^`]+)`", stripped):
            found.append((0, "", [item.group(1)]))
    return found


def section(text: str, name: str) -> list[tuple[int, str, list[str]]]:
    """The entries under the heading whose code span is ``name``, up to the next heading of the
    same or a higher level."""
    lines = entries(text)
    for index, (level, _, spans) in enumerate(lines):
        if level and name in spans:
            body = []
            for entry in lines[index + 1 :]:
                if entry[0] and entry[0] <= level:
                    break
                body.append(entry)
            return body
    return []


def defined(entries_: list[tuple[int, str, list[str]]], name: str) -> set[str]:
    """The code spans defining ``name`` (equal to it, or starting with ``name(``)."""
    return {
        span
        for _, _, spans in entries_
        for span in spans
        if span == name or span.startswith(f"{name}(")
    }


def undocumented(text: str) -> list[str]:
    """What ``text`` fails to document: each item names the hook, method or name, and for a
    wrong signature the one expected."""
    missing: list[str] = []
    everything = entries(text)
    for name, func in hooks().items():
        spans = defined(everything, name)
        if signature(func) not in spans:
            missing.append(
                f"hook {name}: `{signature(func)}`" + (" (wrong signature)" * bool(spans))
            )
    for cls in INTERFACES:
        body = section(text, cls.__name__)
        if not body:
            missing.append(f"interface {cls.__name__}: no heading with `{cls.__name__}`")
            continue
        for name, func in methods(cls).items():
            spans = defined(body, name)
            if signature(func) not in spans:
                missing.append(
                    f"{cls.__name__}.{name}: `{signature(func)}`"
                    + (" (wrong signature)" * bool(spans))
                )
    for name in REFERENCE_NAMES:
        if not defined(everything, name):
            missing.append(f"{name}: no heading or list entry")
    return missing


def test_every_hook_and_interface_method_is_documented() -> None:
    missing = undocumented(GUIDE.read_text())
    assert not missing, "docs/plugins.md does not document:\n  " + "\n  ".join(missing)


def test_the_introspection_finds_what_it_must() -> None:
    """Guard the guard: the checker looks at the real hooks and methods, not at nothing."""
    assert {"discoverd_register_sources", "discoverd_register_proxies",
            "discoverd_after_apply"} <= set(hooks())  # fmt: skip
    assert {"render", "validate", "apply", "apply_delay", "reserved_ports", "close"} <= set(
        methods(Proxy)
    )
    assert {"register", "keepalive", "keepalive_interval", "watch"} <= set(methods(Registry))
    assert signature(Registry.close) == "close(deregister: bool = False) -> None"


def drop_lines(text: str, *fragments: str) -> str:
    return "\n".join(line for line in text.splitlines() if not any(f in line for f in fragments))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: drop_lines(t, "### `discoverd_after_apply("), "hook discoverd_after_apply"),
        (lambda t: drop_lines(t, "- `apply_delay("), "Proxy.apply_delay"),
        (lambda t: drop_lines(t, "- `keepalive_interval("), "Registry.keepalive_interval"),
        # documented for Registry but not for Source: each interface needs its own entry
        (lambda t: drop_lines(t, "- `close() -> None`: release connections; must unblock"),
         "Source.close"),
        (lambda t: t.replace("- `watch(notify: Notify, stop: threading.Event, since: int)",
                             "- `watch(notify: Notify, stop: threading.Event)"),
         "Registry.watch: `watch(notify: Notify, stop: threading.Event, since: int) -> None` "
         "(wrong signature)"),
        (lambda t: t.replace("### `Proxy`", "### Proxies"), "interface Proxy"),
        (lambda t: drop_lines(t, "### `HostInfo`"), "HostInfo"),
    ],
)  # fmt: skip
def test_the_checker_fails_when_something_is_missing(change: Any, expected: str) -> None:
    text = GUIDE.read_text()
    changed = change(text)
    assert changed != text, "the mutation did not apply: update this test with the docs"
    missing = undocumented(changed)
    assert any(m.startswith(expected) for m in missing), missing


def test_a_mention_in_prose_does_not_count() -> None:
    text = GUIDE.read_text()
    prose = drop_lines(text, "- `apply_delay(") + "\nSee also `apply_delay` in the core.\n"
    assert any(m.startswith("Proxy.apply_delay") for m in undocumented(prose))


def test_the_guide_links_the_kit_and_the_tutorial() -> None:
    text = GUIDE.read_text()
    assert "(conformance.md)" in text
    assert "(tutorial-plugin.md)" in text and (DOCS / "tutorial-plugin.md").is_file()
    assert "[project.entry-points.discoverd]" in text


def test_the_options_reference_is_current() -> None:
    """docs/options.md is derived from the configuration classes; regenerate it with
    ``python -m discoverd.core.reference > docs/options.md``."""
    from discoverd.core.reference import builtin_schemas, options_reference

    expected = options_reference(builtin_schemas())
    assert (DOCS / "options.md").read_text() == expected, (
        "docs/options.md is out of date: python -m discoverd.core.reference > docs/options.md"
    )
    for name in ("docker", "etcd", "consul", "haproxy", "nginx"):
        assert f"## `[{name}]`" in expected
