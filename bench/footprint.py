"""7. Footprint at idle: both roles in one discoverd process (etcd + HAProxy) with a few services.

    .venv/bin/python -m bench.footprint [--services 3] [--per-service 2] [--json OUT]

Runs `--services` services of `--per-service` whoami containers each, starts `discoverd` (both
roles), waits until every container answers through its frontend, lets it settle, then reads
the CPU used (utime + stime) over `--idle` seconds and VmRSS from /proc/PID/status, `--runs`
times in a row (the RSS reported is the largest reading; VmHWM is the peak since start).
Target: RSS <= 50 MB.

Also reported: the process tree discoverd keeps running (discoverd, HAProxy's master and its
workers), as the sum of their RSS (pages shared between them, such as HAProxy's master and
worker, counted in each) and as the sum of their PSS (each shared page divided among the
processes that map it: what the tree costs the machine), and discoverd's threads.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import (
    Figure,
    Report,
    Stack,
    Target,
    haproxy_pids,
    idle_cpu_percent,
    main_guard,
    parser,
    rss_kib,
    runs_of,
    wait_answer,
    whoami_labels,
)
from tests.support.services import free_port


def pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB (/proc/PID/smaps_rollup); 0 if unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    p = parser(__doc__, runs=1, quick_runs=1)
    p.add_argument("--services", type=int, default=3, help="services (3)")
    p.add_argument("--per-service", type=int, default=2, help="containers per service (2)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds before measuring (5)")
    p.add_argument("--idle", type=float, default=None, help="seconds of idle CPU (60; quick 15)")
    args = p.parse_args()
    if args.idle is None:
        args.idle = 15.0 if args.quick else 60.0
    params = {"services": args.services, "per_service": args.per_service, "idle_s": args.idle}
    report = Report("footprint", params)
    with Stack(keep=args.keep, log_level=args.log_level) as stack:
        waits: list[tuple[int, str]] = []
        for index in range(args.services):
            frontend = free_port()
            labels = whoami_labels(frontend, "http", name=f"svc{index}")
            for container in stack.run_containers(args.per_service, labels=labels):
                waits.append((frontend, container.id[:12]))
        agent = stack.agent()
        for frontend, host in waits:
            wait_answer(frontend, host, 90)
        print(f"all {len(waits)} containers routable; settling {args.settle:g} s", flush=True)
        time.sleep(args.settle)
        rss_samples: list[float] = []
        cpu_samples: list[float] = []
        for _ in range(runs_of(args)):
            cpu_samples.append(idle_cpu_percent(agent.pid, args.idle))
            rss_samples.append(rss_kib(agent.pid)[0] / 1024)
        hwm = rss_kib(agent.pid)[1] / 1024
        tree = [agent.pid, *haproxy_pids(agent.state_dir)]
        tree_rss = sum(rss_kib(pid)[0] for pid in tree) / 1024
        tree_pss = sum(pss_kib(pid) for pid in tree) / 1024
        own_pss = pss_kib(agent.pid) / 1024
        report.add(
            Figure(
                "both roles at idle: RSS",
                "MB",
                value=max(rss_samples),
                targets=[Target("value", "<=", 50)],
                note=f"largest of {len(rss_samples)} reading(s); VmHWM (peak) {hwm:.0f} MB; "
                f"{args.services} services x {args.per_service} containers",
            )
        )
        report.add(
            Figure(
                "both roles at idle: process tree RSS (discoverd + HAProxy)",
                "MB",
                value=tree_rss,
                note=f"sum of the RSS of {len(tree)} processes (discoverd, HAProxy master and "
                f"workers); their PSS: {tree_pss:.0f} MB (discoverd's own {own_pss:.0f} MB); "
                f"discoverd runs {threads(agent.pid)} threads",
            )
        )
        report.add(
            Figure(
                "both roles at idle: CPU",
                "% of a core",
                samples=cpu_samples,
                note=f"windows of {args.idle:g} s",
            )
        )
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
