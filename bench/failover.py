"""10. Registry failover: a 3-member etcd cluster, then a 3-server Consul cluster, loses its leader
(SIGKILL) while agents register and watch.

    .venv/bin/python -m bench.failover [--runs 5] [--hosts 6] [--registry etcd,consul] [--json OUT]

Each run starts a fresh cluster (``tests/support``'s ``EtcdCluster``: heartbeat 50 ms, election
timeout 500 ms; ``ConsulCluster``: ``raft_multiplier = 1``) and ``--hosts`` simulated hosts in
one process, each a full agent built by the core as in ``bench/fleet.py`` (``bench/fleet_host.py``:
a register role fed by a synthetic container source, a discover role writing to the json-file
proxy, each role with its own registry connections and watch). etcd: every host lists every
member, host i starting at member i mod 3, so some hosts talk to the leader and some to
followers. Consul: a host talks to one server, and only to the two that do not lead (the leader
is the one lost, not a host's own agent).

Load: every ``--interval`` s (0.1) a host, in turn, starts a container (the source notifies its
register role as a Docker start event does) and stops the one it started ``--running`` (5)
changes before. After ``--before`` s (3) of load the leader is SIGKILLed, and at once every host
starts one more container; the load goes on for ``--after`` s (8; Consul 15). Figures per run:

* **registrations resume**: from the SIGKILL until each host's container started at the kill
  is in the registry (etcd: the bench's own watch on a member that survives; Consul: the
  catalog of a surviving server, polled every 50 ms); the run's figure is the slowest host;
* **watches resume**: from the SIGKILL until each host's proxy shows a container started after
  the kill (its discover role learns it from its watch, or from a blocking query with Consul);
  the run's figure is the slowest host. This includes the registration it waits for.

Both as p50 / max over the runs; target for etcd: max <= 1.5 s (issue 10). Consul: report
only. No client sends requests through a proxy here (the json-file proxy routes nothing): the
fault suite (``tests/faults/test_etcd_cluster.py``) counts failed requests through HAProxy when
the leader is killed. Needs etcd and consul (``scripts/install-deps.sh``); no Docker, no root.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fleet import Worker
from bench.stack import Figure, Report, Target, main_guard, parser, runs_of, work_folder
from tests.support.consul import ConsulCluster
from tests.support.etcd import EtcdCluster
from tests.support.services import ServiceUnavailable

#: etcd's failover target (issue 10): registrations and watches resume within 1.5 s.
TARGET_S = 1.5
#: A container id's first 12 characters name its instance (``<host>:<cid12>:8000:tcp``).
MARKER_LEN = 12
_INSTANCE = re.compile(rb"/h\d+:([0-9a-f]{12}):")


def marker(run: int, serial: int) -> str:
    """A container id prefix of 12 hex digits, unique within a benchmark run."""
    return f"fa{run:02x}{serial:08x}"


# ------------------------------------------------------------------------------------------------
# The registries: start, kill the leader, see registrations


class Registrations:
    """When each marker was first seen registered (``time.monotonic()``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}
        self.stop = threading.Event()

    def saw(self, found: str, moment: float) -> None:
        with self._lock:
            self._seen.setdefault(found, moment)

    def when(self, name: str) -> float | None:
        with self._lock:
            return self._seen.get(name)


