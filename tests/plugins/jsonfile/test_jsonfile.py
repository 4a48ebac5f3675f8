"""The example third-party plugin, installed with pip and selected by name like any plugin.

Nothing here imports ``discoverd_jsonfile`` directly: the package is found through its
``discoverd`` entry point in the dist-info pip wrote, in process (``jsonfile_manager``) and in
``discoverd`` child processes (``PYTHONPATH``).
"""

from __future__ import annotations

import json
import random
import signal
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from discoverd import (
    ConfigError,
    HostInfo,
    PluginContext,
    PluginError,
    Proxy,
    ProxyConfigError,
    Registry,
    Service,
    ServiceInstance,
    build_config,
)
from discoverd.core.manager import PluginManager, get_plugin_manager
from tests.plugins.jsonfile.packaging import EXAMPLE, on_sys_path, subprocess_env
from tests.support.services import Etcd, wait_for

DISCOVERD = Path(sys.executable).with_name("discoverd")  # the venv's console script
PROJECT = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DISCOVERD), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def make_proxy(manager: PluginManager, state_dir: Path, **options: Any) -> Proxy:
    record = manager.proxy("json-file")
    config = build_config(record.config, options, section="json-file")
    host = HostInfo(ip="127.0.0.1", id="test-host")
    return record.factory(PluginContext(config=config, host=host, state_dir=state_dir))


def inst(service: str, iid: str, address: str, port: int, frontend: int, **extra: Any) -> Any:
    return ServiceInstance(service, iid, address, port, frontend_port=frontend, **extra)


WHOAMI_A = inst(
    "whoami", "host-a-736ab83847bb-8000-tcp", "10.170.71.227", 49153, 8000,
    tags=("web", "blue"), meta=(("mode", "http"), ("team", "edge")), host_id="host-a",
)  # fmt: skip
WHOAMI_B = inst(
    "whoami", "host-b-4eb0498e5207-8000-tcp", "10.170.71.228", 49154, 8000,
    meta=(("mode", "http"),), host_id="host-b",
)  # fmt: skip
REDIS = inst(
    "redis", "host-a-9c1d2e3f4a5b-6379-tcp", "10.170.71.227", 49155, 6379, host_id="host-a"
)


def expected_instance(i: ServiceInstance) -> dict[str, Any]:
    return {
        "id": i.id,
        "address": i.address,
        "port": i.port,
        "protocol": i.protocol,
        "host_id": i.host_id,
        "tags": list(i.tags),
        "meta": dict(i.meta),
    }


def expected_map(*services: tuple[str, int, str, list[ServiceInstance]]) -> dict[str, Any]:
    """The document, written out from what was registered (not from the plugin's code)."""
    return {
        "format": "discoverd-services/1",
        "services": [
            {
                "name": name,
                "frontend_port": port,
                "protocol": "tcp",
                "mode": mode,
                "meta": {},
                "instances": [expected_instance(i) for i in sorted(members, key=lambda i: i.id)],
            }
            for name, port, mode, members in sorted(services)
        ],
    }


# --------------------------------------------------------------------------------------------
# Listing and selection


def test_plugins_lists_the_installed_package(jsonfile_site: Path) -> None:
    env = subprocess_env(jsonfile_site)
    table = run("plugins", env=env)
    assert table.returncode == 0, table.stderr
    assert table.stderr == ""  # the package loads cleanly: no warning
    rows = [line.split(None, 5) for line in table.stdout.splitlines()]
    assert rows[0] == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "PLUGIN", "DESCRIPTION"]
    mine = [r for r in rows if r[1] == "json-file"]
    assert len(mine) == 1
    assert mine[0][:5] == ["proxy", "json-file", PROJECT["name"], PROJECT["version"], "json-file"]
    assert "JSON" in mine[0][5]
    etcd = next(r for r in rows if r[1] == "etcd")
    assert etcd[:4] == ["registry", "etcd", "discoverd", metadata.version("discoverd")]

    data = json.loads(run("plugins", "--json", env=env).stdout)
    component = next(c for c in data["components"] if c["name"] == "json-file")
    options = {o["name"]: o for o in component.pop("options")}
    assert list(options) == ["path", "indent"]
    assert (options["indent"]["default"], options["indent"]["max"]) == (2, 8)
    assert component == {
        "kind": "proxy",
        "name": "json-file",
        "description": mine[0][5],
        "plugin": "json-file",
        "distribution": PROJECT["name"],
        "version": PROJECT["version"],
    }
    plugin = next(p for p in data["plugins"] if p["name"] == "json-file")
    assert plugin["proxies"] == ["json-file"] and plugin["error"] is None
    assert plugin["hooks"] == ["discoverd_register_proxies"]


