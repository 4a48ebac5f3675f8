"""The comparisons that name the services a Consul change touched (pure functions)."""

from __future__ import annotations

from typing import Any

from discoverd.plugins.consul.changes import (
    changed_names,
    check_changes,
    check_table,
    claimed_services,
    service_tags,
)


def check(node: str, check_id: str, service: str, index: int, status: str = "passing") -> Any:
    return {
        "Node": node,
        "CheckID": check_id,
        "ServiceName": service,
        "ModifyIndex": index,
        "Status": status,
    }


def test_service_list_changes_are_named() -> None:
    old = service_tags({"web": ["a"], "db": [], "gone": None})
    new = service_tags({"web": ["b"], "db": [], "new": []})
    assert changed_names(old, new) == {"web", "gone", "new"}


def test_checks_that_appear_change_or_go_name_their_service_and_index() -> None:
    old = check_table([check("n1", "service:a", "web", 5), check("n1", "service:b", "db", 6)])
    new = check_table(
        [
            check("n1", "service:a", "web", 9, "critical"),  # modified at 9
            check("n2", "service:c", "api", 8),  # appeared at 8
            "not a check",
        ]
    )  # service:b went: counted at the list's index, 10
    changes = check_changes(old, new, 10)
    assert changes.services == {"web", "api", "db"}
    assert changes.indexes == {8, 9, 10}
    assert check_changes(new, new, 10).services == set()


def test_a_nodes_own_check_cannot_be_named() -> None:
    old = check_table([check("n1", "serfHealth", "", 5)])
    new = check_table([check("n1", "serfHealth", "", 7, "critical")])
    assert check_changes(old, new, 7).services is None


def test_claim_keys_name_their_service() -> None:
    head = "discoverd/claims/"
    assert claimed_services(head, {f"{head}web/s1", f"{head}db/s2"}) == {"web", "db"}
    assert claimed_services(head, {f"{head}web"}) is None
    assert claimed_services(head, {"elsewhere/web/s1"}) is None
