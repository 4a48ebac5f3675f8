"""What discoverd stores in Consul, and how a catalog is read back (pure functions, no network).

Each instance is one agent service::

    ID      = the instance id (``<host id>:<container>:<private port>:<proto>``)
    Name    = the service name
    Address = the host address, Port = the published port, Tags = the instance's tags
              (plus the ``tag`` option, when set)
    Meta    = discoverd_protocol, discoverd_frontend_port, discoverd_host_id, and the instance's
              own metadata: plain keys where Consul allows them, the rest as JSON split over
              discoverd_meta_0, discoverd_meta_1, ... (Consul: at most 64 keys, values at most
              512 bytes, no key starting with "consul-")
    Check   = a TTL check "service:<ID>", passing from the start

The read side takes any service with an address and a port: one that discoverd did not register
needs the ``discoverd_frontend_port`` meta key to be served (its service is skipped with a
problem otherwise), and its instance id becomes ``<node>:<service id>`` (Consul's ids are unique
per node only).

Frontend-port claims live in the KV store (``<kv_prefix>`` is an option, ``discoverd`` by
default; see ``registry.py`` for how they are taken)::

    <kv_prefix>/claims/<service>/<session id> = port     (one per agent serving the service,
                                                         held by its session: deleted with it)
    <kv_prefix>/ports/<port>                  = service  (which service the port belongs to)
    <kv_prefix>/services/<service>            = port     (which port the service has)

The read side looks at the first kind only: a service with holders is served on the port of its
oldest holder, whatever its instances ask for, and that ``(port, service)`` is a claim.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from discoverd import (
    INSTANCE_ID_RE,
    TAG_RE,
    Catalog,
    ClaimHolder,
    Problem,
    ServiceInstance,
    ValidationError,
    check_meta,
    check_port,
    check_service_name,
    settle_claims,
)

log = logging.getLogger("discoverd.consul")

OWN_PREFIX = "discoverd_"
KEY_PROTOCOL = "discoverd_protocol"
KEY_FRONTEND = "discoverd_frontend_port"
KEY_HOST = "discoverd_host_id"
CHUNK_PREFIX = "discoverd_meta_"
MAX_META_KEYS = 64
MAX_META_VALUE_BYTES = 512
_RESERVED_BY_CONSUL = "consul-"
_CONSUL_META_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
#: Consul's own service (its server RPC port): never a backend.
CONSUL_SERVICE = "consul"


def check_id(service_id: str) -> str:
    return f"service:{service_id}"


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def encode_meta(instance: ServiceInstance, host_id: str) -> dict[str, str]:
    """The service's Meta: discoverd's keys, then the instance's metadata within Consul's limits.

    Metadata that cannot be a plain key (a reserved prefix, a value over 512 bytes, or no room
    left) goes to JSON chunks; what does not fit even then is dropped with a warning (never an
    error: one instance's metadata must not stop the others from being registered).
    """
    fixed: dict[str, str] = {KEY_PROTOCOL: instance.protocol}
    if instance.frontend_port is not None:
        fixed[KEY_FRONTEND] = str(instance.frontend_port)
    if instance.host_id or host_id:
        fixed[KEY_HOST] = instance.host_id or host_id
    items = list(instance.meta)
    plain_ok = [
        (k, v)
        for k, v in items
        if not k.startswith((OWN_PREFIX, _RESERVED_BY_CONSUL))
        and len(v.encode("utf-8")) <= MAX_META_VALUE_BYTES
    ]
    others = [(k, v) for k, v in items if (k, v) not in plain_ok]
    room = MAX_META_KEYS - len(fixed)
    for count in range(len(plain_ok), -1, -1):
        plain, rest = plain_ok[:count], others + plain_ok[count:]
        chunks = _chunks(rest)
        if len(plain) + len(chunks) <= room:
            return {**fixed, **dict(plain), **chunks}
    # Not even the JSON fits in the keys left: keep what fits, in sorted order.
    kept: list[tuple[str, str]] = []
    for pair in sorted(others):
        if len(_chunks([*kept, pair])) <= room:
            kept.append(pair)
    dropped = sorted({k for k, _ in items} - {k for k, _ in kept})
    log.warning(
        "consul: instance %s has more metadata than Consul can hold; dropped: %s",
        instance.id,
        ", ".join(dropped),
    )
    return {**fixed, **_chunks(kept)}


def _chunks(pairs: list[tuple[str, str]]) -> dict[str, str]:
    if not pairs:
        return {}
    text = json.dumps(dict(sorted(pairs)), sort_keys=True, separators=(",", ":"))  # ASCII only
    size = MAX_META_VALUE_BYTES
    return {
        f"{CHUNK_PREFIX}{n}": text[start : start + size]
        for n, start in enumerate(range(0, len(text), size))
    }


def registration(
    instance: ServiceInstance,
    *,
    host_id: str,
    ttl: int,
    deregister_after: int,
    tag: str = "",
) -> dict[str, Any]:
    """The body of ``PUT /v1/agent/service/register`` for ``instance``."""
    tags = list(instance.tags)
    if tag and tag not in tags:
        tags.append(tag)
    check: dict[str, Any] = {
        "CheckID": check_id(instance.id),
        "Name": f"discoverd TTL of {instance.id}",
        "TTL": _duration(ttl),
        # Passing at once: the instance is routable without waiting for the first keepalive.
        "Status": "passing",
    }
    if deregister_after > 0:
        check["DeregisterCriticalServiceAfter"] = _duration(deregister_after)
    return {
        "ID": instance.id,
        "Name": instance.service,
        "Address": instance.address,
        "Port": instance.port,
        "Tags": tags,
        "Meta": encode_meta(instance, host_id),
        "Check": check,
    }


# ------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Entry:
    """One service instance as Consul's catalog lists it (values as received, unchecked)."""

    node: str
    node_address: Any
    id: Any
    name: Any
    tags: Any
    address: Any
    port: Any
    meta: Any = field(default_factory=dict)


#: Where a service's fields are, as the node and health endpoints give a service, and as the
#: catalog's service endpoint does (id, name, tags, address, port, meta).
_AGENT_KEYS = ("ID", "Service", "Tags", "Address", "Port", "Meta")
_CATALOG_KEYS = tuple(f"Service{k}" for k in ("ID", "Name", "Tags", "Address", "Port", "Meta"))


def _entry(
    node: Mapping[str, Any], service: Mapping[str, Any], keys: tuple[str, ...] = _AGENT_KEYS
) -> Entry:
    """An entry from a node's ``Node`` and ``Address`` and a service's fields at ``keys`` (in
    the order of ``Entry``'s fields: id, name, tags, address, port, meta)."""
    return Entry(str(node.get("Node", "")), node.get("Address"), *(service.get(k) for k in keys))


def entries_from_node(answer: Any) -> list[Entry]:
    """Entries from ``GET /v1/catalog/node/<node>``."""
    if not isinstance(answer, Mapping):
        return []
    node = answer.get("Node") or {}
    services = answer.get("Services") or {}
    if not isinstance(node, Mapping) or not isinstance(services, Mapping):
        return []
    return [_entry(node, s) for s in services.values() if isinstance(s, Mapping)]


def entries_from_health(answer: Any) -> tuple[list[Entry], list[Any]]:
    """Entries and their checks (the node's and the service's) from
    ``GET /v1/health/service/<name>``."""
    entries: list[Entry] = []
    checks: list[Any] = []
    for item in answer if isinstance(answer, list) else []:
        if not isinstance(item, Mapping):
            continue
        node, service = item.get("Node"), item.get("Service")
        if not isinstance(node, Mapping) or not isinstance(service, Mapping):
            continue
        entries.append(_entry(node, service))
        found = item.get("Checks")
        checks.extend(found if isinstance(found, list) else [])
    return entries, checks


def entries_from_service(answer: Any) -> list[Entry]:
    """Entries from ``GET /v1/catalog/service/<name>``."""
    if not isinstance(answer, list):
        return []
    return [_entry(s, s, _CATALOG_KEYS) for s in answer if isinstance(s, Mapping)]


@dataclass
class Health:
    """Which instances pass: every check of the node and of the service must be passing."""

    failing_nodes: set[str] = field(default_factory=set)
    failing_services: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def from_checks(cls, checks: Any) -> Health:
        """From ``GET /v1/health/state/any``."""
        health = cls()
        for check in checks if isinstance(checks, list) else []:
            if not isinstance(check, Mapping) or check.get("Status") == "passing":
                continue
            node = str(check.get("Node", ""))
            service_id = str(check.get("ServiceID") or "")
            if service_id:
                health.failing_services.add((node, service_id))
            else:
                health.failing_nodes.add(node)
        return health

    def passing(self, entry: Entry) -> bool:
        if entry.node in self.failing_nodes:
            return False
        return (entry.node, str(entry.id)) not in self.failing_services


def foreign_id(node: str, service_id: str) -> str:
    """A valid, deterministic instance id for a service another tool registered."""
    candidate = f"{node}:{service_id}"
    if INSTANCE_ID_RE.fullmatch(candidate) and candidate != "port":
        return candidate
    digest = hashlib.sha256(f"{node}\0{service_id}".encode()).hexdigest()[:12]
    cleaned = re.sub(r"[^A-Za-z0-9_.:-]", "_", candidate)[:180].lstrip("_.:-")
    return f"{cleaned}-{digest}" if cleaned else f"x-{digest}"


def _subject(entry: Entry) -> str:
    return f"consul service {entry.name!s} id {entry.id!s} on node {entry.node}"


def _decode(entry: Entry, tag: str, notes: list[str]) -> ServiceInstance:
    """Build the instance; raise ValidationError for what makes it unusable."""
    meta = entry.meta if isinstance(entry.meta, Mapping) else {}
    own = KEY_PROTOCOL in meta
    if not isinstance(entry.id, str) or not entry.id:
        raise ValidationError("no service id")
    address = entry.address or entry.node_address
    if not isinstance(address, str) or not address:
        raise ValidationError("no address (neither the service's nor the node's)")
    if isinstance(entry.port, int) and not isinstance(entry.port, bool) and entry.port == 0:
        raise ValidationError("no port")
    port = check_port(entry.port)
    protocol = str(meta.get(KEY_PROTOCOL, "tcp"))
    frontend_raw = meta.get(KEY_FRONTEND)
    frontend = None if frontend_raw is None else check_port(frontend_raw, KEY_FRONTEND)
    host_id = str(meta.get(KEY_HOST, "")) if own else ""

    tags: list[str] = []
    for item in entry.tags if isinstance(entry.tags, list) else []:
        if tag and item == tag:
            continue
        if isinstance(item, str) and TAG_RE.fullmatch(item):
            tags.append(item)
        else:
            notes.append(f"tag {item!r} ignored")

    pairs: dict[str, str] = {}
    chunks: dict[int, str] = {}
    for key, value in meta.items():
        if not isinstance(key, str):
            continue
        if key.startswith(CHUNK_PREFIX) and key[len(CHUNK_PREFIX) :].isdigit():
            chunks[int(key[len(CHUNK_PREFIX) :])] = str(value)
        elif not key.startswith(OWN_PREFIX):
            pairs[key] = value
    if chunks:
        try:
            document = json.loads("".join(chunks[n] for n in sorted(chunks)))
            if not isinstance(document, dict):
                raise ValueError("not an object")
            pairs.update(document)
        except ValueError:
            notes.append(f"{CHUNK_PREFIX}* is not a JSON object; that metadata is ignored")
    good: list[tuple[str, str]] = []
    for key in sorted(pairs):
        try:
            good.append(check_meta(key, pairs[key]))
        except ValidationError as exc:
            notes.append(f"{exc}; key ignored")
    return ServiceInstance(
        service=check_service_name(entry.name),
        id=entry.id if own else foreign_id(entry.node, entry.id),
        address=address,
        port=port,
        protocol=protocol,  # type: ignore[arg-type]  # ServiceInstance checks it
        frontend_port=frontend,
        tags=tuple(tags),
        meta=tuple(good),
        host_id=host_id,
    )


# ------------------------------------------------------------------------------------------
# Claims


def claims_prefix(kv_prefix: str) -> str:
    return f"{kv_prefix}/claims/"


def holder_key(kv_prefix: str, service: str, session: str) -> str:
    return f"{kv_prefix}/claims/{service}/{session}"


def port_record(kv_prefix: str, port: int) -> str:
    return f"{kv_prefix}/ports/{port}"


def service_record(kv_prefix: str, service: str) -> str:
    return f"{kv_prefix}/services/{service}"


@dataclass(frozen=True)
class KVEntry:
    """One KV entry as Consul lists it (``Value`` already decoded, or None)."""

    key: str
    value: bytes | None
    create_index: int
    modify_index: int
    session: str

    @classmethod
    def parse(cls, item: Any) -> KVEntry | None:
        if not isinstance(item, Mapping) or not isinstance(item.get("Key"), str):
            return None
        value = item.get("Value")
        if isinstance(value, str):
            value = value.encode("utf-8")
        return cls(
            key=item["Key"],
            value=value if isinstance(value, bytes) else None,
            create_index=index_value(item.get("CreateIndex")),
            modify_index=index_value(item.get("ModifyIndex")),
            session=str(item.get("Session") or ""),
        )

    @classmethod
    def parse_all(cls, listed: Any) -> list[KVEntry]:
        """The entries of a KV listing (``None`` for none), those that are not skipped."""
        items = listed if isinstance(listed, list) else []
        return [e for e in (cls.parse(i) for i in items) if e is not None]

    @property
    def text(self) -> str:
        return (self.value or b"").decode("utf-8", errors="replace").strip()

    @property
    def port(self) -> int | None:
        text = self.text
        if text.isascii() and text.isdigit() and 0 < int(text) < 65536:
            return int(text)
        return None


def index_value(value: Any) -> int:
    """A Consul index or count as an int (0 when it is not one)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


@dataclass
class Claims:
    """What the claim keys say: each service's fleet port, the ``(port, service)`` claims, and
    the problems of malformed or contradicting keys."""

    ports: dict[str, int] = field(default_factory=dict)
    claims: tuple[tuple[int, str], ...] = ()
    problems: list[Problem] = field(default_factory=list)


def read_claims(kv_prefix: str, entries: Iterable[KVEntry]) -> Claims:
    """The claims held now: keys ``<kv_prefix>/claims/<service>/<session>`` = port that a
    session holds (a key without one is left over and means nothing). A service is held at the
    port of its oldest holder; two services holding one port (written by hand): the older claim
    wins, the other is ignored with a problem."""
    head = claims_prefix(kv_prefix)
    problems: list[Problem] = []
    holders: list[ClaimHolder] = []
    for entry in entries:
        if not entry.key.startswith(head) or not entry.session:
            continue
        service, sep, holder = entry.key[len(head) :].partition("/")
        if not sep or not holder or "/" in holder:
            problems.append(
                Problem(
                    f"consul key {entry.key}",
                    f"unexpected key: expected {head}<service>/<session>; ignored",
                )
            )
            continue
        try:
            check_service_name(service)
            port = check_port(entry.text, "claimed port")
        except ValidationError as exc:
            problems.append(
                Problem(f"consul key {entry.key}", f"{exc}; claim ignored", service=service)
            )
            continue
        holders.append(ClaimHolder(service, port, entry.create_index, f"consul key {entry.key}"))
    settled = settle_claims(holders, lambda service: f"consul service {service}")
    return Claims(settled.ports, settled.claims, problems + settled.problems)


# ------------------------------------------------------------------------------------------


def read_catalog(
    entries: Iterable[Entry],
    health: Health,
    revision: int,
    tag: str = "",
    claims: Claims | None = None,
) -> Catalog:
    """Turn catalog entries into the passing instances, and problems for the malformed ones.

    Never raises for bad data: a bad entry is skipped with a problem naming it; a bad service
    name, or a service none of whose instances names a frontend port, skips that service only.
    Consul's own ``consul`` service and, with ``tag``, entries without that tag are left out
    silently; so are instances that are not passing. A service with a claim is served on its
    claimed port (``claims``), whatever port its instances ask for.
    """
    held = claims or Claims()
    problems: list[Problem] = []
    by_service: dict[str, list[ServiceInstance]] = {}
    bad_names: dict[str, int] = {}
    for entry in sorted(entries, key=lambda e: (str(e.name), e.node, str(e.id))):
        if entry.name == CONSUL_SERVICE:
            continue
        if tag and not (isinstance(entry.tags, list) and tag in entry.tags):
            continue
        if not health.passing(entry):
            continue
        try:
            check_service_name(entry.name)
        except ValidationError:
            bad_names[str(entry.name)] = bad_names.get(str(entry.name), 0) + 1
            continue
        notes: list[str] = []
        try:
            instance = _decode(entry, tag, notes)
        except (ValidationError, ValueError, TypeError) as exc:
            problems.append(
                Problem(_subject(entry), f"{exc}; instance ignored", service=str(entry.name))
            )
            continue
        if notes:
            problems.append(Problem(_subject(entry), "; ".join(notes), service=instance.service))
        fleet = held.ports.get(instance.service)
        if fleet is not None and instance.frontend_port != fleet:
            instance = dataclasses.replace(instance, frontend_port=fleet)
        by_service.setdefault(instance.service, []).append(instance)
    for name, count in sorted(bad_names.items()):
        try:
            check_service_name(name)
        except ValidationError as exc:
            problems.append(
                Problem(
                    f"consul service {name!r}",
                    f"{exc}; its {count} instance(s) ignored",
                    service=name,
                )
            )
    instances: list[ServiceInstance] = []
    for name in sorted(by_service):
        found = by_service[name]
        if all(i.frontend_port is None for i in found):
            problems.append(
                Problem(
                    f"consul service {name}",
                    f"no instance has the meta key {KEY_FRONTEND}; "
                    f"service skipped ({len(found)} instance(s))",
                    service=name,
                )
            )
            continue
        instances.extend(found)
    problems.extend(held.problems)
    return Catalog(
        instances=tuple(instances),
        problems=tuple(problems),
        revision=revision,
        claims=held.claims,
    )
