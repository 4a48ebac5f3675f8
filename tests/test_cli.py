"""The command line as an operator meets it: exit statuses, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from discoverd.core.manager import get_plugin_manager
from tests.plugins.jsonfile.packaging import install_package, write_package
from tests.support.services import Etcd, free_port

REPO = Path(__file__).resolve().parents[1]


def discoverd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DISCOVERD_", "ETCD_"))}
    base.pop("HOST_IP", None)
    return subprocess.run(
        [sys.executable, "-m", "discoverd", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_unknown_registry_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = discoverd("--registry", "etcdd", "--proxy", "haproxy", "--state-dir", str(tmp_path))
    line = one_line_error(result, 2)
    available = ", ".join(get_plugin_manager().registries())  # etcd, and consul once it lands
    assert "etcd" in available
    assert line == (
        f"discoverd: Unknown registry 'etcdd'. Available: {available}. Is the plugin installed?"
    )


def test_unknown_proxy_in_a_subcommand(tmp_path: Path) -> None:
    result = discoverd("discover", "--proxy", "nginxx", "--state-dir", str(tmp_path))
    available = ", ".join(get_plugin_manager().proxies())
    assert f"Unknown proxy 'nginxx'. Available: {available}." in one_line_error(result, 2)


def test_plugins_table_and_json() -> None:
    table = discoverd("plugins")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "PLUGIN", "DESCRIPTION"]
    rows = {tuple(line.split()[:2]): line.split(None, 5) for line in lines[1:]}
    version = metadata.version("discoverd")
    for kind, name in [("source", "docker"), ("registry", "etcd"), ("proxy", "haproxy")]:
        row = rows[(kind, name)]
        assert row[2:5] == ["discoverd", version, name]
        assert len(row[5]) > 10  # the record's description
    data = json.loads(discoverd("plugins", "--json").stdout)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["docker"]["sources"] == ["docker"]
    assert by_name["etcd"]["registries"] == ["etcd"]
    assert by_name["haproxy"]["proxies"] == ["haproxy"]
    assert by_name["haproxy"]["version"] == version and by_name["haproxy"]["error"] is None
    backends = {(b["kind"], b["name"]): b for b in data["components"]}
    assert backends[("registry", "etcd")]["distribution"] == "discoverd"
    assert backends[("registry", "etcd")]["description"] == rows[("registry", "etcd")][5]


@pytest.fixture
def broken_site(tmp_path: Path) -> Path:
    """A package whose plugin module imports a module that does not exist, installed by pip."""
    source = write_package(
        tmp_path / "broken-src",
        "broken-plugin",
        "1.0",
        {"broken": "broken_plugin_mod"},
        {"broken_plugin_mod": "import nope\n"},
    )
    return install_package(source, tmp_path / "broken-site")


BROKEN_CAUSE = "ModuleNotFoundError: No module named 'nope'"
BROKEN_WARNING = (
    "discoverd: warning: plugin entry point 'broken' (from distribution broken-plugin 1.0) "
    f"failed to import and is ignored: {BROKEN_CAUSE}"
)


def test_a_broken_plugin_warns_unless_selected(broken_site: Path, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(broken_site), "DISCOVERD_STATE_DIR": str(tmp_path / "state")}

    # Listed, with its error; the command works and warns once.
    listing = discoverd("plugins", env=env)
    assert listing.returncode == 0, listing.stderr
    assert listing.stderr.splitlines() == [BROKEN_WARNING]
    row = next(line for line in listing.stdout.splitlines() if line.split()[1] == "broken")
    assert row.split(None, 5) == [
        "failed", "broken", "broken-plugin", "1.0", "broken", f"failed to import: {BROKEN_CAUSE}"
    ]  # fmt: skip
    assert "haproxy" in listing.stdout
    data = json.loads(discoverd("plugins", "--json", env=env).stdout)
    entry = next(p for p in data["plugins"] if p["name"] == "broken")
    assert entry["distribution"] == "broken-plugin" and entry["version"] == "1.0"
    assert entry["error"] == f"failed to import: {BROKEN_CAUSE}"

    # Commands that do not select it: a warning, then business as usual.
    good = tmp_path / "good.toml"
    good.write_text("[etcd]\nttl = 20\n")
    checked = discoverd("check", str(good), env=env)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.splitlines() == [BROKEN_WARNING]
    unreachable = discoverd("render", env={**env, "ETCD_HOST": f"127.0.0.1:{free_port()}"})
    assert unreachable.returncode == 1
    assert unreachable.stderr.splitlines()[0] == BROKEN_WARNING
    assert "unreachable" in unreachable.stderr.splitlines()[1]
    assert discoverd("--help", env=env).returncode == 0

    # Commands that select it: exit 2, one line with the cause, no warning besides.
    for args, kind in [
        (("render", "--proxy", "broken"), "proxy"),
        (("discover", "--proxy", "broken"), "proxy"),
        (("--registry", "broken"), "registry"),
        (("register", "--source", "broken"), "source"),
    ]:
        line = one_line_error(discoverd(*args, env=env), 2)
        assert line == (
            f"discoverd: {kind} plugin 'broken' (from distribution broken-plugin 1.0) "
            f"failed to import: {BROKEN_CAUSE}"
        ), args
    selecting = tmp_path / "selecting.toml"
    selecting.write_text('proxy = "broken"\n')
    line = one_line_error(discoverd("check", str(selecting), env=env), 2)
    assert line.endswith(f"proxy plugin 'broken' (from distribution broken-plugin 1.0) "
                         f"failed to import: {BROKEN_CAUSE}")  # fmt: skip
    assert not (tmp_path / "state").exists()  # nothing was started


def test_help_lists_installed_plugins() -> None:
    result = discoverd("--help")
    assert result.returncode == 0
    registries = ", ".join(get_plugin_manager().registries())
    assert f"Installed: {registries}." in " ".join(result.stdout.split())


def test_check_shipped_example() -> None:
    result = discoverd("check", str(REPO / "discoverd.toml"))
    assert result.returncode == 0, result.stderr
    assert "ok (source docker, registry etcd, proxy haproxy)" in result.stdout


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[etcd]\nttl = 'x'\n", ["bad.toml", "'etcd.ttl'", "whole number"]),
        ("[haproxy]\nstats_prot = 1\n", ["bad.toml", "unknown key 'haproxy.stats_prot'"]),
        ("registry = 'zookeeper'\n", ["Unknown registry 'zookeeper'"]),
        ("[etcd\n", ["bad.toml", "not valid TOML"]),
        ("[haproxy]\ncheck_interval = 'abc'\n", ["bad.toml", "check_interval", "'abc'"]),
        ("[etcd]\nttl = 0\n", ["bad.toml", "ttl"]),
        ("[etcd]\nendpoints = ['ftp://x:1']\n", ["bad.toml", "ftp://x:1"]),
        # Consul and nginx chosen in the file, each with its own section, checked the same way.
        ("registry = 'consul'\n[consul]\nttl = 'x'\n", ["bad.toml", "'consul.ttl'"]),
        ("registry = 'consul'\n[consul]\nderegister_after = 5\n", ["bad.toml", "deregister_after"]),
        ("proxy = 'nginx'\n[nginx]\nstatus_port = 70000\n", ["bad.toml", "status_port"]),
        ("proxy = 'nginx'\n[nginx]\nworker_processes = 'many'\n", ["bad.toml", "worker_processes"]),
    ],
)
def test_check_bad_file(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    line = one_line_error(discoverd("check", str(path)), 2)
    for fragment in fragments:
        assert fragment in line


def test_check_a_consul_and_nginx_deployment(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        "registry = 'consul'\nproxy = 'nginx'\n[consul]\naddress = '127.0.0.1:8500'\n"
        "ttl = 10\n[nginx]\nstatus_port = 1937\nreload_interval = 1.0\n"
    )
    result = discoverd("check", str(path))
    assert result.returncode == 0, result.stderr
    assert "registry consul, proxy nginx" in result.stdout


def test_run_with_a_broken_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[etcd]\nendpoints = 5\n")
    line = one_line_error(discoverd("--config", str(path), "--state-dir", str(tmp_path)), 2)
    assert "bad.toml" in line and "'etcd.endpoints'" in line


def test_bad_environment_value_exits_2(tmp_path: Path) -> None:
    result = discoverd(
        "render", env={"DISCOVERD_ETCD_TTL": "soon", "DISCOVERD_STATE_DIR": str(tmp_path)}
    )
    assert "DISCOVERD_ETCD_TTL" in one_line_error(result, 2)


def test_render_with_unreachable_registry_exits_1(tmp_path: Path) -> None:
    port = free_port()
    result = discoverd(
        "render", env={"ETCD_HOST": f"127.0.0.1:{port}", "DISCOVERD_STATE_DIR": str(tmp_path)}
    )
    line = one_line_error(result, 1)
    assert str(port) in line


@pytest.mark.services
def test_render_and_services_from_seed_layout(tmp_path: Path, etcd: Etcd) -> None:
    """Entries written in the original docker-register's plain layout are served."""
    prefix = f"/seed-{free_port()}"
    ctl = ["etcdctl", f"--endpoints={etcd.endpoint}"]
    env = {**os.environ, "ETCDCTL_API": "3"}
    for key, value in [
        (f"{prefix}/whoami/port", "8000"),
        (f"{prefix}/whoami/736ab83847bb", "10.170.71.227:49153"),
        (f"{prefix}/whoami/4eb0498e5207", "10.170.71.228:49154"),
        (f"{prefix}/broken/aaaaaaaaaaaa", "not-an-endpoint"),
    ]:
        subprocess.run([*ctl, "put", key, value], env=env, check=True, capture_output=True)
    env_vars = {
        "ETCD_HOST": etcd.endpoint,
        "DISCOVERD_ETCD_PREFIX": prefix,
        "DISCOVERD_STATE_DIR": str(tmp_path / "state"),
    }
    rendered = discoverd("render", env=env_vars)
    assert rendered.returncode == 0, rendered.stderr
    assert "10.170.71.227:49153" in rendered.stdout and "10.170.71.228:49154" in rendered.stdout
    assert ":8000" in rendered.stdout
    assert "broken" in rendered.stderr  # the malformed entry is reported, the rest served
    listing = discoverd("services", env=env_vars)
    assert listing.returncode == 0
    assert "whoami  8000" in " ".join(listing.stdout.split("  ")) or "whoami" in listing.stdout
    assert not (tmp_path / "state").exists()  # render and services changed nothing


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_a_state_dir_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    result = discoverd("--state-dir", str(state), env={"ETCD_HOST": f"127.0.0.1:{free_port()}"})
    line = one_line_error(result, 2)
    assert str(state) in line and "writable by group or others" in line


