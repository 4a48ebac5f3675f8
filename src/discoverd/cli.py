"""The ``discoverd`` command line.

``discoverd --registry etcd --proxy haproxy`` (no subcommand) runs both roles in one process.
Heavy imports happen inside the commands so ``discoverd --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from discoverd.core.config import Settings
    from discoverd.core.manager import BrokenPlugin, PluginManager


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"discoverd: {message}", err=True)
    sys.exit(code)


@contextmanager
def operator_errors() -> Iterator[None]:
    """Turn the errors meant for the operator into one line and an exit status, no traceback."""
    from discoverd.core.errors import (
        BrokenPluginError,
        ConfigError,
        PluginError,
        PluginLoadError,
        Unavailable,
        UnknownPluginError,
    )
    from discoverd.core.manager import deferred_plugin_warnings

    try:
        # A plugin that failed to import is one warning line, unless this command selects it:
        # then the command fails with the cause instead (and no warning repeats it).
        with deferred_plugin_warnings(_warn_broken):
            yield
    except BrokenPluginError as exc:
        fail(str(exc), 2)
    except (ConfigError, UnknownPluginError, PluginLoadError) as exc:
        fail(str(exc).strip("'\""), 2)
    except Unavailable as exc:
        fail(str(exc), 1)
    except PluginError as exc:
        fail(str(exc), 2)


def _warn_broken(broken: BrokenPlugin) -> None:
    click.echo(f"discoverd: warning: {broken.warning()}", err=True)


def _names(kind: str) -> str:
    try:
        from discoverd.core.manager import get_plugin_manager

        manager = get_plugin_manager()
        lookups: dict[str, Callable[[], dict[str, Any]]] = {
            "source": manager.sources,
            "registry": manager.registries,
            "proxy": manager.proxies,
        }
        return ", ".join(lookups[kind]()) or "none installed"
    except Exception:  # help must never fail because a plugin is broken
        return "see `discoverd plugins`"


class PluginOption(click.Option):
    """An option whose help lists the installed plugins, computed only when help is shown."""

    def __init__(self, *args: Any, kind: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        return record[0], f"{record[1]} Installed: {_names(self.kind)}."


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--config",
            "-c",
            "config_file",
            type=click.Path(path_type=Path),
            default=None,
            help="TOML config file (also DISCOVERD_CONFIG).",
        ),
        click.option(
            "--source", cls=PluginOption, kind="source", help="Container source [docker]."
        ),
        click.option("--registry", cls=PluginOption, kind="registry", help="Registry [etcd]."),
        click.option("--proxy", cls=PluginOption, kind="proxy", help="Proxy [haproxy]."),
        click.option("--host-ip", help="Address other hosts reach this one on (HOST_IP)."),
        click.option("--host-id", help="Stable id of this agent [host name]."),
        click.option("--state-dir", help="Directory for rendered configs, pid files, sockets."),
        click.option("--log-level", help="debug, info, warning or error [info]."),
        click.option("--log-format", help="text or json [text]."),
        click.option(
            "--set",
            "sets",
            multiple=True,
            metavar="SECTION.KEY=VALUE",
            help="Set any option, e.g. --set etcd.ttl=30 (repeatable).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


FLAG_KEYS = (
    "source",
    "registry",
    "proxy",
    "host_ip",
    "host_id",
    "state_dir",
    "log_level",
    "log_format",
)


def _merge(ctx: click.Context, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Subcommand flags override the group's; returns the merged option dict."""
    merged: dict[str, Any] = dict(ctx.find_root().params)
    for key, value in kwargs.items():
        if key == "sets":
            merged["sets"] = tuple(merged.get("sets") or ()) + tuple(value or ())
        elif value is not None:
            merged[key] = value
    return merged


def load(params: dict[str, Any]) -> tuple[Settings, PluginManager]:
    from discoverd.core.agent import plugin_schemas
    from discoverd.core.config import load_settings
    from discoverd.core.manager import get_plugin_manager

    manager = get_plugin_manager()
    settings = load_settings(
        plugin_schemas(manager),
        config_file=params.get("config_file"),
        flags={k: params.get(k) for k in FLAG_KEYS},
        sets=params.get("sets") or (),
    )
    return settings, manager


