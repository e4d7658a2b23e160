"""Sessions of one probe: one command at a time, parallel sessions, battery order, transcript blocks."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
from factories import probe_settings
from hostile import HostileServer

from relayaudit.evidence import TestOutcome
from relayaudit.lab import server_tls_context
from relayaudit.probe import ProbeSettings, probe
from relayaudit.verdict import VerdictStatus, judge

# the battery's own sessions; the claimed-identity sessions after it are tests/test_claims.py's
SETTINGS = probe_settings(
    connect_timeout=1.0, command_timeout=2.0, session_timeout=10.0, claimed_identity=False
)


def _settings(**changes: object) -> ProbeSettings:
    return ProbeSettings(**{**{f: getattr(SETTINGS, f) for f in SETTINGS.__slots__}, **changes})


# -- a recording server ----------------------------------------------------------------------------

Recorder = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def recording_server(
    *,
    pipelining: bool = True,
    refuse_mail_from: tuple[bytes, ...] = (),
    strict_sync: bool = False,
    max_connections: int | None = None,
    bad_syntax: tuple[bytes, ...] = (),
) -> tuple[Recorder, list[list[bytes]], list[str], list[int]]:
    """A relay-refusing server that records each connection's reads (what came in one segment).

    strict_sync: like Exim without PIPELINING advertised, input that arrives before the reply to
    the previous command was sent is a synchronization error. max_connections: more at once get
    `421 too many connections`.
    """
    reads: list[list[bytes]] = []
    problems: list[str] = []
    live = [0]
    peak = [0]  # the most connections open at once

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if max_connections is not None and live[0] >= max_connections:
            writer.write(b"421 4.7.0 too many connections from your host\r\n")
            await writer.drain()
            return
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        mine: list[bytes] = []
        reads.append(mine)
        try:
            writer.write(b"220 mx.rec.test ESMTP\r\n")
            extensions = b"250-PIPELINING\r\n" if pipelining else b""
            open_mail = False
            buffered = b""
            for _ in range(500):
                chunk = await reader.read(65536)
                if not chunk:
                    return
                mine.append(chunk)
                buffered += chunk
                lines = buffered.split(b"\r\n")
                buffered = lines.pop()
                if strict_sync and len(lines) > 1:
                    problems.append(f"synchronization error: {lines!r} arrived together")
                for line in lines:
                    verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
                    if verb == b"EHLO":
                        writer.write(b"250-mx.rec.test\r\n" + extensions + b"250 8BITMIME\r\n")
                    elif verb == b"MAIL":
                        if any(form in line for form in refuse_mail_from):
                            writer.write(b"553 5.1.7 sender refused\r\n")
                        else:
                            open_mail = True
                            writer.write(b"250 2.1.0 Ok\r\n")
                    elif verb == b"RCPT":
                        if not open_mail:
                            problems.append(f"RCPT without an accepted MAIL: {line!r}")
                            writer.write(b"503 5.5.1 need MAIL\r\n")
                        elif any(mark in line for mark in bad_syntax):
                            writer.write(b"501 5.1.3 Bad recipient address syntax\r\n")
                        else:
                            writer.write(b"554 5.7.1 Relay access denied\r\n")
                    elif verb == b"RSET":
                        open_mail = False
                        writer.write(b"250 2.0.0 Ok\r\n")
                    elif verb == b"QUIT":
                        writer.write(b"221 2.0.0 Bye\r\n")
                        await writer.drain()
                        return
                    else:
                        writer.write(b"502 5.5.2 unknown\r\n")
                await writer.drain()
        finally:
            live[0] -= 1

    return handler, reads, problems, peak


@pytest.mark.parametrize(
    ("advertised", "pipelining"), [(False, True), (True, False)], ids=["not-offered", "off"]
)
async def test_every_command_waits_for_its_reply_unless_pipelining(
    advertised: bool, pipelining: bool
) -> None:
    """Lock-step where the server does not offer PIPELINING, or relay.pipelining is off: one
    command per write (a strict server calls anything else a synchronization error), and RCPT
    only after MAIL's 250."""
    handler, reads, problems, _peak = recording_server(
        pipelining=advertised, strict_sync=True, refuse_mail_from=(b"<>",)
    )
    async with HostileServer(handler) as server:
        result = await probe("127.0.0.1", server.port, replace(SETTINGS, pipelining=pipelining))
    assert problems == []
    assert all(chunk.count(b"\r\n") == 1 for conn in reads for chunk in conn)
    assert not result.pipelined
    assert sum(t.rcpt is None for t in result.tests) == 1  # the refused null sender: no RCPT
    assert judge(result).status is VerdictStatus.RELAY_REFUSED
    assert len(result.tests) == 26
    assert sum(t.outcome is TestOutcome.REFUSED for t in result.tests) == 25


