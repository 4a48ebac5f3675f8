"""How to reach Consul: address, scheme, TLS and token, read the way Consul's own CLI reads them.

Consul's tools take ``CONSUL_HTTP_ADDR`` (``host:port`` or ``http(s)://host:port``),
``CONSUL_HTTP_SSL`` (use https), ``CONSUL_HTTP_SSL_VERIFY``, ``CONSUL_CACERT``, ``CONSUL_CAPATH``,
``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``, ``CONSUL_HTTP_TOKEN`` and
``CONSUL_HTTP_TOKEN_FILE``. The plugin's options list those as extra environment names, so the
core's configuration loader already hands them over here; this module only checks and combines
the values (pure, no network).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from discoverd import PluginError, ValidationError
from discoverd.core.model import check_tag

log = logging.getLogger("discoverd.consul")

DEFAULT_PORT = 8500
#: Consul refuses DeregisterCriticalServiceAfter below one minute (it silently raises it).
MIN_DEREGISTER_AFTER = 60
MAX_WAIT = 600  # Consul caps a blocking query's wait at 10 minutes
_DATACENTER_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def parse_address(text: str, ssl: bool = False) -> tuple[str, str, int]:
    """``host:port``, ``host``, ``[v6]:port`` or ``http(s)://host:port`` -> (scheme, host, port).

    As with Consul's CLI, ``ssl`` (``CONSUL_HTTP_SSL``) turns the scheme into https; an address
    without a port uses 8500. ``host`` comes back in URL form (IPv6 in brackets).
    """
    raw = text.strip()
    if not raw:
        raise PluginError("consul option address: empty (e.g. 127.0.0.1:8500)")
    has_scheme = "://" in raw
    if has_scheme and raw.split("://", 1)[0].lower() == "unix":
        raise PluginError(f"consul option address={text!r}: unix sockets are not supported")
    parts = urlsplit(raw if has_scheme else f"//{raw}")
    scheme = parts.scheme.lower() if has_scheme else "http"
    problem = ""
    if scheme not in ("http", "https"):
        problem = "the scheme must be http or https"
    elif parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        problem = "expected host:port or http(s)://host:port, nothing more"
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        problem = problem or "the port is not a number from 1 to 65535"
        port = DEFAULT_PORT
    host = parts.hostname
    if not host:
        problem = problem or "no host"
    if problem or not host:
        raise PluginError(f"consul option address={text!r}: {problem}")
    if ssl:
        scheme = "https"
    return scheme, (f"[{host}]" if ":" in host else host), port


def _readable_file(option: str, path: str, directory: bool = False) -> str:
    if not path:
        return ""
    ok = os.path.isdir(path) if directory else os.path.isfile(path)
    if not ok or not os.access(path, os.R_OK):
        kind = "directory" if directory else "file"
        raise PluginError(f"consul option {option}={path!r}: no such readable {kind}")
    return path


def _token_from(token: str, token_file: str) -> str:
    """The ACL token: the file's content when ``token_file`` is set (as Consul's CLI does)."""
    if token_file:
        _readable_file("token_file", token_file)
        try:
            with open(token_file, encoding="utf-8") as handle:
                from_file = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise PluginError(f"consul option token_file={token_file!r}: {exc}") from None
        if from_file:
            token = from_file
    token = token.strip()
    if any(not (32 < ord(c) < 127) for c in token):
        raise PluginError("consul option token: contains spaces or control characters")
    return token


def _seconds(option: str, value: Any, low: float, high: float, whole: bool = False) -> float:
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PluginError(f"consul option {option}={value!r}: must be {kind} of seconds")
    if whole and value != int(value):
        raise PluginError(f"consul option {option}={value!r}: must be {kind} of seconds")
    if not low <= value <= high:
        raise PluginError(f"consul option {option}={value!r}: must be from {low:g} to {high:g}")
    return float(value)


@dataclass(frozen=True)
class ConsulSettings:
    """Everything the registry needs, checked. Build it with :meth:`from_options`."""

    scheme: str = "http"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str = ""
    verify: bool | str = True
    cert: str | tuple[str, str] | None = None
    datacenter: str = ""
    timeout: float = 5.0
    ttl: int = 15
    deregister_after: int = 60
    wait: float = 20.0
    tag: str = ""

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ConsulSettings:
        """Check and combine the plugin's options (see ``OPTIONS``); ``PluginError`` names the
        offending key."""
        scheme, host, port = parse_address(
            str(options.get("address", "")), bool(options.get("ssl", False))
        )
        ca_file = _readable_file("ca_file", str(options.get("ca_file", "")))
        ca_path = _readable_file("ca_path", str(options.get("ca_path", "")), directory=True)
        cert_file = _readable_file("cert_file", str(options.get("cert_file", "")))
        key_file = _readable_file("key_file", str(options.get("key_file", "")))
        if key_file and not cert_file:
            raise PluginError("consul option key_file is set but cert_file is not: give both")
        verify: bool | str = bool(options.get("verify", True))
        if verify:
            verify = ca_file or ca_path or True
        cert: str | tuple[str, str] | None = None
        if cert_file:
            cert = (cert_file, key_file) if key_file else cert_file
        if scheme == "http" and (ca_file or ca_path or cert_file):
            log.warning(
                "consul: TLS files are set but the address %s://%s:%d is plain http; they are "
                "not used (set ssl = true or an https:// address)",
                scheme,
                host,
                port,
            )
        datacenter = str(options.get("datacenter", "")).strip()
        if datacenter and not _DATACENTER_RE.fullmatch(datacenter):
            raise PluginError(
                f"consul option datacenter={datacenter!r}: must match [A-Za-z0-9_.-]{{1,64}}"
            )
        tag = str(options.get("tag", "")).strip()
        if tag:
            try:
                check_tag(tag)
            except ValidationError as exc:
                raise PluginError(f"consul option tag: {exc}") from None
        ttl = int(_seconds("ttl", options.get("ttl", 15), 1, 86400, whole=True))
        after = int(
            _seconds("deregister_after", options.get("deregister_after", 60), 0, 10**7, True)
        )
        if 0 < after < MIN_DEREGISTER_AFTER:
            raise PluginError(
                f"consul option deregister_after={after}: Consul's minimum is "
                f"{MIN_DEREGISTER_AFTER} seconds (0 turns it off)"
            )
        return cls(
            scheme=scheme,
            host=host,
            port=port,
            token=_token_from(str(options.get("token", "")), str(options.get("token_file", ""))),
            verify=verify,
            cert=cert,
            datacenter=datacenter,
            timeout=_seconds("timeout", options.get("timeout", 5.0), 0.1, 600),
            ttl=ttl,
            deregister_after=after,
            wait=_seconds("wait", options.get("wait", 20.0), 1, MAX_WAIT),
            tag=tag,
        )
