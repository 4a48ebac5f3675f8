"""What the benchmarks share: the stack they run against, probes, figures and their report.

:class:`Stack` starts a private etcd and, when asked, a private Docker daemon on its own Linux
bridge (both from :mod:`tests.support.services`), and runs discoverd as a real subprocess
(``python -m discoverd``) configured by flags and ``--set``. :meth:`Stack.close` ends everything
it started -- the agents, the proxies they left running, the containers, the daemon, etcd, the
bridge -- also after Ctrl-C or SIGTERM (:func:`main_guard` turns SIGTERM into
``KeyboardInterrupt`` so that the ``finally`` blocks run).

Figures are measured, never asserted: a :class:`Report` holds them, prints them with
"target met" or "target missed", and writes them as JSON for ``bench/report.py``.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from tests.support.haproxy import haproxy_cli as haproxy_cli
from tests.support.probe import Prober as Prober
from tests.support.probe import ask as ask
from tests.support.probe import ask_why as ask_why
from tests.support.services import (
    WHOAMI_IMAGE,
    DockerDaemon,
    Etcd,
    ensure_images,
    free_port,
    graceful_whoami_command,
    require_binary,
)

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# Figures and the report


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sequence."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Target:
    """``stat`` (min, median, p99, max or value) must be ``op`` (<=, <, ==) ``limit``."""

    stat: str
    op: str
    limit: float

    def met(self, value: float) -> bool:
        if self.op == "<=":
            return value <= self.limit
        if self.op == "<":
            return value < self.limit
        return value == self.limit

    def text(self) -> str:
        stat = "" if self.stat == "value" else f"{self.stat} "
        return f"{stat}{self.op} {self.limit:g}"


@dataclass
class Figure:
    """One measured figure: a distribution (``samples``) or a single ``value``."""

    name: str
    unit: str
    value: float | None = None
    samples: list[float] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    note: str = ""

    def stats(self) -> dict[str, float]:
        if not self.samples:
            return {} if self.value is None else {"value": self.value}
        return {
            "min": min(self.samples),
            "median": statistics.median(self.samples),
            "p99": percentile(self.samples, 99),
            "max": max(self.samples),
        }

    def verdicts(self) -> list[tuple[Target, bool | None]]:
        stats = self.stats()
        return [(t, t.met(stats[t.stat]) if t.stat in stats else None) for t in self.targets]

    def line(self) -> str:
        stats = self.stats()
        if not stats:
            shown = "no data"
        elif "value" in stats:
            shown = f"{_num(stats['value'])} {self.unit}".rstrip()
        else:
            shown = ", ".join(f"{k} {_num(v)}" for k, v in stats.items()) + f" {self.unit}"
            shown += f" (n={len(self.samples)})"
        verdicts = []
        for target, met in self.verdicts():
            word = "no data" if met is None else ("target met" if met else "target MISSED")
            verdicts.append(f"{word}: {target.text()}")
        tail = f"  [{'; '.join(verdicts)}]" if verdicts else ""
        note = f"  ({self.note})" if self.note else ""
        return f"{self.name}: {shown}{tail}{note}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            **{k: round(v, 3) for k, v in self.stats().items()},
            "n": len(self.samples) if self.samples else (0 if self.value is None else 1),
            "samples": [round(s, 3) for s in self.samples],
            "targets": [
                {"stat": t.stat, "op": t.op, "limit": t.limit, "met": met}
                for t, met in self.verdicts()
            ],
            "note": self.note,
        }


def _num(value: float) -> str:
    if value == int(value) and abs(value) >= 10:
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}"


class Report:
    """The figures of one benchmark script, printed as they come and written as JSON."""

    def __init__(self, benchmark: str, params: dict[str, Any]) -> None:
        self.benchmark = benchmark
        self.params = params
        self.figures: list[Figure] = []
        self.notes: list[str] = []
        self.started = datetime.datetime.now(datetime.UTC)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        print(figure.line(), flush=True)
        return figure

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(text, flush=True)

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "date": self.started.isoformat(timespec="seconds"),
            "machine": machine_info(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "params": self.params,
            "figures": [f.as_dict() for f in self.figures],
            "notes": self.notes,
        }

    def write(self, path: str | None) -> None:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(self.as_dict(), indent=2) + "\n")


def _version(cmd: list[str]) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (result.stdout or result.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


_MACHINE: dict[str, Any] = {}


def machine_info() -> dict[str, Any]:
    """Cores, memory, kernel, load and the versions of the services (computed once)."""
    if not _MACHINE:
        mem = 0
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) // 1024
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        _MACHINE.update(
            {
                "cores": os.cpu_count(),
                "memory_mib": mem,
                "kernel": platform.release(),
                "python": platform.python_version(),
                "haproxy": " ".join(_version([haproxy, "-v"]).split()[:3]),
                "etcd": _version(["etcd", "--version"]),
                "dockerd": _version(["dockerd", "--version"]),
            }
        )
    return {**_MACHINE, "loadavg_at_start": os.getloadavg()[0]}


# --------------------------------------------------------------------------------------------
# Command line


def parser(doc: str | None, *, runs: int, quick_runs: int) -> argparse.ArgumentParser:
    """The flags every benchmark script takes; scripts add their own."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=None, help=f"repetitions (default {runs})")
    p.add_argument(
        "--quick", action="store_true", help=f"a short smoke run ({quick_runs} run(s), shorter)"
    )
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    p.add_argument("--log-level", default="info", help="discoverd's log level (default info)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs) at the end")
    p.set_defaults(default_runs=runs, quick_runs=quick_runs)
    return p


