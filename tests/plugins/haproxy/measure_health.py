"""Backends that misbehave behind docker-proxy, through the whole stack (prints, asserts nothing).

    .venv/bin/python -m tests.plugins.haproxy.measure_health --scenario flap --mode tcp
    .venv/bin/python -m tests.plugins.haproxy.measure_health --scenario dead --mode http --runs 3
    ... --proxy nginx    ... --set nginx.reload_interval=0.25

A private etcd and Docker daemon, discoverd (both roles, as a subprocess, ``bench.stack``), two
steady whoami backends of one service and a third that misbehaves; a client loop sends requests
through the proxy one after another, each on a fresh connection.

- ``flap``: the third one's application listens for 300 ms, then not for 300 ms, and so on; the
  client runs from the moment its container starts, for ``--seconds``. Prints the failed share,
  how many answers the flapping one gave, and when it was registered and removed.
- ``dead``: the third one's application is killed inside its container, which runs on (so
  docker-proxy keeps accepting on its published port), ``--runs`` times (started again between
  runs, once it is routed again). Prints the requests that failed after the kill, the last
  one's moment, and when the register role removed it.

Not a test (pytest does not collect it): the tool behind the figures of docs/design.md ("Ready
before routed"), to compare before and after a change. The same scenarios with assertions are
``tests/faults/test_flapping.py``.
"""

from __future__ import annotations

import argparse
import collections
import time

from bench.stack import Agent, Stack, wait_answer, whoami_labels

from tests.support.probe import Prober
from tests.support.services import WHOAMI_IMAGE, free_port

#: Listens for 300 ms, then not for 300 ms, and so on (PID 1 is the loop: the container runs on).
FLAPPING = [
    "/bin/sh",
    "-c",
    'mkdir -p /www; echo "I am $(hostname)" > /www/index.html; trap "exit 0" TERM; '
    "while :; do httpd -f -p 8000 -h /www & p=$!; sleep 0.3; kill $p; wait $p; sleep 0.3; done",
]
#: An application (httpd) that is not the container's main process: it can be killed alone.
KILLABLE = [
    "/bin/sh",
    "-c",
    'mkdir -p /www; echo "I am $(hostname)" > /www/index.html; '
    "httpd -f -p 8000 -h /www & echo $! > /tmp/app.pid; "
    'trap "exit 0" TERM; while :; do sleep 1 & wait $!; done',
]


def registry_changes(agent: Agent, since: float) -> list[str]:
    """The register role's additions (+) and removals (-) since ``since``, in seconds."""
    changes = []
    for moment, line in list(agent.lines):
        if moment >= since and ("register: added" in line or "register: removed" in line):
            changes.append(f"{'+' if 'added' in line else '-'}{moment - since:.2f}s")
    return changes


def flap(stack: Stack, agent: Agent, frontend: int, labels: dict[str, str], seconds: float) -> None:
    with Prober(frontend, name="clients") as prober:
        time.sleep(1.0)
        begin = time.monotonic()
        odd = stack.client.containers.run(
            WHOAMI_IMAGE,
            FLAPPING,
            detach=True,
            labels=labels,
            ports={"8000/tcp": ("127.0.0.1", None)},
        )
        time.sleep(seconds)
    answers = collections.Counter(who for moment, who in prober.results if moment >= begin)
    total = sum(answers.values())
    failed = answers[None]
    from_odd = answers[odd.id[:12]]
    failures = sorted(
        moment - begin for moment, who in prober.results if moment >= begin and not who
    )
    print(f"requests {total}, failed {failed} ({100 * failed / max(total, 1):.2f} %)")
    print(f"answered by the flapping backend: {from_odd} ({100 * from_odd / max(total, 1):.2f} %)")
    print(f"failures: {prober.why(begin)}")
    if failures:
        print(f"failures between +{failures[0]:.2f}s and +{failures[-1]:.2f}s")
    print(f"registry changes for it in {seconds:g}s: {registry_changes(agent, begin)}")


def dead(
    stack: Stack, agent: Agent, frontend: int, labels: dict[str, str], seconds: float, runs: int
) -> None:
    odd = stack.client.containers.run(
        WHOAMI_IMAGE, KILLABLE, detach=True, labels=labels, ports={"8000/tcp": ("127.0.0.1", None)}
    )
    host = odd.id[:12]
    wait_answer(frontend, host, 90)
    for run in range(runs):
        with Prober(frontend, name="clients") as prober:
            time.sleep(1.0)
            killed = time.monotonic()
            odd.exec_run(["sh", "-c", "kill $(cat /tmp/app.pid)"])
            time.sleep(seconds)
        failures = [moment for moment, who in prober.results if moment >= killed and not who]
        last = f"+{(max(failures) - killed) * 1000:.0f} ms" if failures else "-"
        print(
            f"run {run}: {prober.total(killed)} requests after the kill, {len(failures)} failed, "
            f"the last at {last}; registry: {registry_changes(agent, killed)}; {prober.why(killed)}"
        )
        odd.exec_run(["sh", "-c", "httpd -f -p 8000 -h /www & echo $! > /tmp/app.pid"], detach=True)
        wait_answer(frontend, host, 120)  # routed again after its hold
        time.sleep(1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenario", choices=("flap", "dead"), default="flap")
    p.add_argument("--mode", choices=("tcp", "http"), default="tcp")
    p.add_argument("--proxy", choices=("haproxy", "nginx"), default="haproxy")
    p.add_argument("--seconds", type=float, default=None, help="flap: 20; dead: 3 per run")
    p.add_argument("--runs", type=int, default=3, help="dead: how many kills (3)")
    p.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE for discoverd")
    args = p.parse_args()
    with Stack() as stack:
        frontend = free_port()
        labels = whoami_labels(frontend, args.mode, name="web")
        sets = list(args.set)
        if args.proxy == "nginx":
            sets += ["nginx.bind=127.0.0.1", f"nginx.status_port={free_port()}"]
        agent = stack.agent(proxy=args.proxy, sets=sets)
        for container in stack.run_containers(2, labels=labels):
            wait_answer(frontend, container.id[:12], 90)
        print(f"{args.scenario}, {args.mode} mode, {args.proxy} ({' '.join(sets) or 'defaults'})")
        if args.scenario == "flap":
            flap(stack, agent, frontend, labels, args.seconds or 20.0)
        else:
            dead(stack, agent, frontend, labels, args.seconds or 3.0, args.runs)


if __name__ == "__main__":
    main()
