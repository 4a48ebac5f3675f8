"""The data model shared by every role and plugin.

Everything here is plain, frozen and validated at construction: a value that reaches a proxy
configuration has passed these checks, whichever source or registry it came from.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from discoverd.core.errors import ValidationError

Protocol = Literal["tcp", "udp"]
Mode = Literal["http", "tcp"]
#: The core option ``default_mode``: ``auto`` (detected: http when the instances answer in
#: HTTP/1), or a mode forced on every service whose instances carry no ``mode`` label.
ModeSetting = Literal["auto", "http", "tcp"]

SERVICE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}")
TAG_RE = re.compile(r"[A-Za-z0-9_.:=/+-]{1,128}")
META_KEY_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
META_VALUE_MAX = 256
# Characters that must never reach a rendered configuration through a metadata value.
_FORBIDDEN_IN_VALUES = set("\n\r\0{}\"'`;#\\")
_FORBIDDEN_IN_VALUES_RE = re.compile("[" + re.escape("".join(sorted(_FORBIDDEN_IN_VALUES))) + "]")


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_service_name(name: str) -> str:
    if not isinstance(name, str) or not SERVICE_NAME_RE.fullmatch(name):
        raise ValidationError(f"service name {_short(name)} must match [a-z0-9][a-z0-9_.-]{{0,62}}")
    return name


def check_port(port: object, what: str = "port") -> int:
    if type(port) is int and 1 <= port <= 65535:  # the common case, first
        return port
    if isinstance(port, bool):
        raise ValidationError(f"{what} {_short(port)} must be a number from 1 to 65535")
    if isinstance(port, str):
        if not (port.isascii() and port.isdigit()):  # str.isdigit() is true for "²"
            raise ValidationError(f"{what} {_short(port)} must be a number from 1 to 65535")
        port = int(port)
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValidationError(f"{what} {_short(port)} must be a number from 1 to 65535")
    return port


def check_address(address: str) -> str:
    """An IPv4 or IPv6 literal that can be a backend on some host, normalised.

    Host names are not accepted (proxies must not resolve them), nor addresses that mean
    something else on every host that reads them: unspecified (``0.0.0.0/8``, ``::``),
    link-local (``169.254.0.0/16`` with the cloud metadata service, ``fe80::/10``), multicast
    and broadcast, also written as IPv4-mapped IPv6 (``::ffff:169.254.169.254``). Loopback is
    accepted here: whether a proxy may use it depends on who registered it
    (:func:`check_backend_address`)."""
    if isinstance(address, str):
        return _checked_address(address)
    return _check_address(address)


@functools.lru_cache(maxsize=8192)
def _checked_address(address: str) -> str:
    # A registry of 10,000 instances holds few distinct host addresses: parse each once.
    return _check_address(address)


_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _check_address(address: str) -> str:
    try:
        parsed = ipaddress.ip_address(address)
    except (ValueError, TypeError):
        raise ValidationError(f"address {_short(address)} is not an IP address") from None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.scope_id is not None:
        # A scope id may hold any text but '%' and '/': spaces and proxy keywords included.
        raise ValidationError(f"address {_short(address)}: IPv6 scope ids are not accepted")
    kind = _unusable_kind(parsed)
    if kind:
        raise ValidationError(
            f"address {parsed} is {kind}: it means another machine on every host that reads "
            "it, never a backend"
        )
    return str(parsed)


def _unusable_kind(parsed: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What makes ``parsed`` unusable as a backend address anywhere ("" if nothing)."""
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    if parsed.is_unspecified or (
        isinstance(parsed, ipaddress.IPv4Address) and parsed in _THIS_NETWORK
    ):
        return "unspecified (0.0.0.0/8, ::)"
    if parsed.is_link_local:
        return "link-local (169.254.0.0/16, fe80::/10)"
    if parsed.is_multicast:
        return "multicast"
    if parsed == _BROADCAST:
        return "the broadcast address"
    return ""


def is_loopback(address: str) -> bool:
    """``127.0.0.0/8``, ``::1`` (also IPv4-mapped: ``::ffff:127.0.0.1``); False for anything
    that is not an IP address."""
    try:
        parsed = ipaddress.ip_address(address)
    except (ValueError, TypeError):
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped.is_loopback
    return parsed.is_loopback


