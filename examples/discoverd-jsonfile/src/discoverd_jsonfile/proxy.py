"""The proxy: render the services to JSON, check a document's shape; ``apply`` (compare with the
file, replace it atomically, record the status) comes from :mod:`discoverd.proxykit`.

The document (``FORMAT`` names its version)::

    {
      "format": "discoverd-services/1",
      "services": [
        {"name": "whoami", "frontend_port": 8000, "protocol": "tcp", "mode": "http", "meta": {},
         "instances": [{"id": "...", "address": "10.0.0.5", "port": 49153, "protocol": "tcp",
                        "host_id": "host-a", "tags": [], "meta": {}}]}
      ]
    }

Services are sorted by name, instances by id, keys alphabetically: the same services always give
the same bytes, so the core (and this proxy) can tell an unchanged map from a new one.

A large map is not encoded again at every change: the core hands over every service whose
instances did not change as the very same ``Service`` object, so the proxy keeps each service's
entry (its text) with the object it came from and encodes only the services a change touched;
``validate``, handed the proxy's own last render, parses and checks only those entries too. The
text is byte for byte what one ``json.dumps`` of the whole document gives.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discoverd import ProxyConfigError, Service, ServiceInstance
from discoverd.proxykit import ManagedProxy

FORMAT = "discoverd-services/1"
FILE_MODE = 0o644
PROTOCOLS = ("tcp", "udp")
MODES = ("http", "tcp")


def instance_dict(instance: ServiceInstance) -> dict[str, Any]:
    return {
        "id": instance.id,
        "address": instance.address,
        "port": instance.port,
        "protocol": instance.protocol,
        "host_id": instance.host_id,
        "tags": list(instance.tags),
        "meta": instance.meta_dict,
    }


def service_dict(service: Service) -> dict[str, Any]:
    return {
        "name": service.name,
        "frontend_port": service.frontend_port,
        "protocol": service.protocol,
        "mode": service.mode,
        "meta": service.meta_dict,
        "instances": [instance_dict(i) for i in sorted(service.instances, key=lambda i: i.id)],
    }


#: What the services of a map are unique by: the name, and the frontend (port, protocol).
ServiceKey = tuple[str, int, str]


@dataclass(frozen=True)
class _Rendered:
    """The last render: its text, and the text of each service's entry in it, in order."""

    text: str
    entries: tuple[str, ...]


class JsonFileProxy(ManagedProxy[bool]):
    """Writes the service map to ``path``. There is no process: the map "runs" once its file
    exists, so "started" means the file was created, "reloaded" that it was replaced.

    ``apply`` is :class:`~discoverd.proxykit.ManagedProxy`'s: "unchanged" when the file already
    holds the map; otherwise the file is replaced atomically (a temporary file beside it, mode
    0644, flushed to disk, renamed over it); a write error is a ``PluginError``."""

    def __init__(self, path: Path, *, indent: int = 2) -> None:
        super().__init__("json-file", path, file_mode=FILE_MODE)
        self.path = path
        self.indent = indent
        # Memoization (see the module's text): each service's entry by the id of the object it
        # was encoded from (the object is kept, so its id cannot be reused meanwhile); the last
        # render; the entries validate has checked, with their keys.
        self._entries: dict[int, tuple[Service, str]] = {}
        self._rendered: _Rendered | None = None
        self._checked: dict[str, ServiceKey] = {}

    def render(self, services: Sequence[Service]) -> str:
        ordered = sorted(services, key=lambda s: (s.name, s.frontend_port, s.protocol))
        entries: dict[int, tuple[Service, str]] = {}
        for service in ordered:
            kept = self._entries.get(id(service))
            if kept is None or kept[0] is not service:
                kept = (service, self._encode(service_dict(service)))
            entries[id(service)] = kept
        self._entries = entries  # only what this render used: memory follows the registry
        texts = tuple(entries[id(service)][1] for service in ordered)
        text = self._document(texts)
        self._rendered = _Rendered(text, texts)
        return text

    def _encode(self, service: dict[str, Any]) -> str:
        """A service's entry, as ``json.dumps`` of the whole document writes it (with indent:
        two levels in, inside the list of services)."""
        if not self.indent:
            return json.dumps(service, sort_keys=True, separators=(",", ":"))
        text = json.dumps(service, indent=self.indent, sort_keys=True)
        return text.replace("\n", "\n" + " " * (2 * self.indent))  # JSON strings hold no "\n"

    def _document(self, entries: Sequence[str]) -> str:
        """The document around the services' entries, as ``json.dumps`` writes it."""
        fmt = json.dumps(FORMAT)
        if not self.indent:
            return '{"format":' + fmt + ',"services":[' + ",".join(entries) + "]}\n"
        one, two = "\n" + " " * self.indent, "\n" + " " * (2 * self.indent)
        listed = "[" + two + ("," + two).join(entries) + one + "]" if entries else "[]"
        return "{" + one + '"format": ' + fmt + "," + one + '"services": ' + listed + "\n}\n"

    def validate(self, config: str) -> None:
        rendered = self._rendered
        if rendered is not None and (rendered.text is config or rendered.text == config):
            self._validate_own(rendered)
            return
        try:
            document = json.loads(config)
        except ValueError as exc:
            raise ProxyConfigError(f"json-file: not valid JSON: {exc}") from None
        check_document(document)

    def _validate_own(self, rendered: _Rendered) -> None:
        """Check the proxy's own last render: the document around the entries is the one
        ``_document`` writes; each entry is parsed and checked once (the same text is the same
        entry), and the entries are checked unique as by :func:`check_document`."""
        checked: dict[str, ServiceKey] = {}
        unique = _Unique()
        for index, entry in enumerate(rendered.entries):
            where = f"services[{index}]"
            key = self._checked.get(entry) or checked.get(entry)
            if key is None:
                key = check_service(json.loads(entry), where)
            unique.add(key, where)
            checked[entry] = key
        self._checked = checked  # only the entries of this map

    def find_running(self) -> bool | None:
        return True if self.path.exists() else None


