"""One lab SMTP connection: the command state machine (EHLO to QUIT, STARTTLS, DATA handed on)."""

from __future__ import annotations

import asyncio
import re
import ssl
from typing import Final, cast

from relayaudit.lab.framing import LineProtocol, encode
from relayaudit.lab.listener import Listener
from relayaudit.lab.policy import rcpt_mode, rcpt_reply
from relayaudit.lab.recipients import CONTROL_RE
from relayaudit.lab.spec import HARD_ERROR_LIMIT, Behaviour
from relayaudit.lab.tls import TLS_HANDSHAKE_TIMEOUT

__all__ = ["Session"]

_MAX_RCPTS: Final = 100
# A relay chain built from a misconfigured mx map could loop forever inside one process; real MTAs
# stop such loops by counting Received headers, so the lab does the same.
_MAX_HOPS: Final = 25

_HTTP_400: Final = b"HTTP/1.1 400 Bad Request\r\n\r\n"
_OK: Final = b"250 2.0.0 Ok\r\n"
_UNKNOWN: Final = b"502 5.5.2 Error: command not recognized\r\n"

_MAIL_RE: Final = re.compile(r"FROM:\s*<([^<>]*)>(?:\s+(.*))?", re.IGNORECASE)
_RCPT_RE: Final = re.compile(r"TO:\s*<([^<>]*)>(?:\s+(.*))?", re.IGNORECASE)


def _hop_count(data: bytes) -> int:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    header = data if end < 0 else data[:end]
    return sum(1 for line in header.splitlines() if line[:9].lower() == b"received:")


