"""What a frontend port another process holds costs the other services, before and after
``Proxy.unservable`` (issue 9). Run from the repository, as root or not:

    .venv/bin/python -m tests.plugins.measure_taken_port [--proxy haproxy|nginx] [--attempts 5]

Two healthy services are under a request loop (a new connection per request). Then a third
service whose frontend port a plain Python listener holds is applied ``--attempts`` times,
about a second apart, as the core retries it:

- **before**: the candidate with the third service is applied as it is (what discoverd did
  until now): every apply is a reload that fails;
- **after**: the core's pass, with ``unservable`` asked first (the third is left out).

It prints the failed requests of the healthy services in each phase; it asserts nothing (the
tests in tests/plugins/*/test_unservable.py do).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from discoverd import PluginError, Proxy, Service
from tests.plugins.traffic import RequestLoop, apply_servable, squatter
from tests.support.services import free_port, require_binary


def build(kind: str, state_dir: Path) -> tuple[Proxy, Callable[[str], Any]]:
    """The proxy, and how to start a backend answering ``I am <name>``."""
    if kind == "haproxy":
        from discoverd.plugins.haproxy import make_proxy
        from tests.plugins.haproxy.conftest import NameServer, haproxy_context

        context = haproxy_context(
            state_dir, binary=require_binary("haproxy"), bind="127.0.0.1", stats_port=free_port()
        )
        return make_proxy(context), NameServer
    from discoverd.plugins.nginx import make_proxy as make_nginx
    from tests.plugins.nginx.conftest import NameServer as NginxNameServer
    from tests.plugins.nginx.conftest import nginx_context

    nginx_ctx = nginx_context(
        state_dir,
        binary=require_binary("nginx"),
        bind="127.0.0.1",
        status_port=free_port(),
        reload_interval=0.0,
    )
    return make_nginx(nginx_ctx), NginxNameServer


def service(name: str, port: int, server: Any) -> Service:
    return Service(name, port, mode="http", instances=(server.instance(name, port),))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", choices=("haproxy", "nginx"), default="haproxy")
    parser.add_argument("--attempts", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="dm-"))
    root.chmod(0o755)
    proxy, start_server = build(args.proxy, root)
    servers = [start_server(name) for name in ("a", "b", "c")]
    try:
        healthy = [
            service("alpha", free_port(), servers[0]),
            service("beta", free_port(), servers[1]),
        ]
        apply_servable(proxy, healthy)
        with squatter() as taken:
            wanted = [*healthy, service("gamma", taken, servers[2])]
            for phase in ("before", "after"):
                with RequestLoop([s.frontend_port for s in healthy]) as loop:
                    loop.wait_requests(100)
                    started = time.monotonic()
                    refused = 0
                    for _ in range(args.attempts):
                        if phase == "before":
                            try:
                                proxy.apply(proxy.render(wanted), wanted)
                            except PluginError:
                                refused += 1
                        else:
                            left_out, _ = apply_servable(proxy, wanted)
                            assert list(left_out) == ["gamma"], left_out
                        time.sleep(1.0)
                    seconds = time.monotonic() - started
                print(
                    f"{args.proxy} {phase}: {args.attempts} attempts in {seconds:.1f}s "
                    f"({refused} refused applies); healthy services: {loop.report()}"
                )
    finally:
        stop = getattr(proxy, "stop_process", None)
        if stop is not None:
            stop()
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