def test_without_the_package_json_file_is_unknown(tmp_path: Path) -> None:
    """The shared environment does not have it: only PYTHONPATH brings it in."""
    env = subprocess_env(DISCOVERD_STATE_DIR=str(tmp_path))
    assert "json-file" not in run("plugins", env=env).stdout
    result = run("render", "--proxy", "json-file", env=env)
    assert result.returncode == 2
    assert "Unknown proxy 'json-file'" in result.stderr


def test_manager_finds_it_through_the_entry_point(jsonfile_site: Path) -> None:
    with on_sys_path(jsonfile_site):
        manager = get_plugin_manager(disabled=())
    assert "json-file" in manager.proxies()
    component = next(c for c in manager.components() if c.name == "json-file")
    assert (component.kind, component.distribution, component.version) == (
        "proxy",
        PROJECT["name"],
        PROJECT["version"],
    )
    assert {o.name for o in manager.proxy("json-file").options} == {"path", "indent"}
    assert "json-file" not in get_plugin_manager().proxies()  # sys.path was restored
    assert not any(m.startswith("discoverd_jsonfile") for m in sys.modules)


# --------------------------------------------------------------------------------------------
# The Proxy contract, in process


def test_render_is_deterministic_and_complete(
    jsonfile_manager: PluginManager, tmp_path: Path
) -> None:
    proxy = make_proxy(jsonfile_manager, tmp_path)
    whoami = Service("whoami", 8000, mode="http", instances=(WHOAMI_B, WHOAMI_A))
    redis = Service("redis", 6379, instances=(REDIS,), meta=(("owner", "ops"),))
    text = proxy.render([whoami, redis])
    for _ in range(5):
        shuffled = [
            Service(s.name, s.frontend_port, s.protocol, s.mode,
                    tuple(random.sample(s.instances, len(s.instances))), s.meta)
            for s in random.sample([whoami, redis], 2)
        ]  # fmt: skip
        assert proxy.render(shuffled) == text
    expected = expected_map(("whoami", 8000, "http", [WHOAMI_A, WHOAMI_B]),
                            ("redis", 6379, "tcp", [REDIS]))  # fmt: skip
    expected["services"][0]["meta"] = {"owner": "ops"}
    assert json.loads(text) == expected
    assert text.endswith("\n") and text.count("\n") > 10  # indent 2 by default
    proxy.validate(text)
    assert proxy.render([]) == '{\n  "format": "discoverd-services/1",\n  "services": []\n}\n'
    compact = make_proxy(jsonfile_manager, tmp_path, indent=0).render([whoami, redis])
    assert compact.count("\n") == 1 and json.loads(compact) == expected


