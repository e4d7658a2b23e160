"""Why a port said nothing in the greeting wait: QUIT, and what comes back (HTTP, TLS, a late greeting, silence).

A service that waits for its client to speak first answers the QUIT (HTTP, some TLS servers);
a server that greets late answers in SMTP; a tarpit stays silent. The outcome is a row of
failures.OUTCOMES (Stage.SILENCE); handshake.py calls this when its greeting wait ends with
nothing received.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from relayaudit.evidence import Exchange
from relayaudit.failures import (
    QUIT_ANSWER_BYTES,
    FailureKind,
    NoSession,
    Stage,
    answer_to_quit,
    kind_of,
    outcome,
)
from relayaudit.session import Observed, SmtpSession
from relayaudit.wire import Connection

__all__ = ["quit_after_silence"]


async def quit_after_silence(
    session: SmtpSession,
    wait: float,
    *,
    tls: bool,
    answer_wait: float,
    observed: Observed,
    dial: Callable[[], Awaitable[Connection]],
    address: str,
) -> NoSession:
    """The greeting wait (`wait` s) ended with nothing: QUIT, read what comes back for at most
    `answer_wait` s, and say why as the NoSession the probe ends with."""
    started = time.monotonic()
    if observed.waiting is not None:
        observed.waiting.start("an answer to QUIT (no greeting came)", answer_wait)
    try:
        data, closed = await session.wire.quit_after_silence(
            limit=QUIT_ANSWER_BYTES, timeout=answer_wait
        )
        kind, detail = answer_to_quit(data, closed=closed)
        session.record("QUIT", None, started, error=detail)
    finally:
        session.end()
    if kind is FailureKind.DISCONNECTED and not tls:
        version = await _tls_on_a_new_connection(answer_wait, observed, dial, address)
        if version is not None:
            kind = FailureKind.MALFORMED
            detail += (
                f", and a new connection completed a TLS handshake ({version}): the port "
                "speaks TLS from the first byte (if that is SMTP, list it in "
                "implicit_tls_ports)"
            )
    found = outcome(Stage.SILENCE, kind, wait=wait, detail=detail)
    assert isinstance(found, NoSession)  # every SILENCE row ends without a session
    return found


async def _tls_on_a_new_connection(
    wait: float,
    observed: Observed,
    dial: Callable[[], Awaitable[Connection]],
    address: str,
) -> str | None:
    """A service silent until spoken to that hung up on QUIT may be a TLS server (OpenSSL 3
    closes on a first record that is no TLS without sending an alert): one more connection
    (through the gate) and a TLS handshake. The protocol version agreed, or None."""
    try:
        conn = await dial()
    except NoSession:
        return None
    started = time.monotonic()
    try:
        async with asyncio.timeout(wait):
            wire = await conn.wire(tls=True, server_hostname=address, timeout=wait)
    except Exception as exc:
        if kind_of(exc) is None:
            raise
        conn.close()
        return None
    tls = wire.tls_object()
    version = (tls.version() if tls is not None else None) or "TLS"
    wire.abort()
    elapsed = round((time.monotonic() - started) * 1000, 1)
    observed.transcript.append(
        Exchange(
            command=None,
            reply=None,
            error=f"a new connection: TLS handshake completed ({version})",
            elapsed_ms=elapsed,
        )
    )
    return version
