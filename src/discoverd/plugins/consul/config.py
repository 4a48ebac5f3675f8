"""The Consul registry's options (the ``[consul]`` section), read the way Consul's own CLI reads
them, and what is derived from them: the URL, the TLS arguments and the ACL token.

Consul's tools take ``CONSUL_HTTP_ADDR`` (``host:port`` or ``http(s)://host:port``),
``CONSUL_HTTP_SSL`` (use https), ``CONSUL_HTTP_SSL_VERIFY``, ``CONSUL_CACERT``, ``CONSUL_CAPATH``,
``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``, ``CONSUL_HTTP_TOKEN`` and
``CONSUL_HTTP_TOKEN_FILE``; each option names its variable, so the core reads them (after
``DISCOVERD_CONSUL_<KEY>``). Kept free of the client library: the core reads this class
whenever the plugin is listed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urlsplit

from discoverd import OptionError, option, validators

DEFAULT_PORT = 8500
#: Consul refuses DeregisterCriticalServiceAfter below one minute (it silently raises it).
MIN_DEREGISTER_AFTER = 60
MAX_WAIT = 600  # Consul caps a blocking query's wait at 10 minutes
_DATACENTER_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class CredentialsInAddress(ValueError):
    """An address written with credentials (``http://user:pass@host``): refused; the message
    shows it redacted."""


def parse_address(text: str, ssl: bool = False) -> tuple[str, str, int]:
    """``host:port``, ``host``, ``[v6]:port`` or ``http(s)://host:port`` -> (scheme, host, port).

    As with Consul's CLI, ``ssl`` (``CONSUL_HTTP_SSL``) turns the scheme into https; an address
    without a port uses 8500. ``host`` comes back in URL form (IPv6 in brackets). ``ValueError``
    says what is wrong, quoting the address without any credentials it holds.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("address is empty (e.g. 127.0.0.1:8500)")
    has_scheme = "://" in raw
    parts = urlsplit(raw if has_scheme else f"//{raw}")
    shown = _redact(raw, parts.netloc)
    if has_scheme and raw.split("://", 1)[0].lower() == "unix":
        raise ValueError(f"address {shown!r}: unix sockets are not supported")
    if "@" in parts.netloc:
        raise CredentialsInAddress(
            f"address {shown!r}: expected host:port or http(s)://host:port, without credentials "
            "(set token or token_file)"
        )
    scheme = parts.scheme.lower() if has_scheme else "http"
    problem = ""
    if scheme not in ("http", "https"):
        problem = "the scheme must be http or https"
    elif parts.path not in ("", "/") or parts.query or parts.fragment:
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
        raise ValueError(f"address {shown!r}: {problem}")
    if ssl:
        scheme = "https"
    return scheme, (f"[{host}]" if ":" in host else host), port


def _redact(text: str, netloc: str) -> str:
    """``text`` with the credentials of its ``netloc`` (``user:pass@``) replaced by ``***@``."""
    if "@" not in netloc:
        return text
    return text.replace(netloc, "***@" + netloc.rpartition("@")[2], 1)


def token_text(value: str) -> str:
    """An ACL token: printable ASCII without spaces (surrounding whitespace is dropped)."""
    token = value.strip()
    if any(not (32 < ord(c) < 127) for c in token):
        raise ValueError("contains spaces or control characters")
    return token


def kv_prefix_text(value: str) -> str:
    """A KV prefix: without leading or trailing slashes, not empty, printable, no spaces."""
    text = value.strip().strip("/")
    if not text:
        raise ValueError("must name a KV prefix, e.g. discoverd")
    if any(not (32 < ord(c) < 127) for c in text) or "//" in text:
        raise ValueError("must be printable ASCII without spaces or empty path segments")
    return text


def datacenter_name(value: str) -> str:
    text = value.strip()
    if text and not _DATACENTER_RE.fullmatch(text):
        raise ValueError("must match [A-Za-z0-9_.-]{1,64}")
    return text


def deregister_delay(value: int) -> int:
    if 0 < value < MIN_DEREGISTER_AFTER:
        raise ValueError(f"Consul's minimum is {MIN_DEREGISTER_AFTER} seconds (0 turns it off)")
    return value


@dataclass(frozen=True)
class ConsulConfig:
    """The ``[consul]`` section."""

    address: str = option(
        "127.0.0.1:8500",
        "Consul agent HTTP address: host:port or http(s)://host:port (port 8500 if omitted).",
        env=("CONSUL_HTTP_ADDR",),
    )
    ssl: bool = option(
        False, "Use https even when the address has no https:// scheme.", env=("CONSUL_HTTP_SSL",)
    )
    verify: bool = option(
        True,
        "Verify Consul's TLS certificate (false only for tests).",
        env=("CONSUL_HTTP_SSL_VERIFY",),
    )
    ca_file: str = option(
        "",
        "CA bundle to verify Consul's certificate.",
        env=("CONSUL_CACERT",),
        check=validators.readable_file_or_empty,
    )
    ca_path: str = option(
        "",
        "Directory of CA certificates (hashed names, as c_rehash makes them).",
        env=("CONSUL_CAPATH",),
        check=validators.readable_directory_or_empty,
    )
    cert_file: str = option(
        "",
        "Client certificate for TLS.",
        env=("CONSUL_CLIENT_CERT",),
        check=validators.readable_file_or_empty,
    )
    key_file: str = option(
        "",
        "Private key of cert_file.",
        env=("CONSUL_CLIENT_KEY",),
        check=validators.readable_file_or_empty,
    )
    token: str = option(
        "",
        "ACL token (sent as X-Consul-Token).",
        env=("CONSUL_HTTP_TOKEN",),
        check=token_text,
        secret=True,
    )
    token_file: str = option(
        "",
        "File holding the ACL token; wins over token when not empty (as in Consul's CLI).",
        env=("CONSUL_HTTP_TOKEN_FILE",),
        check=validators.readable_file_or_empty,
    )
    datacenter: str = option(
        "", "Datacenter to read (default: the agent's own).", check=datacenter_name
    )
    ttl: int = option(
        15,
        "TTL of each instance's check, in seconds; discoverd passes it every ttl/3 seconds.",
        min=1,
        max=86400,
    )
    deregister_after: int = option(
        60,
        "Seconds a check may stay critical before the agent removes the instance "
        "(Consul's minimum: 60; 0: never).",
        min=0,
        max=10**7,
        check=deregister_delay,
    )
    wait: float = option(
        20.0, "Longest a blocking query is held, in seconds (1 to 600).", min=1, max=MAX_WAIT
    )
    timeout: float = option(5.0, "Timeout of one ordinary request, in seconds.", min=0.1, max=600)
    tag: str = option(
        "",
        "Marker tag: added to every instance registered; the discover side then reads "
        "only instances carrying it.",
        check=validators.tag,
    )
    kv_prefix: str = option(
        "discoverd",
        "KV prefix of the frontend-port claims (which service holds which port fleet-wide); "
        "one per cluster sharing a datacenter.",
        check=kv_prefix_text,
    )

    def __post_init__(self) -> None:
        # The address is checked here rather than by a field check, which would echo the
        # whole value: an address may carry credentials (refused, and redacted here). Nor is
        # the key named for those: the core would add where it was set, and a --set flag's
        # origin quotes the value.
        try:
            _ = self.endpoint
        except CredentialsInAddress as exc:
            raise OptionError(str(exc)) from None
        except ValueError as exc:
            raise OptionError(str(exc), "address") from None
        if self.key_file and not self.cert_file:
            raise OptionError(
                "key_file is set but cert_file is not: give both", "key_file", "cert_file"
            )
        _ = self.acl_token  # read the token file now: a bad one fails at start

    @cached_property
    def endpoint(self) -> tuple[str, str, int]:
        """``(scheme, host, port)`` of the agent: from the address and ``ssl``."""
        return parse_address(self.address, self.ssl)

    @property
    def scheme(self) -> str:
        """``http`` or ``https``."""
        return self.endpoint[0]

    @property
    def host(self) -> str:
        """The agent's host, in URL form (IPv6 in brackets)."""
        return self.endpoint[1]

    @property
    def port(self) -> int:
        return self.endpoint[2]

    @property
    def url(self) -> str:
        """The agent's base URL, e.g. ``http://127.0.0.1:8500``."""
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def tls_verify(self) -> bool | str:
        """What ``requests`` takes as ``verify``: False, the CA file or folder, or True."""
        if not self.verify:
            return False
        return self.ca_file or self.ca_path or True

    @property
    def client_cert(self) -> str | tuple[str, str] | None:
        """What ``requests`` takes as ``cert``: the certificate, with its key when given."""
        if not self.cert_file:
            return None
        return (self.cert_file, self.key_file) if self.key_file else self.cert_file

    @property
    def tls_files_unused(self) -> bool:
        """TLS files are set but the address is plain http: they are not used (Consul's CLI
        ignores them the same way)."""
        return self.scheme == "http" and bool(self.ca_file or self.ca_path or self.cert_file)

    @property
    def token_in_clear(self) -> bool:
        """An ACL token is set and goes over plain http to an agent on another host (the
        usual local agent on a loopback address is not a network hop)."""
        if self.scheme != "http" or not self.acl_token:
            return False
        host = self.host.strip("[]").lower()
        if host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return True

    @cached_property
    def acl_token(self) -> str:
        """The ACL token: the token file's content when it is not empty (as Consul's CLI
        does), else ``token``. Read once, when the configuration is built."""
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as handle:
                    from_file = handle.read()
            except UnicodeDecodeError:
                # Not the decoder's message: it quotes a byte of the token.
                raise OptionError(
                    f"token_file {self.token_file!r}: not UTF-8 text", "token_file"
                ) from None
            except OSError as exc:
                raise OptionError(f"token_file {self.token_file!r}: {exc}", "token_file") from None
            try:
                checked = token_text(from_file)
            except ValueError as exc:
                raise OptionError(f"token_file {self.token_file!r}: {exc}", "token_file") from None
            if checked:
                return checked
        return self.token
