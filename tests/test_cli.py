"""The command line as an operator meets it: exit statuses, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from discoverd.testing.services import Etcd, free_port

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
    assert line == "discoverd: Unknown registry 'etcdd'. Available: etcd. Is the plugin installed?"


def test_unknown_proxy_in_a_subcommand(tmp_path: Path) -> None:
    result = discoverd("discover", "--proxy", "nginxx", "--state-dir", str(tmp_path))
    assert "Unknown proxy 'nginxx'. Available: haproxy." in one_line_error(result, 2)


def test_plugins_table_and_json() -> None:
    table = discoverd("plugins")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows["etcd"][1] == "discoverd" and "etcd" in rows["etcd"]
    assert "haproxy" in rows["haproxy"] and "docker" in rows["docker"]
    data = json.loads(discoverd("plugins", "--json").stdout)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["docker"]["sources"] == ["docker"]
    assert by_name["etcd"]["registries"] == ["etcd"]
    assert by_name["haproxy"]["proxies"] == ["haproxy"]
    assert by_name["haproxy"]["version"]


def test_help_lists_installed_plugins() -> None:
    result = discoverd("--help")
    assert result.returncode == 0
    assert "Installed: etcd." in " ".join(result.stdout.split())


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
    ],
)
def test_check_bad_file(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    line = one_line_error(discoverd("check", str(path)), 2)
    for fragment in fragments:
        assert fragment in line


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