class Session(LineProtocol):
    """One SMTP connection: a line-driven state machine over LineProtocol's framing."""

    __slots__ = ("_flight", "_helo", "_mail", "_peer", "_rcpts", "_tls")

    def __init__(self, listener: Listener) -> None:
        super().__init__(listener)
        self._tls = listener.spec.implicit_tls
        self._flight: asyncio.TimerHandle | None = None  # the flight in the air (flight_delay)
        self._helo = ""
        self._peer = ""
        self._mail: str | None = None
        self._rcpts: list[tuple[str, str | None]] = []  # (path as sent, external relay target)

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._listener.lab._sessions.add(self)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) else ""
        behaviour = self._listener.spec.behaviour
        if behaviour is Behaviour.TARPIT:
            # Never reading lets the kernel buffers fill, as a real tarpit does.
            self._transport.pause_reading()
            return
        if behaviour is Behaviour.NOT_SMTP:
            return
        flight = self._listener.spec.flight_delay
        if flight > 0:  # the connection's round trip before the greeting reaches the client
            self._timer = asyncio.get_running_loop().call_later(
                flight, self._reply, self._listener.banner
            )
            return
        self._reply(self._listener.banner)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        flight = self._listener.spec.flight_delay
        if flight > 0:
            # the bytes of one flight are read one latency later, all at once: the replies to
            # a pipelined group leave together, as over a network
            self._buf += data
            if self._flight is None:
                self._flight = asyncio.get_running_loop().call_later(flight, self._landed)
            return
        self._receive(data)

    def _landed(self) -> None:
        self._flight = None
        if not self._done:
            self._receive(b"")

    def _receive(self, data: bytes) -> None:
        if self._listener.spec.behaviour is Behaviour.NOT_SMTP:
            self._done = True
            self._reply(_HTTP_400, close=True)
            return
        self._buf += data
        self._drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()

    def _closed(self) -> None:
        super()._closed()
        if self._flight is not None:
            self._flight.cancel()
            self._flight = None
        self._listener.lab._sessions.discard(self)

    # -- commands --------------------------------------------------------------------------

    def _command(self, raw: bytes) -> None:
        listener = self._listener
        spec = listener.spec
        if spec.error_limits and self._errors >= HARD_ERROR_LIMIT:
            self._reply(encode(f"421 4.7.0 {spec.hostname} Error: too many errors"), close=True)
            return
        text = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape").strip()
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        arg = arg.strip()
        behaviour = spec.behaviour
        match verb:
            case "EHLO" | "HELO":
                if verb == "EHLO" and behaviour is Behaviour.HELO_ONLY:
                    self._reply(_UNKNOWN)
                elif not arg:
                    self._reply(encode(f"501 Syntax: {verb} hostname"))
                else:
                    self._helo = arg
                    self._reset()
                    if verb == "HELO":
                        self._reply(encode(f"250 {spec.hostname}"))
                    else:
                        self._reply(listener.ehlo_tls if self._tls else listener.ehlo_plain)
            case "MAIL":
                self._mail_cmd(arg)
            case "RCPT":
                self._rcpt_cmd(arg)
            case "DATA":
                if self._mail is None:
                    self._reply(b"503 5.5.1 Error: need MAIL command\r\n")
                elif not self._rcpts:
                    self._reply(b"503 5.5.1 Error: need RCPT command\r\n")
                else:
                    self._in_data = True
                    self._reply(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            case "RSET":
                self._reset()
                self._reply(_OK)
            case "NOOP":
                self._reply(_OK)
            case "QUIT":
                self._reply(b"221 2.0.0 Bye\r\n", close=True)
            case "VRFY":
                self._reply(b"252 2.0.0 Cannot VRFY user, but will accept message\r\n")
            case "STARTTLS":
                self._starttls_cmd()
            case "AUTH":
                if behaviour in (Behaviour.AUTH_REQUIRED, Behaviour.AUTH_NO_TLS):
                    # The lab knows no credentials: every attempt fails, as for a scanner.
                    self._reply(b"535 5.7.8 Error: authentication failed\r\n")
                else:
                    self._reply(b"503 5.5.1 Error: authentication not enabled\r\n")
            case "":
                self._reply(b"500 5.5.2 Error: bad syntax\r\n")
            case _:
                self._reply(_UNKNOWN)

    def _reset(self) -> None:
        self._mail = None
        self._rcpts = []

    def _starttls_cmd(self) -> None:
        listener = self._listener
        if listener.tls_context is None or listener.spec.implicit_tls:
            self._reply(_UNKNOWN)
        elif self._tls:
            self._reply(b"554 5.5.1 Error: TLS already active\r\n")
        else:
            self._reply(b"220 2.0.0 Ready to start TLS\r\n", then=self._begin_tls)

    def _begin_tls(self) -> None:
        transport = self._transport
        if transport is None:
            return
        self._upgrading = True
        # Stop the raw transport now, or the ClientHello could reach data_received before
        # start_tls takes over.
        transport.pause_reading()
        # Anything pipelined after STARTTLS arrived in plaintext and must not run under TLS
        # (the CVE-2011-0411 command-injection class).
        self._buf.clear()
        lab = self._listener.lab
        lab._track(asyncio.get_running_loop().create_task(self._upgrade(transport)))

    async def _upgrade(self, raw: asyncio.Transport) -> None:
        ctx = self._listener.tls_context
        assert ctx is not None
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                raw, self, ctx, server_side=True, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            tls = None
        if tls is None or self._done:
            # A failed handshake never reaches connection_lost on this protocol: clean up here.
            self._closed()
            raw.abort()
            if tls is not None:
                tls.abort()
            return
        self._transport = tls
        self._tls = True
        self._upgrading = False
        self._helo = ""
        self._reset()  # RFC 3207: forget everything learnt before TLS; the client must EHLO again
        self._drain()

    def _mail_cmd(self, arg: str) -> None:
        behaviour = self._listener.spec.behaviour
        match = _MAIL_RE.fullmatch(arg)
        if self._mail is not None:
            self._reply(b"503 5.5.1 Error: nested MAIL command\r\n")
        elif match is None or CONTROL_RE.search(match.group(1)):
            self._reply(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
        elif behaviour is Behaviour.AUTH_REQUIRED:
            self._reply(b"530 5.7.0 Authentication required\r\n")
        elif behaviour is Behaviour.TLS_REQUIRED and not self._tls:
            self._reply(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
        else:
            self._mail = match.group(1)
            self._rcpts = []
            self._reply(b"250 2.1.0 Ok\r\n")

    def _rcpt_cmd(self, arg: str) -> None:
        match = _RCPT_RE.fullmatch(arg)
        if self._mail is None:
            self._reply(b"503 5.5.1 Error: need MAIL command\r\n")
        elif match is None:
            self._reply(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n")
        elif len(self._rcpts) >= _MAX_RCPTS:
            self._reply(b"452 4.5.3 Error: too many recipients\r\n")
        else:
            path = match.group(1)
            listener = self._listener
            mode = rcpt_mode(
                listener.spec.behaviour,
                tls=self._tls,
                mail_from=self._mail,
                campus_domains=listener.lab._campus_domains,
            )
            reply, target = rcpt_reply(listener, mode, path)
            if reply is None:
                self._rcpts.append((path, target))
                self._reply(b"250 2.1.5 Ok\r\n")
            else:
                self._reply(reply)

    def _end_data(self) -> None:
        data, too_big = self._take_data()
        mail_from = self._mail or ""
        targets = [target for _, target in self._rcpts if target is not None]
        self._reset()
        if too_big:
            self._reply(b"552 5.3.4 Error: message file too big\r\n")
            return
        if targets and _hop_count(data) > _MAX_HOPS:
            self._reply(b"554 5.4.0 Error: too many hops\r\n")
            return
        if self._listener.spec.behaviour is Behaviour.REFUSE_AT_DATA:
            # Exim's acl_smtp_data deciding after the message: every RCPT was accepted
            self._reply(b"550 5.7.1 Relaying refused: message rejected after DATA\r\n")
            return
        lab = self._listener.lab
        lab.accepted_data += 1
        queue_id = f"{next(lab._queue_ids):010X}"
        if targets:
            lab._relay(
                self._listener,
                helo=self._helo,
                peer=self._peer,
                queue_id=queue_id,
                mail_from=mail_from,
                targets=targets,
                data=data,
            )
        self._reply(encode(f"250 2.0.0 Ok: queued as {queue_id}"))
