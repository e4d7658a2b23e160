"""One SMTP connection: commands sent one by one or pipelined, replies taken in order; STARTTLS, DATA.

Over our own framing (framing.py; not aiosmtplib's `SMTPProtocol`, which keeps one reply per
wake-up and drops what arrives while no command waits, so it cannot pipeline). The commands,
their order and what a reply means are relayaudit's (session.py). Because a Wire can sit on
any asyncio transport, tests replay recorded server bytes through the real framing with no
socket at all (tests/replay.py).
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import ssl
from collections.abc import Callable
from typing import Protocol

from aiosmtplib.errors import (
    SMTPDataError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.esmtp import parse_esmtp_extensions
from aiosmtplib.response import SMTPResponse

from relayaudit.framing import Framing

__all__ = [
    "Connection",
    "Ehlo",
    "PipelineConfused",
    "SocketConnection",
    "Wire",
    "client_tls_context",
    "parse_ehlo",
]

_CLOSING = 421  # "service not available, closing transmission channel"
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # never in a command line we send
_PERIOD = re.compile(rb"(?m)^\.")  # dot-stuffing (RFC 5321, section 4.5.2)
_LINE_ENDS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")


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


@functools.lru_cache(maxsize=256)  # at most 256 x MAX_REPLY bytes held
def parse_ehlo(text: str) -> Ehlo:
    """The EHLO reply's keywords; one object per text (a host answers each of its sessions'
    EHLO alike): read-only, shared."""
    return Ehlo(text)


class PipelineConfused(SMTPServerDisconnected):
    """A pipelined group went out of step (a reply before the group was sent, one too many):
    the connection is closed, and the battery goes on in lock-step (RFC 2920's client rule)."""


def _line(args: tuple[bytes, ...]) -> bytes:
    for arg in args:
        if _CONTROL.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"


class Wire:
    """One SMTP connection: send a command (or a pipelined group), read the replies; a 421 or
    a hang-up closes it."""

    __slots__ = ("answered", "framing")

    def __init__(self, framing: Framing) -> None:
        self.framing = framing
        # the replies the last command or group got, complete or not: a group cut short by a
        # hang-up or a timeout still leaves the answers that came before it
        self.answered: list[SMTPResponse] = []

    @classmethod
    def over(cls, transport: asyncio.BaseTransport) -> Wire:
        """A Wire on an existing transport (the replay tests' recorded server)."""
        framing = Framing(asyncio.get_running_loop())
        framing.connection_made(transport)
        transport.set_protocol(framing)
        return cls(framing)

    @classmethod
    async def open(
        cls, sock: socket.socket, *, tls: bool, server_hostname: str, timeout: float
    ) -> Wire:
        """Take over a connected socket; `tls`: handshake first (implicit TLS, port 465)."""
        loop = asyncio.get_running_loop()
        framing = Framing(loop)
        await loop.create_connection(
            lambda: framing,
            sock=sock,
            ssl=client_tls_context() if tls else None,
            server_hostname=server_hostname if tls else None,
            ssl_handshake_timeout=timeout if tls else None,
        )
        return cls(framing)

    @property
    def connected(self) -> bool:
        transport = self.framing.transport
        return transport is not None and not transport.is_closing()

    @property
    def unsolicited(self) -> int:
        """Bytes and replies the server sent that no command asked for, so far."""
        return self.framing.unsolicited

    async def greeting(self) -> SMTPResponse:
        return await self.framing.reply()

    @property
    def silent(self) -> bool:
        """Nothing received yet, not even part of a line (asked once the greeting wait ended)."""
        return not self.framing.buffer and not self.framing.replies

    async def quit_after_silence(self, *, limit: int, timeout: float) -> tuple[bytes, bool]:
        """After a greeting wait that received nothing: send QUIT and read at most `limit`
        bytes of whatever comes back, raw, for at most `timeout` seconds. Returns the bytes and
        whether the server closed. Reading stops early at the end of a line or of a TLS record:
        enough to tell what the server speaks. The connection is not used again."""
        framing = self.framing
        raw = framing.keep_raw()
        transport = framing.transport
        if transport is None or transport.is_closing():
            return bytes(raw), True
        transport.write(b"QUIT\r\n")
        try:
            async with asyncio.timeout(timeout):
                while len(raw) < limit and framing.failure is None and not _told(raw):
                    await framing.more()
        except TimeoutError:
            pass
        finally:
            self.abort()
        return bytes(raw[:limit]), framing.failure is not None

    async def command(self, *args: bytes) -> SMTPResponse:
        """Send one command and read its reply; the caller's watchdog bounds the wait."""
        (response,) = await self._send([_line(args)])
        return response

    async def pipeline(
        self, lines: list[bytes], *, on_reply: Callable[[], None] | None = None
    ) -> list[SMTPResponse]:
        """Send command lines (each ending in CRLF) in one write and read one reply each, in
        order (RFC 2920). The server said something out of turn since the last group (a reply
        too many, or one before its command): PipelineConfused, and the connection is closed."""
        self._in_step()
        replies = await self._send(lines, on_reply)
        # a reply too many in the group took a later command's place: the extra one arrives
        # with the last (a server answers a group at once), and no reply of it can be trusted
        self._in_step()
        return replies

    def _in_step(self) -> None:
        if self.framing.unsolicited:
            self.answered = []
            self.close()
            raise PipelineConfused(
                f"the server sent {self.framing.unsolicited} unrequested byte(s) or repl(ies)"
            )

    async def _send(
        self, lines: list[bytes], on_reply: Callable[[], None] | None = None
    ) -> list[SMTPResponse]:
        framing = self.framing
        replies: list[SMTPResponse] = []
        self.answered = replies
        try:
            framing.write(b"".join(lines), len(lines))
            for _ in lines:
                response = await framing.reply()
                replies.append(response)
                if on_reply is not None:
                    on_reply()  # each reply restarts the wait for the next (a per-reply timeout)
                if response.code == _CLOSING:
                    self.close()
                    break
        except BaseException:
            # a reply given up on (or a hang-up) leaves the framing out of step: never reuse
            self.close()
            raise
        return replies

    async def starttls(self, *, timeout: float) -> SMTPResponse:
        """STARTTLS and the handshake; the plaintext read after the 220 is discarded (a
        man-in-the-middle's injected commands must not be read as the TLS session's)."""
        framing = self.framing
        try:
            response = await self.command(b"STARTTLS")
            if response.code != 220:
                raise SMTPResponseException(response.code, response.message)
            transport = framing.transport
            if transport is None or transport.is_closing():
                raise SMTPServerDisconnected("Connection lost")
            del framing.buffer[:]
            framing.replies.clear()
            framing.expected = 0
            try:
                tls = await framing.loop.start_tls(
                    transport,
                    framing,
                    client_tls_context(),
                    server_side=False,
                    server_hostname=None,
                    ssl_handshake_timeout=timeout,
                )
            except (TimeoutError, ConnectionAbortedError) as exc:
                raise SMTPTimeoutError("Timed out while upgrading transport") from exc
            if tls is None:
                raise SMTPServerDisconnected("Connection lost")
            framing.transport = tls
            return response
        except BaseException:
            self.close()
            raise

    async def data(self, message: bytes, *, timeout: float) -> SMTPResponse:
        """DATA, the message (dot-stuffed here), and the final reply; a refusal raises
        SMTPDataError (the reply is the evidence)."""
        async with asyncio.timeout(timeout):
            start = await self.command(b"DATA")
        if start.code != 354:
            raise SMTPDataError(start.code, start.message)
        body = _PERIOD.sub(b"..", _LINE_ENDS.sub(b"\r\n", message))
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        async with asyncio.timeout(timeout):
            (final,) = await self._send([body + b".\r\n"])
        if final.code != 250:
            raise SMTPDataError(final.code, final.message)
        return final

    def tls_object(self) -> ssl.SSLObject | ssl.SSLSocket | None:
        transport = self.framing.transport
        obj = transport.get_extra_info("ssl_object") if transport is not None else None
        return obj if isinstance(obj, ssl.SSLObject | ssl.SSLSocket) else None

    def local_address(self) -> str | None:
        transport = self.framing.transport
        name = transport.get_extra_info("sockname") if transport is not None else None
        return str(name[0]) if name else None

    def abort(self) -> None:
        """Drop the connection now: no TLS close_notify exchange a stalled server never answers."""
        transport = self.framing.transport
        if transport is not None:
            transport.abort()  # asyncio's and uvloop's alike

    def close(self) -> None:
        transport = self.framing.transport
        if transport is not None and not transport.is_closing():
            transport.close()


def _told(raw: bytearray) -> bool:
    """Enough of an answer to tell what it is: a whole line, or a whole TLS record."""
    if b"\n" in raw:
        return True
    return len(raw) >= 5 and raw[0] in (0x15, 0x16) and len(raw) >= 5 + int.from_bytes(raw[3:5])


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