@contextlib.contextmanager
def work_folder(prefix: str, keep: bool, parent: str | None = None) -> Iterator[Path]:
    """A new folder for a benchmark's files and logs (in ``parent``, else the temporary
    folder), removed at the end unless ``keep``."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    print(f"work folder: {work}", flush=True)
    try:
        yield work
    finally:
        if keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def runs_of(args: argparse.Namespace) -> int:
    if args.runs is not None:
        return int(args.runs)
    return int(args.quick_runs if args.quick else args.default_runs)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main_guard(run: Callable[[], int]) -> int:
    """Run a benchmark's body: SIGTERM becomes KeyboardInterrupt, which exits with 130."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return run()
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------------------------
# Processes


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB, from /proc/PID/status."""
    values = {"VmRSS:": 0, "VmHWM:": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] in values:
            values[fields[0]] = int(fields[1])
    return values["VmRSS:"], values["VmHWM:"]


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(stat[11]) + int(stat[12])) / ticks


def idle_cpu_percent(pid: int, seconds: float) -> float:
    """Share of one core ``pid`` used over the next ``seconds`` (sleeps that long)."""
    before, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_seconds(pid) - before) / (time.monotonic() - start)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists() and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid``, wait, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


class Agent:
    """One discoverd process; its log lines are kept with the moment each arrived."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.cmd = cmd
        self.log_path = log_path
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the benchmark only, which stops it in order
        )
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="agent-log", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def state_dir(self) -> Path:
        """The ``--state-dir`` this agent was started with (its proxy's files are there)."""
        return Path(self.cmd[self.cmd.index("--state-dir") + 1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("ab") as log:
            for raw in self.proc.stdout:
                now = time.monotonic()
                log.write(raw)
                log.flush()
                with self._cond:
                    self.lines.append((now, raw.decode(errors="replace").rstrip()))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float, since: int = 0) -> tuple[float, str]:
        """Wait for a log line matching ``pattern`` (from line ``since``); its time and text."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                while index < len(self.lines):
                    moment, text = self.lines[index]
                    index += 1
                    if regex.search(text):
                        return moment, text
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"discoverd exited ({self.proc.returncode}); {self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no log line matching {pattern!r}; {self.tail()}")
                self._cond.wait(min(left, 0.5))

    def tail(self, count: int = 15) -> str:
        with self._cond:
            text = "\n".join(line for _, line in self.lines[-count:])
        return f"last lines of {self.log_path}:\n{text}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)


# --------------------------------------------------------------------------------------------
# The stack


def _bridge() -> tuple[str, str]:
    """A bridge name and a free 172.30.X.1/22 subnet (tests use 172.31.X; 1,000 addresses)."""
    out = subprocess.run(
        [require_binary("ip"), "-o", "-4", "addr", "show"], capture_output=True, text=True
    ).stdout
    used = {int(m) // 4 for m in re.findall(r"inet 172\.30\.(\d+)\.", out)}
    first = os.getpid() % 64
    for offset in range(64):
        block = (first + offset) % 64
        if block not in used:
            return f"dbench{os.getpid() % 100000}", f"172.30.{block * 4}.1/22"
    raise RuntimeError("no free 172.30.X.0/22 subnet for the benchmark's bridge")


class Stack:
    """etcd, optionally a private Docker daemon, and the discoverd agents of one benchmark."""

    def __init__(
        self, *, with_docker: bool = True, keep: bool = False, log_level: str = "info"
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dbsuite"))
        self.keep = keep
        self.log_level = log_level
        self.etcd = Etcd(self.root / "etcd")
        self.daemon: DockerDaemon | None = None
        if with_docker:
            bridge, cidr = _bridge()
            self.daemon = DockerDaemon(self.root / "docker", bridge=bridge, bridge_cidr=cidr)
        self._client: docker.DockerClient | None = None
        self.agents: list[Agent] = []
        self.state_dirs: list[Path] = []
        self.children: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> docker.DockerClient:
        assert self._client is not None, "the stack has no Docker daemon"
        return self._client

    def start(self) -> None:
        print(f"work folder: {self.root}", flush=True)
        self.etcd.start()
        if self.daemon is not None:
            self.daemon.start()
            self._client = self.daemon.client()
            ensure_images(self._client)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCOVERD_", "ETCD"))}
        env["ETCD_HOST"] = self.etcd.endpoint
        env["PYTHONUNBUFFERED"] = "1"
        env["DISCOVERD_SINGLE_MACHINE"] = "1"  # every agent of a benchmark runs on this machine
        if self.daemon is not None:
            env["DOCKER_HOST"] = self.daemon.host
        return env

    def agent(
        self,
        role: str | None = None,
        *,
        proxy: str = "haproxy",
        sets: Sequence[str] = (),
        name: str = "agent",
        log_level: str | None = None,
        stats_port: int | None = None,
    ) -> Agent:
        """Start ``python -m discoverd [role]`` with its own state folder.

        The proxy's frontends bind 127.0.0.1, its stats page ``stats_port`` or a free port
        (``proxy.stats_port`` options are set only for HAProxy; pass others in ``sets``)."""
        state = self.root / f"{name}-state"
        self.state_dirs.append(state)
        cmd = [
            sys.executable,
            "-m",
            "discoverd",
            "--host-ip",
            "127.0.0.1",
            "--state-dir",
            str(state),
            "--log-level",
            log_level or self.log_level,
            "--proxy",
            proxy,
        ]
        if proxy == "haproxy":
            stats = free_port() if stats_port is None else stats_port
            cmd += ["--set", "haproxy.bind=127.0.0.1", "--set", f"haproxy.stats_port={stats}"]
        for item in sets:
            cmd += ["--set", item]
        if role is not None:
            cmd.append(role)
        agent = Agent(cmd, self.env(), self.root / f"{name}.log")
        self.agents.append(agent)
        return agent

    def stop_agent(self, agent: Agent) -> None:
        agent.stop()
        self._stop_proxies()

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a helper (wrk, ...) that :meth:`close` ends if it still runs."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self.children.append(proc)
        return proc

    def _stop_proxies(self) -> None:
        """End every proxy an agent left running: pid files under a state folder of ours."""
        for state in self.state_dirs:
            for pid_file in state.glob("*/*.pid"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    pid = int(pid_file.read_text().split()[0])
                    if str(state) in _cmdline(pid):
                        stop_pid(pid)

    def run_containers(
        self,
        count: int,
        *,
        labels: dict[str, str] | Callable[[int], dict[str, str]],
        command: list[str] | None = None,
        threads: int = 8,
        private_port: int = 8000,
    ) -> list[Container]:
        """Run ``count`` whoami containers (``private_port``, 8000 by default, published on
        127.0.0.1) in parallel."""
        from tests.support.services import run_whoami

        def one(index: int) -> Container:
            wanted = labels(index) if callable(labels) else labels
            if command is None:
                return run_whoami(
                    self.client, host_ip="127.0.0.1", labels=wanted, private_port=private_port
                )
            return self.client.containers.run(
                WHOAMI_IMAGE,
                command,
                detach=True,
                labels=wanted,
                ports={f"{private_port}/tcp": ("127.0.0.1", None)},
            )

        if count == 1:
            return [one(0)]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, range(count)))

    def close(self) -> None:
        """Stop everything, in order; a second Ctrl-C during this is ignored."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in self.children:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            for agent in self.agents:
                agent.stop()
            self._stop_proxies()
            if self._client is not None:
                with contextlib.suppress(Exception):
                    containers = self._client.containers.list(all=True)
                    with concurrent.futures.ThreadPoolExecutor(8) as pool:
                        list(pool.map(_remove, containers))
                with contextlib.suppress(Exception):
                    self._client.close()
            if self.daemon is not None:
                self.daemon.stop()
            self.etcd.stop()
            if self.keep:
                print(f"kept the work folder {self.root}", flush=True)
            else:
                shutil.rmtree(self.root, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)


def _remove(container: Container) -> None:
    with contextlib.suppress(Exception):
        container.remove(force=True)


# --------------------------------------------------------------------------------------------
# Backends and clients

WHOAMI_PORT = 8000


def whoami_labels(frontend: int, mode: str = "http", name: str = "whoami") -> dict[str, str]:
    port_label = f"SERVICE_{WHOAMI_PORT}_PORT"
    return {"SERVICE_NAME": name, port_label: str(frontend), "SERVICE_MODE": mode}


#: ``--mode``: ``http`` and ``tcp`` label the backends (``SERVICE_MODE``); ``auto`` runs them
#: without a single label, as most users do: the service is named after the image (``whoami``),
#: served on the private port, and its mode is the one discoverd detects.
MODES = ("http", "tcp", "auto")


def whoami_backend(frontend: int, mode: str) -> tuple[dict[str, str], int]:
    """The labels and the private port of the whoami backends of a service served on
    ``frontend``: with ``auto`` no label at all, so the backends listen on ``frontend``
    itself (the frontend port is then the private port); otherwise ``whoami_labels`` and
    port 8000."""
    if mode == "auto":
        return {}, frontend
    return whoami_labels(frontend, mode), WHOAMI_PORT


def add_mode_argument(p: argparse.ArgumentParser, default: str = "http") -> None:
    p.add_argument(
        "--mode",
        choices=MODES,
        default=default,
        help=f"service mode (default {default}): http or tcp (label SERVICE_MODE), or auto: "
        "backends without a single label, the mode detected by discoverd",
    )


def wait_detected(agent: Agent, containers: Sequence[Container], timeout: float = 30) -> None:
    """With ``--mode auto``: wait until the agent has detected what each of ``containers``
    speaks (its log line ``checks: ... <id>:<port>:tcp speaks ...``), then a second for the
    proxies to apply the service's mode."""
    for container in containers:
        agent.wait_line(rf":{container.id[:12]}:\d+:tcp speaks ", timeout)
    time.sleep(1.0)


def slow_whoami_command(delay: float) -> list[str]:
    """The graceful whoami backend, but httpd starts listening only ``delay`` seconds after
    the container starts."""
    return [
        "/bin/sh",
        "-c",
        'mkdir -p /www; echo "I am $(hostname)" > /www/index.html; '
        f"sleep {delay:g}; httpd -f -p {WHOAMI_PORT} -h /www & pid=$!; "
        'trap "kill $pid; sleep 0.3; exit 0" TERM; wait',
    ]


def graceful_command(kind: str, port: int = WHOAMI_PORT) -> list[str] | None:
    """The backend command for ``--backend``: ``graceful`` finishes its requests on TERM,
    ``abrupt`` (``None``: the plain whoami) dies at once."""
    return graceful_whoami_command(port) if kind == "graceful" else None


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("graceful", "abrupt"),
        default="graceful",
        help="graceful: backends finish their requests in flight on TERM (default); abrupt: "
        "the plain whoami, which dies at once and cuts a response mid-body (no proxy can "
        "repair that)",
    )


