"""Drives every relaylab behaviour with the stdlib SMTP client and raw sockets, all time-bounded."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import smtplib
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from smtp_sink import MessageSink

from relayaudit.errors import ConfigError
from relayaudit.lab import (
    MAX_MESSAGE,
    Behaviour,
    Lab,
    RecipientKind,
    ServerSpec,
    resolve_recipient,
)

R = TypeVar("R")

T = "mx.campus.test"  # the lab's default host name
HELO = "scanner.relayaudit.test"  # explicit, so smtplib never calls getfqdn() (a DNS lookup)
OUTSIDE = "u@outside.test"
CAMPUS_RCPT = "postmaster@campus.test"
THREAD_TIMEOUT = 20.0  # upper bound on any one client conversation run in a thread
SOCK_TIMEOUT = 5.0

Addr = tuple[str, int]


def odd_forms(ip: str) -> list[str]:
    """Recipient forms 2-15 of relay-tests.md, all meaning u@outside.test."""
    lit = f"[{ip}]"
    d = "outside.test"
    return [
        f"u%{d}@{lit}",
        f"u%{d}@{T}",
        f'"u@{d}"',
        f'"u%{d}"',
        f"u@{d}@{lit}",
        f'"u@{d}"@{lit}',
        f"u@{d}@{T}",
        f'"u@{d}"@{T}',
        f"@{lit}:u@{d}",
        f"@{T}:u@{d}",
        f"{d}!u",
        f"{d}!u@{lit}",
        f"{d}!u@{T}",
        f"u@{d}@",
    ]


def unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@contextlib.asynccontextmanager
async def running(
    behaviour: Behaviour,
    host: str = "127.0.0.1",
    mx: Mapping[str, tuple[str, int]] | None = None,
    **spec: Any,
) -> AsyncIterator[tuple[Lab, Addr]]:
    lab = Lab([ServerSpec(host, 0, behaviour, **spec)], mx=mx or {})
    async with lab:
        yield lab, lab.address_of(0)


async def in_thread(fn: Callable[[], R], timeout: float = THREAD_TIMEOUT) -> R:
    # The lab runs in this test's event loop, so blocking clients must run elsewhere.
    return await asyncio.wait_for(asyncio.to_thread(fn), timeout)


async def talk(
    addr: Addr, script: Callable[[smtplib.SMTP], R], *, implicit_tls: bool = False
) -> tuple[tuple[int, str], R]:
    """Connect, run script(client) in a thread; returns (banner, script's result)."""

    def run() -> tuple[tuple[int, str], R]:
        client: smtplib.SMTP
        if implicit_tls:
            client = smtplib.SMTP_SSL(
                local_hostname=HELO, timeout=SOCK_TIMEOUT, context=unverified()
            )
        else:
            client = smtplib.SMTP(local_hostname=HELO, timeout=SOCK_TIMEOUT)
        # connect() (unlike the constructor) returns the banner, but leaves the host name used
        # for TLS empty; set it as the constructor would have.
        client._host = addr[0]  # type: ignore[attr-defined]
        try:
            code, msg = client.connect(*addr)
            return (code, msg.decode()), script(client)
        finally:
            client.close()

    return await in_thread(run)


def cmd(client: smtplib.SMTP, line: str) -> tuple[int, str]:
    # docmd, not mail()/rcpt(): smtplib's quoteaddr() would rewrite the odd forms under test.
    code, msg = client.docmd(line)
    return code, msg.decode()


def ehlo(client: smtplib.SMTP) -> tuple[int, str]:
    code, msg = client.ehlo()
    return code, msg.decode()


def raw_exchange(addr: Addr, send: bytes, *, timeout: float = 1.0) -> bytes:
    """Connect, send, then read until EOF or timeout; returns everything read."""
    with socket.create_connection(addr, timeout=SOCK_TIMEOUT) as sock:
        sock.settimeout(timeout)
        if send:
            sock.sendall(send)
        out = b""
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                out += chunk
        return out


# -- recipient resolution (pure) ---------------------------------------------------------------


def test_resolve_recipient_extracts_the_external_address_from_every_odd_form() -> None:
    own = frozenset({T, "[127.0.9.1]", "campus.test"})
    for form in odd_forms("127.0.9.1"):
        assert resolve_recipient(form, own) == (RecipientKind.EXTERNAL, OUTSIDE), form
    assert resolve_recipient("u@campus.test", own)[0] is RecipientKind.LOCAL
    assert resolve_recipient("u%campus.test@" + T, own)[0] is RecipientKind.LOCAL
    assert resolve_recipient("postmaster", own)[0] is RecipientKind.LOCAL
    assert resolve_recipient("", own)[0] is RecipientKind.BAD
    assert resolve_recipient("u@d@elsewhere.test", own)[0] is RecipientKind.BAD


# -- banner and EHLO ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "starttls", "auth"),
    [
        (Behaviour.OPEN_RELAY, False, False),
        (Behaviour.CLOSED, False, False),
        (Behaviour.CAMPUS_SENDER, False, False),
        (Behaviour.PERCENT_HACK, False, False),
        (Behaviour.AUTH_REQUIRED, False, True),
        (Behaviour.TLS_REQUIRED, True, False),
        (Behaviour.RELAY_AFTER_STARTTLS, True, False),
        (Behaviour.ACCEPT_ALL_DISCARD, False, False),
        (Behaviour.ODD_FORMS_LOCAL, False, False),
        (Behaviour.GREYLIST, False, False),
        (Behaviour.AUTH_NO_TLS, False, True),
    ],
)
async def test_banner_and_ehlo_capabilities(
    behaviour: Behaviour, starttls: bool, auth: bool
) -> None:
    async with running(behaviour) as (_, addr):
        banner, (reply, features) = await talk(addr, lambda c: (ehlo(c), dict(c.esmtp_features)))
    assert banner == (220, f"{T} ESMTP relaylab")
    assert reply[0] == 250
    assert reply[1].splitlines()[0] == T
    assert features["size"] == "10240000"
    assert "pipelining" in features
    assert "8bitmime" in features
    assert ("starttls" in features) is starttls
    assert ("auth" in features) is auth
    if auth:
        assert features["auth"].split() == ["PLAIN", "LOGIN"]


