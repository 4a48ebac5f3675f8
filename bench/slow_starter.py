"""3. Slow starter: failed requests while a backend whose application listens only `--delay`
seconds (8 s) after its container starts joins a service that has one healthy instance.

    .venv/bin/python -m bench.slow_starter [--runs 3] [--json OUT]

A client loop sends requests through the proxy one after another (a fresh connection each) from
`docker run` until the slow container has answered and `--settle` seconds more. docker-proxy
accepts connections on the published port before the application listens, so a bare connect is
no proof of life: the request fails unless discoverd waits for the application.
Target: 0 failed requests.
"""

from __future__ import annotations

import sys
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
    graceful_command,
    main_guard,
    parser,
    runs_of,
    slow_whoami_command,
    wait_answer,
    whoami_labels,
)
from tests.support.services import free_port


def measure(
    stack: Stack, runs: int, mode: str, delay: float, settle: float, report: Report
) -> None:
    frontend = free_port()
    labels = whoami_labels(frontend, mode)
    stack.agent()
    base = stack.run_containers(1, labels=labels, command=graceful_command("graceful"))[0]
    wait_answer(frontend, base.id[:12], 90)
    failures: list[float] = []
    first_answers: list[float] = []
    requests = 0
    with Prober(frontend) as prober:
        for n in range(runs):
            begin = len(prober.results)
            started = time.monotonic()
            slow = stack.run_containers(1, labels=labels, command=slow_whoami_command(delay))[0]
            host = slow.id[:12]
            deadline = started + delay + 60
            while (first := prober.first_from(host, started)) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run {n + 1}: {host} never answered through the proxy")
                time.sleep(0.05)
            time.sleep(settle)
            results = prober.results[begin:]
            failed = sum(1 for _, who in results if who is None)
            if failed:
                report.note(f"run {n + 1} failures: {prober.why(results[0][0])}")
            failures.append(failed)
            first_answers.append(first - started)
            requests += len(results)
            print(
                f"run {n + 1}: {failed} failed of {len(results)} requests; the slow container "
                f"first answered {first - started:.2f} s after docker run",
                flush=True,
            )
            # Out of the measured window: a graceful stop (drained first), then a pause so
            # the next run starts from the steady state.
            slow.stop(timeout=10)
            slow.remove(force=True)
            time.sleep(1.0)
    report.add(
        Figure(
            "slow starter: failed requests",
            "requests",
            value=sum(failures),
            targets=[Target("value", "==", 0)],
            note=f"{mode} mode, {runs} run(s), {requests} requests, per run {failures}",
        )
    )
    report.add(Figure("slow starter: first answer after docker run", "s", samples=first_answers))


def main() -> int:
    p = parser(__doc__, runs=3, quick_runs=1)
    p.add_argument("--mode", default="http", choices=("http", "tcp"), help="service mode")
    p.add_argument("--delay", type=float, default=8.0, help="seconds before the app listens")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to probe after it answers")
    args = p.parse_args()
    runs = runs_of(args)
    report = Report("slow_starter", {"runs": runs, "mode": args.mode, "delay_s": args.delay})
    with Stack(keep=args.keep, log_level=args.log_level) as stack:
        measure(stack, runs, args.mode, args.delay, args.settle, report)
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
