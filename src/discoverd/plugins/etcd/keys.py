"""The etcd key scheme: where discoverd keeps instances, and how a catalog is read back (pure).

The scheme is the seed's (docker-register / docker-discover), so both can run side by side::

    <prefix>/<service>/<instance id>   = IP:PORT        (one key per instance)
    <prefix>/<service>/port            = frontend port  (created once, never overwritten)
    <meta_prefix>/<service>/<instance id> = {"frontend_port": 8000, "protocol": "tcp",
                                             "tags": [...], "meta": {...}, "host_id": "..."}

plus the frontend-port claims, one pair of keys per host serving a service, on that host's
lease (see ``writer.py`` for how they are taken)::

    <claim_prefix>/services/<service>/<holder>        = port     (read by the discover role)
    <claim_prefix>/ports/<port>/<service>/<holder>    = service  (the port's index: the
                                                                  compare-and-swap looks here)

The metadata and the claims live outside ``<prefix>``: the original docker-discover reads every
key under a service directory of ``<prefix>`` (except ``port``) as a backend.

A service's fleet port is the port its claim holders hold; without holders, the ``port`` key;
without either, each instance's own frontend port from its metadata.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from discoverd import (
    Catalog,
    ClaimHolder,
    Problem,
    ServiceInstance,
    ValidationError,
    check_port,
    check_service_name,
    settle_claims,
)
from discoverd import parse_endpoint as _parse_endpoint

PORT_KEY = "port"


def range_of(prefix: str) -> tuple[bytes, bytes]:
    """The ``[start, end)`` key range holding everything below ``prefix`` + ``/``."""
    start = (prefix + "/").encode()
    return start, prefix.encode() + b"0"  # "0" is the byte after "/"


@dataclass(frozen=True)
class KeyScheme:
    """The key prefixes (checked and normalised by ``EtcdConfig``) and the keys below them."""

    prefix: str = "/backends"
    meta_prefix: str = "/discoverd/instances"
    claim_prefix: str = "/discoverd/claims"

    def backend_key(self, service: str, instance_id: str) -> str:
        return f"{self.prefix}/{service}/{instance_id}"

    def port_key(self, service: str) -> str:
        return f"{self.prefix}/{service}/{PORT_KEY}"

    def meta_key(self, service: str, instance_id: str) -> str:
        return f"{self.meta_prefix}/{service}/{instance_id}"

    # -- claims ---------------------------------------------------------------------------

    @property
    def holders_prefix(self) -> str:
        """Where the claims are kept by service (what the discover role reads)."""
        return f"{self.claim_prefix}/services"

    def holder_key(self, service: str, holder: str) -> str:
        """``holder``'s claim of ``service`` (value: the port)."""
        return f"{self.holders_prefix}/{service}/{holder}"

    def port_holder_key(self, port: int, service: str, holder: str) -> str:
        """The same claim in the index by port (value: the service)."""
        return f"{self.claim_prefix}/ports/{port}/{service}/{holder}"

    def holders_range(self, service: str) -> tuple[bytes, bytes]:
        """Every holder of ``service``."""
        return range_of(f"{self.holders_prefix}/{service}")

    def owner_range(self, port: int, service: str) -> tuple[bytes, bytes]:
        """Every holder of ``service`` at ``port``."""
        return range_of(f"{self.claim_prefix}/ports/{port}/{service}")

    def others_at(self, port: int, service: str) -> list[tuple[bytes, bytes]]:
        """The holders at ``port`` of any service but ``service``: the two ranges either side
        of its directory (both empty: no other service holds the port)."""
        start, end = range_of(f"{self.claim_prefix}/ports/{port}")
        own_start, own_end = self.owner_range(port, service)
        return [(start, own_start), (own_end, end)]

    def service_at(self, raw_key: bytes) -> str:
        """The service named by a key of the index by port (``""`` if it names none)."""
        key = _text(raw_key)
        head = f"{self.claim_prefix}/ports/"
        if not key.startswith(head):
            return ""
        _, _, rest = key[len(head) :].partition("/")
        service, sep, _ = rest.partition("/")
        return service if sep else ""

    # -- ranges ---------------------------------------------------------------------------

    def ranges(self) -> list[tuple[bytes, bytes]]:
        """The key ranges of every service: ``<prefix>/``, ``<meta_prefix>/`` and the claims
        by service."""
        return [range_of(self.prefix), range_of(self.meta_prefix), range_of(self.holders_prefix)]

    def service_ranges(self, service: str) -> list[tuple[bytes, bytes]]:
        """The key ranges of one service: its directory below each prefix, and its claims."""
        return [
            range_of(f"{self.prefix}/{service}"),
            range_of(f"{self.meta_prefix}/{service}"),
            self.holders_range(service),
        ]

    def service_of(self, raw_key: bytes) -> str | None:
        """The service a key of the watched prefixes belongs to; ``None`` for a key outside
        any ``<prefix>/<service>/`` directory."""
        key = _text(raw_key)
        for head in (self.prefix + "/", self.meta_prefix + "/", self.holders_prefix + "/"):
            if key.startswith(head):
                service, sep, _ = key[len(head) :].partition("/")
                return service if sep else None
        return None


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


