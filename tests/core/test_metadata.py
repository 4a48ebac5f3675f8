import logging

import pytest

from discoverd.core.config import load_settings
from discoverd.core.metadata import (
    META_KEYS,
    ContainerSpec,
    ExposurePolicy,
    PortBinding,
    image_repository,
    image_service_name,
    instances_for,
    parse_env,
    parse_service_images,
)
from discoverd.core.model import PortRanges

CID = "4aa832c39b65895cdfe9eed742a112a983a25f780feee7ae0cbb74aaaad6c383"


def spec(
    labels: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    ports: tuple[PortBinding, ...] = (PortBinding(8000, "tcp", "10.0.0.7", 32768),),
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
    assert i.address == "10.0.0.7"
    wildcard = spec(ports=(PortBinding(8000, "tcp", "0.0.0.0", 32768),))
    instances, problems = instances_for(wildcard, host_ip="", host_id="h1")
    assert instances == []
    assert "HOST_IP" in problems[0].message


def test_labels_win_over_env_and_metadata_is_collected() -> None:
    labels = {"SERVICE_NAME": "api", "SERVICE_TAGS": "blue, v2", "SERVICE_MODE": "http"}
    env = {"SERVICE_NAME": "ignored", "SERVICE_DRAIN": "5s", "SERVICE_MODE": "tcp"}
    [i], problems = instances_for(spec(labels, env), host_ip="10.0.0.5", host_id="h1")
    assert problems == []
    assert i.service == "api"
    assert i.tags == ("blue", "v2")
    assert i.meta_dict == {"mode": "http", "drain": "5"}


def test_ignore_container_and_port() -> None:
    assert instances_for(spec({"SERVICE_IGNORE": "true"}), host_ip="", host_id="h") == ([], [])
    two = (PortBinding(8000, "tcp", "10.0.0.7", 1), PortBinding(9000, "tcp", "10.0.0.7", 2))
    instances, _ = instances_for(
        spec({"SERVICE_9000_IGNORE": "1"}, ports=two), host_ip="", host_id="h"
    )
    assert [i.service for i in instances] == ["whoami-8000"]


def test_several_ports_get_suffixes_unless_named_per_port() -> None:
    ports = (PortBinding(8000, "tcp", "10.0.0.7", 1), PortBinding(53, "udp", "10.0.0.7", 2))
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
        ({"SERVICE_DRAIN": "x" * 10_000}, "SERVICE_DRAIN", "characters long"),
        ({"SERVICE_CHECK_HTTP": "/a}b"}, "SERVICE_CHECK_HTTP", "contains"),
        ({"SERVICE_MODE": "udp"}, "SERVICE_MODE", "mode must be http or tcp"),
        ({"SERVICE_Mode": "xyzzy"}, "SERVICE_Mode", "mode must be http or tcp"),
        ({"SERVICE_8000_mode": "xyzzy"}, "SERVICE_8000_mode", "mode must be http or tcp"),
        ({"SERVICE_DRAIN": "s3cr3t-soon"}, "SERVICE_DRAIN", "duration"),
        ({"SERVICE_CHECK_HTTP": "s3cr3t"}, "SERVICE_CHECK_HTTP", "path"),
        ({"SERVICE_CHECK": "s3cr3t"}, "SERVICE_CHECK", "tcp, http, none"),
        ({"SERVICE_CHECK_TCP": "s3cr3t"}, "SERVICE_CHECK_TCP", "true/false"),
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
    for value in labels.values():  # the value itself is never shown
        assert value not in str(problem) and repr(value)[1:-1] not in str(problem)


def test_hostile_label_on_one_port_leaves_the_other() -> None:
    ports = (PortBinding(8000, "tcp", "10.0.0.7", 1), PortBinding(9000, "tcp", "10.0.0.7", 2))
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


# --------------------------------------------------------------------------------------------
# Registry metadata: the documented keys only


def test_only_documented_keys_become_metadata(caplog: pytest.LogCaptureFixture) -> None:
    labels = {
        "SERVICE_API_KEY": "s3cr3t-api-key",
        "SERVICE_REGION": "eu",
        "SERVICE_8000_DB_PASSWORD": "s3cr3t\nWARNING forged",
        "SERVICE_NOTE": "x" * 10_000,  # not published, so not a problem either
        "SERVICE_MODE": "http",
        "SERVICE_8000_CHECK_HTTP": "/health",
    }
    env = {"SERVICE_TOKEN": "s3cr3t-token", "SERVICE_DRAIN": "2s"}
    with caplog.at_level(logging.DEBUG, logger="discoverd"):
        [i], problems = instances_for(spec(labels, env), host_ip="10.0.0.5", host_id="h")
    assert problems == []
    assert i.meta_dict == {"mode": "http", "check_http": "/health", "drain": "2"}
    assert set(i.meta_dict) <= META_KEYS
    ignored = " ".join(r.getMessage() for r in caplog.records)
    assert "SERVICE_API_KEY" in ignored and "SERVICE_8000_DB_PASSWORD" in ignored
    assert "s3cr3t" not in ignored  # the keys are named, never their values
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="discoverd"):
        instances_for(spec(labels, env), host_ip="10.0.0.5", host_id="h")
    assert caplog.records == []  # said once per container and key


