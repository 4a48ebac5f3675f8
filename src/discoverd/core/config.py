"""Settings from a TOML file, the environment and flags (flags > environment > file > defaults).

Core keys live at the top level of the file; each plugin has a section named after it
(``[etcd]``, ``[haproxy]``, ...) whose keys are the plugin's declared ``Option``s. Every value is
checked against its declared type, and an error names where the value came from (file and key,
environment variable, or flag) and what was expected.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from discoverd.core.health import CHECK_KINDS, check_path
from discoverd.core.interfaces import HostInfo, Option
from discoverd.core.model import INSTANCE_ID_RE, ValidationError, check_address


class ConfigError(Exception):
    """A configuration value or file that cannot be used; the message is for the operator."""


def default_state_dir() -> Path:
    """Root: ``/run/discoverd``. Otherwise ``$XDG_RUNTIME_DIR/discoverd``, else
    ``~/.local/state/discoverd``."""
    if os.geteuid() == 0:
        return Path("/run/discoverd")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "discoverd"
    return Path.home() / ".local" / "state" / "discoverd"


CORE_OPTIONS: tuple[Option, ...] = (
    Option("source", str, "docker", "Container source plugin (register role)."),
    Option("registry", str, "etcd", "Registry plugin."),
    Option("proxy", str, "haproxy", "Proxy plugin (discover role)."),
    Option(
        "host_ip",
        str,
        "",
        "Address other hosts reach this host's published ports on (the seed's HOST_IP). "
        "Empty: the address of each port binding; ports published on 0.0.0.0 then need it.",
        env=("HOST_IP",),
    ),
    Option("host_id", str, "", "Stable id of this agent (default: the host name).", env=()),
    Option(
        "state_dir",
        str,
        "",
        "Where rendered configs, pid files and sockets go "
        "(default: /run/discoverd as root, else $XDG_RUNTIME_DIR/discoverd).",
    ),
    Option("log_level", str, "info", "debug, info, warning or error."),
    Option(
        "default_mode",
        str,
        "tcp",
        "Proxy mode of a service whose instances do not say (label SERVICE_MODE): tcp or http.",
    ),
    Option("min_wait", float, 0.02, "Quiescence window: seconds of calm before acting."),
    Option("max_wait", float, 0.5, "Longest a burst of events may delay acting, in seconds."),
    Option("retry_max", float, 10.0, "Longest backoff between retries after an error, seconds."),
    Option(
        "resync_interval",
        float,
        30.0,
        "Each role makes a full pass this often even without events (0: never): register "
        "re-reads its source (writing to the registry only what differs), discover re-reads "
        "the registry and starts the proxy again if it died.",
    ),
    Option(
        "check",
        str,
        "tcp",
        "Readiness check before an instance is registered: tcp, http or none (labels "
        "SERVICE_CHECK, SERVICE_CHECK_HTTP, SERVICE_CHECK_TCP override it per container).",
    ),
    Option("check_path", str, "/", "Path of the HTTP readiness check (check = http)."),
    Option("check_interval", float, 2.0, "Seconds between two checks of a ready instance."),
    Option("check_timeout", float, 1.0, "Seconds a check may take before it counts as failed."),
)
CORE_SECTION = "discoverd"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class Settings:
    """The merged, validated settings. ``plugins`` maps a plugin name to its options."""

    core: dict[str, Any]
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_file: Path | None = None
    #: Where each value that is not a default came from: ``(section, key) -> origin``
    #: ("config file x.toml", "environment variable DISCOVERD_ETCD_TTL", ...).
    origins: dict[tuple[str, str], str] = field(default_factory=dict)

    def origin_hint(self, section: str, message: str) -> str:
        """Where the keys of ``section`` that ``message`` names were set, e.g.
        ``" (ttl: config file discoverd.toml)"``; empty when it names none."""
        named = [
            f"{key}: {origin}"
            for (sect, key), origin in sorted(self.origins.items())
            if sect == section and re.search(rf"\b{re.escape(key)}\b", message)
        ]
        return f" ({'; '.join(named)})" if named else ""

    def __getitem__(self, key: str) -> Any:
        return self.core[key]

    def options_for(self, plugin: str) -> dict[str, Any]:
        return dict(self.plugins.get(plugin, {}))

    @property
    def state_dir(self) -> Path:
        return Path(self.core["state_dir"]) if self.core["state_dir"] else default_state_dir()

    def host(self) -> HostInfo:
        return HostInfo(ip=self.core["host_ip"], id=self.core["host_id"] or _hostname())


def _hostname() -> str:
    name = socket.gethostname().split(".")[0] or "localhost"
    return name if INSTANCE_ID_RE.fullmatch(name) else "host"


def env_name(section: str, key: str) -> str:
    if section == CORE_SECTION:
        return f"DISCOVERD_{key.upper()}"
    return f"DISCOVERD_{section.upper().replace('-', '_')}_{key.upper()}"


def convert(option: Option, value: Any, where: str) -> Any:
    """Convert ``value`` (from TOML, or a string from env/flags) to the option's type."""
    kind = option.type
    expected = {
        str: "a string",
        int: "a whole number",
        float: "a number",
        bool: "true or false",
        list: "a list of strings (or a comma-separated string)",
    }.get(kind, kind.__name__)

    def fail() -> ConfigError:
        return ConfigError(f"{where}: expected {expected}, got {value!r}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise fail()
    if kind is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        digits = value.strip().lstrip("-") if isinstance(value, str) else ""
        if digits.isascii() and digits.isdigit():
            return int(value)
        raise fail()
    if kind is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if kind is list:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise fail()
    if kind is str:
        if isinstance(value, str):
            return value
        raise fail()
    raise ConfigError(f"{where}: option type {kind!r} is not supported")


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


def load_settings(
    schemas: Mapping[str, Iterable[Option]],
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    sets: Iterable[str] = (),
) -> Settings:
    """Merge defaults, the file, the environment and flags, in that order of precedence.

    ``schemas`` maps each plugin name to its options. ``flags`` holds core keys given on the
    command line (``None`` values are ignored); ``sets`` holds ``section.key=value`` overrides
    (``--set etcd.ttl=30``), applied last.
    """
    env = os.environ if env is None else env
    tables: dict[str, tuple[Option, ...]] = {CORE_SECTION: CORE_OPTIONS}
    tables.update({name: tuple(opts) for name, opts in schemas.items()})
    values: dict[str, dict[str, Any]] = {
        section: {o.name: o.default for o in opts} for section, opts in tables.items()
    }
    origins: dict[tuple[str, str], str] = {}

    if config_file is None and env.get("DISCOVERD_CONFIG"):
        config_file = Path(env["DISCOVERD_CONFIG"])
    if config_file is not None:
        data = read_file(config_file)
        origin = f"config file {config_file}"
        for key, value in data.items():
            if isinstance(value, dict):
                if key not in tables:
                    known = ", ".join(sorted(s for s in tables if s != CORE_SECTION)) or "none"
                    raise ConfigError(
                        f"config file {config_file}: unknown section [{key}]. "
                        f"Sections of installed plugins: {known}."
                    )
                for sub, subvalue in value.items():
                    _assign(tables, values, key, sub, subvalue, origin, origins)
            else:
                _assign(tables, values, CORE_SECTION, key, value, origin, origins)

    for section, opts in tables.items():
        for option in opts:
            for name in (env_name(section, option.name), *option.env):
                if name in env:
                    values[section][option.name] = convert(
                        option, env[name], f"environment variable {name}"
                    )
                    origins[(section, option.name)] = f"environment variable {name}"
                    break

    for key, value in (flags or {}).items():
        if value is not None:
            _assign(tables, values, CORE_SECTION, key, value, "command line", origins)

    for item in sets:
        target, sep, raw = item.partition("=")
        section, _, key = target.strip().rpartition(".")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. etcd.ttl=30")
        _assign(tables, values, section or CORE_SECTION, key, raw, f"--set {item!r}", origins)

    core = values.pop(CORE_SECTION)
    settings = Settings(core=core, plugins=values, source_file=config_file, origins=origins)
    try:
        _check_core(core)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{settings.origin_hint(CORE_SECTION, str(exc))}") from None
    return settings


def _assign(
    tables: Mapping[str, tuple[Option, ...]],
    values: dict[str, dict[str, Any]],
    section: str,
    key: str,
    value: Any,
    origin: str,
    origins: dict[tuple[str, str], str],
) -> None:
    if section not in tables:
        known = ", ".join(sorted(tables))
        raise ConfigError(f"{origin}: unknown section {section!r}. Known: {known}.")
    option = next((o for o in tables[section] if o.name == key), None)
    label = key if section == CORE_SECTION else f"{section}.{key}"
    if option is None:
        known = ", ".join(o.name for o in tables[section])
        where = f"[{section}]" if section != CORE_SECTION else "the top level"
        raise ConfigError(f"{origin}: unknown key {label!r} in {where}. Known keys: {known}.")
    values[section][key] = convert(option, value, f"{origin}: key {label!r}")
    origins[(section, key)] = origin


def _check_core(core: dict[str, Any]) -> None:
    if core["host_ip"]:
        try:
            core["host_ip"] = check_address(core["host_ip"])
        except ValidationError as exc:
            raise ConfigError(f"host_ip: {exc}") from None
    if core["host_id"] and not INSTANCE_ID_RE.fullmatch(core["host_id"]):
        raise ConfigError(f"host_id {core['host_id']!r}: only letters, digits and _.:- allowed")
    if core["log_level"].lower() not in LOG_LEVELS:
        levels = ", ".join(LOG_LEVELS)
        raise ConfigError(f"log_level {core['log_level']!r}: expected one of {levels}")
    if core["default_mode"] not in ("tcp", "http"):
        raise ConfigError(f"default_mode {core['default_mode']!r}: expected tcp or http")
    if not 0 <= core["min_wait"] <= core["max_wait"]:
        raise ConfigError(
            f"min_wait ({core['min_wait']}) and max_wait ({core['max_wait']}): "
            "expected 0 <= min_wait <= max_wait"
        )
    if core["check"] not in CHECK_KINDS:
        kinds = ", ".join(CHECK_KINDS)
        raise ConfigError(f"check {core['check']!r}: expected one of {kinds}")
    try:
        check_path(core["check_path"])
    except ValidationError as exc:
        raise ConfigError(f"check_path: {exc}") from None
    for key in ("check_interval", "check_timeout"):
        if not 0.05 <= core[key] <= 3600:
            raise ConfigError(f"{key} ({core[key]}): expected between 0.05 and 3600 seconds")
    if core["resync_interval"] < 0:
        raise ConfigError(f"resync_interval ({core['resync_interval']}): expected 0 or more")
    if core["retry_max"] <= 0:
        raise ConfigError(f"retry_max ({core['retry_max']}): expected a positive number")
