"""Services -> nginx configuration text, and the status page's files (pure: no I/O besides
reading the templates).

The configuration names no path of this machine: nginx runs with ``-p <state_dir>/nginx/`` and
every file it uses (pid, error log, temp folders, status page) is given relative to that prefix,
so the same services render the same text on every host.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from discoverd import (
    PluginError,
    Service,
    ServiceInstance,
    ValidationError,
    check_address,
    check_port,
    check_service_name,
)
from discoverd.plugins.nginx.config import NginxConfig, WorkerSettings
from discoverd.proxykit import load_template as kit_load_template
from discoverd.proxykit import plugin_environment

TEMPLATE = "nginx.conf.j2"
PACKAGE = "discoverd.plugins.nginx"
# Characters no value printed into nginx.conf may hold: they would end a directive, open or close
# a block, start a comment or a variable, or split one argument into several.
_FORBIDDEN = frozenset(";{}#$\\'\"`")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}")


class Quoted(str):
    """A value already quoted by the ``quote`` filter (its quotes are meant)."""

    __slots__ = ()


@dataclass(frozen=True)
class InstanceView:
    """One ``server`` line: what a template sees of an instance."""

    id: str
    address: str
    port: int
    endpoint: str
    meta: Mapping[str, str]


@dataclass(frozen=True)
class ServiceView:
    """One service as the template sees it; ``listen`` is the ``listen`` directive's address.

    ``upstream`` is the name of its upstream block (the service name: http and stream upstreams
    live in separate namespaces, and the core keeps names unique).
    """

    name: str
    upstream: str
    frontend_port: int
    listen: str
    mode: str
    protocol: str
    meta: Mapping[str, str]
    instances: tuple[InstanceView, ...]


def host_port(address: str, port: int) -> str:
    """``address:port`` for a listen line; IPv6 in brackets, the bare port for every interface."""
    if not address:
        return str(port)
    if ":" in address:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def _checked(value: Any) -> Any:
    """jinja2 ``finalize``: every ``{{ value }}`` goes through here before it is printed."""
    if value is None:
        raise PluginError("an nginx template printed None; refusing to render it")
    text = value if isinstance(value, str) else str(value)
    if not text.isprintable() or any(c.isspace() for c in text):
        raise PluginError(
            "refusing to render a value containing a space, a line break or a control character "
            f"into nginx.conf: {text[:60]!r}"
        )
    bad = set(text) & _FORBIDDEN
    if isinstance(value, Quoted):
        bad -= {'"'}
    if bad:
        raise PluginError(
            f"refusing to render a value containing {', '.join(repr(c) for c in sorted(bad))} "
            f"into nginx.conf: {text[:60]!r}"
        )
    return value


def _quote(value: object) -> Quoted:
    """Double-quote a value for nginx (refused if it would need an escape or holds a variable)."""
    text = str(value)
    if set(text) & _FORBIDDEN or not text.isprintable() or " " in text:
        raise PluginError(f"cannot quote {text[:60]!r} for nginx.conf")
    return Quoted(f'"{text}"')


def environment(template_dir: str) -> jinja2.Environment:
    """The template environment: user templates first, shipped ones next (``default:``)."""
    return plugin_environment(
        "nginx", PACKAGE, template_dir, finalize=_checked, filters={"quote": _quote}
    )


def load_template(env: jinja2.Environment) -> jinja2.Template:
    return kit_load_template(env, TEMPLATE, "nginx")


def _recheck(service: Service) -> None:
    """Check again what reaches the configuration, whoever built the ``Service``: the model
    validates at construction, but a plugin must not trust that nothing bypassed it."""
    try:
        check_service_name(service.name)
        check_port(service.frontend_port, "frontend port")
        if service.protocol not in ("tcp", "udp") or service.mode not in ("http", "tcp"):
            raise ValidationError(f"protocol {service.protocol!r} / mode {service.mode!r}")
        for instance in service.instances:
            if not isinstance(instance.id, str) or not _ID_RE.fullmatch(instance.id):
                raise ValidationError(f"instance id {instance.id!r} has forbidden characters")
            check_address(instance.address)
            check_port(instance.port)
    except ValidationError as exc:
        raise PluginError(f"nginx: refusing to render service {service.name!r}: {exc}") from None


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
        upstream=service.name,
        frontend_port=service.frontend_port,
        listen=host_port(bind, service.frontend_port),
        mode="tcp" if service.protocol == "udp" else service.mode,
        protocol=service.protocol,
        meta=service.meta_dict,
        instances=tuple(
            _instance_view(i) for i in sorted(service.instances, key=lambda i: (i.id, i.endpoint))
        ),
    )


def ordered(services: Sequence[Service]) -> list[Service]:
    """Services in render order; refuses two services of one name or on one port and protocol."""
    result = sorted(services, key=lambda s: (s.name, s.frontend_port, s.protocol))
    names: set[str] = set()
    for service in result:
        _recheck(service)
        if service.name in names:
            raise PluginError(f"nginx: two services are named {service.name}")
        names.add(service.name)
    return result


def check_ports(services: Sequence[Service], status_port: int) -> None:
    """Refuse two services (or a service and the status page) on one port and protocol."""
    owners: dict[tuple[int, str], str] = {}
    if status_port:
        owners[(status_port, "tcp")] = "the status page"
    for service in services:
        key = (service.frontend_port, service.protocol)
        other = owners.setdefault(key, f"service {service.name}")
        if other != f"service {service.name}":
            raise PluginError(
                f"service {service.name} asks for frontend port {service.frontend_port}"
                f"/{service.protocol}, already used by {other}"
            )


def template_settings(config: NginxConfig, workers: WorkerSettings) -> dict[str, Any]:
    """What a template sees as ``settings``: every option of ``[nginx]`` by name, except that
    ``user`` and ``group`` are what the workers run as on this machine, plus ``rlimit_nofile``
    (see :class:`~discoverd.plugins.nginx.config.WorkerSettings`)."""
    return {**dataclasses.asdict(config), **dataclasses.asdict(workers)}


def render_config(
    template: jinja2.Template,
    config: NginxConfig,
    workers: WorkerSettings,
    services: Sequence[Service],
    stub_status: bool,
    *,
    status: bool = True,
) -> str:
    """Render ``services``; raise ``PluginError`` on a conflict or a template error. ``status``
    False leaves the status page out (its port is held by another process)."""
    sorted_services = ordered(services)
    check_ports(sorted_services, config.status_port)
    views = [service_view(s, config.bind) for s in sorted_services]
    http = [v for v in views if v.protocol == "tcp" and v.mode == "http"]
    stream = [v for v in views if v not in http]
    context = {
        "settings": template_settings(config, workers),
        "paths": {
            "pid": "nginx.pid",
            "error_log": "error.log",
            "temp": "tmp",
            "status": "status",
        },
        "status": (
            {"listen": host_port(config.status_bind, config.status_port), "stub": stub_status}
            if config.status_port and status
            else None
        ),
        "services": views,
        "http_services": http,
        "stream_services": stream,
    }
    try:
        text = template.render(context)
    except jinja2.TemplateError as exc:
        raise PluginError(f"nginx template {template.name}: {exc}") from None
    return text if text.endswith("\n") else text + "\n"


def status_documents(services: Sequence[Service], config: NginxConfig) -> dict[str, bytes]:
    """The status page's files (``services.json`` and ``services.txt``), deterministic."""
    views = [service_view(s, config.bind) for s in ordered(services)]
    listing = [
        {
            "name": v.name,
            "protocol": v.protocol,
            "mode": v.mode,
            "listen": v.listen,
            "backends": [{"id": i.id, "address": i.address, "port": i.port} for i in v.instances],
        }
        for v in views
    ]
    document = json.dumps({"services": listing}, indent=2, sort_keys=True) + "\n"
    lines = [
        "discoverd: services served by this nginx",
        "(connection counters: /nginx_status; the same list as JSON: /services.json)",
        "",
    ]
    for v in views:
        kind = v.protocol if v.protocol == "udp" else v.mode
        count = len(v.instances)
        lines.append(
            f"{v.name}  {kind}  listen {v.listen}  {count} backend{'' if count == 1 else 's'}"
            + ("  (none: clients are refused at once)" if not count else "")
        )
        lines.extend(f"    {i.endpoint}  {i.id}" for i in v.instances)
    if not views:
        lines.append("(no services)")
    return {
        "services.json": document.encode(),
        "services.txt": ("\n".join(lines) + "\n").encode(),
    }
