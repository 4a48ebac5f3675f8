"""Is the agent alive, is it ready, and what is wrong: the answers of ``/healthz`` (pure).

- **live**: every thread of every role runs (a supervisor restarts the agent otherwise).
- **ready**: the register role reached the registry within its TTL and made its first pass;
  the discover role read the registry and its proxy serves a configuration (the last apply
  succeeded, or the proxy still serves its last good one). Otherwise **unready**: a load
  balancer or an orchestrator should not count on this host's proxy.
- **degraded**: ready, but some problems are only one service's or one container's (a refused
  label, a frontend that cannot bind, a port conflict): the rest is served.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from discoverd.core.discover import DiscoverRole
from discoverd.core.model import Problem
from discoverd.core.register import RegisterRole
from discoverd.core.role import Role

Status = Literal["ready", "degraded", "unready"]


@dataclass
class Health:
    """What ``/healthz/ready`` answers (``code`` is the HTTP status)."""

    live: bool
    status: Status
    reasons: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def code(self) -> int:
        return 503 if self.status == "unready" else 200

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "live": self.live,
            "reasons": self.reasons,
            "problems": [
                {
                    "kind": problem_kind(p),
                    "subject": p.subject,
                    "message": p.message,
                    "service": p.service,
                }
                for p in self.problems
            ],
            "roles": self.roles,
        }


def problem_kind(problem: Problem) -> str:
    """``service``, ``container`` or ``registry``: whose problem it is."""
    if problem.service or problem.subject.startswith("service "):
        return "service"
    if problem.subject.startswith("container "):
        return "container"
    return "registry"


def _age(role: Role) -> float | None:
    age = role.registry_contact.age()
    return None if age is None else round(age, 3)


def health(roles: Iterable[Role]) -> Health:
    """The agent's health from its roles' state (see the module docstring)."""
    active = list(roles)
    result = Health(live=bool(active) and all(r.alive() for r in active), status="ready")
    if not result.live:
        result.reasons.append("a loop of the agent is not running")
    for role in active:
        info: dict[str, Any] = {
            "alive": role.alive(),
            "registry_contact_age": _age(role),
            "registry_error": role.registry_contact.error,
            "watching": role.watch_live.is_set(),
        }
        if isinstance(role, RegisterRole):
            limit = 3 * role.registry.keepalive_interval()
            age = role.registry_contact.age()
            info.update(
                registered=len(role.registered),
                waiting=len(role.waiting),
                first_pass_done=role.synced.is_set(),
                source_error=role.source_contact.error,
            )
            if not role.synced.is_set():
                result.reasons.append("register: first pass not done yet")
            if age is None or (age > limit and role.registry_contact.error):
                reason = role.registry_contact.error or "never reached"
                result.reasons.append(f"register: registry not reached for {limit:g}s: {reason}")
        if isinstance(role, DiscoverRole):
            info.update(
                services=len(role.services or ()),
                instances=sum(len(s.instances) for s in role.services or ()),
                left_out=dict(role.excluded),
                held=len(role.holds.held()),
            )
            if role.applied is None:
                result.reasons.append("discover: the proxy serves no configuration yet")
            if role.registry_contact.error and not role.watch_live.is_set():
                result.reasons.append(
                    f"discover: registry not reachable: {role.registry_contact.error}"
                )
        result.problems.extend(role.problems.current)
        result.roles[role.name] = info
    if result.reasons or not result.live:
        result.status = "unready"
    elif result.problems:
        result.status = "degraded"
    return result
