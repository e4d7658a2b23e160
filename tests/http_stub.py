"""Parts of the loopback HTTP receivers that tests script: listening on 127.0.0.1, reading a request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["listen", "read_request"]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def listen(handler: Handler, port: int) -> tuple[asyncio.Server, int]:
    """Serve `handler` on 127.0.0.1:`port` (0: any); the server and its port.

    reuse_address lets a receiver that was stopped listen on the same port again.
    """
    server = await asyncio.start_server(handler, "127.0.0.1", port, reuse_address=True)
    return server, int(server.sockets[0].getsockname()[1])


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """One request: its head as sent (request line to blank line), headers by lower-case name, body."""
    head = [await reader.readline()]
    headers: dict[str, str] = {}
    for _ in range(100):
        line = await reader.readline()
        head.append(line)
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return b"".join(head), headers, body
