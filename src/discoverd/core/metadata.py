"""registrator-compatible container metadata -> service instances (pure functions).

A source plugin describes each running container as a ``ContainerSpec``; ``instances_for``
turns it into instances, one per published port, following registrator's conventions so users can
switch without relabelling:

- ``SERVICE_NAME``, ``SERVICE_TAGS`` (comma-separated), ``SERVICE_IGNORE`` for the container;
  ``SERVICE_<port>_NAME``, ``SERVICE_<port>_TAGS``, ``SERVICE_<port>_IGNORE`` for one private port.
- ``SERVICE_<port>_PORT`` (or ``SERVICE_PORT`` for a container with one published port) sets the
  frontend port clients dial on their proxy.
- Registry metadata comes only from the documented keys (:data:`META_KEYS`: ``SERVICE_MODE``,
  ``SERVICE_DRAIN``, ``SERVICE_CHECK*``, per port too) and from those the operator adds
  (core option ``meta_keys``); any other ``SERVICE_*`` variable (``SERVICE_API_KEY``) is
  ignored, never published.
- Values come from labels and from the container's environment; labels win.
- Default name: the image's repository name (``registry:5000/a/b/whoami:1`` -> ``whoami``); with
  several published ports, ``-<port>`` is appended unless the port has its own name.

The host's :class:`ExposurePolicy` (core options ``expose``, ``frontend_ports``,
``service_images``, ``single_machine``) decides which ports may be published at all.

A bad value refuses only the port it applies to, with a ``Problem`` naming the container, the
label and the rule; never the value, which may be a secret or a forged log line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from discoverd.core.checks import CHECK_KINDS
from discoverd.core.durations import format_seconds, parse_duration
from discoverd.core.errors import ValidationError
from discoverd.core.model import (
    INTERNAL_META_KEYS,
    META_KEY_RE,
    SERVICE_NAME_RE,
    PortRanges,
    Problem,
    Protocol,
    ServiceInstance,
    check_address,
    check_meta,
    check_path,
    check_port,
    check_service_name,
    check_tag,
    is_loopback,
)

if TYPE_CHECKING:
    from discoverd.core.config import CoreConfig

log = logging.getLogger("discoverd.metadata")

TRUTHY = frozenset({"1", "true", "yes", "on"})
FALSY = frozenset({"0", "false", "no", "off", ""})
_PORT_KEY = re.compile(r"SERVICE_([0-9]{1,5})_(.+)")
_WILDCARD = frozenset({"", "0.0.0.0", "::"})
# Keys with a meaning of their own, never metadata (SERVICE_ID: registrator's, ignored).
_RESERVED = frozenset({"NAME", "TAGS", "IGNORE", "ID", "PORT"})
#: The metadata keys published to the registry (from ``SERVICE_<KEY>`` and
#: ``SERVICE_<port>_<KEY>``, lower-cased); every other ``SERVICE_*`` key is ignored.
META_KEYS = frozenset(
    {"mode", "drain", "check", "check_http", "check_tcp", "check_interval", "check_timeout"}
)
MODES = ("http", "tcp")
Expose = Literal["all", "labelled"]

# The rules broken by refused labels, written without the value.
_NAME_RULE = "a service name must match [a-z0-9][a-z0-9_.-]{0,62}"
_TAG_RULE = "each tag must match [A-Za-z0-9_.:=/+-]{1,128}"
_PORT_RULE = "a frontend port must be a number from 1 to 65535"
_DURATION_RULE = "must be a duration from 0 to 24h (e.g. 10s, 500ms, 1m)"
_PATH_RULE = "must be a path starting with / (printable ASCII, no spaces, at most 200 characters)"


# -- image references and the service_images allow-list

_IMAGE_ID = re.compile(r"(sha256:)?[0-9a-f]{12,64}")
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?")
_PATH_PART = re.compile(r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*")


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


def image_repository(image: str) -> str:
    """The repository of an image reference in Docker's full form, without tag or digest:
    ``nginx:1`` -> ``docker.io/library/nginx``, ``registry.example.com:5000/team/web@sha256:..``
    -> ``registry.example.com:5000/team/web``. ``""`` for an image id or a malformed reference.
    """
    if not isinstance(image, str) or _IMAGE_ID.fullmatch(image):
        return ""
    ref = image.split("@", 1)[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        ref = ref[:colon]  # the tag
    return _normalise_repository(ref)


def _normalise_repository(ref: str, *, folder: bool = False) -> str:
    parts = ref.split("/")
    first = parts[0]
    if (len(parts) > 1 or folder) and ("." in first or ":" in first or first == "localhost"):
        domain, path = first.lower(), parts[1:]  # a folder may be a whole registry
        if not _DOMAIN.fullmatch(domain):
            return ""
    else:
        domain, path = "docker.io", parts
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and len(path) == 1 and not folder:
        path = ["library", *path]
    if not (path or folder) or not all(_PATH_PART.fullmatch(part) for part in path):
        return ""
    return "/".join([domain, *path])


def parse_service_images(entries: Iterable[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The core option ``service_images`` (``["web=registry.example.com/team/web", ...]``) as
    ``((service, (repository pattern, ...)), ...)``, sorted; ``ValueError`` with the rule.

    A pattern is a repository (``team/web``, normalised like Docker's: ``docker.io/team/web``)
    or a folder of them (``registry.example.com/team/*``); several entries may name one
    service."""
    allowed: dict[str, set[str]] = {}
    for entry in entries:
        name, sep, raw = entry.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not SERVICE_NAME_RE.fullmatch(name):
            raise ValueError(
                f"{entry[:80]!r}: expected SERVICE=REPOSITORY, e.g. "
                "web=registry.example.com/team/web (a service name matches "
                "[a-z0-9][a-z0-9_.-]{0,62})"
            )
        folder = raw.endswith("/*")
        repository = _normalise_repository(raw[:-2] if folder else raw, folder=folder)
        if not repository or "@" in raw:
            raise ValueError(
                f"{entry[:80]!r}: {raw[:80]!r} is not an image repository (without tag or "
                "digest), nor a folder of them ending in /*"
            )
        allowed.setdefault(name, set()).add(repository + "/*" if folder else repository)
    return tuple((name, tuple(sorted(allowed[name]))) for name in sorted(allowed))


