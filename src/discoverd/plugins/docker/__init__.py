"""The Docker Engine container source (``--source docker``).

Lists the running containers of one Docker daemon and turns every published port into a service
instance, following the registrator-compatible rules of ``discoverd.core.metadata``. The Docker
SDK is imported only when a source is built, so loading the plugin stays cheap.
"""

from __future__ import annotations

from discoverd import PluginContext, Source, SourcePlugin, hookimpl
from discoverd.plugins.docker.config import DockerConfig


def make_source(ctx: PluginContext[DockerConfig]) -> Source:
    """Build a :class:`~discoverd.plugins.docker.source.DockerSource` (imports the SDK)."""
    from discoverd.plugins.docker.source import DockerSource

    return DockerSource(ctx)


@hookimpl
def discoverd_register_sources() -> list[SourcePlugin]:
    return [
        SourcePlugin(
            name="docker",
            factory=make_source,
            description="Running containers of a Docker Engine, one instance per published port.",
            config=DockerConfig,
        )
    ]
