"""The canary receiver: relayaudit's own SMTP listener that sees confirmation tokens arrive."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP as SMTPServerProtocol

from relayaudit.errors import ConfigError, os_reason

__all__ = ["Arrival", "CanaryReceiver"]

_TOKEN = re.compile(rb"relayaudit-[0-9a-f]{32}")
_MAX_MESSAGE = 256 * 1024


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

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        domain = address.rpartition("@")[2].lower()
        if domain != self._receiver.domain:
            return "550 5.7.1 relayaudit canary receiver: not a canary address"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or b""
        peer = session.peer[0] if session.peer else "?"
        # A token counts only in a canary recipient (local_part+token@domain) of a message that
        # carries it: a bounce of a canary (to the canary domain's sender address) quotes the
        # token in its body but is addressed to no token, and must never confirm a relay.
        addressed = {m.decode() for r in envelope.rcpt_tos for m in _TOKEN.findall(r.encode())}
        for token in {t for t in addressed if t.encode() in content[:_MAX_MESSAGE]}:
            self._receiver.record(
                Arrival(
                    token=token, peer=str(peer), mail_from=str(envelope.mail_from), at=time.time()
                )
            )
        return "250 2.0.0 received by relayaudit canary"


class CanaryReceiver:
    """Runs in the caller's event loop; `wait_for(token)` resolves when that token arrives."""

    def __init__(
        self, host: str, port: int, *, domain: str, hostname: str = "relayaudit-canary"
    ) -> None:
        self.host = host
        self.port = port
        self.domain = domain.lower()
        self._hostname = hostname
        self._server: asyncio.Server | None = None
        self._arrived: dict[str, Arrival] = {}
        self._waiters: dict[str, list[asyncio.Future[Arrival]]] = {}

    async def start(self) -> None:
        handler = _Handler(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTPServerProtocol(
                handler, hostname=self._hostname, data_size_limit=_MAX_MESSAGE, loop=loop
            ),
            host=self.host,
            port=self.port,
        )
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
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

    def record(self, arrival: Arrival) -> None:
        self._arrived.setdefault(arrival.token, arrival)
        for fut in self._waiters.pop(arrival.token, []):
            if not fut.done():
                fut.set_result(arrival)

    def arrived(self, token: str) -> Arrival | None:
        return self._arrived.get(token)

    async def wait_for(self, token: str, timeout: float) -> Arrival | None:
        """The arrival of `token` within `timeout` seconds, or None."""
        if token in self._arrived:
            return self._arrived[token]
        fut: asyncio.Future[Arrival] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(token, []).append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(token)
            if waiters and fut in waiters:
                waiters.remove(fut)


async def start_canary(host: str, port: int, *, domain: str) -> CanaryReceiver:
    """A started receiver, or a ConfigError naming `canary.listen` and why it cannot listen."""
    receiver = CanaryReceiver(host, port, domain=domain)
    try:
        await receiver.start()
    except OSError as exc:
        raise ConfigError(
            f"canary.listen: cannot listen on {host}:{port}: {os_reason(exc)}"
        ) from None
    return receiver
