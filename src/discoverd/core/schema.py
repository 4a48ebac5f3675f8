"""Typed configuration: one frozen dataclass per plugin (and one for the core), a field an option.

A plugin declares each option once, as a field made with :func:`option`::

    @dataclass(frozen=True)
    class RedisConfig:
        url: str = option("redis://127.0.0.1:6379", "Server URL.", env=("REDIS_URL",))
        ttl: int = option(15, "Seconds before a dead host's entries expire.", min=1)

and names the class in its record (``RegistryPlugin(..., config=RedisConfig)``). From that one
declaration the core derives the ``[redis]`` section of the config file, the environment
variables (``DISCOVERD_REDIS_TTL``, and the aliases in ``env``), ``--set redis.ttl=30``, the
conversion of text to the field's type, the range and rule checks, error messages naming where a
bad value was set, the options list of ``discoverd plugins --json`` and the documentation table.
The factory receives an instance of the class (``ctx.config``), checked.

Field types: ``str``, ``int``, ``float``, ``bool``, ``tuple[str, ...]`` (a list in the file,
comma-separated text in a variable or flag) and ``Literal["a", "b"]`` (one of those words).
Options that only make sense together are checked in the class's ``__post_init__``, which raises
:class:`~discoverd.core.errors.OptionError` naming the keys involved.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from discoverd.core.errors import ConfigError, OptionError

T = TypeVar("T")
C = TypeVar("C")

#: A rule for one value: returns the value (possibly normalised) or raises ``ValueError`` with
#: the rule it breaks ("must be an IP address").
Check = Callable[[Any], Any]

Kind = Literal["string", "integer", "number", "boolean", "list", "choice"]
_METADATA_KEY = "discoverd.option"
_EXPECTED: dict[str, str] = {
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "list": "a list of strings (or a comma-separated string)",
}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


@dataclass(frozen=True)
class _Declared:
    help: str
    env: tuple[str, ...]
    checks: tuple[Check, ...]
    min: float | None
    max: float | None
    secret: bool


def option(
    default: T,
    help: str,
    *,
    env: Sequence[str] = (),
    check: Check | Sequence[Check] = (),
    min: float | None = None,
    max: float | None = None,
    secret: bool = False,
) -> T:
    """Declare one option: a dataclass field with its default, its help text, extra
    environment variables read for it (first match wins, after ``DISCOVERD_<SECTION>_<KEY>``),
    rules (``min``/``max`` for numbers; ``check``: one callable or several, applied in order,
    each returning the value or raising ``ValueError`` with the rule) and whether it is a
    ``secret`` (never shown in errors, logs or ``discoverd config``)."""
    checks = (check,) if callable(check) else tuple(check)
    declared = _Declared(help, tuple(env), checks, min, max, secret)
    field: Any = dataclasses.field(
        default=default, repr=not secret, metadata={_METADATA_KEY: declared}
    )
    return typing.cast(T, field)


@dataclass(frozen=True)
class OptionInfo:
    """One option as the core sees it, derived from a field declared with :func:`option`."""

    name: str
    kind: Kind
    default: Any
    help: str
    env: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    secret: bool = False
    checks: tuple[Check, ...] = ()

    @property
    def type_name(self) -> str:
        """What the documentation calls the type: ``integer``, ``one of tcp, http``, ..."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        return "list of strings" if self.kind == "list" else self.kind

    def expected(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        return _EXPECTED[self.kind]

    def show(self, value: Any) -> str:
        """``value`` for a message: ``***`` for a secret that is set, and the credentials of a
        URL (``http://user:pass@host``) blanked out."""
        if self.secret and value not in ("", None):
            return "'***'"
        if isinstance(value, tuple):
            return repr([redact_url(v) if isinstance(v, str) else v for v in value])
        return repr(redact_url(value) if isinstance(value, str) else value)

    def convert(self, value: Any) -> Any:
        """``value`` (from TOML, or text from a variable or a flag) in the field's type;
        ``ValueError`` (naming what was expected) if it is not one."""
        kind = self.kind
        if kind == "boolean":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE:
                return True
            if isinstance(value, str) and value.strip().lower() in _FALSE:
                return False
        elif kind == "integer":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            digits = value.strip().lstrip("-") if isinstance(value, str) else ""
            if digits.isascii() and digits.isdigit():
                return int(value)
        elif kind == "number":
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif kind == "list":
            if isinstance(value, str):
                return tuple(part.strip() for part in value.split(",") if part.strip())
            if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                return tuple(value)
        elif kind == "choice":
            if isinstance(value, bool) and ("true" if value else "false") in self.choices:
                return "true" if value else "false"  # TOML's true / false for such a choice
            if isinstance(value, str):
                text = value.strip()
                for choice in self.choices:
                    if text == choice or text.lower() == choice.lower():
                        return choice
        elif isinstance(value, str):
            return value
        raise ValueError(f"expected {self.expected()}, got {self.show(value)}")

    def check(self, value: Any) -> Any:
        """Apply the declared rules; returns the (possibly normalised) value, or raises
        ``ValueError`` with the rule."""
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        low, high = self.min, self.max
        if (low is not None and value < low) or (high is not None and value > high):
            if low is not None and high is not None:
                raise ValueError(f"must be from {low:g} to {high:g}")
            if low is not None:
                raise ValueError(f"must be at least {low:g}")
            raise ValueError(f"must be at most {high:g}")
        for rule in self.checks:
            value = rule(value)
        return value

    def as_dict(self) -> dict[str, Any]:
        """For ``discoverd plugins --json``: name, type, default, help, variables, rules."""
        default = list(self.default) if isinstance(self.default, tuple) else self.default
        return {
            "name": self.name,
            "type": self.kind,
            "choices": list(self.choices),
            "default": "***" if self.secret and default else default,
            "help": self.help,
            "env": list(self.env),
            "min": self.min,
            "max": self.max,
            "secret": self.secret,
        }


_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def redact_url(text: str) -> str:
    """``text`` with the credentials of any URL in it replaced (``http://***@host:2379``)."""
    return _USERINFO.sub("***@", text)


def _kind_of(hint: Any, where: str) -> tuple[Kind, tuple[str, ...]]:
    if hint is str:
        return "string", ()
    if hint is bool:
        return "boolean", ()
    if hint is int:
        return "integer", ()
    if hint is float:
        return "number", ()
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is tuple and args in ((str, ...),):
        return "list", ()
    if origin is Literal and args and all(isinstance(a, str) for a in args):
        return "choice", tuple(args)
    raise TypeError(
        f"{where}: option type {hint!r} is not supported "
        "(str, int, float, bool, tuple[str, ...] or Literal of strings)"
    )


_OPTIONS: dict[type, tuple[OptionInfo, ...]] = {}


def options_of(cls: type) -> tuple[OptionInfo, ...]:
    """The options a configuration class declares, in field order. ``TypeError`` for a class
    that is not a frozen dataclass of supported fields (a mistake of the plugin's author)."""
    found = _OPTIONS.get(cls)
    if found is None:
        found = _OPTIONS[cls] = _declared_options(cls)
    return found


def _declared_options(cls: type) -> tuple[OptionInfo, ...]:
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__qualname__}: a configuration class must be a frozen dataclass")
    hints = typing.get_type_hints(cls)
    found: list[OptionInfo] = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        where = f"{cls.__qualname__}.{field.name}"
        if field.default is dataclasses.MISSING:
            raise TypeError(f"{where}: every option needs a default (declare it with option())")
        declared = field.metadata.get(_METADATA_KEY) or _Declared("", (), (), None, None, False)
        kind, choices = _kind_of(hints[field.name], where)
        found.append(
            OptionInfo(
                name=field.name,
                kind=kind,
                default=field.default,
                help=declared.help,
                env=declared.env,
                choices=choices,
                min=declared.min,
                max=declared.max,
                secret=declared.secret,
                checks=declared.checks,
            )
        )
    return tuple(found)


