"""Reading a running HAProxy from the outside, through the sockets discoverd gives it.

discoverd keeps HAProxy's files in ``<state_dir>/haproxy``: ``admin.sock`` (the runtime API,
level admin) and ``master.sock`` (the master CLI). Used by the benchmarks and the fault suite.
"""

from __future__ import annotations

import socket
from pathlib import Path

__all__ = ["haproxy_cli", "serving_servers"]

# srv_admin_state bits of `show servers state` that take a server out of rotation: forced,
# inherited and resolver maintenance (0x01, 0x02, 0x04, 0x20), forced, inherited and
# health-check drain (0x08, 0x10, 0x40).
_OUT_OF_ROTATION = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20 | 0x40
# srv_op_state of a server its health checks marked down.
_STOPPED = 0


def haproxy_cli(state: Path, command: str, socket_name: str = "admin.sock") -> str:
    """One command on the HAProxy socket (``admin.sock`` or ``master.sock``) of ``state``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(state / "haproxy" / socket_name))
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def serving_servers(state: Path, *, healthy_only: bool = False) -> dict[str, set[str]]:
    """What the running HAProxy of ``state`` routes to: ``backend -> {"ip:port", ...}``.

    From ``show servers state`` on the admin socket: every server not in maintenance or drain
    (a server discoverd removed is drained first, then deleted). Health counts only with
    ``healthy_only``: then a server its health checks marked down is left out too. A backend
    without servers is absent. Raises ``OSError`` when HAProxy does not answer.
    """
    text = haproxy_cli(state, "show servers state")
    served: dict[str, set[str]] = {}
    for line in text.splitlines():
        fields = line.split()
        # be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state ... srv_port
        if len(fields) < 19 or not fields[0].isdigit():
            continue
        try:
            op_state = int(fields[5])
            admin_state = int(fields[6])
            port = int(fields[18])
        except ValueError:
            continue
        if admin_state & _OUT_OF_ROTATION:
            continue
        if healthy_only and op_state == _STOPPED:
            continue
        served.setdefault(fields[1], set()).add(f"{fields[4]}:{port}")
    return served
