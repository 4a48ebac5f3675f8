import logging
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from discoverd import RegistryPlugin, hookimpl
from discoverd.core.errors import BrokenPluginError, PluginLoadError, UnknownPluginError
from discoverd.core.manager import (
    BrokenPlugin,
    Kind,
    deferred_plugin_warnings,
    get_plugin_manager,
)
from tests.plugins.jsonfile.packaging import on_sys_path


class Fake:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def discoverd_register_registries(self) -> list[RegistryPlugin]:
        return [RegistryPlugin(name=self.name, factory=lambda ctx: None, description="fake")]  # type: ignore[arg-type,return-value]


def test_builtins_load_through_entry_points() -> None:
    manager = get_plugin_manager()
    assert {"docker", "etcd", "haproxy"} <= {i.name for i in manager.infos}
    assert "etcd" in manager.registries()
    assert "haproxy" in manager.proxies()
    assert "docker" in manager.sources()
    etcd = next(i for i in manager.infos if i.name == "etcd")
    assert etcd.distribution == "discoverd" and etcd.version
    assert etcd.registries == ["etcd"]
    assert "discoverd_register_registries" in etcd.hooks


def test_unknown_name_is_one_helpful_line() -> None:
    manager = get_plugin_manager()
    with pytest.raises(UnknownPluginError) as info:
        manager.registry("etcdd")
    message = str(info.value)
    assert message.startswith("Unknown registry 'etcdd'. Available: ")
    assert "etcd" in message and "Is the plugin installed?" in message
    assert "\n" not in message


def test_duplicate_names_fail_naming_every_provider() -> None:
    with pytest.raises(PluginLoadError) as info:
        get_plugin_manager([("one", Fake("x")), ("two", Fake("x"))], entry_points=False)
    assert "one" in str(info.value) and "two" in str(info.value)


def test_extra_plugins_and_disable() -> None:
    manager = get_plugin_manager([("mine", Fake("mem"))], disabled={"etcd"})
    assert "mem" in manager.registries()
    assert "etcd" not in manager.registries()


def test_typo_in_a_hook_name_is_caught() -> None:
    class Typo:
        @hookimpl
        def discoverd_register_registrie(self) -> list[RegistryPlugin]:
            return []

    with pytest.raises(Exception, match="discoverd_register_registrie"):
        get_plugin_manager([("typo", Typo())], entry_points=False)


def test_managers_are_independent() -> None:
    a = get_plugin_manager([("mine", Fake("mem"))], entry_points=False)
    b = get_plugin_manager(entry_points=False)
    assert "mem" in a.registries() and "mem" not in b.registries()


# --------------------------------------------------------------------------------------------
# Installed distributions: listing, and plugins that fail (fake dist-info written by hand; the
# CLI tests install a real package with pip)


def fake_distribution(
    site: Path, name: str, version: str, entry_points: dict[str, str], modules: dict[str, str]
) -> Path:
    """An installed distribution as importlib.metadata sees one: ``<name>-<version>.dist-info``
    with METADATA and entry_points.txt, and its top-level modules beside it."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[discoverd]\n{lines}")
    for module, text in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(text))
    return site


GOOD_MODULE = """
    from discoverd import ProxyPlugin, hookimpl

    @hookimpl
    def discoverd_register_proxies():
        return [ProxyPlugin(name="{name}", factory=lambda ctx: None, description="fine")]
