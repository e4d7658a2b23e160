"""Opens an SMTP session on one address:port: connect, greeting, EHLO or HELO, STARTTLS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from relayaudit.battery import address_literal
from relayaudit.connect import connect_socket
from relayaudit.evidence import (
    Claim,
    ClaimKind,
    Exchange,
    PortState,
    Reply,
    TlsFacts,
    Transport,
    built,
    shared_reply,
)
from relayaudit.facts import capabilities, session_facts, tls_facts
from relayaudit.failures import (
    QUIT_ANSWER_WAIT,
    Broken,
    FailureKind,
    Stage,
    describe,
    failure,
    kind_of,
    outcome,
    reply_code,
    reply_text,
)
from relayaudit.session import Observed, SmtpSession
from relayaudit.settings import ProbeSettings
from relayaudit.silence import quit_after_silence
from relayaudit.wire import Connection, Ehlo, SocketConnection, parse_ehlo

__all__ = ["Dial", "Gate", "Handshake"]

Gate = Callable[[str], Awaitable[None]]
"""Awaited before every new connection to an address (the engine's pacer); the probe knows no rate."""

Dial = Callable[[], Awaitable[Connection]]
"""Opens a new connection to the probe's address:port (raises NoSession when it cannot)."""

_READY = 220


class Handshake:
    """Sets up each session of one probe; what it learns goes into the shared `Observed`."""

    def __init__(
        self,
        address: str,
        port: int,
        settings: ProbeSettings,
        *,
        gate: Gate | None,
        observed: Observed,
        dial: Dial | None = None,
    ) -> None:
        self.address = address
        self.port = port
        self.settings = settings
        self.gate = gate
        self.observed = observed
        # no bound method of self kept on self: that cycle held each probe's whole transcript
        # until the cyclic collector ran (tests/test_gc.py)
        self._dial = dial

    async def dial(self) -> Connection:
        """A new connection: the injected dial (tests, the canary) or a TCP connect."""
        if self._dial is not None:
            return await self._dial()
        return await self._tcp()

    async def _tcp(self) -> Connection:
        """A new TCP connection, paced by the gate."""
        s = self.settings
        if self.gate is not None:
            await self.gate(self.address)
        if self.observed.waiting is not None:
            self.observed.waiting.start("the connection", s.connect_timeout)
        sock = await connect_socket(
            self.address, self.port, source=s.source_address, timeout=s.connect_timeout
        )
        return SocketConnection(sock)

    async def open(
        self, transport: Transport, conn: Connection | None = None, *, claim: Claim | None = None
    ) -> SmtpSession:
        """Connect (or take the discovery connection), read the greeting, EHLO or HELO, STARTTLS.

        `claim`: the session pretends to be someone else (issue 27): EHLO with the claimed
        name instead of the scanner's, or XCLIENT with the claimed address after the hello
        (then the server greets again, and the session says EHLO anew). The transcript says so.
        """
        seen = self.observed
        if conn is None:
            conn = await self.dial()
        seen.port_state = PortState.OPEN
        if not seen.vantage:  # the probe's first connection says where it came from
            seen.vantage = conn.local_address() or ""
        seen.sessions += 1
        session: SmtpSession | None = None
        try:
            session, banner = await self._greeting(conn, transport)
            if claim is not None:
                session.log.append(_claim_note(claim))
            helo = claim.value if claim is not None and claim.kind is ClaimKind.HELO else None
            ehlo = in_use = await self._hello(session, claimed=helo)
            if transport is Transport.STARTTLS:
                in_use = await self._starttls(session, helo or seen.helo)
            elif transport is Transport.IMPLICIT_TLS and seen.tls is None:
                seen.tls = tls_facts(session.wire.tls_object())
            if seen.facts is None:
                seen.facts = session_facts(banner, ehlo)
            if claim is not None and claim.kind is ClaimKind.XCLIENT:
                in_use = await self._xclient(session, claim)
            # RFC 2920: only where this session's EHLO offered it, and never again on a host
            # whose earlier group got out of step
            session.offered = (
                self.settings.pipelining
                and in_use is not None
                and "pipelining" in in_use.extensions
            )
            session.pipelining = session.offered and seen.lockstep is None
        except BaseException:
            if session is not None:
                session.end()
            else:
                conn.close()  # no transport took the connection over
            raise
        return session

    async def _greeting(self, conn: Connection, transport: Transport) -> tuple[SmtpSession, Reply]:
        s = self.settings
        seen = self.observed
        implicit = transport is Transport.IMPLICIT_TLS
        # the greeting may come late (greet pauses, anti-spam delays); RFC 5321 4.5.3.2
        # allows the server minutes, so it gets its own, longer deadline, which also bounds
        # an implicit-TLS handshake
        wait = max(s.greeting_timeout, s.command_timeout)
        started = time.monotonic()
        if seen.waiting is not None:
            seen.waiting.start("the greeting", wait)
        session: SmtpSession | None = None
        try:
            async with asyncio.timeout(wait):
                wire = await conn.wire(tls=implicit, server_hostname=self.address, timeout=wait)
                session = SmtpSession(wire, timeout=s.command_timeout, observed=seen)
                response = await wire.greeting()
        except BaseException as exc:
            kind = kind_of(exc) if not isinstance(exc, asyncio.CancelledError) else None
            if kind is None:  # cancelled (the session deadline), or a bug of ours
                if session is not None:
                    session.end()  # the transport lets go of the socket before it is closed
                raise
            error = "no greeting" if kind is FailureKind.TIMEOUT else describe(exc)
            if session is not None:
                session.record(None, None, started, error=error)
                if kind is FailureKind.TIMEOUT and session.wire.silent:
                    raise await quit_after_silence(
                        session,
                        wait,
                        tls=implicit,
                        answer_wait=min(QUIT_ANSWER_WAIT, s.command_timeout),
                        observed=seen,
                        dial=self.dial,
                        address=self.address,
                    ) from None
                session.end()
            else:  # the TLS handshake failed: the caller closes the socket
                elapsed = round((time.monotonic() - started) * 1000, 1)
                seen.transcript.append(
                    Exchange(command=None, reply=None, error=error, elapsed_ms=elapsed)
                )
            stage = Stage.GREETING
            if implicit and kind in (FailureKind.DISCONNECTED, FailureKind.TRANSPORT):
                stage = Stage.TLS_HANDSHAKE
                if seen.tls is None:  # a parallel session's failure keeps earlier good facts
                    seen.tls = TlsFacts(error=describe(exc))
            raise failure(stage, kind, exc, wait=wait) from None
        banner = shared_reply(response.code, response.message)
        session.record(None, banner, started)
        if response.code != _READY:
            session.end()
            if 200 <= response.code <= 599:
                seen.banner_seen = True
                kind = FailureKind.REFUSED
            else:
                kind = FailureKind.MALFORMED
            raise outcome(Stage.GREETING, kind, text=str(banner)) from None
        seen.banner_seen = True
        return session, banner

    async def _hello(self, session: SmtpSession, *, claimed: str | None = None) -> Ehlo | None:
        """EHLO, else HELO; the EHLO reply's keywords, or None when HELO was used.

        Servers with anti-forgery HELO rules refuse a name they consider theirs (a campus HELO
        name from outside is exactly that): then the vantage's address literal is tried, the
        RFC 5321 form for a client without a name. A server refusing both refuses the session.
        `claimed`: a name claimed on purpose, the only one tried (and never kept as ours).
        """
        seen = self.observed
        if claimed is not None:
            return await self._hello_as(session, [claimed], keep=False)
        names = [seen.helo]
        if seen.vantage:
            literal = address_literal(seen.vantage)
            if literal != seen.helo:
                names.append(literal)
        return await self._hello_as(session, names, keep=True)

    async def _hello_as(self, session: SmtpSession, names: list[str], *, keep: bool) -> Ehlo | None:
        seen = self.observed
        reply: Reply | None = None
        for name in names:
            ehlo = await session.command(f"EHLO {name}")
            if ehlo.code == 250:
                if keep:
                    seen.helo = name
                return parse_ehlo(ehlo.text)
            if not session.connected:
                raise Broken("server hung up after EHLO")
            reply = await session.command(f"HELO {name}")
            if reply.code == 250:
                if keep:
                    seen.helo = name
                return None
            if not session.connected or reply.code == 421:
                break
        raise outcome(Stage.HELLO, FailureKind.REFUSED, text=str(reply))

    async def _xclient(self, session: SmtpSession, claim: Claim) -> Ehlo:
        """XCLIENT ADDR=...: a server that honours it greets again (220), as if the claimed
        client had just connected, and wants a new EHLO; that EHLO's reply."""
        reply = await session.command(f"XCLIENT ADDR={claim.value}")
        if reply.code != _READY:
            raise Broken(f"XCLIENT ADDR={claim.value} not honoured: {reply}", fatal=True)
        again = await session.command(f"EHLO {self.observed.helo}")
        if again.code != 250:
            raise Broken(f"EHLO after XCLIENT refused: {again}", fatal=True)
        return parse_ehlo(again.text)

    async def _starttls(self, session: SmtpSession, helo: str) -> Ehlo:
        """STARTTLS, the handshake and EHLO again; that EHLO's reply (what TLS offers)."""
        seen = self.observed
        started = time.monotonic()
        try:
            response = await session.wire.starttls(timeout=self.settings.command_timeout)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            kind = kind_of(exc)
            if kind is None:
                raise
            if kind is FailureKind.REFUSED:
                code, text = reply_code(exc), reply_text(exc)
                session.record("STARTTLS", Reply(code=code, text=text), started)
                error = f"STARTTLS refused: {code} {text}"
            else:
                session.record("STARTTLS", None, started, error=describe(exc))
                error = f"handshake failed: {describe(exc)}"
            if seen.tls is None:
                seen.tls = TlsFacts(error=error)
            raise failure(Stage.STARTTLS, kind, exc) from None
        session.record("STARTTLS", Reply(code=response.code, text=response.message), started)
        seen.tls = tls_facts(session.wire.tls_object())
        try:
            again = await session.command(f"EHLO {helo}")
        except Broken:
            again = None
        if again is None or again.code != 250:
            raise Broken("EHLO after STARTTLS failed", fatal=True)
        inside = parse_ehlo(again.text)
        if seen.after_starttls is None:
            # what the server offers inside TLS (AUTH, SIZE), kept beside the plain EHLO's
            seen.after_starttls = capabilities(inside)
        return inside


def _claim_note(claim: Claim) -> Exchange:
    """The transcript's line before a claimed identity's session: who the scanner pretends to be."""
    text = (
        f"claimed identity: {claim} ({claim.why}); the scanner does not introduce itself in "
        "this session"
    )
    return built(Exchange, {"command": None, "reply": None, "error": text, "elapsed_ms": 0.0})
