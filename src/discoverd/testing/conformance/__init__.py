"""Contract tests that every source, registry and proxy plugin runs against itself, on the real
server.

A plugin's test module subclasses one of the two contract classes and provides a few fixtures;
pytest then runs every contract point as a separate test (``test_*`` method) of that class::

    from discoverd.testing.conformance import ProxyContract, RegistryContract

    class TestMyRegistry(RegistryContract):
        short_ttl = 2                     # optional class attributes, see .registry

        @pytest.fixture
        def registry_server(self, tmp_path): ...    # -> RegistryServer
        @pytest.fixture
        def make_registry(self, registry_server): ...  # -> RegistryFactory
        @pytest.fixture
        def write_bad_entry(self, registry_server): ...  # optional -> BadEntryWriter

    class TestMyProxy(ProxyContract):
        @pytest.fixture
        def make_proxy(self, tmp_path): ...     # -> ProxyFactory
        @pytest.fixture
        def proxy_probe(self, make_proxy): ...  # -> ProxyProbe

The contract classes are not collected themselves (their names do not start with ``Test``). A
fixture a subclass must provide and does not fails every check with a message naming it.

The fixtures, class attributes and checks of each contract are described in its module:
:mod:`discoverd.testing.conformance.source` (``SourceContract``),
:mod:`discoverd.testing.conformance.registry` (``RegistryContract``) and
:mod:`discoverd.testing.conformance.proxy` (``ProxyContract``).
:mod:`discoverd.testing.conformance.common` holds what both share: the protocols of the
fixtures and the helpers (:func:`poll_until`, :func:`fresh_port`, :class:`HttpBackend`).
"""

from __future__ import annotations

from discoverd.testing.conformance.common import (
    BadEntryWriter,
    HttpBackend,
    ProxyFactory,
    ProxyProbe,
    RegistryFactory,
    RegistryServer,
    fresh_port,
    poll_until,
)
from discoverd.testing.conformance.proxy import ProxyContract
from discoverd.testing.conformance.registry import RegistryContract
from discoverd.testing.conformance.source import SourceContract, SourceFactory, Workloads

__all__ = [
    "BadEntryWriter",
    "HttpBackend",
    "ProxyContract",
    "ProxyFactory",
    "ProxyProbe",
    "RegistryContract",
    "RegistryFactory",
    "RegistryServer",
    "SourceContract",
    "SourceFactory",
    "Workloads",
    "fresh_port",
    "poll_until",
]
