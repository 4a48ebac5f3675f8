"""Which services a Consul change touched (pure functions, no network).

Consul's blocking queries say *that* something moved (an index), not *what*. The watch keeps the
last answer of each list it follows and compares it with the next one:

* the catalog's service list (``/v1/catalog/services``: name -> tags) names services that
  appeared, went or changed their tags;
* the check list (``/v1/health/state/any``) names the service of every check that appeared,
  went or was modified (its ``ModifyIndex`` moved), and gives the index of each such change; a
  node's own check (``serfHealth``, no service) touches every service on the node, which this
  list cannot name in full: it means "read everything";
* the claim keys (``<kv_prefix>/claims/<service>/<session>``) name the service in their key.

``None`` anywhere means "cannot tell": the caller then reads everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from discoverd.plugins.consul.encoding import KVEntry, index_value

#: A check as the diff sees it: (node, check id) -> (ModifyIndex, service name, status).
CheckKey = tuple[str, str]


def service_tags(answer: Any) -> dict[str, frozenset[str]]:
    """``/v1/catalog/services`` as name -> tags (bad entries become an empty tag set)."""
    if not isinstance(answer, Mapping):
        return {}
    return {
        str(name): frozenset(str(t) for t in tags) if isinstance(tags, list) else frozenset()
        for name, tags in answer.items()
    }


def changed_names(old: Mapping[str, Any], new: Mapping[str, Any]) -> set[str]:
    """Keys present in one mapping only, or whose values differ."""
    return {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}


def check_table(answer: Any) -> dict[CheckKey, tuple[int, str, str]]:
    """``/v1/health/state/any`` as (node, check id) -> (ModifyIndex, service name, status)."""
    table: dict[CheckKey, tuple[int, str, str]] = {}
    for check in answer if isinstance(answer, list) else []:
        if not isinstance(check, Mapping):
            continue
        key = (str(check.get("Node", "")), str(check.get("CheckID", "")))
        table[key] = (
            index_value(check.get("ModifyIndex")),
            str(check.get("ServiceName") or ""),
            str(check.get("Status", "")),
        )
    return table


@dataclass
class CheckChanges:
    """What moved between two check lists: the services touched (``None``: a node's own
    check moved, so every service on it may have), and the indexes the changes landed at."""

    services: set[str] | None = field(default_factory=set)
    indexes: set[int] = field(default_factory=set)


def check_changes(
    old: Mapping[CheckKey, tuple[int, str, str]],
    new: Mapping[CheckKey, tuple[int, str, str]],
    new_index: int,
) -> CheckChanges:
    """Compare two check tables. A check that went left no index behind: its change is
    counted at ``new_index``, the index of the newer list (the latest it can have been)."""
    changes = CheckChanges()
    for key in old.keys() | new.keys():
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if after is not None:
            changes.indexes.add(after[0])
        else:
            changes.indexes.add(new_index)
        names = {item[1] for item in (before, after) if item is not None}
        if "" in names:  # a node's check: the services on the node are not all in this list
            changes.services = None
        elif changes.services is not None:
            changes.services |= names
    return changes


def claim_table(entries: Iterable[KVEntry]) -> dict[str, tuple[int, str]]:
    """Claim keys as key -> (ModifyIndex, session)."""
    return {e.key: (e.modify_index, e.session) for e in entries}


def claimed_services(head: str, keys: set[str]) -> set[str] | None:
    """The services named by claim keys ``<head><service>/<session>``; ``None`` when a key
    has another shape (its service cannot be told)."""
    names: set[str] = set()
    for key in keys:
        if not key.startswith(head):
            return None
        service, sep, _ = key[len(head) :].partition("/")
        if not sep or not service:
            return None
        names.add(service)
    return names
