"""A plain etcd client for the tests, on etcd's JSON gateway: what another tool (or the seed's
docker-register) writes and reads, without the plugin under test."""

from __future__ import annotations

import base64
from typing import Any

import requests


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _prefix_end(prefix: str) -> str:
    raw = prefix.encode()
    return _b64(raw[:-1] + bytes([raw[-1] + 1]))


class RawEtcd:
    """``put``, ``delete``, ``get``, ``get_prefix`` and ``transaction`` on ``url``
    (``http://host:port``). Reads return ``(value, kv)`` pairs: the value as bytes and etcd's
    key-value record (``key`` decoded to bytes; ``lease``, ``mod_revision``... as etcd sent
    them)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.trust_env = False

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.session.post(f"{self.url}/v3{path}", json=body, timeout=10)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    def put(self, key: str, value: str, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        self.post("/kv/put", body)

    def delete(self, key: str) -> None:
        self.post("/kv/deleterange", {"key": _b64(key)})

    def get(self, key: str) -> list[tuple[bytes, dict[str, Any]]]:
        return self._range({"key": _b64(key)})

    def get_prefix(self, prefix: str) -> list[tuple[bytes, dict[str, Any]]]:
        return self._range({"key": _b64(prefix), "range_end": _prefix_end(prefix)})

    def transaction(self, txn: dict[str, Any]) -> dict[str, Any]:
        return self.post("/kv/txn", txn)

    def _range(self, body: dict[str, Any]) -> list[tuple[bytes, dict[str, Any]]]:
        found = []
        for kv in self.post("/kv/range", body).get("kvs") or []:
            record = dict(kv)
            record["key"] = base64.b64decode(kv["key"])
            found.append((base64.b64decode(kv.get("value", "")), record))
        return found

    def close(self) -> None:
        self.session.close()
