"""Every log record is one line, whatever the values from outside put in it."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from discoverd.core.agent import configure_logging
from discoverd.core.logs import FORMAT, OneLineFormatter, escape


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A discoverd logger writing through a OneLineFormatter into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter(FORMAT))
    logger = logging.getLogger("discoverd.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text, with spaces", "plain text, with spaces"),
        ("a\nb", "a\\nb"),
        ("a\r\nb\tc", "a\\r\\nb\\tc"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("a\u2028b\u0085c", "a\\u2028b\\x85c"),
        ("evil\u202eTXT", "evil\\u202eTXT"),
        ("caf\u00e9 \u65e5\u672c", "caf\u00e9 \u65e5\u672c"),
    ],
)
def test_escape(text: str, shown: str) -> None:
    assert escape(text) == shown


def test_a_value_with_a_newline_cannot_forge_a_line(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    forged = "web\n2024-01-01 00:00:00,000 WARNING discoverd: forged line"
    logger.warning("etcd: key %s ignored (%r)", forged, {"id": "a\rb"})
    logger.info("label %s", "SERVICE_\u2029X")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(
        "etcd: key web\\n2024-01-01 00:00:00,000 WARNING discoverd: forged line ignored "
        "({'id': 'a\\rb'})"
    )
    assert lines[1].endswith("label SERVICE_\\u2029X")


def test_tracebacks_keep_their_lines_but_each_is_indented(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    try:
        raise ValueError("bad\nWARNING discoverd: forged")
    except ValueError:
        logger.exception("plugin failed: %s", "x\ny")
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("plugin failed: x\\ny")
    assert rest and all(line.startswith("  ") for line in rest)
    assert rest[-1] == "  WARNING discoverd: forged"  # a continuation, not a record


def test_configure_logging_installs_the_formatter(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    configure_logging("debug")
    [handler] = root.handlers
    assert isinstance(handler.formatter, OneLineFormatter)
    assert root.level == logging.DEBUG
    stream = io.StringIO()
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logging.getLogger("discoverd.docker").warning("container %s", "a\nb")
    assert stream.getvalue().count("\n") == 1 and "container a\\nb" in stream.getvalue()


def test_the_json_format_is_one_object_per_line_with_the_fields() -> None:
    import json
    import logging

    from discoverd.core.logs import JsonFormatter

    record = logging.LogRecord(
        "discoverd", logging.WARNING, __file__, 1, "refused %s", ("a\nforged line",), None
    )
    record.service = "web"
    record.container = "c0ffee"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    document = json.loads(line)
    assert document["level"] == "warning" and document["logger"] == "discoverd"
    assert document["message"] == "refused a\nforged line"  # escaped by JSON, not lost
    assert document["service"] == "web" and document["container"] == "c0ffee"
    assert document["time"].endswith("Z") and "instance" not in document