async def test_pipelined_where_offered_until_a_mail_is_refused() -> None:
    """RFC 2920 where PIPELINING is offered: the first test's MAIL and RCPT in one write, then
    the rest of each session's tests (RSET between them) and QUIT in one more; the refused null
    sender's RCPT went with its group (unavoidably), and from there on lock-step."""
    handler, reads, problems, _peak = recording_server(pipelining=True, refuse_mail_from=(b"<>",))
    async with HostileServer(handler) as server:
        result = await probe("127.0.0.1", server.port, SETTINGS)
    assert result.pipelined and result.lockstep == "MAIL FROM answered 553"
    grouped = [chunk for conn in reads for chunk in conn if chunk.count(b"\r\n") > 1]
    assert grouped[0].startswith(b"MAIL FROM:") and grouped[0].count(b"\r\n") == 2
    # the session's other 8 tests: RSET, MAIL and RCPT each, and QUIT
    assert grouped[1].startswith(b"RSET\r\nMAIL FROM:") and grouped[1].endswith(b"QUIT\r\n")
    assert grouped[1].count(b"\r\n") == 8 * 3 + 1
    # the one RCPT after a refused MAIL is the group's; none after the switch to lock-step
    assert len(problems) == 1 and "RCPT without an accepted MAIL" in problems[0], problems
    assert sum(t.rcpt is None for t in result.tests) == 1  # recorded as lock-step would
    assert judge(result).status is VerdictStatus.RELAY_REFUSED
    assert sum(t.outcome is TestOutcome.REFUSED for t in result.tests) == 25


async def test_parallel_sessions_and_a_server_allowing_only_one_connection() -> None:
    handler, _reads, problems, _peak = recording_server(pipelining=True, max_connections=1)
    async with HostileServer(handler) as server:
        result = await probe("127.0.0.1", server.port, _settings(sessions_per_host=3))
    assert problems == []
    # the extra sessions were refused with 421: the one allowed connection ran all 26 tests
    assert judge(result).status is VerdictStatus.RELAY_REFUSED
    assert [t.outcome for t in result.tests] == [TestOutcome.REFUSED] * 26
    assert [t.test.id for t in result.tests][:2] == ["rcpt-plain", "control-invalid"]


async def test_three_sessions_run_side_by_side_and_results_keep_battery_order() -> None:
    handler, _reads, problems, peak = recording_server(pipelining=True)
    async with HostileServer(handler) as server:
        result = await probe("127.0.0.1", server.port, _settings(sessions_per_host=3))
        one = await probe("127.0.0.1", server.port, SETTINGS)  # the default: one at a time
    assert one.sessions == 3  # 26 tests, 9 per session, one after the other
    assert problems == []
    assert result.sessions == 3  # three side by side (9, 9 and 8 tests)
    assert peak == [3]  # side by side, not one after the other
    assert [t.test.id for t in result.tests] == [t.test.id for t in one.tests]
    assert [t.outcome for t in result.tests] == [t.outcome for t in one.tests]
    # each session's exchanges stay together in the transcript: a greeting starts each block
    greetings = [i for i, e in enumerate(result.transcript) if e.command is None]
    assert len(greetings) == 3
    for start, end in zip(greetings, [*greetings[1:], len(result.transcript)], strict=True):
        block = [e.command for e in result.transcript[start:end]]
        assert str(block[1]).startswith("EHLO") and block[-1] == "QUIT", block


