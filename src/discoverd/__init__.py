"""discoverd: service discovery for Docker hosts, built from plugins.

The public API for plugin authors is this package's root, ``discoverd.proxykit`` (what proxy
plugins share) and ``discoverd.testing`` (the conformance kit)::

    from discoverd import hookimpl, option, RegistryPlugin, Registry, ServiceInstance

Everything else (``discoverd.core.*``, the built-in plugins) may change between releases.
"""

from discoverd.core import validators
from discoverd.core.claims import ClaimHolder, SettledClaims, claim_problems, settle_claims
from discoverd.core.durations import format_seconds, parse_duration
from discoverd.core.errors import (
    ConfigError,
    OptionError,
    PluginError,
    ProxyConfigError,
    Unavailable,
    ValidationError,
    exception_chain,
)
from discoverd.core.hookspecs import hookimpl, hookspec
from discoverd.core.interfaces import (
    CheckTarget,
    Notify,
    PluginContext,
    Proxy,
    ProxyPlugin,
    Registry,
    RegistryPlugin,
    Source,
    SourcePlugin,
)
from discoverd.core.metadata import (
    ContainerSpec,
    ExposurePolicy,
    PortBinding,
    instances_for,
    parse_env,
)
from discoverd.core.model import (
    CONTAINER_ADDRESS_KEY,
    INSTANCE_ID_RE,
    SERVICE_NAME_RE,
    TAG_RE,
    Catalog,
    HostInfo,
    Problem,
    Service,
    ServiceInstance,
    SourceSnapshot,
    check_address,
    check_container_address,
    check_meta,
    check_port,
    check_service_name,
    check_tag,
    parse_endpoint,
    with_container_address,
)
from discoverd.core.schema import NoOptions, OptionInfo, build_config, option, options_of
from discoverd.version import __version__

__all__ = [
    "CONTAINER_ADDRESS_KEY",
    "INSTANCE_ID_RE",
    "SERVICE_NAME_RE",
    "TAG_RE",
    "Catalog",
    "CheckTarget",
    "ClaimHolder",
    "ConfigError",
    "ContainerSpec",
    "ExposurePolicy",
    "HostInfo",
    "NoOptions",
    "Notify",
    "OptionError",
    "OptionInfo",
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
    "SettledClaims",
    "Source",
    "SourcePlugin",
    "SourceSnapshot",
    "Unavailable",
    "ValidationError",
    "__version__",
    "build_config",
    "check_address",
    "check_container_address",
    "check_meta",
    "check_port",
    "check_service_name",
    "check_tag",
    "claim_problems",
    "exception_chain",
    "format_seconds",
    "hookimpl",
    "hookspec",
    "instances_for",
    "option",
    "options_of",
    "parse_duration",
    "parse_endpoint",
    "parse_env",
    "settle_claims",
    "validators",
    "with_container_address",
]
