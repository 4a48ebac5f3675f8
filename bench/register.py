"""8. Register role at scale: `--containers` (500) containers on one host, and registry traffic
at idle.

    .venv/bin/python -m bench.register [--containers 500] [--idle 60] [--json OUT]

Starts the containers first (whoami, port 8000 published on 127.0.0.1, in parallel threads,
spread over `--services` services), then `discoverd register`, and polls etcd until it holds one
instance key per container: the time from starting the agent to that moment is the figure
(target <= 5 s). Then, after `--settle` seconds, it reads etcd's own counters from its /metrics
endpoint, waits `--idle` seconds (times `--runs`), reads them again and reports the deltas:
writes (puts, deletes, transactions) and gRPC calls by method.
Target: no registry traffic beyond lease keepalives.
"""

from __future__ import annotations

import re
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
    etcd_count,
    etcd_metrics,
    main_guard,
    parser,
    rss_kib,
    runs_of,
)
from discoverd.plugins.etcd.keys import KeyScheme

_WRITES = (
    "etcd_mvcc_put_total",
    "etcd_mvcc_delete_total",
    "etcd_mvcc_txn_total",
    "etcd_debugging_mvcc_put_total",
    "etcd_debugging_mvcc_delete_total",
    "etcd_debugging_mvcc_txn_total",
)
_METHOD_RE = re.compile(r'grpc_method="([^"]+)"')


def deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


def main() -> int:
    p = parser(__doc__, runs=1, quick_runs=1)
    p.add_argument("--containers", type=int, default=None, help="containers (500; quick 100)")
    p.add_argument("--services", type=int, default=10, help="services they are spread over (10)")
    p.add_argument("--threads", type=int, default=8, help="threads starting containers (8)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds before the idle window")
    p.add_argument("--idle", type=float, default=None, help="idle window, seconds (60; quick 20)")
    args = p.parse_args()
    if args.containers is None:
        args.containers = 100 if args.quick else 500
    if args.idle is None:
        args.idle = 20.0 if args.quick else 60.0
    params = {"containers": args.containers, "services": args.services, "idle_s": args.idle}
    report = Report("register", params)
    with Stack(keep=args.keep, log_level=args.log_level) as stack:
        begin = time.monotonic()

        def labels(index: int) -> dict[str, str]:
            service = index % args.services
            return {"SERVICE_NAME": f"reg{service}", "SERVICE_8000_PORT": str(21000 + service)}

        stack.run_containers(args.containers, labels=labels, threads=args.threads)
        print(
            f"{args.containers} containers started in {time.monotonic() - begin:.0f} s", flush=True
        )
        meta = KeyScheme().meta_prefix + "/"
        agent = stack.agent("register")
        deadline = agent.started + 300
        while (count := etcd_count(stack.etcd, meta)) < args.containers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {count} of {args.containers} registered after 300 s")
            time.sleep(0.02)
        took = time.monotonic() - agent.started
        report.add(
            Figure(
                "register: containers registered after agent start",
                "s",
                value=took,
                targets=[Target("value", "<=", 5)],
                note=f"{args.containers} containers, {args.services} services",
            )
        )
        time.sleep(args.settle)
        windows = runs_of(args)
        before = etcd_metrics(stack.etcd)
        time.sleep(args.idle * windows)
        after = etcd_metrics(stack.etcd)
        if not any(key.split("{")[0] in _WRITES for key in after):
            raise RuntimeError("etcd's /metrics exposes none of the write counters")
        moved = deltas(before, after)
        writes = sum(v for k, v in moved.items() if k.split("{")[0] in _WRITES)
        write_detail = {k: v for k, v in moved.items() if k.split("{")[0] in _WRITES}
        calls: dict[str, float] = {}
        for key, value in moved.items():
            if key.startswith("grpc_server_handled_total") and (m := _METHOD_RE.search(key)):
                calls[m.group(1)] = calls.get(m.group(1), 0) + value
        others = sum(v for method, v in calls.items() if method != "LeaseKeepAlive")
        report.add(
            Figure(
                "register idle: registry writes",
                "writes",
                value=writes,
                targets=[Target("value", "==", 0)],
                note=f"over {args.idle * windows:g} s: {write_detail or 'none'}",
            )
        )
        report.add(
            Figure(
                "register idle: gRPC calls other than LeaseKeepAlive",
                "calls",
                value=others,
                targets=[Target("value", "==", 0)],
                note=f"by method: {calls or 'none'}",
            )
        )
        rss, hwm = rss_kib(agent.pid)
        report.add(
            Figure(
                "register: agent RSS",
                "MB",
                value=rss / 1024,
                note=f"VmHWM (peak) {hwm / 1024:.0f} MB",
            )
        )
        report.params["idle_counter_deltas"] = moved
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