def check_backend_address(
    address: str, *, host_id: str, own_host_id: str, single_machine: bool = False
) -> str:
    """``address`` normalised, if a proxy on the host ``own_host_id`` may send traffic to it for
    an instance the host ``host_id`` registered; ``ValidationError`` with the rule otherwise.

    The rules of :func:`check_address` (no unspecified, link-local, multicast or broadcast
    address), and loopback only for the host's own instances: ``127.0.0.1`` written into the
    registry by another host (or by anyone, with no host id) would reach this host's own
    services. ``single_machine`` (every agent runs on one machine: tests, demos) accepts
    loopback from any host id. A pure function: the register role and the discover role
    (``build_services``) both apply it."""
    checked = check_address(address)
    if not single_machine and is_loopback(checked) and not (host_id and host_id == own_host_id):
        owner = f"host {host_id}" if host_id else "a host that did not say which"
        raise ValidationError(
            f"address {checked} is loopback and was registered by {owner}, not by this host "
            f"({own_host_id or 'no host id'}): it would reach this host's own services; "
            "refused (core option single_machine accepts it when every agent runs on one "
            "machine)"
        )
    return checked


#: The metadata key of an instance's container address: ``IP:PORT`` where the application
#: listens on its own host (the container's address and its private port), without the
#: published port's forwarder (docker-proxy). Set by the register side (the source), never from
#: a label: :data:`INTERNAL_META_KEYS` cannot be published by the metadata rules nor named in
#: the core option ``meta_keys``. Used only by the discover role of the instance's own host.
CONTAINER_ADDRESS_KEY = "container_address"
#: The metadata key of the proxy mode the register role found the instance's application
#: speaks (``http``: it answered in HTTP/1; ``tcp``: anything else), beside the operator's own
#: ``mode`` (label ``SERVICE_MODE``), which wins. See ``core.assignment.service_mode``.
DETECTED_MODE_KEY = "detected_mode"
#: Metadata keys the core or a source sets itself, never taken from labels or variables.
INTERNAL_META_KEYS = frozenset({CONTAINER_ADDRESS_KEY, DETECTED_MODE_KEY})


def format_endpoint(address: str, port: int) -> str:
    """``IP:PORT``, IPv6 in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def check_container_address(value: str) -> tuple[str, int]:
    """``(address, port)`` of a container address (metadata ``container_address``), written
    ``IP:PORT`` or ``[IPv6]:PORT`` in canonical form (no spaces, no leading zeros);
    ``ValidationError`` with the rule otherwise.

    The rules of :func:`check_address` (no unspecified, link-local, multicast or broadcast
    address), and no loopback: on the discover host, ``127.0.0.1`` is that host's own services,
    never a container's."""
    if not isinstance(value, str) or len(value) > 64:
        raise ValidationError(f"container address {_short(value)} is not IP:PORT")
    address, port = parse_endpoint(value)
    if is_loopback(address):
        raise ValidationError(
            f"container address {address} is loopback: on the discover host it reaches that "
            "host's own services, never a container"
        )
    canonical = format_endpoint(address, port)
    if value != canonical:
        raise ValidationError(
            f"container address {_short(value)} is not written in canonical form ({canonical})"
        )
    return address, port


def container_endpoint(instance: ServiceInstance) -> tuple[str, int] | None:
    """The instance's container address (metadata ``container_address``), ``None`` when it
    has none; ``ValidationError`` when the value breaks :func:`check_container_address`."""
    for key, value in instance.meta:
        if key == CONTAINER_ADDRESS_KEY:
            return check_container_address(value)
    return None


def with_container_address(instance: ServiceInstance, address: str, port: int) -> ServiceInstance:
    """``instance`` with its container address (``address``, the container's own IP, and
    ``port``, the port the application listens on inside it) in its metadata, for the discover
    role of its own host (see ``local_direct``). A source calls it; ``ValidationError`` when
    the address breaks :func:`check_container_address`."""
    value = format_endpoint(check_address(address), check_port(port))
    check_container_address(value)
    meta = {**instance.meta_dict, CONTAINER_ADDRESS_KEY: value}
    return dataclasses.replace(instance, meta=frozen_meta(meta))


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
        raise ValidationError(f"tag {_short(tag)} must match [A-Za-z0-9_.:=/+-]{{1,128}}")
    return tag


