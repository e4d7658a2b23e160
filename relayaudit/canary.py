"""The canary receiver: relayaudit's own SMTP listener that sees confirmation tokens arrive.

It must be reachable from campus (the canary domain's MX points at it), so it is built for
hostile clients: at most `max_connections` at once (when full, the peer holding the most gives
its oldest up, so one flooding host cannot lock the relays out), a total deadline and an idle
timeout per connection, caps on line length and on the bytes and lines of each message, at most
MAX_MESSAGES messages per connection (relays such as OpenSMTPD send the next message over the
connection they already have: a receiver that refused it with 421 had that canary wait for the
relay's retry, minutes, long past the confirmation wait), and a greeting that names no software.
A token counts only if the scanner registered it before sending its DATA (`expect`) and still
waits for it; everything else is only counted (`count`, the daemon's metrics).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP as SMTPServerProtocol

from relayaudit.errors import listen_error

if TYPE_CHECKING:
    from relayaudit.config import Config

__all__ = ["Arrival", "CanaryReceiver", "Count", "start_canary"]

_TOKEN = re.compile(r"relayaudit-[0-9a-f]{32}")
# A canary is about 1 KB, and relays add a few KB of headers; nothing larger is ever a canary.
MAX_MESSAGE = 64 * 1024
MAX_LINE = 2048  # bytes in one line, command or message (RFC 5321 allows 1000)
MAX_LINES = 2048  # lines per message: bounds the per-line objects of the DATA buffer too
MAX_MESSAGES = 10  # messages per connection (within its DEADLINE)
_SLACK = 16 * 1024  # the commands around the one message
DEADLINE = 60.0  # seconds one connection may last, whatever it does
IDLE = 20.0  # seconds without a command before the connection is closed
_BUSY = b"421 4.7.0 Too many connections, try again later\r\n"

Count = Callable[[str, str], None]
"""Told about every connection and message: ("connections" | "messages", what became of it)."""


@dataclass(frozen=True, slots=True)
class Arrival:
    token: str
    peer: str  # who delivered it: the relay, or the relay's next hop
    mail_from: str
    at: float  # time.time()


class _Handler:
    """Accepts mail only for the canary domain: the receiver must never be a relay itself."""

    def __init__(self, receiver: CanaryReceiver) -> None:
        self._receiver = receiver

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if isinstance(server, _Connection) and server.messages >= MAX_MESSAGES:
            # enough for one connection: a relay sends the next one on a fresh connection
            asyncio.get_running_loop().call_soon(server.close_now)
            return f"421 4.7.0 At most {MAX_MESSAGES} messages per connection"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        domain = address.rpartition("@")[2].lower()
        if domain != self._receiver.domain:
            return "550 5.7.1 Not a canary address"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or b""
        peer = session.peer[0] if session.peer else "?"
        if isinstance(server, _Connection):
            server.taken()
        # A token counts only in a canary recipient (local_part+token@domain) of a message that
        # carries it: a bounce of a canary (to the canary domain's sender address) quotes the
        # token in its body but is addressed to no token, and must never confirm a relay.
        addressed = {m for r in envelope.rcpt_tos for m in _TOKEN.findall(r)}
        carried = {t for t in addressed if t.encode() in content}
        receiver = self._receiver
        if not carried:
            receiver.counted("messages", "no-token")
        for token in carried:
            arrival = Arrival(
                token=token, peer=str(peer), mail_from=str(envelope.mail_from), at=time.time()
            )
            receiver.counted(
                "messages", "token" if receiver.record(arrival) else "unexpected-token"
            )
        return "250 2.0.0 OK"


class _Connection(SMTPServerProtocol):
    """aiosmtpd's SMTP with the receiver's bounds; admitted (or refused) as it connects."""

    def __init__(self, receiver: CanaryReceiver) -> None:
        super().__init__(
            _Handler(receiver),
            hostname=receiver.domain,
            ident="ESMTP",  # aiosmtpd would announce "Python SMTP <version>"
            data_size_limit=MAX_MESSAGE,
            timeout=IDLE,
            loop=asyncio.get_running_loop(),
        )
        self._receiver = receiver
        self.peer_address = ""
        self.messages = 0  # messages taken; at MAX_MESSAGES the next MAIL ends the connection
        self._admitted = False
        self._ended = False
        self._bytes = 0
        self._lines = 0
        self._line = 0  # bytes of the line not yet ended
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._admitted:  # aiosmtpd calls it again after STARTTLS (never offered here)
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        self.peer_address = str(peer[0]) if isinstance(peer, tuple) else ""
        if not self._receiver.admit(self):
            self._ended = True
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        self._admitted = True
        self._deadline = asyncio.get_running_loop().call_later(DEADLINE, self._expired)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._ended:
            return
        self._bytes += len(data)
        parts = data.split(b"\n")
        self._lines += len(parts) - 1
        longest = max(self._line + len(parts[0]), *(len(p) for p in parts[1:-1]), 0)
        self._line = len(parts[-1]) if len(parts) > 1 else self._line + len(data)
        if max(longest, self._line) > MAX_LINE:
            self._refuse("line-too-long", b"500 5.5.2 Line too long\r\n")
        elif self._bytes > MAX_MESSAGE + _SLACK or self._lines > MAX_LINES:
            self._refuse("too-large", b"552 5.3.4 Too much data\r\n")
        else:
            super().data_received(data)

    def taken(self) -> None:
        """One message taken: the byte and line caps start afresh for the next one."""
        self.messages += 1
        self._bytes = self._lines = 0

    def _refuse(self, why: str, reply: bytes) -> None:
        self._receiver.counted("connections", why)
        if self.transport is not None:
            self.transport.write(reply)  # type: ignore[attr-defined]
        self.close_now()

    def _expired(self) -> None:
        self._deadline = None
        if not self._ended:
            self._receiver.counted("connections", "deadline")
            self.close_now()

    def evict(self) -> None:
        """Make room for a connection from a peer holding fewer."""
        self._receiver.counted("connections", "evicted")
        if self.transport is not None:
            self.transport.write(_BUSY)  # type: ignore[attr-defined]
        self.close_now()

    def close_now(self) -> None:
        """Stop reading; the connection closes (its buffered reply still goes out)."""
        if self._ended:
            return
        self._ended = True
        self._receiver.release(self)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return  # refused before aiosmtpd saw it: nothing of it to tear down
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._ended = True
        self._receiver.release(self)
        super().connection_lost(error)


class CanaryReceiver:
    """Runs in the caller's event loop; `wait_for(token)` resolves when that token arrives."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        domain: str,
        max_connections: int = 64,
        token_ttl: float = 600.0,
        count: Count | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.domain = domain.lower()
        self.max_connections = max_connections
        self.token_ttl = token_ttl  # how long a token registered by `expect` is waited for
        self.stats: Counter[tuple[str, str]] = Counter()
        self._count = count
        self._server: asyncio.Server | None = None
        self._peers: dict[str, list[_Connection]] = {}  # oldest first
        self._open = 0
        self._expected: dict[str, float] = {}  # token -> when it stops being waited for
        self._arrived: dict[str, Arrival] = {}
        self._waiters: dict[str, list[asyncio.Future[Arrival]]] = {}

    @property
    def connections(self) -> int:
        return self._open

    def counted(self, family: str, what: str) -> None:
        self.stats[family, what] += 1
        if self._count is not None:
            self._count(family, what)

    # -- connections -----------------------------------------------------------------------

    def admit(self, conn: _Connection) -> bool:
        """Room for `conn`? When full, the peer holding the most gives its oldest up if it holds
        more than `conn`'s peer would; else `conn` is refused (421)."""
        mine = self._peers.get(conn.peer_address, [])
        if self._open >= self.max_connections:
            top = max(self._peers.values(), key=len)
            if len(top) <= len(mine) + 1:
                self.counted("connections", "refused-busy")
                return False
            top[0].evict()
        self._peers.setdefault(conn.peer_address, []).append(conn)
        self._open += 1
        self.counted("connections", "accepted")
        return True

    def release(self, conn: _Connection) -> None:
        held = self._peers.get(conn.peer_address)
        if held is not None and conn in held:
            held.remove(conn)
            self._open -= 1
            if not held:
                del self._peers[conn.peer_address]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host=self.host, port=self.port
        )
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for held in list(self._peers.values()):
                for conn in list(held):
                    conn.close_now()
            await self._server.wait_closed()
            self._server = None
        for futures in self._waiters.values():
            for fut in futures:
                fut.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> CanaryReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- tokens ----------------------------------------------------------------------------

    def expect(self, token: str) -> None:
        """The scanner is about to send DATA carrying `token`: wait for it (until token_ttl)."""
        now = time.monotonic()
        if len(self._expected) >= 1024 and len(self._expected) % 1024 == 0:
            self._forget_expired(now)
        self._expected[token] = now + self.token_ttl

    def _forget_expired(self, now: float) -> None:
        for token in [t for t, until in self._expected.items() if until < now]:
            self.forget(token)

    def forget(self, token: str) -> None:
        """No longer waited for: a later arrival is only counted."""
        self._expected.pop(token, None)
        self._arrived.pop(token, None)

    def record(self, arrival: Arrival) -> bool:
        """Keep an arrival of an expected token; False (and nothing kept) for any other."""
        until = self._expected.get(arrival.token)
        if until is None or until < time.monotonic():
            return False
        self._arrived.setdefault(arrival.token, arrival)
        for fut in self._waiters.pop(arrival.token, []):
            if not fut.done():
                fut.set_result(arrival)
        return True

    def arrived(self, token: str) -> Arrival | None:
        return self._arrived.get(token)

    async def wait_for(self, token: str, timeout: float) -> Arrival | None:
        """The arrival of `token` within `timeout` seconds, or None (then it is forgotten)."""
        if token in self._arrived:
            return self._arrived[token]
        if token not in self._expected:
            return None  # never registered, or already given up
        fut: asyncio.Future[Arrival] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(token, []).append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.forget(token)
            return None
        finally:
            waiters = self._waiters.get(token)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[token]


async def start_canary(config: Config, *, count: Count | None = None) -> CanaryReceiver:
    """A started receiver for `config.canary`, or a ConfigError naming `canary.listen` and why.

    A token is waited for as long as a probe and its canary wait can take, then forgotten.
    """
    host, port = config.canary.listen
    receiver = CanaryReceiver(
        host,
        port,
        domain=config.canary.domain,
        max_connections=config.canary.max_connections,
        token_ttl=config.timeouts.session + config.canary.wait + 60.0,
        count=count,
    )
    try:
        await receiver.start()
    except OSError as exc:
        raise listen_error("canary.listen", host, port, exc) from None
    return receiver
