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
`--mode auto` runs the backends without a single label (their mode detected by discoverd;
`http` and `tcp` label them `SERVICE_MODE`); `scripts/bench.sh` runs `--mode auto --backend
abrupt` too. The failed share of requests (non-2xx and socket errors) has the target < 0.01 %.
Each proxy runs once per `--paths` entry: `direct` (the agent reaches its own backends at their
container address, `local_direct = true`, the default with HAProxy) and `published` (`local_direct =
false`: through the published port and docker-proxy), with wrk's latency p50 / p90 / p99. First,
with no proxy and no churn, wrk straight at one backend's container address and at its published
port (`--bare-duration` seconds each; 0 skips it).
"""

from __future__ import annotations

import collections
import re
import statistics
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
    UserRequests,
    add_backend_argument,
    add_mode_argument,
    graceful_command,
    haproxy_reloads,
    main_guard,
    parser,
    plugin_available,
    runs_of,
    wait_answer,
    wait_detected,
    whoami_backend,
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
    for quantile in (50, 90, 99):  # wrk --latency's distribution
        pattern = rf"^\s+{quantile}%\s+([\d.]+)(us|ms|s)\s*$"
        if match := re.search(pattern, text, re.MULTILINE):
            scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
            figures[f"latency_p{quantile}_ms"] = float(match.group(1)) * scale
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
    state = agent.state_dir
    reloads_before = haproxy_reloads(state) if proxy == "haproxy" else None
    log_mark = len(agent.lines)
    overflows = -sum(listen_overflows(c) for c in backends)
    wrk = stack.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    started = time.monotonic()
    changes = 0
    tick = started + args.interval
    with UserRequests(frontend, interval=args.user_interval / 1000) as user:
        while tick < started + args.duration - 0.5 and wrk.poll() is None:
            time.sleep(max(0.0, tick - time.monotonic()))
            port = whoami_backend(frontend, args.mode)[1]
            command = backend_command(args, port)
            backends.extend(
                stack.run_containers(1, labels=labels, command=command, private_port=port)
            )
            oldest = backends.popleft()
            overflows += listen_overflows(oldest)
            oldest.stop(timeout=10)
            oldest.remove(force=True)
            changes += 1
            tick += args.interval
        out, _ = wrk.communicate(timeout=args.duration + 60)
    text = out.decode(errors="replace")
    figures: dict[str, Any] = parse_wrk(text)
    if "requests" not in figures:
        raise RuntimeError(f"could not read wrk's summary:\n{text}")
    figures["user"] = user.summary()
    figures["backend_changes"] = changes
    figures["applies"] = applies(agent, log_mark)
    figures["listen_overflows"] = overflows + sum(listen_overflows(c) for c in backends)
    if reloads_before is not None:
        time.sleep(1)  # let the last change land before reading the counter
        after = haproxy_reloads(state)
        figures["reloads"] = None if after is None else after - reloads_before
    return figures


def listen_overflows(container: Any) -> int:
    """Connections the backend's listen queue dropped so far (``ListenOverflows`` of its
    network namespace; busybox httpd listens with a backlog of 9, and a dropped SYN costs its
    client a 1 s retransmission); 0 when it cannot be read."""
    try:
        container.reload()
        pid = container.attrs["State"]["Pid"]
        lines = Path(f"/proc/{pid}/net/netstat").read_text().splitlines()
    except Exception:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split(), values.split(), strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def backend_command(args: Any, port: int = 8000) -> list[str] | None:
    return graceful_command(args.backend, port)


def run_proxy(
    stack: Stack,
    proxy: str,
    args: Any,
    report: Report,
    results: dict[str, Any],
    path: str = "direct",
) -> None:
    """The churn runs through ``proxy``; ``path``: ``direct`` (the agent reaches its own
    backends at their container address, ``local_direct = true``, the default with HAProxy) or
    ``published`` (``local_direct = false``: through the published port and docker-proxy)."""
    frontend = free_port()
    labels, port = whoami_backend(frontend, args.mode)
    sets = list(args.nginx_set) if proxy == "nginx" else list(args.haproxy_set)
    sets.append(f"local_direct={'true' if path == 'direct' else 'false'}")
    agent = stack.agent(proxy=proxy, sets=sets, name=f"agent-{proxy}-{path}")
    name = f"{proxy} {path}{variant_tag(args)}"
    command = backend_command(args, port)
    backends = collections.deque(
        stack.run_containers(args.backends, labels=labels, command=command, private_port=port)
    )
    for container in backends:
        wait_answer(frontend, container.id[:12], 90)
    if args.mode == "auto":
        wait_detected(agent, list(backends))
    for variant in ("keepalive", "close"):
        runs: list[dict[str, Any]] = []
        for n in range(args.runs):
            print(
                f"{proxy} ({path}), {variant}, run {n + 1}/{args.runs}: wrk for "
                f"{args.duration:g} s, "
                f"a backend replaced every {args.interval:g} s",
                flush=True,
            )
            runs.append(churn_run(stack, agent, proxy, variant, frontend, labels, backends, args))
        results[f"{proxy}/{path}/{variant}"] = runs
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
            f"applies {[r['applies'] for r in runs]}; backends' listen queue overflows "
            f"{sum(r.get('listen_overflows', 0) for r in runs)}"
        )
        report.add(
            Figure(
                f"churn {name} {variant}: requests", "requests", value=got["requests"], note=detail
            )
        )
        report.add(
            Figure(
                f"churn {name} {variant}: non-2xx", "responses", value=got["non_2xx"], targets=zero
            )
        )
        report.add(
            Figure(f"churn {name} {variant}: socket errors", "errors", value=errors, targets=zero)
        )
        failed = got["non_2xx"] + errors
        share = 100 * failed / got["requests"] if got["requests"] else 0.0
        report.add(
            Figure(
                f"churn {name} {variant}: failed requests",
                "%",
                value=round(share, 4),
                targets=[Target("value", "<", 0.01)] if proxy == "haproxy" else [],
                note=f"{failed:.0f} of {got['requests']:.0f}",
            )
        )
        add_latency(report, f"churn {name} {variant}", runs)
        reloads = [r["reloads"] for r in runs if r.get("reloads") is not None]
        if reloads:
            report.add(
                Figure(
                    f"reloads during churn ({name} {variant})",
                    "reloads",
                    value=sum(reloads),
                    targets=[Target("value", "==", 0)],
                    note=f"{got['backend_changes']} membership changes",
                )
            )
    stack.stop_agent(agent)
    for container in backends:
        container.remove(force=True)


def variant_tag(args: Any) -> str:
    """How figure names tell the runs apart: `` (auto mode, abrupt backends)``; nothing for
    the defaults (labelled http, graceful)."""
    if (args.mode, args.backend) == ("http", "graceful"):
        return ""
    return f" ({args.mode} mode, {args.backend} backends)"


def add_latency(report: Report, name: str, runs: list[dict[str, Any]]) -> None:
    """wrk's latency p50, p90 and p99 (corrected for coordinated omission), then those of a
    user's requests beside it (:class:`UserRequests`): the median over the runs, each run in
    the note."""
    users = [r["user"] for r in runs if "p50_ms" in r.get("user", {})]
    for quantile in (50, 90, 99):
        values = [r[f"latency_p{quantile}_ms"] for r in runs if f"latency_p{quantile}_ms" in r]
        add_median(report, f"{name}: latency p{quantile} (wrk)", values)
    if not users:
        return
    longest = max(u["max_ms"] for u in users)
    summary = (
        f"{sum(u['requests'] for u in users):.0f} requests on fresh connections beside wrk's, "
        f"{sum(u['failed'] for u in users):.0f} failed, {sum(u['slow'] for u in users):.0f} "
        f"took 0.5 s or more, the longest {longest:.0f} ms"
    )
    for quantile in (50, 90, 99):
        note = summary if quantile == 99 else ""
        values = [u[f"p{quantile}_ms"] for u in users]
        add_median(report, f"{name}: a user's request p{quantile}", values, note)


def add_median(report: Report, name: str, values: list[float], note: str = "") -> None:
    """The median of ``values`` (one per run) in ms; the runs in the note when there are more."""
    if not values:
        return
    if len(values) > 1:
        runs = "runs: " + ", ".join(f"{v:.1f}" for v in values) + " ms"
        note = f"{note}; {runs}" if note else runs
    report.add(Figure(name, "ms", statistics.median(values), note=note))


def bare_backend(stack: Stack, args: Any, report: Report, results: dict[str, Any]) -> None:
    """No proxy, no churn: wrk straight at one backend, at its container address and at its
    published port (docker-proxy), with keep-alive and with ``Connection: close``."""
    container = stack.run_containers(1, labels={}, command=backend_command(args))[0]
    container.reload()
    address = container.attrs["NetworkSettings"]["IPAddress"]
    published = container.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostPort"]
    urls = {
        "container address": f"http://{address}:8000/",
        "published port": f"http://127.0.0.1:{published}/",
    }
    wait_answer(int(published), container.id[:12], 30)
    for variant in ("keepalive", "close"):
        for where, url in urls.items():
            runs = []
            for n in range(args.runs):
                print(f"backend alone at its {where}, {variant}, run {n + 1}/{args.runs}: "
                      f"wrk for {args.bare_duration:g} s", flush=True)  # fmt: skip
                cmd = [
                    require_binary("wrk"), f"-t{args.threads}", f"-c{args.connections}",
                    f"-d{args.bare_duration:g}s", "--latency", "--timeout", "5s",
                ]  # fmt: skip
                if variant == "close":
                    cmd += ["-H", "Connection: close"]
                before = listen_overflows(container)
                wrk = stack.popen([*cmd, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                host, port = url.split("/")[2].rsplit(":", 1)
                with UserRequests(int(port), host, interval=args.user_interval / 1000) as user:
                    out, _ = wrk.communicate(timeout=args.bare_duration + 60)
                figures = parse_wrk(out.decode(errors="replace"))
                if "requests" not in figures:
                    raise RuntimeError(f"could not read wrk's summary:\n{out.decode()}")
                figures["user"] = user.summary()
                figures["listen_overflows"] = listen_overflows(container) - before
                runs.append(figures)
            results[f"bare/{where}/{variant}"] = runs
            errors = sum(r[k] for r in runs for k in ("connect", "read", "write", "timeout"))
            rate = sum(r.get("requests_per_s", 0) for r in runs) / len(runs)
            report.add(
                Figure(
                    f"backend alone at its {where} {variant}: requests",
                    "requests",
                    value=sum(r["requests"] for r in runs),
                    note=f"{rate:.0f} requests/s; non-2xx "
                    f"{sum(r['non_2xx'] for r in runs):.0f}, socket errors {errors:.0f}; listen "
                    f"queue overflows {sum(r['listen_overflows'] for r in runs)}",
                )
            )
            add_latency(report, f"backend alone at its {where} {variant}", runs)
    container.remove(force=True)


def main() -> int:
    p = parser(__doc__, runs=1, quick_runs=1)
    p.add_argument("--duration", type=float, default=None, help="seconds per wrk run (60)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between changes (2)")
    p.add_argument("--backends", type=int, default=3, help="backends up at any time (3)")
    p.add_argument("--connections", type=int, default=20, help="wrk connections (20)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    p.add_argument("--proxies", default="haproxy,nginx", help="proxies to try (haproxy,nginx)")
    p.add_argument(
        "--paths",
        default="direct,published",
        help="how the agent reaches its own backends, each path a run of its own "
        "(direct,published): direct = at their container address (local_direct = true, "
        "the default with HAProxy), published = through the published port and docker-proxy "
        "(local_direct = false)",
    )
    p.add_argument(
        "--bare-duration",
        type=float,
        default=None,
        help="seconds per wrk run straight at one backend, no proxy, at its container address "
        "and at its published port (15; 5 with --quick; 0: skip)",
    )
    p.add_argument(
        "--user-interval",
        type=float,
        default=10.0,
        help="milliseconds between two requests of the user timed beside wrk (10): each on a "
        "fresh connection, sent when due whatever the ones before it",
    )
    add_backend_argument(p)
    add_mode_argument(p)
    p.add_argument(
        "--nginx-set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="--set options for the nginx run (default: nginx.bind=127.0.0.1)",
    )
    p.add_argument(
        "--haproxy-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--set options for the HAProxy run (e.g. haproxy.timeout_connect=100ms)",
    )
    args = p.parse_args()
    args.runs = runs_of(args)
    if args.duration is None:
        args.duration = 15.0 if args.quick else 60.0
    if args.bare_duration is None:
        args.bare_duration = 5.0 if args.quick else 15.0
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
            "paths",
            "bare_duration",
            "backend",
            "mode",
            "haproxy_set",
        )
    }
    report = Report("churn", params)
    results: dict[str, Any] = {}
    with Stack(keep=args.keep, log_level=args.log_level) as stack:
        if args.bare_duration > 0:
            bare_backend(stack, args, report, results)
        for proxy in args.proxies.split(","):
            if not plugin_available("proxies", proxy):
                report.note(f"{proxy}: plugin not available")
                continue
            for path in args.paths.split(","):
                try:
                    run_proxy(stack, proxy, args, report, results, path)
                except (RuntimeError, TimeoutError) as exc:
                    if proxy == "haproxy":
                        raise
                    report.note(f"{proxy} ({path}): the run failed: {exc}")
    report.params["raw"] = results
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
