"""How discoverd writes its log: one line per record, whatever the values in it.

Much of what discoverd logs comes from outside: container names and labels, etcd keys, Consul
ids, Docker events. A newline in one of them would start what looks like a record of its own
(a forged ``... WARNING discoverd: ...`` line), and terminal escapes or bidirectional controls
could hide text. :class:`OneLineFormatter` renders every such character of a message visibly
(``\\n``, ``\\x1b``, ``\\u202e``); a traceback keeps its lines, each indented, so none of them
can pass for a record either. :func:`configure_logging` installs it on the handler every
discoverd logger writes to.
"""

from __future__ import annotations

import logging
from types import TracebackType

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """``text`` with every character that is not printable on one line (controls, line and
    paragraph separators, format characters such as bidirectional overrides) written as an
    escape: ``"a\\nb"`` -> ``"a\\\\nb"``. Spaces and printable text stay as they are."""
    if text.isprintable():
        return text
    out: list[str] = []
    for char in text:
        if char.isprintable() or char == " ":
            out.append(char)
        elif char in _NAMED:
            out.append(_NAMED[char])
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


class OneLineFormatter(logging.Formatter):
    """A formatter whose message part is always one line (see :func:`escape`); tracebacks and
    stack traces are indented by two spaces, line by line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(
        self,
        ei: tuple[type[BaseException], BaseException, TracebackType | None]
        | tuple[None, None, None],
    ) -> str:
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indent(super().formatStack(stack_info))


def _indent(text: str) -> str:
    return "\n".join("  " + escape(line) for line in text.splitlines())


def configure_logging(level: str) -> None:
    """Log to stderr at ``level``, every record on one line (see :class:`OneLineFormatter`)."""
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=FORMAT)
    for handler in root.handlers:
        if handler not in before:
            handler.setFormatter(OneLineFormatter(FORMAT))
