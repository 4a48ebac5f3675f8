"""registrator-compatible container metadata -> service instances (pure functions).

A source plugin describes each running container as a ``ContainerSpec``; ``instances_for``
turns it into instances, one per published port, following registrator's conventions so users can
switch without relabelling:

- ``SERVICE_NAME``, ``SERVICE_TAGS`` (comma-separated), ``SERVICE_IGNORE`` for the container;
  ``SERVICE_<port>_NAME``, ``SERVICE_<port>_TAGS``, ``SERVICE_<port>_IGNORE`` for one private port.
- Any other ``SERVICE_<KEY>`` / ``SERVICE_<port>_<KEY>`` becomes metadata ``key`` (lower case),
  e.g. ``SERVICE_MODE=http``. ``SERVICE_<port>_PORT`` (or ``SERVICE_PORT`` for a container with
  one published port) sets the frontend port clients dial on their proxy.
- Values come from labels and from the container's environment; labels win.
- Default name: the image's repository name (``registry:5000/a/b/whoami:1`` -> ``whoami``); with
  several published ports, ``-<port>`` is appended unless the port has its own name.

A bad value refuses only the port it applies to, with a ``Problem`` naming the container, the
label and the rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from discoverd.core.checks import CHECK_KINDS
from discoverd.core.durations import format_seconds, parse_duration
from discoverd.core.errors import ValidationError
from discoverd.core.model import (
    Problem,
    Protocol,
    ServiceInstance,
    check_address,
    check_meta,
    check_path,
    check_port,
    check_service_name,
    check_tag,
)

TRUTHY = frozenset({"1", "true", "yes", "on"})
FALSY = frozenset({"0", "false", "no", "off", ""})
_PORT_KEY = re.compile(r"SERVICE_(\d{1,5})_(.+)")
_WILDCARD = frozenset({"", "0.0.0.0", "::"})
# Keys with a meaning of their own; every other SERVICE_* key is metadata.
_RESERVED = frozenset({"NAME", "TAGS", "IGNORE", "ID", "PORT"})
MODES = ("http", "tcp")


@dataclass(frozen=True)
class PortBinding:
    """A published port: ``private_port/protocol`` inside, ``host_ip:host_port`` outside."""

    private_port: int
    protocol: Protocol
    host_ip: str
    host_port: int


@dataclass(frozen=True)
class ContainerSpec:
    """What the metadata rules need to know of a running container."""

    id: str
    name: str
    image: str
    labels: Mapping[str, str]
    env: Mapping[str, str]
    ports: tuple[PortBinding, ...]


_IMAGE_ID = re.compile(r"(sha256:)?[0-9a-f]{12,64}")


def image_service_name(image: str) -> str:
    """The repository name of an image reference, lower-cased: the seed's default service name.

    ``whoami``, ``jwilder/whoami:latest``, ``registry:5000/a/b/whoami@sha256:...`` -> ``whoami``.
    A container started from an image id (``sha256:4bce...``) has no repository name: ``""``.
    """
    if _IMAGE_ID.fullmatch(image):
        return ""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[0].lower()


def parse_env(entries: list[str] | None) -> dict[str, str]:
    """Docker's ``["KEY=VALUE", ...]`` environment as a dict (entries without ``=`` skipped)."""
    result: dict[str, str] = {}
    for entry in entries or ():
        key, sep, value = entry.partition("=")
        if sep:
            result[key] = value
    return result


def _service_keys(container: ContainerSpec) -> dict[str, tuple[str, str]]:
    """Every ``SERVICE_*`` setting as ``key -> (value, origin)``; labels override env."""
    found: dict[str, tuple[str, str]] = {}
    for origin, table in (("env", container.env), ("label", container.labels)):
        for key, value in table.items():
            if key.startswith("SERVICE_"):
                found[key] = (value, origin)
    return found


def _split_tags(raw: str) -> tuple[str, ...]:
    return tuple(tag.strip() for tag in raw.split(",") if tag.strip())


def instances_for(
    container: ContainerSpec, *, host_ip: str, host_id: str
) -> tuple[list[ServiceInstance], list[Problem]]:
    """The instances a running container offers, and the ports refused with the reason."""
    keys = _service_keys(container)
    short = container.id[:12]
    label = f"container {container.name or short} ({short})"
    if keys.get("SERVICE_IGNORE", ("", ""))[0].strip().lower() in TRUTHY:
        return [], []

    common: dict[str, tuple[str, str]] = {}
    per_port: dict[int, dict[str, tuple[str, str]]] = {}
    for key, (value, origin) in keys.items():
        match = _PORT_KEY.fullmatch(key)
        if match:
            per_port.setdefault(int(match.group(1)), {})[match.group(2)] = (value, key)
        else:
            common[key.removeprefix("SERVICE_")] = (value, key)
        del origin

    ports = _one_binding_per_port(container.ports, host_ip)
    grouped = len(ports) > 1
    instances: list[ServiceInstance] = []
    problems: list[Problem] = []
    for binding in ports:
        subject = f"{label} port {binding.private_port}/{binding.protocol}"
        own = per_port.get(binding.private_port, {})
        if own.get("IGNORE", ("", ""))[0].strip().lower() in TRUTHY:
            continue
        try:
            instances.append(
                _instance(container, binding, common, own, grouped, host_ip, host_id, short)
            )
        except _Refused as refused:
            problems.append(Problem(subject, str(refused)))
        except Exception as exc:  # never let one odd value stop the whole host's snapshot
            problems.append(Problem(subject, f"refused: {type(exc).__name__}: {exc}"))
    return instances, problems