def _run_roles(params: dict[str, Any], roles: tuple[str, ...]) -> None:
    from discoverd.core.agent import Agent, configure_logging, settle_gc
    from discoverd.core.agent import plugin_schemas as schemas_of
    from discoverd.core.config import load_settings

    with operator_errors():
        settings, manager = load(params)
        configure_logging(settings.core.log_level, settings.core.log_format)
        settle_gc()  # before the roles: a reload (SIGHUP) replaces those

        def reload_settings() -> Settings:
            """The same sources again (flags, variables, the file) for a SIGHUP."""
            return load_settings(
                schemas_of(manager),
                config_file=params.get("config_file"),
                flags={k: params.get(k) for k in FLAG_KEYS},
                sets=params.get("sets") or (),
            )

        agent = Agent(settings, manager, roles=roles, reload_settings=reload_settings)
        agent.build()
    sys.exit(agent.run())


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@common_options
@click.version_option(package_name="discoverd")
@click.pass_context
def cli(ctx: click.Context, /, **kwargs: Any) -> None:
    """Service discovery for Docker hosts.

    Without a command, runs both roles: register (Docker -> registry) and discover
    (registry -> proxy). Options come from flags, then DISCOVERD_* environment variables,
    then the config file, then defaults.
    """
    if ctx.invoked_subcommand is None:
        _run_roles(_merge(ctx, {}), ("register", "discover"))


@cli.command()
@common_options
@click.pass_context
def run(ctx: click.Context, /, **kwargs: Any) -> None:
    """Run both roles (the same as no command)."""
    _run_roles(_merge(ctx, kwargs), ("register", "discover"))


@cli.command()
@common_options
@click.pass_context
def register(ctx: click.Context, /, **kwargs: Any) -> None:
    """Run the register role only: container source -> registry."""
    _run_roles(_merge(ctx, kwargs), ("register",))


@cli.command()
@common_options
@click.pass_context
def discover(ctx: click.Context, /, **kwargs: Any) -> None:
    """Run the discover role only: registry -> proxy."""
    _run_roles(_merge(ctx, kwargs), ("discover",))


def _view(
    params: dict[str, Any], *, with_proxy: bool = True, warn: bool = False, direct: bool = True
) -> Any:
    """What the discover role would see now, read once: the registry's catalog, the services
    built from it as the discover role builds them, and (``with_proxy``) what the proxy says
    it cannot serve. Changes nothing; ``warn`` prints the problems on stderr. ``direct``: this
    host's instances at their container address when the discover role would use it (core
    option ``local_direct``); off, every instance as the registry holds it."""
    from types import SimpleNamespace

    from discoverd.core.agent import local_direct, make_proxy, make_registry
    from discoverd.core.assignment import build_services
    from discoverd.core.local import local_catalog
    from discoverd.core.model import backend_problem

    settings, manager = load(params)
    proxy = make_proxy(manager, settings, create=False) if with_proxy else None
    registry = make_registry(manager, settings, create=False)
    try:
        catalog = registry.snapshot()
    finally:
        registry.close()
    own, single = settings.host().id, settings.core.single_machine
    if direct and settings.core.local_direct != "false":
        asked = proxy if proxy is not None else make_proxy(manager, settings, create=False)
        try:
            if local_direct(settings.core.local_direct, asked):
                catalog = local_catalog(catalog, own)  # where the discover role serves them
        finally:
            if asked is not proxy:
                asked.close()
    assignment = build_services(
        catalog,
        default_mode=settings.core.default_mode,
        reserved_ports=proxy.reserved_ports() if proxy is not None else (),
        accept=None if single else (lambda i: backend_problem(i, own, single_machine=single)),
    )
    if warn:
        for problem in assignment.problems:
            click.echo(f"warning: {problem}", err=True)
    unservable = proxy.unservable(assignment.services) if proxy and assignment.services else {}
    return SimpleNamespace(
        settings=settings,
        manager=manager,
        proxy=proxy,
        catalog=catalog,
        assignment=assignment,
        unservable=unservable,
    )


