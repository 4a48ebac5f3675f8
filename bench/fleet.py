"""9. The fleet: H simulated hosts against a 3-member etcd cluster and a 3-server Consul cluster.

    .venv/bin/python -m bench.fleet [--hosts 10,50,100,200] [--registry etcd,consul] [--json OUT]

Every simulated host is a full discoverd agent built by the core (``discoverd.core.agent.Agent``)
from settings and plugins: a register role fed by the synthetic container source of
``bench/fleet_host.py`` (a ``SourcePlugin``, registered with
``get_plugin_manager(extra_plugins=...)`` as tests register extra plugins) and a discover role
writing to the json-file proxy of ``examples/discoverd-jsonfile`` (loaded from its source tree
the same way, unless it is installed), each role with its own registry object: its own
connections, its own etcd lease or Consul registrations, its own watch. Several hosts run in one
process (``--hosts-per-process``, 25): ``python -m bench.fleet_host`` processes, driven over
JSON lines. Every host starts with ``--containers`` containers (2) spread over ``--services``
services (10); nothing listens behind them (the agents run with ``check = "none"``).

For each registry, the cluster is started on loopback ports below 32768 (etcd on 127.0.0.1,
``--etcd-port``; Consul servers on three free 127.0.0.X addresses, ``--consul-port``), then the
fleet grows through each size of ``--hosts``; at each size:

* **idle**: after ``--settle`` s, ``--idle`` s (60; 15 with ``--quick``) with nothing changing:
  registry requests per second, from the servers' own counters (etcd ``/metrics``:
  ``grpc_server_started_total`` by method, summed over the members; Consul
  ``/v1/agent/metrics?format=prometheus``: its per-endpoint HTTP timers, summed over the
  servers) and from the agents' side (every HTTP request their clients send, by kind); CPU
  (utime + stime) of the agent processes and of the registry processes over the window; RSS of
  the etcd members and the Consul servers. Target: under 1 request per second per host.
* **a change**: ``--runs`` times (20; 5 with ``--quick``), a random host starts a container (the
  source adds it and notifies the register role, as a Docker start event does) and later stops
  it; every host's ``discoverd_after_apply`` hook timestamps the moment its json-file proxy
  wrote a map that shows (no longer shows) it. Figures: the time from the start to each other
  host's proxy (p50, p99 over every host and run), the time until the slowest host has it
  (per run), the same for the stop, and the agents' CPU per host per change. Target: p99 under
  250 ms up to 100 hosts.

Then the slopes over the sizes (least squares): registry RSS, registry requests per second and
agent CPU per 100 hosts, and the p99 per 100 hosts. docs/scaling.md extrapolates from them.
Consul: as in a real deployment, each host registers with, and reads from, a client agent,
which forwards to the servers: one client agent for every ``--consul-hosts-per-agent`` hosts
(5: ten services per agent, fewer than a real host's fifty containers; a real fleet has one per
host, and 60 MiB each is more than this machine holds for 200). With 0, host i talks to server i
mod 3 instead, whose one local state then holds a third of the fleet's services and checks (the
shape of the first runs in docs/scaling.md). Needs etcd and consul (``scripts/install-deps.sh``);
no Docker, no root.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fleet_host import RequestCounter
from bench.stack import (
    Figure,
    Report,
    Target,
    cpu_seconds,
    main_guard,
    parser,
    percentile,
    rss_kib,
    runs_of,
    work_folder,
)
from discoverd import HostInfo, PluginContext, build_config
from discoverd.core.manager import get_plugin_manager
from tests.support.services import ServiceUnavailable, require_binary

REPO = Path(__file__).resolve().parent.parent
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

#: The aim of issue 10: one change reaches this many hosts with p99 under P99_TARGET_MS.
P99_TARGET_MS = 250.0
P99_TARGET_HOSTS = 100
#: Idle registry requests per second per host, at most.
IDLE_TARGET_RPS = 1.0


# ------------------------------------------------------------------------------------------------
# Small helpers


def get(url: str, timeout: float = 5.0) -> bytes:
    with _OPENER.open(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body


def prometheus(text: str) -> dict[str, float]:
    """Prometheus text format as ``name{labels} -> value`` (comments skipped)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            values[name] = float(value)
    return values


def label(key: str, name: str) -> str:
    """The value of label ``name`` in ``metric{a="x",...}`` ("" if absent)."""
    marker = f'{name}="'
    start = key.find(marker)
    if start < 0:
        return ""
    start += len(marker)
    return key[start : key.find('"', start)]


def bindable(address: str, port: int, udp: bool = False) -> bool:
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


def free_block(addresses: str | list[str], start: int, count: int, udp: bool = False) -> int:
    """The first port from ``start`` on (by steps of ``count``) where ``count`` ports in a row
    are free on every address; below 32768, out of the kernel's range for outgoing ports."""
    hosts = [addresses] if isinstance(addresses, str) else addresses
    for base in range(start, 32768 - count, count):
        if all(bindable(h, base + k, udp) for h in hosts for k in range(count)):
            return base
    raise ServiceUnavailable(f"no {count} free ports in a row from {start} up to 32767")


