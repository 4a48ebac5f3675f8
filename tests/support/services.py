"""Launchers for the real services that discoverd's tests, demo and benchmarks run against.

* :class:`DockerDaemon` starts a private ``dockerd`` (vfs storage, no iptables) with its own
  socket, data and exec roots and, optionally, its own Linux bridge, so that several daemons can
  run side by side and play several Docker hosts.
* :class:`Etcd` starts a single-member etcd on loopback ports.
* :func:`ensure_images` builds the local test images from the host's static busybox (no image
  registry is needed), and :func:`run_whoami` runs a tiny HTTP backend answering
  ``I am <container hostname>``.

Every service listens on 127.0.0.1 only. The binaries come from the system packages that
``scripts/install-deps.sh`` installs; a missing one raises :class:`ServiceUnavailable`.

These are discoverd's own test tooling, not shipped in the package. The small helpers that the
public conformance kit needs as well (:func:`free_port`, :func:`http_get`,
:class:`ServiceUnavailable`, the binary lookup of :func:`require_binary`) come from
:mod:`discoverd.testing.conformance.common` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import docker
import docker.errors

from discoverd.proxykit.process import pid_alive
from discoverd.testing.conformance.common import (
    _SBIN_DIRS,
    ServiceUnavailable,
    free_port,
    http_get,
)
from discoverd.testing.conformance.common import require_binary as _kit_require_binary

if TYPE_CHECKING:
    from docker.models.containers import Container

__all__ = [
    "BUSYBOX_IMAGE",
    "WHOAMI_COMMAND",
    "WHOAMI_IMAGE",
    "DockerDaemon",
    "Etcd",
    "ServiceUnavailable",
    "ensure_images",
    "free_port",
    "graceful_whoami_command",
    "http_get",
    "published_port",
    "require_binary",
    "run_whoami",
    "wait_for",
]

_INSTALL_HINT = "run scripts/install-deps.sh (as root) to install the services the tests need"
# Unix socket paths must stay under 108 bytes. The deepest socket lies ~30 characters below the
# socket directory (exec/libnetwork/<id>.sock), so a longer root gets its sockets and exec root
# in a short directory under /tmp instead.
_MAX_SOCKET_DIR_LEN = 50


# --------------------------------------------------------------------------------------------
# Small helpers


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Call ``predicate`` every ``interval`` seconds until it returns true.

    An exception raised by ``predicate`` counts as "not yet" (so ``lambda: "I am" in
    http_get(url)`` is fine); the last one is chained to the :class:`TimeoutError` raised, naming
    ``what``, when ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            if predicate():
                return
            last_error = None
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    detail = f" (last error: {last_error!r})" if last_error is not None else ""
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{detail}") from last_error


def require_binary(name: str) -> str:
    """Return the path of the executable ``name``, or raise :class:`ServiceUnavailable`.

    The lookup of the conformance kit's ``require_binary`` (``PATH``, then the sbin
    directories), with a hint to run ``scripts/install-deps.sh`` when the binary is missing.
    """
    try:
        return _kit_require_binary(name)
    except ServiceUnavailable as exc:
        raise ServiceUnavailable(f"{exc}; {_INSTALL_HINT}") from None


def _tool_env(*, drop_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not (drop_prefixes and key.startswith(drop_prefixes))
    }
    path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep)
    env["PATH"] = os.pathsep.join(path + [d for d in _SBIN_DIRS if d not in path])
    return env


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"last lines of {path}:\n{tail}"


def _proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _proc_cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _proc_ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[-1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; always reaps the process."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _kill_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _wait_until_up(
    proc: subprocess.Popen[bytes],
    check: Callable[[], bool],
    timeout: float,
    what: str,
    log_path: Path,
) -> None:
    """Wait until ``check()`` passes; stop ``proc`` and raise ServiceUnavailable otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        code = proc.poll()
        if code is not None:
            raise ServiceUnavailable(
                f"{what} exited with status {code} while starting; {_log_tail(log_path)}"
            )
        if time.monotonic() >= deadline:
            _stop_process(proc, 5)
            raise ServiceUnavailable(
                f"{what} did not come up within {timeout:g}s; {_log_tail(log_path)}"
            )
        time.sleep(0.05)


