"""How a service's proxy mode is chosen (issue 10, "zero by default"): the operator's labels,
the core option ``default_mode``, and the modes the register roles detected; the same on every
host. And ``detected_mode`` is the core's own key: no label or ``meta_keys`` can set it."""

from __future__ import annotations

import itertools

import pytest

from discoverd.core.assignment import ServiceCache, build_services, service_mode
from discoverd.core.config import CoreConfig
from discoverd.core.metadata import (
    ContainerSpec,
    PortBinding,
    check_meta_key_names,
    instances_for,
)
from discoverd.core.model import DETECTED_MODE_KEY, Catalog, ServiceInstance, backend_problem
from discoverd.core.schema import build_config


def inst(
    n: int, mode: str = "", detected: str = "", *, host: str = "h", address: str = "10.0.0.1"
) -> ServiceInstance:
    meta = [("mode", mode)] if mode else []
    if detected:
        meta.append((DETECTED_MODE_KEY, detected))
    return ServiceInstance(
        service="web",
        id=f"{host}:c{n:011d}:8000:tcp",
        address=address,
        port=30000 + n,
        frontend_port=8000,
        meta=tuple(meta),
        host_id=host,
    )


@pytest.mark.parametrize(
    ("instances", "default", "expected"),
    [
        # auto: http only when every instance checked answers in HTTP/1
        ([inst(1, detected="http"), inst(2, detected="http")], "auto", "http"),
        ([inst(1, detected="http"), inst(2)], "auto", "http"),  # 2 not checked yet
        ([inst(1, detected="http"), inst(2, detected="tcp")], "auto", "tcp"),
        ([inst(1), inst(2)], "auto", "tcp"),  # none checked (another discoverd, no namespace)
        ([inst(1, detected="http"), inst(2, detected="bogus")], "auto", "tcp"),
        # the operator's labels win over detection, and over default_mode
        ([inst(1, mode="tcp", detected="http"), inst(2, detected="http")], "auto", "tcp"),
        ([inst(1, mode="http"), inst(2, detected="tcp")], "auto", "http"),
        ([inst(1, mode="http"), inst(2, mode="tcp")], "auto", "http"),  # as before: http
        ([inst(1, mode="tcp")], "http", "tcp"),
        # a forced default ignores detection
        ([inst(1, detected="http")], "tcp", "tcp"),
        ([inst(1, detected="tcp")], "http", "http"),
    ],
)
def test_service_mode(instances: list[ServiceInstance], default: str, expected: str) -> None:
    for order in itertools.permutations(instances):
        assert service_mode(order, default) == expected  # type: ignore[arg-type]
        built = build_services(Catalog(instances=order), default_mode=default)  # type: ignore[arg-type]
        assert [s.mode for s in built.services] == [expected]


def test_auto_is_the_default() -> None:
    assert build_config(CoreConfig, {}).default_mode == "auto"
    catalog = Catalog(instances=(inst(1, detected="http"),))
    assert [s.mode for s in build_services(catalog).services] == ["http"]


def test_every_host_gives_a_service_the_same_mode() -> None:
    """An instance one host's address policy refuses (another host's loopback backend) still
    votes: on that host too the service is tcp when that instance is not HTTP."""
    theirs = inst(1, detected="tcp", host="other", address="127.0.0.1")
    ours = inst(2, detected="http", host="here", address="127.0.0.1")
    catalog = Catalog(instances=(theirs, ours))
    here = build_services(catalog, accept=lambda i: backend_problem(i, "here"))
    assert [len(s.instances) for s in here.services] == [1]
    everywhere = build_services(catalog)
    assert [s.mode for s in here.services] == [s.mode for s in everywhere.services] == ["tcp"]


def test_the_cache_follows_the_detected_modes() -> None:
    cache = ServiceCache()
    unknown = Catalog(instances=(inst(1), inst(2)))
    assert [s.mode for s in build_services(unknown, cache=cache).services] == ["tcp"]
    found = Catalog(instances=(inst(1, detected="http"), inst(2, detected="http")))
    assert [s.mode for s in build_services(found, cache=cache).services] == ["http"]
    forced = build_services(found, cache=cache, default_mode="tcp")
    assert [s.mode for s in forced.services] == ["tcp"]
    refused = Catalog(instances=(*found.instances, inst(3, detected="tcp", host="x",
                                                           address="127.0.0.1")))  # fmt: skip
    hidden = build_services(refused, cache=cache, accept=lambda i: backend_problem(i, "h"))
    assert [s.mode for s in hidden.services] == ["tcp"]
    assert [s.mode for s in build_services(found, cache=cache).services] == ["http"]


def container(**labels: str) -> ContainerSpec:
    return ContainerSpec(
        id="c" * 64,
        name="web",
        image="web:1",
        labels=labels,
        env={"SERVICE_DETECTED_MODE": "http"},
        ports=(PortBinding(8000, "tcp", "127.0.0.1", 30000),),
    )


def test_no_label_sets_the_detected_mode() -> None:
    [found], problems = instances_for(
        container(SERVICE_DETECTED_MODE="http", SERVICE_8000_DETECTED_MODE="http"),
        host_ip="10.0.0.1",
        host_id="h",
    )
    assert problems == [] and DETECTED_MODE_KEY not in found.meta_dict
    with pytest.raises(ValueError, match="set by discoverd itself"):
        check_meta_key_names(["detected_mode"])
    [labelled], _ = instances_for(container(SERVICE_MODE="tcp"), host_ip="10.0.0.1", host_id="h")
    assert labelled.meta_dict == {"mode": "tcp"}