# -- relay behaviours --------------------------------------------------------------------------


async def test_open_relay_accepts_plain_and_odd_forms_and_records_deliveries() -> None:
    ip = "127.0.9.1"
    forms = [OUTSIDE, *odd_forms(ip)]
    async with running(Behaviour.OPEN_RELAY, host=ip) as (lab, addr):

        def script(c: smtplib.SMTP) -> list[tuple[int, str]]:
            ehlo(c)
            replies = [cmd(c, "MAIL FROM:<f@elsewhere.test>")]
            replies += [cmd(c, f"RCPT TO:<{form}>") for form in forms]
            replies.append(cmd(c, "RCPT TO:<postmaster>"))  # local: accepted, not relayed
            code, msg = c.data(b"Subject: t\r\n\r\nbody\r\n")
            replies.append((code, msg.decode()))
            return replies

        _, replies = await talk(addr, script)
    assert all(code == 250 for code, _ in replies), replies
    assert [d.rcpt for d in lab.delivered] == [OUTSIDE] * len(forms)
    assert {d.server for d in lab.delivered} == {addr}
    assert {d.mail_from for d in lab.delivered} == {"f@elsewhere.test"}
    assert lab.delivered[0].data == b"Subject: t\r\n\r\nbody\r\n"
    assert lab.accepted_data == 1


async def test_closed_accepts_only_local_recipients() -> None:
    async with running(Behaviour.CLOSED) as (lab, addr):

        def script(c: smtplib.SMTP) -> list[tuple[int, str]]:
            ehlo(c)
            cmd(c, "MAIL FROM:<f@outside.test>")
            return [
                cmd(c, f"RCPT TO:<{OUTSIDE}>"),
                cmd(c, f"RCPT TO:<u%outside.test@[{addr[0]}]>"),
                cmd(c, f"RCPT TO:<{CAMPUS_RCPT}>"),
                cmd(c, f"RCPT TO:<u@{T}>"),
                cmd(c, "RCPT TO:<postmaster>"),
            ]

        _, replies = await talk(addr, script)
    assert replies[0] == (554, f"5.7.1 <{OUTSIDE}>: Relay access denied")
    assert replies[1][0] == 554
    assert [code for code, _ in replies[2:]] == [250, 250, 250]
    assert lab.delivered == []


