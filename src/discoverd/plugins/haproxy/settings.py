"""The HAProxy plugin's options: their schema, and their validation at factory time."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discoverd import Option, OptionReader, PluginError

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


def _time(read: OptionReader, name: str, default: str, *, positive: bool = False) -> str:
    return read.duration(name, default, _TIME_RE, "HAProxy's", positive)


def parse_settings(options: Mapping[str, Any]) -> Settings:
    """Check every option; raise ``PluginError`` naming the first bad one and its rule."""
    read = OptionReader("haproxy", options)
    known = {o.name for o in OPTIONS}
    unknown = sorted(set(options) - known)
    if unknown:
        raise PluginError(
            f"unknown haproxy option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    binary = read.text("binary", "haproxy")
    if not binary:
        raise read.fail("binary", binary, "must name the haproxy executable")
    template_dir = read.text("template_dir", "")
    if template_dir and not Path(template_dir).is_dir():
        raise read.fail("template_dir", template_dir, "is not a directory")
    stats_port = read.number("stats_port", 1936, 0, 65535)
    return Settings(
        binary=binary,
        bind=read.address("bind", ""),
        stats_bind=read.address("stats_bind", "127.0.0.1"),
        stats_port=stats_port,
        template_dir=template_dir,
        check_interval=_time(read, "check_interval", "1s", positive=True),
        retries=read.number("retries", 3, 0, 100),
        timeout_connect=_time(read, "timeout_connect", "1s", positive=True),
        timeout_client=_time(read, "timeout_client", "30s", positive=True),
        timeout_server=_time(read, "timeout_server", "30s", positive=True),
        maxconn=read.number("maxconn", 4096, 1, 10_000_000),
        drain_timeout=read.seconds("drain_timeout", 10.0, MAX_DRAIN),
        reload_interval=read.seconds("reload_interval", 0.5, 3600.0),
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
