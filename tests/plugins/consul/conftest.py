"""Consul agents for the registry tests: a plain ``-dev`` agent, and one enforcing ACLs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import service_unavailable
from tests.support.consul import Consul
from tests.support.services import ServiceUnavailable, require_binary

#: The master token of the ``consul_acl`` agent.
ACL_TOKEN = "4b2e1c6a-0d3f-4f6e-9a57-discoverd-test"


def _start(root: Path, acl_token: str = "") -> Consul:
    try:
        require_binary("consul")
    except ServiceUnavailable as exc:
        service_unavailable(str(exc))
    agent = Consul(root, acl_token=acl_token)
    try:
        agent.start()
    except ServiceUnavailable as exc:
        agent.stop()
        service_unavailable(str(exc))
    return agent


# A fresh agent per test: a -dev agent starts in well under a second, tests may kill and restart
# it freely, and no test sees another's services.
@pytest.fixture
def consul(tmp_path: Path) -> Iterator[Consul]:
    """A running ``consul agent -dev`` on loopback ports, new for each test."""
    agent = _start(tmp_path / "consul")
    yield agent
    agent.stop()


@pytest.fixture
def consul_acl(tmp_path: Path) -> Iterator[Consul]:
    """A ``-dev`` agent with ACLs on (default policy deny); ``ACL_TOKEN`` is its master token."""
    agent = _start(tmp_path / "consul-acl", acl_token=ACL_TOKEN)
    yield agent
    agent.stop()
