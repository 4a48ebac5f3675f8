"""The HAProxy proxy (``--proxy haproxy``): one frontend per service; servers changed through
the runtime API without reloads, removed ones drained; hitless verified reloads for the rest.

HAProxy runs in master-worker mode and outlives discoverd. The modules, each doing one thing:

- :mod:`.config`: the options (``[haproxy]``);
- :mod:`.render`: services -> ``haproxy.cfg`` (pure; ``templates/haproxy.cfg.j2`` says what is
  rendered and which blocks a user template can override);
- :mod:`.config_split`: a configuration split into structure and server lines, and what
  counts as a change of servers only (pure);
- :mod:`.proxy`: the apply decision: runtime API or verified reload, and validation;
- :mod:`.master`: supervision of the master process (start, adopt, ``show proc``, verified
  reload, stop);
- :mod:`.sockets`: HAProxy's unix-socket CLIs (the master CLI and the runtime API);
- :mod:`.drain`: draining removed servers.
"""

from __future__ import annotations

from discoverd import PluginContext, Proxy, ProxyPlugin, hookimpl
from discoverd.plugins.haproxy.config import HAProxyConfig


def make_proxy(ctx: PluginContext[HAProxyConfig]) -> Proxy:
    """Build a :class:`~discoverd.plugins.haproxy.proxy.HAProxy` from its checked options."""
    from discoverd.plugins.haproxy.proxy import HAProxy

    return HAProxy(ctx.config, ctx.state_dir)


@hookimpl
def discoverd_register_proxies() -> list[ProxyPlugin]:
    return [
        ProxyPlugin(
            name="haproxy",
            factory=make_proxy,
            description="HAProxy (master-worker): one frontend per service; instances added, "
            "moved and drained through the runtime API without reloads; other changes checked "
            "with haproxy -c and reloaded hitlessly; stats page on 127.0.0.1:1936.",
            config=HAProxyConfig,
        )
    ]
