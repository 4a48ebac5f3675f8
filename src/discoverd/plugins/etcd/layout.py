"""Where discoverd keeps instances in etcd, and how a catalog is read back (pure functions).

The layout is the seed's (docker-register / docker-discover), so both can run side by side::

    <prefix>/<service>/<instance id>   = IP:PORT        (one key per instance)
    <prefix>/<service>/port            = frontend port  (written by every host, last one wins)
    <meta_prefix>/<service>/<instance id> = {"frontend_port": 8000, "protocol": "tcp",
                                             "tags": [...], "meta": {...}, "host_id": "..."}

The metadata lives outside ``<prefix>``: the original docker-discover reads every key under a
service directory of ``<prefix>`` (except ``port``) as a backend.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from discoverd import Catalog, PluginError, Problem, ServiceInstance, ValidationError
from discoverd import parse_endpoint as _parse_endpoint
from discoverd.core.model import check_port, check_service_name

PORT_KEY = "port"


def normalize_prefix(value: str, option: str) -> str:
    """Strip trailing slashes; refuse an empty prefix (it would claim the whole key space)."""
    text = value.strip().rstrip("/")
    if not text:
        raise PluginError(f"etcd option {option}={value!r}: must name a key prefix, e.g. /backends")
    return text


def range_of(prefix: str) -> tuple[bytes, bytes]:
    """The ``[start, end)`` key range holding everything below ``prefix`` + ``/``."""
    start = (prefix + "/").encode()
    return start, prefix.encode() + b"0"  # "0" is the byte after "/"


@dataclass(frozen=True)
class Layout:
    """The two key prefixes, normalised and checked not to overlap."""

    prefix: str = "/backends"
    meta_prefix: str = "/discoverd/instances"

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", normalize_prefix(self.prefix, "prefix"))
        object.__setattr__(self, "meta_prefix", normalize_prefix(self.meta_prefix, "meta_prefix"))
        a, b = self.prefix + "/", self.meta_prefix + "/"
        if a.startswith(b) or b.startswith(a):
            raise PluginError(
                f"etcd options prefix={self.prefix!r} and meta_prefix={self.meta_prefix!r} "
                "overlap: docker-discover would read the metadata as backends. "
                "Choose two separate prefixes."
            )

    def backend_key(self, service: str, instance_id: str) -> str:
        return f"{self.prefix}/{service}/{instance_id}"

    def port_key(self, service: str) -> str:
        return f"{self.prefix}/{service}/{PORT_KEY}"

    def meta_key(self, service: str, instance_id: str) -> str:
        return f"{self.meta_prefix}/{service}/{instance_id}"


def encode_metadata(instance: ServiceInstance, host_id: str = "") -> str:
    """The JSON stored under the metadata key (compact, keys sorted: stable bytes)."""
    document = {
        "frontend_port": instance.frontend_port,
        "protocol": instance.protocol,
        "tags": list(instance.tags),
        "meta": instance.meta_dict,
        "host_id": instance.host_id or host_id,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class _Metadata:
    frontend_port: int | None
    protocol: str
    tags: tuple[str, ...]
    meta: tuple[tuple[str, str], ...]
    host_id: str


def _decode_metadata(raw: bytes) -> _Metadata:
    """Parse a metadata value; raise ValidationError naming what is wrong."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValidationError("value is not JSON") from None
    if not isinstance(document, dict):
        raise ValidationError("value is not a JSON object")
    port: Any = document.get("frontend_port")
    frontend_port = None if port is None else check_port(port, "frontend_port")
    protocol = document.get("protocol", "tcp")
    if protocol not in ("tcp", "udp"):
        raise ValidationError(f"protocol {protocol!r} must be tcp or udp")
    tags = document.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValidationError("tags must be a list of strings")
    meta = document.get("meta", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValidationError("meta must be an object of strings")
    host_id = document.get("host_id", "")
    if not isinstance(host_id, str):
        raise ValidationError("host_id must be a string")
    return _Metadata(frontend_port, protocol, tuple(tags), tuple(meta.items()), host_id)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def read_catalog(
    layout: Layout,
    backend_kvs: Iterable[tuple[bytes, bytes]],
    meta_kvs: Iterable[tuple[bytes, bytes]],
    revision: int,
) -> Catalog:
    """Turn the keys under both prefixes (``(key, value)`` pairs) into a catalog.

    Never raises for bad data: every malformed entry becomes a ``Problem`` naming its key, and
    affects only that entry (or, for a bad service name or a service without any frontend port,
    only that service).
    """
    grouped = group_entries(layout, backend_kvs, meta_kvs)
    instances: list[ServiceInstance] = []
    problems = list(grouped.problems)
    for service in sorted(grouped.services):
        found, trouble = read_service(layout, service, grouped.services[service], grouped.metadata)
        instances.extend(found)
        problems.extend(trouble)
    return Catalog(instances=tuple(instances), problems=tuple(problems), revision=revision)


@dataclass
class Grouped:
    """Keys sorted by service: ``services[service][name] = (key, value)`` with ``name`` an
    instance id or ``port``; ``metadata[(service, id)] = (key, value)``; ``problems`` for keys
    that belong to no service."""

    services: dict[str, dict[str, tuple[str, bytes]]]
    metadata: dict[tuple[str, str], tuple[str, bytes]]
    problems: list[Problem]


def service_of(layout: Layout, raw_key: bytes) -> str | None:
    """The service a key of either prefix belongs to; ``None`` for a key outside any
    ``<prefix>/<service>/`` directory."""
    key = _text(raw_key)
    for head in (layout.prefix + "/", layout.meta_prefix + "/"):
        if key.startswith(head):
            service, sep, _ = key[len(head) :].partition("/")
            return service if sep else None
    return None


def group_entries(
    layout: Layout,
    backend_kvs: Iterable[tuple[bytes, bytes]],
    meta_kvs: Iterable[tuple[bytes, bytes]],
) -> Grouped:
    problems: list[Problem] = []
    services: dict[str, dict[str, tuple[str, bytes]]] = {}
    head = layout.prefix + "/"
    for raw_key, value in sorted(backend_kvs):
        key = _text(raw_key)
        service, sep, name = key[len(head) :].partition("/")
        if not sep or not name:
            problems.append(
                Problem(key, f"unexpected key: expected {head}<service>/<instance id>; ignored")
            )
            continue
        services.setdefault(service, {})[name] = (key, value)

    metadata: dict[tuple[str, str], tuple[str, bytes]] = {}
    meta_head = layout.meta_prefix + "/"
    for raw_key, value in meta_kvs:
        key = _text(raw_key)
        service, sep, name = key[len(meta_head) :].partition("/")
        if sep and name:
            metadata[(service, name)] = (key, value)
    return Grouped(services, metadata, problems)


def read_service(
    layout: Layout,
    service: str,
    found_entries: dict[str, tuple[str, bytes]],
    metadata: dict[tuple[str, str], tuple[str, bytes]],
) -> tuple[list[ServiceInstance], list[Problem]]:
    """The instances of one service directory, and the problems of its keys."""
    head = layout.prefix + "/"
    problems: list[Problem] = []
    entries = dict(found_entries)
    for name in [n for n in entries if "/" in n]:
        key, _ = entries.pop(name)
        problems.append(
            Problem(key, f"unexpected key: expected {head}<service>/<instance id>; ignored")
        )
    try:
        check_service_name(service)
    except (ValidationError, ValueError) as exc:
        problems.append(
            Problem(f"{head}{service}", f"{exc}; its {len(entries)} key(s) are ignored")
        )
        return [], problems
    port_entry = entries.pop(PORT_KEY, None)
    port_key = layout.port_key(service)
    port_from_key: int | None = None
    port_problem = ""
    if port_entry is not None:
        try:
            port_from_key = check_port(_text(port_entry[1]).strip(), "frontend port")
        except (ValidationError, ValueError) as exc:
            port_problem = str(exc)
    found = _read_service(service, entries, metadata, port_from_key, problems)
    if not found:
        return [], problems
    if port_from_key is None and all(i.frontend_port is None for i in found):
        what = f"invalid ({port_problem})" if port_problem else "missing"
        problems.append(
            Problem(
                port_key,
                f"{what}, and no instance's metadata names a frontend port; "
                f"service {service} ({len(found)} instance(s)) is skipped",
            )
        )
        return [], problems
    if port_problem:
        problems.append(
            Problem(port_key, f"{port_problem}; using the frontend port from the metadata")
        )
    return found, problems


def _read_service(
    service: str,
    entries: dict[str, tuple[str, bytes]],
    metadata: dict[tuple[str, str], tuple[str, bytes]],
    port_from_key: int | None,
    problems: list[Problem],
) -> list[ServiceInstance]:
    found: list[ServiceInstance] = []
    for name in sorted(entries):
        key, value = entries[name]
        try:
            address, port = _parse_endpoint(_text(value))
        except (ValidationError, ValueError) as exc:
            problems.append(Problem(key, f"{exc}; entry ignored"))
            continue
        instance: ServiceInstance | None = None
        meta_problem: Problem | None = None
        meta_entry = metadata.get((service, name))
        if meta_entry is not None:
            meta_key, raw = meta_entry
            try:
                decoded = _decode_metadata(raw)
                instance = ServiceInstance(
                    service=service,
                    id=name,
                    address=address,
                    port=port,
                    protocol=decoded.protocol,  # type: ignore[arg-type]  # checked above
                    frontend_port=(
                        port_from_key if port_from_key is not None else decoded.frontend_port
                    ),
                    tags=decoded.tags,
                    meta=decoded.meta,
                    host_id=decoded.host_id,
                )
            except (ValidationError, ValueError) as exc:
                meta_problem = Problem(
                    meta_key, f"{exc}; metadata ignored, the plain entry {key} is used"
                )
        if instance is None:
            try:
                instance = ServiceInstance(
                    service=service,
                    id=name,
                    address=address,
                    port=port,
                    frontend_port=port_from_key,
                )
            except (ValidationError, ValueError) as exc:
                problems.append(Problem(key, f"{exc}; entry ignored"))
                continue
            if meta_problem is not None:
                problems.append(meta_problem)
        found.append(instance)
    return found
