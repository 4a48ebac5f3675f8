"""Rules for option values, to pass as ``option(..., check=...)``.

Each rule takes a value already converted to the field's type and returns it (possibly
normalised), or raises ``ValueError`` with the rule it breaks; the core adds the key, the value
and where it was set::

    bind: str = option("", "Frontend address; empty: every interface.", check=ip_or_empty)
    timeout: str = option("1s", "...", check=duration_text(HAPROXY_TIME, "HAProxy's"))
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path

from discoverd.core.errors import ValidationError
from discoverd.core.metadata import check_meta_key_names, parse_service_images
from discoverd.core.model import INSTANCE_ID_RE, PortRanges, check_address, check_tag


def one_line(value: str) -> str:
    """Printable text on one line, stripped."""
    if not value.isprintable():
        raise ValueError("must not contain line breaks or control characters")
    return value.strip()


def not_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def positive(value: float) -> float:
    """A number above zero."""
    if not value > 0:
        raise ValueError("must be above zero")
    return value


def ip_address(value: str) -> str:
    """An IP address, normalised."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError("must be an IP address") from None


def ip_or_empty(value: str) -> str:
    """An IP address, normalised; ``""`` (every interface, or unset) when empty."""
    text = one_line(value)
    if not text:
        return ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError("must be an IP address (or empty for every interface)") from None


def host_address(value: str) -> str:
    """An address other hosts can reach (the model's rules: no unspecified, link-local,
    multicast or broadcast address), or ``""``."""
    if not value:
        return ""
    try:
        return check_address(value)
    except ValidationError as exc:
        raise ValueError(str(exc)) from None


def port_ranges(value: str) -> str:
    """Ports as ranges (``8000-8999,9100``), normalised."""
    try:
        return str(PortRanges.parse(one_line(value)))
    except ValidationError as exc:
        raise ValueError(str(exc)) from None


def service_images(value: tuple[str, ...]) -> tuple[str, ...]:
    """``SERVICE=REPOSITORY`` entries (``web=registry.example.com/team/web``, or a folder of
    repositories: ``web=registry.example.com/team/*``)."""
    parse_service_images(value)
    pairs = (entry.partition("=") for entry in value)
    return tuple(f"{name.strip()}={pattern.strip()}" for name, _, pattern in pairs)


def meta_keys(value: tuple[str, ...]) -> tuple[str, ...]:
    """Metadata key names (``weight``), lower case."""
    return check_meta_key_names(value)


def host_id(value: str) -> str:
    if value and not INSTANCE_ID_RE.fullmatch(value):
        raise ValueError("only letters, digits and _.:- allowed")
    return value


def tag(value: str) -> str:
    text = value.strip()
    if text:
        try:
            check_tag(text)
        except ValidationError as exc:
            raise ValueError(str(exc)) from None
    return text


def directory_or_empty(value: str) -> str:
    """An existing directory, or ``""``."""
    text = one_line(value)
    if text and not Path(text).is_dir():
        raise ValueError("is not a directory")
    return text


def readable_file_or_empty(value: str) -> str:
    """A readable file, or ``""``."""
    text = value.strip()
    if text and not (os.path.isfile(text) and os.access(text, os.R_OK)):
        raise ValueError("no such readable file")
    return text


def readable_directory_or_empty(value: str) -> str:
    text = value.strip()
    if text and not (os.path.isdir(text) and os.access(text, os.R_OK)):
        raise ValueError("no such readable directory")
    return text


def matches(pattern: str | re.Pattern[str], rule: str) -> Callable[[str], str]:
    """Text matching ``pattern`` entirely (stripped); ``rule`` says what it must be."""
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern

    def check(value: str) -> str:
        text = value.strip()
        if not compiled.fullmatch(text):
            raise ValueError(rule)
        return text

    return check


def duration_text(
    pattern: str | re.Pattern[str], flavour: str, *, positive: bool = True
) -> Callable[[str], str]:
    """A duration written for a proxy (``500ms``, ``2s``) matching ``pattern``; ``flavour``
    names the format in the rule ("HAProxy's"); with ``positive``, zero is refused."""
    shape = matches(pattern, f"must be a duration in {flavour} format, e.g. 500ms, 2s, 1m")

    def check(value: str) -> str:
        text = shape(one_line(value))
        digits = re.match(r"\d+", text)
        if positive and digits is not None and int(digits.group()) == 0:
            raise ValueError("must be longer than zero")
        return text

    return check


def listen_address(value: str) -> str:
    """``host:port`` (``[v6]:port``) of a listener, with an IP address and a port from 1 to
    65535; ``""`` for none."""
    text = one_line(value)
    if not text:
        return ""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("must be host:port, e.g. 127.0.0.1:9275 (or empty for none)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("must name an IP address, e.g. 127.0.0.1:9275") from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{int(port)}"
