"""Simulated hosts for the fleet benchmark (``bench/fleet.py``).

Two parts:

* **The synthetic container source**, a discoverd plugin like any other: a :class:`Source`
  announced by a ``SourcePlugin`` record (name ``synthetic``, options in the ``[synthetic]``
  section). A host starts with ``containers`` containers spread over ``services`` services
  (``fleet0``, ``fleet1``, ...); :meth:`SyntheticSource.start_container` and
  :meth:`SyntheticSource.stop_container` add and remove one and notify the register role, as
  a Docker ``start`` or ``kill`` event does. Its instances go through the same label rules as
  Docker's (``discoverd.instances_for``). Nothing listens on their addresses; the benchmark
  runs the agents with ``check = "none"``. This part imports only discoverd's public API.

* **The host runner** (``python -m bench.fleet_host``, started by ``bench/fleet.py``): one
  process running many simulated hosts. Each host is a full agent built by the core from
  settings and plugins (``discoverd.core.agent.Agent``: a ``RegisterRole`` fed by its own
  synthetic source and a ``DiscoverRole`` writing to its own json-file proxy, each role with
  its own registry object, hence its own connections, etcd lease or Consul registrations,
  watch), with its own plugin manager, host id, HOST_IP and state directory. The runner
  talks JSON lines: commands on stdin, events on stdout (see :func:`main`).

A per-host observer plugin (the ``discoverd_after_apply`` hook) timestamps the moment each
host's json-file proxy has written a map that shows (or no longer shows) a marked container:
that is when the change reached that host.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from discoverd import (
    ContainerSpec,
    Notify,
    PluginContext,
    PortBinding,
    Problem,
    ServiceInstance,
    Source,
    SourcePlugin,
    SourceSnapshot,
    hookimpl,
    instances_for,
    option,
)

NAME = "synthetic"
#: The private port of every synthetic container (published at a port of its own).
PRIVATE_PORT = 8000
#: Published ports of the containers a host starts with; later ones from PROBE_PORT_BASE.
PORT_BASE = 20000
PROBE_PORT_BASE = 30000


@dataclass(frozen=True)
class SyntheticConfig:
    """The ``[synthetic]`` section."""

    containers: int = option(1, "Containers running on this host from the start.", min=0, max=10000)
    services: int = option(
        10, "Services the containers are spread over (fleet0, fleet1, ...).", min=1, max=10000
    )
    offset: int = option(
        0, "Service of this host's first container (the host's index spreads the load).", min=0
    )
    frontend_base: int = option(
        21000, "Frontend port of service fleet0; fleetN gets frontend_base + N.", min=1,
        max=65535,
    )  # fmt: skip


def container_id(seed: str) -> str:
    """A 64-hex container id derived from ``seed``."""
    return hashlib.sha256(seed.encode()).hexdigest()


class SyntheticSource(Source):
    """Containers in memory; changed by :meth:`start_container` / :meth:`stop_container`."""

    def __init__(self, config: SyntheticConfig, host_ip: str, host_id: str) -> None:
        self.config = config
        self.host_ip = host_ip or "127.0.0.1"
        self.host_id = host_id
        self._lock = threading.Lock()
        self._containers: dict[str, ContainerSpec] = {}
        self._notify: Notify | None = None
        self._closed = threading.Event()
        self._probes = 0
        for index in range(config.containers):
            service = (config.offset + index) % config.services
            self._add(container_id(f"{host_id}/{index}"), service, PORT_BASE + index)

    def service_name(self, index: int) -> str:
        return f"fleet{index % self.config.services}"

    def _add(self, cid: str, service: int, host_port: int) -> None:
        name = self.service_name(service)
        frontend = self.config.frontend_base + service % self.config.services
        self._containers[cid] = ContainerSpec(
            id=cid,
            name=f"{name}-{cid[:6]}",
            image=f"local/{name}:1",
            labels={"SERVICE_NAME": name, f"SERVICE_{PRIVATE_PORT}_PORT": str(frontend)},
            env={},
            ports=(PortBinding(PRIVATE_PORT, "tcp", self.host_ip, host_port),),
        )

    # -- what the benchmark drives ---------------------------------------------------------------

    def start_container(self, cid: str, service: int | None = None) -> None:
        """A container with id ``cid`` starts (in service ``service``, by default this host's
        first one); the register role is woken as by a Docker ``start`` event."""
        with self._lock:
            self._probes += 1
            port = PROBE_PORT_BASE + self._probes % 30000
            self._add(cid, self.config.offset if service is None else service, port)
            notify = self._notify
        if notify is not None:
            notify("synthetic: container started")

    def stop_container(self, cid: str) -> None:
        """The container ``cid`` stops; the register role is woken as by a ``kill`` event."""
        with self._lock:
            self._containers.pop(cid, None)
            notify = self._notify
        if notify is not None:
            notify("synthetic: container stopped")

    # -- the Source interface --------------------------------------------------------------------

    def snapshot(self) -> SourceSnapshot:
        with self._lock:
            specs = list(self._containers.values())
        instances: list[ServiceInstance] = []
        problems: list[Problem] = []
        for spec in specs:
            found, refused = instances_for(spec, host_ip=self.host_ip, host_id=self.host_id)
            instances.extend(found)
            problems.extend(refused)
        return SourceSnapshot(instances=tuple(instances), problems=tuple(problems))

    def watch(self, notify: Notify, stop: threading.Event) -> None:
        with self._lock:
            self._notify = notify
        try:
            # Events come from start_container/stop_container; this only waits for the end.
            while not stop.is_set() and not self._closed.wait(5.0):
                pass
        finally:
            with self._lock:
                self._notify = None

    def close(self) -> None:
        self._closed.set()


def make_source(ctx: PluginContext[SyntheticConfig]) -> Source:
    return SyntheticSource(ctx.config, ctx.host.ip, ctx.host.id)


@hookimpl
def discoverd_register_sources() -> list[SourcePlugin]:
    return [
        SourcePlugin(
            name=NAME,
            factory=make_source,
            description="Synthetic containers in memory, for the fleet benchmark.",
            config=SyntheticConfig,
        )
    ]


# ------------------------------------------------------------------------------------------------
# The host runner (python -m bench.fleet_host): everything below imports discoverd's core, which
# a plugin never does; the runner is the benchmark's agent, not part of the plugin.


class Board:
    """What the observers of one runner saw: when each host's proxy first showed (or stopped
    showing) each marker the benchmark asked about, and how many instances each host's last
    map held."""

    def __init__(self, emit: Callable[[dict[str, object]], None]) -> None:
        self.emit = emit
        self._lock = threading.Lock()
        self._expect: dict[tuple[str, bool], set[int]] = {}  # (marker, present) -> hosts done
        self.counts: dict[int, int] = {}
        self.applies = 0

    def expect(self, marker: str, present: bool) -> None:
        with self._lock:
            self._expect.setdefault((marker, present), set())

    def forget(self, marker: str) -> None:
        with self._lock:
            for key in [k for k in self._expect if k[0] == marker]:
                del self._expect[key]

    def applied(self, host: int, config: str, moment: float) -> None:
        count = config.count('"host_id"')
        reached: list[tuple[str, bool]] = []
        with self._lock:
            self.counts[host] = count
            self.applies += 1
            for (marker, present), done in self._expect.items():
                if not present and host not in self._expect.get((marker, True), ()):
                    continue  # a removal counts only where the container was shown
                if host not in done and (marker in config) == present:
                    done.add(host)
                    reached.append((marker, present))
        for marker, present in reached:
            self.emit(
                {"ev": "reached", "host": host, "marker": marker, "present": present, "t": moment}
            )


class Observer:
    """A per-host observer plugin: the ``discoverd_after_apply`` hook of one host's manager."""

    def __init__(self, host: int, board: Board, clock: Callable[[], float]) -> None:
        self.host = host
        self.board = board
        self.clock = clock

    @hookimpl
    def discoverd_after_apply(self, proxy: str, config: str, result: str) -> None:
        self.board.applied(self.host, config, self.clock())


