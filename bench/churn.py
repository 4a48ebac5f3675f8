"""4. Churn under load, and 5. proxy reloads during pure membership churn.

    .venv/bin/python -m bench.churn [--duration 60] [--interval 2] [--json OUT]

`wrk` drives the service's frontend, once with keep-alive and once with `Connection: close`,
while every `--interval` seconds a new backend container is started and the oldest one stopped
and removed (`--backends` are up at any time, one more for a moment). Reports wrk's requests,
non-2xx/3xx responses and socket errors (connect, read, write, timeout) for HAProxy, and for nginx
when its plugin is installed (`--runs` repeats each wrk run; the figures are sums). For HAProxy it
also counts the reloads in the same window, from the master CLI (`show proc` on
<state>/haproxy/master.sock), and, for every proxy, how the changes were applied (`reloaded`,
`runtime`, ... from discoverd's log).
Targets with HAProxy: 0 non-2xx, 0 socket errors, 0 reloads. `--backend graceful` (default) runs
backends that finish their requests on TERM; `--backend abrupt` the plain whoami, which dies at
once and cuts a response in flight mid-body (no proxy can replay half a response).
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import (
    Agent,
    Figure,
    Report,
    Stack,
    Target,
    add_backend_argument,
    graceful_command,
    haproxy_reloads,
    main_guard,
    parser,
    plugin_available,
    runs_of,
    wait_answer,
    whoami_labels,
)
from tests.support.services import free_port, require_binary

_APPLY_RE = re.compile(r"discover: (\S+) (\S+) \(\d+ services, \d+ instances\)")


def parse_wrk(text: str) -> dict[str, float]:
    """The figures of wrk's summary: requests, rate, non-2xx, socket errors, latency."""
    figures: dict[str, float] = {"non_2xx": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0}
    if match := re.search(r"(\d+) requests in ([\d.]+)(\w+)", text):
        figures["requests"] = int(match.group(1))
    if match := re.search(r"Requests/sec:\s+([\d.]+)", text):
        figures["requests_per_s"] = float(match.group(1))
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text):
        figures["non_2xx"] = int(match.group(1))
    pattern = r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
    if match := re.search(pattern, text):
        for index, name in enumerate(("connect", "read", "write", "timeout"), 1):
            figures[name] = int(match.group(index))
    if match := re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE):
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
        figures["latency_p99_ms"] = float(match.group(1)) * scale
    return figures


def applies(agent: Agent, since: int) -> dict[str, int]:
    counts: dict[str, int] = collections.Counter()
    for _, line in agent.lines[since:]:
        if match := _APPLY_RE.search(line):
            counts[match.group(2)] += 1
    return dict(counts)


