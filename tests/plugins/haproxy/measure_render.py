"""Timings of the discover role's pass with the HAProxy proxy at scale (prints, asserts nothing).

    .venv/bin/python -m tests.plugins.haproxy.measure_render [--services 1000] [--instances 10]

Builds ``--services`` x ``--instances`` in memory, then times what the discover role does for a
pass (render; and with ``--apply``, which starts a real HAProxy on 127.0.0.1 with a frontend per
service: apply_delay, validate and apply): the first pass, a pass over an unchanged registry (new
but equal ``Service`` objects, as the core builds them), and a pass after one instance moved.
Not a test (pytest does not collect it): a tool to compare figures before and after a change.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from discoverd import Service, ServiceInstance
from discoverd.plugins.haproxy import make_proxy
from discoverd.plugins.haproxy.proxy import HAProxy
from tests.plugins.haproxy.conftest import haproxy_context


def build(services: int, instances: int, port_base: int, moved: int = -1) -> list[Service]:
    """``services`` services; instance 0 of service ``moved`` is on another port."""
    out = []
    for s in range(services):
        name = f"svc{s:04d}"
        members = tuple(
            ServiceInstance(
                service=name,
                id=f"host{i % 5}-{name}-{i:02d}",
                address=f"127.0.{2 + s // 250}.{1 + s % 250}",
                port=9000 + i + (500 if s == moved and i == 0 else 0),
                frontend_port=port_base + s,
                host_id=f"host{i % 5}",
            )
            for i in range(instances)
        )
        out.append(Service(name, port_base + s, mode="http", instances=members))
    return out


def free_range(count: int) -> int:
    """The first port of ``count`` consecutive ports free on 127.0.0.1 (from 21000 up)."""
    base = 21000
    while base + count < 65000:
        for port in range(base, base + count):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    base = port + 1
                    break
        else:
            return base
    raise SystemExit("no free port range")


def timed(what: str, action: Callable[[], object], repeat: int = 1) -> object:
    """Run ``action``; print its wall-clock and CPU time in ms (medians over ``repeat``)."""
    wall, cpu = [], []
    result: object = None
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = action()
        cpu.append((time.process_time() - started_cpu) * 1000)
        wall.append((time.perf_counter() - started) * 1000)
    shown = f"{statistics.median(wall):8.1f} ms wall {statistics.median(cpu):8.1f} ms CPU"
    if repeat > 1:
        shown += f"  (medians of {repeat}; wall min {min(wall):.1f}, max {max(wall):.1f})"
    print(f"  {what:<44}{shown}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--instances", type=int, default=10)
    p.add_argument("--apply", action="store_true", help="also start HAProxy and time applies")
    p.add_argument("--binary", default="haproxy")
    args = p.parse_args()
    base = free_range(args.services) if args.apply else 21000
    state = Path(tempfile.mkdtemp(prefix="dm-"))
    proxy = make_proxy(
        haproxy_context(
            state, binary=args.binary, bind="127.0.0.1", stats_port=0, check_interval="30s"
        )
    )
    assert isinstance(proxy, HAProxy)
    first = build(args.services, args.instances, base)
    again = build(args.services, args.instances, base)
    # As the core builds them: unchanged services keep their objects, the changed one is new.
    middle = args.services // 2
    moved = list(first)
    moved[middle] = build(args.services, args.instances, base, moved=middle)[middle]
    back = list(first)
    back[middle] = build(args.services, args.instances, base)[middle]
    # The worst case: every Service object new (equal values but one).
    moved_new = build(args.services, args.instances, base, moved=middle)
    print(f"{args.services} services x {args.instances} instances")
    try:
        config = timed("render, first", lambda: proxy.render(first))
        print(f"  ({len(str(config).splitlines())} lines, {len(str(config)) // 1024} KiB)")
        timed("render, same objects", lambda: proxy.render(first), repeat=5)
        timed("render, equal new objects", lambda: proxy.render(again), repeat=5)
        timed("render, one instance moved", lambda: proxy.render(moved))
        timed("render, moved back", lambda: proxy.render(back))
        timed("render, all new objects, one moved", lambda: proxy.render(moved_new))
        timed("render, moved back", lambda: proxy.render(back))
        if not args.apply:
            return

        def full_pass(services: list[Service]) -> object:
            text = proxy.render(services)
            proxy.apply_delay(text, services)
            proxy.validate(text)
            return proxy.apply(text, services)

        print("with HAProxy running (each step of a pass, then whole passes):")
        timed("first pass (render, haproxy -c, start)", functools.partial(full_pass, first))
        for label, services in (("one instance moved", moved), ("moved back", back)) * 2:
            text = str(timed(f"{label}: render", functools.partial(proxy.render, services)))
            timed(f"{label}: apply_delay", functools.partial(proxy.apply_delay, text, services))
            timed(f"{label}: validate", functools.partial(proxy.validate, text))
            result = timed(f"{label}: apply", functools.partial(proxy.apply, text, services))
            print(f"    -> {result}")
        for label, services in (("one instance moved", moved), ("moved back", back)) * 3:
            result = timed(f"whole pass, {label}", functools.partial(full_pass, services))
            print(f"    -> {result}")
    finally:
        proxy.stop_process()
        proxy.close()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
