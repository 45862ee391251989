"""systemd's notify protocol (sd_notify): READY=1, WATCHDOG=1, STOPPING=1.

A few lines over a datagram socket, written here rather than pulled in as a dependency:
the protocol is one sendto() of a text message to $NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import socket
import time


def notify(message: str) -> bool:
    """Send `message` to the service manager; False when not run under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


class Watchdog:
    """Sends WATCHDOG=1 at half the interval systemd asked for (WatchdogSec)."""

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        mine = pid is None or pid == str(os.getpid())
        self.interval = int(usec) / 2_000_000 if usec and mine else None
        self.last_ping = 0.0

    def ping(self) -> None:
        """Call from the worker loop: a stalled loop stops the pings and systemd restarts us."""
        now = time.monotonic()
        if self.interval is not None and now - self.last_ping >= self.interval:
            notify("WATCHDOG=1")
            self.last_ping = now
