"""2. Time to unroutable, and failed requests while backends join and leave (etcd + HAProxy).

    .venv/bin/python -m bench.time_to_unroutable [--runs 10] [--json OUT]

One whoami stays up the whole time; a client loop sends requests through the proxy one after
another, each on a fresh connection, and records which container answered (or that it failed).
Each run starts a second container, waits until it answers, then calls `docker stop` on it (in a
thread; the clock starts when the call is made) and keeps probing for `--settle` seconds after
the container is gone. The time to unroutable is the last answer from the stopped container minus
the moment `docker stop` was called (0 if it never answered again). Failed requests are counted
from `docker run` to the stop (joins) and from the stop to the end of the run (removals).
Targets: p99 <= 250 ms; 0 failed requests.

`--mode auto` runs the backends without a single label (the mode is detected), and
`--backend abrupt` backends that exit at once on TERM; `scripts/bench.sh` runs both ways.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import (
    Figure,
    Prober,
    Report,
    Stack,
    Target,
    add_backend_argument,
    add_mode_argument,
    graceful_command,
    main_guard,
    parser,
    runs_of,
    wait_answer,
    wait_detected,
    whoami_backend,
)
from tests.support.services import free_port


def measure(
    stack: Stack, runs: int, mode: str, settle: float, backend: str, report: Report
) -> None:
    frontend = free_port()
    labels, port = whoami_backend(frontend, mode)
    agent = stack.agent()
    command = graceful_command(backend, port)
    base = stack.run_containers(1, labels=labels, command=command, private_port=port)[0]
    wait_answer(frontend, base.id[:12], 90)
    if mode == "auto":
        wait_detected(agent, [base])
    unroutable: list[float] = []
    stop_calls: list[float] = []
    join_failures = removal_failures = requests = 0
    per_removal: list[float] = []
    with Prober(frontend) as prober:
        for n in range(runs):
            begin = len(prober.results)
            started = time.monotonic()
            [container] = stack.run_containers(1, labels=labels, command=command, private_port=port)
            host = container.id[:12]
            deadline = time.monotonic() + 30
            while prober.first_from(host, started) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run {n + 1}: {host} never answered through the proxy")
                time.sleep(0.01)
            time.sleep(0.5)  # a steady state with both containers answering
            stopper = threading.Thread(target=container.stop, kwargs={"timeout": 10})
            stopped_at = time.monotonic()
            stopper.start()
            stopper.join()
            stop_calls.append((time.monotonic() - stopped_at) * 1000)
            time.sleep(settle)
            last = prober.last_from(host)
            gone = 0.0 if last is None or last < stopped_at else (last - stopped_at) * 1000
            unroutable.append(gone)
            results = prober.results[begin:]
            joins = sum(1 for t, who in results if who is None and t < stopped_at)
            removals = sum(1 for t, who in results if who is None and t >= stopped_at)
            join_failures += joins
            removal_failures += removals
            per_removal.append(removals)
            requests += len(results)
            print(
                f"run {n + 1}: unroutable after {gone:.0f} ms (docker stop took "
                f"{stop_calls[-1]:.0f} ms); failed requests: {joins} joining, {removals} "
                f"removing, of {len(results)}",
                flush=True,
            )
            if joins or removals:
                report.note(f"run {n + 1} failures: {prober.why(results[0][0])}")
            container.remove(force=True)
    tag = "" if (mode, backend) == ("http", "graceful") else f" ({mode} mode, {backend} backends)"
    report.add(
        Figure(
            f"time to unroutable{tag}",
            "ms",
            samples=unroutable,
            targets=[Target("p99", "<=", 250)],
            note=f"{mode} mode, {backend} backends, fresh connection per request",
        )
    )
    report.add(Figure(f"docker stop call duration{tag}", "ms", samples=stop_calls))
    report.add(
        Figure(
            f"failed requests during joins{tag}",
            "requests",
            value=join_failures,
            targets=[Target("value", "==", 0)],
            note=f"of {requests} in all runs",
        )
    )
    report.add(
        Figure(
            f"failed requests during removals{tag}",
            "requests",
            value=removal_failures,
            targets=[Target("value", "==", 0)],
            note=f"of {requests} in all runs",
        )
    )
    report.add(
        Figure(
            f"failed requests per removal{tag}",
            "requests",
            samples=per_removal,
            targets=[Target("max", "==", 0)],
            note=f"{mode} mode, {backend} backends",
        )
    )


def main() -> int:
    p = parser(__doc__, runs=10, quick_runs=3)
    add_mode_argument(p)
    p.add_argument("--settle", type=float, default=2.0, help="seconds to keep probing after a stop")
    add_backend_argument(p)
    args = p.parse_args()
    runs = runs_of(args)
    report = Report(
        "time_to_unroutable", {"runs": runs, "mode": args.mode, "backend": args.backend}
    )
    with Stack(keep=args.keep, log_level=args.log_level) as stack:
        measure(stack, runs, args.mode, args.settle, args.backend, report)
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