def wait_answer(port: int, host: str, timeout: float) -> float:
    """Poll until ``host`` (a short container id) answers on ``port``; the moment it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ask(port, timeout=1.0) == host:
            return time.monotonic()
    raise TimeoutError(f"{host} did not answer on port {port} within {timeout:g}s")


class UserRequests:
    """A user's requests beside a load generator: a GET on a fresh connection every
    ``interval`` seconds, each sent at the moment it is due by a pool of threads (whether or
    not the ones before it finished: a stalled request holds back no other) and timed from that
    moment to the end of its answer. A failure (an error, another status or body) is counted,
    not timed.

    Why beside wrk: wrk corrects its percentiles for coordinated omission. It assumes every
    connection sends at its mean pace (20 connections at 6,000 requests/s: one every 3.3 ms),
    so one request that waited 1 s adds some 300 imagined ones that would have waited behind
    it, spread evenly from 3 ms to 1 s; 100 such requests among 90,000 make wrk's p90 some 600
    ms. That is the right measure of a pipeline of dependent requests, and it grows with the
    rate the proxy sustains. These are the requests' own times, as independent users see them.
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        interval: float = 0.01,
        timeout: float = 5.0,
        workers: int = 32,
    ) -> None:
        self.port, self.host, self.interval, self.timeout = port, host, interval, timeout
        self.latencies: list[float] = []  # seconds, of the requests answered
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="user")
        self._clock = threading.Thread(target=self._schedule, name="user requests", daemon=True)

    def __enter__(self) -> UserRequests:
        self._clock.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._clock.is_alive():
            self._clock.join()
        self._pool.shutdown(wait=True)

    def _schedule(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._one, due)
            due += self.interval
            self._stop.wait(max(0.0, due - time.monotonic()))

    def _one(self, due: float) -> None:
        who, _ = ask_why(self.port, self.timeout, self.host)
        took = time.monotonic() - due
        with self._lock:
            if who is None:
                self.failed += 1
            else:
                self.latencies.append(took)

    def summary(self, slow: float = 0.5) -> dict[str, float]:
        """Requests, failed, p50 / p90 / p99 / max in ms, and how many took ``slow`` seconds
        or more."""
        with self._lock:
            times = list(self.latencies)
            failed = self.failed
        found: dict[str, float] = {"requests": len(times) + failed, "failed": failed}
        if times:
            for q in (50, 90, 99):
                found[f"p{q}_ms"] = percentile(times, q) * 1000
            found["max_ms"] = max(times) * 1000
            found["slow"] = sum(1 for t in times if t >= slow)
        return found