def _repository_allowed(repository: str, patterns: Iterable[str]) -> bool:
    if not repository:
        return False
    for pattern in patterns:
        if pattern.endswith("/*"):
            if repository.startswith(pattern[:-1]):
                return True
        elif repository == pattern:
            return True
    return False


# -- the host's policy


@dataclass(frozen=True)
class ExposurePolicy:
    """What this host lets its containers publish: the core options ``expose``,
    ``frontend_ports``, ``service_images``, ``single_machine`` and ``meta_keys``.

    A source plugin gets it with ``ExposurePolicy.from_config(ctx.core)`` and passes it to
    :func:`instances_for`; the default is the behaviour of an agent with default options."""

    #: ``all``: every published port; ``labelled``: only ports whose container asks, with
    #: ``SERVICE_NAME`` or ``SERVICE_<port>_NAME`` (registrator's ``-explicit``).
    expose: Expose = "all"
    #: The frontend ports an instance may ask for.
    frontend_ports: PortRanges = field(default_factory=PortRanges)
    #: Services only some image repositories may join: ``((service, (pattern, ...)), ...)``.
    service_images: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: Every agent runs on this machine: a port published on loopback only is registered.
    single_machine: bool = False
    #: Metadata keys published beside :data:`META_KEYS` (for user templates).
    meta_keys: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, core: CoreConfig | None) -> ExposurePolicy:
        """The policy the core's options set (``ctx.core``); the default one without them."""
        if core is None:
            return cls()
        return cls(
            expose=core.expose,
            frontend_ports=PortRanges.parse(core.frontend_ports),
            service_images=parse_service_images(core.service_images),
            single_machine=core.single_machine,
            meta_keys=frozenset(core.meta_keys),
        )

    def images_for(self, service: str) -> tuple[str, ...] | None:
        """The repository patterns allowed to join ``service``; ``None``: any image."""
        for name, patterns in self.service_images:
            if name == service:
                return patterns
        return None


