"""The relay battery's forms and the reply classifier, without sockets."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relayaudit.battery import BatteryInputs, address_literal, build_battery, canary_recipient
from relayaudit.evidence import (
    Confirmation,
    PortState,
    ProbeResult,
    ProbeStatus,
    Reply,
    ReplyClass,
    SessionFacts,
    TestCategory,
    TestOutcome,
    TestResult,
    TestRole,
    Transport,
    classify_reply,
    redact_command,
)
from relayaudit.verdict import Confidence, FindingKind, VerdictStatus, judge


def inputs(address: str = "192.0.2.7", hostname: str | None = "mx.campus.example") -> BatteryInputs:
    return BatteryInputs(
        address=address,
        hostname=hostname,
        campus_domains=("campus.example",),
        external_domains=("outside.example", "sender.example"),
        external_local_part="u",
        sender_local_part="f",
    )


def test_every_form_of_the_catalogue_is_there() -> None:
    tests = build_battery(inputs(), control_token="abc")
    by_id = {t.id: t for t in tests}
    rcpt = {t.id: t.rcpt_to for t in tests if t.category is TestCategory.RECIPIENT}
    assert rcpt == {
        "rcpt-plain": "u@outside.example",
        "rcpt-percent-ip": "u%outside.example@[192.0.2.7]",
        "rcpt-percent-host": "u%outside.example@mx.campus.example",
        "rcpt-quoted": '"u@outside.example"',
        "rcpt-quoted-percent": '"u%outside.example"',
        "rcpt-double-at-ip": "u@outside.example@[192.0.2.7]",
        "rcpt-quoted-double-at-ip": '"u@outside.example"@[192.0.2.7]',
        "rcpt-double-at-host": "u@outside.example@mx.campus.example",
        "rcpt-quoted-double-at-host": '"u@outside.example"@mx.campus.example',
        "rcpt-source-route-ip": "@[192.0.2.7]:u@outside.example",
        "rcpt-source-route-host": "@mx.campus.example:u@outside.example",
        "rcpt-bang": "outside.example!u",
        "rcpt-bang-ip": "outside.example!u@[192.0.2.7]",
        "rcpt-bang-host": "outside.example!u@mx.campus.example",
        "rcpt-trailing-at": "u@outside.example@",
        # the odd forms again with the campus domain on the right (issue 20): 4 per domain
        "rcpt-percent-campus": "u%outside.example@campus.example",
        "rcpt-bang-campus": "outside.example!u@campus.example",
        "rcpt-source-route-campus": "@campus.example:u@outside.example",
        "rcpt-quoted-campus": '"u@outside.example"@campus.example',
    }
    campus_forms = [t for t in tests if t.id.startswith("rcpt-") and t.id.endswith("-campus")]
    assert {t.role for t in campus_forms} == {TestRole.ODD_FORM}
    # every recipient form goes with the external sender, every sender form with the plain recipient
    assert {t.mail_from for t in tests if t.category is TestCategory.RECIPIENT} == {
        "f@sender.example"
    }
    senders = {t.id: t.mail_from for t in tests if t.category is TestCategory.SENDER}
    assert senders == {
        "sender-null": "",
        "sender-own-host": "f@mx.campus.example",
        "sender-own-literal": "f@[192.0.2.7]",
        "sender-campus": "postmaster@campus.example",
        "sender-unqualified": "f",
        "sender-localhost": "f@localhost",
    }
    assert {t.rcpt_to for t in tests if t.category is TestCategory.SENDER} == {"u@outside.example"}
    assert by_id["control-invalid"].rcpt_to == "nx-abc@nx-abc.invalid"
    # the two tests the verdict leans on most come first
    assert [t.id for t in tests[:2]] == ["rcpt-plain", "control-invalid"]


def test_ipv6_literals_follow_rfc_5321() -> None:
    assert address_literal("2001:db8::7") == "[IPv6:2001:db8::7]"
    assert address_literal("192.0.2.7") == "[192.0.2.7]"
    tests = build_battery(inputs("2001:db8::7", hostname=None))
    rcpt = {t.id: t.rcpt_to for t in tests}
    assert rcpt["rcpt-percent-ip"] == "u%outside.example@[IPv6:2001:db8::7]"
    assert rcpt["rcpt-source-route-ip"] == "@[IPv6:2001:db8::7]:u@outside.example"


def test_without_a_host_name_the_host_forms_are_not_repeated() -> None:
    tests = build_battery(inputs(hostname=None))
    pairs = [(t.mail_from, t.rcpt_to) for t in tests]
    assert len(pairs) == len(set(pairs))
    assert "rcpt-percent-host" not in {t.id for t in tests}


def test_every_campus_domain_gets_the_odd_forms_through_it() -> None:
    two = BatteryInputs(
        address="192.0.2.7",
        hostname="mx.campus.example",
        campus_domains=("campus.example", "alumni.example"),
        external_domains=("outside.example",),
        external_local_part="u",
        sender_local_part="f",
    )
    tests = build_battery(two)
    rcpt = {t.id: t.rcpt_to for t in tests}
    assert rcpt["rcpt-percent-campus"] == "u%outside.example@campus.example"
    assert rcpt["rcpt-percent-campus-1"] == "u%outside.example@alumni.example"
    assert rcpt["rcpt-quoted-campus-1"] == '"u@outside.example"@alumni.example'
    assert len([t for t in tests if "-campus" in t.id and t.id.startswith("rcpt-")]) == 8
    # the canary goes through the same campus domain as the accepted form
    by_id = {t.id: t for t in tests}
    got = canary_recipient(
        by_id["rcpt-percent-campus-1"], two, local_part="c+tok", domain="canary.example"
    )
    assert got == "c+tok%canary.example@alumni.example"
    got = canary_recipient(
        by_id["rcpt-bang-campus"], two, local_part="c+tok", domain="canary.example"
    )
    assert got == "canary.example!c+tok@campus.example"


def test_canary_recipient_keeps_the_accepted_form() -> None:
    tests = {t.id: t for t in build_battery(inputs())}
    got = canary_recipient(
        tests["rcpt-bang-ip"], inputs(), local_part="c+tok", domain="canary.example"
    )
    assert got == "canary.example!c+tok@[192.0.2.7]"
    got = canary_recipient(
        tests["sender-campus"], inputs(), local_part="c", domain="canary.example"
    )
    assert got == "c@canary.example"


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (250, "2.1.5 Ok", ReplyClass.OK),
        (251, "User not local; will forward", ReplyClass.OK),
        (554, "5.7.1 <u@d>: Relay access denied", ReplyClass.REFUSED),
        (550, "5.7.1 Unable to relay", ReplyClass.REFUSED),
        (551, "User not local", ReplyClass.REFUSED),
        (553, "5.1.3 malformed address", ReplyClass.REFUSED),
        (451, "4.7.1 Greylisted, try again later", ReplyClass.TEMPFAIL),
        (450, "4.2.0 Mailbox busy", ReplyClass.TEMPFAIL),
        (421, "4.7.0 Error: too many errors", ReplyClass.DISCONNECT),
        (530, "5.7.0 Authentication required", ReplyClass.AUTH_REQUIRED),
        (530, "5.7.0 Must issue a STARTTLS command first", ReplyClass.TLS_REQUIRED),
        (550, "5.7.57 Client not authenticated to send mail", ReplyClass.AUTH_REQUIRED),
        (554, "5.7.0 Authentication required for relaying", ReplyClass.AUTH_REQUIRED),
        (454, "4.7.0 TLS not available due to local problem", ReplyClass.TLS_REQUIRED),
        (
            450,
            "4.1.2 <u@nx.example>: Recipient address rejected: Domain not found",
            ReplyClass.DOMAIN_UNKNOWN,
        ),
        (
            550,
            "5.1.2 <u@nx.example>: Recipient address rejected: Domain not found",
            ReplyClass.DOMAIN_UNKNOWN,
        ),
        (
            450,
            "4.1.8 <f@nx.example>: Sender address rejected: Domain not found",
            ReplyClass.DOMAIN_UNKNOWN,
        ),
        (553, "5.1.3 malformed address", ReplyClass.REFUSED),
        (999, "weird", ReplyClass.INVALID),
        (0, "", ReplyClass.INVALID),
    ],
)
def test_classify_reply(code: int, text: str, expected: ReplyClass) -> None:
    assert classify_reply(Reply(code=code, text=text)) is expected


def test_auth_commands_are_redacted() -> None:
    assert redact_command("AUTH PLAIN AGZvbwBiYXI=") == "AUTH PLAIN <redacted>"
    assert redact_command("AUTH LOGIN") == "AUTH LOGIN"
    assert redact_command("Zm9vYmFy", in_auth=True) == "<redacted>"
    assert redact_command("MAIL FROM:<a@b>") == "MAIL FROM:<a@b>"


def _result(
    outcomes: dict[str, tuple[int, str]], *, starttls: dict[str, tuple[int, str]] | None = None
) -> ProbeResult:
    """A probe whose relay tests got the given RCPT replies (MAIL always 250); with `starttls`,
    the battery ran again after STARTTLS and got those."""
    now = datetime.now(UTC)
    tests = []
    runs = [(Transport.PLAIN, outcomes)]
    if starttls is not None:
        runs.append((Transport.STARTTLS, starttls))
    for (transport, replies), test in (
        (run, test) for run in runs for test in build_battery(inputs(), control_token="abc")
    ):
        code, text = replies.get(test.id, (554, "5.7.1 Relay access denied"))
        reply = Reply(code=code, text=text)
        kind = classify_reply(reply)
        outcome = {
            ReplyClass.OK: TestOutcome.ACCEPTED,
            ReplyClass.DOMAIN_UNKNOWN: TestOutcome.DOMAIN_UNKNOWN,
            ReplyClass.TEMPFAIL: TestOutcome.TEMPFAIL,
        }.get(kind, TestOutcome.REFUSED)
        tests.append(
            TestResult(
                test=test,
                transport=transport,
                mail=Reply(code=250, text="ok"),
                rcpt=reply,
                outcome=outcome,
            )
        )
    return ProbeResult(
        address="192.0.2.7",
        port=25,
        vantage="192.0.2.200",
        started=now,
        finished=now,
        port_state=PortState.OPEN,
        status=ProbeStatus.SMTP,
        facts=SessionFacts(banner=Reply(code=220, text="mx ESMTP"), ehlo=True, hostname=None),
        tests=tuple(tests),
    )


def test_an_unresolvable_test_domain_is_inconclusive_not_refused() -> None:
    unknown = (
        450,
        "4.1.2 <relaytest@outside.example>: Recipient address rejected: Domain not found",
    )
    verdict = judge(_result({"rcpt-plain": unknown}))
    assert verdict.status is VerdictStatus.INCONCLUSIVE
    assert "relay.external_domains" in verdict.summary


def test_a_relay_refusal_of_the_plain_test_decides_even_with_odd_domain_errors() -> None:
    odd = (550, "5.1.2 bad destination system address")
    verdict = judge(_result({"rcpt-double-at-ip": odd, "rcpt-trailing-at": odd}))
    assert verdict.status is VerdictStatus.RELAY_REFUSED


def test_a_relay_after_starttls_quotes_the_control_of_its_own_transport() -> None:
    # plain text: everything refused, the control too; after STARTTLS: everything accepted
    accepted = {t.id: (250, "2.1.5 Ok") for t in build_battery(inputs(), control_token="abc")}
    verdict = judge(_result({}, starttls=accepted))
    assert verdict.status is VerdictStatus.RELAY_AFTER_STARTTLS
    (relay,) = [f for f in verdict.findings if f.kind is FindingKind.RELAY_AFTER_STARTTLS]
    # the summary says the control was accepted: the evidence must show that control, not the
    # plain-text one that was refused
    assert "It also accepted the impossible control recipient" in relay.summary
    *tests, control = relay.evidence
    assert control.test.role is TestRole.CONTROL
    assert (control.transport, control.outcome) == (Transport.STARTTLS, TestOutcome.ACCEPTED)
    assert {t.transport for t in tests} == {Transport.STARTTLS}
    assert relay.summary.startswith(f"{len(tests)} of the relay tests accepted")
    assert relay.confidence is Confidence.LOW


def test_a_canary_deferred_at_data_keeps_the_rcpt_evidence_and_says_so() -> None:
    # a 4xx to the canary's message is no answer about relaying: the relay stays, unconfirmed
    result = _result({"rcpt-plain": (250, "2.1.5 Ok")})
    conf = Confirmation(
        token="relayaudit-" + "e" * 32,
        test_id="rcpt-plain",
        transport=Transport.PLAIN,
        rcpt_to="c+t@canary.example",
        data_reply=Reply(code=451, text="4.3.0 Try again later"),
    )
    assert conf.deferred and not conf.refused
    verdict = judge(result.model_copy(update={"confirmation": conf}))
    assert verdict.status is VerdictStatus.OPEN_RELAY
    (relay,) = [f for f in verdict.findings if f.kind is FindingKind.OPEN_RELAY]
    assert relay.confidence is Confidence.HIGH
    assert "was deferred at DATA (451 4.3.0 Try again later)" in relay.summary