async def test_campus_sender_relays_only_for_campus_senders() -> None:
    async with running(Behaviour.CAMPUS_SENDER) as (lab, addr):

        def script(c: smtplib.SMTP) -> list[tuple[int, str]]:
            ehlo(c)
            out = [cmd(c, "MAIL FROM:<f@outside.test>"), cmd(c, f"RCPT TO:<{OUTSIDE}>")]
            out += [cmd(c, "RSET"), cmd(c, "MAIL FROM:<Postmaster@CAMPUS.test>")]
            out.append(cmd(c, f"RCPT TO:<{OUTSIDE}>"))
            code, msg = c.data(b"x\r\n")
            out.append((code, msg.decode()))
            return out

        _, replies = await talk(addr, script)
    assert [code for code, _ in replies] == [250, 554, 250, 250, 250, 250]
    assert [(d.mail_from, d.rcpt) for d in lab.delivered] == [("Postmaster@CAMPUS.test", OUTSIDE)]


async def test_percent_hack_relays_only_the_percent_forms() -> None:
    ip = "127.0.9.2"
    async with running(Behaviour.PERCENT_HACK, host=ip) as (lab, addr):

        def script(c: smtplib.SMTP) -> list[int]:
            ehlo(c)
            cmd(c, "MAIL FROM:<f@outside.test>")
            codes = [
                cmd(c, f"RCPT TO:<{OUTSIDE}>")[0],
                cmd(c, f'RCPT TO:<"{OUTSIDE}">')[0],
                cmd(c, f"RCPT TO:<{OUTSIDE}@[{ip}]>")[0],
                cmd(c, f"RCPT TO:<u%outside.test@[{ip}]>")[0],
                cmd(c, "RCPT TO:<v%outside.test@MX.Campus.Test>")[0],
            ]
            codes.append(c.data(b"x\r\n")[0])
            return codes

        _, codes = await talk(addr, script)
    assert codes == [554, 554, 554, 250, 250, 250]
    assert [d.rcpt for d in lab.delivered] == [OUTSIDE, "v@outside.test"]


async def test_auth_required_refuses_mail_and_every_login() -> None:
    async with running(Behaviour.AUTH_REQUIRED) as (lab, addr):

        def script(c: smtplib.SMTP) -> list[tuple[int, str]]:
            ehlo(c)
            return [
                cmd(c, "MAIL FROM:<f@outside.test>"),
                cmd(c, f"RCPT TO:<{OUTSIDE}>"),
                cmd(c, "AUTH PLAIN AGZvbwBiYXI="),
            ]

        _, replies = await talk(addr, script)
    assert replies[0] == (530, "5.7.0 Authentication required")
    assert replies[1] == (503, "5.5.1 Error: need MAIL command")
    assert replies[2][0] == 535
    assert lab.delivered == []


async def test_tls_required_refuses_mail_before_starttls_and_is_closed_after() -> None:
    async with running(Behaviour.TLS_REQUIRED) as (lab, addr):

        def script(c: smtplib.SMTP) -> list[Any]:
            ehlo(c)
            out: list[Any] = [cmd(c, "MAIL FROM:<f@outside.test>")]
            code, msg = c.starttls(context=unverified())
            out.append((code, msg.decode()))
            out.append(ehlo(c))
            out.append("starttls" in c.esmtp_features)
            out.append(cmd(c, "MAIL FROM:<f@outside.test>"))
            out.append(cmd(c, f"RCPT TO:<{OUTSIDE}>"))
            out.append(cmd(c, f"RCPT TO:<{CAMPUS_RCPT}>"))
            out.append(cmd(c, "STARTTLS"))
            return out

        _, out = await talk(addr, script)
    assert out[0] == (530, "5.7.0 Must issue a STARTTLS command first")
    assert out[1] == (220, "2.0.0 Ready to start TLS")
    assert out[2][0] == 250
    assert out[3] is False  # not offered again under TLS
    assert out[4][0] == 250
    assert out[5][0] == 554
    assert out[6][0] == 250
    assert out[7][0] == 554
    assert lab.delivered == []


