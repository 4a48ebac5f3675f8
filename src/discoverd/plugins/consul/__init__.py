"""The Consul registry (``--registry consul``): agent services with TTL checks, blocking queries.

Each instance becomes a service of the local Consul agent with a TTL check that discoverd passes in
the background; the discover side reads passing instances only and watches with three blocking
queries. Frontend ports are claimed fleet-wide in the KV store (check-and-set, and a session per
agent). Options follow Consul's own tools (``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN``, the TLS
variables; see ``config``). The client (py-consul) is imported only when a registry is built, so
loading the plugin stays cheap.
"""

from __future__ import annotations

from discoverd import PluginContext, Registry, RegistryPlugin, hookimpl
from discoverd.plugins.consul.config import ConsulConfig


def make_registry(ctx: PluginContext[ConsulConfig]) -> Registry:
    """Build a :class:`~discoverd.plugins.consul.registry.ConsulRegistry` (imports the client)."""
    from discoverd.plugins.consul.registry import ConsulRegistry

    return ConsulRegistry(ctx.config, host_id=ctx.host.id)


@hookimpl
def discoverd_register_registries() -> list[RegistryPlugin]:
    return [
        RegistryPlugin(
            name="consul",
            factory=make_registry,
            description="Consul: agent services with TTL checks, blocking queries on health.",
            config=ConsulConfig,
        )
    ]