@dataclass(frozen=True)
class Holder:
    """One claim key as read: the key, its value (a port) and when it was created."""

    key: bytes
    value: bytes
    create_revision: int


def read_catalog(
    scheme: KeyScheme,
    backend_kvs: Iterable[tuple[bytes, bytes]],
    meta_kvs: Iterable[tuple[bytes, bytes]],
    revision: int,
    holder_kvs: Iterable[Holder] = (),
) -> Catalog:
    """Turn the keys under the prefixes (``(key, value)`` pairs, and the claims by service)
    into a catalog.

    Never raises for bad data: every malformed entry becomes a ``Problem`` naming its key, and
    affects only that entry (or, for a bad service name or a service without any frontend port,
    only that service).
    """
    assembler = CatalogAssembler(scheme, holder_kvs)
    assembler.add_backend(sorted(backend_kvs), None)
    assembler.add_meta(meta_kvs, None)
    return assembler.catalog(revision)


class CatalogAssembler:
    """:func:`read_catalog`, fed in pages: the instance keys and the metadata keys each in
    key order (two streams, any page sizes), the claims first. A service is read as soon as
    both streams have gone past its directory, so a large registry is parsed while the rest of
    it is still on its way; :meth:`catalog` then gives what ``read_catalog`` gives for the same
    keys, in the same order."""

    def __init__(self, scheme: KeyScheme, holder_kvs: Iterable[Holder] = ()) -> None:
        self.scheme = scheme
        self._held = read_claims(scheme, holder_kvs)
        self._head = scheme.prefix + "/"
        self._meta_head = scheme.meta_prefix + "/"
        #: Instance keys of the services not read yet, by service, in the order they came.
        self._pending: dict[str, dict[str, tuple[str, bytes]]] = {}
        self._metadata: dict[tuple[str, str], tuple[str, bytes]] = {}
        self._key_problems: list[Problem] = []
        self._read: dict[str, tuple[list[ServiceInstance], list[Problem]]] = {}
        self._entries: dict[str, dict[str, tuple[str, bytes]]] = {}  # of the services read
        #: The last key each stream delivered; ``None`` once it has delivered everything.
        self._backend_at: bytes | None = b""
        self._meta_at: bytes | None = b""

    def add_backend(self, kvs: Iterable[tuple[bytes, bytes]], last: bytes | None) -> None:
        """The next instance keys, in key order; ``last``: the last key the stream has given
        so far (``None``: there are no more)."""
        head = self._head
        for raw_key, value in kvs:
            key = _text(raw_key)
            service, sep, name = key[len(head) :].partition("/")
            if not sep or not name:
                self._key_problems.append(
                    Problem(key, f"unexpected key: expected {head}<service>/<instance id>; ignored")
                )
                continue
            self._reopen(service)
            self._pending.setdefault(service, {})[name] = (key, value)
        self._backend_at = last
        self._settle()

    def add_meta(self, kvs: Iterable[tuple[bytes, bytes]], last: bytes | None) -> None:
        """The next metadata keys, as :meth:`add_backend`."""
        head = self._meta_head
        for raw_key, value in kvs:
            key = _text(raw_key)
            service, sep, name = key[len(head) :].partition("/")
            if sep and name:
                self._reopen(service)
                self._metadata[(service, name)] = (key, value)
        self._meta_at = last
        self._settle()

    def _reopen(self, service: str) -> None:
        """A key of ``service`` came after it was read (keys out of order; never from etcd,
        whose pages come in key order): read it again, with every key it had."""
        if service in self._read:
            del self._read[service]
            self._pending[service] = self._entries.pop(service)

    def _settle(self) -> None:
        """Read the pending services that both streams have gone past."""
        done = []
        for service in self._pending:
            if not (
                self._past(self._backend_at, self.scheme.prefix, service)
                and self._past(self._meta_at, self.scheme.meta_prefix, service)
            ):
                break  # directories come in key order: the next ones are not past either
            done.append(service)
        for service in done:
            entries = self._entries[service] = self._pending.pop(service)
            self._read[service] = _read_service(
                self.scheme, service, entries, self._metadata, self._held.ports.get(service)
            )

    @staticmethod
    def _past(at: bytes | None, prefix: str, service: str) -> bool:
        return at is None or at >= range_of(f"{prefix}/{service}")[1]

    def catalog(self, revision: int) -> Catalog:
        """The catalog of everything added (the services not read yet are read now)."""
        self._backend_at = self._meta_at = None
        self._settle()
        instances: list[ServiceInstance] = []
        problems = list(self._key_problems)
        for service in sorted(self._read):
            found, trouble = self._read[service]
            instances.extend(found)
            problems.extend(trouble)
        problems.extend(self._held.problems)
        return Catalog(
            instances=tuple(instances),
            problems=tuple(problems),
            revision=revision,
            claims=self._held.claims,
        )


