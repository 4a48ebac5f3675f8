"""The nginx proxy (``--proxy nginx``): an http server per HTTP service, the stream module for
tcp and udp services, checked with ``nginx -t`` and reloaded gracefully (verified, batched).

nginx runs as a daemon and outlives discoverd. The modules, each doing one thing:

- :mod:`.config`: the options (``[nginx]``) and what they imply on this machine;
- :mod:`.render`: services -> ``nginx.conf`` and the status page (pure;
  ``templates/nginx.conf.j2`` says what is rendered and which blocks a user template can
  override);
- :mod:`.proxy`: validation and the apply (the files kept in ``<state_dir>/nginx``);
- :mod:`.master`: supervision of the master process (start, adopt, verified reload, stop);
- :mod:`.processes`: finding nginx's processes in ``/proc``;
- :mod:`.messages`: nginx's error log and checker output, as one-line reasons.
"""

from __future__ import annotations

from discoverd import PluginContext, Proxy, ProxyPlugin, hookimpl
from discoverd.plugins.nginx.config import NginxConfig


def make_proxy(ctx: PluginContext[NginxConfig]) -> Proxy:
    """Build a :class:`~discoverd.plugins.nginx.proxy.NginxProxy` from its checked options."""
    from discoverd.plugins.nginx.proxy import NginxProxy

    return NginxProxy(ctx.config, ctx.state_dir)


@hookimpl
def discoverd_register_proxies() -> list[ProxyPlugin]:
    return [
        ProxyPlugin(
            name="nginx",
            factory=make_proxy,
            description="nginx: an http server per HTTP service, the stream module for tcp and "
            "udp, checked with nginx -t, reloaded gracefully (batched, verified); status page "
            "on 127.0.0.1:1937.",
            config=NginxConfig,
        )
    ]