def check_meta(key: str, value: str) -> tuple[str, str]:
    if not isinstance(key, str) or not META_KEY_RE.fullmatch(key):
        raise ValidationError(f"metadata key {_short(key)} must match [a-z0-9][a-z0-9_-]{{0,62}}")
    if not isinstance(value, str):
        raise ValidationError(f"metadata value for {key!r} must be text")
    if len(value) > META_VALUE_MAX:
        raise ValidationError(
            f"metadata value for {key!r} is {len(value)} characters long (at most {META_VALUE_MAX})"
        )
    bad = sorted(set(value) & _FORBIDDEN_IN_VALUES)
    if bad or not value.isprintable():
        shown = ", ".join(repr(c) for c in bad) or "a control character"
        raise ValidationError(f"metadata value for {key!r} contains {shown}")
    return key, value


@functools.lru_cache(maxsize=4096)
def _valid_service_name(name: str) -> bool:
    return SERVICE_NAME_RE.fullmatch(name) is not None


@functools.lru_cache(maxsize=1024)
def _valid_host_id(host_id: str) -> bool:
    return INSTANCE_ID_RE.fullmatch(host_id) is not None


@functools.lru_cache(maxsize=1024)
def _valid_meta_key(key: str) -> bool:
    return META_KEY_RE.fullmatch(key) is not None


def _valid_meta(key: str, value: str) -> bool:
    """``check_meta(key, value)`` passes, for a text ``key`` and ``value``: the same rules
    without building an error. Keys repeat (a cache); values often do not (a container's own
    address): they are checked in C, not cached."""
    return (
        _valid_meta_key(key)
        and len(value) <= META_VALUE_MAX
        and value.isprintable()
        and _FORBIDDEN_IN_VALUES_RE.search(value) is None
    )


def check_path(path: str) -> str:
    """An HTTP check path: absolute, printable ASCII without spaces."""
    if not (path.startswith("/") and len(path) <= 200 and path.isascii() and path.isprintable()):
        raise ValidationError(f"check path {path[:40]!r} must start with / (printable ASCII)")
    if any(c.isspace() for c in path):
        raise ValidationError(f"check path {path[:40]!r} must not contain spaces")
    return path


@dataclass(frozen=True, order=True)
class ServiceInstance:
    """One reachable endpoint of a service, as registered by one host.

    ``id`` is unique within the service across all hosts (the register role builds it from the host
    id, the container id, the private port and the protocol). ``frontend_port`` is the port clients
    dial on their local proxy; ``None`` means the registry did not say.
    """

    service: str
    id: str
    address: str
    port: int
    protocol: Protocol = "tcp"
    frontend_port: int | None = None
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    host_id: str = ""

    def __post_init__(self) -> None:
        # The same rules as the check_* functions; the values that repeat (names, host ids,
        # metadata pairs) are looked up in small caches of values that passed: a registry of
        # 10,000 instances holds few of each.
        if not (type(self.service) is str and _valid_service_name(self.service)):
            check_service_name(self.service)
        valid_id = isinstance(self.id, str) and INSTANCE_ID_RE.fullmatch(self.id)
        if not valid_id or self.id == "port":
            raise ValidationError(
                f"instance id {_short(self.id)} must match [A-Za-z0-9][A-Za-z0-9_.:-]{{0,199}}"
                " and not be 'port'"
            )
        object.__setattr__(self, "address", check_address(self.address))
        object.__setattr__(self, "port", check_port(self.port))
        if self.protocol not in ("tcp", "udp"):
            raise ValidationError(f"protocol {_short(self.protocol)} must be tcp or udp")
        if self.frontend_port is not None:
            object.__setattr__(
                self, "frontend_port", check_port(self.frontend_port, "frontend port")
            )
        tags = tuple(self.tags)
        for tag in tags:
            check_tag(tag)
        object.__setattr__(self, "tags", tags)
        meta = tuple(sorted((str(k), v) for k, v in self.meta))
        for key, value in meta:
            if not (type(value) is str and _valid_meta(key, value)):
                check_meta(key, value)
        object.__setattr__(self, "meta", meta)
        if self.host_id and not (
            _valid_host_id(self.host_id)
            if type(self.host_id) is str
            else INSTANCE_ID_RE.fullmatch(self.host_id)
        ):
            raise ValidationError(f"host id {_short(self.host_id)} has forbidden characters")

    @property
    def meta_dict(self) -> dict[str, str]:
        return dict(self.meta)

    @property
    def endpoint(self) -> str:
        """``IP:PORT`` (IPv6 in brackets), the value the seed's key layout stores."""
        if ":" in self.address:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


