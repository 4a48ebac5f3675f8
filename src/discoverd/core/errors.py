"""Every exception discoverd raises on purpose, and a helper to read client-library errors.

Which one to raise decides what the core does next:

- :class:`Unavailable`: the backing service (daemon, registry, proxy) cannot be reached now; the
  core keeps what it has and retries with backoff.
- :class:`PluginError`: something the operator must fix; the message is shown without a
  traceback. :class:`ProxyConfigError` is the proxy's own checker refusing a candidate.
- :class:`ConfigError` / :class:`OptionError`: a configuration value that cannot be used; the
  core names where it was set (file, variable, flag).
- :class:`ValidationError`: a value that breaks a rule of the data model (from a label, a
  registry entry); only the object it belongs to is refused.
- :class:`PluginLoadError` and its kinds: plugins that cannot be put together.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class PluginError(Exception):
    """An error a plugin raises with a message meant for the operator (no traceback shown)."""


class Unavailable(PluginError):
    """The backing service (daemon, registry, proxy) cannot be reached now; the core retries."""


class ProxyConfigError(PluginError):
    """A rendered candidate failed validation; the message is the proxy's own explanation."""


class ConfigError(Exception):
    """A configuration value or file that cannot be used; the message is for the operator and
    names where the value was set."""


class OptionError(ValueError):
    """Raised by a configuration class (in ``__post_init__``) when options do not fit together.

    ``keys`` names the options involved; the core adds where each of them was set::

        raise OptionError("key is set but cert is not: give both", "key", "cert")
    """

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.keys = keys


class ValidationError(ValueError):
    """A value that does not follow the rules of the data model.

    The message names the field, the offending value (shortened) and the rule.
    """


class PluginLoadError(Exception):
    """Plugins could not be put together (duplicate names, a selected plugin that failed)."""


class UnknownPluginError(LookupError):
    """A selected name that no plugin provides. The message is one line for the operator."""


class BrokenPluginError(PluginLoadError):
    """The user selected a plugin whose entry point failed; the message is one line with the
    cause, e.g. ``proxy plugin 'x' (from distribution x-plugin 1.0) failed to import: ...``.

    ``plugin`` is the :class:`~discoverd.core.manager.BrokenPlugin` record."""

    def __init__(self, kind: str, plugin: Any) -> None:
        self.kind = kind
        self.plugin = plugin
        super().__init__(
            f"{kind} plugin {plugin.name!r} ({plugin.origin}) failed to {plugin.stage}: "
            f"{plugin.error}"
        )


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it: causes, contexts, exceptions passed as arguments,
    and urllib3's ``MaxRetryError.reason``; each once, outermost first. Client libraries
    (requests, urllib3, docker) wrap the real cause several layers deep."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        item = todo.pop(0)
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        inner: list[Any] = [item.__cause__, item.__context__, getattr(item, "reason", None)]
        inner.extend(item.args)
        todo.extend(x for x in inner if isinstance(x, BaseException))