@dataclass(frozen=True)
class NoOptions:
    """The configuration of a plugin that declares no options."""


def label(section: str, key: str) -> str:
    """How messages name a key: ``etcd.ttl``, or just ``min_wait`` for the core's own."""
    return f"{section}.{key}" if section else key


def build_config(
    cls: type[C],
    values: Mapping[str, Any],
    *,
    section: str = "",
    origins: Mapping[str, str] | None = None,
) -> C:
    """An instance of ``cls`` from ``values`` (converted and checked; missing keys take their
    defaults). ``ConfigError`` for the first value that breaks a rule, naming the key, where it
    was set (``origins``: key -> "config file x.toml", ...) and the rule. ``section`` is the
    plugin name ("" for the core's own settings).

    Also what a plugin's tests use to build a checked configuration from plain values::

        config = build_config(HAProxyConfig, {"stats_port": "0"})
    """
    where = dict(origins or {})
    infos = {info.name: info for info in options_of(cls)}
    unknown = sorted(set(values) - set(infos))
    if unknown:
        raise ConfigError(unknown_key(section, unknown[0], infos, where.get(unknown[0], "")))
    checked: dict[str, Any] = {}
    for name, info in infos.items():
        raw = values.get(name, info.default)
        origin = where.get(name, "default value" if name not in values else "")
        prefix = f"{origin}: " if origin else ""
        key = label(section, name)
        try:
            value = info.convert(raw)
        except ValueError as exc:
            raise ConfigError(f"{prefix}key {key!r}: {exc}") from None
        try:
            checked[name] = info.check(value)
        except ValueError as exc:
            raise ConfigError(f"{prefix}key {key!r} = {info.show(value)}: {exc}") from None
    try:
        return cls(**checked)
    except OptionError as exc:
        named = "; ".join(f"{k}: {where[k]}" for k in exc.keys if k in where)
        suffix = f" ({named})" if named else ""
        head = f"[{section}] " if section else ""
        raise ConfigError(f"{head}{exc}{suffix}") from None


