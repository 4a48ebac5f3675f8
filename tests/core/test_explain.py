"""explain and plan as pure functions over a catalog (the commands against a real stack are in
tests/e2e/test_operations.py)."""

from __future__ import annotations

from discoverd import Catalog, ContainerSpec, PortBinding, ServiceInstance
from discoverd.core import explain
from discoverd.core.assignment import build_services
from discoverd.core.metadata import ExposurePolicy, port_stories


def inst(service: str, n: int, frontend: int = 8000, host: str = "h1") -> ServiceInstance:
    return ServiceInstance(
        service, f"{host}:{service}{n}:80:tcp", f"10.0.0.{n}", 30000 + n, "tcp", frontend,
        host_id=host,
    )  # fmt: skip


def test_a_service_story_says_what_is_routed_and_why_not() -> None:
    catalog = Catalog(instances=(inst("web", 1), inst("web", 2), inst("api", 3, 9000)))
    assignment = build_services(catalog)
    states = {inst("web", 1).id: "UP", inst("web", 2).id: "DRAIN"}
    story = explain.explain_service("web", catalog, assignment, {}, states)
    assert story.served and story.frontend_port == 8000
    assert [i.routed for i in story.instances] == ["routed: UP", "routed: DRAIN"]
    clash = Catalog(instances=(*catalog.instances, inst("zoo", 4)))  # also wants 8000
    lost = explain.explain_service("zoo", clash, build_services(clash), {}, None)
    assert not lost.served
    assert any("8000 is already taken by service web" in reason for reason in lost.why_not)
    blocked = explain.explain_service(
        "web", catalog, assignment, {"web": "frontend port 8000 is held by nc"}, states
    )
    assert not blocked.served
    assert any("held by nc" in reason for reason in blocked.why_not)
    missing = explain.explain_service("ghost", catalog, assignment, {}, None)
    assert missing.why_not == ["the registry holds no instance of it"]
    text = explain.service_text(story)
    assert "served on frontend port 8000" in text and "routed: DRAIN" in text


def test_port_stories_say_why_a_port_gives_no_instance() -> None:
    spec = ContainerSpec(
        id="0123456789ab" * 2,
        name="shop",
        image="shop:1",
        labels={"SERVICE_9090_NAME": "Bad Name", "SERVICE_7070_IGNORE": "true"},
        env={},
        ports=(
            PortBinding(8000, "tcp", "0.0.0.0", 32000),
            PortBinding(9090, "tcp", "0.0.0.0", 32001),
            PortBinding(7070, "tcp", "0.0.0.0", 32002),
        ),
    )
    stories = {
        s.binding.private_port: s for s in port_stories(spec, host_ip="10.0.0.5", host_id="h")
    }
    assert stories[8000].instance is not None and stories[8000].instance.service == "shop-8000"
    assert stories[9090].instance is None and stories[9090].problem
    assert "SERVICE_9090_NAME" in stories[9090].reason and "Bad Name" not in stories[9090].reason
    assert stories[7070].reason.startswith("ignored") and not stories[7070].problem
    labelled = ExposurePolicy(expose="labelled")
    asked = port_stories(spec, host_ip="10.0.0.5", host_id="h", policy=labelled)
    assert {s.binding.private_port: s.reason.split(":")[0] for s in asked}[8000] == (
        "not published"
    )


def test_plan_says_what_would_change() -> None:
    before = {"web": (inst("web", 1), inst("web", 2)), "old": (inst("old", 5, 9000),)}
    moved = ServiceInstance("web", inst("web", 2).id, "10.0.0.9", 31000, "tcp", 8000, host_id="h1")
    services = build_services(Catalog(instances=(inst("web", 1), moved, inst("web", 3),
                                                 inst("new", 4, 8100)))).services  # fmt: skip
    result = explain.plan(services, before, "reload", {"blocked": "port held"})
    assert result.changes
    assert result.frontends_added == ["new"] and result.frontends_removed == ["old"]
    assert result.servers_added == [f"new/{inst('new', 4).id}", f"web/{inst('web', 3).id}"]
    assert result.servers_removed == [f"old/{inst('old', 5).id}"]
    assert result.servers_moved == [f"web/{moved.id} 10.0.0.2:30002 -> 10.0.0.9:31000"]
    same = {s.name: s.instances for s in services}
    assert not explain.plan(services, same, "unchanged", {}).changes
    assert "no changes" in explain.plan_text(explain.plan(services, same, "unchanged", {}))
    assert "reload" in explain.plan_text(result)
