"""The docker source's options (the ``[docker]`` section)."""

from __future__ import annotations

from dataclasses import dataclass

from discoverd import option, validators


def daemon_url(value: str) -> str:
    """A Docker daemon URL the SDK understands (``unix:///...``, ``tcp://host:port``, ...), or
    ``""``. Checked by the SDK itself, imported only when a URL is set."""
    text = validators.one_line(value)
    if not text:
        return ""
    import docker.errors
    import docker.utils

    try:
        docker.utils.parse_host(text)
    except docker.errors.DockerException as exc:
        raise ValueError(f"is not a Docker daemon URL: {exc}") from None
    return text


@dataclass(frozen=True)
class DockerConfig:
    """The ``[docker]`` section."""

    host: str = option(
        "",
        "Docker daemon URL; default: DOCKER_HOST, else the local socket",
        env=("DOCKER_HOST",),
        check=daemon_url,
    )
    timeout: float = option(10.0, "Timeout of Docker API calls, in seconds.", min=0.001)
