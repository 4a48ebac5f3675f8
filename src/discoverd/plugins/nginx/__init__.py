"""The nginx proxy (``--proxy nginx``): an http server per HTTP service, the stream module for
tcp and udp services, checked with ``nginx -t`` and reloaded gracefully (verified, batched).

nginx runs as a daemon and outlives discoverd; see :mod:`.proxy` for the files it keeps in
``<state_dir>/nginx`` and how a reload is checked, and ``templates/nginx.conf.j2`` for what is
rendered and the blocks a user template can override.
"""

from __future__ import annotations

from discoverd import PluginContext, Proxy, ProxyPlugin, hookimpl
from discoverd.plugins.nginx.settings import OPTIONS, parse_settings


def make_proxy(ctx: PluginContext) -> Proxy:
    """Build a :class:`~discoverd.plugins.nginx.proxy.NginxProxy` from validated options."""
    from discoverd.plugins.nginx.proxy import NginxProxy

    return NginxProxy(parse_settings(ctx.options), ctx.state_dir)


@hookimpl
def discoverd_register_proxies() -> list[ProxyPlugin]:
    return [
        ProxyPlugin(
            name="nginx",
            factory=make_proxy,
            description="nginx: an http server per HTTP service, the stream module for tcp and "
            "udp, checked with nginx -t, reloaded gracefully (batched, verified); status page "
            "on 127.0.0.1:1937.",
            options=OPTIONS,
        )
    ]