async def test_relay_after_starttls_is_closed_in_plaintext_and_open_under_tls() -> None:
    async with running(Behaviour.RELAY_AFTER_STARTTLS) as (lab, addr):

        def script(c: smtplib.SMTP) -> list[int]:
            ehlo(c)
            codes = [cmd(c, "MAIL FROM:<f@outside.test>")[0], cmd(c, f"RCPT TO:<{OUTSIDE}>")[0]]
            codes.append(c.starttls(context=unverified())[0])
            ehlo(c)
            # STARTTLS reset the transaction: RCPT without a new MAIL is out of sequence.
            codes.append(cmd(c, f"RCPT TO:<{OUTSIDE}>")[0])
            codes += [cmd(c, "MAIL FROM:<f@outside.test>")[0], cmd(c, f"RCPT TO:<{OUTSIDE}>")[0]]
            codes.append(c.data(b"x\r\n")[0])
            return codes

        _, codes = await talk(addr, script)
    assert codes == [250, 554, 220, 503, 250, 250, 250]
    assert [d.rcpt for d in lab.delivered] == [OUTSIDE]


async def test_accept_all_discard_accepts_everything_and_delivers_nothing() -> None:
    async with running(Behaviour.ACCEPT_ALL_DISCARD) as (lab, addr):

        def script(c: smtplib.SMTP) -> list[int]:
            ehlo(c)
            codes = [cmd(c, "MAIL FROM:<f@outside.test>")[0]]
            rcpt = f"{uuid.uuid4().hex}@{uuid.uuid4().hex}.invalid"
            codes += [cmd(c, f"RCPT TO:<{rcpt}>")[0], cmd(c, f"RCPT TO:<{OUTSIDE}>")[0]]
            codes.append(c.data(b"x\r\n")[0])
            return codes

        _, codes = await talk(addr, script)
    assert codes == [250, 250, 250, 250]
    assert lab.delivered == []
    assert lab.accepted_data == 1


async def test_odd_forms_local_refuses_plain_and_takes_odd_forms_as_local() -> None:
    ip = "127.0.9.3"
    async with running(Behaviour.ODD_FORMS_LOCAL, host=ip) as (lab, addr):

        def script(c: smtplib.SMTP) -> list[tuple[int, str]]:
            ehlo(c)
            cmd(c, "MAIL FROM:<f@outside.test>")
            replies = [cmd(c, f"RCPT TO:<{OUTSIDE}>")]
            replies += [cmd(c, f"RCPT TO:<{form}>") for form in odd_forms(ip)]
            code, msg = c.data(b"x\r\n")
            replies.append((code, msg.decode()))
            return replies

        _, replies = await talk(addr, script)
    assert replies[0] == (550, "Invalid recipient")
    assert all(code == 250 for code, _ in replies[1:]), replies
    assert lab.delivered == []
    assert lab.accepted_data == 1


async def test_greylist_defers_every_non_local_recipient() -> None:
    async with running(Behaviour.GREYLIST) as (lab, addr):

        def script(c: smtplib.SMTP) -> list[tuple[int, str]]:
            ehlo(c)
            cmd(c, "MAIL FROM:<f@outside.test>")
            return [
                cmd(c, f"RCPT TO:<{OUTSIDE}>"),
                cmd(c, f"RCPT TO:<u%outside.test@{T}>"),
                cmd(c, f"RCPT TO:<{CAMPUS_RCPT}>"),
            ]

        _, replies = await talk(addr, script)
    assert replies[0] == (451, "4.7.1 Greylisted, try again later")
    assert replies[1][0] == 451
    assert replies[2][0] == 250
    assert lab.delivered == []