def main() -> int:
    """Run simulated hosts until stdin closes or the ``exit`` command.

    Commands (one JSON object per line on stdin), each answered by one line on stdout with
    ``"ev": "reply"`` and the same ``"id"``::

        {"op": "add", "first": 0, "count": 25}     start hosts first .. first+count-1
        (optionally "addresses": {"7": "127.2.0.2:23710"}: a host's own Consul agent)
        {"op": "status"}                            ready, hosts, per-host instance counts
        {"op": "expect", "marker": M, "present": true}
        {"op": "start", "host": 7, "marker": M}     a container whose id starts with M starts
        {"op": "stop", "host": 7, "marker": M}      and stops ("t": monotonic time of the call)
        {"op": "forget", "marker": M}
        {"op": "counters"}                          the agents' HTTP requests, bytes read
        {"op": "exit"}

    Unsolicited events: ``{"ev": "reached", "host", "marker", "present", "t"}`` when a host's
    proxy shows (``present``) or no longer shows a marker the runner was told to expect.
    """
    import argparse
    import concurrent.futures
    import dataclasses
    import json
    import logging
    import sys
    import time
    from importlib import metadata
    from pathlib import Path

    from discoverd.core.agent import Agent, plugin_schemas
    from discoverd.core.config import CoreConfig, load_settings
    from discoverd.core.manager import get_plugin_manager

    p = argparse.ArgumentParser(description="simulated discoverd hosts (see bench/fleet.py)")
    p.add_argument("--registry", required=True, choices=("etcd", "consul"))
    p.add_argument("--addresses", required=True, help="registry endpoints, comma-separated")
    p.add_argument("--work", required=True, type=Path, help="folder of the hosts' state dirs")
    p.add_argument("--containers", type=int, default=1)
    p.add_argument("--services", type=int, default=10)
    p.add_argument("--log-level", default="info")
    p.add_argument("--set", action="append", default=[], dest="sets")
    args = p.parse_args()

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("fleet-host")
    out_lock = threading.Lock()

    def emit(message: dict[str, object]) -> None:
        line = json.dumps(message, separators=(",", ":")) + "\n"
        with out_lock:
            sys.stdout.write(line)
            sys.stdout.flush()

    # The HTTP requests every agent of this process sends, by kind: both registry clients
    # (the etcd plugin's gateway client, py-consul) and the etcd watch stream go through
    # requests.Session.send.
    counter = RequestCounter()
    counter.install()

    # The json-file proxy: the example package, installed or else from its source tree (where
    # a build may have left an .egg-info whose entry point is then found as well).
    extra: list[tuple[str, object]] = [(NAME, sys.modules[__name__])]

    def has_json_file() -> bool:
        return any(ep.name == "json-file" for ep in metadata.entry_points(group="discoverd"))

    if not has_json_file():
        repo = Path(__file__).resolve().parent.parent
        sys.path.insert(0, str(repo / "examples" / "discoverd-jsonfile" / "src"))
        if not has_json_file():
            import discoverd_jsonfile  # type: ignore[import-not-found]

            extra.append(("json-file", discoverd_jsonfile))

    board = Board(emit)
    addresses = [a.strip() for a in args.addresses.split(",") if a.strip()]
    agents: dict[int, Agent] = {}
    sources: dict[int, SyntheticSource] = {}

    single_machine = "single_machine" in {f.name for f in dataclasses.fields(CoreConfig)}

    def host_ip(index: int) -> str:
        return f"127.1.{index // 250}.{index % 250 + 1}"

    def build(index: int, own: str | None = None) -> Agent:
        host_id = f"h{index:05d}"
        observer = Observer(index, board, time.monotonic)
        manager = get_plugin_manager([*extra, ("fleet-observer", observer)])
        if args.registry == "etcd":
            # Every host lists every member, starting at a different one (as a DNS name or a
            # load balancer would spread them): the gateway uses the first that answers.
            shift = index % len(addresses)
            where = f"etcd.endpoints={','.join(addresses[shift:] + addresses[:shift])}"
        else:
            # Consul: a host registers with, and reads from, one agent: its client agent if
            # the benchmark runs them, else one of the servers.
            where = f"consul.address={own or addresses[index % len(addresses)]}"
        flags = {
            "source": NAME,
            "registry": args.registry,
            "proxy": "json-file",
            "host_id": host_id,
            "host_ip": host_ip(index),
            "state_dir": str(args.work / host_id),
            "check": "none",
            "log_level": args.log_level,
        }
        if single_machine:
            # Every simulated host has a loopback HOST_IP (127.1.X.Y, where nothing listens):
            # the agents must route loopback backends whichever host registered them.
            flags["single_machine"] = "true"
        settings = load_settings(
            plugin_schemas(manager),
            env={},
            flags=flags,
            sets=[
                where,
                f"{NAME}.containers={args.containers}",
                f"{NAME}.services={args.services}",
                f"{NAME}.offset={index}",
                "json-file.indent=0",
                *args.sets,
            ],
        )
        agent = Agent(settings, manager)
        agent.build()
        assert agent.register is not None
        source = agent.register.source
        assert isinstance(source, SyntheticSource)
        sources[index] = source
        return agent

    def add(first: int, count: int, own: dict[str, str]) -> None:
        for index in range(first, first + count):
            agent = build(index, own.get(str(index)))
            agent.start()
            agents[index] = agent

    def ready() -> bool:
        return all(
            a.register is not None
            and a.register.synced.is_set()
            and a.discover is not None
            and a.discover.converged.is_set()
            for a in agents.values()
        )

    def shutdown() -> None:
        # Discover roles first (they would otherwise follow every host's departure), then the
        # register roles, without deregistering: the cluster is thrown away next.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda a: a.discover and a.discover.shutdown(), agents.values()))
            list(
                pool.map(
                    lambda a: a.register and a.register.shutdown(deregister=False),
                    agents.values(),
                )
            )

    emit({"ev": "hello"})
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            command = json.loads(line)
            op = command.get("op")
            reply: dict[str, object] = {"ev": "reply", "id": command.get("id")}
            if op == "add":
                add(int(command["first"]), int(command["count"]), command.get("addresses", {}))
                reply["hosts"] = len(agents)
            elif op == "status":
                reply.update(
                    ready=ready(), hosts=len(agents), counts=dict(board.counts),
                    applies=board.applies,
                )  # fmt: skip
            elif op == "expect":
                board.expect(str(command["marker"]), bool(command["present"]))
            elif op in ("start", "stop"):
                source = sources[int(command["host"])]
                marker = str(command["marker"])
                reply["t"] = time.monotonic()
                if op == "start":
                    source.start_container(marker + container_id(marker)[len(marker) :])
                else:
                    source.stop_container(marker + container_id(marker)[len(marker) :])
            elif op == "forget":
                board.forget(str(command["marker"]))
            elif op == "counters":
                reply.update(counter.totals())
            elif op == "exit":
                emit(reply)
                break
            else:
                reply["error"] = f"unknown op {op!r}"
            emit(reply)
    except KeyboardInterrupt:
        pass
    finally:
        log.info("fleet-host: stopping %d hosts", len(agents))
        shutdown()
    return 0


