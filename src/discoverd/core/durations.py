"""Durations as operators write them (``10s``, ``500ms``, ``1m``) and as discoverd stores them."""

from __future__ import annotations


def parse_duration(text: str) -> float:
    """``"10s"``, ``"500ms"``, ``"1m"``, ``"2.5"`` (seconds) -> seconds; ``ValueError`` if not."""
    value = text.strip().lower()
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if value.endswith(suffix):
            number, scale = value[: -len(suffix)], factor
            break
    else:
        number, scale = value, 1.0
    try:
        seconds = float(number) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (e.g. 10s, 500ms, 1m)") from None
    if not (0 <= seconds < 86400) or seconds != seconds:
        raise ValueError(f"{text!r} is not a duration between 0 and 24h")
    return seconds


def format_seconds(seconds: float) -> str:
    """A duration as the shortest decimal string of seconds (``10``, ``0.5``)."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".") or "0"
