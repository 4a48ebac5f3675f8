"""Why a service or a container is, or is not, receiving traffic: ``discoverd explain``, and
what the next apply would change: ``discoverd plan``.

Both read the live registry, and (for a container) the local source, as the roles would, and
ask the running proxy what it does, without changing anything. The stories are plain data
(``as_dict`` for ``--json``) with a text form for people.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from discoverd.core.assignment import Assignment
from discoverd.core.checks import CheckSpec, run_check, spec_for
from discoverd.core.interfaces import CheckTarget, Proxy, Source
from discoverd.core.metadata import ContainerSpec, ExposurePolicy, PortStory, port_stories
from discoverd.core.model import DETECTED_MODE_KEY, Catalog, Problem, Service, ServiceInstance


@dataclass
class InstanceStory:
    """One instance: where it came from, whether the registry and the proxy have it."""

    instance: ServiceInstance
    registered: bool = True
    routed: str = ""  # what the proxy says of its server (UP, DOWN, DRAIN...), or why not
    check: str = ""  # the readiness check made now (local instances only)
    stopping: bool = False

    def as_dict(self) -> dict[str, Any]:
        i = self.instance
        return {
            "id": i.id,
            "service": i.service,
            "endpoint": i.endpoint,
            "host_id": i.host_id,
            "frontend_port": i.frontend_port,
            "mode": i.meta_dict.get("mode", ""),
            "detected_mode": i.meta_dict.get(DETECTED_MODE_KEY, ""),
            "registered": self.registered,
            "routed": self.routed,
            "check": self.check,
            "stopping": self.stopping,
        }


@dataclass
class ServiceStory:
    name: str
    served: bool
    frontend_port: int | None = None
    mode: str = ""
    why_not: list[str] = field(default_factory=list)
    instances: list[InstanceStory] = field(default_factory=list)
    claims: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "service": self.name,
            "served": self.served,
            "frontend_port": self.frontend_port,
            "mode": self.mode,
            "why_not": self.why_not,
            "claimed_ports": self.claims,
            "instances": [i.as_dict() for i in self.instances],
        }


@dataclass
class PortReport:
    private_port: int
    protocol: str
    published: str
    instance: InstanceStory | None = None
    why_not: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "port": f"{self.private_port}/{self.protocol}",
            "published": self.published,
            "instance": self.instance.as_dict() if self.instance else None,
            "why_not": self.why_not,
        }


@dataclass
class ContainerStory:
    id: str
    name: str
    image: str
    eligible: str  # "" when eligible, else why not
    ports: list[PortReport] = field(default_factory=list)
    services: list[ServiceStory] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "container": self.name,
            "id": self.id,
            "image": self.image,
            "eligible": not self.eligible,
            "why_not_eligible": self.eligible,
            "ports": [p.as_dict() for p in self.ports],
            "services": [s.as_dict() for s in self.services],
        }


def _service_problems(name: str, problems: Sequence[Problem]) -> list[str]:
    return [
        p.message if p.subject == f"service {name}" else str(p)
        for p in problems
        if p.service == name or p.subject == f"service {name}" or f"/{name}/" in p.subject
    ]


def explain_service(
    name: str,
    catalog: Catalog,
    assignment: Assignment,
    unservable: Mapping[str, str],
    states: Mapping[str, str] | None,
) -> ServiceStory:
    """The story of service ``name`` from the registry's catalog, the services built from it
    (``assignment``), what the proxy cannot serve and how it sees the servers (``states``)."""
    served = next((s for s in assignment.services if s.name == name), None)
    story = ServiceStory(name=name, served=served is not None and name not in unservable)
    story.claims = sorted(port for port, owner in catalog.claims if owner == name)
    story.why_not = _service_problems(name, assignment.problems)
    if name in unservable:
        story.why_not.append(f"the proxy cannot serve it now: {unservable[name]}")
    if served is not None:
        story.frontend_port, story.mode = served.frontend_port, served.mode
    kept = {i.id for i in served.instances} if served is not None else set()
    for instance in sorted(i for i in catalog.instances if i.service == name):
        entry = InstanceStory(instance)
        if not story.served:
            entry.routed = "not routed: the service is not served"
        elif instance.id not in kept:
            entry.routed = "not routed: refused (see the service's problems)"
        elif states is None:
            entry.routed = "routed (the proxy does not report server states)"
        else:
            state = states.get(instance.id)
            entry.routed = f"routed: {state}" if state else "not in the running proxy yet"
        story.instances.append(entry)
    if not story.instances and not story.why_not:
        story.why_not.append("the registry holds no instance of it")
    return story


def explain_container(
    spec: ContainerSpec,
    ineligible: str,
    *,
    host_ip: str,
    host_id: str,
    policy: ExposurePolicy,
    source: Source,
    stopping: frozenset[str],
    check: CheckSpec | None,
    catalog: Catalog,
    assignment: Assignment,
    unservable: Mapping[str, str],
    proxy: Proxy | None,
) -> ContainerStory:
    """The story of one local container: what each of its published ports became, and, for
    each instance, whether it answers a check now, is registered, and is routed."""
    story = ContainerStory(spec.id, spec.name, spec.image, ineligible)
    registered = {i.id for i in catalog.instances}
    names: list[str] = []
    for port in port_stories(spec, host_ip=host_ip, host_id=host_id, policy=policy):
        story.ports.append(_port_report(port, ineligible, stopping, registered, source, check))
        if port.instance is not None and port.instance.service not in names:
            names.append(port.instance.service)
    for name in names:
        states = proxy.server_states(name) if proxy is not None else None
        service = explain_service(name, catalog, assignment, unservable, states)
        story.services.append(service)
        for report in story.ports:
            if report.instance is not None and report.instance.instance.service == name:
                mine = next(
                    (i for i in service.instances if i.instance.id == report.instance.instance.id),
                    None,
                )
                if mine is not None:
                    report.instance.routed = mine.routed
                elif report.instance.registered:
                    report.instance.routed = "registered, but not in this host's view"
    return story


def _port_report(
    port: PortStory,
    ineligible: str,
    stopping: frozenset[str],
    registered: set[str],
    source: Source,
    check: CheckSpec | None,
) -> PortReport:
    binding = port.binding
    report = PortReport(
        binding.private_port,
        binding.protocol,
        f"{binding.host_ip or '0.0.0.0'}:{binding.host_port}",
    )
    if port.instance is None:
        report.why_not = port.reason
        return report
    instance = port.instance
    entry = InstanceStory(instance, registered=instance.id in registered)
    entry.stopping = instance.id in stopping
    if ineligible:
        report.why_not = f"the container is {ineligible}"
    elif entry.stopping:
        report.why_not = "draining: the container was told to stop (or exited)"
    if check is not None and not ineligible:
        spec = spec_for(instance, check)
        target = source.check_target(instance)
        forwarded = target is None
        target = target or CheckTarget(instance.address, instance.port)
        try:
            reason = run_check(spec, target, forwarded=forwarded)
        except OSError as exc:
            reason = f"cannot check: {exc.strerror or exc}"
        where = "in its network namespace" if target.netns else "at its published port"
        kind = spec.kind if spec.kind != "none" else "no check"
        entry.check = f"{kind} check {where}: " + ("answers" if reason is None else reason)
        if reason is not None and not report.why_not:
            report.why_not = f"not ready: {reason} (registered once it answers)"
    if not entry.registered and not report.why_not:
        report.why_not = "not registered yet (is the register role running on this host?)"
    report.instance = entry
    return report


# -- plan --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What the next apply would change, against what the discover role last applied."""

    action: str  # what the proxy would do: unchanged, runtime, reload, start, apply
    frontends_added: list[str] = field(default_factory=list)
    frontends_removed: list[str] = field(default_factory=list)
    servers_added: list[str] = field(default_factory=list)
    servers_removed: list[str] = field(default_factory=list)  # drained by proxies that drain
    servers_moved: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    known: bool = True  # whether the last applied set was found

    @property
    def changes(self) -> bool:
        return self.action not in ("unchanged",) or any(
            (
                self.frontends_added,
                self.frontends_removed,
                self.servers_added,
                self.servers_removed,
                self.servers_moved,
            )
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "changes": self.changes,
            "action": self.action,
            "frontends_added": self.frontends_added,
            "frontends_removed": self.frontends_removed,
            "servers_added": self.servers_added,
            "servers_removed": self.servers_removed,
            "servers_moved": self.servers_moved,
            "left_out": self.left_out,
            "last_applied_known": self.known,
        }


