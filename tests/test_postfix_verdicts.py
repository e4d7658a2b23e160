"""Verdicts against real Postfix instances on loopback, one per relay policy (see postfix_lab)."""

from __future__ import annotations

import factories
import pytest
from factories import assert_names_its_fix, canary_target, probe_settings
from postfix_lab import CANARY_DOMAIN, SCANNER_SOURCE, PostfixInstance

from relayaudit.canary import CanaryReceiver
from relayaudit.engine import await_confirmation
from relayaudit.evidence import ProbeResult, TestOutcome, Transport
from relayaudit.probe import ProbeSettings, probe
from relayaudit.verdict import Confidence, FindingKind, Verdict, VerdictStatus, judge

# every test here runs twice: pipelined (Postfix offers PIPELINING) and in lock-step
pytestmark = [pytest.mark.postfix, pytest.mark.usefixtures("pipelining")]



def settings(*, confirm: bool = False) -> ProbeSettings:
    return probe_settings(
        # the scanner's vantage is outside every instance's mynetworks (127.0.0.1/32)
        source_address=SCANNER_SOURCE,
        connect_timeout=3.0,
        command_timeout=10.0,
        session_timeout=60.0,
        external_domains=("outside-b.test", "outside-a.test"),
        canary=canary_target(CANARY_DOMAIN) if confirm else None,
    )


async def check(
    instance: PostfixInstance, canary: CanaryReceiver | None = None
) -> tuple[ProbeResult, Verdict]:
    result = await probe(
        instance.host,
        instance.port,
        settings(confirm=canary is not None),
        expect_token=canary.expect if canary is not None else None,
    )
    result = await await_confirmation(result, canary, 30.0)
    if result.tests and result.facts is not None and result.facts.pipelining:
        assert result.pipelined is factories.PIPELINING, result.lockstep  # it did pipeline
    return result, judge(result)


def relay_kinds(verdict: Verdict) -> set[FindingKind]:
    return {f.kind for f in verdict.findings} - {
        FindingKind.UNAPPROVED_SMTP,
        FindingKind.AUTH_WITHOUT_TLS,
    }


async def test_closed_postfix_refuses_every_form(postfix_lab: dict[str, PostfixInstance]) -> None:
    result, verdict = await check(postfix_lab["closed"])
    assert result.facts is not None and result.facts.software == "Postfix"
    assert result.vantage == SCANNER_SOURCE
    assert verdict.status is VerdictStatus.RELAY_REFUSED, [
        (t.test.id, str(t.rcpt)) for t in result.tests
    ]
    assert relay_kinds(verdict) == set()
    plain = next(t for t in result.tests if t.test.id == "rcpt-plain")
    assert plain.outcome is TestOutcome.REFUSED and plain.rcpt is not None
    assert plain.rcpt.code == 554 and "Relay access denied" in plain.rcpt.text
    # short sessions: Postfix never reached its hard error limit
    assert not any(ex.reply is not None and ex.reply.code == 421 for ex in result.transcript)


async def test_open_postfix_is_an_open_relay_and_confirmed(
    postfix_lab: dict[str, PostfixInstance], canary: CanaryReceiver
) -> None:
    result, verdict = await check(postfix_lab["open"], canary)
    assert verdict.status is VerdictStatus.OPEN_RELAY
    (finding,) = [f for f in verdict.findings if f.kind is FindingKind.OPEN_RELAY]
    assert finding.confidence is Confidence.CONFIRMED, (result.confirmation, finding.summary)
    assert result.confirmation is not None and result.confirmation.delivered is True
    assert_names_its_fix(finding, "Postfix")  # postfix/plain (issue 30)


async def test_campus_sender_postfix(
    postfix_lab: dict[str, PostfixInstance], canary: CanaryReceiver
) -> None:
    result, verdict = await check(postfix_lab["campus-sender"], canary)
    assert verdict.status is VerdictStatus.RELAY_CAMPUS_SENDER, [
        (t.test.id, str(t.rcpt)) for t in result.tests
    ]
    accepted = {t.test.id for t in result.tests if t.outcome is TestOutcome.ACCEPTED}
    assert "sender-campus" in accepted and "rcpt-plain" not in accepted
    (finding,) = [f for f in verdict.findings if f.kind is FindingKind.RELAY_CAMPUS_SENDER]
    assert finding.confidence is Confidence.CONFIRMED
    assert_names_its_fix(finding, "Postfix")  # postfix/local-sender (issue 30)


async def test_auth_required_postfix(postfix_lab: dict[str, PostfixInstance]) -> None:
    if "auth-required" not in postfix_lab:
        pytest.skip("this Postfix lab has no auth-required instance")
    result, verdict = await check(postfix_lab["auth-required"])
    assert verdict.status is VerdictStatus.AUTH_REQUIRED, [
        (t.test.id, str(t.rcpt)) for t in result.tests
    ]


async def test_submission_port_is_judged_inside_tls_where_it_offers_auth(
    postfix_lab: dict[str, PostfixInstance],
) -> None:
    # Postfix on 587 with smtpd_tls_security_level=encrypt and smtpd_tls_auth_only: every
    # plain-text MAIL gets "530 Must issue a STARTTLS command first", and AUTH is offered only
    # inside TLS, where the battery's third-party recipients get "530 Authentication required".
    # Before issue 20 the status stayed tls-required and the EHLO after STARTTLS was not kept.
    instance = postfix_lab["submission"]
    assert instance.port == 587
    result, verdict = await check(instance)
    assert verdict.status.value == "auth-required", (verdict.summary, result.tests)
    facts = result.facts
    assert facts is not None and facts.starttls and facts.auth_mechanisms == ()
    after = facts.after_starttls
    assert after is not None and {"PLAIN", "LOGIN"} <= set(after.auth_mechanisms)
    assert "auth" in after.capabilities and after.pipelining and after.size is not None
    assert verdict.summary.startswith("The server requires STARTTLS before mail")
    assert "After STARTTLS: relaying needs authentication" in verdict.summary
    assert "offers AUTH" in verdict.summary and "only after STARTTLS" in verdict.summary
    # the plain-text tests stay in the evidence: each was refused for want of TLS
    plain = [t for t in result.tests if t.transport is Transport.PLAIN]
    assert plain and {t.outcome for t in plain} == {TestOutcome.TLS_REQUIRED}
    inside = [t for t in result.tests if t.transport is Transport.STARTTLS]
    assert TestOutcome.AUTH_REQUIRED in {t.outcome for t in inside}
    # no AUTH in clear text, so no auth-without-tls finding; the fingerprint keeps both EHLOs
    assert relay_kinds(verdict) == set()
    (unapproved,) = verdict.findings
    assert unapproved.fingerprint.after_starttls == after