def churn_run(
    stack: Stack,
    agent: Agent,
    proxy: str,
    variant: str,
    frontend: int,
    labels: dict[str, str],
    backends: collections.deque[Any],
    args: Any,
) -> dict[str, Any]:
    cmd = [
        require_binary("wrk"),
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{args.duration:g}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    if variant == "close":
        cmd += ["-H", "Connection: close"]
    cmd.append(f"http://127.0.0.1:{frontend}/")
    state = agent.cmd[agent.cmd.index("--state-dir") + 1]
    reloads_before = haproxy_reloads(Path(state)) if proxy == "haproxy" else None
    log_mark = len(agent.lines)
    wrk = stack.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    started = time.monotonic()
    changes = 0
    tick = started + args.interval
    while tick < started + args.duration - 0.5 and wrk.poll() is None:
        time.sleep(max(0.0, tick - time.monotonic()))
        backends.append(stack.run_containers(1, labels=labels, command=backend_command(args))[0])
        oldest = backends.popleft()
        oldest.stop(timeout=10)
        oldest.remove(force=True)
        changes += 1
        tick += args.interval
    out, _ = wrk.communicate(timeout=args.duration + 60)
    text = out.decode(errors="replace")
    figures: dict[str, Any] = parse_wrk(text)
    if "requests" not in figures:
        raise RuntimeError(f"could not read wrk's summary:\n{text}")
    figures["backend_changes"] = changes
    figures["applies"] = applies(agent, log_mark)
    if reloads_before is not None:
        time.sleep(1)  # let the last change land before reading the counter
        after = haproxy_reloads(Path(state))
        figures["reloads"] = None if after is None else after - reloads_before
    return figures


def backend_command(args: Any) -> list[str] | None:
    return graceful_command(args.backend)


def run_proxy(stack: Stack, proxy: str, args: Any, report: Report, results: dict[str, Any]) -> None:
    frontend = free_port()
    labels = whoami_labels(frontend, "http")
    sets = list(args.nginx_set) if proxy == "nginx" else []
    agent = stack.agent(proxy=proxy, sets=sets, name=f"agent-{proxy}")
    backends = collections.deque(
        stack.run_containers(args.backends, labels=labels, command=backend_command(args))
    )
    for container in backends:
        wait_answer(frontend, container.id[:12], 90)
    for variant in ("keepalive", "close"):
        runs: list[dict[str, Any]] = []
        for n in range(args.runs):
            print(
                f"{proxy}, {variant}, run {n + 1}/{args.runs}: wrk for {args.duration:g} s, "
                f"a backend replaced every {args.interval:g} s",
                flush=True,
            )
            runs.append(churn_run(stack, agent, proxy, variant, frontend, labels, backends, args))
        results[f"{proxy}/{variant}"] = runs
        got = {
            key: sum(r[key] for r in runs)
            for key in (
                "requests",
                "non_2xx",
                "connect",
                "read",
                "write",
                "timeout",
                "backend_changes",
            )
        }
        errors = got["connect"] + got["read"] + got["write"] + got["timeout"]
        zero = [Target("value", "==", 0)] if proxy == "haproxy" else []
        rate = sum(r.get("requests_per_s", 0) for r in runs) / len(runs)
        detail = (
            f"{len(runs)} run(s) of {args.duration:g} s, {rate:.0f} requests/s, "
            f"{got['backend_changes']} backend changes; connect {got['connect']:.0f}, read "
            f"{got['read']:.0f}, write {got['write']:.0f}, timeout {got['timeout']:.0f}; "
            f"applies {[r['applies'] for r in runs]}"
        )
        report.add(
            Figure(
                f"churn {proxy} {variant}: requests", "requests", value=got["requests"], note=detail
            )
        )
        report.add(
            Figure(
                f"churn {proxy} {variant}: non-2xx", "responses", value=got["non_2xx"], targets=zero
            )
        )
        report.add(
            Figure(f"churn {proxy} {variant}: socket errors", "errors", value=errors, targets=zero)
        )
        reloads = [r["reloads"] for r in runs if r.get("reloads") is not None]
        if reloads:
            report.add(
                Figure(
                    f"reloads during churn ({proxy} {variant})",
                    "reloads",
                    value=sum(reloads),
                    targets=[Target("value", "==", 0)],
                    note=f"{got['backend_changes']} membership changes",
                )
            )
    stack.stop_agent(agent)
    for container in backends:
        container.remove(force=True)


def main() -> int:
    p = parser(__doc__, runs=1, quick_runs=1)
    p.add_argument("--duration", type=float, default=None, help="seconds per wrk run (60)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between changes (2)")
    p.add_argument("--backends", type=int, default=3, help="backends up at any time (3)")
    p.add_argument("--connections", type=int, default=20, help="wrk connections (20)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    p.add_argument("--proxies", default="haproxy,nginx", help="proxies to try (haproxy,nginx)")
    add_backend_argument(p)
    p.add_argument(
        "--nginx-set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="--set options for the nginx run (default: nginx.bind=127.0.0.1)",
    )
    args = p.parse_args()
    args.runs = runs_of(args)
    if args.duration is None:
        args.duration = 15.0 if args.quick else 60.0
    if args.nginx_set is None:
        args.nginx_set = ["nginx.bind=127.0.0.1"]
    params = {
        k: getattr(args, k)
        for k in (
            "duration",
            "interval",
            "backends",
            "connections",
            "threads",
            "proxies",
            "backend",
        )
    }
    report = Report("churn", params)
    results: dict[str, Any] = {}
    with Stack(keep=args.keep, log_level=args.log_level) as stack:
        for proxy in args.proxies.split(","):
            if not plugin_available("proxies", proxy):
                report.note(f"{proxy}: plugin not available")
                continue
            try:
                run_proxy(stack, proxy, args, report, results)
            except (RuntimeError, TimeoutError) as exc:
                if proxy == "haproxy":
                    raise
                report.note(f"{proxy}: the run failed: {exc}")
    report.params["raw"] = results
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