def plan(
    services: Sequence[Service],
    served: Mapping[str, Sequence[ServiceInstance]] | None,
    action: str,
    left_out: Mapping[str, str],
) -> Plan:
    """The difference between what was served last (``served``, by service) and
    ``services``, and what the proxy says it would do (``action``)."""
    result = Plan(action=action, left_out=dict(left_out), known=served is not None)
    before = dict(served or {})
    after = {s.name: s for s in services}
    result.frontends_added = sorted(set(after) - set(before))
    result.frontends_removed = sorted(set(before) - set(after))
    for name in sorted(set(after) | set(before)):
        old = {i.id: i for i in before.get(name, ())}
        new = {i.id: i for i in after[name].instances} if name in after else {}
        result.servers_added += [f"{name}/{i}" for i in sorted(set(new) - set(old))]
        result.servers_removed += [f"{name}/{i}" for i in sorted(set(old) - set(new))]
        result.servers_moved += [
            f"{name}/{i} {old[i].endpoint} -> {new[i].endpoint}"
            for i in sorted(set(old) & set(new))
            if old[i].endpoint != new[i].endpoint
        ]
    return result


# -- text ----------------------------------------------------------------------------------------


def service_text(story: ServiceStory) -> str:
    head = (
        f"service {story.name}: served on frontend port {story.frontend_port} ({story.mode})"
        if story.served
        else f"service {story.name}: NOT served"
    )
    lines = [head]
    if story.claims:
        lines.append(f"  claims frontend port(s) {', '.join(map(str, story.claims))} fleet-wide")
    lines += [f"  why: {reason}" for reason in story.why_not]
    for entry in story.instances:
        i = entry.instance
        lines.append(f"  instance {i.id} at {i.endpoint} (host {i.host_id or '?'}): {entry.routed}")
    return "\n".join(lines)