def _one_binding_per_port(bindings: Iterable[PortBinding], host_ip: str) -> list[PortBinding]:
    """One binding per private port and protocol (one instance id each): a port published on
    several host addresses is one instance, preferably at HOST_IP, else a wildcard binding,
    else the first in order."""

    def preference(b: PortBinding) -> tuple[int, str, int]:
        rank = 0 if host_ip and b.host_ip == host_ip else 1 if b.host_ip in _WILDCARD else 2
        return rank, b.host_ip, b.host_port

    chosen: dict[tuple[int, str], PortBinding] = {}
    for binding in sorted(set(bindings), key=preference):
        chosen.setdefault((binding.private_port, binding.protocol), binding)
    return [chosen[key] for key in sorted(chosen)]


class _Refused(Exception):
    pass


def _instance(
    container: ContainerSpec,
    binding: PortBinding,
    common: Mapping[str, tuple[str, str]],
    own: Mapping[str, tuple[str, str]],
    grouped: bool,
    host_ip: str,
    host_id: str,
    short: str,
) -> ServiceInstance:
    def pick(key: str) -> tuple[str, str] | None:
        return own.get(key) or common.get(key)

    def refuse(source: str, value: str, exc: Exception) -> _Refused:
        shown = value if len(value) <= 40 else value[:37] + "..."
        return _Refused(f"{source}={shown!r} refused: {exc}")

    # Name: the port's own name as is; otherwise the container's name (or the image's),
    # with -<port> when the container publishes several ports (registrator's rule).
    if "NAME" in own:
        name, name_key = own["NAME"]
    elif "NAME" in common:
        name, name_key = common["NAME"]
        name = f"{name}-{binding.private_port}" if grouped else name
    else:
        name = image_service_name(container.image)
        name_key = f"image {container.image[:40]!r}"
        name = f"{name}-{binding.private_port}" if grouped else name
    try:
        check_service_name(name)
    except ValidationError as exc:
        if name_key.startswith("image"):
            raise _Refused(
                f"{name_key} gives no valid service name: {exc}; set SERVICE_NAME"
            ) from None
        raise refuse(name_key, name, exc) from None

    tags: tuple[str, ...] = ()
    if (entry := pick("TAGS")) is not None:
        try:
            tags = tuple(check_tag(t) for t in _split_tags(entry[0]))
        except ValidationError as exc:
            raise refuse(entry[1], entry[0], exc) from None

    frontend = binding.private_port
    entry = own.get("PORT")
    if entry is None and not grouped:
        entry = common.get("PORT")
    if entry is not None:
        try:
            frontend = check_port(entry[0].strip(), "frontend port")
        except ValidationError as exc:
            raise refuse(entry[1], entry[0], exc) from None

    meta: dict[str, str] = {}
    origin: dict[str, str] = {}  # metadata key -> the label or variable it came from
    for table in (common, own):  # the port's own values win
        for key, (value, source) in table.items():
            if key in _RESERVED:
                continue
            try:
                meta_key, meta_value = check_meta(key.lower(), value)
            except ValidationError as exc:
                raise refuse(source, value, exc) from None
            meta[meta_key] = meta_value
            origin[meta_key] = source
    if "mode" in meta and meta["mode"] not in MODES:
        raise refuse(origin["mode"], meta["mode"], ValueError("mode must be http or tcp"))
    _normalise_checks(meta, origin, refuse)

    address = host_ip or ("" if binding.host_ip in _WILDCARD else binding.host_ip)
    if not address:
        raise _Refused(
            f"published on {binding.host_ip or '0.0.0.0'}:{binding.host_port} and no HOST_IP "
            "is set: set HOST_IP (or host_ip) to the address other hosts reach this one on"
        )
    try:
        check_address(address)
        return ServiceInstance(
            service=name,
            id=f"{host_id}:{short}:{binding.private_port}:{binding.protocol}",
            address=address,
            port=binding.host_port,
            protocol=binding.protocol,
            frontend_port=frontend,
            tags=tags,
            meta=tuple(sorted(meta.items())),
            host_id=host_id,
        )
    except ValidationError as exc:
        raise _Refused(str(exc)) from None


#: Metadata holding a duration; stored as plain seconds (``SERVICE_DRAIN=10s`` -> ``"10"``).
DURATION_KEYS = ("drain", "check_interval", "check_timeout")


def _normalise_checks(
    meta: dict[str, str],
    origin: Mapping[str, str],
    refuse: Callable[[str, str, Exception], Exception],
) -> None:
    """Validate and normalise the readiness-check and drain settings (see ``core.checks``)."""
    for key in DURATION_KEYS:
        if key in meta:
            try:
                meta[key] = format_seconds(parse_duration(meta[key]))
            except ValueError as exc:
                raise refuse(origin[key], meta[key], exc) from None
    if "check_http" in meta:
        try:
            check_path(meta["check_http"])
        except ValidationError as exc:
            raise refuse(origin["check_http"], meta["check_http"], exc) from None
    if "check" in meta:
        meta["check"] = meta["check"].strip().lower()
        if meta["check"] not in CHECK_KINDS:
            kinds = ", ".join(CHECK_KINDS)
            raise refuse(origin["check"], meta["check"], ValueError(f"check must be {kinds}"))
    if "check_tcp" in meta:
        flag = meta["check_tcp"].strip().lower()
        if flag not in TRUTHY | FALSY:
            raise refuse(origin["check_tcp"], meta["check_tcp"], ValueError("expected true/false"))
