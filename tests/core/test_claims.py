"""The claim rules every registry that keeps frontend-port claims shares (core/claims.py)."""

from __future__ import annotations

from discoverd import ClaimHolder, ServiceInstance, claim_problems, settle_claims


def subject(service: str) -> str:
    return f"svc {service}"


def test_a_service_is_held_at_its_oldest_holders_port() -> None:
    settled = settle_claims(
        [
            ClaimHolder("web", 8001, created=9, subject="k/web/b"),
            ClaimHolder("web", 8000, created=3, subject="k/web/a"),
        ],
        subject,
    )
    assert settled.ports == {"web": 8000}
    assert settled.claims == ((8000, "web"),)
    [problem] = settled.problems
    assert problem.subject == "k/web/b"
    assert "claims port 8001 for web, which is held at 8000; ignored" in problem.message
    assert problem.service == "web"


def test_younger_holders_naming_the_same_port_are_fine() -> None:
    settled = settle_claims([ClaimHolder("web", 8000, n, f"k/web/{n}") for n in (5, 1, 3)], subject)
    assert settled.claims == ((8000, "web"),)
    assert settled.problems == []


def test_two_services_on_one_port_the_older_claim_keeps_it() -> None:
    settled = settle_claims(
        [
            ClaimHolder("api", 8000, created=7, subject="k/api/x"),
            ClaimHolder("web", 8000, created=2, subject="k/web/y"),
            ClaimHolder("db", 5432, created=9, subject="k/db/z"),
        ],
        subject,
    )
    assert settled.claims == ((5432, "db"), (8000, "web"))
    # The loser still has a port (its holders name it) but no claim, and a problem says why.
    assert settled.ports["api"] == 8000
    [problem] = settled.problems
    assert problem.subject == "svc api"
    assert "which service web claimed first" in problem.message


def test_a_tie_in_age_goes_to_the_first_name() -> None:
    settled = settle_claims(
        [ClaimHolder("b", 8000, 1, "k/b"), ClaimHolder("a", 8000, 1, "k/a")], subject
    )
    assert settled.claims == ((8000, "a"),)


def instance(service: str, port: int) -> ServiceInstance:
    return ServiceInstance(
        id=f"h:{service}:{port}",
        service=service,
        address="10.0.0.1",
        port=port,
        frontend_port=port,
    )


def test_claim_problems_words_blocked_moved_and_pending() -> None:
    problems = claim_problems(
        owned=[instance("web", 8001), instance("api", 9000)],
        held={"web": 8000, "api": 9000},
        blocked={"db": (8000, "web")},
        pending={"cache": "the claim waits for the registry", "api": ""},
    )
    text = [str(p) for p in problems]
    assert len(text) == 3
    assert "frontend port 8000 is claimed fleet-wide by service web" in text[0]
    assert "ask for frontend port 8001, but the fleet serves web on 8000" in text[1]
    assert text[2] == "service cache: the claim waits for the registry"
    assert [p.service for p in problems] == ["db", "web", "cache"]


def test_no_claims_no_problems() -> None:
    assert claim_problems([instance("web", 8000)], {"web": 8000}, {}, {}) == []