# --------------------------------------------------------------------------------------------
# etcd and HAProxy


def etcd_post(etcd: Etcd, path: str, body: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """POST to etcd's JSON gateway (``/v3/...``) and return the decoded answer."""
    request = urllib.request.Request(
        etcd.url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=timeout) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def etcd_count(etcd: Etcd, prefix: str) -> int:
    """How many keys lie below ``prefix``."""
    start = prefix.encode()
    end = start[:-1] + bytes([start[-1] + 1])
    body = {"key": b64(start), "range_end": b64(end), "count_only": True}
    return int(etcd_post(etcd, "/v3/kv/range", body).get("count", 0))


def etcd_put_many(etcd: Etcd, items: Sequence[tuple[str, str]], batch: int = 120) -> None:
    """Put ``(key, value)`` pairs in transactions of ``batch`` (etcd allows 128 operations)."""
    for first in range(0, len(items), batch):
        chunk = items[first : first + batch]
        ops = [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in chunk]
        etcd_post(etcd, "/v3/kv/txn", {"success": ops})


def etcd_metrics(etcd: Etcd) -> dict[str, float]:
    """etcd's Prometheus counters as ``name{labels} -> value``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(etcd.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            values[name] = float(value)
    return values


def haproxy_reloads(state: Path) -> int | None:
    """The master's reload counter (``show proc`` on the master CLI); None if unreadable."""
    try:
        text = haproxy_cli(state, "show proc", "master.sock")
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == "master" and fields[2].isdigit():
            return int(fields[2])
    return None


def haproxy_pids(state: Path) -> list[int]:
    """The master and the current workers of the HAProxy of ``state``."""
    try:
        text = haproxy_cli(state, "show proc", "master.sock")
    except OSError:
        return []
    pids = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit() and fields[1] in ("master", "worker"):
            pids.append(int(fields[0]))
    return pids


def plugin_available(kind: str, name: str) -> bool:
    """True if ``discoverd plugins --json`` lists a ``kind`` (proxies, ...) named ``name``."""
    result = subprocess.run(
        [sys.executable, "-m", "discoverd", "plugins", "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    with contextlib.suppress(ValueError):
        for plugin in json.loads(result.stdout).get("plugins", []):
            if name in plugin.get(kind, []):
                return True
    return False
