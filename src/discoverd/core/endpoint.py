"""The agent's HTTP endpoint: ``/healthz/live``, ``/healthz/ready`` and Prometheus ``/metrics``.

Imported only when the listener is on (the ``listen`` option), so the command line and an
agent without it never load the HTTP server or ``prometheus-client``. The metrics are read from
the roles at scrape time (:mod:`discoverd.core.telemetry`); nothing is recorded twice.

Families (prefix ``discoverd_``): ``up``, ``registry_contact_age_seconds{role}``,
``registry_errors{role}`` (1 while the last call failed), ``watch_events_total{role}``,
``resyncs_total{role}``, ``registrations_total``, ``deregistrations_total``,
``reregistrations_total``, ``instances{service}``, ``problems{kind}``,
``passes_total{outcome}`` (runtime, reloaded, started, unchanged, refused, deferred, failed),
``apply_duration_seconds`` and ``reload_duration_seconds`` (histograms),
``proxy_reloads_total{proxy,result}``, ``readiness_checks_total{result}``,
``held_instances``, ``services_left_out``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from discoverd.core.discover import DiscoverRole
from discoverd.core.register import RegisterRole
from discoverd.core.role import Role
from discoverd.core.status import health, problem_kind
from discoverd.core.telemetry import Histogram

log = logging.getLogger("discoverd.endpoint")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RolesCollector(Collector):
    """Every metric family, built from the roles' state when Prometheus scrapes."""

    def __init__(self, roles: Callable[[], Iterable[Role]]) -> None:
        self.roles = roles

    def collect(self) -> Iterator[Metric]:
        roles = list(self.roles())
        yield GaugeMetricFamily("discoverd_up", "1 while the agent runs.", value=1)
        age = GaugeMetricFamily(
            "discoverd_registry_contact_age_seconds",
            "Seconds since the role last reached the registry.",
            labels=["role"],
        )
        errors = GaugeMetricFamily(
            "discoverd_registry_errors",
            "1 while the role's last registry call failed.",
            labels=["role"],
        )
        events = CounterMetricFamily(
            "discoverd_watch_events", "Notifications of the role's watch.", labels=["role"]
        )
        resyncs = CounterMetricFamily(
            "discoverd_resyncs", "Periodic full passes made.", labels=["role"]
        )
        problems = GaugeMetricFamily(
            "discoverd_problems", "Current problems, by whose they are.", labels=["kind"]
        )
        kinds: Counter[str] = Counter()
        for role in roles:
            contact = role.registry_contact.age()
            if contact is not None:
                age.add_metric([role.name], contact)
            errors.add_metric([role.name], 1.0 if role.registry_contact.error else 0.0)
            events.add_metric([role.name], role.counters["watch_events"])
            resyncs.add_metric([role.name], role.counters["resyncs"])
            kinds.update(problem_kind(p) for p in role.problems.current)
        for kind in ("service", "container", "registry"):
            problems.add_metric([kind], kinds[kind])
        yield from (age, errors, events, resyncs, problems)
        for role in roles:
            if isinstance(role, RegisterRole):
                yield from _register_families(role)
            if isinstance(role, DiscoverRole):
                yield from _discover_families(role)


def _register_families(role: RegisterRole) -> Iterator[Metric]:
    for name, key, text in (
        ("registrations", "registered", "Instances this host registered."),
        ("deregistrations", "deregistered", "Instances this host deregistered."),
        ("reregistrations", "reregistrations", "Times this host's entries were lost."),
    ):
        yield CounterMetricFamily(f"discoverd_{name}", text, value=role.counters[key])
    checks = CounterMetricFamily(
        "discoverd_readiness_checks", "Readiness checks made, by result.", labels=["result"]
    )
    results: dict[str, int] = {}
    if role.readiness is not None:
        results = role.readiness.results()
    for result in ("ok", "failed"):
        checks.add_metric([result], results.get(result, 0))
    yield checks


def _discover_families(role: DiscoverRole) -> Iterator[Metric]:
    instances = GaugeMetricFamily(
        "discoverd_instances", "Instances the proxy serves, by service.", labels=["service"]
    )
    for service in role.services or ():
        instances.add_metric([service.name], len(service.instances))
    yield instances
    passes = CounterMetricFamily(
        "discoverd_passes", "Discover passes, by what they did.", labels=["outcome"]
    )
    for labels, count in sorted(role.counters.by_label("passes").items()):
        passes.add_metric([dict(labels).get("outcome", "")], count)
    yield passes
    reloads = CounterMetricFamily(
        "discoverd_proxy_reloads",
        "Starts and reloads of the proxy process.",
        labels=["proxy", "result"],
    )
    for labels, count in sorted(role.counters.by_label("proxy_reloads").items()):
        found = dict(labels)
        reloads.add_metric([found.get("proxy", ""), found.get("result", "")], count)
    yield reloads
    yield _histogram(
        "discoverd_apply_duration_seconds", "Duration of each apply.", role.apply_seconds
    )
    yield _histogram(
        "discoverd_reload_duration_seconds",
        "Duration of each apply that started or reloaded the proxy.",
        role.reload_seconds,
    )
    yield GaugeMetricFamily(
        "discoverd_held_instances",
        "Instances the registry lost at once, served while they answer.",
        value=len(role.holds.held()),
    )
    yield GaugeMetricFamily(
        "discoverd_services_left_out",
        "Services left out of the proxy (cannot be served, refused by validation).",
        value=len(role.excluded),
    )


def _histogram(name: str, text: str, histogram: Histogram) -> Metric:
    buckets, total, _ = histogram.snapshot()
    family = HistogramMetricFamily(name, text)
    family.add_metric(
        [], [("+Inf" if b == float("inf") else repr(b), c) for b, c in buckets], total
    )
    return family


class Endpoint:
    """The listener: a small threaded HTTP server on ``address:port``."""

    def __init__(self, roles: Callable[[], Iterable[Role]], address: str, port: int) -> None:
        self.roles = roles
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RolesCollector(roles))
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "discoverd"

            def do_GET(self) -> None:
                endpoint.answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s %s", self.address_string(), format % args)

        family = ThreadingHTTPServer.address_family
        server_class = type(
            "Server",
            (ThreadingHTTPServer,),
            {"address_family": _family(address, family), "daemon_threads": True},
        )
        self.server = server_class((address, port), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="discoverd-endpoint", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/metrics":
            body = generate_latest(self.registry)
            self._send(request, 200, CONTENT_TYPE, body)
        elif path == "/healthz/live":
            state = health(self.roles())
            roles = {name: info["alive"] for name, info in state.roles.items()}
            self._json(request, 200 if state.live else 503, {"live": state.live, "roles": roles})
        elif path in ("/healthz/ready", "/healthz"):
            state = health(self.roles())
            self._json(request, state.code, state.as_dict())
        else:
            pages = ["/healthz/live", "/healthz/ready", "/metrics"]
            self._json(request, 404, {"error": f"no such page: {path}", "pages": pages})

    @staticmethod
    def _json(request: BaseHTTPRequestHandler, code: int, document: Any) -> None:
        body = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
        Endpoint._send(request, code, "application/json", body)

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, code: int, kind: str, body: bytes) -> None:
        request.send_response(code)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


def _family(address: str, default: Any) -> Any:
    return socket.AF_INET6 if ":" in address else default
