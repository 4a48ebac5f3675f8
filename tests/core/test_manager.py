import pytest

from discoverd import RegistryPlugin, hookimpl
from discoverd.core.manager import PluginLoadError, UnknownPluginError, get_plugin_manager


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
