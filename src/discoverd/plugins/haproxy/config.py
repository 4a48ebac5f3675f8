"""The HAProxy plugin's options: the ``[haproxy]`` section, one typed field each; and what they
imply on this machine (:func:`worker_user`: who HAProxy's workers run as)."""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
import re
from dataclasses import dataclass
from typing import Literal

from discoverd import PluginError, option, validators

log = logging.getLogger(__name__)

#: HAProxy's time format: a number and an optional unit (milliseconds without one).
HAPROXY_TIME = re.compile(r"[0-9]{1,9}(us|ms|s|m|h|d)?")
#: Longest drain period accepted, in seconds (a day).
MAX_DRAIN = 86400.0

#: Who the workers run as when discoverd runs as root and the options leave it open.
DEFAULT_USER = "nobody"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")

_time = validators.duration_text(HAPROXY_TIME, "HAProxy's", positive=True)


def _name_or_empty(value: str) -> str:
    text = validators.one_line(value)
    if text and not _NAME_RE.fullmatch(text):
        raise ValueError("must be a user or group name (letters, digits, '_', '.', '-')")
    return text


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
        1936,
        "Port of the HAProxy stats page; 0 disables it. Left out while another process holds "
        "the port (the services are served all the same).",
        min=0,
        max=65535,
    )
    template_dir: str = option(
        "",
        "Folder of user templates: a haproxy.cfg.j2 there replaces the shipped one, or extends it "
        'with {% extends "default:haproxy.cfg.j2" %} and overrides single blocks.',
        check=validators.directory_or_empty,
    )
    user: str = option(
        "",
        "Unix user HAProxy's workers run as when discoverd runs as root (the master stays "
        "root); empty: nobody. Ignored when not root.",
        check=_name_or_empty,
    )
    group: str = option(
        "",
        "Unix group of HAProxy's workers when discoverd runs as root; empty: the user's own "
        "group (nogroup for nobody on Debian). Ignored when not root.",
        check=_name_or_empty,
    )
    balance: Literal["leastconn", "roundrobin", "random"] = option(
        "leastconn",
        "How a backend picks a server: leastconn, the one with the fewest connections (a "
        "server slow to accept gets fewer new ones instead of a full listen queue); "
        "roundrobin, each in turn; random, the less loaded of two drawn at random.",
    )
    check_interval: str = option(
        "1s", "Interval between two health checks of a server.", check=_time
    )
    retries: int = option(
        3, "Connection retries to a server before giving up (or redispatch).", min=0, max=100
    )
    timeout_connect: str = option(
        "250ms",
        "Timeout of a connection to a server; a connection not made by then is tried again on "
        "another server (retries, redispatch). A handshake takes one round trip: raise it for "
        "servers more than about 200 ms away.",
        check=_time,
    )
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
    httpclient_verify: bool = option(
        False,
        "Whether HAProxy's HTTP client verifies the certificates of HTTPS servers. Lua "
        "scripts (core.httpclient()) and the expert-mode CLI command httpclient use it, and "
        "versions after 2.6 also ACME and OCSP updates; the configuration discoverd renders "
        "uses none of them. Off: the client does not verify, and HAProxy does not read the "
        "system's CA certificates at every start and check (most of the time a check of a "
        "small configuration takes). Turn it on if your template adds something that calls "
        "HTTPS servers through it.",
    )


@dataclass(frozen=True)
class WorkerUser:
    """Who HAProxy's workers run as on this machine: ``user`` and ``group`` (both empty
    unless discoverd runs as root: the workers then run as discoverd's own user)."""

    user: str = ""
    group: str = ""


def worker_user(config: HAProxyConfig, *, is_root: bool | None = None) -> WorkerUser:
    """The :class:`WorkerUser` of ``config`` here (``is_root``: whether discoverd runs as root;
    default: asked). As root the workers never run as root: ``user`` or ``nobody``, ``group``
    or that user's own group. Options set without root are ignored, with a warning.
    ``PluginError`` if the user or group does not exist here."""
    root = os.geteuid() == 0 if is_root is None else is_root
    if not root:
        if config.user or config.group:
            log.warning(
                "haproxy: options user/group (%r/%r) are ignored: discoverd does not run as "
                "root, so HAProxy's workers run as this user",
                config.user,
                config.group,
            )
        return WorkerUser()
    user = config.user or DEFAULT_USER
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PluginError(f"haproxy: option user: no user {user!r} on this host") from None
    group = config.group
    try:
        group = group or grp.getgrgid(entry.pw_gid).gr_name
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise PluginError(
            f"haproxy: option group: no group {group or entry.pw_gid!r} on this host"
        ) from None
    if entry.pw_uid == 0 or gid == 0:
        raise PluginError(
            f"haproxy: options user/group: {user}/{group} is root; HAProxy's workers must run "
            "unprivileged"
        )
    return WorkerUser(user, group)


def with_workers(config: HAProxyConfig, workers: WorkerUser) -> HAProxyConfig:
    """``config`` as templates see it (``settings``): ``user`` and ``group`` are what the
    workers run as here."""
    return dataclasses.replace(config, user=workers.user, group=workers.group)