def parse_endpoint(value: str) -> tuple[str, int]:
    """Parse ``IP:PORT`` or ``[IPv6]:PORT``; raise ValidationError otherwise."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValidationError(f"value {_short(value)} is not IP:PORT")
    return check_address(host), check_port(port)


@dataclass(frozen=True)
class Service:
    """A service as the proxy sees it: one frontend, a sorted tuple of instances."""

    name: str
    frontend_port: int
    protocol: Protocol = "tcp"
    mode: Mode = "tcp"
    instances: tuple[ServiceInstance, ...] = ()
    meta: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        check_service_name(self.name)
        check_port(self.frontend_port, "frontend port")
        if self.mode not in ("http", "tcp"):
            raise ValidationError(f"mode {_short(self.mode)} must be http or tcp")
        object.__setattr__(self, "instances", tuple(sorted(self.instances)))

    @property
    def meta_dict(self) -> dict[str, str]:
        return dict(self.meta)


@dataclass(frozen=True)
class HostInfo:
    """Who this agent is: the address others reach its containers on, and a stable host id."""

    ip: str
    id: str


@dataclass(frozen=True)
class Problem:
    """Something refused, with enough context to find it: which object, which input, which rule.

    ``service`` names the service the problem belongs to, when it belongs to one: a registry
    sets it on the problems of a service's entries, so that re-reading that service alone
    (``Registry.read_services``) replaces them."""

    subject: str
    message: str
    service: str = ""

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}"


@dataclass(frozen=True)
class Catalog:
    """What a registry holds, as read in one snapshot.

    ``instances`` carry their ``frontend_port`` when the registry knows it; ``problems`` name the
    entries that were skipped (malformed values, missing ports) so they can be logged once.
    ``revision`` is an opaque position the registry can resume watching from. ``claims`` are
    the frontend ports claimed fleet-wide, as ``(port, service)`` pairs, when the registry keeps
    such claims: every discover host then routes a port to the same service, whatever it saw
    first.
    """

    instances: tuple[ServiceInstance, ...] = ()
    problems: tuple[Problem, ...] = ()
    revision: int = 0
    claims: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class SourceSnapshot:
    """What a container source sees now: eligible instances and refused ones."""

    instances: tuple[ServiceInstance, ...] = ()
    problems: tuple[Problem, ...] = ()


def frozen_meta(
    items: Mapping[str, str] | Iterable[tuple[str, str]],
) -> tuple[tuple[str, str], ...]:
    """Metadata in the frozen, sorted form ``ServiceInstance.meta`` keeps."""
    pairs = items.items() if isinstance(items, Mapping) else items
    return tuple(sorted(pairs))


def backend_problem(
    instance: ServiceInstance, own_host_id: str, *, single_machine: bool = False
) -> Problem | None:
    """``None`` if a proxy on the host ``own_host_id`` may route to ``instance``; otherwise the
    :class:`Problem` to report (its ``service`` set), by the rules of
    :func:`check_backend_address`. Pure: the discover role calls it on every instance it
    reads from the registry."""
    try:
        check_backend_address(
            instance.address,
            host_id=instance.host_id,
            own_host_id=own_host_id,
            single_machine=single_machine,
        )
    except ValidationError as exc:
        return Problem(f"instance {instance.id} of {instance.service}", str(exc), instance.service)
    return None


_PORT_RANGE = re.compile(r"([0-9]{1,5})(?:\s*-\s*([0-9]{1,5}))?")


@dataclass(frozen=True)
class PortRanges:
    """A set of ports written as ranges, e.g. ``8000-8999,9100`` (the core option
    ``frontend_ports``): ``port in ranges``."""

    ranges: tuple[tuple[int, int], ...] = ((1, 65535),)

    @classmethod
    def parse(cls, text: str) -> PortRanges:
        """``"1-65535"``, ``"8000-8999, 9100"``; ``ValidationError`` naming the rule."""
        found: list[tuple[int, int]] = []
        for part in text.split(","):
            match = _PORT_RANGE.fullmatch(part.strip())
            if match is None:
                raise ValidationError(
                    "port ranges must look like 8000-8999 or 9100, separated by commas"
                )
            low = int(match.group(1))
            high = int(match.group(2) or low)
            if not 1 <= low <= high <= 65535:
                raise ValidationError(
                    f"port range {low}-{high}: ports go from 1 to 65535, low end first"
                )
            found.append((low, high))
        return cls(tuple(sorted(set(found))))

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and any(low <= port <= high for low, high in self.ranges)

    def __str__(self) -> str:
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)
