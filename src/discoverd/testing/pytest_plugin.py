"""discoverd's pytest plugin: fixtures for plugin authors and the loud skip/fail policy.

Not loaded unless asked for: ``pytest -p discoverd.testing``, or ``pytest_plugins =
["discoverd.testing"]`` in the top-level ``conftest.py`` of a plugin's tests. A plugin's own tests
can then use these fixtures without importing anything:

``discoverd_free_port``
    ``discoverd_free_port()`` returns a TCP port free on 127.0.0.1, never the same twice.
``discoverd_backends``
    ``discoverd_backends("a")`` starts an HTTP server on 127.0.0.1 answering ``I am a``
    (:class:`~discoverd.testing.conformance.HttpBackend`: ``.port``, ``.instance(service,
    frontend_port)``); every one is stopped at teardown.
``discoverd_host``
    A :class:`~discoverd.HostInfo` for the agent under test (``127.0.0.1``, a unique id).
``discoverd_state_dir``
    A short, fresh directory for a plugin's state (unix socket paths must stay under 108 bytes,
    which pytest's ``tmp_path`` often exceeds); removed at teardown.
``discoverd_require_binary``
    ``discoverd_require_binary("haproxy")`` returns the executable's path, or skips the test --
    or fails it, see below -- when it is not installed.

Missing services: :func:`service_unavailable` skips the current test with the reason, unless
``DISCOVERD_REQUIRE_SERVICES=1`` or ``CI`` is set, where it fails it instead (so a CI run never
"passes" with its real services missing). Every test of a
:mod:`~discoverd.testing.conformance` contract class carries the ``discoverd_conformance``
marker (``pytest -m discoverd_conformance`` runs only those), and skipped contract checks are
listed again at the end of the run, in red.

(PYTEST_DONT_REWRITE: no asserts here, and a ``conftest.py`` may import this module before it
names it in ``pytest_plugins``.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from discoverd import HostInfo
from discoverd.testing.conformance import ProxyContract, RegistryContract
from discoverd.testing.conformance.common import (
    HttpBackend,
    ServiceUnavailable,
    _Backends,
    fresh_port,
    require_binary,
)

__all__ = [
    "MARKER",
    "service_unavailable",
    "services_required",
]

#: The marker every contract check carries.
MARKER = "discoverd_conformance"

_HINT = "install the service the test needs (for discoverd itself: scripts/install-deps.sh)"


def services_required() -> bool:
    """True when a missing service must fail the run (``DISCOVERD_REQUIRE_SERVICES`` or ``CI``)."""
    if os.environ.get("DISCOVERD_REQUIRE_SERVICES", "") not in ("", "0"):
        return True
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def service_unavailable(reason: str) -> NoReturn:
    """Skip the current test because a real service is missing -- or fail it when required."""
    if services_required():
        banner = "!" * 78
        pytest.fail(
            f"\n{banner}\nREQUIRED SERVICE UNAVAILABLE: {reason}\n"
            "DISCOVERD_REQUIRE_SERVICES=1 or CI is set, so this is a failure, not a skip.\n"
            f"{banner}",
            pytrace=False,
        )
    pytest.skip(f"service unavailable: {reason}")


# --------------------------------------------------------------------------------------------
# Hooks


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: a contract check of discoverd.testing.conformance (added automatically)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is not None and issubclass(cls, RegistryContract | ProxyContract):
            item.add_marker(MARKER)
            name = getattr(item, "originalname", item.name)
            if (
                issubclass(cls, ProxyContract)
                and not cls.serves_traffic
                and name in cls.traffic_only_checks
            ):
                dropped.append(item)  # not applicable: a proxy without traffic has no port
                continue
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """List skipped contract checks at the end: a skipped check proves nothing."""
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        if MARKER not in getattr(report, "keywords", {}):
            continue
        longrepr = getattr(report, "longrepr", None)
        if isinstance(longrepr, tuple) and len(longrepr) == 3:
            reasons[str(longrepr[2]).removeprefix("Skipped: ")] += 1
        else:
            reasons[str(longrepr)] += 1
    if not reasons:
        return
    total = sum(reasons.values())
    terminalreporter.write_sep("!", f"{total} CONFORMANCE CHECK(S) SKIPPED", red=True)
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"  {count} x {reason}", red=True)
    terminalreporter.write_line(
        "A skipped contract check proves nothing about the plugin. "
        "DISCOVERD_REQUIRE_SERVICES=1 turns a missing service into a failure.",
        red=True,
    )


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def discoverd_free_port() -> Callable[[], int]:
    """``discoverd_free_port()``: a free TCP port on 127.0.0.1, never handed out twice."""
    return fresh_port


@pytest.fixture
def discoverd_backends() -> Iterator[Callable[[str], HttpBackend]]:
    """``discoverd_backends(name)``: an HTTP backend answering ``I am <name>``; all stopped."""
    pool = _Backends()
    yield pool
    pool.stop_all()


@pytest.fixture
def discoverd_host() -> HostInfo:
    """The agent's :class:`~discoverd.HostInfo`: 127.0.0.1 and an id unique to this test."""
    return HostInfo(ip="127.0.0.1", id=f"test-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def discoverd_state_dir() -> Iterator[Path]:
    """A short, fresh state directory (room for unix sockets), removed at teardown."""
    path = Path(tempfile.mkdtemp(prefix="dd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def discoverd_require_binary() -> Callable[[str], str]:
    """``discoverd_require_binary(name)``: the executable's path, or a loud skip/failure."""

    def find(name: str) -> str:
        try:
            return require_binary(name)
        except ServiceUnavailable as exc:
            service_unavailable(f"{exc} ({_HINT})")

    return find
