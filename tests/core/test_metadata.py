import pytest

from discoverd.core.metadata import (
    ContainerSpec,
    PortBinding,
    image_service_name,
    instances_for,
    parse_env,
)

CID = "4aa832c39b65895cdfe9eed742a112a983a25f780feee7ae0cbb74aaaad6c383"


def spec(
    labels: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    ports: tuple[PortBinding, ...] = (PortBinding(8000, "tcp", "127.0.0.1", 32768),),
    image: str = "jwilder/whoami:latest",
) -> ContainerSpec:
    return ContainerSpec(
        id=CID, name="web", image=image, labels=labels or {}, env=env or {}, ports=ports
    )


@pytest.mark.parametrize(
    ("image", "name"),
    [
        ("whoami", "whoami"),
        ("jwilder/whoami:latest", "whoami"),
        ("registry:5000/a/b/whoami@sha256:" + "a" * 64, "whoami"),
        ("registry:5000/a/b/whoami:1.2@sha256:" + "a" * 64, "whoami"),
        ("localhost:5000/WhoAmI", "whoami"),
    ],
)
def test_image_service_name(image: str, name: str) -> None:
    assert image_service_name(image) == name


def test_defaults_follow_the_seed() -> None:
    instances, problems = instances_for(spec(), host_ip="10.0.0.5", host_id="h1")
    assert problems == []
    [i] = instances
    assert (i.service, i.address, i.port, i.frontend_port, i.protocol) == (
        "whoami",
        "10.0.0.5",
        32768,
        8000,
        "tcp",
    )
    assert i.id == "h1:4aa832c39b65:8000:tcp"
    assert i.host_id == "h1"


def test_binding_address_used_without_host_ip_and_wildcard_refused() -> None:
    [i], _ = instances_for(spec(), host_ip="", host_id="h1")
    assert i.address == "127.0.0.1"
    wildcard = spec(ports=(PortBinding(8000, "tcp", "0.0.0.0", 32768),))
    instances, problems = instances_for(wildcard, host_ip="", host_id="h1")
    assert instances == []
    assert "HOST_IP" in problems[0].message


def test_labels_win_over_env_and_metadata_is_collected() -> None:
    labels = {"SERVICE_NAME": "api", "SERVICE_TAGS": "blue, v2", "SERVICE_MODE": "http"}
    env = {"SERVICE_NAME": "ignored", "SERVICE_REGION": "eu"}
    [i], problems = instances_for(spec(labels, env), host_ip="10.0.0.5", host_id="h1")
    assert problems == []
    assert i.service == "api"
    assert i.tags == ("blue", "v2")
    assert i.meta_dict == {"mode": "http", "region": "eu"}


def test_ignore_container_and_port() -> None:
    assert instances_for(spec({"SERVICE_IGNORE": "true"}), host_ip="", host_id="h") == ([], [])
    two = (PortBinding(8000, "tcp", "127.0.0.1", 1), PortBinding(9000, "tcp", "127.0.0.1", 2))
    instances, _ = instances_for(
        spec({"SERVICE_9000_IGNORE": "1"}, ports=two), host_ip="", host_id="h"
    )
    assert [i.service for i in instances] == ["whoami-8000"]


def test_several_ports_get_suffixes_unless_named_per_port() -> None:
    ports = (PortBinding(8000, "tcp", "127.0.0.1", 1), PortBinding(53, "udp", "127.0.0.1", 2))
    labels = {"SERVICE_NAME": "svc", "SERVICE_53_NAME": "dns", "SERVICE_53_PORT": "5353"}
    instances, problems = instances_for(spec(labels, ports=ports), host_ip="", host_id="h")
    assert problems == []
    by_name = {i.service: i for i in instances}
    assert set(by_name) == {"svc-8000", "dns"}
    assert by_name["dns"].protocol == "udp"
    assert by_name["dns"].frontend_port == 5353
    assert by_name["svc-8000"].frontend_port == 8000


