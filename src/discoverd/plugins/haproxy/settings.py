"""The HAProxy plugin's options: their schema, and their validation at factory time."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discoverd import Option, PluginError

OPTIONS: tuple[Option, ...] = (
    Option("binary", str, "haproxy", "The haproxy executable (a name on PATH or a path)."),
    Option(
        "bind",
        str,
        "",
        "Address the service frontends listen on; empty: every interface (as the seed did).",
    ),
    Option("stats_bind", str, "127.0.0.1", "Address of the HAProxy stats page."),
    Option("stats_port", int, 1936, "Port of the HAProxy stats page; 0 disables it."),
    Option(
        "template_dir",
        str,
        "",
        "Folder of user templates: a haproxy.cfg.j2 there replaces the shipped one, or extends it "
        'with {% extends "default:haproxy.cfg.j2" %} and overrides single blocks.',
    ),
    Option("check_interval", str, "1s", "Interval between two health checks of a server."),
    Option("retries", int, 3, "Connection retries to a server before giving up (or redispatch)."),
    Option("timeout_connect", str, "1s", "Timeout of a connection to a server."),
    Option("timeout_client", str, "30s", "Inactivity timeout on the client side."),
    Option("timeout_server", str, "30s", "Inactivity timeout on the server side."),
    Option("maxconn", int, 4096, "Maximum concurrent connections of the HAProxy process."),
    Option(
        "drain_timeout",
        float,
        10.0,
        "Seconds a removed server keeps its established connections (no new ones) before they "
        "are cut; an instance's metadata drain (label SERVICE_DRAIN) overrides it.",
    ),
    Option(
        "reload_interval",
        float,
        0.5,
        "At most one reload per this many seconds (changes of servers only are applied at "
        "once, without a reload); 0: no limit.",
    ),
)

# HAProxy's time format: a number and an optional unit (milliseconds without one).
_TIME_RE = re.compile(r"[0-9]{1,9}(us|ms|s|m|h|d)?")
# Characters that cannot appear in the state directory: a quote or a line break would escape the
# single-quoted paths of the configuration, a comma would cut the -S argument of the command line.
_BAD_PATH_CHARS = frozenset("'\n\r\0,")
# A unix socket path holds at most 107 bytes; HAProxy binds "<path>.<pid>.tmp" and renames it.
_SOCKET_PATH_MAX = 107 - len(".4194304.tmp")
#: Longest drain period accepted, in seconds (a day).
MAX_DRAIN = 86400.0


@dataclass(frozen=True)
class Settings:
    """Validated options of one HAProxy proxy."""

    binary: str = "haproxy"
    bind: str = ""
    stats_bind: str = "127.0.0.1"
    stats_port: int = 1936
    template_dir: str = ""
    check_interval: str = "1s"
    retries: int = 3
    timeout_connect: str = "1s"
    timeout_client: str = "30s"
    timeout_server: str = "30s"
    maxconn: int = 4096
    drain_timeout: float = 10.0
    reload_interval: float = 0.5


def _fail(name: str, value: object, rule: str) -> PluginError:
    return PluginError(f"haproxy option {name}={value!r}: {rule}")


def _text(options: Mapping[str, Any], name: str, default: str) -> str:
    value = options.get(name, default)
    if not isinstance(value, str):
        raise _fail(name, value, "must be text")
    if not value.isprintable():
        raise _fail(name, value, "must not contain line breaks or control characters")
    return value.strip()


def _number(options: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = options.get(name, default)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(name, value, f"must be a whole number from {low} to {high}")
    return value


def _seconds(options: Mapping[str, Any], name: str, default: float, high: float) -> float:
    value = options.get(name, default)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _fail(name, value, "must be a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(name, value, "must be a number of seconds")
    if not 0 <= value <= high:  # also refuses NaN
        raise _fail(name, value, f"must be from 0 to {high:g} seconds")
    return float(value)


def _address(options: Mapping[str, Any], name: str, default: str) -> str:
    value = _text(options, name, default)
    if not value:
        return ""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _fail(name, value, "must be an IP address (or empty for every interface)") from None


def _time(options: Mapping[str, Any], name: str, default: str, *, positive: bool = False) -> str:
    value = _text(options, name, default)
    if not _TIME_RE.fullmatch(value):
        raise _fail(name, value, "must be a duration in HAProxy's format, e.g. 500ms, 2s, 1m")
    if positive and int(value.rstrip("usmhd")) == 0:
        raise _fail(name, value, "must be longer than zero")
    return value


def parse_settings(options: Mapping[str, Any]) -> Settings:
    """Check every option; raise ``PluginError`` naming the first bad one and its rule."""
    known = {o.name for o in OPTIONS}
    unknown = sorted(set(options) - known)
    if unknown:
        raise PluginError(
            f"unknown haproxy option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    binary = _text(options, "binary", "haproxy")
    if not binary:
        raise _fail("binary", binary, "must name the haproxy executable")
    template_dir = _text(options, "template_dir", "")
    if template_dir and not Path(template_dir).is_dir():
        raise _fail("template_dir", template_dir, "is not a directory")
    stats_port = _number(options, "stats_port", 1936, 0, 65535)
    return Settings(
        binary=binary,
        bind=_address(options, "bind", ""),
        stats_bind=_address(options, "stats_bind", "127.0.0.1"),
        stats_port=stats_port,
        template_dir=template_dir,
        check_interval=_time(options, "check_interval", "1s", positive=True),
        retries=_number(options, "retries", 3, 0, 100),
        timeout_connect=_time(options, "timeout_connect", "1s", positive=True),
        timeout_client=_time(options, "timeout_client", "30s", positive=True),
        timeout_server=_time(options, "timeout_server", "30s", positive=True),
        maxconn=_number(options, "maxconn", 4096, 1, 10_000_000),
        drain_timeout=_seconds(options, "drain_timeout", 10.0, MAX_DRAIN),
        reload_interval=_seconds(options, "reload_interval", 0.5, 3600.0),
    )


def drain_seconds(value: str) -> float | None:
    """A drain period from instance metadata ("10", "2.5"; "10s" and "500ms" are accepted too),
    or ``None`` if it is not a number of seconds from 0 to ``MAX_DRAIN``."""
    text = value.strip().lower()
    scale = 1.0
    if text.endswith("ms"):
        text, scale = text[:-2], 0.001
    try:
        seconds = float(text.removesuffix("s")) * scale
    except ValueError:
        return None
    return seconds if 0 <= seconds <= MAX_DRAIN else None


def check_state_dir(path: Path) -> Path:
    """The plugin's state directory, refused when HAProxy could not use paths inside it."""
    text = str(path)
    bad = sorted(set(text) & _BAD_PATH_CHARS)
    if bad or not text.isprintable():
        shown = ", ".join(repr(c) for c in bad) or "a control character"
        raise PluginError(
            f"state directory {text!r} contains {shown}, which cannot appear in HAProxy's "
            "configuration or command line; choose another state_dir"
        )
    longest = path / "master.sock"
    if len(str(longest).encode()) > _SOCKET_PATH_MAX:
        raise PluginError(
            f"state directory {text!r} is too long for HAProxy's unix sockets ({longest} must "
            f"stay within {_SOCKET_PATH_MAX} bytes); choose a shorter state_dir"
        )
    return path
