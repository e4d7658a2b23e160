"""systemd's notify protocol, written by the daemon itself: READY, STATUS, WATCHDOG and STOPPING datagrams.

sd_notify(3): a service of `Type=notify` sends `KEY=value` lines as one datagram to the AF_UNIX
socket named by $NOTIFY_SOCKET (a path, or an abstract name written with a leading "@"). With
`WatchdogSec=`, systemd sets $WATCHDOG_USEC (and $WATCHDOG_PID) and kills the service when no
`WATCHDOG=1` arrives within that time. Outside systemd (no $NOTIFY_SOCKET) every call does
nothing. A few lines instead of a dependency: the protocol is one sendto().
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]


class Notifier:
    """Sends notify datagrams to systemd, if the environment names a socket; never raises."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # an abstract socket (Linux)
        self.address = address or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        # the interval systemd expects pings in, if the watchdog is on for this process
        self.watchdog: float | None = int(usec) / 1e6 if usec.isdigit() and ours else None
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send `KEY=value` lines (`notify(READY=1, STATUS="...")`); whether it was sent."""
        if self.address is None:
            return False
        text = "".join(
            f"{key}={str(value).replace(chr(10), ' ')}\n" for key, value in fields.items()
        )
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(text.encode("utf-8", "replace"), self.address)
        except OSError:
            self.failed += 1  # systemd went away or the socket is wrong: the daemon runs on
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def ping(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str) -> bool:
        return self.notify(STOPPING=1, STATUS=status)
