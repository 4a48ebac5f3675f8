"""HAProxy identified by what a local user cannot fake, and workers that drop root (issue 9),
against the real haproxy binary."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from discoverd import PluginError
from discoverd.plugins.haproxy.config import HAProxyConfig, WorkerUser, worker_user
from discoverd.plugins.haproxy.proxy import HAProxy
from discoverd.proxykit import pid_alive
from tests.plugins.haproxy.conftest import NameServer, haproxy_context, http_service
from tests.plugins.impostors import NOBODY, impostor
from tests.plugins.traffic import apply_servable
from tests.support.services import free_port, http_get

MakeHAProxy = Callable[..., HAProxy]
Backends = Callable[[str], NameServer]


def ids(pid: int) -> tuple[list[int], list[int], list[int]]:
    """(real, effective, saved, fs uids), (the same gids), supplementary groups of ``pid``."""
    fields: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(x) for x in value.split()]
    return fields["Uid"], fields["Gid"], fields["Groups"]


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder nobody may read and write (for an impostor's own files)."""
    folder = Path(tempfile.mkdtemp(prefix="di-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Identity: a stale pid file and a master-socket path in argv prove nothing


@pytest.mark.parametrize("who", ["another binary", "another user"])
def test_a_process_dressed_up_as_the_master_is_neither_adopted_nor_signalled(
    who: str, make_haproxy: MakeHAProxy, backends: Backends, open_folder: Path
) -> None:
    proxy = make_haproxy()
    proxy.prepare()
    argv0 = f"{proxy.master_socket},mode,600"  # what the identity check used to look for
    if who == "another binary":
        fake = ["sleep", "60"]
    else:  # the real haproxy binary, as nobody, serving its own configuration
        config = open_folder / "h.cfg"
        config.write_text(
            "global\n    maxconn 10\ndefaults\n    mode tcp\n    timeout connect 1s\n"
            "    timeout client 1s\n    timeout server 1s\nfrontend f\n"
            f"    bind 127.0.0.1:{free_port()}\n    tcp-request connection reject\n"
        )
        config.chmod(0o644)
        fake = [proxy.master.executable(), "-db", "-f", str(config)]
    with impostor(argv0, fake, as_nobody=who == "another user") as child:
        assert proxy.master.is_ours(child.pid)  # its command line alone would pass
        assert not proxy.master.pid_file.trusted(child.pid)
        # After a reboot the pid file names a pid the impostor now has.
        proxy.pid_file.write_text(f"{child.pid}\n")
        assert proxy.master.running_pid() is None
        services = [http_service("alpha", free_port(), backends("a"))]
        assert apply_servable(proxy, services) == ({}, "started")  # not adopted
        assert http_get(f"http://127.0.0.1:{services[0].frontend_port}/") == "I am a\n"
        master = proxy.master.running_pid()
        assert master not in (None, child.pid)
        assert proxy.stop_process() is True
        assert master is not None and not pid_alive(master)
        assert child.poll() is None and pid_alive(child.pid)  # never signalled
        # A stop with the impostor's pid in the pid file signals nothing.
        proxy.pid_file.write_text(f"{child.pid}\n")
        assert proxy.stop_process() is False
        assert child.poll() is None


# --------------------------------------------------------------------------------------------
# Workers drop root


def test_worker_user_as_root_and_not() -> None:
    config = haproxy_context(Path("/run/discoverd")).config
    assert worker_user(config, is_root=False) == WorkerUser()
    nobody = worker_user(config, is_root=True)
    assert nobody.user == "nobody" and nobody.group not in ("", "root")
    with pytest.raises(PluginError, match="no user 'no-such-user-x'"):
        worker_user(haproxy_context(Path("/x"), user="no-such-user-x").config, is_root=True)
    with pytest.raises(PluginError, match="no group 'no-such-group-x'"):
        worker_user(haproxy_context(Path("/x"), group="no-such-group-x").config, is_root=True)
    with pytest.raises(PluginError, match="unprivileged"):
        worker_user(haproxy_context(Path("/x"), user="root").config, is_root=True)
    with pytest.raises(PluginError, match="unprivileged"):
        worker_user(haproxy_context(Path("/x"), group="root").config, is_root=True)


def test_options_set_without_root_are_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = haproxy_context(Path("/x"), user="www-data").config
    with caplog.at_level(logging.WARNING):
        assert worker_user(config, is_root=False) == WorkerUser()
    assert "ignored" in caplog.text and "www-data" in caplog.text


def test_as_root_the_global_section_names_the_workers_user_and_only_then() -> None:
    config: HAProxyConfig = haproxy_context(Path("/run/discoverd")).config
    services = [http_service("alpha", 8000)]
    pinned = HAProxy(config, Path("/run/discoverd"), workers=WorkerUser("nobody", "nogroup"))
    plain = HAProxy(config, Path("/run/discoverd"), workers=WorkerUser())
    rooted, unrooted = pinned.render(services), plain.render(services)
    global_section = rooted.split("\n\n")[1]
    assert "\n    user nobody\n    group nogroup\n" in global_section
    assert "user " not in unrooted and "group " not in unrooted
    # Nothing else differs: the same text without the three lines.
    lines = [line for line in rooted.splitlines() if line not in unrooted.splitlines()]
    assert [line.split()[0] for line in lines] == ["#", "user", "group"]


@pytest.mark.skipif(os.geteuid() != 0, reason="discoverd runs as root only here")
def test_as_root_the_workers_run_as_nobody_and_reloads_and_the_runtime_api_still_work(
    make_haproxy: MakeHAProxy, backends: Backends
) -> None:
    proxy = make_haproxy(check_interval="100ms")
    a, b = backends("a"), backends("b")
    port = free_port()
    web = http_service("web", port, a)
    assert apply_servable(proxy, [web]) == ({}, "started")

    def check_workers() -> None:
        status = proxy.status()
        assert status is not None and status.workers
        master_uids, _, _ = ids(status.master)
        assert master_uids == [0, 0, 0, 0]  # the master stays root (it re-executes on reload)
        for worker in status.workers:
            uids, gids, groups = ids(worker)
            assert uids == [NOBODY] * 4, f"worker {worker} runs as {uids}"
            assert 0 not in gids and 0 not in groups, f"worker {worker} has group 0"

    check_workers()
    # A reload (the master stays root, re-executes; the new worker drops again) ...
    more = [web, http_service("more", free_port(), b)]
    assert apply_servable(proxy, more) == ({}, "reloaded")
    check_workers()
    # ... a change through the runtime API (the admin socket, made by the root master) ...
    both = [http_service("web", port, a, b), more[1]]
    assert apply_servable(proxy, both) == ({}, "runtime")
    assert sorted({http_get(f"http://127.0.0.1:{port}/") for _ in range(6)}) == [
        "I am a\n",
        "I am b\n",
    ]
    check_workers()
    # ... and the server-state file the root master loads across a reload.
    assert apply_servable(proxy, [*both, http_service("third", free_port(), a)]) == (
        {},
        "reloaded",
    )
    assert proxy.server_state.exists()
    check_workers()
