from pathlib import Path

import pytest

from discoverd.core.config import ConfigError, load_settings
from discoverd.core.interfaces import Option

SCHEMAS = {
    "etcd": (
        Option("endpoints", list, ["127.0.0.1:2379"], "", env=("ETCD_HOST",)),
        Option("ttl", int, 15, ""),
        Option("tls", bool, False, ""),
    ),
    "haproxy": (Option("stats_port", int, 1936, ""),),
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "discoverd.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings(SCHEMAS, env={})
    assert settings["registry"] == "etcd" and settings["proxy"] == "haproxy"
    assert settings.options_for("etcd") == {
        "endpoints": ["127.0.0.1:2379"],
        "ttl": 15,
        "tls": False,
    }


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'registry = "file"\nhost_ip = "10.0.0.1"\nlog_level = "debug"\n'
        "[etcd]\nttl = 30\nendpoints = ['a:1']\n",
    )
    env = {
        "DISCOVERD_HOST_IP": "10.0.0.2",
        "ETCD_HOST": "b:2,c:3",
        "DISCOVERD_REGISTRY": "env",
    }
    settings = load_settings(
        SCHEMAS, config_file=path, env=env, flags={"registry": "flag", "proxy": None}
    )
    assert settings["registry"] == "flag"  # flag > env > file
    assert settings["host_ip"] == "10.0.0.2"  # env > file
    assert settings["log_level"] == "debug"  # file > default
    assert settings["proxy"] == "haproxy"  # None flag ignored
    assert settings.options_for("etcd")["endpoints"] == ["b:2", "c:3"]  # seed's ETCD_HOST
    assert settings.options_for("etcd")["ttl"] == 30


def test_seed_host_ip_and_discoverd_variable_wins() -> None:
    assert load_settings(SCHEMAS, env={"HOST_IP": "10.1.1.1"})["host_ip"] == "10.1.1.1"
    both = {"HOST_IP": "10.1.1.1", "DISCOVERD_HOST_IP": "10.2.2.2"}
    assert load_settings(SCHEMAS, env=both)["host_ip"] == "10.2.2.2"


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[haproxy]\nstats_port = 9999\n")
    settings = load_settings(SCHEMAS, env={"DISCOVERD_CONFIG": str(path)})
    assert settings.options_for("haproxy")["stats_port"] == 9999


def test_set_overrides_last() -> None:
    settings = load_settings(
        SCHEMAS, env={"DISCOVERD_ETCD_TTL": "20"}, sets=["etcd.ttl=40", "etcd.tls=yes"]
    )
    assert settings.options_for("etcd")["ttl"] == 40
    assert settings.options_for("etcd")["tls"] is True


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[etcd]\nttl = 'soon'\n", ["discoverd.toml", "'etcd.ttl'", "whole number", "'soon'"]),
        ("[etcd]\nttll = 3\n", ["discoverd.toml", "unknown key 'etcd.ttll'", "ttl"]),
        ("[consul]\nx = 1\n", ["discoverd.toml", "unknown section [consul]", "etcd, haproxy"]),
        ("registry = 'etcd\n", ["discoverd.toml", "not valid TOML"]),
        ("host_ip = 'nowhere'\n", ["host_ip", "not an IP address"]),
        ("log_level = 'loud'\n", ["log_level", "debug, info"]),
        ("min_wait = 5\nmax_wait = 1\n", ["min_wait", "max_wait"]),
        ("registyr = 'etcd'\n", ["unknown key 'registyr'", "the top level"]),
        ("[etcd]\nendpoints = [1, 2]\n", ["'etcd.endpoints'", "list of strings"]),
    ],
)
def test_bad_file_names_file_key_and_expectation(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(SCHEMAS, config_file=path, env={})
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("value", ["x", "\u00b2", "1.5"])
def test_bad_environment_value_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="environment variable DISCOVERD_ETCD_TTL"):
        load_settings(SCHEMAS, env={"DISCOVERD_ETCD_TTL": value})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(SCHEMAS, config_file=tmp_path / "nope.toml", env={})


def test_bad_set_syntax() -> None:
    with pytest.raises(ConfigError, match=r"SECTION\.KEY=VALUE"):
        load_settings(SCHEMAS, env={}, sets=["etcd.ttl"])


def test_shipped_example_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "discoverd.toml"
    from discoverd.core.manager import get_plugin_manager
    from discoverd.core.runtime import plugin_schemas

    settings = load_settings(plugin_schemas(get_plugin_manager()), config_file=example, env={})
    assert settings["registry"] == "etcd"


def test_state_dir_defaults_for_root_and_users(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from discoverd.core import config

    monkeypatch.setattr(config.os, "geteuid", lambda: 0)
    assert load_settings(SCHEMAS, env={}).state_dir == Path("/run/discoverd")
    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert load_settings(SCHEMAS, env={}).state_dir == tmp_path / "discoverd"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_settings(SCHEMAS, env={}).state_dir == tmp_path / ".local/state/discoverd"
    explicit = load_settings(SCHEMAS, env={"DISCOVERD_STATE_DIR": "/srv/dd"})
    assert explicit.state_dir == Path("/srv/dd")


def test_a_plugin_refusing_a_value_names_where_it_was_set(tmp_path: Path) -> None:
    from discoverd.core.interfaces import PluginContext, PluginError, RegistryPlugin
    from discoverd.core.manager import get_plugin_manager
    from discoverd.core.runtime import make_registry

    def factory(ctx: PluginContext) -> object:
        raise PluginError(f"picky: ttl {ctx.options['ttl']} is too short")

    class Hooks:
        from discoverd import hookimpl

        @hookimpl
        def discoverd_register_registries(self) -> list[RegistryPlugin]:
            options = (Option("ttl", int, 15, "lease TTL"), Option("name", str, "x", "a name"))
            return [RegistryPlugin("picky", factory, "refuses everything", options)]  # type: ignore[arg-type]

    config = tmp_path / "d.toml"
    config.write_text('registry = "picky"\n[picky]\nttl = 1\nname = "ttl-free"\n')
    manager = get_plugin_manager(extra_plugins=[("picky", Hooks())], entry_points=False)
    settings = load_settings({"picky": manager.registry("picky").options}, config_file=config,
                             env={})  # fmt: skip
    with pytest.raises(PluginError) as caught:
        make_registry(manager, settings, create=False)
    assert str(caught.value) == f"picky: ttl 1 is too short (ttl: config file {config})"
    settings = load_settings({"picky": manager.registry("picky").options}, config_file=config,
                             env={"DISCOVERD_PICKY_TTL": "2"})  # fmt: skip
    with pytest.raises(PluginError, match="ttl: environment variable DISCOVERD_PICKY_TTL"):
        make_registry(manager, settings, create=False)


def test_a_refused_core_value_names_where_it_was_set(tmp_path: Path) -> None:
    config = write(tmp_path, "min_wait = 2.0\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(SCHEMAS, config_file=config, env={"DISCOVERD_MAX_WAIT": "1"})
    message = str(caught.value)
    assert f"min_wait: config file {config}" in message
    assert "max_wait: environment variable DISCOVERD_MAX_WAIT" in message
