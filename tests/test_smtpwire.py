"""The probe's SMTP wire layer: reply parsing, EHLO parsing, and pipelining against real servers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hostile import HostileServer

from relayaudit.evidence import TestOutcome
from relayaudit.probe import ProbeSettings, probe
from relayaudit.smtpwire import MAX_REPLY, BadReply, RawReply, ReplyParser, dot_stuffed, parse_ehlo
from relayaudit.verdict import VerdictStatus, judge

SETTINGS = ProbeSettings(
    helo_name="relayaudit.campus.test",
    connect_timeout=1.0,
    command_timeout=2.0,
    session_timeout=10.0,
    campus_domains=("campus.test",),
    external_domains=("relay-test.example", "sender.example"),
)


def _settings(**changes: object) -> ProbeSettings:
    return ProbeSettings(**{**{f: getattr(SETTINGS, f) for f in SETTINGS.__slots__}, **changes})


# -- the parser (pure) -----------------------------------------------------------------------------


def test_replies_split_across_reads_and_several_in_one_read() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250-mx.example\r\n250-PIPE") == []
    assert parser.feed(b"LINING\r\n250 8BITMIME\r\n250 2.1.0 Ok\r\n554 5.7.1 no\n") == [
        RawReply(250, "mx.example\nPIPELINING\n8BITMIME"),
        RawReply(250, "2.1.0 Ok"),
        RawReply(554, "5.7.1 no"),  # a bare LF ends a line too
    ]
    assert parser.feed(b"221\r\n") == [RawReply(221, "")]


def test_undecodable_bytes_are_kept_as_escapes() -> None:
    (reply,) = ReplyParser().feed(b"250 caf\xe9\r\n")
    assert reply.text == "caf\udce9"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n", "not an SMTP reply: 'HTTP/1.1 400 Bad Request'"),
        (b"SSH-2.0-OpenSSH_9.2", "not an SMTP reply: 'SSH-2.0-OpenSSH_9.2'"),  # no line end needed
        (b"\r\n", "not an SMTP reply: ''"),
        (b"25x ok\r\n", "not an SMTP reply: '25x ok'"),
    ],
)
def test_what_is_not_a_reply_is_named(data: bytes, message: str) -> None:
    with pytest.raises(BadReply) as err:
        ReplyParser().feed(data)
    assert err.value.reason == message


def test_a_reply_is_bounded_with_or_without_line_ends() -> None:
    with pytest.raises(BadReply, match="reply longer than 32 KiB"):
        ReplyParser().feed(b"220 " + b"x" * MAX_REPLY)  # one line that never ends
    parser = ReplyParser()
    with pytest.raises(BadReply, match="reply longer than 32 KiB"):
        for _ in range(MAX_REPLY // 8 + 1):
            parser.feed(b"250-xxx\r\n")  # an endless multi-line reply
    # just inside the bound is fine
    (reply,) = ReplyParser().feed(b"250 " + b"y" * (MAX_REPLY - 8) + b"\r\n")
    assert reply.code == 250


def test_ehlo_extensions_and_auth_forms() -> None:
    ext, mechanisms = parse_ehlo(
        "mx.example greets you\nPIPELINING\nSIZE 10240000\nAUTH PLAIN login\nAUTH=LOGIN CRAM-MD5\n"
        "starttls"
    )
    assert ext == {"pipelining": "", "size": "10240000", "auth": "PLAIN login", "starttls": ""}
    assert mechanisms == ("PLAIN", "LOGIN", "CRAM-MD5")
    assert parse_ehlo("just a greeting") == ({}, ())


def test_dot_stuffing_and_the_end_of_data() -> None:
    assert dot_stuffed(b"Subject: x\n\n.hidden\nline\n") == (
        b"Subject: x\r\n\r\n..hidden\r\nline\r\n.\r\n"
    )
    assert dot_stuffed(b"a\r\n.\r\n") == b"a\r\n..\r\n.\r\n"


# -- pipelining against a recording server -------------------------------------------------------

Recorder = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def recording_server(
    *,
    pipelining: bool,
    refuse_mail_from: tuple[bytes, ...] = (),
    strict_sync: bool = False,
    max_connections: int | None = None,
) -> tuple[Recorder, list[list[bytes]], list[str]]:
    """A relay-refusing server that records each connection's reads (what came in one segment).

    strict_sync: like Exim without PIPELINING advertised, input that arrives before the reply to
    the previous command was sent is a synchronization error. max_connections: more at once get
    `421 too many connections`.
    """
    reads: list[list[bytes]] = []
    problems: list[str] = []
    live = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if max_connections is not None and live[0] >= max_connections:
            writer.write(b"421 4.7.0 too many connections from your host\r\n")
            await writer.drain()
            return
        live[0] += 1
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

    return handler, reads, problems


async def test_pipelined_groups_go_out_together_and_rcpt_waits_for_its_mail() -> None:
    handler, reads, problems = recording_server(
        pipelining=True, refuse_mail_from=(b"<>", b"<relayaudit>")
    )
    async with HostileServer(handler) as server:
        result = await probe("127.0.0.1", server.port, _settings(sessions_per_host=1))
    assert problems == []
    assert judge(result).status is VerdictStatus.RELAY_REFUSED
    assert all(t.outcome is not TestOutcome.ERROR for t in result.tests), result.tests
    groups = [chunk for conn in reads for chunk in conn if chunk.count(b"\r\n") == 3]
    assert groups, "no RCPT + RSET + MAIL group arrived in one segment"
    for chunk in groups:
        verbs = [line.split(b" ")[0] for line in chunk.split(b"\r\n")[:3]]
        assert verbs == [b"RCPT", b"RSET", b"MAIL"]
    # every test's RCPT is in the transcript once, in battery order
    refused_mail = sum(t.rcpt is None for t in result.tests)
    assert refused_mail == 2
    assert len(result.tests) == 22


async def test_no_pipelining_when_the_server_does_not_advertise_it() -> None:
    handler, _reads, problems = recording_server(pipelining=False, strict_sync=True)
    async with HostileServer(handler) as server:
        result = await probe("127.0.0.1", server.port, SETTINGS)
    assert problems == []
    assert judge(result).status is VerdictStatus.RELAY_REFUSED
    assert len(result.tests) == 22
    assert all(t.outcome is TestOutcome.REFUSED for t in result.tests)


async def test_pipelining_can_be_switched_off() -> None:
    handler, _reads, problems = recording_server(pipelining=True, strict_sync=True)
    async with HostileServer(handler) as server:
        result = await probe("127.0.0.1", server.port, _settings(pipelining=False))
    assert problems == []
    assert len(result.tests) == 22


async def test_parallel_sessions_and_a_server_allowing_only_one_connection() -> None:
    handler, _reads, problems = recording_server(pipelining=True, max_connections=1)
    async with HostileServer(handler) as server:
        result = await probe("127.0.0.1", server.port, SETTINGS)
    assert problems == []
    # the extra sessions were refused with 421: the one allowed connection ran all 22 tests
    assert judge(result).status is VerdictStatus.RELAY_REFUSED
    assert [t.outcome for t in result.tests] == [TestOutcome.REFUSED] * 22
    assert [t.test.id for t in result.tests][:2] == ["rcpt-plain", "control-invalid"]


async def test_three_sessions_run_side_by_side_and_results_keep_battery_order() -> None:
    handler, _reads, problems = recording_server(pipelining=True)
    async with HostileServer(handler) as server:
        result = await probe("127.0.0.1", server.port, SETTINGS)
        one = await probe("127.0.0.1", server.port, _settings(sessions_per_host=1))
    assert problems == []
    assert result.sessions == 3
    assert [t.test.id for t in result.tests] == [t.test.id for t in one.tests]
    assert [t.outcome for t in result.tests] == [t.outcome for t in one.tests]
    # each session's exchanges stay together in the transcript: a greeting starts each block
    greetings = [i for i, e in enumerate(result.transcript) if e.command is None]
    assert len(greetings) == 3
    for start, end in zip(greetings, [*greetings[1:], len(result.transcript)], strict=True):
        block = [e.command for e in result.transcript[start:end]]
        assert str(block[1]).startswith("EHLO") and block[-1] == "QUIT", block
