"""The etcd v3 registry (``--registry etcd``), in the key layout of docker-register.

``<prefix>/<service>/<instance id>`` = ``IP:PORT`` and ``<prefix>/<service>/port`` = the frontend
port, so discoverd can replace or run beside docker-register / docker-discover; richer metadata goes
to ``<meta_prefix>/<service>/<instance id>`` (JSON), and the frontend-port claims below
``<claim_prefix>`` (compare-and-swap). Every key an agent writes is attached to its one lease. The
client (``requests`` on etcd's JSON gateway, ``gateway.py``) is imported only when a registry is
built, so loading the plugin stays cheap.

Modules: ``config`` (the options), ``keys`` (the key scheme and how a catalog is read back from
keys), ``gateway`` (endpoints, failover, auth, lease calls, watch streams), ``writer`` (the lease
and the keys on it), ``reader`` (snapshots, partial reads, the watch), ``registry`` (the two
together).
"""

from __future__ import annotations

from discoverd import PluginContext, Registry, RegistryPlugin, hookimpl
from discoverd.plugins.etcd.config import EtcdConfig


def make_registry(ctx: PluginContext[EtcdConfig]) -> Registry:
    """Build an :class:`~discoverd.plugins.etcd.registry.EtcdRegistry` (imports the client)."""
    from discoverd.plugins.etcd.registry import EtcdRegistry

    return EtcdRegistry(ctx.config, host_id=ctx.host.id)


@hookimpl
def discoverd_register_registries() -> list[RegistryPlugin]:
    return [
        RegistryPlugin(
            name="etcd",
            factory=make_registry,
            description="etcd v3: one lease per agent, the /backends layout of docker-register.",
            config=EtcdConfig,
        )
    ]
