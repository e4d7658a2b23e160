"""SMTP reply framing: an asyncio Protocol that turns received bytes into replies, in order.

Every complete reply in the bytes received is parsed at once and queued; a command (or a
pipelined group, RFC 2920) takes its replies from the queue in order (wire.py). Only as many
replies are kept as commands were sent (the greeting counts as one): what a server says out
of turn is dropped and counted. Failures are aiosmtplib's exception types, which the one
exception map (failures.py) reads, with its reply bounds: a line of at most 8 KiB, a reply of
at most 32 KiB.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

from aiosmtplib.errors import SMTPResponseException, SMTPServerDisconnected
from aiosmtplib.response import SMTPResponse

__all__ = ["MAX_LINE", "MAX_REPLY", "Framing"]

MAX_LINE = 8192  # bytes of one reply line (aiosmtplib's bound)
MAX_REPLY = 4 * MAX_LINE  # bytes of one reply, all its lines
_INVALID = -1  # the code of a reply that is no SMTP reply (aiosmtplib's SMTPStatus.invalid_response)


class Framing(asyncio.Protocol):
    """Bytes in, replies out: complete replies are queued the moment their last line arrives.

    Only as many replies as commands sent are kept (the greeting counts as one); what a server
    says out of turn is dropped, as aiosmtplib does, and counted in `unsolicited`, which a
    pipelined group reads as confusion.
    """

    __slots__ = (
        "buffer",
        "expected",
        "failure",
        "loop",
        "raw",
        "replies",
        "transport",
        "unsolicited",
        "waiter",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.replies: deque[SMTPResponse] = deque()
        self.expected = 1  # replies owed: the greeting, then one per command line sent
        self.unsolicited = 0  # bytes or replies received while none was owed
        self.waiter: asyncio.Future[None] | None = None
        self.failure: BaseException | None = None  # set: no reply will come any more
        self.raw: bytearray | None = None  # set by keep_raw(): bytes kept as received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.raw is not None:
            self.raw += data
            self._wake()
            return
        if self.failure is not None:
            return
        if self.expected == 0 and not self.buffer:
            self.unsolicited += len(data)  # nothing was asked: not a reply to anything
            return
        self.buffer += data
        try:
            self._parse()
        except SMTPResponseException as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()  # the framing is out of step for good
            return
        if self.replies and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _parse(self) -> None:
        """Queue every complete reply in the buffer; bounds and malformed lines raise."""
        buffer = self.buffer
        if buffer[-1:] == b"\n" and len(buffer) <= MAX_REPLY and self._single_lines(buffer):
            return
        start = 0
        while True:
            lines: list[bytes] = []
            offset = start
            code = _INVALID
            while True:
                end = buffer.find(b"\n", offset)
                if end == -1:
                    if len(buffer) - start > MAX_REPLY:
                        raise SMTPResponseException(_INVALID, "Response too long")
                    del buffer[:start]
                    return
                line = bytes(buffer[offset : end + 1])
                if len(line) > MAX_LINE:
                    raise SMTPResponseException(_INVALID, "Response too long")
                try:
                    code = int(line[:3])
                except ValueError:
                    text = line.decode("utf-8", errors="ignore")
                    raise SMTPResponseException(
                        _INVALID, f"Malformed SMTP response line: {text}"
                    ) from None
                lines.append(line[4:].strip(b" \t\r\n"))
                offset = end + 1
                if offset - start > MAX_REPLY:
                    raise SMTPResponseException(_INVALID, "Response too long")
                if line[3:4] != b"-":
                    break
            start = offset
            if self.expected == 0:
                self.unsolicited += 1  # one reply too many
                continue
            self.expected -= 1
            text = b"\n".join(lines).decode("utf-8", "surrogateescape")
            self.replies.append(SMTPResponse(code, text))

    def _single_lines(self, buffer: bytearray) -> bool:
        """The usual case in one pass: the buffer holds whole one-line replies only (a reply,
        or a pipelined group's); queue them and empty it. False, touching nothing, for
        anything else (a continuation line, a malformed or too long line): _parse reads it."""
        lines = bytes(buffer).split(b"\n")
        lines.pop()  # after the last newline: empty
        codes = []
        for line in lines:
            if line[3:4] == b"-" or len(line) >= MAX_LINE:
                return False
            try:
                codes.append(int(line[:3]))
            except ValueError:
                return False
        del buffer[:]
        for code, line in zip(codes, lines, strict=True):
            if self.expected == 0:
                self.unsolicited += 1  # one reply too many
                continue
            self.expected -= 1
            text = line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape")
            self.replies.append(SMTPResponse(code, text))
        return True

    def keep_raw(self) -> bytearray:
        """From now on keep what arrives as bytes, unparsed (the answer to the QUIT sent after
        a silent greeting wait may be anything: HTTP, a TLS record); what the buffer already
        holds comes first."""
        self.raw = bytearray(self.buffer)
        del self.buffer[:]
        return self.raw

    async def more(self) -> None:
        """Until more bytes arrive (keep_raw) or the connection ends."""
        if self.failure is None:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        lost = SMTPServerDisconnected("Connection lost")
        if exc is not None:
            lost.__cause__ = exc
        self._fail(lost)
        self.transport = None

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self._wake()

    async def reply(self) -> SMTPResponse:
        """The next reply, in order; raises when the connection ended before it came."""
        while not self.replies:
            if self.failure is not None:
                raise self.failure
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.replies.popleft()

    def write(self, data: bytes, replies: int) -> None:
        """Send `data`, owed `replies` replies for it."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        self.expected += replies
        transport.write(data)
