"""The etcd v3 registry (``--registry etcd``), in the key layout of docker-register.

``<prefix>/<service>/<instance id>`` = ``IP:PORT`` and ``<prefix>/<service>/port`` = the frontend
port, so discoverd can replace or run beside docker-register / docker-discover; richer metadata
goes to ``<meta_prefix>/<service>/<instance id>`` (JSON). Every key an agent writes is attached to
its one lease. The client (etcd3gw, over etcd's JSON gateway) is imported only when a registry is
built, so loading the plugin stays cheap.
"""

from __future__ import annotations

from discoverd import Option, PluginContext, Registry, RegistryPlugin, hookimpl

OPTIONS = (
    Option(
        "endpoints",
        list,
        ["127.0.0.1:2379"],
        "etcd client endpoints: host:port or http(s)://host:port, comma separated; "
        "the next one is tried when one fails",
        env=("ETCD_HOST",),
    ),
    Option("prefix", str, "/backends", "Key prefix of the instances (the seed's layout)."),
    Option(
        "meta_prefix",
        str,
        "/discoverd/instances",
        "Key prefix of the instances' metadata (JSON); must lie outside prefix.",
    ),
    Option("ttl", int, 15, "Lease TTL in seconds: a dead host's entries vanish after it."),
    Option("timeout", float, 5.0, "Timeout of one etcd request, in seconds."),
    Option("ca_cert", str, "", "CA bundle to verify etcd's certificate (enables https)."),
    Option("cert", str, "", "Client certificate for TLS (enables https)."),
    Option("key", str, "", "Private key of the client certificate."),
    Option("user", str, "", "User name, when etcd has authentication enabled."),
    Option("password", str, "", "Password of user."),
)


def make_registry(ctx: PluginContext) -> Registry:
    """Build an :class:`~discoverd.plugins.etcd.registry.EtcdRegistry` (imports the client)."""
    from discoverd.plugins.etcd.registry import EtcdRegistry

    options = ctx.options
    return EtcdRegistry(
        options["endpoints"],
        prefix=options["prefix"],
        meta_prefix=options["meta_prefix"],
        ttl=options["ttl"],
        timeout=options["timeout"],
        ca_cert=options["ca_cert"],
        cert=options["cert"],
        key=options["key"],
        user=options["user"],
        password=options["password"],
        host_id=ctx.host.id,
    )


@hookimpl
def discoverd_register_registries() -> list[RegistryPlugin]:
    return [
        RegistryPlugin(
            name="etcd",
            factory=make_registry,
            description="etcd v3: one lease per agent, the /backends layout of docker-register.",
            options=OPTIONS,
        )
    ]
