"""Settings from a TOML file, the environment and flags (flags > environment > file > defaults).

The core's own keys (:class:`CoreConfig`) live at the top level of the file; each plugin has a
section named after it (``[etcd]``, ``[haproxy]``, ...) whose keys are the fields of the
configuration class in its record (see :mod:`discoverd.core.schema`). Every value is converted
to its field's type as it is read, so a value of the wrong type fails at once, naming where it
came from (file and key, environment variable, or flag). A plugin's rules are checked when its
configuration is built (:meth:`Settings.config_for`): only the plugins an agent uses must have
good values, and an error then names where each offending value was set.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from discoverd.core.errors import ConfigError, OptionError, ValidationError
from discoverd.core.model import INSTANCE_ID_RE, HostInfo, check_path
from discoverd.core.schema import (
    OptionInfo,
    build_config,
    env_names,
    label,
    option,
    options_of,
    redact_url,
    unknown_key,
)
from discoverd.core.validators import (
    host_address,
    host_id,
    listen_address,
    meta_keys,
    port_ranges,
    service_images,
)

__all__ = ["ConfigError", "CoreConfig", "Settings", "default_state_dir", "load_settings"]


def default_state_dir() -> Path:
    """Root: ``/run/discoverd``. Otherwise ``$XDG_RUNTIME_DIR/discoverd``, else
    ``~/.local/state/discoverd``."""
    if os.geteuid() == 0:
        return Path("/run/discoverd")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "discoverd"
    return Path.home() / ".local" / "state" / "discoverd"


def _check_path(value: str) -> str:
    try:
        return check_path(value)
    except ValidationError as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class CoreConfig:
    """The core's own settings: the top level of the config file, ``DISCOVERD_<KEY>``."""

    source: str = option("docker", "Container source plugin (register role).")
    registry: str = option("etcd", "Registry plugin.")
    proxy: str = option("haproxy", "Proxy plugin (discover role).")
    host_ip: str = option(
        "",
        "Address other hosts reach this host's published ports on (the seed's HOST_IP). "
        "Empty: the address of each port binding; ports published on 0.0.0.0 then need it.",
        env=("HOST_IP",),
        check=host_address,
    )
    host_id: str = option("", "Stable id of this agent (default: the host name).", check=host_id)
    state_dir: str = option(
        "",
        "Where rendered configs, pid files and sockets go "
        "(default: /run/discoverd as root, else $XDG_RUNTIME_DIR/discoverd).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = option(
        "info", "debug, info, warning or error."
    )
    log_format: Literal["text", "json"] = option(
        "text",
        "text (one line per record, values from outside escaped) or json (one object per "
        "line: time, level, logger, message, and the service, instance or container it is "
        "about).",
    )
    listen: str = option(
        "127.0.0.1:9275",
        "Address of the agent's HTTP endpoint (/healthz/live, /healthz/ready, /metrics), "
        "host:port; empty: no endpoint. Loopback by default: put a proxy or a firewall in "
        "front of it before opening it to the network.",
        check=listen_address,
    )
    default_mode: Literal["auto", "tcp", "http"] = option(
        "auto",
        "Proxy mode of a service whose instances do not say (label SERVICE_MODE): auto (the "
        "register role asks each new instance, once, from inside its container, whether it "
        "answers in HTTP/1; a service is proxied in http mode, with replays of idempotent "
        "requests, when every instance so checked does, else tcp), or tcp or http for every "
        "such service (no detection). Set it the same on every host.",
    )
    min_wait: float = option(0.02, "Quiescence window: seconds of calm before acting.", min=0)
    max_wait: float = option(0.5, "Longest a burst of events may delay acting, in seconds.", min=0)
    retry_max: float = option(
        10.0, "Longest backoff between retries after an error, seconds.", min=0.001
    )
    resync_interval: float = option(
        30.0,
        "Each role makes a full pass this often even without events (0: never): register "
        "re-reads its source (writing to the registry only what differs), discover re-reads "
        "the registry and starts the proxy again if it died.",
        min=0,
    )
    check: Literal["tcp", "http", "none"] = option(
        "tcp",
        "Readiness check before an instance is registered: tcp, http or none (labels "
        "SERVICE_CHECK, SERVICE_CHECK_HTTP, SERVICE_CHECK_TCP override it per container).",
    )
    check_path: str = option(
        "/", "Path of the HTTP readiness check (check = http).", check=_check_path
    )
    check_interval: float = option(
        2.0, "Seconds between two checks of a ready instance.", min=0.05, max=3600
    )
    check_timeout: float = option(
        1.0, "Seconds a check may take before it counts as failed.", min=0.05, max=3600
    )

    expose: Literal["all", "labelled"] = option(
        "all",
        "Which published ports the register role registers: all, or labelled (only those "
        "whose container asks with SERVICE_NAME or SERVICE_<port>_NAME, like registrator's "
        "-explicit).",
    )
    frontend_ports: str = option(
        "1-65535",
        "Frontend ports this host's containers may ask for (SERVICE_PORT, or the private "
        "port by default), as ranges: 8000-8999,9100. A port outside is refused.",
        check=port_ranges,
    )
    service_images: tuple[str, ...] = option(
        (),
        "Services only some images may join: SERVICE=REPOSITORY entries "
        "(web=registry.example.com/team/web, or a folder: web=registry.example.com/team/*). "
        "A container of another image naming itself so is refused; services not listed are "
        "open to any container.",
        check=service_images,
    )
    meta_keys: tuple[str, ...] = option(
        (),
        "Metadata keys published beside the documented ones (mode, drain, check...), for "
        "user templates: weight publishes SERVICE_WEIGHT. Other SERVICE_* keys are ignored.",
        check=meta_keys,
    )
    single_machine: bool = option(
        False,
        "Every agent runs on this one machine (tests, demos): backends on loopback addresses "
        "are routed whichever host id registered them, and a port published on loopback only "
        "is registered without HOST_IP. Off: a loopback backend is routed only by the proxy "
        "of the host that registered it.",
    )
    local_direct: Literal["auto", "true", "false"] = option(
        "auto",
        "The discover role reaches this host's own instances at their container address "
        "(the container's IP and private port, which the register role publishes beside the "
        "published port) once a TCP connect from this host shows it reachable, skipping the "
        "published port's forwarder (docker-proxy); other hosts' instances keep their "
        "published port. auto: when the proxy plugin asks for it (HAProxy does: it checks "
        "its servers and moves one between addresses without a reload; nginx does not: "
        "without active checks, a container that is gone or whose listen queue is full "
        "costs each request a connect timeout there, where the published port refuses at "
        "once). true: always; false: every instance at its published port.",
    )

    removal_hold: float = option(
        30.0,
        "When one pass would take away half or more of a service's instances at once (leases "
        "that expired while the registry was away, an agent restarted after its TTL), those "
        "that still answer a probe from this host keep being served for up to this many "
        "seconds while their hosts register them again; 0: off.",
        min=0,
        max=3600,
    )

    def __post_init__(self) -> None:
        if self.min_wait > self.max_wait:
            raise OptionError(
                f"min_wait ({self.min_wait:g}) and max_wait ({self.max_wait:g}): "
                "expected 0 <= min_wait <= max_wait",
                "min_wait",
                "max_wait",
            )