class RequestCounter:
    """Counts the HTTP requests of this process by kind (:func:`request_kind`), and the bytes
    of their answers (streamed answers, such as etcd's watch, count as requests only), by
    wrapping ``requests.Session.send``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.sizes: dict[str, int] = {}

    def install(self) -> None:
        import requests

        original = requests.Session.send
        counter = self

        def send(
            session: requests.Session, request: requests.PreparedRequest, **kwargs: object
        ) -> requests.Response:
            kind = request_kind(request.method or "", request.url or "", request.body)
            response = original(session, request, **kwargs)  # type: ignore[arg-type]
            # Not streamed: requests has read the whole answer already.
            size = 0 if kwargs.get("stream") else len(response.content or b"")
            counter.add(kind, size)
            return response

        requests.Session.send = send  # type: ignore[method-assign,assignment]

    def add(self, kind: str, size: int) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.sizes[kind] = self.sizes.get(kind, 0) + size

    def totals(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"counts": dict(self.counts), "bytes": dict(self.sizes)}


def request_kind(method: str, url: str, body: object) -> str:
    """A short name for one registry request: ``etcd keepalive``, ``consul blocking query``,
    ... (the path without ids; reads and writes told apart for etcd transactions)."""
    path, _, query = url.partition("://")[2].partition("/")[2].partition("?")
    path = "/" + path
    if path.startswith("/v3/"):
        if path == "/v3/kv/txn":
            raw = body if isinstance(body, bytes) else str(body or "").encode()
            write = b"request_put" in raw or b"request_delete_range" in raw
            return "etcd txn (write)" if write else "etcd txn (read)"
        return "etcd " + path.removeprefix("/v3/")
    if path.startswith("/v1/"):
        # Consul: ids dropped (/v1/agent/check/pass/<check>, /v1/session/renew/<session>,
        # /v1/catalog/node/<node>, /v1/kv/<key>); a blocking query carries an index.
        parts = path.split("/")
        depth = {"agent": 5, "kv": 3}.get(parts[2] if len(parts) > 2 else "", 4)
        blocking = " (blocking)" if "index=" in query else ""
        return f"consul {method} {'/'.join(parts[:depth])}{blocking}"
    return f"other {method} {path}"


if __name__ == "__main__":
    import sys

    sys.exit(main())