def test_frontend_port_label() -> None:
    [i], _ = instances_for(spec({"SERVICE_PORT": "18000"}), host_ip="", host_id="h")
    assert i.frontend_port == 18000


@pytest.mark.parametrize(
    ("labels", "label", "rule"),
    [
        ({"SERVICE_NAME": "evil\nbackend x"}, "SERVICE_NAME", "service name"),
        ({"SERVICE_8000_NAME": "UPPER"}, "SERVICE_8000_NAME", "service name"),
        ({"SERVICE_TAGS": "ok,{bad}"}, "SERVICE_TAGS", "tag"),
        ({"SERVICE_8000_PORT": "99999"}, "SERVICE_8000_PORT", "frontend port"),
        ({"SERVICE_NOTE": "x" * 10_000}, "SERVICE_NOTE", "characters long"),
        ({"SERVICE_NOTE": "a}b"}, "SERVICE_NOTE", "contains"),
        ({"SERVICE_MODE": "udp"}, "SERVICE_MODE", "mode must be http or tcp"),
        ({"SERVICE_Bad.Key": "v"}, "SERVICE_Bad.Key", "metadata key"),
        ({"SERVICE_Mode": "x"}, "SERVICE_Mode", "mode must be http or tcp"),
        ({"SERVICE_8000_mode": "x"}, "SERVICE_8000_mode", "mode must be http or tcp"),
        ({"SERVICE_PORT": "\u00b2"}, "SERVICE_PORT", "frontend port"),
    ],
)
def test_hostile_labels_skip_only_that_port(labels: dict[str, str], label: str, rule: str) -> None:
    instances, problems = instances_for(spec(labels), host_ip="", host_id="h")
    assert instances == []
    [problem] = problems
    assert "web" in problem.subject and "4aa832c39b65" in problem.subject
    assert "8000/tcp" in problem.subject
    assert label in problem.message and rule in problem.message
    assert "\n" not in problem.message  # the log line stays one line


def test_hostile_label_on_one_port_leaves_the_other() -> None:
    ports = (PortBinding(8000, "tcp", "127.0.0.1", 1), PortBinding(9000, "tcp", "127.0.0.1", 2))
    instances, problems = instances_for(
        spec({"SERVICE_9000_NAME": "bad name"}, ports=ports), host_ip="", host_id="h"
    )
    assert [i.service for i in instances] == ["whoami-8000"]
    assert len(problems) == 1 and "9000/tcp" in problems[0].subject


def test_image_that_gives_no_valid_name() -> None:
    instances, problems = instances_for(spec(image="_weird_"), host_ip="", host_id="h")
    assert instances == [] and "SERVICE_NAME" in problems[0].message


def test_parse_env() -> None:
    assert parse_env(["A=1", "B=x=y", "NOVALUE", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    assert parse_env(None) == {}


def test_a_port_published_on_several_addresses_is_one_instance() -> None:
    ports = (
        PortBinding(8000, "tcp", "127.0.0.1", 32768),
        PortBinding(8000, "tcp", "10.0.0.5", 32769),
    )
    [i], problems = instances_for(spec(ports=ports), host_ip="10.0.0.5", host_id="h")
    assert problems == [] and i.port == 32769 and i.service == "whoami"
    [j], _ = instances_for(spec(ports=ports), host_ip="", host_id="h")
    assert (j.address, j.port) == ("10.0.0.5", 32769)  # first in order when none is preferred


def test_a_container_started_from_an_image_id_needs_a_name() -> None:
    image = "sha256:" + "4bce3761fab2" * 5 + "ab12"
    instances, problems = instances_for(spec(image=image), host_ip="", host_id="h")
    assert instances == [] and "set SERVICE_NAME" in problems[0].message
    [named], _ = instances_for(spec({"SERVICE_NAME": "web"}, image=image), host_ip="", host_id="h")
    assert named.service == "web"
