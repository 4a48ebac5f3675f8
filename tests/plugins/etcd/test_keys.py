"""Reading a catalog back from keys (pure: no server): the same catalog whether the keys come
at once or in pages."""

from __future__ import annotations

import random

import pytest

from discoverd import ServiceInstance
from discoverd.plugins.etcd.keys import (
    CatalogAssembler,
    Holder,
    KeyScheme,
    encode_metadata,
    read_catalog,
)

SCHEME = KeyScheme()


def registry() -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], list[Holder]]:
    """Instance keys, metadata keys and claims, sorted as etcd returns them: services whose
    names sort differently from their directories (``a`` and ``a-b``: ``-`` comes before
    ``/``), malformed keys and values, metadata without an instance, an instance without
    metadata, a service without a port."""
    backend: list[tuple[str, str]] = []
    meta: list[tuple[str, str]] = []
    names = ["a", "a-b", "a.c", "a0", "b", "zz", "Bad", "nometa", "noport"]
    for s, name in enumerate(names):
        if name != "noport":
            backend.append((SCHEME.port_key(name), str(20000 + s)))
        for i in range(3):
            iid = f"h{i}-{name}"
            backend.append((SCHEME.backend_key(name, iid), f"10.0.{s}.{i + 1}:{9000 + i}"))
            if name in ("nometa", "Bad"):
                continue
            item = ServiceInstance(
                service=name,
                id=iid,
                address=f"10.0.{s}.{i + 1}",
                port=9000 + i,
                frontend_port=20000 + s if name != "noport" else None,
                meta=(("container_address", f"172.18.{s}.{i + 2}:8000"),),
                host_id=f"h{i}",
            )
            meta.append((SCHEME.meta_key(name, iid), encode_metadata(item)))
    backend += [
        (f"{SCHEME.prefix}/lonely", "1.2.3.4:5"),  # no service directory
        (f"{SCHEME.prefix}/b/nested/key", "1.2.3.4:5"),
        (SCHEME.backend_key("b", "garbage"), "not an endpoint"),
    ]
    meta += [
        (SCHEME.meta_key("b", "h0-b"), "{not json"),  # replaces the good one above
        (SCHEME.meta_key("ghost", "x"), "{}"),  # metadata of no instance
    ]
    holders = [Holder(SCHEME.holder_key("a", "h0").encode(), b"20000", 5)]
    encoded = [(k.encode(), v.encode()) for k, v in dict(backend).items()]
    encoded_meta = [(k.encode(), v.encode()) for k, v in dict(meta).items()]
    return sorted(encoded), sorted(encoded_meta), holders


def pages(kvs: list[tuple[bytes, bytes]], rng: random.Random) -> list[list[tuple[bytes, bytes]]]:
    cuts = sorted(rng.sample(range(1, len(kvs)), rng.randint(0, min(6, len(kvs) - 1))))
    return [kvs[a:b] for a, b in zip([0, *cuts], [*cuts, len(kvs)], strict=True)]


@pytest.mark.parametrize("seed", range(20))
def test_pages_in_any_split_and_interleaving_give_the_catalog_of_one_read(seed: int) -> None:
    backend, meta, holders = registry()
    whole = read_catalog(SCHEME, backend, meta, 7, holders)
    assert whole.instances and whole.problems  # the registry has both
    rng = random.Random(seed)
    streams = [
        [("backend", p) for p in pages(backend, rng)],
        [("meta", p) for p in pages(meta, rng)],
    ]
    assembler = CatalogAssembler(SCHEME, holders)
    read_early = 0
    while streams[0] or streams[1]:
        stream = rng.choice([s for s in streams if s])
        kind, page = stream.pop(0)
        last = page[-1][0] if stream else None
        if kind == "backend":
            assembler.add_backend(page, last)
        else:
            assembler.add_meta(page, last)
        read_early = max(read_early, len(assembler._read))
    assert assembler.catalog(7) == whole
    if seed == 0:
        assert read_early > 0  # some services were read before the last page


@pytest.mark.parametrize("stream", ["backend", "meta"])
def test_a_key_of_a_service_already_read_has_it_read_again(stream: str) -> None:
    """Keys out of order (never from etcd): a key of service ``b`` comes after ``b`` was
    read; ``b`` is read again with all its keys, nothing lost."""
    backend, meta, holders = registry()
    whole = read_catalog(SCHEME, backend, meta, 7, holders)
    keys = backend if stream == "backend" else meta
    head = f"{SCHEME.prefix if stream == 'backend' else SCHEME.meta_prefix}/b/".encode()
    late = next(kv for kv in keys if kv[0].startswith(head) and kv[0].endswith(b"h1-b"))
    assembler = CatalogAssembler(SCHEME, holders)
    if stream == "backend":
        assembler.add_meta(meta, None)
        assembler.add_backend([kv for kv in backend if kv != late], None)
        assert "b" in assembler._read
        assembler.add_backend([late], None)
    else:
        assembler.add_backend(backend, None)
        assembler.add_meta([kv for kv in meta if kv != late], None)
        assert "b" in assembler._read
        assembler.add_meta([late], None)
    assert assembler.catalog(7) == whole
