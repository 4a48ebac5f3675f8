"""The HAProxy plugin's options: the ``[haproxy]`` section, one typed field each."""

from __future__ import annotations

import re
from dataclasses import dataclass

from discoverd import option, validators

#: HAProxy's time format: a number and an optional unit (milliseconds without one).
HAPROXY_TIME = re.compile(r"[0-9]{1,9}(us|ms|s|m|h|d)?")
#: Longest drain period accepted, in seconds (a day).
MAX_DRAIN = 86400.0

_time = validators.duration_text(HAPROXY_TIME, "HAProxy's", positive=True)


def _executable(value: str) -> str:
    text = validators.one_line(value)
    if not text:
        raise ValueError("must name the haproxy executable")
    return text


@dataclass(frozen=True)
class HAProxyConfig:
    """The ``[haproxy]`` section. Templates see it as ``settings``."""

    binary: str = option(
        "haproxy", "The haproxy executable (a name on PATH or a path).", check=_executable
    )
    bind: str = option(
        "",
        "Address the service frontends listen on; empty: every interface (as the seed did).",
        check=validators.ip_or_empty,
    )
    stats_bind: str = option(
        "127.0.0.1", "Address of the HAProxy stats page.", check=validators.ip_or_empty
    )
    stats_port: int = option(
        1936, "Port of the HAProxy stats page; 0 disables it.", min=0, max=65535
    )
    template_dir: str = option(
        "",
        "Folder of user templates: a haproxy.cfg.j2 there replaces the shipped one, or extends it "
        'with {% extends "default:haproxy.cfg.j2" %} and overrides single blocks.',
        check=validators.directory_or_empty,
    )
    check_interval: str = option(
        "1s", "Interval between two health checks of a server.", check=_time
    )
    retries: int = option(
        3, "Connection retries to a server before giving up (or redispatch).", min=0, max=100
    )
    timeout_connect: str = option("1s", "Timeout of a connection to a server.", check=_time)
    timeout_client: str = option("30s", "Inactivity timeout on the client side.", check=_time)
    timeout_server: str = option("30s", "Inactivity timeout on the server side.", check=_time)
    maxconn: int = option(
        4096, "Maximum concurrent connections of the HAProxy process.", min=1, max=10_000_000
    )
    drain_timeout: float = option(
        10.0,
        "Seconds a removed server keeps its established connections (no new ones) before they "
        "are cut; an instance's metadata drain (label SERVICE_DRAIN) overrides it.",
        min=0,
        max=MAX_DRAIN,
    )
    reload_interval: float = option(
        0.5,
        "At most one reload per this many seconds (changes of servers only are applied at "
        "once, without a reload); 0: no limit.",
        min=0,
        max=3600,
    )
