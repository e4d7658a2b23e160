"""Plain loopback helpers: a free port, an SMTP banner, a lab in a thread, a test server process stopped."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
from collections.abc import Iterator

from relayaudit.lab import Lab, ServerSpec

__all__ = ["free_port", "lab_thread", "read_banner", "stop_process"]


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


@contextlib.contextmanager
def lab_thread(*specs: ServerSpec) -> Iterator[None]:
    """A Lab served by its own event loop in a thread, so main() can run its loop here."""
    ready, stop = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        async with Lab(list(specs)):
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10), "the lab did not start"
    if failure:
        raise failure[0]
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """Stop a server a test started (NSD, postgrey): SIGTERM, then SIGKILL after 5 s."""
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
