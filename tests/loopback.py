"""Plain loopback socket helpers: a port nobody listens on, the first line an SMTP server says."""

from __future__ import annotations

import contextlib
import socket

__all__ = ["free_port", "read_banner"]


def free_port() -> int:
    """A loopback port where nothing listens (bound, then closed, so the kernel just handed it out)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_banner(host: str, port: int, timeout: float) -> str | None:
    """The first reply line of an SMTP server, or None if nothing usable answered."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            data = b""
            while b"\n" not in data and len(data) < 1024:
                chunk = conn.recv(1024)
                if not chunk:
                    break
                data += chunk
            with contextlib.suppress(OSError):
                conn.sendall(b"QUIT\r\n")
    except OSError:
        return None
    line = data.split(b"\n", 1)[0].decode("ascii", "replace").strip()
    return line or None
