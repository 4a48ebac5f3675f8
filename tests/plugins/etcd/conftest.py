"""An etcd set-up the shared fixtures do not cover: a member serving clients over TLS with
client certificates (the launcher is in :mod:`tests.support.etcd`; the three-member cluster,
``etcd_cluster``, is a shared fixture of tests/conftest.py, used by the fault suite too).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import service_unavailable
from tests.support.etcd import EtcdCluster, make_tls_files
from tests.support.services import ServiceUnavailable, require_binary


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