"""


def test_builtins_are_listed_with_their_distribution() -> None:
    backends = {(b.kind, b.name): b for b in get_plugin_manager().components()}
    version = metadata.version("discoverd")
    keys: list[tuple[Kind, str]] = [
        ("source", "docker"),
        ("registry", "etcd"),
        ("proxy", "haproxy"),
    ]
    for key in keys:
        backend = backends[key]
        assert (backend.plugin, backend.distribution, backend.version) == (
            key[1],
            "discoverd",
            version,
        )
        assert backend.description
    kinds = [b.kind for b in backends.values()]
    assert kinds == sorted(kinds, key=["source", "registry", "proxy"].index)


def test_a_plugin_that_fails_to_import_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake_distribution(
        tmp_path,
        "broken-plugin",
        "1.0",
        {"broken": "dd_broken_import", "fine": "dd_fine_one"},
        {
            "dd_broken_import": "import dd_nope_missing\n",
            "dd_fine_one": GOOD_MODULE.format(name="fine"),
        },
    )
    with on_sys_path(tmp_path), caplog.at_level(logging.WARNING, "discoverd.core.manager"):
        manager = get_plugin_manager()
    cause = "ModuleNotFoundError: No module named 'dd_nope_missing'"
    assert manager.broken == [BrokenPlugin("broken", "broken-plugin", cause, "1.0")]
    assert "fine" in manager.proxies() and "haproxy" in manager.proxies()  # the rest loads
    fine = next(b for b in manager.components() if b.name == "fine")
    assert (fine.distribution, fine.version, fine.plugin) == ("broken-plugin", "1.0", "fine")
    warnings = [r.getMessage() for r in caplog.records if "dd_nope_missing" in r.getMessage()]
    assert warnings == [
        "plugin entry point 'broken' (from distribution broken-plugin 1.0) failed to import "
        f"and is ignored: {cause}"
    ]
    with pytest.raises(BrokenPluginError) as selected:
        manager.proxy("broken")
    assert str(selected.value) == (
        f"proxy plugin 'broken' (from distribution broken-plugin 1.0) failed to import: {cause}"
    )
    with pytest.raises(BrokenPluginError, match=r"^registry plugin 'broken'"):
        manager.registry("broken")
    with pytest.raises(UnknownPluginError) as unknown:
        manager.proxy("other")
    assert "Plugins that failed to load: broken (from distribution broken-plugin 1.0: " in str(
        unknown.value
    )


@pytest.mark.parametrize(
    ("source", "stage", "cause"),
    [
        ("raise RuntimeError('boom at import')\n", "import", "RuntimeError: boom at import"),
        (
            "from discoverd import hookimpl\n\n@hookimpl\ndef discoverd_register_proxies():\n"
            "    raise ValueError('no config')\n",
            "load",
            "discoverd_register_proxies raised ValueError: no config",
        ),
        (
            "from discoverd import hookimpl\n\n@hookimpl\ndef discoverd_register_proxies():\n"
            "    return ['haproxy']\n",
            "load",
            "discoverd_register_proxies returned str, not ProxyPlugin",
        ),
        (
            "from discoverd import hookimpl\n\n@hookimpl\ndef discoverd_register_proxie():\n"
            "    return []\n",
            "load",
            "unknown hook discoverd_register_proxie",
        ),
        (
            "from discoverd import hookimpl\n\n@hookimpl\ndef discoverd_after_apply(proxy, x):\n"
            "    pass\n",
            "load",
            "discoverd_after_apply",
        ),
    ],
)
def test_every_kind_of_failure_is_contained(
    tmp_path: Path, source: str, stage: str, cause: str
) -> None:
    module = f"dd_failing_{abs(hash(source)) % 10**8}"
    fake_distribution(tmp_path, "failing", "2.3", {"failing": module}, {module: source})
    with on_sys_path(tmp_path):
        manager = get_plugin_manager()
    assert [(b.name, b.distribution, b.version, b.stage) for b in manager.broken] == [
        ("failing", "failing", "2.3", stage)
    ]
    assert cause in manager.broken[0].error
    assert "\n" not in manager.broken[0].error
    assert "failing" not in {i.name for i in manager.infos}
    assert "haproxy" in manager.proxies()  # the built-ins are not affected
    with pytest.raises(BrokenPluginError, match=f"failed to {stage}: "):
        manager.proxy("failing")


def test_a_raising_plugin_loses_everything_it_registered(tmp_path: Path) -> None:
    source = """
        from discoverd import ProxyPlugin, hookimpl

        @hookimpl
        def discoverd_register_proxies():
            return [ProxyPlugin(name="half", factory=lambda ctx: None, description="x")]

        @hookimpl
        def discoverd_register_sources():
            raise KeyError("half-way")
    """
    fake_distribution(tmp_path, "half", "1", {"half": "dd_half"}, {"dd_half": source})
    with on_sys_path(tmp_path):
        manager = get_plugin_manager()
    assert "half" not in manager.proxies()
    assert manager.broken[0].error == "discoverd_register_sources raised KeyError: 'half-way'"


def test_disabled_broken_plugins_are_not_imported(tmp_path: Path) -> None:
    fake_distribution(tmp_path, "off", "1", {"off": "dd_off"}, {"dd_off": "import dd_nope\n"})
    with on_sys_path(tmp_path):
        manager = get_plugin_manager(disabled={"off"})
    assert manager.broken == []
    with pytest.raises(UnknownPluginError):
        manager.proxy("off")


def test_warnings_are_deferred_and_a_selected_plugin_is_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake_distribution(
        tmp_path,
        "two-broken",
        "0.1",
        {"first": "dd_first", "second": "dd_second"},
        {"dd_first": "import dd_first_missing\n", "dd_second": "import dd_second_missing\n"},
    )
    reported: list[str] = []
    with on_sys_path(tmp_path), caplog.at_level(logging.WARNING, "discoverd.core.manager"):
        with deferred_plugin_warnings(lambda b: reported.append(b.name)):
            manager = get_plugin_manager()
            assert reported == []  # held back while the command resolves its selection
        assert reported == ["first", "second"]
        reported.clear()
        with (
            pytest.raises(BrokenPluginError),
            deferred_plugin_warnings(lambda b: reported.append(b.name)),
        ):
            manager = get_plugin_manager()
            manager.source("second")
        assert reported == ["first"]  # "second" failed the command instead
    assert not [r for r in caplog.records if "missing" in r.getMessage()]  # all went to report