CORE_OPTIONS: tuple[OptionInfo, ...] = options_of(CoreConfig)


@dataclass
class Settings:
    """The merged settings: the core's (checked) and each plugin's values (converted; checked
    when :meth:`config_for` builds the plugin's configuration)."""

    core: CoreConfig
    #: Each plugin's configuration class, by plugin name (its config-file section).
    schemas: dict[str, type[Any]] = field(default_factory=dict)
    #: The values set for each plugin (file, variables, flags), converted to their types.
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_file: Path | None = None
    #: Where each value that is not a default came from: ``(section, key) -> origin``
    #: ("config file x.toml", "environment variable DISCOVERD_ETCD_TTL", ...); the core's own
    #: keys have the section ``""``.
    origins: dict[tuple[str, str], str] = field(default_factory=dict)
    _built: dict[str, Any] = field(default_factory=dict, repr=False)

    def config_for(self, plugin: str) -> Any:
        """The checked configuration object of ``plugin`` (built once). ``ConfigError`` names
        each offending key and where it was set."""
        if plugin not in self._built:
            cls = self.schemas[plugin]
            origins = {
                key: origin for (sect, key), origin in self.origins.items() if sect == plugin
            }
            self._built[plugin] = build_config(
                cls, self.values.get(plugin, {}), section=plugin, origins=origins
            )
        return self._built[plugin]

    def origin(self, section: str, key: str) -> str:
        """Where a value was set ("config file x.toml", ...), or "default"."""
        return self.origins.get((section, key), "default")

    @property
    def state_dir(self) -> Path:
        return Path(self.core.state_dir) if self.core.state_dir else default_state_dir()

    def host(self) -> HostInfo:
        return HostInfo(ip=self.core.host_ip, id=self.core.host_id or _hostname())


