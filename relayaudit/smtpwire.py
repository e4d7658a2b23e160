"""SMTP client wire layer: bounded reply parsing, EHLO parsing, a lean connection that can pipeline.

The probe drives sessions through this instead of aiosmtplib because the relay battery pipelines
(RFC 2920) where the server advertises PIPELINING, and aiosmtplib's protocol drops every reply that
arrives before it is awaited. The parser is pure and bounded: a reply over MAX_REPLY bytes, or
more unread replies than a pipelined group can explain, ends the connection, so a hostile server
costs a fixed amount of memory.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from typing import NamedTuple

__all__ = [
    "MAX_REPLY",
    "BadReply",
    "Disconnected",
    "RawReply",
    "ReplyParser",
    "ReplyTimeout",
    "SmtpConnection",
    "WireError",
    "dot_stuffed",
    "insecure_tls_context",
    "open_connection",
    "parse_ehlo",
]

MAX_REPLY = 32 * 1024  # one reply, every line of it (aiosmtplib keeps the same bound)
MAX_QUEUED = 64  # replies read but not yet asked for; a pipelined group explains a handful


class RawReply(NamedTuple):
    code: int
    text: str  # the lines' texts joined by "\n", undecodable bytes kept as surrogate escapes


class WireError(Exception):
    """The connection cannot go on; `reason` says why in words fit for a transcript."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Disconnected(WireError):
    pass


class ReplyTimeout(WireError):
    pass


class BadReply(WireError):
    """The server sent something that is not an SMTP reply (or far too much of one)."""


class ReplyParser:
    """Bytes in, complete replies out (RFC 5321 4.2): `DDD-text` continues, `DDD text` ends."""

    __slots__ = ("_buf", "_lines", "_size")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._size = 0  # bytes of the reply in progress, complete lines included

    def feed(self, data: bytes) -> list[RawReply]:
        buf = self._buf
        buf += data
        replies: list[RawReply] = []
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            line = bytes(buf[start:end]).rstrip(b"\r")
            start = end + 1
            self._size += len(line) + 1
            if self._size > MAX_REPLY:
                raise BadReply(f"reply longer than {MAX_REPLY // 1024} KiB")
            code = line[:3]
            if len(code) < 3 or not code.isdigit():
                raise BadReply(f"not an SMTP reply: {_shown(line)}")
            self._lines.append(line[4:].strip(b" \t\r").decode("utf-8", "surrogateescape"))
            if line[3:4] != b"-":
                replies.append(RawReply(int(code), "\n".join(self._lines)))
                self._lines = []
                self._size = 0
        if start:
            del buf[:start]
        if buf:
            if self._size + len(buf) > MAX_REPLY:
                raise BadReply(f"reply longer than {MAX_REPLY // 1024} KiB")
            if not bytes(buf[:3]).isdigit():
                # no digits where a reply code belongs: say so now, not at the line's end
                raise BadReply(f"not an SMTP reply: {_shown(bytes(buf))}")
        return replies


def _shown(raw: bytes) -> str:
    return repr(raw[:80].decode("utf-8", "backslashreplace"))