def test_the_operator_can_publish_more_keys() -> None:
    policy = ExposurePolicy(meta_keys=frozenset({"weight"}))
    labels = {"SERVICE_WEIGHT": "10", "SERVICE_REGION": "eu"}
    [i], _ = instances_for(spec(labels), host_ip="10.0.0.5", host_id="h", policy=policy)
    assert i.meta_dict == {"weight": "10"}
    [default], _ = instances_for(spec(labels), host_ip="10.0.0.5", host_id="h")
    assert default.meta_dict == {}
    bad = spec({"SERVICE_WEIGHT": "{x}"})
    found, [problem] = instances_for(bad, host_ip="", host_id="h", policy=policy)
    assert found == [] and "SERVICE_WEIGHT" in problem.message


# --------------------------------------------------------------------------------------------
# Exposure policy


def test_labelled_exposure_registers_only_ports_that_ask() -> None:
    labelled = ExposurePolicy(expose="labelled")
    two = (PortBinding(8000, "tcp", "10.0.0.7", 1), PortBinding(9000, "tcp", "10.0.0.7", 2))

    def names(labels: dict[str, str], env: dict[str, str] | None = None) -> list[str]:
        found, problems = instances_for(
            spec(labels, env, ports=two), host_ip="", host_id="h", policy=labelled
        )
        assert problems == []  # not asking is not a problem
        return [i.service for i in found]

    assert names({}) == []
    assert names({"SERVICE_TAGS": "a", "SERVICE_8000_PORT": "80"}) == []
    assert names({"SERVICE_NAME": ""}) == []  # an empty name asks for nothing
    assert names({"SERVICE_NAME": "web"}) == ["web-8000", "web-9000"]
    assert names({}, {"SERVICE_NAME": "web"}) == ["web-8000", "web-9000"]  # registrator: env too
    assert names({"SERVICE_9000_NAME": "admin"}) == ["admin"]
    all_ports, _ = instances_for(spec(ports=two), host_ip="", host_id="h")
    assert len(all_ports) == 2  # the default: every published port


def test_frontend_ports_outside_the_range_are_refused() -> None:
    policy = ExposurePolicy(frontend_ports=PortRanges.parse("8000-8999"))
    [ok], _ = instances_for(spec(), host_ip="", host_id="h", policy=policy)
    assert ok.frontend_port == 8000
    found, [problem] = instances_for(
        spec({"SERVICE_PORT": "22"}), host_ip="", host_id="h", policy=policy
    )
    assert found == []
    assert "SERVICE_PORT" in problem.message and "frontend_ports (8000-8999)" in problem.message
    assert "22" not in problem.message
    low = spec(ports=(PortBinding(80, "tcp", "10.0.0.7", 1),))
    found, [problem] = instances_for(low, host_ip="", host_id="h", policy=policy)
    assert found == [] and "frontend port 80" in problem.message
    assert "SERVICE_80_PORT" in problem.message  # what to do about it
    [moved], _ = instances_for(
        spec({"SERVICE_PORT": "8080"}, ports=low.ports), host_ip="", host_id="h", policy=policy
    )
    assert moved.frontend_port == 8080


