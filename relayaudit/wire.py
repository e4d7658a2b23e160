"""SMTP framing over one connection: aiosmtplib's SMTPProtocol, used through this one wrapper.

The framing (buffering, reply parsing, the 32 KiB reply bound) is aiosmtplib's public
`SMTPProtocol`; the commands, their order and what a reply means are relayaudit's (session.py).
Because a Wire can sit on any asyncio transport, tests replay recorded server bytes through the
real framing with no socket at all (tests/replay.py).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from typing import Protocol, cast

from aiosmtplib.esmtp import parse_esmtp_extensions
from aiosmtplib.protocol import SMTPProtocol
from aiosmtplib.response import SMTPResponse

__all__ = ["Connection", "Ehlo", "SocketConnection", "Wire", "client_tls_context", "parse_ehlo"]

_CLOSING = 421  # "service not available, closing transmission channel"


@functools.cache
def client_tls_context() -> ssl.SSLContext:
    """One context for every TLS session: a scanner records certificates, it does not trust them."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Ehlo:
    """The EHLO reply: its text, keywords (lower case, with parameters) and AUTH mechanisms."""

    __slots__ = ("auth", "extensions", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.extensions, self.auth = parse_esmtp_extensions(text)


def parse_ehlo(text: str) -> Ehlo:
    return Ehlo(text)


class Wire:
    """One SMTP connection: send a command, read its reply; a 421 or a hang-up closes it."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: SMTPProtocol) -> None:
        self.protocol = protocol

    @classmethod
    def over(cls, transport: asyncio.BaseTransport) -> Wire:
        """A Wire on an existing transport (the replay tests' recorded server)."""
        protocol = SMTPProtocol(loop=asyncio.get_running_loop())
        protocol.connection_made(transport)
        transport.set_protocol(protocol)
        return cls(protocol)

    @classmethod
    async def open(
        cls, sock: socket.socket, *, tls: bool, server_hostname: str, timeout: float
    ) -> Wire:
        """Take over a connected socket; `tls`: handshake first (implicit TLS, port 465)."""
        loop = asyncio.get_running_loop()
        protocol = SMTPProtocol(loop=loop)
        await loop.create_connection(
            lambda: protocol,
            sock=sock,
            ssl=client_tls_context() if tls else None,
            server_hostname=server_hostname if tls else None,
            ssl_handshake_timeout=timeout if tls else None,
        )
        return cls(protocol)

    @property
    def connected(self) -> bool:
        return self.protocol.is_connected

    async def greeting(self) -> SMTPResponse:
        return await self.protocol.read_response(timeout=None)

    async def command(self, *args: bytes) -> SMTPResponse:
        """Send one command and read its reply; the caller's watchdog bounds the wait."""
        try:
            response = await self.protocol.execute_command(*args, timeout=None)
        except BaseException:
            # a reply given up on (or a hang-up) leaves the framing out of step: never reuse
            self.close()
            raise
        if response.code == _CLOSING:
            self.close()
        return response

    async def starttls(self, *, timeout: float) -> SMTPResponse:
        try:
            return await self.protocol.start_tls(client_tls_context(), timeout=timeout)
        except BaseException:
            self.close()
            raise

    async def data(self, message: bytes, *, timeout: float) -> SMTPResponse:
        """DATA, the message (dot-stuffed by the framing), and the final reply."""
        return await self.protocol.execute_data_command(message, timeout=timeout)

    def tls_object(self) -> ssl.SSLObject | ssl.SSLSocket | None:
        transport = self.protocol.transport
        obj = transport.get_extra_info("ssl_object") if transport is not None else None
        return obj if isinstance(obj, ssl.SSLObject | ssl.SSLSocket) else None

    def local_address(self) -> str | None:
        transport = self.protocol.transport
        name = transport.get_extra_info("sockname") if transport is not None else None
        return str(name[0]) if name else None

    def abort(self) -> None:
        """Drop the connection now: no TLS close_notify exchange a stalled server never answers."""
        transport = self.protocol.transport
        if transport is not None:
            cast(asyncio.Transport, transport).abort()  # asyncio's and uvloop's alike

    def close(self) -> None:
        transport = self.protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()


class Connection(Protocol):
    """A connection not yet speaking SMTP: a TCP socket, or a recorded server in the tests."""

    def local_address(self) -> str | None: ...

    async def wire(self, *, tls: bool, server_hostname: str, timeout: float) -> Wire:
        """Start the framing on it; `tls`: handshake first (implicit TLS)."""
        ...

    def close(self) -> None:
        """Give it up before a Wire took it over."""
        ...


class SocketConnection:
    """A connected, non-blocking TCP socket."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def local_address(self) -> str | None:
        try:
            return str(self.sock.getsockname()[0])
        except OSError:
            return None

    async def wire(self, *, tls: bool, server_hostname: str, timeout: float) -> Wire:
        return await Wire.open(self.sock, tls=tls, server_hostname=server_hostname, timeout=timeout)

    def close(self) -> None:
        self.sock.close()
