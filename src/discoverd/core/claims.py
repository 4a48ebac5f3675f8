"""Frontend-port claims kept in a registry: the rules every registry that keeps them shares.

A registry that keeps claims (etcd, Consul) stores, per service, one *holder* entry for each
host serving it, each naming the port. What they mean is the same whatever the storage:

- a service is held at the port of its **oldest** holder (its holders all name that port,
  unless someone wrote entries by hand: a younger holder naming another port is ignored);
- two services held at one port (by hand, too): the one whose oldest holder is older keeps it;
  the other's claim is ignored;
- every refusal is a :class:`~discoverd.core.model.Problem` of its service.

:func:`settle_claims` turns the holders read from the registry into claims (what
``Catalog.claims`` carries); :func:`claim_problems` words what a host's own claims mean for it
(what ``Registry.conflicts`` returns). Pure functions, exported for third-party registries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from discoverd.core.model import Problem, ServiceInstance


@dataclass(frozen=True)
class ClaimHolder:
    """One holder entry as read: the service it holds, the port it names, when it was created
    (any value that orders entries by age: a revision, an index), and how to name it in a
    problem (``subject``: the key)."""

    service: str
    port: int
    created: int
    subject: str


@dataclass
class SettledClaims:
    """What the holders say: each service's port (``ports``), the ``(port, service)`` claims
    (sorted), and the problems of contradicting entries."""

    ports: dict[str, int] = field(default_factory=dict)
    claims: tuple[tuple[int, str], ...] = ()
    problems: list[Problem] = field(default_factory=list)


def settle_claims(
    holders: Iterable[ClaimHolder], service_subject: Callable[[str], str]
) -> SettledClaims:
    """Apply the rules of the module to ``holders`` (in any order). ``service_subject(name)``
    names a service's claim in a problem (e.g. its key prefix)."""
    by_service: dict[str, list[ClaimHolder]] = {}
    for holder in sorted(holders, key=lambda h: (h.created, h.subject)):
        by_service.setdefault(holder.service, []).append(holder)
    settled = SettledClaims()
    first_at: dict[int, tuple[int, str]] = {}
    for service in sorted(by_service):
        oldest, *younger = by_service[service]
        settled.ports[service] = oldest.port
        for other in younger:
            if other.port != oldest.port:
                settled.problems.append(
                    Problem(
                        other.subject,
                        f"claims port {other.port} for {service}, which is held at "
                        f"{oldest.port}; ignored",
                        service=service,
                    )
                )
        if oldest.port not in first_at or (oldest.created, service) < first_at[oldest.port]:
            first_at[oldest.port] = (oldest.created, service)
    claims: list[tuple[int, str]] = []
    for service, port in sorted(settled.ports.items()):
        owner = first_at[port][1]
        if owner == service:
            claims.append((port, service))
        else:
            settled.problems.append(
                Problem(
                    service_subject(service),
                    f"claims frontend port {port}, which service {owner} claimed first; "
                    "this claim is ignored",
                    service=service,
                )
            )
    settled.claims = tuple(sorted(claims))
    return settled


def claim_problems(
    owned: Iterable[ServiceInstance],
    held: Mapping[str, int],
    blocked: Mapping[str, tuple[int, str]],
    pending: Mapping[str, str],
) -> list[Problem]:
    """What a host's claims mean for it: a service kept from its port (``blocked``: service ->
    (port, the service holding it)), a service held at another port than this host's instances
    ask for (``held``: service -> the fleet's port; ``owned``: this host's instances), and a
    claim not made yet, with why (``pending``: service -> reason, "" when none)."""
    asked: dict[str, set[int]] = {}
    for instance in owned:
        if instance.frontend_port is not None:
            asked.setdefault(instance.service, set()).add(instance.frontend_port)
    problems: list[Problem] = []
    for service, (port, owner) in sorted(blocked.items()):
        problems.append(
            Problem(
                f"service {service}",
                f"frontend port {port} is claimed fleet-wide by service {owner}; {service} is "
                "registered from this host but not served. Give it another port (label "
                "SERVICE_<port>_PORT)",
                service=service,
            )
        )
    for service, port in sorted(held.items()):
        other = sorted(asked.get(service, set()) - {port})
        if other:
            problems.append(
                Problem(
                    f"service {service}",
                    f"this host's instances ask for frontend port "
                    f"{', '.join(map(str, other))}, but the fleet serves {service} on {port} "
                    f"(the port of the first host that registered it); they are served on "
                    f"{port}",
                    service=service,
                )
            )
    for service, why in sorted(pending.items()):
        if why:
            problems.append(Problem(f"service {service}", why, service=service))
    return problems
