"""The claimed-identity sessions (claims.py, issue 27) replayed from scripted server bytes, no sockets."""

from __future__ import annotations

import pytest
from replay import ReplayDial

from relayaudit.battery import BatteryInputs, claim_tests, helo_claims, xclient_claims
from relayaudit.claims import run_claims
from relayaudit.evidence import Claim, TestOutcome, TestResult, Transport
from relayaudit.handshake import Handshake
from relayaudit.runner import Limits
from relayaudit.session import Observed, Session
from relayaudit.settings import ProbeSettings

ADDRESS = "127.0.0.1"
SETTINGS = ProbeSettings(helo_name="relayaudit.invalid", session_timeout=5, command_timeout=1)
INPUTS = BatteryInputs(
    address=ADDRESS,
    hostname="mx.campus.test",
    campus_domains=("campus.test",),
    external_domains=("outside.test",),
    external_local_part="relaytest",
    sender_local_part="relayaudit",
)
LIMITS = Limits(tests_per_session=8, parallel_sessions=1, reconnects=6)


def group(*lines: str) -> tuple[str, bytes]:
    """What a pipelined client writes at once."""
    return ("c", b"".join(line.encode() + b"\r\n" for line in lines))


async def run(
    connections: list[list[tuple[str, bytes]]], claims: list[Claim]
) -> tuple[list[TestResult], Observed, ReplayDial]:
    seen = Observed(helo=SETTINGS.helo_name, vantage=ADDRESS)
    dial = ReplayDial(connections, (ADDRESS, 25))
    handshake = Handshake(ADDRESS, 25, SETTINGS, gate=None, observed=seen, dial=dial)

    async def opener(transport: Transport, claim: Claim) -> Session:
        return await handshake.open(transport, claim=claim)

    results: list[TestResult] = []
    await run_claims(
        [(c, claim_tests(INPUTS, c)) for c in claims],
        Transport.PLAIN,
        opener=opener,
        limits=LIMITS,
        results=results,
    )
    return results, seen, dial


@pytest.mark.usefixtures("no_sockets")
async def test_xclient_is_answered_by_a_new_greeting_then_a_new_ehlo_and_a_pipelined_test() -> None:
    loopback = xclient_claims(INPUTS)[0]
    assert str(loopback) == "XCLIENT ADDR=127.0.0.1"
    session = [
        ("s", b"220 mx.campus.test ESMTP Postfix\r\n"),
        ("c", b"EHLO relayaudit.invalid\r\n"),
        ("s", b"250-mx.campus.test\r\n250-PIPELINING\r\n250 XCLIENT NAME ADDR PROTO HELO\r\n"),
        ("c", b"XCLIENT ADDR=127.0.0.1\r\n"),
        ("s", b"220 mx.campus.test ESMTP Postfix\r\n"),  # greeted again, as the claimed client
        ("c", b"EHLO relayaudit.invalid\r\n"),
        ("s", b"250-mx.campus.test\r\n250 PIPELINING\r\n"),
        group("MAIL FROM:<relayaudit@outside.test>", "RCPT TO:<relaytest@outside.test>", "QUIT"),
        ("s", b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n221 2.0.0 Bye\r\n"),
    ]
    results, seen, dial = await run([session], [loopback])
    assert [(r.test.id, r.outcome) for r in results] == [
        ("xclient-loopback-plain", TestOutcome.ACCEPTED)
    ]
    assert results[0].test.claim == loopback
    assert dial.unused == 0 and seen.sessions == 1 and seen.pipelined
    assert seen.helo == "relayaudit.invalid"
    note = seen.transcript[1]
    assert note.command is None and note.error is not None
    assert "XCLIENT ADDR=127.0.0.1" in note.error and "does not introduce itself" in note.error


@pytest.mark.usefixtures("no_sockets")
async def test_a_refused_claimed_name_leaves_its_tests_as_errors_and_the_next_name_runs() -> None:
    host, campus, literal = helo_claims(INPUTS, own_helo=SETTINGS.helo_name)
    assert (host.value, campus.value, literal.value) == (
        "mx.campus.test",
        "mail.campus.test",
        "[127.0.0.1]",
    )
    refused = [
        ("s", b"220 mx.campus.test ESMTP\r\n"),
        ("c", b"EHLO mx.campus.test\r\n"),
        ("s", b"550 5.7.1 you are not me\r\n"),
        ("c", b"HELO mx.campus.test\r\n"),
        ("s", b"550 5.7.1 you are not me\r\n"),
    ]
    relays = [
        ("s", b"220 mx.campus.test ESMTP\r\n"),
        ("c", b"EHLO mail.campus.test\r\n"),  # lock-step: no PIPELINING offered
        ("s", b"250 mx.campus.test\r\n"),
        ("c", b"MAIL FROM:<relayaudit@outside.test>\r\n"),
        ("s", b"250 2.1.0 Ok\r\n"),
        ("c", b"RCPT TO:<relaytest@outside.test>\r\n"),
        ("s", b"250 2.1.5 Ok\r\n"),
        ("c", b"RSET\r\n"),
        ("s", b"250 2.0.0 Ok\r\n"),
        ("c", b"MAIL FROM:<postmaster@campus.test>\r\n"),
        ("s", b"250 2.1.0 Ok\r\n"),
        ("c", b"RCPT TO:<relaytest@outside.test>\r\n"),
        ("s", b"250 2.1.5 Ok\r\n"),
        ("c", b"QUIT\r\n"),
        ("s", b"221 2.0.0 Bye\r\n"),
    ]
    # the literal's session is never opened: the campus name relayed, which is the finding
    results, _, dial = await run([refused, relays], [host, campus, literal])
    assert [(r.test.id, r.outcome) for r in results] == [
        ("helo-host-plain", TestOutcome.ERROR),
        ("helo-host-campus-sender", TestOutcome.ERROR),
        ("helo-campus-plain", TestOutcome.ACCEPTED),
        ("helo-campus-campus-sender", TestOutcome.ACCEPTED),
    ]
    assert results[0].error is not None and "EHLO mx.campus.test" in results[0].error
    assert "550 5.7.1 you are not me" in results[0].error
    assert dial.unused == 0
