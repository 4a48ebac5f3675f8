"""The etcd registry's options (the ``[etcd]`` section), and what is derived from them.

Kept free of the client libraries: the core reads this class whenever the plugin is listed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urlsplit

from discoverd import OptionError, option, validators

DEFAULT_PORT = 2379


def key_prefix(value: str) -> str:
    """A key prefix without trailing slashes; an empty one would claim the whole key space."""
    text = value.strip().rstrip("/")
    if not text:
        raise ValueError("must name a key prefix, e.g. /backends")
    return text


class CredentialsInEndpoint(ValueError):
    """An endpoint written with credentials (``http://user:pass@host``): refused; the message
    shows it redacted."""


def redact(endpoint: str) -> str:
    """``endpoint`` for a message: credentials in it (``user:pass@``) become ``***@``."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "", endpoint
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}{sep}{netloc}{slash}{path}"


def endpoint_url(text: str, tls: bool) -> str:
    """``host:port``, ``[v6]:port``, ``host`` or ``http(s)://host:port`` -> a base URL.

    Without a scheme, https is used when ``tls``; ``tls`` also upgrades an explicit ``http://``.
    ``ValueError`` names the endpoint (credentials redacted) and what is wrong with it."""
    has_scheme = "://" in text
    parts = urlsplit(text if has_scheme else f"//{text}")
    scheme = parts.scheme.lower() if has_scheme else ""
    if "@" in parts.netloc:
        raise CredentialsInEndpoint(
            f"{redact(text)!r}: expected host:port or http(s)://host:port, without credentials "
            "(set user and password)"
        )
    problem = ""
    if has_scheme and scheme not in ("http", "https"):
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
    if problem or host is None:
        raise ValueError(f"{redact(text)!r}: {problem}")
    scheme = "https" if tls or scheme == "https" else "http"
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def endpoint_urls(endpoints: tuple[str, ...], tls: bool) -> tuple[str, ...]:
    """The base URL of every endpoint, in order, without duplicates. An item may itself be a
    comma-separated list (the seed's ``ETCD_HOST``). ``ValueError`` for a bad one, or none."""
    urls: list[str] = []
    for item in endpoints:
        for part in item.split(","):
            text = part.strip()
            if text:
                url = endpoint_url(text, tls)
                if url not in urls:
                    urls.append(url)
    if not urls:
        raise ValueError("no endpoint given (e.g. 127.0.0.1:2379)")
    return tuple(urls)


def _loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class EtcdConfig:
    """The ``[etcd]`` section."""

    endpoints: tuple[str, ...] = option(
        ("127.0.0.1:2379",),
        "etcd client endpoints: host:port or http(s)://host:port, comma separated; "
        "the next one is tried when one fails",
        env=("ETCD_HOST",),
    )
    prefix: str = option(
        "/backends", "Key prefix of the instances (the seed's layout).", check=key_prefix
    )
    meta_prefix: str = option(
        "/discoverd/instances",
        "Key prefix of the instances' metadata (JSON); must lie outside prefix.",
        check=key_prefix,
    )
    claim_prefix: str = option(
        "/discoverd/claims",
        "Key prefix of the frontend-port claims (which service holds which port fleet-wide); "
        "must lie outside prefix and meta_prefix.",
        check=key_prefix,
    )
    ttl: int = option(15, "Lease TTL in seconds: a dead host's entries vanish after it.", min=1)
    timeout: float = option(
        5.0,
        "Deadline of one etcd call, in seconds, failover to the other endpoints included: "
        "an etcd that cannot be reached is reported after it, never waited for longer.",
        check=validators.positive,
    )
    ca_cert: str = option("", "CA bundle to verify etcd's certificate (enables https).")
    cert: str = option("", "Client certificate for TLS (enables https).")
    key: str = option("", "Private key of the client certificate.")
    user: str = option("", "User name, when etcd has authentication enabled.")
    password: str = option("", "Password of user.", secret=True)
    password_file: str = option(
        "",
        "File holding the password of user (its first line; wins over password when not "
        "empty), so that the secret is never in the environment or on a command line.",
        check=validators.readable_file_or_empty,
    )

    def __post_init__(self) -> None:
        # Endpoints are checked here rather than by a field check, which would echo the whole
        # value: an endpoint may carry credentials (refused, and redacted in the message). Nor
        # is the key named for those: the core would add where it was set, and a --set flag's
        # origin quotes the value.
        try:
            endpoint_urls(self.endpoints, self.tls)
        except CredentialsInEndpoint as exc:
            raise OptionError(f"endpoints: {exc}") from None
        except ValueError as exc:
            raise OptionError(f"endpoints: {exc}", "endpoints") from None
        if self.key and not self.cert:
            raise OptionError("key is set but cert is not: give both (client TLS)", "key", "cert")
        if self.password and not self.user:
            raise OptionError("password is set but user is not", "password", "user")
        if self.password_file and not self.user:
            raise OptionError("password_file is set but user is not", "password_file", "user")
        _ = self.auth_password  # read the password file now: a bad one fails at start
        a, b = self.prefix + "/", self.meta_prefix + "/"
        if a.startswith(b) or b.startswith(a):
            raise OptionError(
                f"prefix {self.prefix!r} and meta_prefix {self.meta_prefix!r} overlap: "
                "docker-discover would read the metadata as backends. "
                "Choose two separate prefixes.",
                "prefix",
                "meta_prefix",
            )
        c = self.claim_prefix + "/"
        for name, other in (("prefix", a), ("meta_prefix", b)):
            if c.startswith(other) or other.startswith(c):
                raise OptionError(
                    f"claim_prefix {self.claim_prefix!r} and {name} {other[:-1]!r} overlap: "
                    "claims would be read as instances. Choose separate prefixes.",
                    "claim_prefix",
                    name,
                )

    @cached_property
    def auth_password(self) -> str:
        """The password sent with ``user``: the first line of ``password_file`` when it is
        not empty, else ``password``. Read once, when the configuration is built; no message
        ever quotes it."""
        if not self.password_file:
            return self.password
        try:
            with open(self.password_file, encoding="utf-8") as handle:
                text = handle.read()
        except UnicodeDecodeError:
            # Not the decoder's message: it quotes a byte of the password.
            raise OptionError(
                f"password_file {self.password_file!r}: not UTF-8 text", "password_file"
            ) from None
        except OSError as exc:
            raise OptionError(
                f"password_file {self.password_file!r}: {exc.strerror or exc}", "password_file"
            ) from None
        line = text.split("\n", 1)[0].removesuffix("\r")
        return line or self.password

    @property
    def credentials_in_clear(self) -> tuple[str, ...]:
        """The endpoints that would receive ``user`` and ``password`` over plain http from
        another host (loopback endpoints never leave the machine: not listed)."""
        if not self.user:
            return ()
        return tuple(url for url in self.urls if url.startswith("http://") and not _loopback(url))

    @property
    def tls(self) -> bool:
        """Whether TLS options are set: every endpoint is then dialled with https."""
        return bool(self.ca_cert or self.cert or self.key)

    @property
    def urls(self) -> tuple[str, ...]:
        """The endpoints' base URLs (``https://`` when :attr:`tls`), in order of preference."""
        return endpoint_urls(self.endpoints, self.tls)
