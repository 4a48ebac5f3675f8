"""6. Scale: the discover role (etcd + HAProxy) with 1,000 services x 10 instances in etcd.

    .venv/bin/python -m bench.scale [--services 1000] [--instances 10] [--json OUT]

Writes the registry straight into etcd in discoverd's key layout (the etcd plugin's `KeyScheme`
and metadata encoding, instances spread over a few fake hosts; addresses 127.0.X.Y where nothing
listens, so HAProxy's health checks mark them down; frontend ports from `--port-base`, 20000).
Each instance's metadata is what the register role writes for a container without labels: a
container address of its own and the mode detected, http (`--metadata bare`: none, the
registry of the passes before 2026-12-03's tenth).
Then measures, for `discoverd discover`:

- cold start: from starting the process to its log line saying the proxy applied the whole
  registry (`discover: haproxy started (1000 services, 10000 instances)`), `--cold-runs` times
  (3), each a fresh discoverd and HAProxy against the same etcd; targets: at most 2 s (issues 3
  and 4) and at most 1 s on every run (issue 10);
- one instance change applied: from the etcd put moving one instance to a new address to that
  address showing in `show servers state` on HAProxy's admin socket; target <= 300 ms;
- RSS of the discoverd process (VmRSS, and its peak VmHWM); target <= 100 MB;
- idle CPU of the discoverd process over `--idle` seconds (60); target < 1 % of one core.

With `--breakdown`, discoverd runs at debug level and the cold start is split into where its
time went: from starting the process to its first pass (Python, imports, settings, plugins),
then the stages of that pass as discoverd logs them (registry read and parse, build, servable,
render, validate with `haproxy -c`, apply: writing the file and starting HAProxy), each with
the CPU time the pass's thread spent in it. Every cold start also notes the CPU it took by
process (discoverd, etcd answering its read, HAProxy's master and workers) and their sum
over the machine's cores: the least time the cold start could take there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import (
    Agent,
    Figure,
    Report,
    Stack,
    Target,
    cpu_seconds,
    etcd_put_many,
    free_port,
    haproxy_cli,
    haproxy_pids,
    idle_cpu_percent,
    main_guard,
    parser,
    rss_kib,
    runs_of,
)
from discoverd import ServiceInstance, with_container_address
from discoverd.core.model import DETECTED_MODE_KEY
from discoverd.plugins.etcd.keys import KeyScheme, encode_metadata

HOSTS = ("bench-host-1", "bench-host-2", "bench-host-3", "bench-host-4", "bench-host-5")


def service_name(index: int) -> str:
    return f"svc{index:04d}"


def address(index: int) -> str:
    return f"127.0.{2 + index // 250}.{1 + index % 250}"


#: ``--metadata``: what each instance's metadata holds.
METADATA = ("register", "bare")


def container_ip(number: int) -> str:
    """A container IP of its own for instance ``number`` (a Docker bridge's range)."""
    return f"172.{18 + number // 62500}.{number // 250 % 250}.{2 + number % 250}"


def registry_items(
    services: int, instances: int, port_base: int, metadata: str = "register"
) -> list[tuple[str, str]]:
    """Every key of the fake registry, in the etcd plugin's layout. With ``metadata``
    ``register`` each instance carries what the register role writes for a container without
    labels (its container address and the mode detected, http); ``bare``: nothing beyond the
    frontend port and host (the figures before 2026-12-03's tenth pass)."""
    layout = KeyScheme()
    register = metadata == "register"
    items: list[tuple[str, str]] = []
    for s in range(services):
        name = service_name(s)
        items.append((layout.port_key(name), str(port_base + s)))
        for i in range(instances):
            number = s * instances + i
            host = HOSTS[number % len(HOSTS)]
            instance = ServiceInstance(
                service=name,
                id=f"{host}-{name}-{i:02d}",
                address=address(s),
                port=9000 + i,
                frontend_port=port_base + s,
                meta=((DETECTED_MODE_KEY, "http"),) if register else (),
                host_id=host,
            )
            if register:  # as the Docker source sets it: checked, in canonical form
                instance = with_container_address(instance, container_ip(number), 8000)
            items.append((layout.backend_key(name, instance.id), instance.endpoint))
            items.append((layout.meta_key(name, instance.id), encode_metadata(instance)))
    return items


def breakdown(lines: list[tuple[float, str]], started: float, cold: float) -> str:
    """Where the cold start went, from discoverd's debug lines (see ``--breakdown``)."""
    rows = [f"cold start {cold * 1000:.0f} ms:"]
    for _, text in lines:
        if "discover: reconcile (start)" in text and (found := re.search(r"\(t=([0-9.]+)\)", text)):
            first = float(found.group(1)) / 1000 - started
            rows.append(
                f"  start {first * 1000:.0f} ms (Python, imports, plugins, to the first pass)"
            )
        if "discover: pass started:" in text:
            stages = text.split("discover: pass started:", 1)[1].split(";")[0]
            for stage in stages.split(","):
                rows.append(f"  {stage.strip()}")
            break
    return "\n".join(rows)


def cold_start_cpu(agent_pid: int, etcd_pid: int | None, etcd_before: float, state: Path) -> str:
    """The CPU the cold start took, by process, read as soon as the applied line arrived:
    discoverd's whole life so far, etcd's since just before discoverd started (answering the
    snapshot read; nothing else talks to it then), HAProxy's master and workers' whole lives
    (the workers' first health checks included). Their sum over the machine's cores is the
    least time the cold start could take here if every part ran in parallel."""
    own = cpu_seconds(agent_pid)
    etcd = cpu_seconds(etcd_pid) - etcd_before if etcd_pid is not None else 0.0
    haproxy = 0.0
    for pid in haproxy_pids(state):
        with contextlib.suppress(OSError):
            haproxy += cpu_seconds(pid)
    total = own + etcd + haproxy
    cores = os.cpu_count() or 1
    return (
        f"cold start CPU: discoverd {own * 1000:.0f} ms, etcd {etcd * 1000:.0f} ms, "
        f"HAProxy {haproxy * 1000:.0f} ms; sum {total * 1000:.0f} ms, at least "
        f"{total / cores * 1000:.0f} ms on {cores} cores"
    )


def ports_free(first: int, count: int) -> bool:
    for port in range(first, first + count):
        with socket.socket() as sock:
            # As HAProxy binds: a port that only has connections in TIME_WAIT is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def wait_ports_free(first: int, count: int) -> None:
    deadline = time.monotonic() + 30  # the HAProxy of a run just before may still be exiting
    while not ports_free(first, count):
        if time.monotonic() > deadline:
            raise SystemExit(f"ports {first}-{first + count - 1} are not all free")
        time.sleep(0.5)


def measure(stack: Stack, args: argparse.Namespace, runs: int, report: Report) -> None:
    services: int = args.services
    instances: int = args.instances
    port_base: int = args.port_base
    wait_ports_free(port_base, services)
    items = registry_items(services, instances, port_base, args.metadata)
    begin = time.monotonic()
    etcd_put_many(stack.etcd, items)
    print(f"wrote {len(items)} keys to etcd in {time.monotonic() - begin:.1f} s", flush=True)

    # The stats page's port must not be one of the services' (the service would be refused).
    stats = free_port()
    while port_base <= stats < port_base + services:
        stats = free_port()
    sets = [f"haproxy.check_interval={args.check_interval}"]
    pattern = rf"discover: haproxy \S+ \({services} services, {services * instances} instances\)"
    colds: list[float] = []
    agent: Agent | None = None
    for n in range(max(1, args.cold_runs)):
        if agent is not None:  # the one before, and the HAProxy it left: each start is cold
            stack.stop_agent(agent)
            wait_ports_free(port_base, services)
        etcd_pid = stack.etcd.pid
        etcd_before = cpu_seconds(etcd_pid) if etcd_pid is not None else 0.0
        agent = stack.agent(
            "discover",
            sets=sets,
            log_level="debug" if args.breakdown else None,
            stats_port=stats,
            name=f"agent{n}",  # a state folder of its own: nothing kept from the run before
        )
        applied, _ = agent.wait_line(pattern, timeout=300)
        cold = applied - agent.started
        colds.append(cold)
        cpu = cold_start_cpu(agent.pid, etcd_pid, etcd_before, agent.state_dir)
        print(f"cold start {n + 1}: {cold:.2f} s", flush=True)
        if args.breakdown:
            agent.wait_line(r"discover: pass started:", timeout=60)  # logged once all is done
            print(breakdown(agent.lines, agent.started, cold), flush=True)
        report.note(f"cold start {n + 1}: {cpu}")
    assert agent is not None
    state = agent.state_dir
    servers = sum(
        1
        for row in haproxy_cli(state, "show servers state").splitlines()
        if row[:1].isdigit() and len(row.split()) > 5
    )
    report.add(
        Figure(
            "scale: cold start to applied config",
            "s",
            samples=colds,
            # 2 s: issues 3 and 4; 1 s on every run: issue 10.
            targets=[Target("max", "<=", 2), Target("max", "<=", 1)],
            note=f"{services} services x {instances} instances; HAProxy reports {servers} servers",
        )
    )

    layout = KeyScheme()
    samples: list[float] = []
    for n in range(runs):
        time.sleep(1.0)
        s = (n * 97 + 13) % services
        name = service_name(s)
        host = HOSTS[(s * instances) % len(HOSTS)]
        iid = f"{host}-{name}-00"
        new_address, new_port = f"127.0.9.{1 + n % 250}", 9500 + n
        mark = len(agent.lines)
        start = time.monotonic()
        etcd_put_many(stack.etcd, [(layout.backend_key(name, iid), f"{new_address}:{new_port}")])
        deadline = start + 60
        while True:
            text = haproxy_cli(state, f"show servers state {name}")
            if any(
                f" {iid} {new_address} " in row and f" {new_port} " in row
                for row in text.splitlines()
            ):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"change {n + 1}: {iid} never moved to {new_address}")
            time.sleep(0.005)
        samples.append((time.monotonic() - start) * 1000)
        _, how = agent.wait_line(r"discover: haproxy \S+ \(", timeout=30, since=mark)
        print(f"change {n + 1}: {samples[-1]:.0f} ms ({how.split('discover: ')[-1]})", flush=True)
    report.add(
        Figure(
            "scale: one instance change applied",
            "ms",
            samples=samples,
            targets=[Target("p99", "<=", 300)],
            note="etcd put to the address in show servers state",
        )
    )

    rss, hwm = rss_kib(agent.pid)
    report.add(
        Figure(
            "scale: discover RSS",
            "MB",
            value=rss / 1024,
            targets=[Target("value", "<=", 100)],
            note=f"VmHWM (peak) {hwm / 1024:.0f} MB",
        )
    )
    idle: float = args.idle
    print(f"measuring idle CPU over {idle:g} s", flush=True)
    cpu = idle_cpu_percent(agent.pid, idle)
    report.add(
        Figure(
            "scale: discover idle CPU",
            "% of a core",
            value=cpu,
            targets=[Target("value", "<", 1)],
            note=f"over {idle:g} s, resync every 30 s",
        )
    )
    proxy_rss = [rss_kib(pid)[0] / 1024 for pid in haproxy_pids(state)]
    report.note(
        "HAProxy RSS (master, workers): " + ", ".join(f"{value:.0f} MB" for value in proxy_rss)
    )


