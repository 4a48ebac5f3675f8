import pytest

from discoverd import ServiceInstance, ValidationError, parse_endpoint


def make(**kw: object) -> ServiceInstance:
    base: dict[str, object] = {
        "service": "whoami",
        "id": "h1:abc:8000:tcp",
        "address": "127.0.0.2",
        "port": 32768,
    }
    base.update(kw)
    return ServiceInstance(**base)  # type: ignore[arg-type]


def test_valid_instance_is_hashable_and_normalised() -> None:
    a = make(meta=(("z", "1"), ("a", "2")), tags=["x", "y"])
    b = make(meta=(("a", "2"), ("z", "1")), tags=("x", "y"))
    assert a == b and hash(a) == hash(b)
    assert a.meta_dict == {"a": "2", "z": "1"}
    assert a.endpoint == "127.0.0.2:32768"
    assert make(address="::1").endpoint == "[::1]:32768"


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("service", "Whoami", "service name"),
        ("service", "who\nami", "service name"),
        ("service", "a" * 64, "service name"),
        ("service", "", "service name"),
        ("id", "port", "instance id"),
        ("id", "a/b", "instance id"),
        ("address", "example.com", "not an IP address"),
        ("address", "fe80::1%lo init-addr none weight 256", "scope ids"),
        ("address", "fe80::1%eth0", "scope ids"),
        ("port", "\u00b2", "port"),
        ("port", "8\u0660", "port"),
        ("port", 0, "port"),
        ("port", 65536, "port"),
        ("port", True, "port"),
        ("protocol", "sctp", "protocol"),
        ("frontend_port", "80x", "frontend port"),
        ("tags", ("ok", "b{ad"), "tag"),
        ("meta", (("mode", "http\nlisten evil"),), "metadata value"),
        ("meta", (("Mode", "http"),), "metadata key"),
        ("meta", (("x", "v" * 300),), "characters long"),
    ],
)
def test_invalid_values_are_refused_with_the_rule(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        make(**{field: value})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("[::1]:8000", ("::1", 8000)),
        (" 1.2.3.4:5 ", ("1.2.3.4", 5)),
    ],
)
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    "text", ["garbage", "1.2.3.4", "host:80", "1.2.3.4:0", ":80", "1.2.3.4:8a"]
)
def test_parse_endpoint_refuses(text: str) -> None:
    with pytest.raises(ValidationError):
        parse_endpoint(text)
