"""etcd set-ups beyond the single member of :class:`tests.support.services.Etcd`: a cluster of
several members on loopback ports (failover: kill the leader), and members serving clients over
TLS with client certificates.

Used by the etcd registry's tests (``tests/plugins/etcd/conftest.py``) and the fault suite.
"""

from __future__ import annotations

import base64
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.support.services import (
    ServiceUnavailable,
    free_port,
    require_binary,
    wait_for,
)

__all__ = [
    "EtcdCluster",
    "Member",
    "TlsFiles",
    "etcd_endpoints",
    "etcd_revision",
    "make_tls_files",
]


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(root: Path) -> TlsFiles:
    openssl = require_binary("openssl")
    root.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        result = subprocess.run(
            [openssl, *args], cwd=root, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ServiceUnavailable(f"openssl {args[0]} failed: {result.stderr.strip()}")

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=t")
    # etcd's own gateway dials etcd with the server certificate: it needs clientAuth as well.
    usages = {"server": "serverAuth,clientAuth", "client": "clientAuth"}
    for name, usage in usages.items():
        (root / f"{name}.ext").write_text(
            f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"
        )
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        )  # fmt: skip
    return TlsFiles(
        root / "ca.crt", root / "server.crt", root / "server.key", root / "client.crt",
        root / "client.key",
    )  # fmt: skip


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    tls: TlsFiles | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def pid(self) -> int | None:
        """The process id while the member runs, else None."""
        if self.process is not None and self.process.poll() is None:
            return self.process.pid
        return None

    def flags(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            f"--cert-file={self.tls.server_cert}",
            f"--key-file={self.tls.server_key}",
            f"--trusted-ca-file={self.tls.ca}",
            "--client-cert-auth",
        ]

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        if self.tls is not None:
            session.verify = str(self.tls.ca)
            session.cert = (str(self.tls.client_cert), str(self.tls.client_key))
        return session

    def healthy(self) -> bool:
        session = self.session()
        try:
            answer = session.get(self.url + "/health", timeout=1.0).json()
            return isinstance(answer, dict) and answer.get("health") == "true"
        except (requests.RequestException, ValueError):
            return False
        finally:
            session.close()

    def post(self, path: str, body: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        """POST to this member's JSON gateway (``/v3/...``); raises ``requests`` errors."""
        session = self.session()
        try:
            response = session.post(self.url + path, json=body, timeout=timeout)
            response.raise_for_status()
            answer: dict[str, Any] = response.json()
            return answer
        finally:
            session.close()

    def status(self, timeout: float = 1.0) -> tuple[str, str] | None:
        """``(member id, leader id)`` as this member sees them, or None when it does not
        answer (ids as etcd's gateway prints them, decimal strings)."""
        try:
            answer = self.post("/v3/maintenance/status", {}, timeout)
        except (requests.RequestException, ValueError):
            return None
        member = str((answer.get("header") or {}).get("member_id", ""))
        leader = str(answer.get("leader", ""))
        return (member, leader) if member and leader else None


class EtcdCluster:
    """etcd members of one cluster; ``kill(i)`` one of them, ``restart(i)`` it with its data,
    ``stop()`` them all; ``leader()`` says which one leads."""

    def __init__(self, root: Path, size: int = 3, tls: TlsFiles | None = None) -> None:
        ports: set[int] = set()

        def port() -> int:
            while (candidate := free_port()) in ports:
                pass
            ports.add(candidate)
            return candidate

        self.members = [
            Member(f"m{i}", port(), port(), root / f"m{i}", root / f"m{i}.log", tls)
            for i in range(size)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def _launch(self, member: Member) -> None:
        etcd = require_binary("etcd")
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}
        member.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with member.log_path.open("ab") as log:
            # A member restarted with its data directory ignores the --initial-* flags.
            member.process = subprocess.Popen(
                [
                    etcd,
                    f"--name={member.name}",
                    f"--data-dir={member.data_dir}",
                    f"--listen-client-urls={member.url}",
                    f"--advertise-client-urls={member.url}",
                    f"--listen-peer-urls={member.peer_url}",
                    f"--initial-advertise-peer-urls={member.peer_url}",
                    f"--initial-cluster={initial}",
                    "--initial-cluster-state=new",
                    "--heartbeat-interval=50",
                    "--election-timeout=500",
                    *member.flags(),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def start(self, timeout: float = 30) -> None:
        for member in self.members:
            self._launch(member)
        try:
            wait_for(
                lambda: all(m.healthy() for m in self.members), timeout, what="etcd cluster health"
            )
        except TimeoutError as exc:
            self.stop()
            raise ServiceUnavailable(f"etcd cluster did not come up: {exc}") from exc

    def leader(self) -> int | None:
        """The index of the member that leads, as a running member reports it; None while
        no running member knows a leader."""
        ids: dict[str, int] = {}
        leaders: set[str] = set()
        for index, member in enumerate(self.members):
            if member.pid is None:
                continue
            status = member.status()
            if status is not None:
                ids[status[0]] = index
                leaders.add(status[1])
        found = [ids[leader] for leader in leaders if leader in ids]
        return found[0] if len(found) == 1 else None

    def kill(self, index: int) -> None:
        process = self.members[index].process
        if process is not None:
            process.kill()
            process.wait()
            self.members[index].process = None

    def restart(self, index: int, timeout: float = 30) -> None:
        """Start a killed member again with its data; wait until it reports healthy."""
        member = self.members[index]
        if member.pid is None:
            self._launch(member)
        wait_for(member.healthy, timeout, what=f"etcd member {member.name} healthy again")

    def stop(self) -> None:
        for member in self.members:
            process, member.process = member.process, None
            if process is None:
                continue
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def etcd_revision(url: str) -> int:
    """The store's current revision (it goes up by one per write transaction)."""
    session = requests.Session()
    session.trust_env = False
    try:
        body = {"key": base64.b64encode(b"\0").decode(), "count_only": True}
        response = session.post(url + "/v3/kv/range", json=body, timeout=2.0)
        response.raise_for_status()
        return int(response.json()["header"]["revision"])
    finally:
        session.close()


def etcd_endpoints(urls: list[str], prefix: str = "/backends") -> dict[str, set[str]]:
    """What the seed's key layout below ``prefix`` holds: ``service -> {"ip:port", ...}``.

    A linearizable range read on the first of ``urls`` (``http://host:port``) that answers;
    the ``port`` keys are left out. Raises ``requests.RequestException`` (or ``ValueError``)
    when none answers."""
    start = (prefix + "/").encode()
    end = prefix.encode() + b"0"
    body = {"key": base64.b64encode(start).decode(), "range_end": base64.b64encode(end).decode()}
    error: Exception | None = None
    for url in urls:
        session = requests.Session()
        session.trust_env = False
        try:
            response = session.post(url + "/v3/kv/range", json=body, timeout=1.0)
            response.raise_for_status()
            answer = response.json()
        except (requests.RequestException, ValueError) as exc:
            error = exc
            continue
        finally:
            session.close()
        found: dict[str, set[str]] = {}
        for kv in answer.get("kvs") or []:
            key = base64.b64decode(kv["key"]).decode(errors="replace")
            service, _, name = key[len(prefix) + 1 :].partition("/")
            if not name or name == "port":
                continue
            value = base64.b64decode(kv.get("value", "")).decode(errors="replace")
            found.setdefault(service, set()).add(value)
        return found
    assert error is not None, "no etcd URL given"
    raise error
