"""Helpers for turning client-library exceptions into one line for the operator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it: causes, contexts, exceptions passed as arguments,
    and urllib3's ``MaxRetryError.reason``; each once, outermost first. Client libraries
    (requests, urllib3, docker, etcd3gw) wrap the real cause several layers deep."""
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
