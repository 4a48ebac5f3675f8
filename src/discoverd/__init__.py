"""discoverd: service discovery for Docker hosts, built from plugins.

Plugin authors import everything they need from here::

    from discoverd import hookimpl, RegistryPlugin, Registry, ServiceInstance
"""

from discoverd.core.health import format_seconds, parse_duration
from discoverd.core.hookspecs import hookimpl, hookspec
from discoverd.core.interfaces import (
    CheckTarget,
    HostInfo,
    Notify,
    Option,
    PluginContext,
    PluginError,
    Proxy,
    ProxyConfigError,
    ProxyPlugin,
    Registry,
    RegistryPlugin,
    Source,
    SourcePlugin,
    Unavailable,
)
from discoverd.core.metadata import ContainerSpec, PortBinding, instances_for, parse_env
from discoverd.core.model import (
    Catalog,
    Problem,
    Service,
    ServiceInstance,
    SourceSnapshot,
    ValidationError,
    parse_endpoint,
)
from discoverd.core.options import OptionReader
from discoverd.core.templating import template_environment

__version__ = "0.1.0"

__all__ = [
    "Catalog",
    "CheckTarget",
    "ContainerSpec",
    "HostInfo",
    "Notify",
    "Option",
    "OptionReader",
    "PluginContext",
    "PluginError",
    "PortBinding",
    "Problem",
    "Proxy",
    "ProxyConfigError",
    "ProxyPlugin",
    "Registry",
    "RegistryPlugin",
    "Service",
    "ServiceInstance",
    "Source",
    "SourcePlugin",
    "SourceSnapshot",
    "Unavailable",
    "ValidationError",
    "__version__",
    "format_seconds",
    "hookimpl",
    "hookspec",
    "instances_for",
    "parse_duration",
    "parse_endpoint",
    "parse_env",
    "template_environment",
]