async def test_auth_no_tls_is_closed() -> None:
    async with running(Behaviour.AUTH_NO_TLS) as (lab, addr):

        def script(c: smtplib.SMTP) -> list[int]:
            ehlo(c)
            return [
                cmd(c, "MAIL FROM:<f@outside.test>")[0],
                cmd(c, f"RCPT TO:<{OUTSIDE}>")[0],
                cmd(c, "STARTTLS")[0],
            ]

        _, codes = await talk(addr, script)
    assert codes == [250, 554, 502]
    assert lab.delivered == []


async def test_helo_only_refuses_ehlo_and_relays_after_helo() -> None:
    async with running(Behaviour.HELO_ONLY) as (_, addr):

        def script(c: smtplib.SMTP) -> list[tuple[int, str]]:
            out = [ehlo(c)]
            code, msg = c.helo()
            out.append((code, msg.decode()))
            out += [cmd(c, "MAIL FROM:<f@outside.test>"), cmd(c, f"RCPT TO:<{OUTSIDE}>")]
            return out

        _, replies = await talk(addr, script)
    assert replies[0] == (502, "5.5.2 Error: command not recognized")
    assert replies[1] == (250, T)
    assert [code for code, _ in replies[2:]] == [250, 250]


async def test_not_smtp_is_silent_then_answers_http_400_and_closes() -> None:
    async with running(Behaviour.NOT_SMTP) as (_, addr):
        assert await in_thread(lambda: raw_exchange(addr, b"", timeout=0.3)) == b""
        reply = await in_thread(lambda: raw_exchange(addr, b"EHLO x\r\n", timeout=SOCK_TIMEOUT))
    assert reply == b"HTTP/1.1 400 Bad Request\r\n\r\n"  # and EOF came before the timeout


async def test_tarpit_never_sends_a_banner() -> None:
    async with running(Behaviour.TARPIT) as (lab, addr):
        assert await in_thread(lambda: raw_exchange(addr, b"EHLO x\r\n", timeout=0.5)) == b""
        assert lab.accepted_data == 0


async def test_implicit_tls_speaks_smtp_inside_tls_with_a_self_signed_certificate() -> None:
    async with running(Behaviour.TLS_REQUIRED, implicit_tls=True, hostname="smtps.campus.test") as (
        _,
        addr,
    ):

        def script(c: smtplib.SMTP) -> tuple[Any, ...]:
            reply = ehlo(c)
            assert isinstance(c.sock, ssl.SSLSocket)
            der = c.sock.getpeercert(binary_form=True)
            return reply, "starttls" in c.esmtp_features, der, cmd(c, "MAIL FROM:<f@o.test>")[0]

        banner, (reply, starttls, der, mail) = await talk(addr, script, implicit_tls=True)
    assert banner == (220, "smtps.campus.test ESMTP relaylab")
    assert reply[0] == 250
    assert starttls is False
    assert mail == 250  # TLS from the first byte satisfies TLS_REQUIRED
    cert = x509.load_der_x509_certificate(der)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "smtps.campus.test"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < timedelta(days=2)


async def test_starttls_discards_commands_pipelined_in_plaintext() -> None:
    async with running(Behaviour.RELAY_AFTER_STARTTLS) as (_, addr):

        def run() -> bytes:
            with socket.create_connection(addr, timeout=SOCK_TIMEOUT) as sock:
                f = sock.makefile("rb")
                f.readline()  # banner
                sock.sendall(b"STARTTLS\r\nNOOP\r\n")  # NOOP is an injection attempt
                assert f.readline().startswith(b"220 2.0.0")
                with unverified().wrap_socket(sock) as tls:
                    tls.settimeout(0.5)
                    with contextlib.suppress(TimeoutError):
                        return tls.recv(1024)  # the injected NOOP must not be answered
                    return b""

        assert await in_thread(run) == b""


# -- Postfix error limits and delays -----------------------------------------------------------


