"""Services -> HAProxy configuration text (pure: no I/O besides reading the templates).

:func:`render_config` renders the whole template. :class:`Renderer` gives the same text, but keeps
the text of each service's section (the ``service`` or ``udp_service`` block, rendered for that
service) keyed by the frozen ``Service`` value: with a thousand services, a render where one
service changed renders that one section and looks the others up. It does so only when the
template allows it (:func:`sections_cacheable`): the shipped template, or a user template that
extends it and whose per-service blocks use nothing but ``service`` (and ``instance`` and ``loop``
in ``server``), ``settings``, ``paths`` and ``stats``, which are fixed for a renderer. Otherwise
every render is a whole render, as before.

The renderer also splits each section into its structure and server lines once
(:func:`~discoverd.plugins.haproxy.config_split.parse_piece`), so the split of a render is
assembled from cached pieces instead of splitting the whole text again (:meth:`Renderer.split`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.runtime import Context
from jinja2.visitor import NodeTransformer

from discoverd import PluginError, Service, ServiceInstance
from discoverd.plugins.haproxy.config import HAProxyConfig
from discoverd.plugins.haproxy.config_split import (
    ConfigSplit,
    Piece,
    join_pieces,
    parse_piece,
    split_config,
)
from discoverd.proxykit import load_template as kit_load_template
from discoverd.proxykit import plugin_environment

TEMPLATE = "haproxy.cfg.j2"
PACKAGE = "discoverd.plugins.haproxy"
# Metadata key (SERVICE_CHECK_HTTP=/health, registrator's name for it) that turns the plain TCP
# health check into an HTTP one on that path. Only a plain path is accepted.
CHECK_HTTP_KEY = "check_http"
_CHECK_PATH_RE = re.compile(r"/[A-Za-z0-9._~&+=:@%/?-]{0,200}")


def _breaks_line(text: str) -> bool:
    """``text`` holds a line feed, a carriage return or a NUL (three substring searches:
    cheaper than a set of the text's characters, for every value printed)."""
    return "\n" in text or "\r" in text or "\0" in text


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
        else sorted({_meta_value(i.meta, CHECK_HTTP_KEY) for i in service.instances} - {""})
    )
    return next((path for path in candidates if _CHECK_PATH_RE.fullmatch(path)), "")


def _meta_value(pairs: Sequence[tuple[str, str]], key: str) -> str:
    """``dict(pairs).get(key, "")`` without building the dict (once per instance per render)."""
    found = ""
    for name, value in pairs:
        if name == key:
            found = value
    return found


def _checked(value: Any) -> Any:
    """jinja2 ``finalize``: every ``{{ value }}`` goes through here before it is printed."""
    if value is None:
        raise PluginError("a HAProxy template printed None; refusing to render it")
    text = value if isinstance(value, str) else str(value)
    if _breaks_line(text):
        raise PluginError(
            f"refusing to render a value containing a line break into haproxy.cfg: {text[:60]!r}"
        )
    return value


def _quote(value: object) -> str:
    """Single-quote a value for HAProxy (no escapes and no ``$VAR`` expansion inside)."""
    text = str(value)
    if "'" in text or _breaks_line(text):
        raise PluginError(f"cannot quote {text[:60]!r} for haproxy.cfg")
    return f"'{text}'"


def environment(template_dir: str) -> jinja2.Environment:
    """The template environment: user templates first, shipped ones next (``default:``)."""
    return plugin_environment(
        "haproxy", PACKAGE, template_dir, finalize=_checked, filters={"quote": _quote}
    )


def load_template(env: jinja2.Environment) -> jinja2.Template:
    return kit_load_template(env, TEMPLATE, "HAProxy")


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


def _ordered(config: HAProxyConfig, services: Sequence[Service]) -> list[Service]:
    """``services`` in render order; raise ``PluginError`` if two services claim one port."""
    ordered = sorted(services, key=lambda s: (s.name, s.frontend_port, s.protocol))
    owners: dict[int, str] = {}
    if config.stats_port:
        owners[config.stats_port] = "the stats page"
    for service in ordered:
        if service.protocol == "udp":
            continue
        other = owners.setdefault(service.frontend_port, f"service {service.name}")
        if other != f"service {service.name}":
            raise PluginError(
                f"service {service.name} asks for frontend port {service.frontend_port}, "
                f"already used by {other}"
            )
    return ordered