@dataclass
class Claims:
    """What the claim keys say: each service's fleet port (``ports``), the ``(port, service)``
    claims, and the problems of malformed or contradicting keys."""

    ports: dict[str, int]
    claims: tuple[tuple[int, str], ...]
    problems: list[Problem]


def read_claims(scheme: KeyScheme, holder_kvs: Iterable[Holder]) -> Claims:
    """The claims by service (``<claim_prefix>/services/<service>/<holder>`` = port).

    A service is held at the port of its oldest holder (they all hold the same one, unless
    someone wrote keys by hand). Two services holding one port (by hand, too): the one whose
    oldest holder is older keeps the claim; the other's is ignored, with a problem.
    """
    head = scheme.holders_prefix + "/"
    problems: list[Problem] = []
    holders: list[ClaimHolder] = []
    for item in holder_kvs:
        key = _text(item.key)
        service, sep, holder = key[len(head) :].partition("/")
        if not sep or not holder or "/" in holder:
            problems.append(
                Problem(
                    key,
                    f"unexpected key: expected {head}<service>/<holder>; ignored",
                    service=service if sep else "",
                )
            )
            continue
        try:
            check_service_name(service)
            port = check_port(_text(item.value).strip(), "claimed port")
        except (ValidationError, ValueError) as exc:
            problems.append(Problem(key, f"{exc}; claim ignored", service=service))
            continue
        holders.append(ClaimHolder(service, port, item.create_revision, key))
    settled = settle_claims(holders, lambda service: f"{head}{service}")
    return Claims(settled.ports, settled.claims, problems + settled.problems)


def _read_service(
    scheme: KeyScheme,
    service: str,
    found_entries: dict[str, tuple[str, bytes]],
    metadata: dict[tuple[str, str], tuple[str, bytes]],
    held: int | None = None,
) -> tuple[list[ServiceInstance], list[Problem]]:
    """The instances of one service directory, and the problems of its keys (each naming the
    service, so that a partial read of the service replaces them). ``held``: the port the
    service's claim holders hold, which wins over the ``port`` key."""
    found, problems = _read_service_keys(scheme, service, found_entries, metadata, held)
    return found, [dataclasses.replace(p, service=service) for p in problems]


def _read_service_keys(
    scheme: KeyScheme,
    service: str,
    found_entries: dict[str, tuple[str, bytes]],
    metadata: dict[tuple[str, str], tuple[str, bytes]],
    held: int | None,
) -> tuple[list[ServiceInstance], list[Problem]]:
    head = scheme.prefix + "/"
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
    port_key = scheme.port_key(service)
    port_from_key: int | None = None
    port_problem = ""
    if port_entry is not None:
        try:
            port_from_key = check_port(_text(port_entry[1]).strip(), "frontend port")
        except (ValidationError, ValueError) as exc:
            port_problem = str(exc)
    fleet_port = held if held is not None else port_from_key
    found = _read_instances(service, entries, metadata, fleet_port, problems)
    if not found:
        return [], problems
    if fleet_port is None and all(i.frontend_port is None for i in found):
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
        source = "claim" if held is not None else "metadata"
        problems.append(
            Problem(port_key, f"{port_problem}; using the frontend port from the {source}")
        )
    return found, problems


def _read_instances(
    service: str,
    entries: dict[str, tuple[str, bytes]],
    metadata: dict[tuple[str, str], tuple[str, bytes]],
    fleet_port: int | None,
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
                    frontend_port=(fleet_port if fleet_port is not None else decoded.frontend_port),
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
                    frontend_port=fleet_port,
                )
            except (ValidationError, ValueError) as exc:
                problems.append(Problem(key, f"{exc}; entry ignored"))
                continue
            if meta_problem is not None:
                problems.append(meta_problem)
        found.append(instance)
    return found