async def test_error_limits_slow_down_then_hang_up_after_twenty_refusals() -> None:
    sleep = 0.05
    async with running(Behaviour.CLOSED, error_limits=True, error_sleep=sleep) as (_, addr):

        def script(c: smtplib.SMTP) -> tuple[list[tuple[int, str]], float, float, bool]:
            ehlo(c)
            cmd(c, "MAIL FROM:<f@outside.test>")
            t0 = time.monotonic()
            replies = [cmd(c, f"RCPT TO:<u{i}@outside.test>") for i in range(10)]
            t1 = time.monotonic()
            replies += [cmd(c, f"RCPT TO:<u{i}@outside.test>") for i in range(10, 21)]
            t2 = time.monotonic()
            try:
                c.noop()
            except (smtplib.SMTPServerDisconnected, OSError):
                closed = True
            else:
                closed = False
            return replies, t1 - t0, t2 - t1, closed

        _, (replies, fast, slow, closed) = await talk(addr, script)
    assert [code for code, _ in replies[:20]] == [554] * 20
    assert replies[20] == (421, f"4.7.0 {T} Error: too many errors")
    assert closed
    assert fast < 10 * sleep
    assert slow >= 10 * sleep


async def test_without_error_limits_refusals_never_hang_up() -> None:
    async with running(Behaviour.CLOSED) as (_, addr):

        def script(c: smtplib.SMTP) -> list[int]:
            ehlo(c)
            cmd(c, "MAIL FROM:<f@outside.test>")
            return [cmd(c, f"RCPT TO:<u{i}@outside.test>")[0] for i in range(25)] + [c.noop()[0]]

        _, codes = await talk(addr, script)
    assert codes == [554] * 25 + [250]


async def test_reply_delay_applies_to_each_reply_and_keeps_pipelined_order() -> None:
    delay = 0.05
    async with running(Behaviour.OPEN_RELAY, reply_delay=delay) as (_, addr):

        def run() -> tuple[bytes, float]:
            t0 = time.monotonic()
            out = raw_exchange(addr, b"EHLO a\r\nNOOP\r\nVRFY x\r\nQUIT\r\n", timeout=SOCK_TIMEOUT)
            return out, time.monotonic() - t0

        out, elapsed = await in_thread(run)
    codes = [line[:4] for line in out.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"220 ", b"250 ", b"250 ", b"252 ", b"221 "]
    assert elapsed >= 5 * delay


# -- protocol details --------------------------------------------------------------------------


async def test_sequence_syntax_and_misc_commands() -> None:
    async with running(Behaviour.CLOSED) as (_, addr):

        def script(c: smtplib.SMTP) -> list[tuple[int, str]]:
            ehlo(c)
            return [
                cmd(c, f"RCPT TO:<{CAMPUS_RCPT}>"),  # 0
                cmd(c, "DATA"),  # 1
                cmd(c, "MAIL FROM:f@outside.test"),  # 2 no angle brackets
                cmd(c, "MAIL FROM:<f@outside.test> SIZE=100 BODY=8BITMIME"),  # 3
                cmd(c, "MAIL FROM:<f@outside.test>"),  # 4 nested
                cmd(c, "DATA"),  # 5
                cmd(c, "RCPT TO:<>"),  # 6
                cmd(c, "VRFY root"),  # 7
                cmd(c, "NOOP"),  # 8
                cmd(c, "RSET"),  # 9
                cmd(c, f"RCPT TO:<{CAMPUS_RCPT}>"),  # 10 after RSET
                cmd(c, "XYZZY"),  # 11
                cmd(c, "X" * 5000),  # 12
                cmd(c, "mail from:<>"),  # 13 lower case, null sender
                cmd(c, "HELO"),  # 14
                cmd(c, "AUTH PLAIN x"),  # 15
            ]

        _, r = await talk(addr, script)
    assert r[0] == (503, "5.5.1 Error: need MAIL command")
    assert r[1] == (503, "5.5.1 Error: need MAIL command")
    assert r[2][0] == 501
    assert r[3][0] == 250
    assert r[4][0] == 503
    assert r[5] == (503, "5.5.1 Error: need RCPT command")
    assert r[6][0] == 501
    assert r[7][0] == 252
    assert r[8][0] == 250
    assert r[9][0] == 250
    assert r[10][0] == 503
    assert r[11] == (502, "5.5.2 Error: command not recognized")
    assert r[12] == (500, "5.5.0 Line too long")
    assert r[13][0] == 250
    assert r[14][0] == 501
    assert r[15][0] == 503