_DEFAULT_POLICY = ExposurePolicy()


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


def parse_env(entries: list[str] | None) -> dict[str, str]:
    """Docker's ``["KEY=VALUE", ...]`` environment as a dict (entries without ``=`` skipped)."""
    result: dict[str, str] = {}
    for entry in entries or ():
        key, sep, value = entry.partition("=")
        if sep:
            result[key] = value
    return result


def _service_keys(container: ContainerSpec) -> dict[str, str]:
    """Every ``SERVICE_*`` setting as ``key -> value``; labels override env."""
    found: dict[str, str] = {}
    for table in (container.env, container.labels):
        for key, value in table.items():
            if isinstance(key, str) and isinstance(value, str) and key.startswith("SERVICE_"):
                found[key] = value
    return found


def _split_tags(raw: str) -> tuple[str, ...]:
    return tuple(tag.strip() for tag in raw.split(",") if tag.strip())


# (container id, key) pairs already reported as ignored; bounded, cleared when full.
_NOTED: set[tuple[str, str]] = set()
_NOTED_MAX = 4096


def _note_ignored(cid: str, label: str, key: str) -> None:
    if (cid, key) in _NOTED:
        return
    if len(_NOTED) >= _NOTED_MAX:
        _NOTED.clear()
    _NOTED.add((cid, key))
    log.debug("%s: %s is not a documented key; not published", label, key)


@dataclass(frozen=True)
class PortStory:
    """What became of one published port of a container: its ``instance``, or why there is
    none (``reason``); ``problem`` says whether that is a refusal to report (a label breaking a
    rule) rather than a choice (``SERVICE_IGNORE``, not asking under ``expose = "labelled"``)."""

    binding: PortBinding
    instance: ServiceInstance | None = None
    reason: str = ""
    problem: bool = False


def port_stories(
    container: ContainerSpec,
    *,
    host_ip: str,
    host_id: str,
    policy: ExposurePolicy | None = None,
) -> list[PortStory]:
    """What becomes of each published port of ``container`` under ``policy``: the rules of
    :func:`instances_for`, with the reason for every port that gives no instance (what
    ``discoverd explain`` shows)."""
    policy = policy or _DEFAULT_POLICY
    keys = _service_keys(container)
    short = container.id[:12]
    label = f"container {container.name or short} ({short})"
    ports = _one_binding_per_port(container.ports, host_ip)
    if keys.get("SERVICE_IGNORE", "").strip().lower() in TRUTHY:
        return [PortStory(b, reason="ignored: the container says SERVICE_IGNORE") for b in ports]

    common: dict[str, tuple[str, str]] = {}
    per_port: dict[int, dict[str, tuple[str, str]]] = {}
    for key, value in keys.items():
        match = _PORT_KEY.fullmatch(key)
        if match:
            per_port.setdefault(int(match.group(1)), {})[match.group(2)] = (value, key)
        else:
            common[key.removeprefix("SERVICE_")] = (value, key)

    grouped = len(ports) > 1
    stories: list[PortStory] = []
    for binding in ports:
        own = per_port.get(binding.private_port, {})
        if own.get("IGNORE", ("", ""))[0].strip().lower() in TRUTHY:
            reason = f"ignored: SERVICE_{binding.private_port}_IGNORE"
            stories.append(PortStory(binding, reason=reason))
            continue
        if policy.expose == "labelled" and not (
            own.get("NAME", ("", ""))[0] or common.get("NAME", ("", ""))[0]
        ):
            # It did not ask (registrator's -explicit).
            reason = "not published: expose = labelled and the container names no service"
            stories.append(PortStory(binding, reason=reason))
            continue
        try:
            instance = _instance(container, binding, common, own, grouped, host_ip, host_id, policy)
            stories.append(PortStory(binding, instance))
        except _Refused as refused:
            stories.append(PortStory(binding, reason=str(refused), problem=True))
        except Exception as exc:  # never let one odd value stop the whole host's snapshot
            reason = f"refused: unexpected {type(exc).__name__}"
            stories.append(PortStory(binding, reason=reason, problem=True))
    for table in (common, *per_port.values()):
        for key, (_, source) in table.items():
            if key not in _RESERVED and not _published(key, policy):
                _note_ignored(container.id, label, source)
    return stories


