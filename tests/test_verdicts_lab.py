"""Every verdict against a real in-process SMTP server with that behaviour, on 127.0.0.0/8."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from factories import canary_target, probe_settings
from loopback import free_port

from relayaudit.canary import CanaryReceiver
from relayaudit.engine import await_confirmation
from relayaudit.evidence import PortState, ProbeResult, ProbeStatus, TestOutcome, Transport
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.probe import ProbeSettings, probe
from relayaudit.verdict import Confidence, FindingKind, Severity, Verdict, VerdictStatus, judge

CANARY_DOMAIN = "canary.campus.test"

SETTINGS = probe_settings(connect_timeout=2.0, command_timeout=3.0, session_timeout=30.0)

Probe = Callable[..., Awaitable[tuple[ProbeResult, Verdict]]]


@pytest.fixture
async def canary() -> AsyncIterator[CanaryReceiver]:
    async with CanaryReceiver("127.0.0.1", 0, domain=CANARY_DOMAIN) as receiver:
        yield receiver


@pytest.fixture
def run_lab(canary: CanaryReceiver, pipelining: bool) -> Probe:
    """Start one lab server with `behaviour`, probe it, judge the evidence (pipelined where the
    server offers it, and in lock-step: each test using this runs both ways)."""

    async def run(
        behaviour: Behaviour,
        *,
        confirm: bool = False,
        approved: bool = False,
        implicit_tls: bool = False,
        settings: ProbeSettings = SETTINGS,
        **spec: object,
    ) -> tuple[ProbeResult, Verdict]:
        server = ServerSpec(
            host="127.0.0.1",
            port=0,
            behaviour=behaviour,
            implicit_tls=implicit_tls,
            hostname="mx.campus.test",
            **spec,  # type: ignore[arg-type]
        )
        lab = Lab([server], mx={CANARY_DOMAIN: ("127.0.0.1", canary.port)})
        settings = dataclasses.replace(settings, pipelining=pipelining)
        if confirm:
            settings = dataclasses.replace(settings, canary=canary_target(CANARY_DOMAIN))
        async with lab:
            host, port = lab.address_of(0)
            result = await probe(
                host,
                port,
                settings,
                implicit_tls=implicit_tls,
                expect_token=canary.expect if confirm else None,
            )
            result = await await_confirmation(result, canary, 5.0)
        if result.tests and result.facts is not None and result.facts.pipelining:
            assert result.pipelined is pipelining, result.lockstep  # it did pipeline
        return result, judge(result, approved=approved)

    return run


def kinds(verdict: Verdict) -> set[FindingKind]:
    return {f.kind for f in verdict.findings}


def relay_finding(verdict: Verdict) -> tuple[FindingKind, Confidence, Severity]:
    (f,) = [
        f
        for f in verdict.findings
        if f.kind not in {FindingKind.UNAPPROVED_SMTP, FindingKind.AUTH_WITHOUT_TLS}
    ]
    return f.kind, f.confidence, f.severity


async def test_open_relay_confirmed_by_canary(run_lab: Probe) -> None:
    result, verdict = await run_lab(Behaviour.OPEN_RELAY, confirm=True)
    assert verdict.status is VerdictStatus.OPEN_RELAY
    assert relay_finding(verdict) == (
        FindingKind.OPEN_RELAY,
        Confidence.CONFIRMED,
        Severity.CRITICAL,
    )
    assert result.confirmation is not None and result.confirmation.delivered is True
    assert result.confirmation.test_id == "rcpt-plain"
    # the full battery ran: 15 recipient forms, the control, 7 sender forms (duplicates removed)
    assert len(result.tests) >= 22
    assert all(t.outcome is TestOutcome.ACCEPTED for t in result.tests)


async def test_open_relay_without_confirmation_is_weak_when_everything_is_accepted(
    run_lab: Probe,
) -> None:
    _, verdict = await run_lab(Behaviour.OPEN_RELAY)
    assert verdict.status is VerdictStatus.OPEN_RELAY
    # it also accepts the impossible .invalid control: acceptance alone is low confidence
    assert relay_finding(verdict) == (FindingKind.OPEN_RELAY, Confidence.LOW, Severity.MEDIUM)


async def test_closed_server_refuses_and_is_only_unapproved(run_lab: Probe) -> None:
    result, verdict = await run_lab(Behaviour.CLOSED)
    assert verdict.status is VerdictStatus.RELAY_REFUSED
    assert kinds(verdict) == {FindingKind.UNAPPROVED_SMTP}
    assert {t.outcome for t in result.tests} == {TestOutcome.REFUSED}
    assert not verdict.relay


async def test_approved_closed_server_has_no_findings(run_lab: Probe) -> None:
    _, verdict = await run_lab(Behaviour.CLOSED, approved=True)
    assert verdict.status is VerdictStatus.RELAY_REFUSED
    assert verdict.findings == ()


async def test_campus_sender_relay(run_lab: Probe) -> None:
    result, verdict = await run_lab(Behaviour.CAMPUS_SENDER, confirm=True)
    assert verdict.status is VerdictStatus.RELAY_CAMPUS_SENDER
    kind, confidence, _ = relay_finding(verdict)
    assert kind is FindingKind.RELAY_CAMPUS_SENDER and confidence is Confidence.CONFIRMED
    accepted = {t.test.id for t in result.tests if t.outcome is TestOutcome.ACCEPTED}
    assert accepted == {"sender-campus"}


async def test_percent_hack_relay(run_lab: Probe) -> None:
    _, verdict = await run_lab(Behaviour.PERCENT_HACK)
    assert verdict.status is VerdictStatus.OPEN_RELAY
    assert relay_finding(verdict) == (FindingKind.OPEN_RELAY, Confidence.MEDIUM, Severity.MEDIUM)
    result, verdict = await run_lab(Behaviour.PERCENT_HACK, confirm=True)
    assert relay_finding(verdict)[1] is Confidence.CONFIRMED
    assert result.confirmation is not None and result.confirmation.test_id.startswith(
        "rcpt-percent"
    )


async def test_accept_everything_trap_is_not_an_open_relay_when_confirmation_fails(
    run_lab: Probe,
) -> None:
    result, verdict = await run_lab(Behaviour.ACCEPT_ALL_DISCARD, confirm=True)
    assert verdict.status is VerdictStatus.ACCEPTS_WITHOUT_DELIVERY
    assert FindingKind.OPEN_RELAY not in kinds(verdict)
    assert relay_finding(verdict) == (
        FindingKind.ACCEPTS_WITHOUT_DELIVERY,
        Confidence.HIGH,
        Severity.LOW,
    )
    assert (
        result.confirmation is not None
        and result.confirmation.sent
        and result.confirmation.delivered is False
    )


async def test_a_canary_refused_at_data_gets_its_own_status_never_a_relay(run_lab: Probe) -> None:
    # every RCPT accepted (the control too), the message refused at the end of DATA: before
    # issue 20 the refused canary was ignored and this was reported as an open relay
    result, verdict = await run_lab(Behaviour.REFUSE_AT_DATA, confirm=True)
    assert verdict.status.value == "refuses-at-data"  # was "open-relay"
    conf = result.confirmation
    assert conf is not None and conf.refused and not conf.sent
    assert conf.data_reply is not None and conf.data_reply.code == 550
    assert verdict.status is VerdictStatus.REFUSES_AT_DATA
    assert not verdict.relay
    assert relay_finding(verdict) == (FindingKind.REFUSES_AT_DATA, Confidence.HIGH, Severity.LOW)
    (finding,) = [f for f in verdict.findings if f.kind is FindingKind.REFUSES_AT_DATA]
    assert "refused at DATA: 550 5.7.1 Relaying refused" in finding.summary
    assert conf.token in finding.summary and finding.confirmation_token == conf.token
    # the DATA exchange and its refusal are in the transcript an analyst reads
    assert any(
        ex.command is not None
        and ex.command.startswith("DATA")
        and ex.reply is not None
        and ex.reply.code == 550
        for ex in finding.transcript
    )
    # without confirmation the same server is only a weak (low) relay suspicion, as before
    _, verdict = await run_lab(Behaviour.REFUSE_AT_DATA)
    assert relay_finding(verdict) == (FindingKind.OPEN_RELAY, Confidence.LOW, Severity.MEDIUM)


async def test_odd_forms_taken_as_local_are_weak_evidence(run_lab: Probe) -> None:
    result, verdict = await run_lab(Behaviour.ODD_FORMS_LOCAL)
    plain = next(t for t in result.tests if t.test.id == "rcpt-plain")
    assert plain.outcome is TestOutcome.REFUSED
    assert relay_finding(verdict) == (FindingKind.OPEN_RELAY, Confidence.MEDIUM, Severity.MEDIUM)
    _, verdict = await run_lab(Behaviour.ODD_FORMS_LOCAL, confirm=True)
    assert verdict.status is VerdictStatus.ACCEPTS_WITHOUT_DELIVERY


async def test_auth_required(run_lab: Probe) -> None:
    result, verdict = await run_lab(Behaviour.AUTH_REQUIRED)
    assert verdict.status is VerdictStatus.AUTH_REQUIRED
    assert result.facts is not None and "PLAIN" in result.facts.auth_mechanisms


async def test_tls_required_and_starttls_facts(run_lab: Probe) -> None:
    result, verdict = await run_lab(Behaviour.TLS_REQUIRED)
    # every plain-text MAIL was refused for want of TLS; inside TLS the server is closed: the
    # port's answer is what the battery met there, and the summary says TLS comes first
    assert verdict.status is VerdictStatus.RELAY_REFUSED
    assert verdict.summary.startswith("The server requires STARTTLS before mail (e.g. 530 ")
    assert " After STARTTLS: all " in verdict.summary
    facts = result.facts
    assert facts is not None and facts.starttls
    assert facts.tls is not None and facts.tls.error is None
    assert facts.tls.protocol is not None and facts.tls.protocol.startswith("TLS")
    assert facts.tls.self_signed is True and facts.tls.subject == "CN=mx.campus.test"
    # the battery ran again after STARTTLS and was refused there too
    assert any(
        t.transport is Transport.STARTTLS and t.outcome is TestOutcome.REFUSED for t in result.tests
    )
    # the EHLO inside TLS is kept beside the plain one
    assert facts.after_starttls is not None
    assert "starttls" in facts.capabilities and "starttls" not in facts.after_starttls.capabilities


async def test_relay_only_after_starttls(run_lab: Probe) -> None:
    result, verdict = await run_lab(Behaviour.RELAY_AFTER_STARTTLS, confirm=True)
    assert verdict.status is VerdictStatus.RELAY_AFTER_STARTTLS
    kind, confidence, _ = relay_finding(verdict)
    assert kind is FindingKind.RELAY_AFTER_STARTTLS and confidence is Confidence.CONFIRMED
    plain = [t for t in result.tests if t.transport is Transport.PLAIN]
    assert plain and all(t.outcome is not TestOutcome.ACCEPTED for t in plain)


async def test_greylisting_is_inconclusive_never_closed(run_lab: Probe) -> None:
    _, verdict = await run_lab(Behaviour.GREYLIST)
    assert verdict.status is VerdictStatus.INCONCLUSIVE


async def test_auth_offered_without_tls(run_lab: Probe) -> None:
    _, verdict = await run_lab(Behaviour.AUTH_NO_TLS)
    assert verdict.status is VerdictStatus.RELAY_REFUSED
    assert FindingKind.AUTH_WITHOUT_TLS in kinds(verdict)


async def test_helo_fallback(run_lab: Probe) -> None:
    result, verdict = await run_lab(Behaviour.HELO_ONLY)
    assert result.facts is not None and result.facts.ehlo is False
    assert verdict.status is VerdictStatus.OPEN_RELAY


async def test_implicit_tls(run_lab: Probe) -> None:
    result, verdict = await run_lab(Behaviour.CLOSED, implicit_tls=True)
    assert verdict.status is VerdictStatus.RELAY_REFUSED
    assert result.facts is not None and result.facts.tls is not None and result.facts.tls.cipher
    assert {t.transport for t in result.tests} == {Transport.IMPLICIT_TLS}


async def test_tarpit_is_no_banner(run_lab: Probe) -> None:
    result, verdict = await run_lab(Behaviour.TARPIT)
    assert verdict.status is VerdictStatus.NO_BANNER
    assert result.port_state is PortState.OPEN


async def test_postfix_error_limits_reconnect_and_continue(run_lab: Probe) -> None:
    many = ProbeSettings(
        **{**{f: getattr(SETTINGS, f) for f in SETTINGS.__slots__}, "max_tests_per_session": 50}
    )
    result, verdict = await run_lab(
        Behaviour.CLOSED, settings=many, error_limits=True, error_sleep=0.01
    )
    # the server said 421 after 20 errors; relayaudit reconnected and finished the battery
    assert result.sessions >= 2
    assert any(ex.reply is not None and ex.reply.code == 421 for ex in result.transcript)
    assert all(t.outcome in {TestOutcome.REFUSED, TestOutcome.TEMPFAIL} for t in result.tests)
    assert verdict.status in {VerdictStatus.RELAY_REFUSED, VerdictStatus.INCONCLUSIVE}


async def test_short_sessions_stay_under_postfix_error_limits(run_lab: Probe) -> None:
    """Nine tests a session (the default): a closed server's nine refusals never take it past
    the soft limit (more than 10 errors), so no reply is slowed down and none hangs up."""
    result, verdict = await run_lab(Behaviour.CLOSED, error_limits=True, error_sleep=0.5)
    assert not any(ex.reply is not None and ex.reply.code == 421 for ex in result.transcript)
    assert max(ex.elapsed_ms for ex in result.transcript) < 500  # no error sleep
    assert result.sessions == 3 + 3  # 26 tests: 9, 9 and 8; then the 3 claimed HELO names
    assert verdict.status is VerdictStatus.RELAY_REFUSED


async def test_a_server_refusing_mail_gets_no_tenth_error_on_one_connection(run_lab: Probe) -> None:
    """Pipelined, a refused MAIL makes its blind RCPT an error too: with nine tests on the
    first connection that was a tenth error, and Postfix slowed the QUIT's reply by its error
    sleep. The error budget hands the ninth test to the next connection instead."""
    result, verdict = await run_lab(Behaviour.AUTH_REQUIRED, error_limits=True, error_sleep=0.5)
    assert not any(ex.reply is not None and ex.reply.code == 421 for ex in result.transcript)
    assert max(ex.elapsed_ms for ex in result.transcript) < 500  # no error sleep
    assert not any(t.error for t in result.tests)  # every test ran
    assert result.sessions == 3 + 3  # 8, 9 and 9 tests; then the 3 claimed HELO names
    assert verdict.status is VerdictStatus.AUTH_REQUIRED


# -- small hand-written servers for statuses the lab does not model ---------------------------


async def _one_line_server(line: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(line)
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_not_smtp_greeting() -> None:
    server, port = await _one_line_server(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
    async with server:
        result = await probe("127.0.0.1", port, SETTINGS)
    verdict = judge(result)
    assert verdict.status is VerdictStatus.NOT_SMTP
    assert verdict.findings == ()


async def test_session_refused_greeting_is_still_an_smtp_service() -> None:
    server, port = await _one_line_server(b"554 5.3.2 mx.campus.test no SMTP service here\r\n")
    async with server:
        result = await probe("127.0.0.1", port, SETTINGS)
    verdict = judge(result)
    assert verdict.status is VerdictStatus.SESSION_REFUSED
    assert kinds(verdict) == {FindingKind.UNAPPROVED_SMTP}


async def test_closed_port() -> None:
    result = await probe("127.0.0.1", free_port(), SETTINGS)
    assert result.status is ProbeStatus.CLOSED
    assert judge(result).status is VerdictStatus.CLOSED


async def test_filtered_port_when_the_listen_queue_drops_syns() -> None:
    # a listener that never accepts, with its backlog full, silently drops new SYNs on Linux:
    # the same thing a firewall's DROP looks like from outside
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        await asyncio.sleep(0.2)
        quick = ProbeSettings(
            helo_name="relayaudit.campus.test",
            connect_timeout=0.5,
            command_timeout=1,
            session_timeout=5,
        )
        result = await probe("127.0.0.1", port, quick)
    finally:
        for s in fillers:
            s.close()
        listener.close()
    if result.status is not ProbeStatus.FILTERED:
        pytest.skip(
            f"this kernel did not drop the SYN (got {result.status}); cannot emulate filtering here"
        )
    assert judge(result).status is VerdictStatus.FILTERED