@cli.command()
@common_options
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def explain(ctx: click.Context, /, target: str, as_json: bool, **kwargs: Any) -> None:
    """Why a service, or a container of this host, is or is not receiving traffic.

    TARGET is a service name, or a container name or id (prefix it with service: or
    container: when a name is both). From the live registry, the local Docker engine and
    the running proxy; changes nothing."""
    from discoverd.core import explain as explaining
    from discoverd.core.agent import make_source
    from discoverd.core.checks import CheckSpec
    from discoverd.core.metadata import ExposurePolicy

    kind, _, name = (
        target.rpartition(":")
        if target.startswith(("service:", "container:"))
        else ("", "", target)
    )
    with operator_errors():
        view = _view(_merge(ctx, kwargs))
        known = {i.service for i in view.catalog.instances} | {
            p.service for p in view.assignment.problems if p.service
        }
        document: Any
        if kind == "service" or (not kind and name in known):
            states = view.proxy.server_states(name)
            story = explaining.explain_service(
                name, view.catalog, view.assignment, view.unservable, states
            )
            document = story if not as_json else story.as_dict()
        else:
            core = view.settings.core
            source = make_source(view.manager, view.settings, create=False)
            try:
                found = source.lookup(name)
                if found is None:
                    raise click.ClickException(
                        f"no service {name!r} in the registry, and no container {name!r} on "
                        "this host's source"
                    )
                snapshot = source.snapshot()  # fills the check targets, as the roles do
                del snapshot
                spec, ineligible = found
                host = view.settings.host()
                check = (
                    None
                    if core.check == "none"
                    else CheckSpec(
                        kind=core.check, path=core.check_path, timeout=core.check_timeout
                    )
                )
                container = explaining.explain_container(
                    spec,
                    ineligible,
                    host_ip=host.ip,
                    host_id=host.id,
                    policy=ExposurePolicy.from_config(core),
                    source=source,
                    stopping=source.stopping(),
                    check=check,
                    catalog=view.catalog,
                    assignment=view.assignment,
                    unservable=view.unservable,
                    proxy=view.proxy,
                )
            finally:
                source.close()
            document = container if not as_json else container.as_dict()
    if as_json:
        click.echo(explaining.as_json(document))
    elif isinstance(document, explaining.ServiceStory):
        click.echo(explaining.service_text(document))
    else:
        click.echo(explaining.container_text(document))


@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def plan(ctx: click.Context, /, as_json: bool, **kwargs: Any) -> None:
    """What the next apply would change on the running proxy (servers added, removed and
    drained, frontends added or removed, whether a reload is needed). Exit status 0 when
    nothing would change, 1 when something would, 2 on an error."""
    from discoverd.core import explain as explaining
    from discoverd.core.discover import read_served

    try:
        with operator_errors():
            view = _view(_merge(ctx, kwargs))
            services = [s for s in view.assignment.services if s.name not in view.unservable]
            config = view.proxy.render(services)
            action = view.proxy.plan(config)
            path = view.settings.state_dir / "discover" / "served.json"
            served = read_served(path) if path.exists() else None
            result = explaining.plan(services, served, action, view.unservable)
    except SystemExit as exc:
        sys.exit(2 if exc.code else 0)  # an error is 2 here: 1 means "changes"
    click.echo(explaining.as_json(result.as_dict()) if as_json else explaining.plan_text(result))
    sys.exit(1 if result.changes else 0)


@cli.command()
@common_options
@click.pass_context
def render(ctx: click.Context, /, **kwargs: Any) -> None:
    """Print the proxy configuration the live registry would give (changes nothing)."""
    with operator_errors():
        view = _view(_merge(ctx, kwargs), warn=True)
        for name, reason in sorted(view.unservable.items()):
            click.echo(f"warning: service {name} left out: {reason}", err=True)
        services = [s for s in view.assignment.services if s.name not in view.unservable]
        click.echo(view.proxy.render(services), nl=False)