def unknown_key(
    section: str, key: str, infos: Mapping[str, OptionInfo] | Iterable[str], origin: str = ""
) -> str:
    known = ", ".join(infos) or "none"
    where = f"[{section}]" if section else "the top level"
    prefix = f"{origin}: " if origin else ""
    return f"{prefix}unknown key {label(section, key)!r} in {where}. Known keys: {known}."


def env_names(section: str, info: OptionInfo) -> tuple[str, ...]:
    """The environment variables read for an option, first match wins:
    ``DISCOVERD_<SECTION>_<KEY>`` (``DISCOVERD_<KEY>`` for the core's own), then its aliases."""
    if section:
        own = f"DISCOVERD_{section.upper().replace('-', '_')}_{info.name.upper()}"
    else:
        own = f"DISCOVERD_{info.name.upper()}"
    return (own, *info.env)


def values_of(config: object) -> dict[str, Any]:
    """The option values of a configuration object, by name."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}  # type: ignore[arg-type]


def options_table(cls: type, section: str = "") -> str:
    """The options of ``cls`` as a Markdown table (key, type, default, variables, help)."""
    rows = ["| key | type | default | environment | meaning |", "| --- | --- | --- | --- | --- |"]
    for info in options_of(cls):
        default = info.default
        shown = ", ".join(default) if isinstance(default, tuple) else str(default)
        if isinstance(default, bool):
            shown = shown.lower()
        shown = f"`{shown}`" if shown else "(empty)"
        variables = ", ".join(f"`{name}`" for name in env_names(section, info))
        text = info.help.replace("|", "\\|")
        if info.min is not None and info.max is not None:
            text += f" From {info.min:g} to {info.max:g}."
        elif info.min is not None:
            text += f" At least {info.min:g}."
        elif info.max is not None:
            text += f" At most {info.max:g}."
        if info.secret:
            text += " Secret: never shown."
        rows.append(f"| `{info.name}` | {info.type_name} | {shown} | {variables} | {text} |")
    return "\n".join(rows) + "\n"
