"""etcd set-ups the shared ``etcd`` fixture does not cover: a three-member cluster (failover)
and a member serving clients over TLS with client certificates.

(The launcher of tests/conftest.py runs one plain-http member; a cluster needs
``--initial-cluster`` naming every member, and TLS needs certificate flags.)
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.conftest import service_unavailable
from tests.support.services import (
    ServiceUnavailable,
    free_port,
    require_binary,
    wait_for,
)


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

    def healthy(self) -> bool:
        session = requests.Session()
        session.trust_env = False
        if self.tls is not None:
            session.verify = str(self.tls.ca)
            session.cert = (str(self.tls.client_cert), str(self.tls.client_key))
        try:
            answer = session.get(self.url + "/health", timeout=1.0).json()
            return isinstance(answer, dict) and answer.get("health") == "true"
        except (requests.RequestException, ValueError):
            return False
        finally:
            session.close()


class EtcdCluster:
    """etcd members of one cluster; ``kill(i)`` one of them, ``stop()`` them all."""

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

    def start(self, timeout: float = 30) -> None:
        etcd = require_binary("etcd")
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}
        for member in self.members:
            member.data_dir.parent.mkdir(parents=True, exist_ok=True)
            with member.log_path.open("ab") as log:
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
        try:
            wait_for(
                lambda: all(m.healthy() for m in self.members), timeout, what="etcd cluster health"
            )
        except TimeoutError as exc:
            self.stop()
            raise ServiceUnavailable(f"etcd cluster did not come up: {exc}") from exc

    def kill(self, index: int) -> None:
        process = self.members[index].process
        if process is not None:
            process.kill()
            process.wait()
            self.members[index].process = None

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


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh three-member cluster for one test (members may be killed)."""
    try:
        require_binary("etcd")
        cluster = EtcdCluster(tmp_path / "cluster")
        cluster.start()
    except ServiceUnavailable as exc:
        service_unavailable(str(exc))  # a skip, or a failure when services are required
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd_tls(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One etcd member serving clients over https, requiring a client certificate."""
    try:
        require_binary("etcd")
        tls = make_tls_files(tmp_path / "tls")
        cluster = EtcdCluster(tmp_path / "etcd-tls", size=1, tls=tls)
        cluster.start()
    except ServiceUnavailable as exc:
        service_unavailable(str(exc))
    yield cluster
    cluster.stop()