@pytest.mark.parametrize("indent", [0, 1, 2, 4, 8])
def test_render_reencodes_only_the_services_that_changed_and_gives_the_same_bytes(
    jsonfile_manager: PluginManager, tmp_path: Path, indent: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The core hands over an unchanged service as the same object: only the others are
    encoded again, and the text is one ``json.dumps`` of the whole document every time."""
    proxy = make_proxy(jsonfile_manager, tmp_path, indent=indent)
    module = sys.modules[type(proxy).__module__]
    encoded: list[str] = []
    real = module.service_dict

    def counted(service: Service) -> dict[str, Any]:
        encoded.append(service.name)
        return dict(real(service))

    monkeypatch.setattr(module, "service_dict", counted)

    def dumped(services: list[Service]) -> str:
        document = json.loads(proxy.render(services))  # the plugin's own view of the fields
        if indent:
            return json.dumps(document, indent=indent, sort_keys=True) + "\n"
        return json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n"

    assert proxy.render([]) == dumped([])
    whoami = Service("whoami", 8000, mode="http", instances=(WHOAMI_B, WHOAMI_A))
    redis = Service("redis", 6379, instances=(REDIS,), meta=(("owner", "ops"), ("q", 'a"\\b')))
    text = proxy.render([whoami, redis])
    assert text == dumped([whoami, redis])
    assert sorted(encoded) == ["redis", "whoami"]
    encoded.clear()
    more = Service("whoami", 8000, mode="http", instances=(WHOAMI_A,))
    changed = proxy.render([redis, more])  # redis: the same object, not encoded again
    assert encoded == ["whoami"]
    assert changed == dumped([redis, more]) != text
    proxy.validate(changed)
    encoded.clear()
    equal = Service("redis", 6379, instances=(REDIS,), meta=(("owner", "ops"), ("q", 'a"\\b')))
    assert proxy.render([equal, more]) == changed  # a new object: encoded, the same bytes
    assert encoded == ["redis"]
    assert proxy.render([]) == dumped([])


def test_validate_of_its_own_render_refuses_what_a_full_check_refuses(
    jsonfile_manager: PluginManager, tmp_path: Path
) -> None:
    """``validate`` handed the proxy's own last render checks only its entries: what a full
    check of the same text refuses, it refuses with the same words."""
    proxy = make_proxy(jsonfile_manager, tmp_path)
    other = inst("whoami", "host-c-1-8000-tcp", "10.170.71.229", 49156, 8000)
    for services in (
        [Service("whoami", 8000, instances=(WHOAMI_A,)), Service("whoami", 8001)],
        [Service("whoami", 8000, instances=(WHOAMI_A,)), Service("web", 8000, instances=(other,))],
    ):
        text = proxy.render(services)
        with pytest.raises(ProxyConfigError) as own:
            proxy.validate(text)
        with pytest.raises(ProxyConfigError) as full:
            proxy.validate(text.replace("\n", "\n "))  # another text: parsed as a whole
        assert str(own.value) == str(full.value)
        assert "twice" in str(own.value)
    good = proxy.render([Service("whoami", 8000, instances=(WHOAMI_A,))])
    proxy.validate(good)
    proxy.validate(good)  # its entry is checked once, and stays valid


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.pop("format"), "missing key 'format'"),
        (lambda d: d.update(format="other/2"), "format"),
        (lambda d: d.update(extra=1), "unknown key 'extra'"),
        (lambda d: d.update(services={}), "services: expected a list"),
        (lambda d: d["services"][0].update(frontend_port=0), "services[0].frontend_port"),
        (lambda d: d["services"][0].update(frontend_port=True), "services[0].frontend_port"),
        (lambda d: d["services"][0].update(mode="udp"), "services[0].mode"),
        (lambda d: d["services"][0].update(name=""), "services[0].name"),
        (lambda d: d["services"].append(dict(d["services"][0])), "appears twice"),
        (lambda d: d["services"][0]["instances"][1].update(port="80"), "instances[1].port"),
        (lambda d: d["services"][0]["instances"][0].pop("id"), "instances[0]: missing key 'id'"),
        (lambda d: d["services"][0]["instances"][0].update(tags=[1]), "instances[0].tags[0]"),
        (lambda d: d["services"][0]["instances"][0]["meta"].update(k=2), "instances[0].meta.k"),
    ],
)
def test_validate_refuses_what_is_not_a_service_map(
    jsonfile_manager: PluginManager, tmp_path: Path, mutate: Any, fragment: str
) -> None:
    proxy = make_proxy(jsonfile_manager, tmp_path)
    document = json.loads(proxy.render([Service("whoami", 8000, instances=(WHOAMI_A, WHOAMI_B))]))
    mutate(document)
    with pytest.raises(ProxyConfigError) as info:
        proxy.validate(json.dumps(document))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '{"format": "discoverd-services/1"}'])
def test_validate_refuses_broken_json(
    jsonfile_manager: PluginManager, tmp_path: Path, text: str
) -> None:
    with pytest.raises(ProxyConfigError, match="json-file"):
        make_proxy(jsonfile_manager, tmp_path).validate(text)


def test_apply_writes_atomically_and_says_what_it_did(
    jsonfile_manager: PluginManager, tmp_path: Path
) -> None:
    target = tmp_path / "out" / "nested" / "map.json"
    proxy = make_proxy(jsonfile_manager, tmp_path / "state", path=str(target))
    one = [Service("whoami", 8000, instances=(WHOAMI_A,))]
    two = [Service("whoami", 8000, instances=(WHOAMI_A, WHOAMI_B))]
    first, second = proxy.render(one), proxy.render(two)

    assert proxy.apply_delay(first, one) == 0
    assert proxy.apply(first, one) == "started"  # the file did not exist
    assert target.read_text() == first
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    inode = target.stat().st_ino

    assert proxy.apply(first, one) == "unchanged"
    assert target.stat().st_ino == inode  # not rewritten

    assert proxy.apply(second, two) == "reloaded"
    assert target.read_text() == second
    assert target.stat().st_ino != inode  # replaced by a rename, never written in place
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["map.json"]  # no temp files left
    assert not (tmp_path / "state").exists()  # an absolute path does not use the state dir

    target.write_text("garbage")
    assert proxy.apply(second, two) == "reloaded"  # whatever was there is replaced
    assert target.read_text() == second
    proxy.close()


def test_apply_failure_is_a_plugin_error_and_leaves_no_temp_file(
    jsonfile_manager: PluginManager, tmp_path: Path
) -> None:
    target = tmp_path / "out" / "map.json"
    target.mkdir(parents=True)  # a directory where the file should be: the rename must fail
    (target / "keep").write_text("x")
    proxy = make_proxy(jsonfile_manager, tmp_path, path=str(target))
    services = [Service("whoami", 8000, instances=(WHOAMI_A,))]
    with pytest.raises(PluginError) as info:
        proxy.apply(proxy.render(services), services)
    assert str(info.value).startswith(f"json-file: cannot write {target}: ")
    assert sorted(p.name for p in target.parent.iterdir()) == ["map.json"]
    assert (target / "keep").read_text() == "x"


def test_default_path_and_option_checks(jsonfile_manager: PluginManager, tmp_path: Path) -> None:
    proxy = make_proxy(jsonfile_manager, tmp_path / "state")
    assert proxy.apply(proxy.render([]), []) == "started"
    assert (tmp_path / "state" / "services.json").is_file()
    relative = make_proxy(jsonfile_manager, tmp_path / "state", path="maps/all.json")
    assert relative.apply(relative.render([]), []) == "started"
    assert (tmp_path / "state" / "maps" / "all.json").is_file()
    with pytest.raises(ConfigError, match=r"json-file\.indent' = 9: must be from 0 to 8"):
        make_proxy(jsonfile_manager, tmp_path, indent=9)
    with pytest.raises(ConfigError, match=r"json-file\.path' = '\.\.': must name a file"):
        make_proxy(jsonfile_manager, tmp_path, path="..")


def test_check_validates_the_plugin_section(jsonfile_site: Path, tmp_path: Path) -> None:
    env = subprocess_env(jsonfile_site)
    good = tmp_path / "good.toml"
    good.write_text('proxy = "json-file"\n\n[json-file]\nindent = 4\npath = "map.json"\n')
    result = run("check", str(good), env=env)
    assert result.returncode == 0, result.stderr
    assert "proxy json-file" in result.stdout
    for text, fragment in [
        ('proxy = "json-file"\n[json-file]\nindent = 12\n', "must be from 0 to 8"),
        ('proxy = "json-file"\n[json-file]\nindent = "wide"\n', "json-file.indent"),
        ('proxy = "json-file"\n[json-file]\nmode = 1\n', "unknown key 'json-file.mode'"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        result = run("check", str(bad), env=env)
        assert result.returncode == 2, result.stdout
        assert fragment in result.stderr and "bad.toml" in result.stderr


# --------------------------------------------------------------------------------------------
# Against a real etcd: instances registered through the etcd plugin


@pytest.fixture
def etcd_registry(etcd: Etcd, tmp_path: Path) -> Iterator[Registry]:
    """The etcd plugin as the register role uses it (entries on a lease of this test's etcd)."""
    record = get_plugin_manager().registry("etcd")
    config = build_config(record.config, {"endpoints": [etcd.endpoint]}, section="etcd")
    host = HostInfo(ip="127.0.0.1", id="host-a")
    registry = record.factory(PluginContext(config=config, host=host, state_dir=tmp_path))
    yield registry
    registry.close(deregister=True)


def etcd_env(site: Path, etcd: Etcd, state: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(
        site,
        ETCD_HOST=etcd.endpoint,
        DISCOVERD_STATE_DIR=str(state),
        DISCOVERD_DEFAULT_MODE="tcp",
        **extra,
    )


@pytest.mark.services
def test_render_from_etcd(
    jsonfile_site: Path, etcd: Etcd, etcd_registry: Registry, tmp_path: Path
) -> None:
    for instance in (WHOAMI_A, WHOAMI_B, REDIS):
        etcd_registry.register(instance)
    env = etcd_env(jsonfile_site, etcd, tmp_path / "state")
    result = run("render", "--proxy", "json-file", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected_map(
        ("whoami", 8000, "http", [WHOAMI_A, WHOAMI_B]), ("redis", 6379, "tcp", [REDIS])
    )
    assert run("render", "--proxy", "json-file", env=env).stdout == result.stdout
    compact = run("render", "--proxy", "json-file", "--set", "json-file.indent=0", env=env)
    assert compact.stdout.count("\n") == 1
    assert json.loads(compact.stdout) == json.loads(result.stdout)
    assert not (tmp_path / "state").exists()  # render changes nothing


@pytest.mark.services
def test_discover_keeps_the_file_up_to_date(
    jsonfile_site: Path, etcd: Etcd, etcd_registry: Registry, tmp_path: Path
) -> None:
    target = tmp_path / "out" / "services.json"
    etcd_registry.register(WHOAMI_A)
    env = etcd_env(jsonfile_site, etcd, tmp_path / "state", DISCOVERD_JSON_FILE_PATH=str(target))
    log = (tmp_path / "discover.log").open("w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "discoverd", "discover", "--registry", "etcd", "--proxy",
         "json-file", "--log-level", "debug"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip

    def holds(expected: dict[str, Any]) -> bool:
        return bool(json.loads(target.read_text()) == expected)

    try:
        wait_for(lambda: holds(expected_map(("whoami", 8000, "http", [WHOAMI_A]))), 60,
                 what="the first service map")  # fmt: skip
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        etcd_registry.register(WHOAMI_B)
        etcd_registry.register(REDIS)
        both = expected_map(("whoami", 8000, "http", [WHOAMI_A, WHOAMI_B]),
                            ("redis", 6379, "tcp", [REDIS]))  # fmt: skip
        wait_for(lambda: holds(both), 60, what="the map with three instances")
        etcd_registry.deregister(WHOAMI_A)
        rest = expected_map(("whoami", 8000, "http", [WHOAMI_B]), ("redis", 6379, "tcp", [REDIS]))
        wait_for(lambda: holds(rest), 60, what="the map without the deregistered instance")
        rendered = run("render", "--proxy", "json-file", env=env).stdout
        assert target.read_text() == rendered  # the file is exactly what render prints
        assert sorted(p.name for p in target.parent.iterdir()) == ["services.json"]
    finally:
        agent.send_signal(signal.SIGTERM)
        code: int | None
        try:
            code = agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
            code = None
        log.close()
    output = (tmp_path / "discover.log").read_text()
    assert code == 0, output
    assert "Traceback" not in output
    assert "reloaded" in output or "started" in output
