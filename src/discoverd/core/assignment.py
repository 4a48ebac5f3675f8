"""From a registry catalog to the services a proxy serves (pure; shared by every registry)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from discoverd.core.model import (
    DETECTED_MODE_KEY,
    Catalog,
    Mode,
    ModeSetting,
    Problem,
    Service,
    ServiceInstance,
)

#: What a service's mode depends on besides its members: the core option ``default_mode``, and
#: the instances this host's address policy refused (they vote all the same, so that every host
#: gives a service the same mode).
_ModeInputs = tuple[ModeSetting, tuple[ServiceInstance, ...]]


def service_mode(instances: Iterable[ServiceInstance], default_mode: ModeSetting = "auto") -> Mode:
    """The proxy mode of a service made of ``instances`` (pure: the same on every host that
    reads the same registry).

    1. The operator's word first: when an instance's metadata says ``mode`` (label
       ``SERVICE_MODE``), ``http`` if any says ``http``, else ``tcp``.
    2. Otherwise a forced ``default_mode`` (``tcp`` or ``http``).
    3. Otherwise (``auto``) the detection: ``http`` when at least one instance was checked
       (metadata ``detected_mode``, set by its register role) and every instance checked
       answered in HTTP/1; ``tcp`` when one of them did not, or none was checked yet
       (instances of another discoverd, or not checked in their namespace).
    """
    explicit: set[str] = set()
    detected: set[str] = set()
    for instance in instances:
        for key, value in instance.meta:
            if key == "mode":
                explicit.add(value)
            elif key == DETECTED_MODE_KEY:
                detected.add(value)
    if explicit:
        return "http" if "http" in explicit else "tcp"
    if default_mode != "auto":
        return "http" if default_mode == "http" else "tcp"
    return "http" if detected == {"http"} else "tcp"


@dataclass
class Assignment:
    """The result of ``build_services``: the services, what was refused, and port owners."""

    services: tuple[Service, ...]
    problems: list[Problem] = field(default_factory=list)
    owners: dict[int, str] = field(default_factory=dict)


class ServiceCache:
    """Remembers each service built from the same instances, so a pass over a large registry
    rebuilds only the services whose instances changed (the unchanged ones keep their very
    ``Service`` objects, which also makes comparing and rendering them cheap downstream)."""

    def __init__(self) -> None:
        self._entries: dict[
            str, tuple[tuple[ServiceInstance, ...], _ModeInputs, Service | None, list[Problem]]
        ] = {}

    def get(
        self, name: str, members: tuple[ServiceInstance, ...], mode_inputs: _ModeInputs
    ) -> tuple[Service | None, list[Problem]] | None:
        entry = self._entries.get(name)
        if entry is not None and entry[1] == mode_inputs and entry[0] == members:
            return entry[2], entry[3]
        return None

    def put(
        self,
        name: str,
        members: tuple[ServiceInstance, ...],
        mode_inputs: _ModeInputs,
        result: tuple[Service | None, list[Problem]],
    ) -> None:
        self._entries[name] = (members, mode_inputs, result[0], result[1])

    def keep_only(self, names: Iterable[str]) -> None:
        wanted = set(names)
        for name in [n for n in self._entries if n not in wanted]:
            del self._entries[name]


def _build_one(
    name: str, members_in: Iterable[ServiceInstance], mode_inputs: _ModeInputs
) -> tuple[Service | None, list[Problem]]:
    problems: list[Problem] = []
    members = _one_per_id(name, sorted(set(members_in)), problems)
    protocol = members[0].protocol
    if any(m.protocol != protocol for m in members):
        dropped = [m.id for m in members if m.protocol != protocol]
        problems.append(
            Problem(
                f"service {name}",
                f"mixes tcp and udp instances; {protocol} kept, refused: {', '.join(dropped)}",
                service=name,
            )
        )
        members = [m for m in members if m.protocol == protocol]
    ports = Counter(m.frontend_port for m in members if m.frontend_port is not None)
    if not ports:
        problems.append(
            Problem(f"service {name}", "no frontend port is known; skipped", service=name)
        )
        return None, problems
    top = max(ports.values())
    frontend = min(p for p, n in ports.items() if n == top)
    default_mode, refused = mode_inputs
    mode = service_mode((*members, *refused), default_mode)
    service = Service(
        name=name,
        frontend_port=frontend,
        protocol=protocol,
        mode=mode,
        instances=tuple(members),
    )
    return service, problems


def _one_per_id(
    name: str, members: list[ServiceInstance], problems: list[Problem]
) -> list[ServiceInstance]:
    """One instance per id: two entries with one id (two hosts registering the same id in a
    registry keyed by something else, e.g. Consul's per-node services) would make two servers
    of one name, which no proxy accepts. The first in sort order is kept (the same on every
    host), the others refused with a problem naming both."""
    kept: dict[str, ServiceInstance] = {}
    for member in members:  # sorted: deterministic
        first = kept.setdefault(member.id, member)
        if first is not member:
            where = member.host_id or member.endpoint
            there = first.host_id or first.endpoint
            problems.append(
                Problem(
                    f"service {name}",
                    f"instance id {member.id} is registered twice ({there} at "
                    f"{first.endpoint}, {where} at {member.endpoint}); the first is kept",
                    service=name,
                )
            )
    return list(kept.values())


def build_services(
    catalog: Catalog,
    *,
    default_mode: ModeSetting = "auto",
    reserved_ports: Iterable[int] = (),
    previous_owners: Mapping[int, str] | None = None,
    cache: ServiceCache | None = None,
    accept: Callable[[ServiceInstance], Problem | None] | None = None,
) -> Assignment:
    """Group instances into services, pick each service's frontend port, settle conflicts.

    - The frontend port is the one most instances ask for (ties: the lowest).
    - A port claimed fleet-wide in the registry (``Catalog.claims``) goes to the service that
      claims it, on every host; any other service asking for it is refused.
    - Otherwise, two services asking for one port: the service that held it before keeps it
      (so a newcomer can never take traffic away from a running service); between newcomers,
      the name first in sort order wins. The other is refused with a problem naming both.
    - Two entries with one instance id in a service: the first in sort order is kept.
    - ``accept`` (the discover host's address policy) refuses an instance with a problem.
    - A port the proxy reserves for itself (stats page) is refused.
    - Instances of another protocol than the service's first one are refused.
    - The proxy mode: :func:`service_mode` of the service's instances, those ``accept``
      refused included (every host decides the same).
    """
    previous = dict(previous_owners or {})
    reserved = set(reserved_ports)
    problems: list[Problem] = list(catalog.problems)
    grouped: dict[str, list[ServiceInstance]] = {}
    hidden: dict[str, list[ServiceInstance]] = {}
    for instance in catalog.instances:
        refused = accept(instance) if accept is not None else None
        if refused is not None:
            problems.append(refused)
            hidden.setdefault(instance.service, []).append(instance)
            continue
        grouped.setdefault(instance.service, []).append(instance)

    candidates: dict[str, Service] = {}
    for name in sorted(grouped):
        members_in = tuple(grouped[name])
        mode_inputs: _ModeInputs = (default_mode, tuple(sorted(hidden.get(name, ()))))
        result = cache.get(name, members_in, mode_inputs) if cache is not None else None
        if result is None:
            result = _build_one(name, members_in, mode_inputs)
            if cache is not None:
                cache.put(name, members_in, mode_inputs, result)
        service, trouble = result
        problems.extend(trouble)
        if service is not None:
            candidates[name] = service
    if cache is not None:
        cache.keep_only(grouped)

    owners: dict[int, str] = {}
    claims: dict[int, list[str]] = {}
    for service in candidates.values():
        claims.setdefault(service.frontend_port, []).append(service.name)
    accepted: list[Service] = []
    fleet = dict(catalog.claims)
    for port in sorted(claims):
        names = sorted(claims[port])
        if port in fleet and fleet[port] not in names:
            for name in names:
                problems.append(
                    Problem(
                        f"service {name}",
                        f"frontend port {port} is claimed fleet-wide by service {fleet[port]}; "
                        f"{name} is not served. Give it another port (label SERVICE_<port>_PORT)",
                        service=name,
                    )
                )
            continue
        if port in reserved:
            for name in names:
                problems.append(
                    Problem(
                        f"service {name}",
                        f"frontend port {port} is reserved by the proxy itself; skipped",
                        service=name,
                    )
                )
            continue
        if fleet.get(port) in names:
            winner: str | None = fleet[port]
        else:
            winner = previous.get(port) if previous.get(port) in names else names[0]
        assert winner is not None
        owners[port] = winner
        accepted.append(candidates[winner])
        for loser in names:
            if loser != winner:
                problems.append(
                    Problem(
                        f"service {loser}",
                        f"frontend port {port} is "
                        f"{'claimed fleet-wide' if fleet.get(port) == winner else 'already taken'}"
                        f" by service {winner}; "
                        f"{loser} is not served. Give it another port "
                        f"(label SERVICE_<port>_PORT)",
                        service=loser,
                    )
                )
    accepted.sort(key=lambda s: s.name)
    return Assignment(services=tuple(accepted), problems=problems, owners=owners)
