"""The per-service render cache and the incremental split can never serve a stale render.

Every render of a long-lived proxy object (which caches each service's section and its split)
is compared with the render of a fresh proxy object, through changes of instances, services,
settings and templates; and the split assembled from cached pieces with a split of the whole
text. Pure: no HAProxy is started.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

import pytest

from discoverd import Service, ServiceInstance
from discoverd.plugins.haproxy import make_proxy
from discoverd.plugins.haproxy.config_split import (
    ConfigSplit,
    join_pieces,
    parse_piece,
    split_config,
)
from discoverd.plugins.haproxy.proxy import HAProxy
from discoverd.plugins.haproxy.render import render_config
from tests.plugins.haproxy.conftest import haproxy_context

STATE = Path("/run/discoverd")


def proxy_with(**options: object) -> HAProxy:
    proxy = make_proxy(haproxy_context(STATE, **options))
    assert isinstance(proxy, HAProxy)
    return proxy


def member(service: str, n: int, port: int = 0, **meta: str) -> ServiceInstance:
    return ServiceInstance(
        service=service,
        id=f"host{n % 3}:c{n:04d}:8000:tcp",
        address=f"10.0.{n // 200}.{1 + n % 200}",
        port=port or 30000 + n,
        meta=tuple(meta.items()),
        host_id=f"host{n % 3}",
    )


def registry(count: int = 12, size: int = 3) -> list[Service]:
    return [
        Service(
            f"svc{s:02d}",
            9000 + s,
            mode="http" if s % 2 else "tcp",
            instances=tuple(member(f"svc{s:02d}", s * 10 + i) for i in range(size)),
        )
        for s in range(count)
    ]


def equal_copy(services: list[Service]) -> list[Service]:
    """Equal values, all new objects (as a registry read afresh gives them)."""
    return [
        Service(
            s.name,
            s.frontend_port,
            s.protocol,
            s.mode,
            tuple(replace(i) for i in s.instances),
            s.meta,
        )
        for s in services
    ]


def mutations(rng: random.Random, start: list[Service]) -> Iterator[tuple[str, list[Service]]]:
    """A walk through registries, each one change away from the previous one."""
    services = list(start)
    serial = 1000
    for step in range(60):
        k = rng.randrange(len(services))
        target = services[k]
        members = list(target.instances)
        kind = step % 9
        if kind == 0 and members:  # an instance moves to another port
            j = rng.randrange(len(members))
            members[j] = replace(members[j], port=members[j].port + 1)
        elif kind == 1:  # an instance joins
            serial += 1
            members.append(member(target.name, serial))
        elif kind == 2 and members:  # an instance leaves
            members.pop(rng.randrange(len(members)))
        elif kind == 3:  # the service's check path changes
            path = rng.choice(["/health", "/ready", ""])
            target = replace(target, meta=(("check_http", path),) if path else ())
        elif kind == 4:  # the mode changes
            target = replace(target, mode="tcp" if target.mode == "http" else "http")
        elif kind == 5:  # a service goes
            services.pop(k)
            if len(services) < 3:
                services.append(registry(1)[0])
            yield "service removed", list(services)
            continue
        elif kind == 6:  # a service comes
            serial += 1
            name = f"new{serial}"
            port = 12000 + serial
            services.append(Service(name, port, mode="http", instances=(member(name, serial),)))
            yield "service added", list(services)
            continue
        elif kind == 7:  # an instance's metadata changes (drain, a check path)
            if members:
                j = rng.randrange(len(members))
                members[j] = replace(members[j], meta=(("check_http", f"/p{serial}"),))
                serial += 1
        else:  # equal values, new objects
            yield "equal copy", equal_copy(services)
            continue
        services[k] = replace(target, instances=tuple(members))
        yield f"change {kind} of {target.name}", list(services)


def same_split(a: ConfigSplit, b: ConfigSplit) -> bool:
    return (
        a.structure == b.structure
        and {k: dict(v) for k, v in a.servers.items()} == {k: dict(v) for k, v in b.servers.items()}
        and a.duplicates == b.duplicates
        and a.default_server == b.default_server
        and a.args == b.args
    )


# --------------------------------------------------------------------------------------------


def test_shipped_template_renders_sections_from_the_cache() -> None:
    proxy = proxy_with()
    assert proxy.renderer.cached
    services = registry()
    first = proxy.render(services)
    assert proxy.renderer.sections_rendered == len(services)
    # Unchanged: nothing rendered again, same objects or equal new ones.
    assert proxy.render(services) == first
    assert proxy.render(equal_copy(services)) == first
    assert proxy.renderer.sections_rendered == len(services)
    # One instance moves: that service's section only, and the text changes where it must.
    changed = list(services)
    moved = replace(changed[4].instances[0], port=40404)
    changed[4] = replace(changed[4], instances=(moved, *changed[4].instances[1:]))
    text = proxy.render(changed)
    assert proxy.renderer.sections_rendered == len(services) + 1
    assert text == proxy_with().render(changed)
    assert f"{moved.address}:40404" in text and f"{moved.address}:40404" not in first


def test_every_cached_render_equals_a_fresh_render() -> None:
    rng = random.Random(4)
    proxy = proxy_with()
    proxy.render(registry())
    for what, services in mutations(rng, registry()):
        text = proxy.render(services)
        assert text == proxy_with().render(services), what
        shuffled = list(services)
        rng.shuffle(shuffled)
        assert proxy.render(shuffled) == text, what  # order does not matter, cached or not


def test_the_split_from_cached_pieces_equals_a_split_of_the_whole_text() -> None:
    rng = random.Random(5)
    proxy = proxy_with()
    for what, services in mutations(rng, registry()):
        text = proxy.render(services)
        assert same_split(proxy.split(text), split_config(text)), what
    # A text that is not the last render is split as a whole.
    other = proxy_with(retries=7).render(registry())
    assert same_split(proxy.split(other), split_config(other))


def test_settings_are_part_of_what_is_cached() -> None:
    services = registry()
    a = proxy_with(check_interval="2s", bind="127.0.0.1")
    b = proxy_with(check_interval="5s", retries=1)
    for proxy in (a, b, a, b):
        proxy.render(services)
    assert a.render(services) == proxy_with(check_interval="2s", bind="127.0.0.1").render(services)
    assert b.render(services) == proxy_with(check_interval="5s", retries=1).render(services)
    assert "check inter 2s" in a.render(services) and "check inter 5s" in b.render(services)
    assert "bind 127.0.0.1:9000" in a.render(services) and "bind *:9000" in b.render(services)


def test_a_user_template_extending_the_shipped_one_is_cached_correctly(tmp_path: Path) -> None:
    (tmp_path / "haproxy.cfg.j2").write_text(
        '{% extends "default:haproxy.cfg.j2" %}\n'
        "{% block service_extra %}\n"
        "    # team {{ service.meta.get('check_http', 'none') }} of {{ service.name }}\n"
        "{% endblock %}\n"
        "{% block server %}\n"
        "    server {{ instance.id }} {{ instance.endpoint }} check weight {{ loop.index }}\n"
        "{% endblock %}\n"
        "{% block extra %}\n"
        "# {{ services | length }} services\n"
        "{% endblock %}\n"
    )
    proxy = proxy_with(template_dir=str(tmp_path))
    assert proxy.renderer.cached
    rng = random.Random(6)
    for what, services in mutations(rng, registry()):
        text = proxy.render(services)
        assert text == proxy_with(template_dir=str(tmp_path)).render(services), what
        assert f"# {len(services)} services\n" in text
        assert same_split(proxy.split(text), split_config(text)), what


@pytest.mark.parametrize(
    "block",
    [
        # Reads the whole list of services: a section depends on the other services.
        "{% block service_extra %}    # one of {{ services | length }}\n{% endblock %}",
        # The position of the service in the list.
        "{% block frontend_extra %}    # number {{ loop.index }}\n{% endblock %}",
        # Another block, through self.
        "{% block service_extra %}    # {{ self.extra() | length }}\n{% endblock %}"
        "{% block extra %}# {{ services | length }}\n{% endblock %}",
        # A name set outside the block.
        "{% set mark = 'x' %}{% block service_extra %}    # {{ mark }}\n{% endblock %}",
    ],
)
def test_a_section_that_depends_on_more_than_its_service_is_never_cached(
    tmp_path: Path, block: str
) -> None:
    (tmp_path / "haproxy.cfg.j2").write_text('{% extends "default:haproxy.cfg.j2" %}\n' + block)
    proxy = proxy_with(template_dir=str(tmp_path))
    assert not proxy.renderer.cached
    rng = random.Random(7)
    for what, services in mutations(rng, registry()):
        fresh = proxy_with(template_dir=str(tmp_path)).render(services)
        assert proxy.render(services) == fresh, what


def test_a_template_of_its_own_is_rendered_whole(tmp_path: Path) -> None:
    (tmp_path / "haproxy.cfg.j2").write_text(
        "global\n    maxconn {{ settings.maxconn }}\n"
        "{% for service in services %}{% block service scoped %}\n"
        "listen {{ service.name }}\n    bind :{{ service.frontend_port }}\n"
        "    # {{ loop.index }} of {{ services | length }}\n"
        "{% endblock %}{% endfor %}"
    )
    proxy = proxy_with(template_dir=str(tmp_path))
    assert not proxy.renderer.cached
    services = registry()
    first = proxy.render(services)
    assert "# 1 of 12" in first
    fewer = services[1:]
    assert proxy.render(fewer) == proxy_with(template_dir=str(tmp_path)).render(fewer)
    assert "# 1 of 11" in proxy.render(fewer)


def test_another_template_dir_renders_its_own_template(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, word in ((one, "alpha"), (two, "beta")):
        folder.mkdir()
        (folder / "haproxy.cfg.j2").write_text(
            '{% extends "default:haproxy.cfg.j2" %}\n'
            f"{{% block service_extra %}}    # {word} {{{{ service.name }}}}\n{{% endblock %}}\n"
        )
    services = registry()
    shipped, a, b = (
        proxy_with(),
        proxy_with(template_dir=str(one)),
        proxy_with(template_dir=str(two)),
    )
    for proxy in (shipped, a, b, shipped, a, b):
        proxy.render(services)
    assert "# alpha svc03" in a.render(services) and "# beta" not in a.render(services)
    assert "# beta svc03" in b.render(services) and "# alpha" not in b.render(services)
    assert "# alpha" not in shipped.render(services)
    assert a.render(services) == proxy_with(template_dir=str(one)).render(services)
    # The same text as the one-pass render of the same template.
    assert shipped.render(services) == render_config(
        shipped.renderer.template, shipped.renderer.config, shipped.dir, services
    )


def test_a_piece_that_continues_a_backend_is_split_in_its_context() -> None:
    head = "backend web\n    balance roundrobin\n"
    tail = "    server a 10.0.0.1:80 check\nfrontend f\n    bind :80\n"
    piece = parse_piece(tail, "web")
    assert piece.uses_start and piece.end == ""
    assert dict(piece.servers["web"])["a"].address == "10.0.0.1"
    alone = parse_piece(tail)
    assert not alone.servers and "server a" in alone.structure
    assert not parse_piece(head).uses_start and parse_piece(head).end == "web"
    assert parse_piece("    # nothing\n", "web").end is None


def test_cached_pieces_follow_the_default_server_options_they_continue(tmp_path: Path) -> None:
    """Server lines outside a service's own backend (before its frontend, after the last
    service) belong to the backend before them and take its default-server options, which
    change with that service's mode: the renderer's split stays the split of the text."""
    (tmp_path / "haproxy.cfg.j2").write_text(
        """{% extends "default:haproxy.cfg.j2" %}
{% block service %}
    server lead-{{ service.name }} 10.0.0.9:{{ service.frontend_port }}