async def test_data_is_dot_unstuffed_and_capped() -> None:
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\tdot tab\r\nend\r\n"
    async with running(Behaviour.OPEN_RELAY) as (lab, addr):

        def script(c: smtplib.SMTP) -> list[int]:
            ehlo(c)
            codes = [cmd(c, "MAIL FROM:<>")[0], cmd(c, f"RCPT TO:<{OUTSIDE}>")[0]]
            codes.append(c.data(body)[0])  # smtplib dot-stuffs; the lab must undo it
            codes += [cmd(c, "MAIL FROM:<>")[0], cmd(c, f"RCPT TO:<{OUTSIDE}>")[0]]
            codes.append(c.data(b"x" * 1000 + b"\r\n" + b"y" * (MAX_MESSAGE + 10) + b"\r\n")[0])
            codes.append(c.noop()[0])
            return codes

        _, codes = await talk(addr, script)
    assert codes == [250, 250, 250, 250, 250, 552, 250]
    assert len(lab.delivered) == 1
    assert lab.delivered[0].data == body
    assert lab.delivered[0].mail_from == ""
    assert lab.accepted_data == 1


# -- delivery to a loopback mx -----------------------------------------------------------------


async def test_open_relay_forwards_to_the_configured_loopback_mx(
    smtp_sink: tuple[MessageSink, int],
) -> None:
    sink, mx_port = smtp_sink
    mx_addr = ("127.0.0.1", mx_port)
    token = uuid.uuid4().hex
    message = f"Subject: canary {token}\r\n\r\n.token {token}\r\n".encode()
    async with running(Behaviour.OPEN_RELAY, mx={"Canary.Test": mx_addr}) as (lab, addr):

        def script(c: smtplib.SMTP) -> list[int]:
            ehlo(c)
            codes = [cmd(c, "MAIL FROM:<>")[0]]
            codes.append(cmd(c, f"RCPT TO:<inbox%canary.test@[{addr[0]}]>")[0])
            codes.append(cmd(c, f"RCPT TO:<{OUTSIDE}>")[0])  # no mx: recorded, never contacted
            codes.append(c.data(message)[0])
            return codes

        _, codes = await talk(addr, script)
        assert codes == [250, 250, 250, 250]
        deadline = time.monotonic() + 10.0
        while not sink.messages and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    assert [d.rcpt for d in lab.delivered] == ["inbox@canary.test", OUTSIDE]
    assert lab.forward_failures == []
    assert len(sink.messages) == 1
    mail_from, rcpts, content = sink.messages[0]
    assert mail_from == "<>"  # aiosmtpd's spelling of the null sender
    assert rcpts == ["inbox@canary.test"]
    assert content.startswith(b"Received: from " + HELO.encode())
    assert b"(relaylab)" in content
    assert content.endswith(message)


async def test_forward_failure_is_recorded_and_stop_is_bounded() -> None:
    with socket.socket() as probe:  # a loopback port with nobody listening
        probe.bind(("127.0.0.1", 0))
        dead = ("127.0.0.1", probe.getsockname()[1])
    async with running(Behaviour.OPEN_RELAY, mx={"canary.test": dead}) as (lab, addr):

        def script(c: smtplib.SMTP) -> int:
            ehlo(c)
            cmd(c, "MAIL FROM:<f@o.test>")
            cmd(c, "RCPT TO:<inbox@canary.test>")
            return c.data(b"x\r\n")[0]

        _, code = await talk(addr, script)
        t0 = time.monotonic()
    assert code == 250
    assert time.monotonic() - t0 < 11.0
    assert [d.rcpt for d, _ in lab.forward_failures] == ["inbox@canary.test"]


# -- lifecycle and configuration ---------------------------------------------------------------


