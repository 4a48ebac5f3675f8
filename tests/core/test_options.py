"""OptionReader: the checks plugins share for their option values."""

from __future__ import annotations

import re

import pytest

from discoverd import OptionReader, PluginError

TIME = re.compile(r"[0-9]{1,9}(ms|s|m)?")


def test_values_within_their_rules_are_returned_normalised() -> None:
    read = OptionReader("demo", {"name": "  x  ", "n": "12", "t": "2.5", "ip": "::1", "d": "5s"})
    assert read.text("name", "") == "x"
    assert read.number("n", 0, 1, 20) == 12
    assert read.seconds("t", 0.0, 10.0) == 2.5
    assert read.address("ip", "") == "::1"
    assert read.address("missing", "") == ""
    assert read.duration("d", "1s", TIME, "demo's", positive=True) == "5s"
    assert read.number("missing", 7, 0, 10) == 7


@pytest.mark.parametrize(
    ("options", "call", "rule"),
    [
        ({"k": 3}, lambda r: r.text("k", ""), "must be text"),
        ({"k": "a\nb"}, lambda r: r.text("k", ""), "line breaks"),
        ({"k": "99"}, lambda r: r.number("k", 0, 1, 20), "from 1 to 20"),
        ({"k": True}, lambda r: r.number("k", 0, 0, 20), "whole number"),
        ({"k": "nan"}, lambda r: r.seconds("k", 0.0, 10.0), "from 0 to 10"),
        ({"k": "soon"}, lambda r: r.seconds("k", 0.0, 10.0), "number of seconds"),
        ({"k": "host"}, lambda r: r.address("k", ""), "IP address"),
        ({"k": "5x"}, lambda r: r.duration("k", "1s", TIME, "demo's", True), "demo's format"),
        ({"k": "0s"}, lambda r: r.duration("k", "1s", TIME, "demo's", True), "longer than zero"),
    ],
)
def test_a_refusal_names_the_plugin_the_key_the_value_and_the_rule(
    options: dict[str, object], call: object, rule: str
) -> None:
    read = OptionReader("demo", options)
    with pytest.raises(PluginError) as caught:
        call(read)  # type: ignore[operator]
    message = str(caught.value)
    assert message.startswith("demo option k=") and rule in message