class EtcdSide:
    kind = "etcd"

    def __init__(self, work: Path) -> None:
        self.cluster = EtcdCluster(work / "etcd", size=3)
        self.leader_index: int | None = None
        self._watch: requests.Response | None = None

    def start(self) -> None:
        self.cluster.start()
        deadline = time.monotonic() + 15
        while (leader := self.cluster.leader()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if leader is None:
            raise ServiceUnavailable("the etcd cluster elected no leader")
        self.leader_index = leader

    def addresses(self) -> list[str]:
        return self.cluster.endpoints

    def leader_name(self) -> str:
        assert self.leader_index is not None
        return self.cluster.members[self.leader_index].name

    def kill_leader(self) -> float:
        assert self.leader_index is not None
        process = self.cluster.members[self.leader_index].process
        assert process is not None
        moment = time.monotonic()
        process.kill()
        process.wait()
        self.cluster.members[self.leader_index].process = None
        return moment

    def new_leader(self) -> str:
        index = self.cluster.leader()
        return self.cluster.members[index].name if index is not None else "none"

    def elected(self) -> bool:
        """Whether a surviving member reports a leader among the survivors."""
        survivors = [m for i, m in enumerate(self.cluster.members) if i != self.leader_index]
        ids = set()
        leaders = set()
        for member in survivors:
            status = member.status(timeout=0.5)
            if status is not None:
                ids.add(status[0])
                leaders.add(status[1])
        return bool(leaders & ids)

    def observe(self, seen: Registrations) -> threading.Thread:
        """A watch of the instance keys on a member that will survive: each new instance's
        marker and the moment its put arrived."""
        assert self.leader_index is not None
        member = next(m for i, m in enumerate(self.cluster.members) if i != self.leader_index)
        start, end = b"/backends/", b"/backends0"
        body = {
            "create_request": {
                "key": base64.b64encode(start).decode(),
                "range_end": base64.b64encode(end).decode(),
            }
        }
        session = requests.Session()
        session.trust_env = False
        response = session.post(
            member.url + "/v3/watch", data=json.dumps(body), stream=True, timeout=(2, None)
        )
        self._watch = response

        def read() -> None:
            with contextlib.suppress(requests.RequestException, ValueError, AttributeError):
                for line in response.iter_lines():
                    moment = time.monotonic()
                    events = (json.loads(line).get("result") or {}).get("events") or []
                    for event in events:
                        if event.get("type", "PUT") != "PUT":
                            continue
                        key = base64.b64decode(event["kv"]["key"])
                        found = _INSTANCE.search(key)
                        if found:
                            seen.saw(found.group(1).decode(), moment)
            session.close()

        thread = threading.Thread(target=read, name="etcd-observer", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        if self._watch is not None:
            with contextlib.suppress(Exception):
                self._watch.close()
        self.cluster.stop()


class ConsulSide:
    kind = "consul"

    def __init__(self, work: Path, services: int) -> None:
        self.cluster = ConsulCluster(work / "consul", size=3)
        self.services = services
        self.leader_index: int | None = None

    def start(self) -> None:
        self.cluster.start()
        deadline = time.monotonic() + 30
        while (leader := self.cluster.leader()) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if leader is None:
            raise ServiceUnavailable("the Consul cluster elected no leader")
        self.leader_index = leader

    def followers(self) -> list[Any]:
        return [s for i, s in enumerate(self.cluster.servers) if i != self.leader_index]

    def addresses(self) -> list[str]:
        return [s.http_address for s in self.followers()]

    def leader_name(self) -> str:
        assert self.leader_index is not None
        return str(self.cluster.servers[self.leader_index].name)

    def kill_leader(self) -> float:
        assert self.leader_index is not None
        server = self.cluster.servers[self.leader_index]
        process = server.proc
        assert process is not None
        moment = time.monotonic()
        process.kill()
        process.wait()
        server.proc = None
        return moment

    def new_leader(self) -> str:
        index = self.cluster.leader()
        return str(self.cluster.servers[index].name) if index is not None else "none"

    def elected(self) -> bool:
        """Whether a surviving server knows a leader other than the one killed."""
        assert self.leader_index is not None
        killed = self.cluster.servers[self.leader_index].address
        for server in self.followers():
            leader = server.leader()
            if leader and leader.rpartition(":")[0] != killed:
                return True
        return False

    def observe(self, seen: Registrations) -> threading.Thread:
        """Polls the catalog of a surviving server every 50 ms for each service."""
        server = self.followers()[0]
        session = requests.Session()
        session.trust_env = False

        def poll() -> None:
            while not seen.stop.is_set():
                for index in range(self.services):
                    try:
                        answer = session.get(
                            f"{server.url}/v1/catalog/service/fleet{index}", timeout=2
                        ).json()
                    except (requests.RequestException, ValueError):
                        continue
                    moment = time.monotonic()
                    for entry in answer if isinstance(answer, list) else []:
                        found = _INSTANCE.search(b"/" + str(entry.get("ServiceID", "")).encode())
                        if found:
                            seen.saw(found.group(1).decode(), moment)
                seen.stop.wait(0.05)
            session.close()

        thread = threading.Thread(target=poll, name="consul-observer", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.cluster.stop()


# ------------------------------------------------------------------------------------------------
# The hosts


class Hosts:
    """The simulated hosts of one run: one ``bench.fleet_host`` process (``bench.fleet``'s
    ``Worker``), and when each host's proxy first showed each marker."""

    def __init__(self, side: EtcdSide | ConsulSide, work: Path, args: Any) -> None:
        self.work = work
        self.cluster = _ClusterView(side.kind, side.addresses())
        self.containers = int(args.containers)
        self.services = int(args.services)
        self.log_level = str(args.log_level)
        self.sets: list[str] = []
        self.count = int(args.hosts)
        self._lock = threading.Lock()
        self.reached: dict[str, dict[int, float]] = {}
        self.worker = Worker(0, self)  # type: ignore[arg-type]
        try:
            if not self.worker.hello.wait(60):
                raise RuntimeError(f"the agent process did not start; {self.worker.tail()}")
            self.worker.call({"op": "add", "first": 0, "count": self.count}, timeout=120)
        except BaseException:
            self.worker.close()
            raise

    def on_reached(self, message: dict[str, Any]) -> None:
        if not message.get("present"):
            return
        with self._lock:
            seen = self.reached.setdefault(str(message["marker"]), {})
            seen.setdefault(int(message["host"]), float(message["t"]))

    def wait_ready(self, timeout: float) -> None:
        expected = self.count * self.containers
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            status = self.worker.call({"op": "status"})
            counts = {int(k): int(v) for k, v in dict(status["counts"]).items()}
            short = [h for h in range(self.count) if counts.get(h, -1) != expected]
            if status["ready"] and not short:
                return
            state = f"{len(short)} of {self.count} hosts not showing {expected} instances"
            time.sleep(0.3)
        raise TimeoutError(f"the hosts did not converge within {timeout:g} s: {state}")

    def start(self, host: int, name: str) -> float:
        self.worker.call({"op": "expect", "marker": name, "present": True})
        reply = self.worker.call({"op": "start", "host": host, "marker": name})
        return float(reply["t"])

    def stop(self, host: int, name: str) -> None:
        self.worker.call({"op": "forget", "marker": name})
        self.worker.call({"op": "stop", "host": host, "marker": name})

    def log_lines(self) -> int:
        try:
            return len(self.worker.log_path.read_bytes().splitlines())
        except OSError:
            return 0

    def warnings_since(self, line: int) -> list[str]:
        try:
            lines = self.worker.log_path.read_text(errors="replace").splitlines()[line:]
        except OSError:
            return []
        return [x for x in lines if " WARNING " in x or " ERROR " in x]

    def close(self) -> None:
        self.worker.close()


@dataclass
class _ClusterView:
    """What ``bench.fleet.Worker`` asks of its cluster."""

    kind: str
    listed: list[str]

    def addresses(self) -> list[str]:
        return self.listed


@dataclass
class Load:
    """Starts a container on a host in turn every ``interval`` s; stops the one each host
    started ``keep`` changes before."""

    hosts: Hosts
    run: int
    interval: float
    keep: int
    serial: int = 0
    started: dict[str, tuple[int, float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    _per_host: dict[int, list[str]] = field(default_factory=dict)

    def next_marker(self) -> str:
        with self._lock:
            self.serial += 1
            return marker(self.run, self.serial)

    def start_on(self, host: int) -> str:
        name = self.next_marker()
        began = self.hosts.start(host, name)
        with self._lock:
            self.started[name] = (host, began)
            mine = self._per_host.setdefault(host, [])
            mine.append(name)
            old = mine.pop(0) if len(mine) > self.keep else None
        if old is not None:
            self.hosts.stop(host, old)
        return name

    def _loop(self) -> None:
        host = 0
        while not self._stop.wait(self.interval):
            try:
                self.start_on(host)
            except (RuntimeError, TimeoutError) as exc:
                self.errors.append(str(exc))
                return
            host = (host + 1) % self.hosts.count

    def begin(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="load", daemon=True)
        self._thread.start()

    def end(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


# ------------------------------------------------------------------------------------------------
# One run


@dataclass
class RunResult:
    registrations: list[float | None]  # per host: seconds from the kill
    watches: list[float | None]  # per host: seconds from the kill
    leader: str
    new_leader: str
    election: float | None  # seconds from the kill until a survivor reported a new leader
    warnings: list[str]

    def slowest(self, values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else max(v for v in values if v is not None)


def _wait_election(side: EtcdSide | ConsulSide, found: list[float], limit: float) -> None:
    """Poll the survivors every 20 ms until one reports a new leader; append the moment."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if side.elected():
            found.append(time.monotonic())
            return
        time.sleep(0.02)


@contextlib.contextmanager
def started(side: EtcdSide | ConsulSide) -> Iterator[None]:
    try:
        side.start()
        yield
    finally:
        side.stop()


def one_run(kind: str, number: int, args: Any, work: Path) -> RunResult:
    folder = work / f"{kind}-{number}"
    folder.mkdir(parents=True)
    side: EtcdSide | ConsulSide = (
        EtcdSide(folder) if kind == "etcd" else ConsulSide(folder, args.services)
    )
    after = args.after if args.after is not None else (8.0 if kind == "etcd" else 15.0)
    with started(side):
        hosts = Hosts(side, folder, args)
        try:
            hosts.wait_ready(120)
            time.sleep(args.settle)
            seen = Registrations()
            observer = side.observe(seen)
            load = Load(hosts, number, args.interval, args.running)
            load.begin()
            time.sleep(args.before)
            lines = hosts.log_lines()
            killed = side.kill_leader()
            elected: list[float] = []
            election = threading.Thread(
                target=_wait_election, args=(side, elected, after), name="election", daemon=True
            )
            election.start()
            burst = {host: load.start_on(host) for host in range(hosts.count)}
            time.sleep(after)
            election.join(5)
            load.end()
            seen.stop.set()
            if load.errors:
                raise RuntimeError(f"the load stopped: {load.errors[0]}")
            registrations: list[float | None] = []
            for host in range(hosts.count):
                moment = seen.when(burst[host])
                registrations.append(None if moment is None else moment - killed)
            after_kill = [m for m, (_, began) in load.started.items() if began >= killed]
            watches: list[float | None] = []
            with hosts._lock:
                reached = {m: dict(hosts.reached.get(m, {})) for m in after_kill}
            for host in range(hosts.count):
                times = [r[host] for r in reached.values() if host in r]
                watches.append(min(times) - killed if times else None)
            result = RunResult(
                registrations, watches, side.leader_name(), side.new_leader(),
                elected[0] - killed if elected else None, hosts.warnings_since(lines),
            )  # fmt: skip
            observer.join(0.1)
            return result
        finally:
            hosts.close()


# ------------------------------------------------------------------------------------------------
# Report


def _shown(values: list[float | None]) -> str:
    return ", ".join("-" if v is None else f"{v:.2f}" for v in values)


def report_kind(report: Report, kind: str, results: list[RunResult], hosts: int) -> None:
    targets = [Target("max", "<=", TARGET_S)] if kind == "etcd" else []
    for what, pick in (
        ("registrations resume", lambda r: r.registrations),
        ("watches resume", lambda r: r.watches),
    ):
        samples = [r.slowest(pick(r)) for r in results]
        measured = [s for s in samples if s is not None]
        missing = len(samples) - len(measured)
        figure = Figure(
            f"{kind} leader SIGKILL: {what} (slowest of {hosts} hosts)",
            "s",
            samples=measured,
            targets=targets,
            note=(
                f"p50 {statistics.median(measured):.2f} s over {len(measured)} runs"
                if measured
                else "no run resumed"
            )
            + (f"; {missing} run(s) without a value within the window" if missing else "")
            + ("" if kind == "etcd" else "; report only"),
        )
        report.add(figure)
    elections = [r.election for r in results if r.election is not None]
    report.add(
        Figure(
            f"{kind} leader SIGKILL: a survivor reports a new leader",
            "s",
            samples=elections,
            note="the cluster's own election, polled every 20 ms: the floor of the figures above",
        )
    )
    for number, result in enumerate(results, start=1):
        warnings = len(result.warnings)
        report.note(
            f"{kind} run {number}: leader {result.leader} killed, new leader {result.new_leader}"
            f" (reported after {_shown([result.election])} s); "
            f"registrations per host [{_shown(result.registrations)}] s; watches per host "
            f"[{_shown(result.watches)}] s; {warnings} agent warning(s)"
            + (f", first: {result.warnings[0][-160:]}" if warnings else "")
        )


def main() -> int:
    p = parser(__doc__, runs=5, quick_runs=2)
    p.add_argument("--registry", default="etcd,consul", help="etcd, consul or both (default)")
    p.add_argument("--hosts", type=int, default=6, help="simulated hosts (6)")
    p.add_argument("--containers", type=int, default=2, help="containers per host at start (2)")
    p.add_argument("--services", type=int, default=3, help="services they are spread over (3)")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between two starts (0.1)")
    p.add_argument(
        "--running", type=int, default=5, help="load containers each host keeps running (5)"
    )
    p.add_argument("--settle", type=float, default=2.0, help="calm seconds before the load (2)")
    p.add_argument("--before", type=float, default=3.0, help="load seconds before the kill (3)")
    p.add_argument(
        "--after", type=float, default=None, help="seconds observed after it (etcd 8, Consul 15)"
    )
    p.add_argument("--consul-runs", type=int, default=None, help="Consul runs (default: --runs)")
    args = p.parse_args()
    kinds = [k.strip() for k in args.registry.split(",") if k.strip()]
    for kind in kinds:
        if kind not in ("etcd", "consul"):
            p.error(f"--registry: unknown registry {kind!r}")
    if args.hosts < 2:
        p.error("--hosts: at least 2")
    runs = runs_of(args)
    params = {
        "registries": kinds, "runs": runs, "hosts": args.hosts, "containers": args.containers,
        "services": args.services, "interval_s": args.interval, "running": args.running,
        "before_s": args.before, "after_s": args.after, "consul_runs": args.consul_runs,
    }  # fmt: skip
    report = Report("failover", params)
    with work_folder("discoverd-failover-", args.keep) as work:
        for kind in kinds:
            count = runs if kind == "etcd" or args.consul_runs is None else args.consul_runs
            results = []
            for number in range(1, count + 1):
                print(f"{kind}: run {number} of {count}", flush=True)
                result = one_run(kind, number, args, work)
                print(
                    f"  election {_shown([result.election])} s, registrations "
                    f"[{_shown(result.registrations)}] s, watches [{_shown(result.watches)}] s",
                    flush=True,
                )
                results.append(result)
            report_kind(report, kind, results, args.hosts)
        report.note(f"load average at the end: {os.getloadavg()[0]:.2f}")
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
