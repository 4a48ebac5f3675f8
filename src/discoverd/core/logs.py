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

import json
import logging
from datetime import UTC, datetime
from types import TracebackType

from discoverd.core.model import ServiceInstance

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


#: Fields a log call may attach (``log.info(..., extra={"service": name})``); the JSON format
#: writes them as keys of their own.
FIELDS = ("service", "instance", "container", "host", "proxy", "registry")


def fields(instance: ServiceInstance) -> dict[str, str]:
    """The ``extra=`` of a log call about ``instance``: its service, id, container and host."""
    parts = instance.id.split(":")
    found = {"service": instance.service, "instance": instance.id}
    if len(parts) == 4:  # <host id>:<container, 12 chars>:<private port>:<protocol>
        found["container"] = parts[1]
    if instance.host_id:
        found["host"] = instance.host_id
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``message``,
    the :data:`FIELDS` a record carries, and ``exception`` (the traceback) when there is one.
    Every value is a JSON string, so nothing from outside can break the line."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                document[name] = str(value)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created, tz=UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at ``level``: every record on one line (see :class:`OneLineFormatter`),
    or, with ``log_format="json"``, one JSON object per line (:class:`JsonFormatter`). Called
    again (a reload), it changes the level and format of the handler it installed."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    formatter: logging.Formatter = (
        JsonFormatter() if log_format == "json" else OneLineFormatter(FORMAT)
    )
    ours = [h for h in root.handlers if getattr(h, "discoverd", False)]
    if not ours:
        stream = logging.StreamHandler()
        stream.discoverd = True  # type: ignore[attr-defined]
        root.addHandler(stream)
        ours = [stream]
    for each in ours:
        each.setFormatter(formatter)
