"""The nginx plugin's options: their schema, and their validation at factory time."""

from __future__ import annotations

import logging
import os
import re
import resource
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discoverd import Option, OptionReader, PluginError

log = logging.getLogger(__name__)

DEFAULT_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

OPTIONS: tuple[Option, ...] = (
    Option("binary", str, "nginx", "The nginx executable (a name on PATH or a path)."),
    Option(
        "bind",
        str,
        "",
        "Address the service frontends listen on; empty: every interface (as the seed did).",
    ),
    Option("status_bind", str, "127.0.0.1", "Address of the status page."),
    Option("status_port", int, 1937, "Port of the status page; 0 disables it."),
    Option(
        "template_dir",
        str,
        "",
        "Folder of user templates: a nginx.conf.j2 there replaces the shipped one, or extends it "
        'with {% extends "default:nginx.conf.j2" %} and overrides single blocks.',
    ),
    Option(
        "user",
        str,
        "",
        "Unix user (and group: 'user group') nginx's workers run as when discoverd runs as "
        "root; empty: nginx's own default (nobody). Ignored when not root.",
    ),
    Option("max_fails", int, 1, "Failed attempts before a server is skipped (0: never skipped)."),
    Option("fail_timeout", str, "5s", "How long a failed server is skipped, e.g. 5s."),
    Option("connect_timeout", str, "1s", "Timeout of a connection to a server."),
    Option(
        "next_upstream_tries",
        int,
        3,
        "Servers tried for one request or connection before giving up (0: every server).",
    ),
    Option("proxy_timeout", str, "30s", "Inactivity timeout on the server side."),
    Option("client_timeout", str, "30s", "Inactivity timeout on the client side."),
    Option("keepalive_timeout", str, "60s", "Idle HTTP keep-alive with clients; 0 disables it."),
    Option(
        "upstream_keepalive",
        int,
        16,
        "Idle HTTP keep-alive connections each worker keeps per service; 0 disables them.",
    ),
    Option("worker_processes", str, "auto", "Number of workers, or auto (one per core)."),
    Option("worker_connections", int, 4096, "Connections per worker (clients and servers)."),
    Option(
        "reload_interval",
        float,
        1.0,
        "At most one reload per this many seconds; changes meanwhile are batched.",
    ),
    Option(
        "drain_timeout",
        str,
        "10s",
        "How long old workers may finish their connections after a reload "
        "(worker_shutdown_timeout).",
    ),
    Option(
        "stream_module",
        str,
        DEFAULT_STREAM_MODULE,
        "The stream module loaded when a tcp or udp service exists; empty when it is built in.",
    ),
)

# nginx's time format: a number and an optional unit (seconds without one).
_TIME_RE = re.compile(r"[0-9]{1,9}(ms|s|m|h|d)?")
_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
# Characters that cannot appear in a path nginx reads from the configuration or command line:
# quotes and backslashes would need escapes, '$' starts a variable, the rest cut a directive.
_BAD_PATH_CHARS = frozenset("'\"\\$;{}#\n\r\0")


@dataclass(frozen=True)
class Settings:
    """Validated options of one nginx proxy (plus what they imply on this machine)."""

    binary: str = "nginx"
    bind: str = ""
    status_bind: str = "127.0.0.1"
    status_port: int = 1937
    template_dir: str = ""
    #: Worker user and group; empty unless discoverd runs as root and the option is set.
    user: str = ""
    group: str = ""
    max_fails: int = 1
    fail_timeout: str = "5s"
    connect_timeout: str = "1s"
    next_upstream_tries: int = 3
    proxy_timeout: str = "30s"
    client_timeout: str = "30s"
    keepalive_timeout: str = "60s"
    upstream_keepalive: int = 16
    worker_processes: str = "auto"
    worker_connections: int = 4096
    reload_interval: float = 1.0
    drain_timeout: str = "10s"
    stream_module: str = DEFAULT_STREAM_MODULE
    #: ``worker_rlimit_nofile`` to render (0: none), so ``worker_connections`` fit.
    rlimit_nofile: int = 0


