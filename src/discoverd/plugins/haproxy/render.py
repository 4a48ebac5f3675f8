"""Services -> HAProxy configuration text (pure: no I/O besides reading the templates)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from discoverd import PluginError, Service, ServiceInstance, template_environment
from discoverd.plugins.haproxy.settings import Settings

TEMPLATE = "haproxy.cfg.j2"
PACKAGE = "discoverd.plugins.haproxy"
# Metadata key (SERVICE_CHECK_HTTP=/health, registrator's name for it) that turns the plain TCP
# health check into an HTTP one on that path. Only a plain path is accepted.
CHECK_HTTP_KEY = "check_http"
_CHECK_PATH_RE = re.compile(r"/[A-Za-z0-9._~&+=:@%/?-]{0,200}")
_LINE_BREAKS = frozenset("\n\r\0")


@dataclass(frozen=True)
class InstanceView:
    """One server line: what a template sees of an instance."""

    id: str
    address: str
    port: int
    endpoint: str
    meta: Mapping[str, str]


@dataclass(frozen=True)
class ServiceView:
    """One service as the template sees it; ``bind`` is the frontend's ``address:port``."""

    name: str
    frontend_port: int
    bind: str
    mode: str
    protocol: str
    check_http: str
    meta: Mapping[str, str]
    instances: tuple[InstanceView, ...]


def host_port(address: str, port: int) -> str:
    """``address:port`` for a bind line; IPv6 in brackets, ``*`` for every interface."""
    if not address:
        return f"*:{port}"
    if ":" in address:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def check_http_path(service: Service) -> str:
    """The HTTP health-check path asked for by the service or its instances, or ``""``.

    The service's own metadata wins; otherwise the first path in sort order among its instances
    (deterministic whatever the order they came in). A value that is not a plain path is ignored.
    """
    own = service.meta_dict.get(CHECK_HTTP_KEY, "")
    candidates = (
        [own]
        if own
        else sorted({i.meta_dict.get(CHECK_HTTP_KEY, "") for i in service.instances} - {""})
    )
    return next((path for path in candidates if _CHECK_PATH_RE.fullmatch(path)), "")


def _checked(value: Any) -> Any:
    """jinja2 ``finalize``: every ``{{ value }}`` goes through here before it is printed."""
    if value is None:
        raise PluginError("a HAProxy template printed None; refusing to render it")
    text = value if isinstance(value, str) else str(value)
    if _LINE_BREAKS & set(text):
        raise PluginError(
            f"refusing to render a value containing a line break into haproxy.cfg: {text[:60]!r}"
        )
    return value


def _quote(value: object) -> str:
    """Single-quote a value for HAProxy (no escapes and no ``$VAR`` expansion inside)."""
    text = str(value)
    if "'" in text or _LINE_BREAKS & set(text):
        raise PluginError(f"cannot quote {text[:60]!r} for haproxy.cfg")
    return f"'{text}'"


def environment(template_dir: str) -> jinja2.Environment:
    """The template environment: user templates first, shipped ones next (``default:``)."""
    try:
        env = template_environment(PACKAGE, template_dir or None)
    except FileNotFoundError as exc:
        raise PluginError(f"haproxy option template_dir: {exc}") from None
    # Set before any template is compiled: finalize is applied at compile time.
    env.finalize = _checked
    env.filters["quote"] = _quote
    return env


def load_template(env: jinja2.Environment) -> jinja2.Template:
    try:
        return env.get_template(TEMPLATE)
    except jinja2.TemplateError as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, jinja2.TemplateSyntaxError) else ""
        name = getattr(exc, "name", None) or TEMPLATE
        raise PluginError(f"HAProxy template {name}{where}: {exc.message}") from None


def _instance_view(instance: ServiceInstance) -> InstanceView:
    return InstanceView(
        id=instance.id,
        address=instance.address,
        port=instance.port,
        endpoint=instance.endpoint,
        meta=instance.meta_dict,
    )


def service_view(service: Service, bind: str) -> ServiceView:
    return ServiceView(
        name=service.name,
        frontend_port=service.frontend_port,
        bind=host_port(bind, service.frontend_port),
        mode=service.mode,
        protocol=service.protocol,
        check_http=check_http_path(service),
        meta=service.meta_dict,
        instances=tuple(
            _instance_view(i) for i in sorted(service.instances, key=lambda i: (i.id, i.endpoint))
        ),
    )


def render_config(
    template: jinja2.Template,
    settings: Settings,
    state_dir: Path,
    services: Sequence[Service],
) -> str:
    """Render ``services``; raise ``PluginError`` if two services claim one port."""
    ordered = sorted(services, key=lambda s: (s.name, s.frontend_port, s.protocol))
    owners: dict[int, str] = {}
    if settings.stats_port:
        owners[settings.stats_port] = "the stats page"
    for service in ordered:
        if service.protocol == "udp":
            continue
        other = owners.setdefault(service.frontend_port, f"service {service.name}")
        if other != f"service {service.name}":
            raise PluginError(
                f"service {service.name} asks for frontend port {service.frontend_port}, "
                f"already used by {other}"
            )
    context = {
        "settings": settings,
        "paths": {
            "admin_socket": str(state_dir / "admin.sock"),
            "server_state": str(state_dir / "server-state"),
        },
        "stats": (
            {"bind": host_port(settings.stats_bind, settings.stats_port)}
            if settings.stats_port
            else None
        ),
        "services": [service_view(s, settings.bind) for s in ordered],
    }
    try:
        text = template.render(context)
    except jinja2.TemplateError as exc:
        raise PluginError(f"HAProxy template {template.name}: {exc}") from None
    return text if text.endswith("\n") else text + "\n"