def container_text(story: ContainerStory) -> str:
    lines = [f"container {story.name or story.id[:12]} ({story.id[:12]}), image {story.image}"]
    if story.eligible:
        lines.append(f"  not eligible: {story.eligible}")
    if not story.ports:
        lines.append("  publishes no port: nothing to register (docker run -p ...)")
    for port in story.ports:
        head = f"  port {port.private_port}/{port.protocol} published on {port.published}"
        if port.instance is None:
            lines.append(f"{head}: no instance: {port.why_not}")
            continue
        entry = port.instance
        lines.append(f"{head}: instance {entry.instance.id} of service {entry.instance.service}")
        if entry.check:
            lines.append(f"    {entry.check}")
        lines.append(f"    registered: {'yes' if entry.registered else 'no'}")
        if entry.routed:
            lines.append(f"    proxy: {entry.routed}")
        if port.why_not:
            lines.append(f"    why not routed: {port.why_not}")
    for service in story.services:
        lines.append(service_text(service).replace("\n", "\n  ").join(("  ", "")))
    return "\n".join(lines)


def plan_text(result: Plan) -> str:
    if not result.changes:
        return "no changes: the proxy serves what the registry holds"
    lines = [f"the proxy would {_ACTIONS.get(result.action, result.action)}"]
    if not result.known:
        lines.append("  (no record of what was applied last: every service counts as new)")
    for title, items in (
        ("frontends added", result.frontends_added),
        ("frontends removed", result.frontends_removed),
        ("servers added", result.servers_added),
        ("servers removed (drained)", result.servers_removed),
        ("servers moved", result.servers_moved),
    ):
        if items:
            lines.append(f"  {title}:")
            lines += [f"    {item}" for item in items]
    for name, reason in sorted(result.left_out.items()):
        lines.append(f"  left out: {name}: {reason}")
    return "\n".join(lines)


_ACTIONS = {
    "runtime": "change servers in place (no reload)",
    "reload": "reload",
    "start": "start (no proxy runs)",
    "apply": "apply a new configuration",
    "unchanged": "keep its configuration (the services differ from the last record)",
}


def as_json(document: Any) -> str:
    return json.dumps(document, indent=2)