async def test_many_listeners_in_one_lab() -> None:
    behaviours = list(Behaviour)
    specs = [ServerSpec(f"127.0.9.{10 + i}", 0, behaviours[i % len(behaviours)]) for i in range(60)]
    async with Lab(specs) as lab:
        addrs = [lab.address_of(i) for i in range(len(specs))]
        assert len({a for a in addrs}) == len(specs)
        assert all(a[0] == s.host and a[1] > 0 for a, s in zip(addrs, specs, strict=True))
        smtp = [a for a, s in zip(addrs, specs, strict=True) if s.behaviour is Behaviour.CLOSED]
        banners = await asyncio.gather(
            *(in_thread(functools.partial(raw_exchange, a, b"QUIT\r\n")) for a in smtp)
        )
    assert all(b.startswith(b"220 mx.campus.test ESMTP relaylab\r\n221") for b in banners)


async def test_start_failure_names_the_address_and_releases_bound_ports() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.9.5", 0))
        holder.listen()
        port = holder.getsockname()[1]
        lab = Lab(
            [
                ServerSpec("127.0.9.6", 0, Behaviour.CLOSED),
                ServerSpec("127.0.9.5", port, Behaviour.CLOSED),
            ]
        )
        with pytest.raises(OSError, match=rf"127\.0\.9\.5:{port}"):
            await lab.start()
    with pytest.raises(RuntimeError):
        lab.address_of(0)


@pytest.mark.parametrize(
    ("specs", "mx"),
    [
        ([ServerSpec("10.0.0.1", 25, Behaviour.CLOSED)], {}),
        ([ServerSpec("localhost", 25, Behaviour.CLOSED)], {}),
        ([ServerSpec("0.0.0.0", 25, Behaviour.CLOSED)], {}),
        ([ServerSpec("127.0.0.1", 70000, Behaviour.CLOSED)], {}),
        ([ServerSpec("127.0.0.1", 0, Behaviour.CLOSED, hostname="a b")], {}),
        ([], {"canary.test": ("192.0.2.1", 25)}),
        ([], {"canary.test": ("mx.canary.test", 25)}),
    ],
)
def test_non_loopback_configuration_is_refused(
    specs: list[ServerSpec], mx: dict[str, tuple[str, int]]
) -> None:
    with pytest.raises(ConfigError):
        Lab(specs, mx=mx)


async def test_stop_closes_open_connections() -> None:
    for behaviour in (Behaviour.CLOSED, Behaviour.TARPIT):
        lab = Lab([ServerSpec("127.0.0.1", 0, behaviour)])
        await lab.start()
        addr = lab.address_of(0)

        def connect(a: Addr = addr) -> socket.socket:
            return socket.create_connection(a, timeout=SOCK_TIMEOUT)

        sock = await in_thread(connect)
        try:
            deadline = time.monotonic() + SOCK_TIMEOUT
            while lab.connections == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert lab.connections == 1
            await asyncio.wait_for(lab.stop(), 5.0)
            assert lab.connections == 0

            def drain(s: socket.socket = sock) -> bytes:
                out = b""
                try:
                    while chunk := s.recv(4096):
                        out += chunk
                except ConnectionResetError:
                    pass
                return out

            await in_thread(drain)  # returns (EOF or reset) instead of timing out
        finally:
            sock.close()


async def test_flight_delay_holds_each_flight_once_and_answers_a_group_together() -> None:
    """A network's latency: the replies to a pipelined group come back one flight later, together
    (where reply_delay, a slow server, delays each reply)."""
    spec = ServerSpec(host="127.0.0.1", port=0, behaviour=Behaviour.CLOSED, flight_delay=0.2)
    async with Lab([spec]) as lab:
        host, port = lab.address_of(0)
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(host, port)
        banner = await reader.readline()
        assert banner.startswith(b"220 ") and time.monotonic() - started >= 0.19
        writer.write(b"EHLO a.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
        sent = time.monotonic()
        lines = [await reader.readline() for _ in range(6)]
        elapsed = time.monotonic() - sent
        writer.close()
    assert lines[-2].startswith(b"250 ") and lines[-1].startswith(b"554 "), lines
    assert 0.19 <= elapsed < 0.39, elapsed  # one flight for the whole group, not three
