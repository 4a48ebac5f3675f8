"""A proxy's own log file, and turning what a proxy printed into a one-line reason."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class LogFile:
    """A log file the proxy appends to (``O_APPEND``), read by offset and kept short.

    Before an action, note ``size()``; afterwards ``since(offset)`` is what the proxy wrote about
    it. ``trim()`` empties the file once it is over ``max_bytes``: safe while the proxy writes,
    since a writer in append mode always writes at the current end."""

    def __init__(self, path: Path, *, max_bytes: int = 1 << 20) -> None:
        self.path = path
        self.max_bytes = max_bytes

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def since(self, offset: int, *, limit: int = 256 * 1024) -> str:
        """At most ``limit`` bytes written after ``offset``, decoded (bad bytes replaced)."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(offset)
                return handle.read(limit).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def trim(self) -> None:
        """Empty the file if it is over ``max_bytes``."""
        if self.size() > self.max_bytes:
            with open(self.path, "r+b") as handle:
                handle.truncate(0)


def last_lines(text: str, count: int = 5) -> list[str]:
    """The last ``count`` non-blank lines of ``text``, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()][-count:]


def summarise(
    messages: Iterable[str], *, limit: int = 8, width: int = 300, distinct: bool = True
) -> list[str]:
    """``messages`` in order, each shortened to ``width`` characters, at most ``limit`` (the
    last one then says how many more there were); with ``distinct``, repeats are dropped."""
    kept: list[str] = []
    for message in messages:
        short = message if len(message) <= width else message[: width - 3] + "..."
        if not distinct or short not in kept:
            kept.append(short)
    if len(kept) > limit:
        kept = [*kept[: limit - 1], f"... ({len(kept) - limit + 1} more)"]
    return kept
