"""``held_ports``: which frontend ports another process holds, and which process; probed on
127.0.0.1 and ::1 only, with real sockets."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from discoverd.proxykit import HeldPort, OwnPage, held_ports
from discoverd.proxykit.ports import _diag, _proc_net
from tests.support.services import free_port, wait_for

LISTENER = (
    "import socket, sys, time\n"
    "s = socket.socket()\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "s.listen()\n"
    "print('up', flush=True)\n"
    "time.sleep(60)\n"
)


@contextlib.contextmanager
def listening(
    address: str = "127.0.0.1", *, kind: int = socket.SOCK_STREAM, v6only: bool | None = None
) -> Iterator[tuple[socket.socket, int]]:
    """A socket of this process bound (and listening, for tcp) on a free port of ``address``."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, kind) as sock:
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind((address, free_port()))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        yield sock, int(sock.getsockname()[1])


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_a_free_port_is_not_held() -> None:
    port = free_port()
    assert held_ports("127.0.0.1", [port]) == {}
    assert held_ports("127.0.0.1", [port], "udp") == {}
    assert held_ports("", []) == {}


def test_a_port_another_process_listens_on_is_held_and_the_process_named(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "out"
    with open(out, "w") as handle:
        child = subprocess.Popen(
            [sys.executable, "-c", LISTENER, str(port)], stdout=handle, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: out.read_text() == "up\n", 10, what="the listener")
        found = held_ports("127.0.0.1", [port, free_port()])
        assert list(found) == [port], found
        held = found[port]
        assert (held.pid, held.uid, held.protocol) == (child.pid, os.geteuid(), "tcp")
        assert held.command == Path(f"/proc/{child.pid}/comm").read_text().strip()
        assert held.describe("frontend port") == (
            f"frontend port {port} is held by another process ({held.command}, pid {child.pid})"
        )
        # The wildcard address overlaps the loopback one.
        assert list(held_ports("", [port])) == [port]
        # Once it is gone, the port is free again.
        child.kill()
        child.wait()
        assert held_ports("127.0.0.1", [port]) == {}
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def closed_by_server(reuse: bool) -> int:
    """A port left with a connection in TIME_WAIT (the server closed first) and no listener;
    ``reuse``: the listener had SO_REUSEADDR, as HAProxy's and nginx's have."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse))
        server.bind(("127.0.0.1", free_port()))
        server.listen()
        port = int(server.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the side that closes first keeps TIME_WAIT, on local port `port`
        wait_for(lambda: client.recv(1) == b"", 5, what="the close to reach the client")
        client.close()
    # A bind without SO_REUSEADDR fails: there is a socket in TIME_WAIT on the port.
    with socket.socket() as plain, pytest.raises(OSError) as caught:
        plain.bind(("127.0.0.1", port))
    assert caught.value.errno == errno.EADDRINUSE
    return port


def test_a_connection_in_time_wait_does_not_hold_the_port() -> None:
    # A port a proxy served a moment ago: its connections in TIME_WAIT hold nothing.
    assert held_ports("127.0.0.1", [closed_by_server(reuse=True)]) == {}
    # Left by a program without SO_REUSEADDR, they hold it (HAProxy's bind fails too, for
    # up to a minute): reported, with no process to name.
    port = closed_by_server(reuse=False)
    held = held_ports("127.0.0.1", [port])[port]
    assert (held.pid, held.uid) == (None, None)
    assert held.describe("frontend port") == (
        f"frontend port {port} is in use by a socket no process listens on "
        "(e.g. a connection closing)"
    )


def test_another_address_does_not_hold_the_port() -> None:
    with listening("127.0.0.1") as (_, port):
        assert list(held_ports("127.0.0.1", [port])) == [port]
        assert held_ports("127.0.0.2", [port]) == {}  # another loopback address: no conflict


def test_the_proxy_s_own_sockets_are_not_reported() -> None:
    with listening() as (_, port):
        assert list(held_ports("127.0.0.1", [port])) == [port]
        assert held_ports("127.0.0.1", [port], owners=[os.getpid()]) == {}
        # A holder named by its process when the proxy is not the owner.
        held = held_ports("127.0.0.1", [port], owners=[1])[port]
        assert held.pid == os.getpid()


def test_udp_ports_are_probed_as_udp() -> None:
    with listening(kind=socket.SOCK_DGRAM) as (_, port):
        assert held_ports("127.0.0.1", [port], "tcp") == {}
        held = held_ports("127.0.0.1", [port], "udp")[port]
        assert (held.protocol, held.pid) == ("udp", os.getpid())
        assert held.describe("frontend port").startswith(f"frontend port {port}/udp is held")
    with pytest.raises(ValueError, match="tcp or udp"):
        held_ports("127.0.0.1", [1], "sctp")


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_and_dual_stack_sockets() -> None:
    with listening("::1", v6only=True) as (_, port):
        assert list(held_ports("::1", [port])) == [port]
        assert held_ports("127.0.0.1", [port]) == {}  # another family
        assert held_ports("", [port]) == {}
    # An IPv6 socket bound to a v4-mapped address holds the IPv4 port.
    with listening("::ffff:127.0.0.1", v6only=False) as (_, port):
        held = held_ports("127.0.0.1", [port])
        assert list(held) == [port] and held[port].pid == os.getpid()


def test_the_kernel_s_socket_table_and_proc_net_agree() -> None:
    with listening() as (_, port), listening(kind=socket.SOCK_DGRAM) as (_, udp_port):
        for protocol, number, wanted in (("tcp", 6, port), ("udp", 17, udp_port)):
            from_diag = {s for s in _diag(socket.AF_INET, number, protocol) if s.port == wanted}
            from_proc = {s for s in _proc_net(socket.AF_INET, protocol) if s.port == wanted}
            assert from_diag == from_proc
            assert [(s.address, s.uid) for s in from_diag] == [("127.0.0.1", os.geteuid())]


def as_nobody(address: str, ports: list[int], executable: str | None) -> dict[int, bool]:
    """``held_ports`` run in a child process that dropped to nobody: {port: privileged}."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec, the modules are loaded already
        code = 1
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            found = held_ports(address, ports, executable=executable)
            os.write(writer, repr({p: h.privileged for p, h in found.items()}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result: dict[int, bool] = eval(text)  # our own child's repr of a dict
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")
def test_a_privileged_port_is_reported_only_without_the_privilege() -> None:
    if int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 80:
        pytest.skip("port 80 is not privileged on this host")
    assert HeldPort(80, privileged=True).describe("frontend port") == (
        "frontend port 80 can only be bound with root or CAP_NET_BIND_SERVICE"
    )
    assert held_ports("127.0.0.1", [80]) == {}  # root may bind it
    # nobody may not: reported, whatever binary (here one without file capabilities).
    assert as_nobody("127.0.0.1", [80], None) == {80: True}
    assert as_nobody("127.0.0.1", [80], "/bin/true") == {80: True}
    # A proxy binary given CAP_NET_BIND_SERVICE may bind what discoverd may not.
    setcap = shutil.which("setcap")
    folder = Path(tempfile.mkdtemp(prefix="dp-"))  # nobody must reach the binary
    try:
        folder.chmod(0o755)
        capable = folder / "capable"
        shutil.copy("/bin/true", capable)
        given = [setcap or "setcap", "cap_net_bind_service+ep", str(capable)]
        if setcap is None or subprocess.run(given, capture_output=True).returncode != 0:
            pytest.skip("cannot give a file capabilities here")
        assert as_nobody("127.0.0.1", [80], str(capable)) == {}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- OwnPage: a stats page left out while its port is held --------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_page_on_a_free_port_is_wanted_and_nothing_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    page = OwnPage("proxy", "stats port", "127.0.0.1", free_port())
    assert page.wanted()
    assert page.reason is None
    assert not caplog.records
    assert not OwnPage("proxy", "stats port", "127.0.0.1", 0).wanted()  # disabled


def test_a_page_whose_port_is_held_is_left_out_until_the_port_is_free(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    with listening() as (_, port):
        page = OwnPage("proxy", "stats port", "127.0.0.1", port, recheck=1.0, clock=clock)
        with caplog.at_level("WARNING", logger="discoverd.proxykit.ports"):
            assert not page.wanted()
            assert not page.wanted()
        assert page.reason == f"stats port {port} is held by another process " + (
            f"({Path(f'/proc/{os.getpid()}/comm').read_text().strip()}, pid {os.getpid()})"
        )
        said = [r.getMessage() for r in caplog.records]
        assert said == [
            f"proxy: {page.reason}: the page is left out of the configuration until the port "
            "is free (every service is still served)"
        ]
        # The running proxy's own processes do not hold it for it.
        assert OwnPage("proxy", "stats port", "127.0.0.1", port).wanted(master=os.getpid())
        # The proxy running with the page binds the port itself: no probe, wanted.
        assert OwnPage("proxy", "stats port", "127.0.0.1", port).wanted(running_binds=True)
    caplog.clear()
    # Free now, but the renders of one pass agree: not probed again within ``recheck``.
    assert not page.wanted()
    clock.now += 1.0
    with caplog.at_level("WARNING", logger="discoverd.proxykit.ports"):
        assert page.wanted()
    assert page.reason is None
    assert [r.getMessage() for r in caplog.records] == [
        f"proxy: stats port {port} is free: the page is back from the next configuration"
    ]
