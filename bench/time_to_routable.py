"""1. Time to routable: from `docker run` returning to the first request answered by the new
container through the proxy (etcd + HAProxy, both roles in one discoverd process).

    .venv/bin/python -m bench.time_to_routable [--runs 10] [--json OUT]

Starts its own etcd, Docker daemon (own bridge) and discoverd, keeps one whoami running so the
service exists, then starts `--runs` more, one at a time, and for each polls the frontend (a new
connection per request) until the new container answers. Reports min, median, p99 and max.
Targets: median <= 60 ms, p99 <= 300 ms.

Each run's container is stopped once it has answered, and the next run waits until it is out of
rotation: every run meets a service of two backends, so the poller, which must reach the new
one through round robin, needs one or two requests in every run. With ``--grow`` the containers
stay (the figures before issue 10's last session): run n meets n + 1 backends, and the poller's
share grows with n.

With ``--new-service`` each run's container is the first of a service of its own (label
``SERVICE_NAME``, a port of its own; with ``--mode auto`` no other label): the proxy takes a
reload to serve it (a new frontend), where the runs above take runtime commands (a new server).
Its container is stopped after it answered, and the next run begins once the proxy has
closed that service's port (the removal's reload) and HAProxy's ``reload_interval`` (0.5 s)
has passed since, so that no run's reload is put off by the one before.

With ``--timeline`` discoverd runs at debug level and each run prints where its time went:
every debug line that carries a moment (``t=``, on the machine's monotonic clock, which this
script shares) as milliseconds after the ``docker run`` call, with the stages of the register
and discover passes (each with its CPU time). Debug logging costs a little time itself.
"""

from __future__ import annotations

import re
import socket
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
    add_mode_argument,
    ask,
    main_guard,
    parser,
    runs_of,
    wait_answer,
    wait_detected,
    whoami_backend,
)
from tests.support.services import free_port

_MOMENT = re.compile(r"\(t=([0-9.]+)\)")
_LOGGER = re.compile(r"^\S+ \S+ DEBUG \S+ ")


def timeline(lines: list[tuple[float, str]], began: float, returned: float, routable: float) -> str:
    """The debug lines of one run that carry a moment, as ms after the ``docker run`` call."""
    rows = [f"    {0:7.1f}  docker run called"]
    events: list[tuple[float, str]] = [((returned - began) * 1000, "docker run returned")]
    for _, text in lines:
        found = _MOMENT.search(text)
        if found is None:
            continue
        at = (float(found.group(1)) / 1000 - began) * 1000
        events.append((at, _LOGGER.sub("", text).replace(found.group(0), "").strip()))
    events.append(((routable - began) * 1000, "first answer through the proxy"))
    rows += [f"    {at:7.1f}  {what}" for at, what in sorted(events, key=lambda e: e[0])]
    return "\n".join(rows)


def wait_out(port: int, host: str, timeout: float, streak: int = 20) -> None:
    """Poll until ``streak`` answers in a row on ``port`` come from another container than
    ``host`` (a short container id): it is out of rotation."""
    deadline = time.monotonic() + timeout
    others = 0
    while others < streak:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{host} still answers on port {port} after {timeout:g}s")
        answer = ask(port, timeout=1.0)
        others = others + 1 if answer not in (None, host) else 0


def wait_closed(port: int, timeout: float) -> None:
    """Poll until nothing accepts connections on ``port`` (the proxy dropped its frontend)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        except ConnectionRefusedError:
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} still accepts connections after {timeout:g}s")
        time.sleep(0.01)


def measure(
    stack: Stack,
    runs: int,
    mode: str,
    report: Report,
    *,
    show_timeline: bool = False,
    grow: bool = False,
    new_service: bool = False,
) -> Figure:
    frontend = free_port()
    labels, private = whoami_backend(frontend, mode)
    agent = stack.agent(log_level="debug" if show_timeline else None)
    base = stack.run_containers(1, labels=labels, private_port=private)[0]
    wait_answer(frontend, base.id[:12], 90)
    if mode == "auto":
        wait_detected(agent, [base])
    print(f"first container routable {time.monotonic() - agent.started:.1f} s after start")
    samples: list[float] = []
    for n in range(runs):
        if new_service:
            frontend = free_port()
            labels, private = whoami_backend(frontend, mode)
            labels = {**labels, "SERVICE_NAME": f"fresh{n + 1}"}
        mark = len(agent.lines)
        began = time.monotonic()
        container = stack.run_containers(1, labels=labels, private_port=private)[0]
        start = time.monotonic()
        routable = wait_answer(frontend, container.id[:12], 30)
        samples.append((routable - start) * 1000)
        print(f"run {n + 1}: {samples[-1]:.0f} ms", flush=True)
        if show_timeline:
            time.sleep(0.2)  # the lines logged after the answer (the pass's summary)
            print(timeline(agent.lines[mark:], began, start, routable), flush=True)
        if new_service:
            container.stop(timeout=5)
            wait_closed(frontend, 30)
            time.sleep(0.6)  # HAProxy's reload_interval (0.5 s) after the removal's reload
        elif not grow:
            container.stop(timeout=5)
            wait_out(frontend, container.id[:12], 30)
    return report.add(
        Figure(
            "time to routable",
            "ms",
            samples=samples,
            targets=[Target("median", "<=", 60), Target("p99", "<=", 300)],
            note=f"{mode} mode, "
            + (
                "a new service in every run (a reload)"
                if new_service
                else "the service grows by a backend per run"
                if grow
                else "a service of two backends in every run"
            ),
        )
    )


def main() -> int:
    p = parser(__doc__, runs=10, quick_runs=5)
    add_mode_argument(p, default="auto")
    p.add_argument(
        "--timeline",
        action="store_true",
        help="run discoverd at debug level and print where each run's time went",
    )
    p.add_argument(
        "--grow",
        action="store_true",
        help="keep every run's container (the service grows by a backend per run)",
    )
    p.add_argument(
        "--new-service",
        action="store_true",
        help="each run's container is the first of a new service (label SERVICE_NAME): the "
        "proxy reloads to serve it",
    )
    args = p.parse_args()
    if args.grow and args.new_service:
        p.error("--grow and --new-service exclude each other")
    runs = runs_of(args)
    report = Report(
        "time_to_routable",
        {"runs": runs, "mode": args.mode, "grow": args.grow, "new_service": args.new_service},
    )
    with Stack(keep=args.keep, log_level=args.log_level) as stack:
        measure(
            stack,
            runs,
            args.mode,
            report,
            show_timeline=args.timeline,
            grow=args.grow,
            new_service=args.new_service,
        )
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