@pytest.mark.parametrize(
    ("image", "repository"),
    [
        ("nginx", "docker.io/library/nginx"),
        ("nginx:1.25", "docker.io/library/nginx"),
        ("library/nginx@sha256:" + "a" * 64, "docker.io/library/nginx"),
        ("index.docker.io/team/web:2", "docker.io/team/web"),
        ("registry.example.com:5000/team/web:1.2", "registry.example.com:5000/team/web"),
        ("localhost/web", "localhost/web"),
        ("sha256:" + "b" * 64, ""),
        ("Team/Web", ""),
        ("bad image", ""),
        ("", ""),
    ],
)
def test_image_repository(image: str, repository: str) -> None:
    assert image_repository(image) == repository


def test_service_images_keep_a_name_from_being_joined_by_any_container() -> None:
    policy = ExposurePolicy(
        service_images=parse_service_images(
            ["web=registry.example.com/team/web", "api=registry.example.com/team/*"]
        )
    )

    def join(name: str, image: str) -> tuple[list[str], list[str]]:
        found, problems = instances_for(
            spec({"SERVICE_NAME": name}, image=image), host_ip="", host_id="h", policy=policy
        )
        return [i.service for i in found], [p.message for p in problems]

    assert join("web", "registry.example.com/team/web:3") == (["web"], [])
    assert join("api", "registry.example.com/team/api/v2:1") == (["api"], [])
    assert join("other", "evil/anything") == (["other"], [])  # not listed: open
    for image in ("evil/web", "registry.example.com/team/web2", "sha256:" + "c" * 64):
        names, [message] = join("web", image)
        assert names == [] and "service_images" in message, image
        assert "registry.example.com/team/web" in message
    # the image's default name is held to the same rule
    found, [problem] = instances_for(
        spec(image="evil/web:1"), host_ip="", host_id="h", policy=policy
    )
    assert found == [] and "docker.io/evil/web" in problem.message


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("web", "SERVICE=REPOSITORY"),
        ("Web=team/web", "SERVICE=REPOSITORY"),
        ("web=team/web:1", "not an image repository"),
        ("web=team/web@sha256:" + "a" * 64, "not an image repository"),
        ("web=", "not an image repository"),
        ("web=Team/Web", "not an image repository"),
    ],
)
def test_bad_service_images_are_refused(entry: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_service_images([entry])


def test_policy_from_the_core_options() -> None:
    core = load_settings(
        {},
        env={
            "DISCOVERD_EXPOSE": "labelled",
            "DISCOVERD_FRONTEND_PORTS": "9100, 8000-8999",
            "DISCOVERD_SERVICE_IMAGES": "web=team/web,web=team/web-canary",
            "DISCOVERD_META_KEYS": "Weight",
            "DISCOVERD_SINGLE_MACHINE": "true",
        },
    ).core
    policy = ExposurePolicy.from_config(core)
    assert policy.expose == "labelled" and policy.single_machine
    assert str(policy.frontend_ports) == "8000-8999,9100" == core.frontend_ports
    assert policy.images_for("web") == ("docker.io/team/web", "docker.io/team/web-canary")
    assert policy.images_for("api") is None
    assert policy.meta_keys == {"weight"}
    assert ExposurePolicy.from_config(None) == ExposurePolicy()


# --------------------------------------------------------------------------------------------
# Addresses


def test_a_loopback_binding_without_host_ip_is_not_published_silently() -> None:
    local = spec(ports=(PortBinding(8000, "tcp", "127.0.0.1", 32768),))
    found, [problem] = instances_for(local, host_ip="", host_id="h")
    assert found == [] and "127.0.0.1:32768" in problem.message
    assert "HOST_IP" in problem.message and "single_machine" in problem.message
    one_machine = ExposurePolicy(single_machine=True)
    [i], _ = instances_for(local, host_ip="", host_id="h", policy=one_machine)
    assert i.address == "127.0.0.1"
    [j], _ = instances_for(local, host_ip="127.0.0.1", host_id="h")  # the operator's word
    assert j.address == "127.0.0.1"


@pytest.mark.parametrize(
    "address", ["169.254.169.254", "224.0.0.1", "0.1.2.3", "255.255.255.255", "ff02::1"]
)
def test_bindings_on_addresses_that_mean_another_machine_are_refused(address: str) -> None:
    odd = spec(ports=(PortBinding(8000, "tcp", address, 32768),))
    found, [problem] = instances_for(odd, host_ip="", host_id="h")
    assert found == [] and "never a backend" in problem.message
    found, [problem] = instances_for(spec(), host_ip=address, host_id="h")
    assert found == [] and problem.message.startswith("HOST_IP")
