"""The nginx plugin's options (the ``[nginx]`` section, one typed field each), and what they imply
on this machine (:func:`worker_settings`: the workers' user and file limit)."""

from __future__ import annotations

import logging
import os
import re
import resource
from dataclasses import dataclass
from typing import Literal

from discoverd import option, validators

log = logging.getLogger(__name__)

DEFAULT_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
#: nginx's time format: a number and an optional unit (seconds without one).
NGINX_TIME = re.compile(r"[0-9]{1,9}(ms|s|m|h|d)?")
#: Characters that cannot appear in a path nginx reads from the configuration or command line:
#: quotes and backslashes would need escapes, '$' starts a variable, the rest cut a directive.
FORBIDDEN_PATH_CHARS = "'\"\\$;{}#\n\r\0"
_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")

_time = validators.duration_text(NGINX_TIME, "nginx's", positive=True)
_time_or_zero = validators.duration_text(NGINX_TIME, "nginx's", positive=False)


def _executable(value: str) -> str:
    text = validators.one_line(value)
    if not text:
        raise ValueError("must name the nginx executable")
    return text


def _user_and_group(value: str) -> str:
    parts = validators.one_line(value).split()
    if len(parts) > 2 or not all(_USER_RE.fullmatch(p) for p in parts):
        raise ValueError("must be a user name, optionally followed by a group name")
    return " ".join(parts)


def _worker_count(value: str) -> str:
    text = validators.one_line(value)
    if text == "auto":
        return text
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise ValueError("must be auto or a whole number from 1 to 1024")
    return str(int(text))


def _module_path(value: str) -> str:
    text = validators.one_line(value)
    if text and (not text.startswith("/") or set(text) & set(FORBIDDEN_PATH_CHARS) or " " in text):
        raise ValueError("must be an absolute path without quotes, spaces, '$' or ';'")
    return text


@dataclass(frozen=True)
class NginxConfig:
    """The ``[nginx]`` section."""

    binary: str = option(
        "nginx", "The nginx executable (a name on PATH or a path).", check=_executable
    )
    bind: str = option(
        "",
        "Address the service frontends listen on; empty: every interface (as the seed did).",
        check=validators.ip_or_empty,
    )
    status_bind: str = option(
        "127.0.0.1", "Address of the status page.", check=validators.ip_or_empty
    )
    status_port: int = option(
        1937,
        "Port of the status page; 0 disables it. Left out while another process holds the "
        "port (the services are served all the same).",
        min=0,
        max=65535,
    )
    template_dir: str = option(
        "",
        "Folder of user templates: a nginx.conf.j2 there replaces the shipped one, or extends it "
        'with {% extends "default:nginx.conf.j2" %} and overrides single blocks.',
        check=validators.directory_or_empty,
    )
    user: str = option(
        "",
        "Unix user (and group: 'user group') nginx's workers run as when discoverd runs as "
        "root; empty: nginx's own default (nobody). Ignored when not root.",
        check=_user_and_group,
    )
    balance: Literal["roundrobin", "leastconn", "random"] = option(
        "roundrobin",
        "How an upstream picks a server: roundrobin, each in turn; leastconn, the one with the "
        "fewest active connections (fewer held requests, but a dying server draws more: see "
        "docs/nginx.md); random, the less loaded of two drawn at random. Each worker counts "
        "its own connections.",
    )
    max_fails: int = option(
        1, "Failed attempts before a server is skipped (0: never skipped).", min=0, max=1000
    )
    fail_timeout: str = option("5s", "How long a failed server is skipped, e.g. 5s.", check=_time)
    connect_timeout: str = option("1s", "Timeout of a connection to a server.", check=_time)
    next_upstream_tries: int = option(
        3,
        "Servers tried for one request or connection before giving up (0: every server).",
        min=0,
        max=100,
    )
    proxy_timeout: str = option("30s", "Inactivity timeout on the server side.", check=_time)
    client_timeout: str = option("30s", "Inactivity timeout on the client side.", check=_time)
    keepalive_timeout: str = option(
        "60s", "Idle HTTP keep-alive with clients; 0 disables it.", check=_time_or_zero
    )
    upstream_keepalive: int = option(
        16,
        "Idle HTTP keep-alive connections each worker keeps per service; 0 disables them.",
        min=0,
        max=100_000,
    )
    worker_processes: str = option(
        "auto", "Number of workers, or auto (one per core).", check=_worker_count
    )
    worker_connections: int = option(
        4096, "Connections per worker (clients and servers).", min=16, max=1_000_000
    )
    reload_interval: float = option(
        1.0,
        "At most one reload per this many seconds; changes meanwhile are batched.",
        min=0,
        max=3600,
    )
    drain_timeout: str = option(
        "10s",
        "How long old workers may finish their connections after a reload "
        "(worker_shutdown_timeout).",
        check=_time,
    )
    stream_module: str = option(
        DEFAULT_STREAM_MODULE,
        "The stream module loaded when a tcp or udp service exists; empty when it is built in.",
        check=_module_path,
    )


@dataclass(frozen=True)
class WorkerSettings:
    """What nginx's workers run as on this machine, derived from the options: ``user`` and
    ``group`` (empty unless discoverd runs as root and the ``user`` option is set) and
    ``rlimit_nofile``, the ``worker_rlimit_nofile`` to render (0: none) so that
    ``worker_connections`` fit."""

    user: str = ""
    group: str = ""
    rlimit_nofile: int = 0


def worker_settings(config: NginxConfig, *, is_root: bool | None = None) -> WorkerSettings:
    """The :class:`WorkerSettings` of ``config`` here (``is_root``: whether discoverd runs as
    root; default: asked). A ``user`` set without root is ignored, with a warning."""
    root = os.geteuid() == 0 if is_root is None else is_root
    parts = config.user.split()
    if parts and not root:
        log.warning(
            "nginx: option user=%r is ignored: discoverd does not run as root, so nginx's "
            "workers run as this user",
            config.user,
        )
        parts = []
    user, group = (parts[0], parts[1] if len(parts) > 1 else "") if parts else ("", "")
    return WorkerSettings(user, group, _rlimit_for(config.worker_connections, root))


def _rlimit_for(worker_connections: int, is_root: bool) -> int:
    """``worker_rlimit_nofile`` so a worker can hold its connections (two descriptors each when
    proxying); 0 when the current limit is enough. Without root it cannot exceed the hard limit."""
    wanted = 2 * worker_connections + 64
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 0
    if soft == resource.RLIM_INFINITY or wanted <= soft:
        return 0
    if not is_root and hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    return wanted if wanted > soft else 0