def _hostname() -> str:
    name = socket.gethostname().split(".")[0] or "localhost"
    return name if INSTANCE_ID_RE.fullmatch(name) else "host"


def read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None


class _Collector:
    """Gathers converted values and their origins, section by section ("" is the core)."""

    def __init__(self, tables: Mapping[str, tuple[OptionInfo, ...]]) -> None:
        self.tables = tables
        self.values: dict[str, dict[str, Any]] = {section: {} for section in tables}
        self.origins: dict[tuple[str, str], str] = {}

    def assign(self, section: str, key: str, value: Any, origin: str) -> None:
        if section not in self.tables:
            known = ", ".join(sorted(s for s in self.tables if s)) or "none"
            raise ConfigError(f"{origin}: unknown section {section!r}. Known: {known}.")
        info = next((o for o in self.tables[section] if o.name == key), None)
        if info is None:
            names = [o.name for o in self.tables[section]]
            raise ConfigError(unknown_key(section, key, names, origin))
        try:
            self.values[section][key] = info.convert(value)
        except ValueError as exc:
            raise ConfigError(f"{origin}: key {label(section, key)!r}: {exc}") from None
        self.origins[(section, key)] = origin


def load_settings(
    schemas: Mapping[str, type[Any]],
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    sets: Iterable[str] = (),
) -> Settings:
    """Merge defaults, the file, the environment and flags, in that order of precedence.

    ``schemas`` maps each plugin name to its configuration class. ``flags`` holds core keys
    given on the command line (``None`` values are ignored); ``sets`` holds
    ``section.key=value`` overrides (``--set etcd.ttl=30``), applied last.
    """
    env = os.environ if env is None else env
    tables: dict[str, tuple[OptionInfo, ...]] = {"": CORE_OPTIONS}
    tables.update({name: options_of(cls) for name, cls in schemas.items()})
    collected = _Collector(tables)

    if config_file is None and env.get("DISCOVERD_CONFIG"):
        config_file = Path(env["DISCOVERD_CONFIG"])
    if config_file is not None:
        data = read_file(config_file)
        origin = f"config file {config_file}"
        for key, value in data.items():
            if isinstance(value, dict):
                if key not in schemas:
                    known = ", ".join(sorted(schemas)) or "none"
                    raise ConfigError(
                        f"config file {config_file}: unknown section [{key}]. "
                        f"Sections of installed plugins: {known}."
                    )
                for sub, subvalue in value.items():
                    collected.assign(key, sub, subvalue, origin)
            else:
                collected.assign("", key, value, origin)

    for section, infos in tables.items():
        for info in infos:
            for name in env_names(section, info):
                if name in env:
                    collected.assign(section, info.name, env[name], f"environment variable {name}")
                    break

    for key, value in (flags or {}).items():
        if value is not None:
            collected.assign("", key, value, "command line")

    for item in sets:
        target, sep, raw = item.partition("=")
        section, _, key = target.strip().rpartition(".")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. etcd.ttl=30")
        shown = f"{target}=***" if _is_secret(tables, section, key) else redact_url(item)
        collected.assign(section, key, raw, f"--set {shown!r}")

    core_origins = {key: origin for (sect, key), origin in collected.origins.items() if not sect}
    core = build_config(CoreConfig, collected.values.pop(""), origins=core_origins)
    return Settings(
        core=core,
        schemas=dict(schemas),
        values=collected.values,
        source_file=config_file,
        origins=collected.origins,
    )


def _is_secret(tables: Mapping[str, tuple[OptionInfo, ...]], section: str, key: str) -> bool:
    return any(o.name == key and o.secret for o in tables.get(section, ()))
