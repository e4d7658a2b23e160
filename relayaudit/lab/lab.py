"""The Lab: many loopback-only SMTP listeners in one event loop, and a record of what they relay."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from types import MappingProxyType, TracebackType
from typing import Final

import aiosmtplib

from relayaudit.errors import ConfigError
from relayaudit.lab.framing import encode
from relayaudit.lab.listener import Listener
from relayaudit.lab.session import Session
from relayaudit.lab.spec import Delivery, ServerSpec
from relayaudit.lab.tls import TLS_HANDSHAKE_TIMEOUT

__all__ = ["Lab"]

# The name the lab logged under when it was one module, so log configuration keeps matching it.
_log = logging.getLogger("relayaudit.lab")

_FORWARD_TIMEOUT: Final = 10.0
_BACKLOG: Final = 256  # benchmarks open bursts of connections to one listener

_EMPTY_MX: Final[Mapping[str, tuple[str, int]]] = MappingProxyType({})


def _loopback_ipv4(value: str, where: str) -> None:
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an IPv4 address literal") from None
    if addr not in ipaddress.IPv4Network("127.0.0.0/8"):
        raise ConfigError(f"{where}: {value!r} is outside 127.0.0.0/8; the lab is loopback-only")


class Lab:
    """A set of loopback SMTP listeners sharing one event loop, with a record of what they relay."""

    def __init__(
        self,
        specs: Sequence[ServerSpec],
        *,
        local_domains: Sequence[str] = ("campus.test",),
        campus_domains: Sequence[str] = ("campus.test",),
        mx: Mapping[str, tuple[str, int]] = _EMPTY_MX,
    ) -> None:
        self.specs: tuple[ServerSpec, ...] = tuple(specs)
        self._local_domains = frozenset(d.lower() for d in local_domains)
        self._campus_domains = frozenset(d.lower() for d in campus_domains)
        for i, spec in enumerate(self.specs):
            where = f"specs[{i}]"
            _loopback_ipv4(spec.host, f"{where}.host")
            if not 0 <= spec.port <= 65535:
                raise ConfigError(f"{where}.port: {spec.port!r} is not a TCP port")
            if not spec.hostname or any(c.isspace() for c in spec.hostname):
                raise ConfigError(f"{where}.hostname: {spec.hostname!r} is empty or has spaces")
            if spec.banner is not None and ("\r" in spec.banner or len(spec.banner) > 2000):
                raise ConfigError(f"{where}.banner: a carriage return or over 2000 characters")
            if spec.reply_delay < 0 or spec.error_sleep < 0 or spec.flight_delay < 0:
                raise ConfigError(f"{where}: reply_delay, flight_delay and error_sleep must be >= 0")
        self._mx: dict[str, tuple[str, int]] = {}
        for domain, (host, port) in mx.items():
            # The lab must never hand mail to anything but a loopback listener it was told about.
            _loopback_ipv4(host, f"mx[{domain!r}]")
            if not 0 < port <= 65535:
                raise ConfigError(f"mx[{domain!r}]: {port!r} is not a TCP port")
            self._mx[domain.lower()] = (host, port)
        self.delivered: list[Delivery] = []
        self.accepted_data = 0
        self.forward_failures: list[tuple[Delivery, str]] = []
        self._listeners: list[Listener] = []
        self._sessions: set[Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._forwards: set[asyncio.Task[None]] = set()
        self._queue_ids = itertools.count(1)

    async def start(self) -> None:
        """Bind every listener; on failure close those already bound and raise OSError."""
        if self._listeners:
            raise RuntimeError("Lab already started")
        loop = asyncio.get_running_loop()
        listeners = [Listener(self, spec) for spec in self.specs]
        try:
            for listener in listeners:
                spec = listener.spec
                ctx = listener.tls_context if spec.implicit_tls else None
                try:
                    server = await loop.create_server(
                        functools.partial(Session, listener),
                        spec.host,
                        spec.port,
                        ssl=ctx,
                        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if ctx else None,
                        backlog=_BACKLOG,
                        reuse_address=True,
                    )
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"cannot listen on {spec.host}:{spec.port}: {exc.strerror}"
                    ) from exc
                listener.server = server
                bound = server.sockets[0].getsockname()
                listener.address = (str(bound[0]), int(bound[1]))
        except BaseException:
            for listener in listeners:
                if listener.server is not None:
                    listener.server.close()
            raise
        self._listeners = listeners

    async def stop(self) -> None:
        """Let pending forwards finish (bounded), then close listeners and every open connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _FORWARD_TIMEOUT
        # Forwards first, while every listener still runs: an mx may be a listener of this lab.
        # Only forwards are waited for; a client stalled in a TLS handshake must not delay stop.
        while (pending := [t for t in self._forwards if not t.done()]) and loop.time() < deadline:
            await asyncio.wait(pending, timeout=deadline - loop.time())
        for listener in self._listeners:
            if listener.server is not None:
                listener.server.close()
        for session in list(self._sessions):
            session.abort()
        tasks = self._tasks | self._forwards
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for listener in self._listeners:
            if listener.server is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(listener.server.wait_closed(), 5.0)
                listener.server = None
        self._listeners = []

    async def __aenter__(self) -> Lab:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def address_of(self, index: int) -> tuple[str, int]:
        """The bound (host, port) of specs[index]."""
        if not self._listeners:
            raise RuntimeError("Lab not started")
        return self._listeners[index].address

    @property
    def connections(self) -> int:
        """Open client connections right now (for benchmarks and leak checks)."""
        return len(self._sessions)

    # -- internals used by sessions ----------------------------------------------------------

    def _track(self, task: asyncio.Task[None], *, forward: bool = False) -> None:
        # The loop keeps only weak references to tasks; these sets keep them alive until done.
        tasks = self._forwards if forward else self._tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _relay(
        self,
        listener: Listener,
        *,
        helo: str,
        peer: str,
        queue_id: str,
        mail_from: str,
        targets: list[str],
        data: bytes,
    ) -> None:
        by_mx: dict[tuple[str, int], list[Delivery]] = {}
        for rcpt in targets:
            delivery = Delivery(listener.address, mail_from, rcpt, data)
            self.delivered.append(delivery)
            mx = self._mx.get(rcpt.rpartition("@")[2].lower())
            if mx is not None:  # domains without an mx entry are recorded, never contacted
                by_mx.setdefault(mx, []).append(delivery)
        if not by_mx:
            return
        stamp = format_datetime(datetime.now(UTC))
        received = encode(
            f"Received: from {helo or 'unknown'} ([{peer}])\r\n\tby {listener.spec.hostname}"
            f" (relaylab) with ESMTP id {queue_id}; {stamp}"
        )
        loop = asyncio.get_running_loop()
        for mx, deliveries in by_mx.items():
            coro = self._forward(listener, mx, deliveries, received + data)
            self._track(loop.create_task(coro), forward=True)

    async def _forward(
        self,
        listener: Listener,
        mx: tuple[str, int],
        deliveries: list[Delivery],
        message: bytes,
    ) -> None:
        host, port = mx
        client = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            local_hostname=listener.spec.hostname,
            timeout=_FORWARD_TIMEOUT,
            use_tls=False,
            start_tls=False,  # the canary mx is plain loopback; never opportunistic TLS
        )
        try:
            async with asyncio.timeout(_FORWARD_TIMEOUT):
                async with client:
                    # SMTP.sendmail (unlike aiosmtplib.send) accepts the null sender "".
                    await client.sendmail(
                        deliveries[0].mail_from, [d.rcpt for d in deliveries], message
                    )
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            _log.warning("relaylab forward to %s:%d failed: %s", host, port, reason)
            self.forward_failures.extend((d, reason) for d in deliveries)
