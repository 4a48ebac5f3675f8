"""The HAProxy proxy (``--proxy haproxy``): one frontend per service; servers changed through
the runtime API without reloads, removed ones drained; hitless verified reloads for the rest.

HAProxy runs in master-worker mode and outlives discoverd; see :mod:`.proxy` for the files it
keeps in ``<state_dir>/haproxy``, how a change is applied and how a reload is checked,
:mod:`.layout` for what counts as a change of servers only, :mod:`.drain` for draining, and
``templates/haproxy.cfg.j2`` for what is rendered and the blocks a user template can override.
"""

from __future__ import annotations

from discoverd import PluginContext, Proxy, ProxyPlugin, hookimpl
from discoverd.plugins.haproxy.settings import OPTIONS, parse_settings


def make_proxy(ctx: PluginContext) -> Proxy:
    """Build a :class:`~discoverd.plugins.haproxy.proxy.HAProxy` from validated options."""
    from discoverd.plugins.haproxy.proxy import HAProxy

    return HAProxy(parse_settings(ctx.options), ctx.state_dir)


@hookimpl
def discoverd_register_proxies() -> list[ProxyPlugin]:
    return [
        ProxyPlugin(
            name="haproxy",
            factory=make_proxy,
            description="HAProxy (master-worker): one frontend per service; instances added, "
            "moved and drained through the runtime API without reloads; other changes checked "
            "with haproxy -c and reloaded hitlessly; stats page on 127.0.0.1:1936.",
            options=OPTIONS,
        )
    ]