def _path(read: OptionReader, name: str, default: str) -> str:
    value = read.text(name, default)
    if value and (not value.startswith("/") or set(value) & _BAD_PATH_CHARS or " " in value):
        raise read.fail(name, value, "must be an absolute path without quotes, spaces, '$' or ';'")
    return value


def _user(read: OptionReader, is_root: bool) -> tuple[str, str]:
    value = read.text("user", "")
    parts = value.split()
    if len(parts) > 2 or not all(_USER_RE.fullmatch(p) for p in parts):
        raise read.fail("user", value, "must be a user name, optionally followed by a group name")
    if parts and not is_root:
        log.warning(
            "nginx: option user=%r is ignored: discoverd does not run as root, so nginx's "
            "workers run as this user",
            value,
        )
        return "", ""
    return (parts[0], parts[1] if len(parts) > 1 else "") if parts else ("", "")


def _workers(read: OptionReader) -> str:
    value = read.text("worker_processes", "auto")
    if value == "auto":
        return value
    if not value.isdigit() or not 1 <= int(value) <= 1024:
        raise read.fail("worker_processes", value, "must be auto or a whole number from 1 to 1024")
    return str(int(value))


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


def _time(read: OptionReader, name: str, default: str, *, positive: bool = True) -> str:
    return read.duration(name, default, _TIME_RE, "nginx's", positive)


def parse_settings(options: Mapping[str, Any], *, is_root: bool | None = None) -> Settings:
    """Check every option; raise ``PluginError`` naming the first bad one and its rule."""
    read = OptionReader("nginx", options)
    known = {o.name for o in OPTIONS}
    unknown = sorted(set(options) - known)
    if unknown:
        raise PluginError(
            f"unknown nginx option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    root = os.geteuid() == 0 if is_root is None else is_root
    binary = read.text("binary", "nginx")
    if not binary:
        raise read.fail("binary", binary, "must name the nginx executable")
    template_dir = read.text("template_dir", "")
    if template_dir and not Path(template_dir).is_dir():
        raise read.fail("template_dir", template_dir, "is not a directory")
    user, group = _user(read, root)
    worker_connections = read.number("worker_connections", 4096, 16, 1_000_000)
    return Settings(
        binary=binary,
        bind=read.address("bind", ""),
        status_bind=read.address("status_bind", "127.0.0.1"),
        status_port=read.number("status_port", 1937, 0, 65535),
        template_dir=template_dir,
        user=user,
        group=group,
        max_fails=read.number("max_fails", 1, 0, 1000),
        fail_timeout=_time(read, "fail_timeout", "5s"),
        connect_timeout=_time(read, "connect_timeout", "1s"),
        next_upstream_tries=read.number("next_upstream_tries", 3, 0, 100),
        proxy_timeout=_time(read, "proxy_timeout", "30s"),
        client_timeout=_time(read, "client_timeout", "30s"),
        keepalive_timeout=_time(read, "keepalive_timeout", "60s", positive=False),
        upstream_keepalive=read.number("upstream_keepalive", 16, 0, 100_000),
        worker_processes=_workers(read),
        worker_connections=worker_connections,
        reload_interval=read.seconds("reload_interval", 1.0, 3600.0),
        drain_timeout=_time(read, "drain_timeout", "10s"),
        stream_module=_path(read, "stream_module", DEFAULT_STREAM_MODULE),
        rlimit_nofile=_rlimit_for(worker_connections, root),
    )


def check_state_dir(path: Path) -> Path:
    """The plugin's state directory, refused when nginx could not use paths inside it."""
    text = str(path)
    bad = sorted(set(text) & _BAD_PATH_CHARS)
    if bad or not text.isprintable():
        shown = ", ".join(repr(c) for c in bad) or "a control character"
        raise PluginError(
            f"state directory {text!r} contains {shown}, which cannot appear in nginx's "
            "command line or configuration; choose another state_dir"
        )
    return path