def main() -> int:
    p = parser(__doc__, runs=10, quick_runs=3)
    p.add_argument("--services", type=int, default=1000, help="services (1000)")
    p.add_argument("--instances", type=int, default=10, help="instances per service (10)")
    p.add_argument("--port-base", type=int, default=20000, help="first frontend port (20000)")
    p.add_argument("--idle", type=float, default=None, help="seconds of idle CPU (60; quick 15)")
    p.add_argument(
        "--cold-runs",
        type=int,
        default=None,
        help="cold starts, each a fresh discoverd and HAProxy against the same etcd (3; quick 1)",
    )
    p.add_argument(
        "--metadata",
        choices=METADATA,
        default="register",
        help="each instance's metadata: register (what the register role writes for a "
        "container without labels: its container address, the mode detected, http) or bare "
        "(none: the figures before 2026-12-03's tenth pass)",
    )
    p.add_argument(
        "--check-interval",
        default="10s",
        help="HAProxy health check interval (10s: 10,000 "
        "servers checked every second would load a small machine)",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="run discoverd at debug level and print where the cold start's time went",
    )
    args = p.parse_args()
    if args.idle is None:
        args.idle = 15.0 if args.quick else 60.0
    if args.cold_runs is None:
        args.cold_runs = 1 if args.quick else 3
    runs = runs_of(args)
    params = {
        "services": args.services,
        "instances": args.instances,
        "runs": runs,
        "cold_runs": max(1, args.cold_runs),
        "idle_s": args.idle,
        "check_interval": args.check_interval,
        "metadata": args.metadata,
    }
    report = Report("scale", params)
    with Stack(with_docker=False, keep=args.keep, log_level=args.log_level) as stack:
        measure(stack, args, runs, report)
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
