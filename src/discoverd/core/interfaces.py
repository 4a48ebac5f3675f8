"""The three interfaces a plugin implements, and the records that announce them.

Behaviour lives here; the hook specifications (``hookspecs.py``) only hand these records to the
core. Every interface is synchronous: the core runs each long-lived call (``watch``) in a thread of
its own and stops it by setting ``stop`` and calling ``close()``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from discoverd.core.model import (
    Catalog,
    HostInfo,
    Problem,
    Service,
    ServiceInstance,
    SourceSnapshot,
)
from discoverd.core.schema import NoOptions, OptionInfo, options_of

if TYPE_CHECKING:
    from discoverd.core.config import CoreConfig
    from discoverd.core.metadata import ContainerSpec

__all__ = [
    "CheckTarget",
    "Notify",
    "PluginContext",
    "Proxy",
    "ProxyPlugin",
    "Registry",
    "RegistryPlugin",
    "Source",
    "SourcePlugin",
]

C = TypeVar("C")


class Notify(Protocol):
    """Called by a ``watch`` loop whenever something may have changed.

    ``reason`` is a short text for the logs ("docker event start", "etcd watch"). A registry's
    watch may name the ``services`` its events touched: the core then re-reads only those
    (:meth:`Registry.read_services`); without it, the core reads everything. The core coalesces
    bursts, so calling it too often is harmless; missing nothing is what matters."""

    def __call__(self, reason: str, services: Collection[str] | None = None) -> None: ...


@dataclass(frozen=True)
class PluginContext(Generic[C]):
    """What a factory receives: its own configuration (an instance of the class named in its
    record, checked), who this agent is, where its files go, and the core's settings."""

    config: C
    host: HostInfo
    state_dir: Path
    core: CoreConfig | None = None


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

    def lookup(self, ref: str) -> tuple[ContainerSpec, str] | None:
        """The container named ``ref`` (or whose id starts with it) as the metadata rules see
        it, and why it is not eligible (``""`` when it is: running, and healthy if it has a
        healthcheck); ``None`` when there is no such container or the source cannot say (the
        default). For ``discoverd explain``."""
        return None

    @abstractmethod
    def snapshot(self) -> SourceSnapshot:
        """Return every eligible instance on this host now. Raise ``Unavailable`` if the source
        cannot be read; the core keeps the registry as it is and retries."""

    @abstractmethod
    def watch(self, notify: Notify, stop: threading.Event) -> None:
        """Block, calling ``notify`` on every event that may change the snapshot, until ``stop``
        is set. Return or raise ``Unavailable`` when the event stream is lost: the core waits
        with backoff, calls ``watch`` again and resyncs in full."""

    def stopping(self) -> frozenset[str]:
        """Ids of instances that are going away although the source may still list them: their
        container was sent its stop signal (``docker stop``), or it exited and the listing has
        not caught up yet. The register role removes them from the registry at once, before
        the process exits, so proxies drain them instead of losing requests.

        Read by the core right after each ``snapshot``; a source learns of these from its
        events, so this is the state it keeps between calls, named here so the core (and the
        conformance kit) can see it. A hint only: an empty set (the default) costs the drain,
        never correctness, since the instance leaves once the snapshot no longer lists it."""
        return frozenset()

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

    def read_services(self, names: Collection[str]) -> Catalog | None:
        """Read only the services ``names``: a ``Catalog`` holding their instances and the
        problems of their entries (a service without instances is simply absent), read at
        one revision. The core calls it instead of ``snapshot`` when its watch named the
        services that changed since the last full read (see ``Notify``), so that a change in a
        registry of 10,000 instances costs a few keys, not a full read. Return ``None`` (the
        default) when the registry cannot read a subset: the core then calls ``snapshot``.
        Raise ``Unavailable`` on error. Keep no state between calls, except what the
        registry's own watch delivered: an answer may come from it (etcd's does) provided it
        holds every change that watch has notified."""
        return None

    @abstractmethod
    def watch(self, notify: Notify, stop: threading.Event, since: int) -> None:
        """Block, calling ``notify`` on every change after revision ``since`` (a ``Catalog``
        revision), until ``stop`` is set; name the changed services when the events say
        (``notify(reason, services=...)``). Return or raise ``Unavailable`` when the stream is
        lost; the core takes a new snapshot and calls ``watch`` again."""

    def conflicts(self) -> list[Problem]:
        """Problems of this host's registrations that only the registry can see: a frontend
        port another service holds fleet-wide, a frontend port other hosts gave the same
        service differently. The register role reads them after each pass and reports them
        on this host (the claimant). Default: none."""
        return []

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

    def plan(self, config: str) -> str:
        """What ``apply(config, ...)`` would do now, without doing it: ``"unchanged"``,
        ``"runtime"`` (changed in place, no reload), ``"reload"``, ``"start"`` (no proxy runs),
        or ``"apply"`` (the default: the proxy cannot tell). For ``discoverd plan``; must not
        touch the running proxy."""
        return "apply"

    def server_states(self, service: str) -> dict[str, str] | None:
        """How the running proxy sees the servers of ``service``, by instance id (``"UP"``,
        ``"DOWN"``, ``"DRAIN"``, ``"MAINT"``, ...), or ``None`` when it cannot say (the
        default). For ``discoverd explain``; must not change the running proxy."""
        return None

    def needs_check(self, config: str) -> bool:
        """Whether ``validate`` must run before ``apply(config)``: ``True``, the default.

        A proxy whose start checks the file itself, and refuses it without leaving anything
        running, may say ``False`` when nothing runs yet: a first start then parses its file
        once, not twice (0.2 s for 10,000 HAProxy servers). If that ``apply`` fails, the core
        validates and applies again, leaving out the services at fault as usual. Never
        ``False`` while a proxy runs: its last good configuration is what a check protects.
        Called before each apply, so it must be cheap."""
        return True

    def prefers_container_addresses(self) -> bool:
        """Whether the discover role should hand this proxy the discover host's own instances
        at their container address rather than their published port (core option
        ``local_direct = "auto"``, the default). Say ``True`` when the proxy notices a dead or
        overloaded server on its own (active checks) and takes one out without a reload: a
        container address that stops answering drops connects silently (a timeout per
        request), where the published port refuses at once. Default: ``False``."""
        return False

    def preflight(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Called once when an agent starts the discover role, before anything runs: raise
        ``PluginError`` for what can never work (the proxy's executable is missing), so the
        agent fails at start with a clear error instead of retrying for ever. Transient
        troubles (a port in use, a proxy that died) are not for here."""

    def unservable(self, services: Sequence[Service]) -> dict[str, str]:
        """The services of a candidate the proxy cannot serve now, by name, with the reason
        (e.g. "frontend port 8000 is held by another process"). The core leaves them out of
        the configuration it renders, reports each as a problem of that service alone, and
        asks again later, so one service that cannot be served never holds the others back.
        Called before every ``validate``; must not touch the running proxy and must be cheap
        (a few socket binds). Default: none."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Stop managing the proxy. The proxy process keeps running with its last good
        configuration (so traffic survives a restart of discoverd)."""


T = TypeVar("T")


@dataclass(frozen=True)
class _PluginRecord(Generic[T]):
    name: str
    factory: Callable[[PluginContext[Any]], T]
    description: str
    #: The plugin's configuration class: a frozen dataclass whose fields are declared with
    #: ``discoverd.option``; its instance reaches the factory as ``ctx.config``.
    config: type[Any] = NoOptions

    @property
    def options(self) -> tuple[OptionInfo, ...]:
        """The options of the ``[name]`` section, derived from ``config``."""
        return options_of(self.config)


@dataclass(frozen=True)
class SourcePlugin(_PluginRecord[Source]):
    """Announces a container source: ``SourcePlugin(name="docker", factory=..., ...)``."""


@dataclass(frozen=True)
class RegistryPlugin(_PluginRecord[Registry]):
    """Announces a registry: ``RegistryPlugin(name="etcd", factory=..., ...)``."""


@dataclass(frozen=True)
class ProxyPlugin(_PluginRecord[Proxy]):
    """Announces a proxy: ``ProxyPlugin(name="haproxy", factory=..., ...)``."""