def _run_checked(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, env=_tool_env(), check=False)
    if result.returncode != 0:
        raise ServiceUnavailable(
            f"command {' '.join(cmd)!r} failed ({result.returncode}): {result.stderr.strip()}"
        )


# --------------------------------------------------------------------------------------------
# Docker Engine

_MNT_DETACH = 2


def _unmount_below(*dirs: Path) -> None:
    """Lazily unmount every mount point below ``dirs`` (deepest first).

    dockerd bind-mounts its data root onto itself and keeps network namespaces mounted under its
    exec root; a daemon that was killed leaves them behind, and they make the folders
    undeletable.
    """
    prefixes = [str(d) for d in dirs]
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points: list[str] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].encode().decode("unicode_escape")  # mountinfo escapes " " as \040
        if any(point.startswith(p + "/") for p in prefixes):
            points.append(point)
    if not points:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for point in sorted(set(points), key=len, reverse=True):
        libc.umount2(point.encode(), _MNT_DETACH)


class _Service:
    """What the launchers share: one main process, a context manager that starts and stops it."""

    _proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The process id of the running main process (dockerd, etcd), or None."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 30) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class DockerDaemon(_Service):
    """A private ``dockerd`` as one test "host", with its own ``containerd``.

    Layout: ``<root>/data`` (data root, vfs storage), ``<root>/exec`` (exec root),
    ``<root>/docker.sock``, ``<root>/docker.pid``, ``<root>/dockerd.log``, and for containerd
    ``<root>/containerd`` (its root), ``<root>/containerd.sock``, ``<root>/containerd.log``. When
    ``root`` is too long for unix socket paths, the sockets and exec root go to a short
    directory under /tmp instead (see :attr:`socket_dir`).

    containerd runs as a separate child of this process, as under a service manager, so
    :meth:`kill` takes down dockerd alone: the containers keep running through the outage and
    the restarted dockerd finds them (and, without live-restore, stops them).

    With ``bridge`` the daemon attaches containers to that Linux bridge instead of ``docker0``;
    the bridge is created (with address ``bridge_cidr``, e.g. ``"172.31.77.1/24"``) if absent and
    deleted again by :meth:`stop`. Two daemons must not share a bridge: each hands out the same
    container addresses.

    With ``live_restore`` the daemon runs with Docker's ``live-restore``: a restarted dockerd
    keeps the containers that ran through its outage instead of stopping them.
    """

    def __init__(
        self,
        root: Path,
        *,
        bridge: str | None = None,
        bridge_cidr: str | None = None,
        live_restore: bool = False,
    ) -> None:
        if bridge is not None and not 0 < len(bridge) <= 15:
            raise ValueError(f"bridge name {bridge!r} must have 1 to 15 characters")
        self.root = Path(root).absolute()
        self.bridge = bridge
        self.bridge_cidr = bridge_cidr
        self.live_restore = live_restore
        self._own_socket_dir = len(str(self.root)) > _MAX_SOCKET_DIR_LEN
        self.socket_dir = (
            Path(tempfile.mkdtemp(prefix="dd", dir="/tmp")) if self._own_socket_dir else self.root
        )
        self.data_root = self.root / "data"
        self.exec_root = self.socket_dir / "exec"
        self.socket_path = self.socket_dir / "docker.sock"
        self.pid_file = self.root / "docker.pid"
        self.log_path = self.root / "dockerd.log"
        self.config_file = self.root / "daemon.json"
        self.containerd_root = self.root / "containerd"
        self.containerd_state = self.socket_dir / "containerd-state"
        self.containerd_socket = self.socket_dir / "containerd.sock"
        self.containerd_config = self.root / "containerd.toml"
        self.containerd_log_path = self.root / "containerd.log"
        self.host = f"unix://{self.socket_path}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._containerd: subprocess.Popen[bytes] | None = None
        self._created_bridge = False
        self._orphan_proxies: list[int] = []
        self._killed = False

    def __repr__(self) -> str:
        return f"DockerDaemon(root={str(self.root)!r}, bridge={self.bridge!r})"

    def start(self, timeout: float = 30) -> None:
        """Start containerd (unless running) and dockerd; wait until the API answers a ping."""
        if self.running:
            return
        dockerd = require_binary("dockerd")
        containerd = require_binary("containerd")
        for helper in ("containerd-shim-runc-v2", "runc", "docker-proxy"):
            require_binary(helper)
        if os.geteuid() != 0:
            raise ServiceUnavailable("dockerd needs root: run the tests as root")
        for directory in (self.root, self.data_root, self.socket_dir, self.exec_root):
            directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        self._clear_stale_pid_file(timeout)
        self._kill_orphan_proxies()
        if self.bridge is not None:
            self._ensure_bridge(self.bridge)
        self._start_containerd(containerd, max(deadline - time.monotonic(), 1.0))
        # Our own config file keeps the machine's /etc/docker/daemon.json out of the way. The
        # engine ID (`docker info`) derives from the key file; the default, /etc/docker/key.json,
        # would give every daemon on the machine the same ID.
        config: dict[str, object] = {"deprecated-key-path": str(self.root / "key.json")}
        if self.live_restore:
            config["live-restore"] = True
        self.config_file.write_text(json.dumps(config, indent=2) + "\n")
        cmd = [
            dockerd,
            f"--config-file={self.config_file}",
            f"--containerd={self.containerd_socket}",
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.pid_file}",
            f"--host={self.host}",
        ]
        if self.bridge is not None:
            cmd.append(f"--bridge={self.bridge}")
        self._proc = _launch(cmd, self.log_path, _tool_env(drop_prefixes=("DOCKER_",)))
        _wait_until_up(
            self._proc,
            self._ping,
            max(deadline - time.monotonic(), 1.0),
            f"dockerd ({self.host})",
            self.log_path,
        )
        self._killed = False

    def stop(self) -> None:
        """Stop dockerd (which stops the containers), then containerd; clean up after them.

        SIGTERM, then SIGKILL after 40 s. After :meth:`kill` dockerd is started once more so
        that it stops the containers that outlived it. The bridge is deleted if this object
        created it.
        """
        if self._proc is not None:
            if self._killed:
                with contextlib.suppress(ServiceUnavailable):
                    self.start()
            _stop_process(self._proc, 40)
            self._proc = None
            self._killed = False
        self._kill_orphan_proxies()
        if self._containerd is not None:
            _stop_process(self._containerd, 10)
            self._containerd = None
        self._sweep_leftovers()
        _unmount_below(self.root, self.socket_dir)
        if self._created_bridge and self.bridge is not None:
            subprocess.run(
                [require_binary("ip"), "link", "del", self.bridge],
                capture_output=True,
                check=False,
            )
            self._created_bridge = False
        if self._own_socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL dockerd now, as in a crash; :meth:`start` works again afterwards.

        containerd, the containers and their docker-proxy processes keep running through the
        outage; the next :meth:`start` or :meth:`stop` ends those stale proxies.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proxies = [
            pid
            for pid in _all_pids()
            if _proc_ppid(pid) == proc.pid and _proc_comm(pid) == "docker-proxy"
        ]
        _kill_process(proc)
        self._killed = True
        self._orphan_proxies.extend(proxies)

    def client(self) -> docker.DockerClient:
        """A new SDK client for this daemon (API version negotiated); close it when done."""
        return docker.DockerClient(base_url=self.host, version="auto", timeout=60)

    # -- internals

    def _start_containerd(self, binary: str, timeout: float) -> None:
        if self._containerd is not None and self._containerd.poll() is None:
            return
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        self.containerd_state.mkdir(parents=True, exist_ok=True)
        self.containerd_config.write_text(
            "version = 2\n"
            f'root = "{self.containerd_root}"\n'
            f'state = "{self.containerd_state}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.containerd_socket}"\n'
        )
        cmd = [binary, f"--config={self.containerd_config}", "--log-level=info"]
        self._containerd = _launch(cmd, self.containerd_log_path, _tool_env())
        _wait_until_up(
            self._containerd,
            lambda: _unix_socket_accepts(self.containerd_socket),
            timeout,
            f"containerd ({self.containerd_socket})",
            self.containerd_log_path,
        )

    def _ping(self) -> bool:
        """GET /_ping over the unix socket without the SDK (cheap to retry)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(str(self.socket_path))
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                reply = b""
                while chunk := sock.recv(4096):
                    reply += chunk
        except OSError:
            return False
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]

    def _clear_stale_pid_file(self, timeout: float) -> None:
        """dockerd refuses to start while its pid file names a live process (even a zombie)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            self.pid_file.unlink(missing_ok=True)
            return
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and _proc_comm(pid) == "dockerd":
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(
                    f"dockerd pid {pid} from {self.pid_file} is still running after "
                    f"{timeout:g}s; stop it first"
                )
            time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)

    def _ensure_bridge(self, name: str) -> None:
        if Path("/sys/class/net", name).exists():
            return
        if self.bridge_cidr is None:
            raise ValueError(f"bridge {name!r} does not exist and no bridge_cidr was given")
        ip = require_binary("ip")
        # A fixed MAC address, as Docker gives docker0: a Linux bridge without one takes the
        # lowest MAC of its ports, so it changes whenever a container's veth comes or goes, and
        # the containers' ARP entries for the gateway go stale. docker-proxy's connections to
        # a container then wait for SYN-ACK retransmissions: answers delayed by 1-3 s.
        mac = "02:" + ":".join(f"{b:02x}" for b in os.urandom(5))
        _run_checked([ip, "link", "add", name, "address", mac, "type", "bridge"])
        self._created_bridge = True
        _run_checked([ip, "addr", "add", self.bridge_cidr, "dev", name])
        _run_checked([ip, "link", "set", name, "up"])

    def _kill_orphan_proxies(self) -> None:
        for pid in self._orphan_proxies:
            if pid_alive(pid) and _proc_comm(pid) == "docker-proxy":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._orphan_proxies.clear()

    def _sweep_leftovers(self) -> None:
        """SIGKILL any shim (and its container processes) still tied to our containerd."""
        marker = str(self.containerd_socket)
        pids = _all_pids()
        ours = {pid for pid in pids if marker in _proc_cmdline(pid)}
        if not ours:
            return
        children = {pid for pid in pids if _proc_ppid(pid) in ours}
        for pid in children | ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _launch(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session with stdout and stderr appended to ``log_path``."""
    with log_path.open("ab") as log:
        log.write(f"\n=== {time.strftime('%H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _unix_socket_accepts(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            sock.connect(str(path))
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# etcd


class Etcd(_Service):
    """A single-member etcd listening on 127.0.0.1 (data in ``<root>/data``)."""

    def __init__(
        self,
        root: Path,
        *,
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "default",
    ) -> None:
        self.root = Path(root).absolute()
        self.name = name
        self.client_port = client_port if client_port is not None else free_port()
        if peer_port is None:
            peer_port = free_port()
            while peer_port == self.client_port:
                peer_port = free_port()
        self.peer_port = peer_port
        self.endpoint = f"127.0.0.1:{self.client_port}"
        self.url = f"http://{self.endpoint}"
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"
        self.data_dir = self.root / "data"
        self.log_path = self.root / "etcd.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"Etcd(url={self.url!r}, root={str(self.root)!r})"

    def start(self, timeout: float = 20) -> None:
        """Start etcd (keeping any existing data) and wait until ``/health`` reports healthy."""
        if self.running:
            return
        etcd = require_binary("etcd")
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            etcd,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.name}={self.peer_url}",
            "--initial-cluster-state=new",
            # One member: a short election timeout only makes the first election quicker.
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        # ETCD_* variables would be read as flags and clash with the ones above.
        env = _tool_env(drop_prefixes=("ETCD_", "ETCDCTL_"))
        self._proc = _launch(cmd, self.log_path, env)
        _wait_until_up(self._proc, self._healthy, timeout, f"etcd ({self.url})", self.log_path)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self._proc is not None:
            _stop_process(self._proc, 10)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL now; :meth:`start` restarts it with the same data and ports."""
        if self._proc is not None:
            _kill_process(self._proc)
            self._proc = None

    def _healthy(self) -> bool:
        try:
            body = http_get(self.url + "/health", timeout=1.0)
            return bool(json.loads(body).get("health") == "true")
        except (OSError, ValueError, AttributeError):
            return False


# --------------------------------------------------------------------------------------------
# Test images and backends

BUSYBOX_IMAGE = "local/busybox:1"
WHOAMI_IMAGE = "local/whoami:1"


def _whoami_command(port: int) -> list[str]:
    # PID 1 traps TERM so that `docker stop` ends the container at once instead of after 10 s.
    return [
        "/bin/sh",
        "-c",
        'mkdir -p /www; echo "I am $(hostname)" > /www/index.html; trap "exit 0" TERM; '
        f"httpd -f -p {port} -h /www & wait",
    ]


WHOAMI_COMMAND: list[str] = _whoami_command(8000)


def graceful_whoami_command(port: int = 8000) -> list[str]:
    """The whoami backend as a well-behaved application stops: on TERM it stops accepting
    (httpd, the listener, exits) while the requests in flight finish (busybox httpd serves each
    connection in a child of its own), and the container exits 0.3 s later. The default whoami
    (:data:`WHOAMI_COMMAND`) exits at once on TERM and cuts its responses mid-body, which
    no proxy can repair."""
    return [
        "/bin/sh",
        "-c",
        'mkdir -p /www; echo "I am $(hostname)" > /www/index.html; '
        f"httpd -f -p {port} -h /www & pid=$!; "
        'trap "kill $pid; sleep 0.3; exit 0" TERM; wait',
    ]


def _is_static_elf(data: bytes) -> bool:
    """True for an ELF executable without a program interpreter (statically linked)."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return False
    endian = "<" if data[5] == 1 else ">"
    if data[4] == 2:  # 64-bit
        (phoff,) = struct.unpack_from(endian + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x36)
    else:
        (phoff,) = struct.unpack_from(endian + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x2A)
    for index in range(phnum):
        offset = phoff + index * phentsize
        if offset + 4 > len(data):
            return False
        (p_type,) = struct.unpack_from(endian + "I", data, offset)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _busybox_rootfs_tar() -> bytes:
    """A tar stream of a minimal root filesystem: static busybox plus its applet links."""
    busybox = Path(require_binary("busybox")).resolve()
    content = busybox.read_bytes()
    if not _is_static_elf(content):
        raise ServiceUnavailable(
            f"{busybox} is not a statically linked busybox (install busybox-static); "
            f"{_INSTALL_HINT}"
        )
    listing = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=False
    )
    if listing.returncode == 0 and listing.stdout.strip():
        applets = [line.strip().strip("/") for line in listing.stdout.splitlines()]
    else:
        plain = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, check=True
        ).stdout
        applets = ["bin/" + line.strip() for line in plain.splitlines()]

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        added: set[str] = set()

        def add(name: str, kind: bytes, *, mode: int, data: bytes = b"", target: str = "") -> None:
            parent = name.rpartition("/")[0]
            if parent and parent not in added:
                add(parent, tarfile.DIRTYPE, mode=0o755)
            if name in added:
                return
            added.add(name)
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = mode
            info.mtime = 0
            info.size = len(data)
            info.linkname = target
            tar.addfile(info, io.BytesIO(data) if data else None)

        for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "var", "www"):
            add(directory, tarfile.DIRTYPE, mode=0o755)
        for directory in ("proc", "sys", "dev"):
            add(directory, tarfile.DIRTYPE, mode=0o555)
        add("tmp", tarfile.DIRTYPE, mode=0o1777)
        add("bin/busybox", tarfile.REGTYPE, mode=0o755, data=content)
        add(
            "etc/passwd",
            tarfile.REGTYPE,
            mode=0o644,
            data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        )
        add("etc/group", tarfile.REGTYPE, mode=0o644, data=b"root:x:0:\nnogroup:x:65534:\n")
        for applet in applets:
            # A link named busybox would point at itself and break the image.
            if not applet or applet.rpartition("/")[2] == "busybox":
                continue
            add(applet, tarfile.SYMTYPE, mode=0o777, target="/bin/busybox")
    return buffer.getvalue()


def _image_exists(client: docker.DockerClient, ref: str) -> bool:
    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    return True


def ensure_images(client: docker.DockerClient) -> None:
    """Make sure :data:`BUSYBOX_IMAGE` and :data:`WHOAMI_IMAGE` exist (no registry needed).

    Both names tag one image imported from a busybox root filesystem built from the host's
    static busybox. A no-op when both exist.
    """
    present = [ref for ref in (BUSYBOX_IMAGE, WHOAMI_IMAGE) if _image_exists(client, ref)]
    if len(present) == 2:
        return
    if present:
        source = present[0]
    else:
        repository, _, tag = BUSYBOX_IMAGE.rpartition(":")
        client.api.import_image_from_data(_busybox_rootfs_tar(), repository=repository, tag=tag)
        source = BUSYBOX_IMAGE
    image = client.images.get(source)
    for ref in (BUSYBOX_IMAGE, WHOAMI_IMAGE):
        repository, _, tag = ref.rpartition(":")
        image.tag(repository, tag)
    for ref in (BUSYBOX_IMAGE, WHOAMI_IMAGE):
        if not _image_exists(client, ref):
            raise ServiceUnavailable(f"could not create the test image {ref}")


def run_whoami(
    client: docker.DockerClient,
    *,
    host_ip: str = "127.0.0.1",
    labels: dict[str, str] | None = None,
    environment: dict[str, str] | None = None,
    name: str | None = None,
    image: str = WHOAMI_IMAGE,
    private_port: int = 8000,
    command: list[str] | None = None,
    host_port: int | None = None,
) -> Container:
    """Run a detached backend answering ``I am <hostname>`` (the short container id).

    Its ``private_port``/tcp is published on ``host_ip`` at ``host_port`` (default: a random
    host port, see :func:`published_port`). ``command`` replaces the whoami command (e.g.
    :func:`graceful_whoami_command`).
    docker-proxy accepts connections before httpd listens, so wait for an answer
    (``wait_for(lambda: "I am" in http_get(url), ...)``) rather than for a connect.
    """
    return client.containers.run(
        image,
        command if command is not None else _whoami_command(private_port),
        detach=True,
        ports={f"{private_port}/tcp": (host_ip, host_port)},
        labels=dict(labels or {}),
        environment=dict(environment or {}),
        name=name,
    )


def published_port(container: Container, private: str = "8000/tcp") -> int:
    """Reload ``container`` and return the host port its ``private`` port is published on."""
    container.reload()
    ports = (container.attrs.get("NetworkSettings") or {}).get("Ports") or {}
    for binding in ports.get(private) or []:
        host_port = binding.get("HostPort")
        if host_port:
            return int(host_port)
    raise LookupError(f"container {container.short_id} does not publish {private}")