def test_config_shows_each_value_with_its_origin_and_hides_secrets(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text('registry = "etcd"\n[etcd]\nttl = 30\nuser = "root"\npassword = "hunter2"\n')
    result = discoverd(
        "config", "--config", str(path), "--proxy", "nginx", "--json",
        env={"ETCD_HOST": "10.0.0.2:2379", "HOST_IP": "10.0.0.5"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {(r["section"], r["key"]): r for r in json.loads(result.stdout)}
    assert rows[("", "proxy")] == {"section": "", "key": "proxy", "value": "nginx",
                                   "origin": "command line"}  # fmt: skip
    assert rows[("", "host_ip")]["origin"] == "environment variable HOST_IP"
    assert rows[("etcd", "ttl")]["value"] == 30
    assert rows[("etcd", "ttl")]["origin"] == f"config file {path}"
    assert rows[("etcd", "endpoints")]["value"] == ["10.0.0.2:2379"]
    assert rows[("etcd", "password")]["value"] == "***"
    assert rows[("nginx", "status_port")]["origin"] == "default"
    assert ("consul", "address") not in rows  # only the plugins in use
    text = discoverd("config", "--config", str(path))
    assert text.returncode == 0 and "hunter2" not in text.stdout + text.stderr
    assert "ttl = 30" in text.stdout and f"# config file {path}" in text.stdout


def test_config_refuses_what_the_plugins_in_use_refuse(tmp_path: Path) -> None:
    line = one_line_error(discoverd("config", env={"DISCOVERD_ETCD_TTL": "0"}), 2)
    assert "environment variable DISCOVERD_ETCD_TTL" in line and "etcd.ttl" in line


def test_config_defaults_is_a_complete_valid_file(tmp_path: Path) -> None:
    result = discoverd("config", "--defaults")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "all.toml"
    path.write_text(result.stdout)
    data = tomllib.loads(result.stdout)
    for component in get_plugin_manager().components():
        if component.options:
            assert set(data[component.name]) == {o.name for o in component.options}
    assert set(data) >= {"source", "registry", "proxy", "etcd", "haproxy", "nginx", "consul"}
    assert discoverd("check", str(path)).returncode == 0


def test_the_shipped_example_is_the_generated_one() -> None:
    from discoverd.core.reference import builtin_schemas, defaults_toml

    assert (REPO / "discoverd.toml").read_text() == defaults_toml(builtin_schemas()), (
        "discoverd.toml drifted: python -m discoverd.core.reference --toml > discoverd.toml"
    )