def instances_for(
    container: ContainerSpec,
    *,
    host_ip: str,
    host_id: str,
    policy: ExposurePolicy | None = None,
) -> tuple[list[ServiceInstance], list[Problem]]:
    """The instances a running container offers under ``policy`` (the default policy when
    ``None``), and the ports refused with the reason. A port of a container that does not
    ask to be published under ``expose = "labelled"`` is skipped without a problem."""
    short = container.id[:12]
    label = f"container {container.name or short} ({short})"
    instances: list[ServiceInstance] = []
    problems: list[Problem] = []
    for story in port_stories(container, host_ip=host_ip, host_id=host_id, policy=policy):
        if story.instance is not None:
            instances.append(story.instance)
        elif story.problem:
            binding = story.binding
            subject = f"{label} port {binding.private_port}/{binding.protocol}"
            problems.append(Problem(subject, story.reason))
    return instances, problems


def _published(key: str, policy: ExposurePolicy) -> bool:
    lower = key.lower()
    if lower in INTERNAL_META_KEYS:
        return False  # set by the source itself (container_address), never by a label
    return lower in META_KEYS or lower in policy.meta_keys


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


def _refuse(source: str, rule: str) -> _Refused:
    """A refused label or variable: its name and the rule, never its value."""
    return _Refused(f"{source} refused: {rule}")