def _context(
    config: HAProxyConfig, state_dir: Path, views: list[ServiceView], stats: bool = True
) -> dict[str, Any]:
    return {
        "settings": config,
        "paths": {
            "admin_socket": str(state_dir / "admin.sock"),
            "server_state": str(state_dir / "server-state"),
        },
        "stats": (
            {"bind": host_port(config.stats_bind, config.stats_port)}
            if config.stats_port and stats
            else None
        ),
        "services": views,
    }


def _finished(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def render_config(
    template: jinja2.Template,
    config: HAProxyConfig,
    state_dir: Path,
    services: Sequence[Service],
    *,
    stats: bool = True,
) -> str:
    """Render ``services``; raise ``PluginError`` if two services claim one port. ``stats``
    False leaves the stats page out (its port is held by another process)."""
    views = [service_view(s, config.bind) for s in _ordered(config, services)]
    try:
        text = template.render(_context(config, state_dir, views, stats))
    except jinja2.TemplateError as exc:
        raise PluginError(f"HAProxy template {template.name}: {exc}") from None
    return _finished(text)


# --------------------------------------------------------------------------------------------
# Rendering section by section

#: The blocks the shipped template renders once per service, with ``service`` set.
SECTION_BLOCKS = ("service", "udp_service")
#: Blocks rendered inside a service section (with the section blocks themselves).
_PER_SERVICE = frozenset(
    {*SECTION_BLOCKS, "frontend_extra", "service_extra", "default_server", "server"}
)
#: What a per-service block may use for its text to depend on its service alone.
_FIXED_NAMES = frozenset({"service", "settings", "paths", "stats", "super"})
_INSTANCE_NAMES = frozenset({"instance", "loop"})  # set by the loop around ``server``
_SAFE_GLOBALS = frozenset({"range", "dict", "namespace", "cycler", "joiner"})
_SHIPPED = f"default:{TEMPLATE}"


class _Section(str):
    """The text of one service's section, as the section block yields it (a marker for the
    consumer of the render, which cuts the output into pieces there)."""

    entry: _Entry


@dataclass
class _Entry:
    """What is cached of one service: its view and its rendered sections, and their split."""

    service: Service
    view: ServiceView
    members: tuple[object, ...] = ()  # _identity(service)
    sections: dict[str, _Section] = field(default_factory=dict)
    pieces: dict[str, Piece] = field(default_factory=dict)  # the split of a section, by its text


@dataclass
class _Rendered:
    """The last render: its text and the pieces it is made of (section or not)."""

    text: str
    chunks: list[tuple[str, _Entry | None]]


def _identity(service: Service) -> tuple[object, ...]:
    """A key naming ``service``'s instances by identity, and its other fields by value. Valid
    only while the objects it names are alive (the renderer keeps them)."""
    return (service.name, service.frontend_port, *map(id, service.instances))


def _name(service: Service) -> tuple[str, int, str]:
    return (service.name, service.frontend_port, service.protocol)


def _same_fields(a: Service, b: Service) -> bool:
    """``a == b`` for services whose instances are the same objects (see ``_identity``)."""
    return (
        a.protocol == b.protocol
        and a.mode == b.mode
        and a.meta == b.meta
        and len(a.instances) == len(b.instances)
        and all(x is y for x, y in zip(a.instances, b.instances, strict=True))
    )


def _template_chain(env: jinja2.Environment, name: str) -> list[tuple[str, nodes.Template]]:
    """``name`` and the templates it extends, as (name, parsed source); empty if an ``extends``
    is not a constant name (the chain is then unknown)."""
    chain: list[tuple[str, nodes.Template]] = []
    seen: set[str] = set()
    while name not in seen:
        seen.add(name)
        assert env.loader is not None
        source = env.loader.get_source(env, name)[0]
        ast = env.parse(source)
        chain.append((name, ast))
        extends = list(ast.find_all(nodes.Extends))
        if not extends:
            return chain
        target = extends[0].template
        if len(extends) > 1 or not isinstance(target, nodes.Const):
            return []
        name = str(target.value)
    return []


def _block_names_inside(block: nodes.Block) -> set[str]:
    return {inner.name for inner in block.find_all(nodes.Block)}


class _StripBlocks(NodeTransformer):
    """Removes nested blocks: each block is judged on its own."""

    def visit_Block(self, node: nodes.Block) -> None:
        return None


def _free_names(env: jinja2.Environment, block: nodes.Block) -> set[str]:
    """The names a block reads that it does not define itself (nested blocks excluded: they
    are removed from ``block``, which must be a parse of its own)."""
    _StripBlocks().generic_visit(block)
    ast = nodes.Template(block.body, lineno=1)
    ast.set_environment(env)
    names = set(meta.find_undeclared_variables(ast))
    if any(name.name == "self" for name in block.find_all(nodes.Name)):
        names.add("self")  # self.<block>() renders another block, with its own inputs
    return names


def sections_cacheable(env: jinja2.Environment, template: jinja2.Template) -> bool:
    """True if each service's section depends on that service alone (and on the renderer's
    fixed settings): the shipped template, or user templates extending it whose blocks inside a
    service section read nothing else, include nothing and do not call other blocks."""
    chain = _template_chain(env, template.name or TEMPLATE)
    if not chain:
        return False
    shipped = env.loader.get_source(env, _SHIPPED)[0] if env.loader is not None else None
    root_name, root = chain[-1]
    if root_name != _SHIPPED and (root_name != TEMPLATE or _source(env, root_name) != shipped):
        return False  # a template of its own: its sections are unknown
    users = [ast for name, ast in chain if _source(env, name) != shipped]
    per_service = set(_PER_SERVICE)
    for ast in (root, *users):  # blocks that user templates nest inside per-service blocks
        for block in ast.find_all(nodes.Block):
            if block.name in per_service:
                per_service |= _block_names_inside(block)
    in_server = {"server"}
    for ast in (root, *users):
        for block in ast.find_all(nodes.Block):
            if block.name in in_server:
                in_server |= _block_names_inside(block)
    for ast in users:
        for block in list(ast.find_all(nodes.Block)):
            if block.name not in per_service:
                continue
            if any(block.find_all((nodes.Include, nodes.Import, nodes.FromImport))):
                return False
            allowed = _FIXED_NAMES | _SAFE_GLOBALS
            if block.name in in_server:
                allowed |= _INSTANCE_NAMES
            if not _free_names(env, block) <= allowed:
                return False
    return True


def _source(env: jinja2.Environment, name: str) -> str | None:
    try:
        return env.loader.get_source(env, name)[0] if env.loader is not None else None
    except jinja2.TemplateNotFound:
        return None


class Renderer:
    """Renders services like :func:`render_config`, from cached per-service sections.

    The cache is memoization keyed by the ``Service`` values: it never changes what a render
    returns. ``cached`` says whether the template allows it (:func:`sections_cacheable`; if
    not, every render is a whole render); ``sections_rendered`` counts the sections rendered
    (cache misses), for tests and measurements; ``template`` is the template it renders.
    """

    def __init__(
        self,
        env: jinja2.Environment,
        template: jinja2.Template,
        config: HAProxyConfig,
        state_dir: Path,
    ) -> None:
        self.template = template
        self.config = config
        self.state_dir = state_dir
        try:
            self.cached = sections_cacheable(env, template)
        except jinja2.TemplateError:
            self.cached = False
        self._used: list[_Entry] = []  # the entries of the last render
        self._by_id: dict[int, _Entry] = {}  # id(service) -> entry, for the same objects
        self._by_members: dict[tuple[object, ...], _Entry] = {}  # see _identity
        self._last: _Rendered | None = None
        self._free_pieces: dict[tuple[str, str, str], Piece] = {}  # text between sections
        self._stats = True  # whether the cached sections were rendered with the stats page
        #: Sections rendered (cache misses) since this renderer was made (for tests).
        self.sections_rendered = 0

    def render(self, services: Sequence[Service], *, stats: bool = True) -> str:
        """``stats`` False leaves the stats page out (its port is held by another process)."""
        ordered = _ordered(self.config, services)
        if stats != self._stats:  # a section may print ``stats``: forget them all (rare)
            self._used, self._by_id, self._by_members, self._last = [], {}, {}, None
            self._stats = stats
        if not self.cached:
            views = [service_view(s, self.config.bind) for s in ordered]
            text = self._render(views, {})
            self._last = None
            return text
        used: list[_Entry] = []
        by_id: dict[int, _Entry] = {}
        by_members: dict[tuple[object, ...], _Entry] = {}
        by_view: dict[int, _Entry] = {}
        by_name: dict[tuple[str, int, str], _Entry] | None = None  # built on the first need
        views = []
        for service in ordered:
            # Cheapest first: the same object; then the same instance objects (ids are stable
            # while the entry holds them); then an equal value under the same name (comparing
            # compares every field of every instance: the slow way, for services built afresh).
            entry = self._by_id.get(id(service))
            if entry is None or entry.service is not service:
                entry = self._by_members.get(_identity(service))
                if entry is None or not _same_fields(entry.service, service):
                    if by_name is None:
                        by_name = {_name(e.service): e for e in self._used}
                    entry = by_name.get(_name(service))
                    if entry is None or entry.service != service:
                        entry = _Entry(service, service_view(service, self.config.bind))
                entry.service = service  # equal: the newest object, for the next lookups
                entry.members = _identity(service)
            used.append(entry)
            by_id[id(service)] = entry
            by_members[entry.members] = entry
            by_view[id(entry.view)] = entry
            views.append(entry.view)
        chunks: list[tuple[str, _Entry | None]] = []
        text = self._render(views, by_view, chunks)
        # Keep what this render used, nothing else: memory follows the registry. Each entry
        # holds the objects whose ids key it.
        self._used, self._by_id, self._by_members = used, by_id, by_members
        self._last = _Rendered(text, chunks)
        return text

    def split(self, text: str) -> ConfigSplit:
        """The split of ``text``: assembled from cached pieces when it is the last render."""
        last = self._last
        if last is None or not (last.text is text or last.text == text):
            return split_config(text)
        if any(not chunk.endswith("\n") for chunk, _ in last.chunks[:-1] if chunk):
            return split_config(text)  # a piece ends inside a line: cut the whole text instead
        pieces: list[Piece] = []
        section = defaults = ""
        free: dict[tuple[str, str, str], Piece] = {}
        for chunk, entry in last.chunks:
            if entry is None:
                key = (chunk, section, defaults)
                piece = self._free_pieces.get(key) or parse_piece(chunk, section, defaults)
                free[key] = piece
            else:
                kept = entry.pieces.get(chunk)
                if kept is None or (
                    kept.uses_start and (kept.start, kept.start_defaults) != (section, defaults)
                ):
                    kept = parse_piece(chunk, section, defaults)
                    entry.pieces = {chunk: kept}
                piece = kept
            pieces.append(piece)
            if piece.end is not None or piece.uses_start:
                # Otherwise the piece leaves the section and its default-server options as
                # they were (its own end_defaults are those of where it was first split).
                defaults = piece.end_defaults
            section = piece.end if piece.end is not None else section
        self._free_pieces = free
        return join_pieces(pieces)

    def _render(
        self,
        views: list[ServiceView],
        by_view: dict[int, _Entry],
        chunks: list[tuple[str, _Entry | None]] | None = None,
    ) -> str:
        template = self.template
        context = template.new_context(_context(self.config, self.state_dir, views, self._stats))
        if chunks is not None:
            for name in SECTION_BLOCKS:
                context.blocks.setdefault(name, []).insert(0, self._section_block(name, by_view))
        try:
            try:
                parts: list[str] = []
                for part in template.root_render_func(context):
                    if chunks is not None and type(part) is _Section:
                        chunks.append(("".join(parts), None))
                        chunks.append((part, part.entry))
                        parts = []
                    else:
                        parts.append(part)
                if chunks is not None:
                    chunks.append(("".join(parts), None))
                    return _finished("".join(chunk for chunk, _ in chunks))
                return _finished("".join(parts))
            except Exception:
                template.environment.handle_exception()
        except jinja2.TemplateError as exc:
            raise PluginError(f"HAProxy template {template.name}: {exc}") from None
        raise AssertionError("unreachable")  # handle_exception always raises

    def _section_block(self, name: str, by_view: dict[int, _Entry]) -> Any:
        """A block function put first for ``name``: looks the service's section up, or renders
        it with the block that would have rendered it (the next one) and keeps it."""

        def section(context: Context) -> Iterator[str]:
            blocks = context.blocks[name]
            own = blocks[blocks.index(section) + 1]
            entry = by_view.get(id(context.get("service")))
            if entry is None:  # not called by the loop over services (e.g. self.service())
                yield from own(context)
                return
            text = entry.sections.get(name)
            if text is None:
                text = _Section("".join(own(context)))
                text.entry = entry
                entry.sections[name] = text
                self.sections_rendered += 1
            yield text

        return section
