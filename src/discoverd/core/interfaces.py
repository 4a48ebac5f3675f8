"""The three interfaces a plugin implements, and the records that announce them.

Behaviour lives here; the hook specifications (``hookspecs.py``) only hand these records to the
core. Every interface is synchronous: the core runs each long-lived call (``watch``) in a thread of
its own and stops it by setting ``stop`` and calling ``close()``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from discoverd.core.model import Catalog, Service, ServiceInstance, SourceSnapshot

#: Called by a ``watch`` loop whenever something may have changed. The argument is a short reason
#: for the logs ("docker event start", "etcd watch"); the core coalesces bursts and re-reads a full
#: snapshot, so calling it too often is harmless and missing nothing is what matters.
Notify = Callable[[str], None]


class PluginError(Exception):
    """An error a plugin raises with a message meant for the operator (no traceback shown)."""


class Unavailable(PluginError):
    """The backing service (daemon, registry, proxy) cannot be reached now; the core retries."""


class ProxyConfigError(PluginError):
    """A rendered candidate failed validation; the message is the proxy's own explanation."""


@dataclass(frozen=True)
class Option:
    """One configuration key of a plugin, in its ``[plugin-name]`` section of the config file.

    ``type`` is one of ``str``, ``int``, ``float``, ``bool`` or ``list`` (of strings; a comma
    separated string in the environment). ``env`` lists extra environment variables read for it,
    besides ``DISCOVERD_<PLUGIN>_<KEY>`` (e.g. the seed's ``ETCD_HOST``), first match wins.
    """

    name: str
    type: type
    default: Any
    help: str
    env: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostInfo:
    """Who this agent is: the address others reach its containers on, and a stable host id."""

    ip: str
    id: str


@dataclass(frozen=True)
class PluginContext:
    """What a factory receives: its own validated options and the agent's shared settings."""

    options: Mapping[str, Any]
    host: HostInfo
    state_dir: Path
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckTarget:
    """Where a readiness check reaches the application behind an instance.

    ``address:port`` is dialled from inside the network namespace ``netns`` (a path such as
    ``/proc/<pid>/ns/net``) when one is given, else from the agent's own namespace. A source
    whose published ports go through a forwarder (Docker's docker-proxy accepts a connection
    before the application listens) should name the application's own namespace and address.
    """

    address: str
    port: int
    netns: str | None = None


class Source(ABC):
    """A container source (the register role's input), e.g. the Docker engine."""

    @abstractmethod
    def snapshot(self) -> SourceSnapshot:
        """Return every eligible instance on this host now. Raise ``Unavailable`` if the source
        cannot be read; the core keeps the registry as it is and retries."""

    @abstractmethod
    def watch(self, notify: Notify, stop: threading.Event) -> None:
        """Block, calling ``notify`` on every event that may change the snapshot, until ``stop``
        is set. Return or raise ``Unavailable`` when the event stream is lost: the core waits
        with backoff, calls ``watch`` again and resyncs in full."""

    def check_target(self, instance: ServiceInstance) -> CheckTarget | None:
        """Where the register role's readiness check should reach ``instance``'s application.

        ``None`` (the default) checks the published ``address:port`` itself. Called after a
        ``snapshot`` that returned ``instance``; must be cheap (no I/O)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Release connections; must unblock a running ``watch``."""


class Registry(ABC):
    """A TTL registry (etcd, Consul, ...): the register role writes, the discover role reads."""

    @abstractmethod
    def register(self, instance: ServiceInstance) -> None:
        """Publish ``instance`` (owned by this host; it must expire when this host stops
        renewing). Idempotent."""

    def register_many(self, instances: Sequence[ServiceInstance]) -> None:
        """Publish several instances (an agent starting on a host with hundreds of
        containers). The default calls ``register`` for each; a registry that can write many
        entries in one round trip should. If it raises, the core registers them all again
        later, so it must stay idempotent."""
        for instance in instances:
            self.register(instance)

    @abstractmethod
    def deregister(self, instance: ServiceInstance) -> None:
        """Remove an instance this host registered. Idempotent."""

    @abstractmethod
    def keepalive(self) -> bool:
        """Renew this host's entries. Return ``False`` when they were lost (lease expired, agent
        restarted): the core then registers everything this host owns again. Raise
        ``Unavailable`` when the registry cannot be reached."""

    def keepalive_interval(self) -> float:
        """Seconds between two ``keepalive`` calls."""
        return 5.0

    @abstractmethod
    def snapshot(self) -> Catalog:
        """Read every instance of every service. Malformed entries go to ``Catalog.problems``
        and affect only their own service. Raise ``Unavailable`` on error: never return an empty
        catalog because of an error."""

    @abstractmethod
    def watch(self, notify: Notify, stop: threading.Event, since: int) -> None:
        """Block, calling ``notify`` on every change after revision ``since`` (a ``Catalog``
        revision), until ``stop`` is set. Return or raise ``Unavailable`` when the stream is
        lost; the core takes a new snapshot and calls ``watch`` again."""

    def close(self, deregister: bool = False) -> None:  # noqa: B027 - optional, no-op default
        """Release connections and unblock ``watch``. With ``deregister``, remove this host's
        entries at once (e.g. revoke the lease) instead of letting them expire."""


class Proxy(ABC):
    """A local proxy (HAProxy, nginx, ...): the discover role's output."""

    @abstractmethod
    def render(self, services: Sequence[Service]) -> str:
        """Return the complete configuration for ``services``. Pure and deterministic: the same
        services give the same text, whatever order they came in."""

    @abstractmethod
    def validate(self, config: str) -> None:
        """Check a candidate with the proxy's own checker; raise ``ProxyConfigError`` with the
        proxy's message if it is refused. Must not touch the running proxy."""

    @abstractmethod
    def apply(self, config: str, services: Sequence[Service]) -> str:
        """Make the running proxy serve ``config`` (already validated), starting the proxy if
        none runs. Return a short word for what was done: ``"started"``, ``"reloaded"``,
        ``"runtime"`` (changed in place, without a reload) or ``"unchanged"``. Raise
        ``PluginError`` if the proxy did not take it: the previous configuration must then still
        be the one running."""

    def apply_delay(self, config: str, services: Sequence[Service]) -> float:
        """Seconds to wait before ``config`` may be applied; ``0`` means now.

        A proxy that rate-limits its reloads returns the time left until the next reload is
        allowed. The core then applies nothing, keeps collecting changes, and renders again from
        a fresh snapshot once the delay has passed (so a burst costs one reload, not many).
        Called before ``validate``, so it must be cheap."""
        return 0.0

    def reserved_ports(self) -> frozenset[int]:
        """Ports the proxy itself uses (e.g. a stats page): no service may take them."""
        return frozenset()

    def close(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Stop managing the proxy. The proxy process keeps running with its last good
        configuration (so traffic survives a restart of discoverd)."""


T = TypeVar("T")


@dataclass(frozen=True)
class _PluginRecord(Generic[T]):
    name: str
    factory: Callable[[PluginContext], T]
    description: str
    options: tuple[Option, ...] = ()

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)


@dataclass(frozen=True)
class SourcePlugin(_PluginRecord[Source]):
    """Announces a container source: ``SourcePlugin(name="docker", factory=..., ...)``."""


@dataclass(frozen=True)
class RegistryPlugin(_PluginRecord[Registry]):
    """Announces a registry: ``RegistryPlugin(name="etcd", factory=..., ...)``."""


@dataclass(frozen=True)
class ProxyPlugin(_PluginRecord[Proxy]):
    """Announces a proxy: ``ProxyPlugin(name="haproxy", factory=..., ...)``."""
