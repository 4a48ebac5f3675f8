"""Reading a plugin's option values at factory time, with one-line errors naming the key.

The core already converts each value to its ``Option.type``; a plugin still checks what the
type cannot say (a range, an address, a duration in its proxy's format)::

    read = OptionReader("haproxy", ctx.options)
    port = read.number("stats_port", 1936, 0, 65535)
    bind = read.address("bind", "")

Every refusal is a ``PluginError`` such as ``haproxy option stats_port=70000: must be a whole
number from 0 to 65535``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from typing import Any

from discoverd.core.interfaces import PluginError


class OptionReader:
    """Checks the options of the plugin named ``plugin`` (its name starts every message)."""

    def __init__(self, plugin: str, options: Mapping[str, Any]) -> None:
        self.plugin = plugin
        self.options = options

    def fail(self, name: str, value: object, rule: str) -> PluginError:
        return PluginError(f"{self.plugin} option {name}={value!r}: {rule}")

    def text(self, name: str, default: str) -> str:
        """Printable text on one line, stripped."""
        value = self.options.get(name, default)
        if not isinstance(value, str):
            raise self.fail(name, value, "must be text")
        if not value.isprintable():
            raise self.fail(name, value, "must not contain line breaks or control characters")
        return value.strip()

    def number(self, name: str, default: int, low: int, high: int) -> int:
        """A whole number from ``low`` to ``high``."""
        value = self.options.get(name, default)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(name, value, f"must be a whole number from {low} to {high}")
        return value

    def seconds(self, name: str, default: float, high: float) -> float:
        """A number of seconds from 0 to ``high`` (NaN and infinities refused)."""
        value = self.options.get(name, default)
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise self.fail(name, value, "must be a number of seconds") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(name, value, "must be a number of seconds")
        if not math.isfinite(value) or not 0 <= value <= high:
            raise self.fail(name, value, f"must be a number of seconds from 0 to {high:g}")
        return float(value)

    def address(self, name: str, default: str) -> str:
        """An IP address, normalised; ``""`` (every interface) when empty."""
        value = self.text(name, default)
        if not value:
            return ""
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise self.fail(
                name, value, "must be an IP address (or empty for every interface)"
            ) from None

    def duration(
        self, name: str, default: str, pattern: re.Pattern[str], flavour: str, positive: bool
    ) -> str:
        """A duration written for a proxy (``500ms``, ``2s``), matching ``pattern``; ``flavour``
        names the format in the message ("HAProxy's")."""
        value = self.text(name, default)
        if not pattern.fullmatch(value):
            raise self.fail(
                name, value, f"must be a duration in {flavour} format, e.g. 500ms, 2s, 1m"
            )
        digits = re.match(r"\d+", value)
        if positive and digits is not None and int(digits.group()) == 0:
            raise self.fail(name, value, "must be longer than zero")
        return value