# -- the document's shape ------------------------------------------------------------------------


def _fail(where: str, expected: str, value: object) -> ProxyConfigError:
    shown = json.dumps(value)[:60] if not isinstance(value, dict | list) else type(value).__name__
    return ProxyConfigError(f"json-file: {where}: expected {expected}, got {shown}")


def _object(value: object, where: str, keys: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, "an object", value)
    missing = [k for k in keys if k not in value]
    if missing:
        raise ProxyConfigError(f"json-file: {where}: missing key {missing[0]!r}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise ProxyConfigError(f"json-file: {where}: unknown key {unknown[0]!r}")
    return value


def _string(value: object, where: str, *, choices: Sequence[str] = (), empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise _fail(where, "a non-empty string", value)
    if choices and value not in choices:
        raise _fail(where, " or ".join(choices), value)
    return value


def _port(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _fail(where, "a port number (1-65535)", value)
    return value


def _meta(value: object, where: str) -> None:
    if not isinstance(value, dict):
        raise _fail(where, "an object of strings", value)
    for key, item in value.items():
        _string(item, f"{where}.{key}", empty=True)


def check_document(document: object) -> None:
    """Raise ``ProxyConfigError`` naming the first place where ``document`` is not a service map
    as :meth:`JsonFileProxy.render` writes it."""
    top = _object(document, "the document", ("format", "services"))
    if top["format"] != FORMAT:
        raise _fail("format", repr(FORMAT), top["format"])
    services = top["services"]
    if not isinstance(services, list):
        raise _fail("services", "a list", services)
    unique = _Unique()
    for s, raw in enumerate(services):
        where = f"services[{s}]"
        unique.add(check_service(raw, where), where)


class _Unique:
    """The services of one map so far: a name, or a frontend, twice is refused."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.frontends: set[tuple[int, str]] = set()

    def add(self, key: ServiceKey, where: str) -> None:
        name, port, protocol = key
        if name in self.names:
            raise ProxyConfigError(f"json-file: {where}: service {name!r} appears twice")
        if (port, protocol) in self.frontends:
            raise ProxyConfigError(
                f"json-file: {where}: frontend port {port}/{protocol} is used twice"
            )
        self.names.add(name)
        self.frontends.add((port, protocol))


_SERVICE_KEYS = ("frontend_port", "instances", "meta", "mode", "name", "protocol")
_INSTANCE_KEYS = ("address", "host_id", "id", "meta", "port", "protocol", "tags")


def check_service(raw: object, where: str) -> ServiceKey:
    """Raise ``ProxyConfigError`` naming the first place where ``raw`` (at ``where``) is not a
    service's entry; return what the services of a map must be unique by."""
    service = _object(raw, where, _SERVICE_KEYS)
    name = _string(service["name"], f"{where}.name")
    port = _port(service["frontend_port"], f"{where}.frontend_port")
    protocol = _string(service["protocol"], f"{where}.protocol", choices=PROTOCOLS)
    _string(service["mode"], f"{where}.mode", choices=MODES)
    _meta(service["meta"], f"{where}.meta")
    instances = service["instances"]
    if not isinstance(instances, list):
        raise _fail(f"{where}.instances", "a list", instances)
    for i, raw_instance in enumerate(instances):
        at = f"{where}.instances[{i}]"
        instance = _object(raw_instance, at, _INSTANCE_KEYS)
        _string(instance["id"], f"{at}.id")
        _string(instance["address"], f"{at}.address")
        _port(instance["port"], f"{at}.port")
        _string(instance["protocol"], f"{at}.protocol", choices=PROTOCOLS)
        _string(instance["host_id"], f"{at}.host_id", empty=True)
        tags = instance["tags"]
        if not isinstance(tags, list):
            raise _fail(f"{at}.tags", "a list of strings", tags)
        for t, tag in enumerate(tags):
            _string(tag, f"{at}.tags[{t}]")
        _meta(instance["meta"], f"{at}.meta")
    return name, port, protocol