def launch(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (Ctrl-C reaches only the benchmark, which stops it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD", "CONSUL_"))}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 15.0) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares ``y = a + b x`` over ``points``: ``(a, b)``; None with fewer than two x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    b = sxy / sxx
    return my - b * mx, b


# ------------------------------------------------------------------------------------------------
# The registry clusters


class Cluster:
    """What both clusters offer the benchmark."""

    kind = ""
    procs: list[subprocess.Popen[bytes]]

    def start(self, timeout: float = 60) -> None:
        raise NotImplementedError

    def addresses(self) -> list[str]:
        raise NotImplementedError

    def prepare(self, hosts: int, timeout: float) -> None:
        """Have what ``hosts`` simulated hosts need beside the servers (Consul's client agents)."""

    def address_of(self, host: int) -> str | None:
        """The address host ``host`` talks to, if it has one of its own (else the servers')."""
        return None

    def host_pids(self) -> list[int]:
        """Processes that run on the hosts in a real fleet (Consul's client agents): their CPU
        counts as the agents', not the registry's."""
        return []

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def rss_mib(self) -> list[float]:
        return [rss_kib(pid)[0] / 1024 for pid in self.pids()]

    def requests(self) -> dict[str, float]:
        """Requests the servers handled so far, by kind (summed over the members)."""
        raise NotImplementedError

    def writes(self) -> float:
        """Writes to the replicated store so far (raft proposals applied)."""
        raise NotImplementedError

    def watch_events(self) -> float:
        """Events sent to watchers so far (etcd); 0 where the server does not count them."""
        return 0.0

    def extra(self) -> str:
        """A note on the cluster's state (watchers, ...)."""
        return ""

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)


_ETCD_GAUGES = (
    "etcd_debugging_mvcc_watcher_total",
    "etcd_debugging_mvcc_watch_stream_total",
    "etcd_mvcc_db_total_size_in_bytes",
)


class EtcdCluster(Cluster):
    """Three etcd members on 127.0.0.1: clients on ``base``, ``base + 2``, ``base + 4``, peers on
    the port after each, ``base`` the first free block of six ports from ``port`` on (below
    32768). etcd's default heartbeat and election timeout."""

    kind = "etcd"

    def __init__(self, work: Path, port: int, size: int = 3) -> None:
        self.work = work
        base = free_block("127.0.0.1", port, 2 * size)
        self.ports = [(base + 2 * i, base + 2 * i + 1) for i in range(size)]
        self.procs = []

    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{client}" for client, _ in self.ports]

    def start(self, timeout: float = 60) -> None:
        etcd = require_binary("etcd")
        initial = ",".join(
            f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(self.ports)
        )
        for i, (client, peer) in enumerate(self.ports):
            url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
            cmd = [
                etcd,
                f"--name=m{i}",
                f"--data-dir={self.work / f'm{i}'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster={initial}",
                "--initial-cluster-state=new",
                "--logger=zap",
                "--log-outputs=stderr",
            ]
            self.procs.append(launch(cmd, self.work / f"m{i}.log"))

        def healthy() -> bool:
            return all(
                json.loads(get(f"http://{a}/health", 1.0)).get("health") == "true"
                for a in self.addresses()
            )

        wait_until(healthy, timeout, "a healthy etcd cluster")

    def metrics(self) -> list[dict[str, float]]:
        return [prometheus(get(f"http://{a}/metrics").decode()) for a in self.addresses()]

    def requests(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for values in self.metrics():
            for key, value in values.items():
                if key.startswith("grpc_server_started_total{"):
                    totals[label(key, "grpc_method")] += value
        return dict(totals)

    def writes(self) -> float:
        # The leader's count of applied proposals: one per put, delete, txn, lease grant/revoke
        # (keepalives are not proposals).
        return max(v.get("etcd_server_proposals_applied_total", 0.0) for v in self.metrics())

    def watch_events(self) -> float:
        return sum(v.get("etcd_debugging_mvcc_events_total", 0.0) for v in self.metrics())

    def extra(self) -> str:
        totals: dict[str, float] = defaultdict(float)
        for values in self.metrics():
            for name in _ETCD_GAUGES:
                totals[name] += values.get(name, 0.0)
        return (
            f"watchers {totals['etcd_debugging_mvcc_watcher_total']:.0f}, watch streams "
            f"{totals['etcd_debugging_mvcc_watch_stream_total']:.0f} (all members); "
            f"db size {totals['etcd_mvcc_db_total_size_in_bytes'] / 3 / 2**20:.1f} MiB per member"
        )


_OWN_CONSUL_READS = ("GET /v1/agent/metrics", "GET /v1/status/leader")


class ConsulCluster(Cluster):
    """Three Consul servers on 127.0.0.40, .41 and .42, each with HTTP on ``port`` (the first
    free block of four ports from the one asked for, below 32768), server RPC on ``port + 1``,
    serf LAN/WAN on ``port + 2``/``+ 3``; DNS and gRPC off; ``raft_multiplier = 1``;
    Prometheus metrics kept; a high per-client connection limit (every simulated host dials
    from 127.0.0.1, where real hosts have addresses of their own).

    With ``hosts_per_agent`` (``--consul-hosts-per-agent``), client agents as a real fleet
    has them, one for every ``hosts_per_agent`` simulated hosts, on 127.2.X.Y with the
    servers' HTTP and serf LAN ports: those hosts register with, and read from, their client
    agent, which forwards to the servers. Without (0), every host talks to one of the servers,
    whose one local state then holds the services and checks of a third of the fleet."""

    kind = "consul"

    def __init__(self, work: Path, port: int, size: int = 3, hosts_per_agent: int = 0) -> None:
        self.work = work
        self.procs = []
        self.clients: list[subprocess.Popen[bytes]] = []
        self.client_ips: list[str] = []
        self.hosts_per_agent = hosts_per_agent
        self.ips = [f"127.0.0.{40 + i}" for i in range(size)]
        self.port = free_block(self.ips, port, 4, udp=True)

    def addresses(self) -> list[str]:
        return [f"{ip}:{self.port}" for ip in self.ips]

    def _hcl(self) -> str:
        # Consul wants the file limit above the connection limit; 8192 connections from one
        # address covers some 6,000 simulated hosts.
        conns = min(8192, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100)
        return (
            "performance { raft_multiplier = 1 } "
            f"limits {{ http_max_conns_per_client = {conns} }} "
            'telemetry { prometheus_retention_time = "24h" disable_hostname = true } '
            "disable_update_check = true"
        )

    def start(self, timeout: float = 90) -> None:
        consul = require_binary("consul")
        hcl = self._hcl()
        joins = [f"-retry-join={ip}:{self.port + 2}" for ip in self.ips]
        for i, ip in enumerate(self.ips):
            data = self.work / f"s{i}"
            data.mkdir(parents=True, exist_ok=True)
            cmd = [
                consul, "agent", "-server", f"-bootstrap-expect={len(self.ips)}",
                f"-node=fleet-s{i}", f"-bind={ip}", f"-client={ip}", f"-data-dir={data}",
                f"-http-port={self.port}", f"-server-port={self.port + 1}",
                f"-serf-lan-port={self.port + 2}", f"-serf-wan-port={self.port + 3}",
                "-dns-port=-1", "-grpc-port=-1", "-retry-interval=1s", f"-hcl={hcl}",
                "-log-level=info", *joins,
            ]  # fmt: skip
            self.procs.append(launch(cmd, self.work / f"s{i}.log"))

        def formed() -> bool:
            leaders = {
                json.loads(get(f"http://{a}/v1/status/leader", 1.0)) for a in self.addresses()
            }
            if len(leaders) != 1 or "" in leaders:
                return False
            nodes = json.loads(get(f"http://{self.addresses()[0]}/v1/catalog/nodes", 1.0))
            return len(nodes) >= len(self.ips)

        wait_until(formed, timeout, "a Consul cluster with a leader")

    def prepare(self, hosts: int, timeout: float) -> None:
        if not self.hosts_per_agent:
            return
        wanted = -(-hosts // self.hosts_per_agent)
        consul = require_binary("consul")
        joins = [f"-retry-join={ip}:{self.port + 2}" for ip in self.ips]
        while len(self.clients) < wanted:
            n = len(self.clients)
            ip = f"127.2.{n // 250}.{n % 250 + 1}"
            for port, udp in ((self.port, False), (self.port + 2, False), (self.port + 2, True)):
                if not bindable(ip, port, udp):
                    raise RuntimeError(f"{ip}:{port} is taken: no room for client agent {n}")
            data = self.work / f"c{n}"
            data.mkdir(parents=True, exist_ok=True)
            cmd = [
                consul, "agent", f"-node=fleet-c{n}", f"-bind={ip}", f"-client={ip}",
                f"-data-dir={data}", f"-http-port={self.port}",
                f"-serf-lan-port={self.port + 2}", "-dns-port=-1", "-grpc-port=-1",
                "-retry-interval=1s", f"-hcl={self._hcl()}", "-log-level=warn", *joins,
            ]  # fmt: skip
            self.clients.append(launch(cmd, self.work / f"c{n}.log"))
            self.client_ips.append(ip)

        def joined() -> bool:
            nodes = json.loads(get(f"http://{self.addresses()[0]}/v1/catalog/nodes", 1.0))
            return len(nodes) >= len(self.ips) + wanted

        wait_until(joined, timeout, f"{wanted} Consul client agents in the catalog")

    def address_of(self, host: int) -> str | None:
        if not self.hosts_per_agent:
            return None
        return f"{self.client_ips[host // self.hosts_per_agent]}:{self.port}"

    def host_pids(self) -> list[int]:
        return [p.pid for p in self.clients if p.poll() is None]

    def extra(self) -> str:
        if not self.clients:
            return ""
        rss = sum(rss_kib(pid)[0] for pid in self.host_pids()) / 1024
        return f"{len(self.clients)} client agents, RSS {rss:.0f} MiB in all"

    def stop(self) -> None:
        for proc in self.clients:
            stop_process(proc)
        super().stop()

    def metrics(self, clients: bool = False) -> list[dict[str, float]]:
        """The servers' metrics (or the client agents')."""
        url = "http://{}/v1/agent/metrics?format=prometheus"
        where = [f"{ip}:{self.port}" for ip in self.client_ips] if clients else self.addresses()
        return [prometheus(get(url.format(a)).decode()) for a in where]

    def requests(self) -> dict[str, float]:
        """Consul 1.8 times every HTTP request as ``consul_http_<METHOD>_<path>`` (ids written
        as ``_``); its summary's ``_count`` is the number of requests. A blocking query counts
        once, when it answers. With client agents the hosts' requests reach the servers as the
        agents' RPCs (``consul_client_rpc``, a blocking query counted when it is sent), and the
        check passes stay on the agents: both are counted, apart."""
        totals: dict[str, float] = defaultdict(float)
        for values in self.metrics():
            for key, value in values.items():
                name = key.split("{", 1)[0]
                if name.startswith("consul_http_") and name.endswith("_count"):
                    totals[_consul_kind(name.removesuffix("_count"))] += value
        if self.client_ips:
            totals["RPC from the client agents"] = sum(
                values.get("consul_client_rpc", 0.0) for values in self.metrics(clients=True)
            )
        # The benchmark's own reads of the servers are not the fleet's.
        return {k: v for k, v in totals.items() if k not in _OWN_CONSUL_READS}

    def writes(self) -> float:
        # The leader's count of raft applies (registrations, deregistrations, check updates).
        return max(
            sum(v for k, v in values.items() if k.split("{")[0] == "consul_raft_apply")
            for values in self.metrics()
        )


def _consul_kind(name: str) -> str:
    """``consul_http_PUT_v1_agent_check_pass__`` (Consul writes an id as ``_``) ->
    ``PUT /v1/agent/check/pass``."""
    method, _, path = name.removeprefix("consul_http_").partition("_")
    return f"{method} /{path.rstrip('_').replace('_', '/')}"


# ------------------------------------------------------------------------------------------------
# The simulated hosts


class Worker:
    """One ``python -m bench.fleet_host`` process and its JSON-lines channel."""

    def __init__(self, index: int, fleet: Fleet) -> None:
        self.index = index
        self.fleet = fleet
        self.hosts: list[int] = []
        self.log_path = fleet.work / f"agents-{index}.log"
        cmd = [
            sys.executable, "-m", "bench.fleet_host",
            "--registry", fleet.cluster.kind,
            "--addresses", ",".join(fleet.cluster.addresses()),
            "--work", str(fleet.hosts_dir),
            "--containers", str(fleet.containers),
            "--services", str(fleet.services),
            "--log-level", fleet.log_level,
        ]  # fmt: skip
        for item in fleet.sets:
            cmd += ["--set", item]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCOVERD_", "ETCD"))}
        env.pop("HOST_IP", None)
        env["PYTHONPATH"] = str(REPO)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin: IO[bytes] = self.proc.stdin
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._ids = 0
        self._lock = threading.Lock()
        self.hello = threading.Event()
        self._reader = threading.Thread(
            target=self._read, args=(self.proc.stdout,), name=f"worker-{index}", daemon=True
        )
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            event = message.get("ev")
            if event == "reached":
                self.fleet.on_reached(message)
            elif event == "reply":
                with self._lock:
                    box = self._replies.get(int(message.get("id") or 0))
                if box is not None:
                    box.put(message)
            elif event == "hello":
                self.hello.set()

    def send(self, command: dict[str, Any]) -> queue.Queue[dict[str, Any]]:
        with self._lock:
            self._ids += 1
            ident = self._ids
            box: queue.Queue[dict[str, Any]] = queue.Queue()
            self._replies[ident] = box
        line = json.dumps({**command, "id": ident}) + "\n"
        try:
            self._stdin.write(line.encode())
            self._stdin.flush()
        except (BrokenPipeError, ValueError):
            raise RuntimeError(f"agent process {self.index} died; {self.tail()}") from None
        return box

    def call(self, command: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        return self.wait(self.send(command), timeout, command.get("op", "?"))

    def wait(self, box: queue.Queue[dict[str, Any]], timeout: float, what: str) -> dict[str, Any]:
        try:
            reply = box.get(timeout=timeout)
        except queue.Empty:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent process {self.index} died; {self.tail()}") from None
            raise TimeoutError(f"agent process {self.index}: no answer to {what!r}") from None
        if reply.get("error"):
            raise RuntimeError(f"agent process {self.index}: {reply['error']}")
        return reply

    def tail(self, count: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-count:]
        except OSError:
            return "(no log)"
        return f"last lines of {self.log_path}:\n" + "\n".join(lines)

    def close(self, timeout: float = 20.0) -> None:
        """Ask the process to stop its hosts and exit; SIGTERM, then SIGKILL, if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.send({"op": "exit"})
            with contextlib.suppress(Exception):
                self._stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        stop_process(self.proc, 5.0)


class Fleet:
    """The simulated hosts: agent processes of ``per_process`` hosts each."""

    def __init__(self, cluster: Cluster, work: Path, args: Any) -> None:
        self.cluster = cluster
        self.work = work
        self.containers = int(args.containers)
        self.services = int(args.services)
        self.per_process = int(args.hosts_per_process)
        #: The hosts' state directories: in the work folder, or below ``--hosts-dir``.
        self.hosts_dir = Path(args.hosts_root) / cluster.kind if args.hosts_root else work / "hosts"
        self.log_level = str(args.log_level)
        self.sets = list(args.sets)
        self.workers: list[Worker] = []
        self.owner: dict[int, Worker] = {}
        self.size = 0
        self._cond = threading.Condition()
        self._reached: dict[tuple[str, bool], dict[int, float]] = {}

    # -- growing

    def grow(self, total: int, timeout: float) -> None:
        """Start hosts until there are ``total``, filling each process before the next."""
        pending: list[tuple[Worker, queue.Queue[dict[str, Any]]]] = []
        self.cluster.prepare(total, timeout)
        while self.size < total:
            worker = self.workers[-1] if self.workers else None
            if worker is None or len(worker.hosts) >= self.per_process:
                worker = Worker(len(self.workers), self)
                self.workers.append(worker)
                if not worker.hello.wait(60):
                    raise RuntimeError(
                        f"agent process {worker.index} did not start; {worker.tail()}"
                    )
            count = min(self.per_process - len(worker.hosts), total - self.size)
            first = self.size
            command: dict[str, Any] = {"op": "add", "first": first, "count": count}
            own = {h: self.cluster.address_of(h) for h in range(first, first + count)}
            if any(own.values()):
                command["addresses"] = {str(h): a for h, a in own.items() if a}
            pending.append((worker, worker.send(command)))
            for host in range(first, first + count):
                worker.hosts.append(host)
                self.owner[host] = worker
            self.size += count
        for worker, box in pending:
            worker.wait(box, timeout, "add")

    def converged(self) -> tuple[bool, str]:
        """Whether every host is ready and its proxy shows every instance of the fleet."""
        expected = self.size * self.containers
        shown: list[int] = []
        ready = True
        for worker in self.workers:
            status = worker.call({"op": "status"})
            ready = ready and bool(status["ready"])
            counts = {int(k): int(v) for k, v in dict(status["counts"]).items()}
            shown += [counts.get(h, -1) for h in worker.hosts]
        short = sum(1 for c in shown if c != expected)
        return ready and short == 0, f"{short} of {self.size} hosts not showing {expected}"

    def wait_converged(self, timeout: float) -> float:
        began = time.monotonic()
        state = ""
        while time.monotonic() - began < timeout:
            done, state = self.converged()
            if done:
                return time.monotonic() - began
            time.sleep(0.5)
        raise TimeoutError(f"the fleet did not converge within {timeout:g} s: {state}")

    # -- measuring

    def pids(self) -> list[int]:
        """The agent processes, and the processes a real host runs beside its agent."""
        return [w.proc.pid for w in self.workers if w.proc.poll() is None] + [
            *self.cluster.host_pids()
        ]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def rss_mib(self) -> float:
        """The agent processes' RSS (client agents' is in the cluster's note)."""
        live = [w.proc.pid for w in self.workers if w.proc.poll() is None]
        return sum(rss_kib(pid)[0] for pid in live) / 1024

    def counters(self) -> tuple[Counter[str], Counter[str]]:
        """The agents' HTTP requests so far, and the bytes of their answers, by kind."""
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for worker in self.workers:
            reply = worker.call({"op": "counters"})
            counts.update(reply["counts"])
            sizes.update(reply["bytes"])
        return counts, sizes

    def broadcast(self, command: dict[str, Any]) -> None:
        boxes = [(w, w.send(command)) for w in self.workers]
        for worker, box in boxes:
            worker.wait(box, 30.0, str(command.get("op")))

    def on_reached(self, message: dict[str, Any]) -> None:
        key = (str(message["marker"]), bool(message["present"]))
        with self._cond:
            seen = self._reached.get(key)
            if seen is not None and int(message["host"]) not in seen:
                seen[int(message["host"])] = float(message["t"])
                self._cond.notify_all()

    def change(self, origin: int, marker: str, present: bool, timeout: float) -> dict[int, float]:
        """Start (``present``) or stop the container ``marker`` on host ``origin``; the
        seconds until each other host's proxy showed it (hosts not reached are missing)."""
        key = (marker, present)
        with self._cond:
            self._reached[key] = {}
        self.broadcast({"op": "expect", "marker": marker, "present": present})
        reply = self.owner[origin].call(
            {"op": "start" if present else "stop", "host": origin, "marker": marker}
        )
        began = float(reply["t"])
        others = self.size - 1
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = self._reached[key]
            while sum(1 for h in seen if h != origin) < others:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            result = {h: t - began for h, t in seen.items() if h != origin}
            del self._reached[key]
        return result

    def close(self) -> None:
        threads = [threading.Thread(target=w.close) for w in self.workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)


# ------------------------------------------------------------------------------------------------
# One size of the fleet


@dataclass
class Step:
    """What was measured at one fleet size."""

    hosts: int
    processes: int = 0
    idle_s: float = 0.0
    server_rps: float = 0.0
    server_by_kind: dict[str, float] = field(default_factory=dict)
    client_rps: float = 0.0
    client_by_kind: dict[str, float] = field(default_factory=dict)
    idle_writes: float = 0.0
    agent_cpu_pct: float = 0.0
    registry_cpu_pct: float = 0.0
    registry_rss_mib: list[float] = field(default_factory=list)
    agent_rss_mib: float = 0.0
    reach_ms: list[float] = field(default_factory=list)
    reach_all_ms: list[float] = field(default_factory=list)
    removal_ms: list[float] = field(default_factory=list)
    missed: int = 0
    changes: int = 0
    agent_cpu_per_change_ms: float = 0.0
    registry_cpu_per_change_ms: float = 0.0
    change_server_by_kind: dict[str, float] = field(default_factory=dict)
    change_client_by_kind: dict[str, float] = field(default_factory=dict)
    change_watch_events: float = 0.0
    change_bytes_per_host: float = 0.0
    idle_bytes_per_host_s: float = 0.0
    full_read_bytes: int = 0
    full_read_requests: int = 0
    instances: int = 0
    converge_s: float = 0.0
    loadavg: float = 0.0
    cluster_note: str = ""

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        for key in ("reach_ms", "reach_all_ms", "removal_ms"):
            data[key] = [round(v, 2) for v in data[key]]
        return data


def measure_idle(step: Step, fleet: Fleet, cluster: Cluster, seconds: float) -> None:
    server0, (client0, bytes0) = cluster.requests(), fleet.counters()
    writes0, cpu0, reg0 = cluster.writes(), fleet.cpu(), cluster.cpu()
    began = time.monotonic()
    time.sleep(seconds)
    server1, (client1, bytes1) = cluster.requests(), fleet.counters()
    writes1, cpu1, reg1 = cluster.writes(), fleet.cpu(), cluster.cpu()
    elapsed = time.monotonic() - began
    step.idle_s = elapsed
    step.server_by_kind = {
        k: round((v - server0.get(k, 0.0)) / elapsed, 3)
        for k, v in server1.items()
        if v != server0.get(k, 0.0)
    }
    step.server_rps = sum(step.server_by_kind.values())
    step.client_by_kind = {
        k: round((v - client0.get(k, 0)) / elapsed, 3)
        for k, v in client1.items()
        if v != client0.get(k, 0)
    }
    step.client_rps = sum(step.client_by_kind.values())
    step.idle_bytes_per_host_s = (
        (sum(bytes1.values()) - sum(bytes0.values())) / elapsed / step.hosts
    )
    step.idle_writes = writes1 - writes0
    step.agent_cpu_pct = 100 * (cpu1 - cpu0) / elapsed
    step.registry_cpu_pct = 100 * (reg1 - reg0) / elapsed
    step.registry_rss_mib = [round(v, 1) for v in cluster.rss_mib()]
    step.agent_rss_mib = fleet.rss_mib()
    step.cluster_note = cluster.extra()


def measure_full_read(step: Step, cluster: Cluster, work: Path, counter: RequestCounter) -> None:
    """One full read of the catalog by the product's own registry (what every host does at
    start, after a lost watch and every 5 minutes): its requests and the bytes of the answers."""
    record = get_plugin_manager().registry(cluster.kind)
    key = "endpoints" if cluster.kind == "etcd" else "address"
    config = build_config(record.config, {key: cluster.addresses()[0]}, section=cluster.kind)
    context = PluginContext(config=config, host=HostInfo(ip="127.0.0.1", id="fleet-bench"),
                            state_dir=work)  # fmt: skip
    registry = record.factory(context)
    before = counter.totals()
    try:
        catalog = registry.snapshot()
    finally:
        registry.close()
    after = counter.totals()
    step.full_read_requests = sum(after["counts"].values()) - sum(before["counts"].values())
    step.full_read_bytes = sum(after["bytes"].values()) - sum(before["bytes"].values())
    step.instances = len(catalog.instances)


def measure_changes(
    step: Step, fleet: Fleet, cluster: Cluster, runs: int, args: Any, rng: random.Random,
    serial: list[int],
) -> None:  # fmt: skip
    server0, (client0, bytes0) = cluster.requests(), fleet.counters()
    events0 = cluster.watch_events()
    cpu0, reg0, began = fleet.cpu(), cluster.cpu(), time.monotonic()
    for _ in range(runs):
        serial[0] += 1
        marker = f"fee1{serial[0]:08x}"
        origin = rng.randrange(fleet.size)
        for present in (True, False):
            reached = fleet.change(origin, marker, present, args.reach_timeout)
            samples = [1000 * v for v in reached.values()]
            step.missed += fleet.size - 1 - len(samples)
            step.changes += 1
            if present:
                step.reach_ms += samples
                if len(samples) == fleet.size - 1 and samples:
                    step.reach_all_ms.append(max(samples))
            else:
                step.removal_ms += samples
            time.sleep(args.gap)
        fleet.broadcast({"op": "forget", "marker": marker})
    if step.changes:
        # Net of what the agents and the servers use at idle over the same time.
        elapsed = time.monotonic() - began
        agents = fleet.cpu() - cpu0 - step.agent_cpu_pct / 100 * elapsed
        servers = cluster.cpu() - reg0 - step.registry_cpu_pct / 100 * elapsed
        step.agent_cpu_per_change_ms = 1000 * max(0.0, agents) / step.changes / fleet.size
        step.registry_cpu_per_change_ms = 1000 * max(0.0, servers) / step.changes
        # Requests per change, net of the idle traffic over the same time.
        server1, (client1, bytes1) = cluster.requests(), fleet.counters()
        read = (
            sum(bytes1.values())
            - sum(bytes0.values())
            - (step.idle_bytes_per_host_s * fleet.size * elapsed)
        )
        step.change_bytes_per_host = max(0.0, read) / step.changes / fleet.size
        step.change_server_by_kind = per_change(
            server0, server1, step.server_by_kind, elapsed, step.changes
        )
        step.change_client_by_kind = per_change(
            dict(client0), dict(client1), step.client_by_kind, elapsed, step.changes
        )
        step.change_watch_events = (cluster.watch_events() - events0) / step.changes


def per_change(
    before: dict[str, float], after: dict[str, float], idle_rate: dict[str, float],
    elapsed: float, changes: int,
) -> dict[str, float]:  # fmt: skip
    """Requests per change by kind: the counters' increase less the idle rate over the time."""
    result = {}
    for kind, value in after.items():
        extra = value - before.get(kind, 0.0) - idle_rate.get(kind, 0.0) * elapsed
        if extra / changes >= 0.05:
            result[kind] = round(extra / changes, 2)
    return result


def report_step(
    report: Report, kind: str, step: Step, containers: int, baseline_cpu: float
) -> None:
    h = step.hosts
    where = f"{kind}, {h} hosts"
    reach_targets = [Target("p99", "<=", P99_TARGET_MS)] if h <= P99_TARGET_HOSTS else []
    report.add(
        Figure(
            f"{where}: container start -> another host's proxy",
            "ms",
            samples=step.reach_ms,
            targets=reach_targets,
            note=f"every other host, {len(step.reach_all_ms)} runs"
            + (f"; {step.missed} deliveries not seen within the timeout" if step.missed else ""),
        )
    )
    report.add(
        Figure(
            f"{where}: container start -> the last host's proxy", "ms", samples=step.reach_all_ms
        )
    )
    report.add(
        Figure(f"{where}: container stop -> another host's proxy", "ms", samples=step.removal_ms)
    )
    top = ", ".join(
        f"{k} {v:g}" for k, v in sorted(step.server_by_kind.items(), key=lambda i: -i[1])
    )
    agents = ", ".join(
        f"{k} {v:g}" for k, v in sorted(step.client_by_kind.items(), key=lambda i: -i[1])
    )
    report.add(
        Figure(
            f"{where}: idle registry requests per host",
            "req/s",
            value=step.server_rps / h,
            targets=[Target("value", "<", IDLE_TARGET_RPS)],
            note=f"servers: {step.server_rps:.1f}/s in all ({top or 'none'}); agents sent "
            f"{step.client_rps:.1f}/s ({agents or 'none'}) and read "
            f"{step.idle_bytes_per_host_s:.0f} bytes/s per host; {step.idle_writes:g} writes "
            f"in {step.idle_s:.0f} s; {containers} containers per host",
        )
    )
    report.add(
        Figure(
            f"{where}: idle agent CPU per 100 hosts",
            "% of a core",
            value=step.agent_cpu_pct * 100 / h,
            note=f"{step.agent_cpu_pct:.1f} % for {h} hosts in {step.processes} processes; "
            f"their RSS {step.agent_rss_mib:.0f} MiB in all",
        )
    )
    report.add(
        Figure(
            f"{where}: idle registry CPU per 100 hosts",
            "% of a core",
            value=(step.registry_cpu_pct - baseline_cpu) * 100 / h,
            note=f"{step.registry_cpu_pct:.1f} % for the 3 servers, {baseline_cpu:.1f} % of it "
            "with no host",
        )
    )
    report.add(
        Figure(
            f"{where}: registry RSS (3 servers)",
            "MiB",
            value=sum(step.registry_rss_mib),
            note=f"per server {step.registry_rss_mib}; {step.cluster_note}".rstrip("; "),
        )
    )
    by_kind = ", ".join(
        f"{k} {v:g}" for k, v in sorted(step.change_server_by_kind.items(), key=lambda i: -i[1])
    )
    events = (
        f"; {step.change_watch_events:.0f} watch events sent" if step.change_watch_events else ""
    )
    report.add(
        Figure(
            f"{where}: registry requests per change",
            "requests",
            value=sum(step.change_server_by_kind.values()),
            note=f"{sum(step.change_server_by_kind.values()) / h:.2f} per host ({by_kind})"
            f"{events}; each host read {step.change_bytes_per_host / 1024:.1f} KiB",
        )
    )
    per_instance = step.full_read_bytes / max(1, step.instances)
    report.add(
        Figure(
            f"{where}: one full read of the catalog",
            "KiB",
            value=step.full_read_bytes / 1024,
            note=f"{step.instances} instances, {per_instance:.0f} bytes each, "
            f"{step.full_read_requests} requests; every host reads it when it starts, after a "
            "lost watch and every 5 minutes",
        )
    )
    cores = os.cpu_count() or 1
    total_ms = h * step.agent_cpu_per_change_ms + step.registry_cpu_per_change_ms
    report.add(
        Figure(
            f"{where}: agent CPU per host per change",
            "ms",
            value=step.agent_cpu_per_change_ms,
            note=f"one change costs {total_ms:.0f} ms of CPU in all (agents and registry, net "
            f"of their idle use): at least {total_ms / cores:.0f} ms on "
            f"{cores} cores before every host can have it; registry CPU per change "
            f"{step.registry_cpu_per_change_ms:.1f} ms; "
            f"fleet converged {step.converge_s:.1f} s after growing; load average "
            f"{step.loadavg:.2f}",
        )
    )


def report_slopes(
    report: Report, kind: str, steps: list[Step], baseline_rss: float, baseline_cpu: float
) -> None:
    """Least-squares slopes over the sizes measured (with the registry's RSS at 0 hosts)."""
    series: list[tuple[str, str, list[tuple[float, float]]]] = [
        ("registry RSS", "MiB per 100 hosts",
         [(0.0, baseline_rss)] + [(s.hosts, sum(s.registry_rss_mib)) for s in steps]),
        ("idle registry requests", "req/s per 100 hosts",
         [(0.0, 0.0)] + [(s.hosts, s.server_rps) for s in steps]),
        ("idle registry CPU", "% of a core per 100 hosts",
         [(0.0, baseline_cpu)] + [(s.hosts, s.registry_cpu_pct) for s in steps]),
        ("idle agent CPU", "% of a core per 100 hosts",
         [(s.hosts, s.agent_cpu_pct) for s in steps]),
        ("p99 start -> another host", "ms per 100 hosts",
         [(s.hosts, percentile(s.reach_ms, 99)) for s in steps if s.reach_ms]),
        ("registry CPU per change", "ms per 100 hosts",
         [(s.hosts, s.registry_cpu_per_change_ms) for s in steps]),
    ]  # fmt: skip
    for name, unit, points in series:
        line = fit(points)
        if line is None:
            continue
        intercept, slope = line
        report.add(
            Figure(
                f"{kind}: slope of {name}",
                unit,
                value=slope * 100,
                note=f"least squares over {[int(x) for x, _ in points]} hosts; "
                f"intercept {intercept:.3g}",
            )
        )


# ------------------------------------------------------------------------------------------------


def run_registry(
    kind: str, args: Any, work: Path, report: Report, sizes: list[int], counter: RequestCounter
) -> None:
    folder = work / kind
    folder.mkdir(parents=True)
    cluster: Cluster
    if kind == "etcd":
        cluster = EtcdCluster(folder, args.etcd_port)
    else:
        cluster = ConsulCluster(
            folder, args.consul_port, hosts_per_agent=args.consul_hosts_per_agent
        )
    rng = random.Random(args.seed)
    steps: list[Step] = []
    fleet: Fleet | None = None
    try:
        cluster.start()
        time.sleep(args.settle)
        # The cluster alone: its RSS and idle CPU are the intercepts of the per-host figures.
        reg0, began = cluster.cpu(), time.monotonic()
        time.sleep(min(args.idle, 15.0))
        baseline_cpu = 100 * (cluster.cpu() - reg0) / (time.monotonic() - began)
        baseline = sum(cluster.rss_mib())
        print(f"{kind}: cluster up at {', '.join(cluster.addresses())}; RSS {baseline:.0f} MiB, "
              f"idle CPU {baseline_cpu:.1f} % of a core", flush=True)  # fmt: skip
        fleet = Fleet(cluster, folder, args)
        serial = [0 if kind == "etcd" else 1 << 20]
        for size in sizes:
            began = time.monotonic()
            fleet.grow(size, timeout=max(120.0, size * 1.0))
            step = Step(hosts=size, processes=len(fleet.workers), loadavg=os.getloadavg()[0])
            step.converge_s = fleet.wait_converged(timeout=max(120.0, size * 2.0))
            print(f"{kind}: {size} hosts in {len(fleet.workers)} processes, converged "
                  f"{time.monotonic() - began:.1f} s after growing", flush=True)  # fmt: skip
            time.sleep(args.settle)
            measure_idle(step, fleet, cluster, args.idle)
            measure_full_read(step, cluster, folder, counter)
            measure_changes(step, fleet, cluster, runs_of(args), args, rng, serial)
            report_step(report, kind, step, args.containers, baseline_cpu)
            steps.append(step)
        if len(steps) >= 2:
            report_slopes(report, kind, steps, baseline, baseline_cpu)
        report.params.setdefault("steps", {})[kind] = {
            "baseline_rss_mib": round(baseline, 1),
            "baseline_cpu_pct": round(baseline_cpu, 2),
            "addresses": cluster.addresses(),
            "sizes": [s.as_dict() for s in steps],
        }
    finally:
        if fleet is not None:
            fleet.close()
        cluster.stop()


def main() -> int:
    p = parser(__doc__, runs=20, quick_runs=5)
    p.add_argument("--hosts", default=None, help="fleet sizes, in order (10,50,100,200; quick 10)")
    p.add_argument("--registry", default="etcd,consul", help="etcd, consul or both (default)")
    p.add_argument("--hosts-per-process", type=int, default=25, help="hosts per agent process (25)")
    p.add_argument("--containers", type=int, default=2, help="containers per host at start (2)")
    p.add_argument("--services", type=int, default=10, help="services they are spread over (10)")
    p.add_argument("--idle", type=float, default=None, help="idle window, seconds (60; quick 15)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds of calm before measuring")
    p.add_argument("--gap", type=float, default=0.5, help="seconds between two changes (0.5)")
    p.add_argument("--reach-timeout", type=float, default=15.0, help="longest wait per change")
    p.add_argument("--etcd-port", type=int, default=23700, help="first of etcd's 6 ports (23700)")
    p.add_argument("--consul-port", type=int, default=23710, help="Consul's first port (23710)")
    p.add_argument("--seed", type=int, default=10, help="seed of the random origin hosts")
    p.add_argument(
        "--consul-hosts-per-agent",
        type=int,
        default=5,
        help="a Consul client agent for every N hosts (5); 0: every host uses a server",
    )
    p.add_argument(
        "--hosts-dir",
        default="",
        help="folder for the hosts' state directories (default: the work folder); a tmpfs "
        "such as /dev/shm takes out the queue of every host's durable writes on this one disk",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="sets",
        metavar="SECTION.KEY=VALUE",
        help="an agent option for every host (e.g. etcd.ttl=30), repeatable",
    )
    args = p.parse_args()
    sizes = [int(x) for x in (args.hosts or ("10" if args.quick else "10,50,100,200")).split(",")]
    if args.idle is None:
        args.idle = 15.0 if args.quick else 60.0
    kinds = [k.strip() for k in args.registry.split(",") if k.strip()]
    for kind in kinds:
        if kind not in ("etcd", "consul"):
            p.error(f"--registry: unknown registry {kind!r}")
    if any(s < 2 for s in sizes):
        p.error("--hosts: every size must be at least 2")
    if args.hosts_dir and not os.path.isdir(args.hosts_dir):
        p.error(f"--hosts-dir: {args.hosts_dir!r} is not a folder")
    params = {
        "hosts": sizes, "registries": kinds, "hosts_per_process": args.hosts_per_process,
        "containers_per_host": args.containers, "services": args.services,
        "idle_s": args.idle, "runs": runs_of(args), "sets": args.sets,
        "consul_hosts_per_agent": args.consul_hosts_per_agent,
        "consul_version": _first_line(["consul", "version"]),
    }  # fmt: skip
    params["hosts_dir"] = args.hosts_dir or "the work folder"
    report = Report("fleet", params)
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(work_folder("discoverd-fleet-", args.keep))
        args.hosts_root = ""
        if args.hosts_dir:
            hosts = stack.enter_context(work_folder("discoverd-fleet-hosts-", args.keep,
                                                    parent=args.hosts_dir))  # fmt: skip
            args.hosts_root = str(hosts)
        counter = RequestCounter()
        counter.install()
        for kind in kinds:
            run_registry(kind, args, work, report, sizes, counter)
    report.write(args.json)
    return 0


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "?"


if __name__ == "__main__":
    sys.exit(main_guard(main))