@cli.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def services(ctx: click.Context, /, as_json: bool, **kwargs: Any) -> None:
    """List what the registry holds, grouped by service."""
    with operator_errors():
        view = _view(_merge(ctx, kwargs), with_proxy=False, warn=True, direct=False)
        assignment = view.assignment
    rows = [
        {
            "name": s.name,
            "frontend_port": s.frontend_port,
            "mode": s.mode,
            "protocol": s.protocol,
            "instances": [
                {
                    "id": i.id,
                    "address": i.address,
                    "port": i.port,
                    "host_id": i.host_id,
                    "tags": list(i.tags),
                    "meta": i.meta_dict,
                }
                for i in s.instances
            ],
        }
        for s in assignment.services
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = [("SERVICE", "FRONTEND", "MODE", "INSTANCES")]
    for row in rows:
        endpoints = " ".join(f"{i['address']}:{i['port']}" for i in row["instances"]) or "-"
        table.append((row["name"], str(row["frontend_port"]), row["mode"], endpoints))
    _print_table(table)


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List the installed plugins: every source, registry and proxy they provide, with the
    distribution and version it comes from, and the plugins that failed to load."""
    from discoverd.core.manager import get_plugin_manager

    with operator_errors():
        manager = get_plugin_manager()
    components = manager.components()
    if as_json:
        data = {
            "components": [c.as_dict() for c in components],
            "plugins": sorted(
                [i.as_dict() for i in manager.infos] + [b.as_dict() for b in manager.broken],
                key=lambda p: str(p["name"]),
            ),
        }
        click.echo(json.dumps(data, indent=2))
        return
    table = [("KIND", "NAME", "DISTRIBUTION", "VERSION", "PLUGIN", "DESCRIPTION")]
    for c in components:
        table.append(
            (c.kind, c.name, c.distribution or "-", c.version or "-", c.plugin, c.description)
        )
    providing = {c.plugin for c in components}
    for info in manager.infos:  # plugins that only observe (or provide nothing)
        if info.name not in providing:
            what = f"hooks: {', '.join(info.hooks)}" if info.hooks else "provides nothing"
            dist, version = info.distribution or "-", info.version or "-"
            table.append(("hooks", info.name, dist, version, info.name, what))
    for broken in manager.broken:
        dist, version = broken.distribution or "-", broken.version or "-"
        what = f"failed to {broken.stage}: {broken.error}"
        table.append(("failed", broken.name, dist, version, broken.name, what))
    _print_table(table)


@cli.command("config")
@common_options
@click.option(
    "--defaults",
    is_flag=True,
    help="Print a complete commented config file for the installed plugins, with defaults.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
@click.pass_context
def config_command(ctx: click.Context, /, defaults: bool, as_json: bool, **kwargs: Any) -> None:
    """Print the configuration in effect (flags, variables, file, defaults), with where each
    value came from and secrets hidden; or, with --defaults, every option and its default."""
    from discoverd.core.agent import plugin_schemas
    from discoverd.core.manager import get_plugin_manager
    from discoverd.core.reference import defaults_toml, effective, effective_toml

    with operator_errors():
        if defaults:
            click.echo(defaults_toml(plugin_schemas(get_plugin_manager())), nl=False)
            return
        settings, manager = load(_merge(ctx, kwargs))
        core = settings.core
        manager.source(core.source)
        manager.registry(core.registry)
        manager.proxy(core.proxy)
        rows = effective(settings, sorted({core.source, core.registry, core.proxy}))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(effective_toml(rows), nl=False)


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
def check(file: Path) -> None:
    """Validate a config file: syntax, keys, value types and plugin names."""
    from discoverd.core.agent import make_proxy, make_registry, make_source, plugin_schemas
    from discoverd.core.config import load_settings
    from discoverd.core.errors import PluginError
    from discoverd.core.manager import get_plugin_manager

    with operator_errors():
        manager = get_plugin_manager()
        settings = load_settings(plugin_schemas(manager), config_file=file, env={})
        core = settings.core
        manager.source(core.source)
        manager.registry(core.registry)
        manager.proxy(core.proxy)
        # Every section the file sets is checked against its plugin's rules, used or not.
        for section in sorted({sect for sect, _ in settings.origins if sect}):
            settings.config_for(section)
        # The plugins' own checks (their factories connect to nothing).
        for make in (make_source, make_registry, make_proxy):
            try:
                built: Any = make(manager, settings, create=False)
            except PluginError as exc:
                raise PluginError(f"config file {file}: {exc}") from None
            built.close()
    click.echo(f"{file}: ok (source {core.source}, registry {core.registry}, proxy {core.proxy})")


def main() -> None:
    cli(prog_name="discoverd")