def _instance(
    container: ContainerSpec,
    binding: PortBinding,
    common: Mapping[str, tuple[str, str]],
    own: Mapping[str, tuple[str, str]],
    grouped: bool,
    host_ip: str,
    host_id: str,
    policy: ExposurePolicy,
) -> ServiceInstance:
    def pick(key: str) -> tuple[str, str] | None:
        return own.get(key) or common.get(key)

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
    except ValidationError:
        if name_key.startswith("image"):
            raise _Refused(
                f"{name_key} gives no valid service name ({_NAME_RULE}); set SERVICE_NAME"
            ) from None
        raise _refuse(name_key, _NAME_RULE) from None

    allowed = policy.images_for(name)
    if allowed is not None:
        repository = image_repository(container.image)
        if not _repository_allowed(repository, allowed):
            runs = f"image {repository}" if repository else "an image without a repository"
            raise _Refused(
                f"service {name} may be joined only by the images the core option "
                f"service_images allows for it ({', '.join(allowed)}); this container runs {runs}"
            )

    tags: tuple[str, ...] = ()
    if (entry := pick("TAGS")) is not None:
        try:
            tags = tuple(check_tag(t) for t in _split_tags(entry[0]))
        except ValidationError:
            raise _refuse(entry[1], _TAG_RULE) from None

    frontend = binding.private_port
    entry = own.get("PORT")
    if entry is None and not grouped:
        entry = common.get("PORT")
    if entry is not None:
        try:
            frontend = check_port(entry[0].strip(), "frontend port")
        except ValidationError:
            raise _refuse(entry[1], _PORT_RULE) from None
        if frontend not in policy.frontend_ports:
            raise _refuse(
                entry[1],
                f"the frontend port it asks for is outside this host's frontend_ports "
                f"({policy.frontend_ports})",
            )
    elif frontend not in policy.frontend_ports:
        raise _Refused(
            f"frontend port {frontend} (the private port) is outside this host's "
            f"frontend_ports ({policy.frontend_ports}); set SERVICE_{binding.private_port}_PORT"
        )

    meta: dict[str, str] = {}
    origin: dict[str, str] = {}  # metadata key -> the label or variable it came from
    for table in (common, own):  # the port's own values win
        for key, (value, source) in table.items():
            if key in _RESERVED or not _published(key, policy):
                continue
            try:
                meta_key, meta_value = check_meta(key.lower(), value)
            except ValidationError as exc:
                raise _refuse(source, str(exc)) from None
            meta[meta_key] = meta_value
            origin[meta_key] = source
    if "mode" in meta and meta["mode"] not in MODES:
        raise _refuse(origin["mode"], "mode must be http or tcp")
    _normalise_checks(meta, origin, _refuse)

    address = _address(binding, host_ip, policy)
    try:
        return ServiceInstance(
            service=name,
            id=f"{host_id}:{container.id[:12]}:{binding.private_port}:{binding.protocol}",
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


def _address(binding: PortBinding, host_ip: str, policy: ExposurePolicy) -> str:
    """The address other hosts reach the binding on: HOST_IP when set (the operator's word,
    loopback included), else the binding's own address, which must be one other hosts can
    reach (no wildcard, no loopback unless every agent runs on this machine)."""
    if host_ip:
        try:
            return check_address(host_ip)
        except ValidationError as exc:
            raise _Refused(f"HOST_IP: {exc}") from None
    where = f"{binding.host_ip or '0.0.0.0'}:{binding.host_port}"
    if binding.host_ip in _WILDCARD:
        raise _Refused(
            f"published on {where} and no HOST_IP is set: set HOST_IP (or host_ip) to the "
            "address other hosts reach this one on"
        )
    try:
        address = check_address(binding.host_ip)
    except ValidationError as exc:
        raise _Refused(f"published on {where}: {exc}") from None
    if is_loopback(address) and not policy.single_machine:
        raise _Refused(
            f"published on {where}, which only this machine reaches, and no HOST_IP is set: "
            "set HOST_IP, publish the port on an address other hosts reach, or set the core "
            "option single_machine when every agent runs on this machine"
        )
    return address


#: Metadata holding a duration; stored as plain seconds (``SERVICE_DRAIN=10s`` -> ``"10"``).
DURATION_KEYS = ("drain", "check_interval", "check_timeout")


def _normalise_checks(
    meta: dict[str, str],
    origin: Mapping[str, str],
    refuse: Callable[[str, str], Exception],
) -> None:
    """Validate and normalise the readiness-check and drain settings (see ``core.checks``)."""
    for key in DURATION_KEYS:
        if key in meta:
            try:
                meta[key] = format_seconds(parse_duration(meta[key]))
            except ValueError:
                raise refuse(origin[key], _DURATION_RULE) from None
    if "check_http" in meta:
        try:
            check_path(meta["check_http"])
        except ValidationError:
            raise refuse(origin["check_http"], _PATH_RULE) from None
    if "check" in meta:
        meta["check"] = meta["check"].strip().lower()
        if meta["check"] not in CHECK_KINDS:
            raise refuse(origin["check"], f"check must be {', '.join(CHECK_KINDS)}")
    if "check_tcp" in meta:
        flag = meta["check_tcp"].strip().lower()
        if flag not in TRUTHY | FALSY:
            raise refuse(origin["check_tcp"], "expected true/false")


def check_meta_key_names(keys: Iterable[str]) -> tuple[str, ...]:
    """The core option ``meta_keys``: metadata key names, lower case; ``ValueError`` otherwise."""
    found: list[str] = []
    for key in keys:
        text = key.strip().lower()
        if not META_KEY_RE.fullmatch(text) or text.upper() in _RESERVED:
            raise ValueError(
                f"{key[:80]!r} is not a metadata key: [a-z0-9][a-z0-9_-]{{0,62}}, and not "
                "name, tags, ignore, id or port"
            )
        if text in INTERNAL_META_KEYS:
            raise ValueError(
                f"{key[:80]!r} is set by discoverd itself (an internal metadata key), never "
                "from a label"
            )
        found.append(text)
    return tuple(dict.fromkeys(found))