def parse_ehlo(text: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """EHLO reply text -> ({keyword (lower case): parameters}, AUTH mechanisms (upper case)).

    The first line is the server's greeting, not an extension. `AUTH=LOGIN PLAIN`, the form old
    Microsoft servers advertise, counts as AUTH too.
    """
    extensions: dict[str, str] = {}
    mechanisms: list[str] = []
    for line in text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword.upper().startswith("AUTH="):
            params = f"{keyword[5:]} {params}"
            keyword = "auth"
        keyword = keyword.lower()
        if not keyword:
            continue
        extensions.setdefault(keyword, params.strip())
        if keyword == "auth":
            mechanisms += [m.upper() for m in params.split() if m.upper() not in mechanisms]
    return extensions, tuple(mechanisms)


def dot_stuffed(message: bytes) -> bytes:
    """A message as DATA sends it: CRLF line ends, leading dots doubled, the final `.` line."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    body = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    return body + b"\r\n.\r\n"


_TLS_CONTEXT: ssl.SSLContext | None = None


def insecure_tls_context() -> ssl.SSLContext:
    """The scanner's TLS: any certificate is accepted and recorded, never trusted or refused."""
    global _TLS_CONTEXT  # noqa: PLW0603 - built once: a context costs milliseconds
    if _TLS_CONTEXT is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _TLS_CONTEXT = ctx
    return _TLS_CONTEXT


class SmtpConnection(asyncio.Protocol):
    """One client connection: `send` command lines, then `reply` once per command, in order.

    Replies that arrive before they are asked for are kept (that is what pipelining needs), up to
    MAX_QUEUED; the first failure (hang-up, unparseable reply) is kept too and raised by every
    later `reply` once the queue is empty.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._parser = ReplyParser()
        self._replies: deque[RawReply] = deque()
        self._waiter: asyncio.Future[bool] | None = None
        self._failure: WireError | None = None
        self._transport: asyncio.Transport | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._failure is not None:
            return
        try:
            self._replies.extend(self._parser.feed(data))
            if len(self._replies) > MAX_QUEUED:
                raise BadReply(f"more than {MAX_QUEUED} replies nobody asked for")
        except BadReply as exc:
            self._fail(exc)
            self.close()
            return
        self._wake(True)

    def eof_received(self) -> bool:
        return False  # the server is done: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        reason = "server closed the connection"
        if exc is not None:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            reason = f"connection lost: {text or type(exc).__name__}"
        self._fail(Disconnected(reason))

    def _fail(self, exc: WireError) -> None:
        if self._failure is None:
            self._failure = exc
        self._wake(True)

    def _wake(self, value: bool) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    # -- the client's side -----------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, *lines: str) -> None:
        """Write command lines in one segment; a line holding CR or LF is refused (injection)."""
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError(f"command holds a line break: {line[:60]!r}")
        self.write("".join(f"{line}\r\n" for line in lines).encode("utf-8", "surrogateescape"))

    def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise (
                self._failure_now() if self._failure is not None else Disconnected("not connected")
            )
        transport.write(data)

    async def reply(self, timeout: float) -> RawReply:
        """The next reply in order; raises ReplyTimeout, Disconnected or BadReply."""
        while True:
            if self._replies:
                return self._replies.popleft()
            if self._failure is not None:
                raise self._failure_now()
            waiter: asyncio.Future[bool] = self._loop.create_future()
            self._waiter = waiter
            handle = self._loop.call_later(timeout, self._wake, False)
            try:
                woken = await waiter
            finally:
                handle.cancel()
                self._waiter = None
            if not woken and not self._replies:
                raise ReplyTimeout(f"no reply within {timeout:g}s")

    def _failure_now(self) -> WireError:
        failure = self._failure
        assert failure is not None
        return type(failure)(failure.reason)  # a fresh exception: no traceback chain grows

    async def start_tls(self, timeout: float) -> None:
        """Upgrade after a 220 to STARTTLS. Replies queued before it are dropped (RFC 3207 5)."""
        transport = self._transport
        if transport is None:
            raise Disconnected("connection lost before the TLS handshake")
        self._replies.clear()
        self._parser = ReplyParser()
        tls = await self._loop.start_tls(
            transport, self, insecure_tls_context(), ssl_handshake_timeout=timeout
        )
        if tls is None:
            raise Disconnected("connection lost during the TLS handshake")
        self._transport = tls

    def info(self, name: str) -> object:
        transport = self._transport
        return transport.get_extra_info(name) if transport is not None else None

    def close(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.close()


async def open_connection(
    sock: socket.socket, *, implicit_tls: bool, server_hostname: str | None, timeout: float
) -> SmtpConnection:
    """Wrap a connected socket (implicit TLS: after the handshake, bounded by `timeout`)."""
    loop = asyncio.get_running_loop()
    conn = SmtpConnection()
    if implicit_tls:
        await loop.create_connection(
            lambda: conn,
            sock=sock,
            ssl=insecure_tls_context(),
            server_hostname=server_hostname or "",
            ssl_handshake_timeout=timeout,
        )
    else:
        await loop.create_connection(lambda: conn, sock=sock)
    return conn
