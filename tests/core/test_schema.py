"""Typed plugin configuration: one declaration per option, everything else derived."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from discoverd import ConfigError, NoOptions, OptionError, build_config, option, options_of
from discoverd.core.schema import env_names, options_table, redact_url


def even(value: int) -> int:
    if value % 2:
        raise ValueError("must be even")
    return value


@dataclass(frozen=True)
class Sample:
    """Every supported kind of field."""

    name: str = option("x", "A name.", env=("SAMPLE_NAME",), check=str.strip)
    count: int = option(2, "How many.", min=0, max=10, check=even)
    ratio: float = option(0.5, "A ratio.", min=0)
    on: bool = option(False, "A switch.")
    hosts: tuple[str, ...] = option(("a:1",), "Endpoints.")
    mode: Literal["tcp", "http"] = option("tcp", "A mode.")
    token: str = option("", "A secret.", secret=True)
    low: int = option(1, "At most high.")
    high: int = option(5, "At least low.")

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise OptionError("low must not exceed high", "low", "high")


def test_options_are_derived_from_the_fields() -> None:
    infos = {o.name: o for o in options_of(Sample)}
    assert [o.name for o in options_of(Sample)][:3] == ["name", "count", "ratio"]
    assert infos["count"].kind == "integer" and infos["count"].min == 0
    assert infos["hosts"].kind == "list" and infos["hosts"].default == ("a:1",)
    assert infos["mode"].kind == "choice" and infos["mode"].choices == ("tcp", "http")
    assert infos["on"].type_name == "boolean" and infos["mode"].type_name == "one of tcp, http"
    assert env_names("sample-plugin", infos["name"]) == (
        "DISCOVERD_SAMPLE_PLUGIN_NAME",
        "SAMPLE_NAME",
    )
    assert env_names("", infos["count"]) == ("DISCOVERD_COUNT",)
    assert infos["token"].as_dict()["secret"] is True
    assert infos["hosts"].as_dict()["default"] == ["a:1"]
    assert options_of(NoOptions) == ()


def test_values_are_converted_from_text_and_checked() -> None:
    config = build_config(
        Sample,
        {"name": " y ", "count": "4", "ratio": "2", "on": "yes", "hosts": "b:2, c:3",
         "mode": "HTTP"},
    )  # fmt: skip
    assert config == Sample("y", 4, 2.0, True, ("b:2", "c:3"), "http")
    assert build_config(Sample, {"hosts": ["d:4"], "on": False}).hosts == ("d:4",)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"count": "many"}, "key 'count': expected a whole number, got 'many'"),
        ({"count": 3}, "key 'count' = 3: must be even"),
        ({"count": 12}, "key 'count' = 12: must be from 0 to 10"),
        ({"ratio": -1}, "key 'ratio' = -1.0: must be at least 0"),
        ({"ratio": "nan"}, "key 'ratio' = nan: must be a finite number"),
        ({"on": "maybe"}, "key 'on': expected true or false, got 'maybe'"),
        ({"mode": "udp"}, "key 'mode': expected one of tcp, http, got 'udp'"),
        ({"hosts": [1]}, "key 'hosts': expected a list of strings"),
        ({"low": 9}, "low must not exceed high"),
        ({"nope": 1}, "unknown key 'nope' in the top level. Known keys: name, count"),
    ],
)
def test_refusals_name_the_key_and_the_rule(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(Sample, values)
    assert message in str(caught.value)


def test_refusals_name_where_the_value_was_set() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(Sample, {"count": 3}, section="s", origins={"count": "config file a.toml"})
    assert str(caught.value) == "config file a.toml: key 's.count' = 3: must be even"
    with pytest.raises(ConfigError) as caught:
        build_config(Sample, {"low": 7, "high": 6}, section="s", origins={"low": "command line"})
    assert str(caught.value) == "[s] low must not exceed high (low: command line)"


def test_secrets_and_url_credentials_never_show() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(Sample, {"token": 5})
    assert "'***'" in str(caught.value) and "5" not in str(caught.value).split(":")[-1]
    assert "token" not in repr(build_config(Sample, {"token": "hunter2"}))
    assert redact_url("http://u:p@h:1, https://x@y/p") == "http://***@h:1, https://***@y/p"
    assert redact_url("user@host") == "user@host"  # not a URL: left alone
    with pytest.raises(ConfigError) as caught:
        build_config(Sample, {"hosts": ["http://root:pw@h:1", "x"], "count": 1})
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize(
    "declaration",
    ["not frozen", "no default", "unsupported type"],
)
def test_a_bad_declaration_is_refused_when_read(declaration: str) -> None:
    if declaration == "not frozen":

        @dataclass
        class Bad:
            x: int = option(1, "")

    elif declaration == "no default":

        @dataclass(frozen=True)
        class Bad:  # type: ignore[no-redef]
            x: int

    else:

        @dataclass(frozen=True)
        class Bad:  # type: ignore[no-redef]
            x: dict[str, str] | None = option(None, "")

    with pytest.raises(TypeError):
        options_of(Bad)


def test_the_documentation_table_is_derived() -> None:
    table = options_table(Sample, "sample")
    assert "| `count` | integer | `2` | `DISCOVERD_SAMPLE_COUNT` | How many. From 0 to 10. |" in (
        table
    )
    assert "| `ratio` | number | `0.5` | `DISCOVERD_SAMPLE_RATIO` | A ratio. At least 0. |" in table
    assert "| `token` | string | (empty) |" in table and "Secret: never shown." in table
    assert "| `hosts` | list of strings | `a:1` |" in table
    assert "`DISCOVERD_SAMPLE_NAME`, `SAMPLE_NAME`" in table


@dataclass(frozen=True)
class TriState:
    direct: Literal["auto", "true", "false"] = option("auto", "auto, or a yes / no.")


def test_a_choice_of_true_and_false_takes_a_toml_boolean_and_nothing_else() -> None:
    assert build_config(TriState, {"direct": True}).direct == "true"
    assert build_config(TriState, {"direct": False}).direct == "false"
    assert build_config(TriState, {"direct": "AUTO"}).direct == "auto"
    with pytest.raises(ConfigError, match="one of auto, true, false"):
        build_config(TriState, {"direct": 1})
    # A choice without those words takes no boolean.
    with pytest.raises(ConfigError, match="one of tcp, http"):
        build_config(Sample, {"mode": True})
