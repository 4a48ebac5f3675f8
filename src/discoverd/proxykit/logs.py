"""A proxy's own log file, and turning what a proxy printed into a one-line reason."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


class LogFile:
    """A log file the proxy writes to, read by offset and kept short.

    Before an action, note ``size()``; afterwards ``since(offset)`` is what the proxy wrote about
    it. ``trim()`` empties the file once it is over ``max_bytes``: safe while the proxy writes.
    A writer in append mode (``O_APPEND``, as the file is opened for the proxy) goes on at the
    new end. A writer that cleared that flag on the shared file description goes on at its own
    offset, and the bytes before it read back as zeros: HAProxy does so when its configuration
    logs to ``stdout``, setting the descriptor non-blocking. The file is then sparse (the zeros
    take no disk space, so trimming still bounds it) and ``since()`` skips them."""

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
                handle.seek(_data_from(handle.fileno(), offset))
                data = handle.read(limit).lstrip(b"\0")
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", errors="replace")

    def trim(self) -> None:
        """Empty the file if it is over ``max_bytes``."""
        if self.size() > self.max_bytes:
            with open(self.path, "r+b") as handle:
                handle.truncate(0)


def _data_from(fd: int, offset: int) -> int:
    """The first offset at or after ``offset`` that holds data rather than a hole (``offset``
    itself on a file system that cannot tell, or if there is no data after it)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:  # ENXIO: nothing but a hole after offset; EINVAL: not supported
        return offset


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