def _stalling_tls_server(stall_at: bytes) -> tuple[socket.socket, list[ssl.SSLSocket]]:
    """An implicit-TLS server (threads, blocking sockets) that stops answering at `stall_at`."""
    ctx = server_tls_context("mx.tls.test")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[ssl.SSLSocket] = []

    def conn(raw: socket.socket) -> None:
        with contextlib.suppress(OSError):
            tls = ctx.wrap_socket(raw, server_side=True)
            held.append(tls)
            tls.sendall(b"220 mx.tls.test ESMTP\r\n")
            reader = tls.makefile("rb")
            for _ in range(200):
                verb = reader.readline()[:4].upper()
                if not verb or verb == stall_at:
                    return  # holds the connection open and silent (closed by the test)
                tls.sendall(
                    {
                        b"EHLO": b"250-mx.tls.test\r\n250 8BITMIME\r\n",
                        b"MAIL": b"250 ok\r\n",
                        b"RCPT": b"554 5.7.1 relay denied\r\n",
                        b"RSET": b"250 ok\r\n",
                        b"QUIT": b"221 bye\r\n",
                    }.get(bytes(verb), b"502 no\r\n")
                )

    def serve() -> None:
        with contextlib.suppress(OSError):
            for _ in range(20):
                raw, _ = listener.accept()
                threading.Thread(target=conn, args=(raw,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener, held


async def test_a_silent_tls_server_costs_one_command_timeout() -> None:
    """A stalled command over TLS ends at the command timeout, not at TLS's 30 s close wait."""
    listener, held = _stalling_tls_server(b"MAIL")
    try:
        started = time.monotonic()
        result = await probe(
            "127.0.0.1",
            listener.getsockname()[1],
            _settings(command_timeout=1.0),
            implicit_tls=True,
        )
        elapsed = time.monotonic() - started
    finally:
        listener.close()
        for tls in held:
            with contextlib.suppress(OSError):
                tls.close()
    assert elapsed < 5.0, elapsed
    assert result.facts is not None and result.facts.tls is not None
    assert result.facts.tls.protocol is not None  # a good handshake, kept despite the stall
    assert result.tests[0].error == "no reply to MAIL within 1s"
    assert len(result.tests) == 26  # every test reported: the first failed, the rest not run


async def test_the_summary_tells_syntax_refusals_apart() -> None:
    handler, _reads, problems, _peak = recording_server(bad_syntax=(b"!", b'"'))
    async with HostileServer(handler) as server:
        result = await probe("127.0.0.1", server.port, SETTINGS)
    assert problems == []
    verdict = judge(result)
    assert verdict.status is VerdictStatus.RELAY_REFUSED
    syntax = sum(1 for t in result.tests if t.rcpt is not None and t.rcpt.code == 501)
    assert syntax >= 5  # the quoted and bang-path forms
    assert verdict.summary.startswith("All 26 relay tests refused (e.g. 554 ")
    assert verdict.summary.endswith(f" ({syntax} of them as bad address syntax, 501 / x.1.3).")


async def test_by_default_one_session_at_a_time_per_host() -> None:
    """Issue 3's politeness: at most one SMTP session per host at a time, unless opted in."""
    handler, _reads, problems, peak = recording_server()
    async with HostileServer(handler) as server:
        result = await probe("127.0.0.1", server.port, SETTINGS)
    assert problems == []
    assert result.sessions == 3 and peak == [1]
    assert len(result.tests) == 26
