"""Bytes on a lab connection: command lines, DATA bodies, and replies paced, batched and ordered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from relayaudit.lab.spec import MAX_LINE, MAX_MESSAGE, SOFT_ERROR_LIMIT

if TYPE_CHECKING:
    from relayaudit.lab.listener import Listener

__all__ = ["LineProtocol", "encode"]


def encode(text: str) -> bytes:
    """One reply or header line with its CRLF."""
    # surrogateescape round-trips any bytes a client sent, so echoed paths never raise.
    return (text + "\r\n").encode("utf-8", "surrogateescape")


class LineProtocol(asyncio.Protocol):
    """The framing half of a lab session; subclasses answer _command() and _end_data().

    Delays use loop timers, not tasks.
    """

    __slots__ = (
        "_batch",
        "_buf",
        "_data_midline",
        "_data_parts",
        "_data_size",
        "_data_too_big",
        "_done",
        "_errors",
        "_in_data",
        "_listener",
        "_overlong",
        "_paused",
        "_timer",
        "_transport",
        "_upgrading",
    )

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._batch: list[bytes] | None = None  # replies to pipelined input, written together
        self._paused = False  # a delayed reply is pending; input waits behind it
        self._upgrading = False  # STARTTLS handshake in progress
        self._done = False  # NOT_SMTP has answered, or the session is closing
        self._timer: asyncio.TimerHandle | None = None
        self._errors = 0
        self._overlong = False
        self._in_data = False
        self._data_parts: list[bytes] = []
        self._data_size = 0
        self._data_too_big = False
        self._data_midline = False

    # -- what a session adds ---------------------------------------------------------------

    def _command(self, raw: bytes) -> None:
        """Answer one command line (raw, with its line ending)."""
        raise NotImplementedError

    def _end_data(self) -> None:
        """Answer the end of DATA; the body is in _take_data()."""
        raise NotImplementedError

    # -- closing ---------------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection at once (Lab.stop)."""
        transport = self._transport
        self._closed()
        if transport is not None:
            transport.abort()

    def _closed(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        self._buf.clear()
        self._data_parts.clear()

    # -- replies ---------------------------------------------------------------------------

    def _reply(
        self, data: bytes, *, close: bool = False, then: Callable[[], None] | None = None
    ) -> None:
        spec = self._listener.spec
        delay = spec.reply_delay
        if spec.error_limits and self._errors >= SOFT_ERROR_LIMIT:
            delay += spec.error_sleep
        if data[:1] in (b"4", b"5"):
            self._errors += 1
        if delay > 0 and self._transport is not None:
            # Hold further input until this reply is out, so pipelined commands keep their order.
            self._paused = True
            self._transport.pause_reading()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(delay, self._delayed_send, data, close, then)
        else:
            self._send(data, close, then)

    def _delayed_send(self, data: bytes, close: bool, then: Callable[[], None] | None) -> None:
        self._timer = None
        self._send(data, close, then)
        self._drain()

    def _send(self, data: bytes, close: bool, then: Callable[[], None] | None) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._batch is not None and not close and then is None:
            self._batch.append(data)  # one write for the replies to one read
            return
        self._flush()
        transport.write(data)
        if close:
            self._done = True
            transport.close()
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if then is not None:
            then()

    # -- input -----------------------------------------------------------------------------

    def _flush(self) -> None:
        batch, transport = self._batch, self._transport
        if batch:
            self._batch = []
            if transport is not None and not transport.is_closing():
                transport.write(b"".join(batch))

    def _drain(self) -> None:
        self._batch = []
        try:
            self._drain_lines()
        finally:
            self._flush()
            self._batch = None

    def _drain_lines(self) -> None:
        buf = self._buf
        while not (self._paused or self._upgrading or self._done) and self._transport is not None:
            idx = buf.find(b"\n")
            if idx < 0:
                if len(buf) > MAX_LINE:
                    if self._in_data:
                        # Long DATA lines are legal enough; keep them as line continuations.
                        self._data_chunk(bytes(buf), eol=False)
                    else:
                        self._overlong = True  # answer once the line finally ends
                    buf.clear()
                return
            line = bytes(buf[: idx + 1])
            del buf[: idx + 1]
            if self._in_data:
                self._data_chunk(line, eol=True)
            elif self._overlong or len(line.rstrip(b"\r\n")) > MAX_LINE:
                self._overlong = False
                self._reply(b"500 5.5.0 Line too long\r\n")
            else:
                self._command(line)

    def _data_chunk(self, piece: bytes, *, eol: bool) -> None:
        at_line_start = not self._data_midline
        self._data_midline = not eol
        if at_line_start and eol and piece in (b".\r\n", b".\n"):
            self._end_data()
            return
        if at_line_start and piece.startswith(b"."):
            piece = piece[1:]  # RFC 5321 4.5.2 dot-unstuffing
        if self._data_too_big:
            return
        self._data_size += len(piece)
        if self._data_size > MAX_MESSAGE:
            # Keep reading to the terminator (the client is still sending), but stop storing.
            self._data_too_big = True
            self._data_parts.clear()
        else:
            self._data_parts.append(piece)

    def _take_data(self) -> tuple[bytes, bool]:
        """Leave DATA: the body read (dot-unstuffed) and whether it outgrew MAX_MESSAGE."""
        self._in_data = False
        data = b"".join(self._data_parts)
        too_big = self._data_too_big
        self._data_parts = []
        self._data_size = 0
        self._data_too_big = False
        self._data_midline = False
        return data, too_big