frontend {{ service.name }}
    bind {{ service.bind }}
    default_backend {{ service.name }}

backend {{ service.name }}
    default-server check observe {{ "layer7" if service.mode == "http" else "layer4" }}
{% for member in service.instances %}
    server {{ member.id }} {{ member.endpoint }}
{% endfor %}
{% endblock %}
{% block extra %}
    server spare 10.0.0.8:80
{% endblock %}
"""
    )
    proxy = proxy_with(template_dir=str(tmp_path))
    assert proxy.renderer.cached
    alpha, beta = registry(2)
    udp = Service("zz", 53, protocol="udp", instances=())
    modes: list[tuple[Literal["http", "tcp"], Literal["http", "tcp"]]] = [
        ("http", "http"),
        ("tcp", "http"),
        ("http", "http"),
        ("http", "tcp"),
        ("tcp", "tcp"),
        ("http", "http"),
    ]
    for a_mode, b_mode in modes:
        services = [replace(alpha, mode=a_mode), replace(beta, mode=b_mode), udp]
        text = proxy.render(services)
        whole = split_config(text)
        assert same_split(proxy.split(text), whole), (a_mode, b_mode)
        # The lines that continue a backend are there, with that backend's options.
        layer = "layer7" if a_mode == "http" else "layer4"
        assert layer in whole.servers[alpha.name][f"lead-{beta.name}"].args
        layer = "layer7" if b_mode == "http" else "layer4"
        assert layer in whole.servers[beta.name]["spare"].args


def test_a_piece_carries_the_default_server_options_of_its_backend() -> None:
    head = "backend web\n    default-server check inter 2s\n"
    tail = "    server a 10.0.0.1:80 weight 3\n    default-server fall 3\n"
    first = parse_piece(head)
    assert first.end == "web" and first.end_defaults == "check inter 2s"
    piece = parse_piece(tail, first.end, first.end_defaults)
    assert piece.uses_start and piece.end is None
    assert dict(piece.servers["web"])["a"].args == "check inter 2s weight 3"
    assert piece.end_defaults == "check inter 2s fall 3"
    # A default-server line before the piece's first section keyword depends on where it
    # starts: the renderer splits it again when that changes.
    assert parse_piece("    default-server check\n").uses_start
    assert parse_piece("    default-server check\n", "web").end_defaults == "check"
    assert parse_piece("    default-server check\n").default_server  # outside a backend
    # A new section starts from none.
    assert parse_piece("backend other\n", "web", "check").end_defaults == ""
    # Pieces cut anywhere join into the split of the whole text.
    text = head + tail + "    server b 10.0.0.2:80\nbackend two\n    server c 10.0.0.3:80\n"
    lines = text.splitlines(keepends=True)
    for cut in range(len(lines) + 1):
        one = parse_piece("".join(lines[:cut]))
        two = parse_piece("".join(lines[cut:]), one.end or "", one.end_defaults)
        assert same_split(join_pieces([one, two]), split_config(text)), cut
