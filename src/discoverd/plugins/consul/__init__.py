"""The Consul registry (``--registry consul``): agent services with TTL checks, blocking queries.

Each instance becomes a service of the local Consul agent with a TTL check that discoverd passes
in the background; the discover side reads passing instances only and watches with two blocking
queries. Settings follow Consul's own tools (``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN``, the TLS
variables). The client (py-consul) is imported only when a registry is built, so loading the
plugin stays cheap.
"""

from __future__ import annotations

from discoverd import Option, PluginContext, Registry, RegistryPlugin, hookimpl

OPTIONS = (
    Option(
        "address",
        str,
        "127.0.0.1:8500",
        "Consul agent HTTP address: host:port or http(s)://host:port (port 8500 if omitted).",
        env=("CONSUL_HTTP_ADDR",),
    ),
    Option(
        "ssl",
        bool,
        False,
        "Use https even when the address has no https:// scheme.",
        env=("CONSUL_HTTP_SSL",),
    ),
    Option(
        "verify",
        bool,
        True,
        "Verify Consul's TLS certificate (false only for tests).",
        env=("CONSUL_HTTP_SSL_VERIFY",),
    ),
    Option("ca_file", str, "", "CA bundle to verify Consul's certificate.", env=("CONSUL_CACERT",)),
    Option(
        "ca_path",
        str,
        "",
        "Directory of CA certificates (hashed names, as c_rehash makes them).",
        env=("CONSUL_CAPATH",),
    ),
    Option("cert_file", str, "", "Client certificate for TLS.", env=("CONSUL_CLIENT_CERT",)),
    Option("key_file", str, "", "Private key of cert_file.", env=("CONSUL_CLIENT_KEY",)),
    Option("token", str, "", "ACL token (sent as X-Consul-Token).", env=("CONSUL_HTTP_TOKEN",)),
    Option(
        "token_file",
        str,
        "",
        "File holding the ACL token; wins over token when not empty (as in Consul's CLI).",
        env=("CONSUL_HTTP_TOKEN_FILE",),
    ),
    Option("datacenter", str, "", "Datacenter to read (default: the agent's own)."),
    Option(
        "ttl",
        int,
        15,
        "TTL of each instance's check, in seconds; discoverd passes it every ttl/3 seconds.",
    ),
    Option(
        "deregister_after",
        int,
        60,
        "Seconds a check may stay critical before the agent removes the instance "
        "(Consul's minimum: 60; 0: never).",
    ),
    Option(
        "wait",
        float,
        20.0,
        "Longest a blocking query is held, in seconds (1 to 600).",
    ),
    Option("timeout", float, 5.0, "Timeout of one ordinary request, in seconds."),
    Option(
        "tag",
        str,
        "",
        "Marker tag: added to every instance registered; the discover side then reads "
        "only instances carrying it.",
    ),
)


def make_registry(ctx: PluginContext) -> Registry:
    """Build a :class:`~discoverd.plugins.consul.registry.ConsulRegistry` (imports the client)."""
    from discoverd.plugins.consul.registry import ConsulRegistry
    from discoverd.plugins.consul.settings import ConsulSettings

    return ConsulRegistry(ConsulSettings.from_options(ctx.options), host_id=ctx.host.id)


@hookimpl
def discoverd_register_registries() -> list[RegistryPlugin]:
    return [
        RegistryPlugin(
            name="consul",
            factory=make_registry,
            description="Consul: agent services with TTL checks, blocking queries on health.",
            options=OPTIONS,
        )
    ]
