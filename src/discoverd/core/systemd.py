"""Telling systemd how the agent is doing (``Type=notify``), without libsystemd.

systemd passes ``NOTIFY_SOCKET`` (a datagram socket, ``@`` for the abstract namespace) to a
``Type=notify`` service, and ``WATCHDOG_USEC`` (with ``WATCHDOG_PID``) when ``WatchdogSec=`` is
set. The agent sends ``READY=1`` once its roles have made their first passes, ``RELOADING=1``
and ``READY=1`` around a reload (SIGHUP), ``STOPPING=1`` when it shuts down, ``STATUS=`` lines
for ``systemctl status``, and ``WATCHDOG=1`` every half watchdog period while its loops run.
Everything is a no-op outside systemd.
"""

from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send ``states`` (``"READY=1"``, ``"STATUS=..."``) to systemd; False outside it."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or not states:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(states).encode(), target)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between two ``WATCHDOG=1`` (half the period systemd asked for), or ``None``
    when there is no watchdog for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000
