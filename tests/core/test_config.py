import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from discoverd import OptionError, option
from discoverd.core.config import ConfigError, load_settings


@dataclass(frozen=True)
class EtcdLike:
    endpoints: tuple[str, ...] = option(("127.0.0.1:2379",), "", env=("ETCD_HOST",))
    ttl: int = option(15, "", min=1)
    tls: bool = option(False, "")
    password: str = option("", "", secret=True)
    user: str = option("", "")

    def __post_init__(self) -> None:
        if self.password and not self.user:
            raise OptionError("password is set but user is not", "password", "user")


@dataclass(frozen=True)
class ProxyLike:
    stats_port: int = option(1936, "", min=0, max=65535)


SCHEMAS: dict[str, type] = {"etcd": EtcdLike, "haproxy": ProxyLike}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "discoverd.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings(SCHEMAS, env={})
    assert settings.core.registry == "etcd" and settings.core.proxy == "haproxy"
    assert settings.config_for("etcd") == EtcdLike(("127.0.0.1:2379",), 15, False)


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
    assert settings.core.registry == "flag"  # flag > env > file
    assert settings.core.host_ip == "10.0.0.2"  # env > file
    assert settings.core.log_level == "debug"  # file > default
    assert settings.core.proxy == "haproxy"  # None flag ignored
    assert settings.config_for("etcd").endpoints == ("b:2", "c:3")  # seed's ETCD_HOST
    assert settings.config_for("etcd").ttl == 30
    assert settings.origin("etcd", "ttl") == f"config file {path}"
    assert settings.origin("etcd", "endpoints") == "environment variable ETCD_HOST"
    assert settings.origin("", "registry") == "command line"
    assert settings.origin("haproxy", "stats_port") == "default"


def test_seed_host_ip_and_discoverd_variable_wins() -> None:
    assert load_settings(SCHEMAS, env={"HOST_IP": "10.1.1.1"}).core.host_ip == "10.1.1.1"
    both = {"HOST_IP": "10.1.1.1", "DISCOVERD_HOST_IP": "10.2.2.2"}
    assert load_settings(SCHEMAS, env=both).core.host_ip == "10.2.2.2"


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[haproxy]\nstats_port = 9999\n")
    settings = load_settings(SCHEMAS, env={"DISCOVERD_CONFIG": str(path)})
    assert settings.config_for("haproxy").stats_port == 9999


def test_set_overrides_last() -> None:
    settings = load_settings(
        SCHEMAS, env={"DISCOVERD_ETCD_TTL": "20"}, sets=["etcd.ttl=40", "etcd.tls=yes"]
    )
    assert settings.config_for("etcd").ttl == 40
    assert settings.config_for("etcd").tls is True


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
        ("host_ip = '169.254.169.254'\n", ["host_ip", "link-local"]),
        ("host_ip = '0.0.0.0'\n", ["host_ip", "unspecified"]),
        ("expose = 'some'\n", ["'expose'", "all, labelled"]),
        ("frontend_ports = '8000-'\n", ["'frontend_ports'", "8000-8999 or 9100"]),
        ("frontend_ports = '0-80'\n", ["'frontend_ports'", "from 1 to 65535"]),
        ("service_images = ['web']\n", ["'service_images'", "SERVICE=REPOSITORY"]),
        ("service_images = ['web=team/web:1']\n", ["'service_images'", "not an image repo"]),
        ("meta_keys = ['name']\n", ["'meta_keys'", "not a metadata key"]),
        ("meta_keys = ['a.b']\n", ["'meta_keys'", "not a metadata key"]),
        ("single_machine = 'maybe'\n", ["'single_machine'", "true or false"]),
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
    from discoverd.core.agent import plugin_schemas
    from discoverd.core.manager import get_plugin_manager

    settings = load_settings(plugin_schemas(get_plugin_manager()), config_file=example, env={})
    assert settings.core.registry == "etcd"
    for section in {sect for sect, _ in settings.origins if sect}:
        settings.config_for(section)  # every section's rules hold


def test_state_dir_defaults_for_root_and_users(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert load_settings(SCHEMAS, env={}).state_dir == Path("/run/discoverd")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert load_settings(SCHEMAS, env={}).state_dir == tmp_path / "discoverd"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_settings(SCHEMAS, env={}).state_dir == tmp_path / ".local/state/discoverd"
    explicit = load_settings(SCHEMAS, env={"DISCOVERD_STATE_DIR": "/srv/dd"})
    assert explicit.state_dir == Path("/srv/dd")


def test_a_plugin_value_breaking_a_rule_names_where_it_was_set(tmp_path: Path) -> None:
    config = write(tmp_path, "[etcd]\nttl = 0\n")
    settings = load_settings(SCHEMAS, config_file=config, env={})
    with pytest.raises(ConfigError) as caught:
        settings.config_for("etcd")
    assert str(caught.value) == f"config file {config}: key 'etcd.ttl' = 0: must be at least 1"
    settings = load_settings(SCHEMAS, config_file=config, env={"DISCOVERD_ETCD_TTL": "-2"})
    with pytest.raises(ConfigError, match="environment variable DISCOVERD_ETCD_TTL"):
        settings.config_for("etcd")
    # Only the plugins in use are checked: a bad value elsewhere does not stop loading.
    assert load_settings(SCHEMAS, config_file=config, env={}).core.registry == "etcd"


def test_options_that_do_not_fit_together_name_each_origin(tmp_path: Path) -> None:
    config = write(tmp_path, "[etcd]\npassword = 's3cr3t'\n")
    settings = load_settings(SCHEMAS, config_file=config, env={})
    with pytest.raises(ConfigError) as caught:
        settings.config_for("etcd")
    message = str(caught.value)
    assert message.startswith("[etcd] password is set but user is not")
    assert f"password: config file {config}" in message
    assert "s3cr3t" not in message


def test_secrets_are_never_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(SCHEMAS, env={}, sets=["etcd.password=hunter2", "etcd.nope=1"])
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_settings(SCHEMAS, env={}, sets=["etcd.password=hunter2", "etcd.ttl=x"])
    assert "hunter2" not in str(caught.value)
    settings = load_settings(SCHEMAS, env={}, sets=["etcd.password=hunter2"])
    assert settings.origin("etcd", "password") == "--set 'etcd.password=***'"


def test_a_refused_core_value_names_where_it_was_set(tmp_path: Path) -> None:
    config = write(tmp_path, "min_wait = 2.0\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(SCHEMAS, config_file=config, env={"DISCOVERD_MAX_WAIT": "1"})
    message = str(caught.value)
    assert f"min_wait: config file {config}" in message
    assert "max_wait: environment variable DISCOVERD_MAX_WAIT" in message


def test_exposure_options_and_their_defaults(tmp_path: Path) -> None:
    core = load_settings(SCHEMAS, env={}).core
    assert (core.expose, core.frontend_ports, core.service_images) == ("all", "1-65535", ())
    assert (core.meta_keys, core.single_machine) == ((), False)
    path = write(
        tmp_path,
        'expose = "labelled"\nfrontend_ports = "9000-9999, 8000"\n'
        'service_images = [" web = registry.example.com/team/web "]\n'
        'meta_keys = ["Weight", "weight"]\nsingle_machine = true\n',
    )
    core = load_settings(SCHEMAS, config_file=path, env={}).core
    assert core.expose == "labelled"
    assert core.frontend_ports == "8000,9000-9999"  # normalised
    assert core.service_images == ("web=registry.example.com/team/web",)
    assert core.meta_keys == ("weight",)
    assert core.single_machine is True
