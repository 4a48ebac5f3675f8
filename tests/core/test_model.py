import pytest

from discoverd import ServiceInstance, ValidationError, parse_endpoint
from discoverd.core.model import (
    PortRanges,
    backend_problem,
    check_address,
    check_backend_address,
    is_loopback,
)


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


@pytest.mark.parametrize("char", [*"\n\r\0{}\"'`;#\\", "\t", "\x7f", "\u2028", "\x1b"])
def test_every_forbidden_character_in_a_metadata_value_is_refused(char: str) -> None:
    # Valid values are not cached (a container's address is new each time): a value that
    # follows a valid one, and the same value twice, are each checked in full.
    make(meta=(("note", "fine"),))
    for _ in range(2):
        with pytest.raises(ValidationError, match="metadata value"):
            make(meta=(("note", f"a{char}b"),))


def test_metadata_values_at_the_limits() -> None:
    assert make(meta=(("note", "v" * 256),)).meta_dict == {"note": "v" * 256}
    assert make(meta=(("note", "é ü 名"),)).meta_dict == {"note": "é ü 名"}
    assert make(meta=(("note", ""),)).meta_dict == {"note": ""}
    with pytest.raises(ValidationError, match="characters long"):
        make(meta=(("note", "v" * 257),))
    with pytest.raises(ValidationError, match="metadata key"):
        make(meta=(("-note", "v"),))
    with pytest.raises(ValidationError, match="text"):
        make(meta=(("note", 5),))


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


# --------------------------------------------------------------------------------------------
# Backend addresses


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("169.254.169.254", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.251", "multicast"),
        ("239.1.2.3", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
    ],
)
def test_addresses_that_mean_another_machine_everywhere_are_refused(
    address: str, kind: str
) -> None:
    with pytest.raises(ValidationError, match=kind):
        check_address(address)
    with pytest.raises(ValidationError, match=kind):
        make(address=address)  # wherever an instance is built: a source, a registry entry
    with pytest.raises(ValidationError, match=kind):
        parse_endpoint(f"[{address}]:80" if ":" in address else f"{address}:80")


@pytest.mark.parametrize("address", ["10.0.0.1", "192.168.1.5", "2001:db8::1", "127.0.0.1"])
def test_ordinary_addresses_are_accepted(address: str) -> None:
    assert check_address(address) == address


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("nonsense", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_loopback_is_routed_only_for_the_host_that_registered_it() -> None:
    assert check_backend_address("127.0.0.2", host_id="a", own_host_id="a") == "127.0.0.2"
    assert check_backend_address("10.0.0.1", host_id="b", own_host_id="a") == "10.0.0.1"
    for host_id in ("b", ""):
        with pytest.raises(ValidationError, match="loopback") as raised:
            check_backend_address("127.0.0.1", host_id=host_id, own_host_id="a")
        assert "single_machine" in str(raised.value)
    with pytest.raises(ValidationError, match="loopback"):
        check_backend_address("::ffff:127.0.0.1", host_id="", own_host_id="")
    assert (
        check_backend_address("127.0.0.1", host_id="b", own_host_id="a", single_machine=True)
        == "127.0.0.1"
    )
    with pytest.raises(ValidationError, match="link-local"):
        check_backend_address("169.254.169.254", host_id="a", own_host_id="a", single_machine=True)


def test_backend_problem_names_the_instance_and_its_service() -> None:
    mine = make(address="127.0.0.1", host_id="h1")
    assert backend_problem(mine, "h1") is None
    assert backend_problem(make(address="10.0.0.1"), "h2") is None
    problem = backend_problem(mine, "h2")
    assert problem is not None and problem.service == "whoami"
    assert "h1:abc:8000:tcp" in problem.subject and "loopback" in problem.message
    assert backend_problem(mine, "h2", single_machine=True) is None


# --------------------------------------------------------------------------------------------
# Port ranges


def test_port_ranges() -> None:
    ranges = PortRanges.parse(" 9100, 8000 - 8999,9100")
    assert str(ranges) == "8000-8999,9100"
    assert 8000 in ranges and 8999 in ranges and 9100 in ranges
    assert 7999 not in ranges and 9000 not in ranges and "8000" not in ranges
    assert 1 in PortRanges() and 65535 in PortRanges()


@pytest.mark.parametrize("text", ["", "80-", "a-b", "0-80", "80-70000", "9000-8000", "1,,2"])
def test_bad_port_ranges(text: str) -> None:
    with pytest.raises(ValidationError):
        PortRanges.parse(text)
