"""nginx identified by what a local user cannot fake, and workers that are not root (issue 9),
against the real nginx binary."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from discoverd.plugins.nginx.processes import holding, masters_of
from discoverd.plugins.nginx.proxy import NginxProxy
from discoverd.proxykit import child_pids, pid_alive
from tests.plugins.impostors import NOBODY, impostor
from tests.plugins.nginx.conftest import NameServer, http_service
from tests.plugins.traffic import apply_servable
from tests.support.services import free_port, http_get, wait_for

MakeNginx = Callable[..., NginxProxy]
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
    """A folder nobody may read and write (an impostor nginx's own prefix)."""
    folder = Path(tempfile.mkdtemp(prefix="di-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("who", ["another binary", "another user"])
def test_a_process_dressed_up_as_the_master_is_neither_adopted_nor_signalled(
    who: str, make_nginx: MakeNginx, backends: Backends, open_folder: Path
) -> None:
    """After a reboot the pid file is stale and the title search runs: a process of another
    user titled ``nginx: master process ... -c <state>/nginx/nginx.conf`` (the real nginx
    binary, with our error log open for reading, so it also looks like a stray worker), or one
    of root running another binary, is not adopted, not reloaded, not stopped."""
    proxy = make_nginx()
    a = backends("a")
    services = [http_service("alpha", free_port(), a)]
    apply_servable(proxy, services)  # our nginx made its error log; then it stops
    assert proxy.stop_process() is True
    title = f"nginx -c {proxy.config_file}"
    if who == "another binary":
        fake = ["sleep", "60"]
        argv0 = f"nginx: master process {title}"
    else:
        config = open_folder / "nginx.conf"
        config.write_text(
            f"daemon off;\npid {open_folder}/nginx.pid;\nworker_processes 1;\nevents {{}}\n"
        )
        config.chmod(0o644)
        fake = [proxy.master.executable(), "-p", f"{open_folder}/", "-c", str(config)]
        fake += ["-e", f"{open_folder}/error.log"]
        argv0 = title  # nginx titles itself "nginx: master process <argv...>"
    with (
        open(proxy.error_log) as reading,
        impostor(
            argv0, fake, as_nobody=who == "another user", pass_fds=[reading.fileno()]
        ) as child,
    ):
        # Its title alone would pass. The real nginx retitles itself ("nginx: master process
        # ...") only once it has read its configuration: the impostor may still run before that.
        wait_for(lambda: masters_of(proxy.config_file) == [child.pid], 10, what="the title")
        assert not proxy.master.pid_file.trusted(child.pid)
        if who == "another user":
            wait_for(lambda: len(child_pids(child.pid)) == 1, 10, what="its worker")
            for pid in (child.pid, *child_pids(child.pid)):  # it holds the log open ...
                links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
                assert str(proxy.error_log) in links
            # ... for reading only: not one of ours left behind by a killed master.
            assert holding(proxy.error_log, proxy.master.executable()) == set()
        proxy.pid_file.write_text(f"{child.pid}\n")
        assert proxy.master_pid() is None
        assert apply_servable(proxy, services) == ({}, "started")
        master = proxy.master_pid()
        assert master not in (None, child.pid)
        assert http_get(f"http://127.0.0.1:{services[0].frontend_port}/") == "I am a\n"
        assert proxy.stop_process() is True
        assert master is not None and not pid_alive(master)
        assert child.poll() is None and pid_alive(child.pid)  # never signalled
        proxy.pid_file.write_text(f"{child.pid}\n")
        assert proxy.stop_process() is False
        assert child.poll() is None
        for worker in child_pids(child.pid):
            assert pid_alive(worker)


@pytest.mark.skipif(os.geteuid() != 0, reason="discoverd runs as root only here")
def test_as_root_nginx_s_workers_run_unprivileged(
    make_nginx: MakeNginx, backends: Backends
) -> None:
    proxy = make_nginx()  # option user empty: nginx's default
    services = [http_service("alpha", free_port(), backends("a"))]
    assert apply_servable(proxy, services) == ({}, "started")
    master = proxy.master_pid()
    assert master is not None and ids(master)[0] == [0, 0, 0, 0]
    workers = proxy.worker_pids()
    assert workers
    for worker in workers:
        uids, gids, groups = ids(worker)
        assert uids == [NOBODY] * 4, f"worker {worker} runs as {uids}"
        assert 0 not in gids and 0 not in groups, f"worker {worker} has group 0: {gids} {groups}"
    assert http_get(f"http://127.0.0.1:{services[0].frontend_port}/") == "I am a\n"
