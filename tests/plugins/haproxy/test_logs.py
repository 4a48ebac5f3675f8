"""HAProxy's own log file (``<state>/haproxy/haproxy.log``) kept short and readable, with the
real haproxy binary writing it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from discoverd.plugins.haproxy.proxy import HAProxy
from tests.plugins.haproxy.conftest import NameServer, http_service
from tests.support.services import free_port, http_get, wait_for

MakeHAProxy = Callable[..., HAProxy]
Backends = Callable[[str], NameServer]


def test_a_template_logging_to_stdout_leaves_the_log_readable_after_a_trim(
    make_haproxy: MakeHAProxy, backends: Backends, tmp_path: Path
) -> None:
    """A template that sends HAProxy's traffic log to stdout (a common way to log in containers)
    makes HAProxy clear the append flag of the file it shares with discoverd. A trim then leaves
    a hole before HAProxy's next line; what it writes after the trim is still read, without the
    hole's zeros."""
    (tmp_path / "haproxy.cfg.j2").write_text(
        '{% extends "default:haproxy.cfg.j2" %}\n'
        "{% block global_extra %}\n    log stdout format raw local0\n{% endblock %}\n"
        "{% block defaults_extra %}\n    log global\n    option httplog\n{% endblock %}\n"
    )
    proxy = make_haproxy(template_dir=str(tmp_path))
    port = free_port()
    services = [http_service("web", port, backends("a"))]
    assert proxy.apply(proxy.render(services), services) == "started"
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/").startswith("I am"), 10, what="web")
    for _ in range(20):
        http_get(f"http://127.0.0.1:{port}/before-the-trim")
    log = proxy.master.log
    # HAProxy logs a request once its answer is sent, so the client may have the answer first:
    # wait for all 20 lines, or the last one could be written after the trim.
    wait_for(
        lambda: log.since(0).count("/before-the-trim") == 20, 10, what="the 20 traffic log lines"
    )
    written = log.size()

    log.max_bytes = 1
    log.trim()
    offset = log.size()
    assert offset < written
    http_get(f"http://127.0.0.1:{port}/after-the-trim")
    wait_for(lambda: "/after-the-trim" in log.since(offset), 10, what="the line after the trim")
    text = log.since(offset)
    assert "\0" not in text
    assert "/before-the-trim" not in text
