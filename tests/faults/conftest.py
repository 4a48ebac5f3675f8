"""Fixtures of the fault suite: a fleet factory that cleans up after itself, the summary of
every scenario's figures at the end of the run."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import service_unavailable
from tests.faults.harness import (
    AGENT_SOURCE,
    RESULTS,
    Fleet,
    RegistryUnderTest,
    command_line,
    figures_line,
    short_root,
    write_results,
)
from tests.support.services import ServiceUnavailable, require_binary

FleetFactory = Callable[..., Fleet]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
        for entry in RESULTS:
            if entry.get("test") == item.nodeid and not entry.get("outcome"):
                entry["outcome"] = report.outcome
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def make_fleet(
    request: pytest.FixtureRequest, tmp_path: Path, haproxy_binary: str
) -> Iterator[FleetFactory]:
    """``make_fleet(registry, proxy="haproxy", ...)``: a :class:`Fleet` in a short folder of
    its own. At the end every agent, proxy, container and client it started is ended; when the
    test failed (or ``DISCOVERD_FAULTS_KEEP_LOGS=1``), the logs (agents, HAProxy, nginx) are
    copied to ``$DISCOVERD_FAULTS_LOGS/<test>/`` or else to the test's ``tmp_path`` (which
    pytest keeps for its last three runs only)."""
    fleets: list[Fleet] = []

    def make(registry: RegistryUnderTest, **kwargs: Any) -> Fleet:
        if kwargs.get("proxy") == "nginx":
            try:
                require_binary("nginx")
            except ServiceUnavailable as exc:
                service_unavailable(str(exc))
        fleet = Fleet(short_root(), registry, **kwargs)
        fleets.append(fleet)
        return fleet

    yield make
    failed = request.node.stash.get(_FAILED, True)
    keep = failed or os.environ.get("DISCOVERD_FAULTS_KEEP_LOGS") == "1"
    folder = os.environ.get("DISCOVERD_FAULTS_LOGS")
    logs = Path(folder) / _safe(request.node.name) if folder else tmp_path
    for index, fleet in enumerate(fleets):
        try:
            fleet.close()
        finally:
            if keep:
                fleet.keep_logs(logs / f"logs{index}")
            shutil.rmtree(fleet.root, ignore_errors=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """The figures of every fault scenario that ran (passed or failed)."""
    if not RESULTS:
        return
    terminalreporter.write_sep("=", f"fault suite figures ({len(RESULTS)} scenarios)")
    terminalreporter.write_line(f"command: {command_line()}")
    if AGENT_SOURCE:
        terminalreporter.write_line(f"agents ran discoverd from {AGENT_SOURCE}")
    for entry in RESULTS:
        terminalreporter.write_line(f"  {entry['date']} {figures_line(entry)}")
    target = os.environ.get("DISCOVERD_FAULTS_REPORT")
    if target:
        write_results(target)
        terminalreporter.write_line(f"figures written to {target}")
