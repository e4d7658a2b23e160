"""Fixes verified on real MTAs (issue 30): each `verified = true` entry of the remediation data has
a case here that starts a real Postfix, Exim or OpenSMTPD relaying that way, sees relayaudit name
the software at high confidence and reference that very entry, applies the entry's fix to the
instance's configuration, restarts it, and sees relay-refused. The software guess is also tried
against banners that hide or fake the product.

Everything runs on loopback; the relay tests send no message (MAIL and RCPT only). Postfix fails
rather than skips with RELAYAUDIT_REQUIRE_POSTFIX=1, Exim and OpenSMTPD with
RELAYAUDIT_REQUIRE_EXIM=1 and RELAYAUDIT_REQUIRE_OPENSMTPD=1 (.ci/run sets all three).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from factories import probe_settings
from mta_lab import EXIM_HOSTS, OPENSMTPD_HOSTS, MtaInstance, lab_lock
from mta_lab import make_lab_directory as make_mta_directory
from postfix_lab import (
    SCANNER_SOURCE,
    PostfixInstance,
    lab_host,
    make_lab_directory,
    require_postfix,
)

from relayaudit.evidence import ProbeResult
from relayaudit.probe import ProbeSettings, probe
from relayaudit.remediation import advice_text, entries
from relayaudit.software import GuessConfidence, SoftwareGuess
from relayaudit.verdict import Finding, FindingKind, Verdict, VerdictStatus, judge

# the scanner's own HELO name, outside campus.test: a HELO map for campus names must not match it
OWN_HELO = "relayaudit.invalid"


def settings() -> ProbeSettings:
    return probe_settings(
        helo_name=OWN_HELO,
        source_address=SCANNER_SOURCE,
        connect_timeout=3.0,
        command_timeout=10.0,
        session_timeout=60.0,
        external_domains=("outside-b.test", "outside-a.test"),
    )


async def check(host: str, port: int) -> tuple[ProbeResult, Verdict]:
    result = await probe(host, port, settings())
    return result, judge(result)


def relay_of(verdict: Verdict) -> Finding:
    (finding,) = [f for f in verdict.findings if f.kind.is_relay]
    return finding


def outcomes(result: ProbeResult) -> list[tuple[str, str, str]]:
    return [(t.test.id, t.outcome.value, str(t.rcpt or t.mail or t.error)) for t in result.tests]


@dataclass(frozen=True)
class Case:
    """One verified entry: the instance that relays that way, and the entry's fix applied to it.

    `broken` and `fixed` are Postfix main.cf settings (over the policy's), or Exim placeholders /
    OpenSMTPD rules (`MtaInstance.changes`); `words` are the settings the entry's text names,
    so the fix applied here is the one the text gives."""

    entry: str  # the remediation entry: "postfix/local-sender"
    kind: FindingKind  # what relayaudit reports before the fix
    policy: str  # the lab policy it starts from
    broken: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)
    maps: dict[str, str] = field(default_factory=dict)  # Postfix access maps
    words: tuple[str, ...] = ()


_CLOSED_RELAY = "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
POSTFIX_CASES = (
    Case(
        "postfix/plain",
        FindingKind.OPEN_RELAY,
        "closed",
        broken={"mynetworks": "0.0.0.0/0"},
        fixed={"mynetworks": "127.0.0.1/32"},
        words=("mynetworks", "reject_unauth_destination"),
    ),
    Case(
        "postfix/null-sender",
        FindingKind.OPEN_RELAY,
        "closed",
        broken={
            "smtpd_relay_restrictions": (
                "permit_mynetworks, check_sender_access hash:{maps}/null_access,"
                " reject_unauth_destination"
            )
        },
        # "move check_sender_access after reject_unauth_destination"
        fixed={
            "smtpd_relay_restrictions": (
                "permit_mynetworks, reject_unauth_destination,"
                " check_sender_access hash:{maps}/null_access"
            )
        },
        maps={"null_access": "<> OK\n"},
        words=("check_sender_access", "after reject_unauth_destination"),
    ),
    Case(
        "postfix/local-sender",
        FindingKind.RELAY_CAMPUS_SENDER,
        "campus-sender",
        # "remove check_sender_access from smtpd_relay_restrictions"
        fixed={"smtpd_relay_restrictions": _CLOSED_RELAY},
        words=("remove check_sender_access from smtpd_relay_restrictions",),
    ),
    Case(
        "postfix/claimed-helo",
        FindingKind.RELAY_CLAIMED_HELO,
        "helo-map",
        # "move check_helo_access after reject_unauth_destination"
        fixed={
            "smtpd_relay_restrictions": (
                "permit_mynetworks, reject_unauth_destination, check_helo_access hash:{maps}/helo_access"
            )
        },
        words=("move check_helo_access after reject_unauth_destination",),
    ),
    Case(
        "postfix/xclient",
        FindingKind.RELAY_VIA_XCLIENT,
        "xclient",
        # "empty it where there is none"
        fixed={"smtpd_authorized_xclient_hosts": ""},
        words=("smtpd_authorized_xclient_hosts",),
    ),
)
EXIM_CASES = (
    Case(
        "exim/plain",
        FindingKind.OPEN_RELAY,
        "open",
        fixed={"relay_hosts": "127.0.0.1"},
        words=("narrow hostlist relay_from_hosts",),
    ),
    Case(
        "exim/local-sender",
        FindingKind.RELAY_CAMPUS_SENDER,
        "campus-sender",
        fixed={"campus": ""},  # the `accept senders = *@campus.test` statement removed
        words=("remove that statement",),
    ),
    Case(
        "exim/odd-form",
        FindingKind.OPEN_RELAY,
        "campus-percent",
        # "remove that router ... and keep the default deny statements for local parts with @ % ! / |"
        fixed={
            "routers": "",
            "restricted": (
                "  deny    message = restricted characters in address\n"
                "          domains = +relay_to_domains\n"
                "          local_parts = ^[./|] : ^.*[@%!/|]\n"
            ),
        },
        words=("remove that router", "@ % ! / |"),
    ),
)
_OPENSMTPD_FIXED = (
    'match from any for domain "campus.test" action "local"\n'
    'match from src 127.0.0.1 for any action "relay"\n'
)
OPENSMTPD_CASES = (
    Case(
        "opensmtpd/plain",
        FindingKind.OPEN_RELAY,
        "open",
        fixed={"rules": _OPENSMTPD_FIXED},
        words=("match from src <table", "match from any for domain <your domains>"),
    ),
    Case(
        "opensmtpd/local-sender",
        FindingKind.RELAY_CAMPUS_SENDER,
        "campus-sender",
        fixed={"rules": _OPENSMTPD_FIXED},
        words=("remove mail-from from the relay rule",),
    ),
)
CASES = POSTFIX_CASES + EXIM_CASES + OPENSMTPD_CASES
NAMES = {"postfix": "Postfix", "exim": "Exim", "opensmtpd": "OpenSMTPD"}


def test_the_verified_entries_are_exactly_the_ones_tested_here() -> None:
    verified = {e.id for e in entries().values() if e.verified}
    assert verified == {c.entry for c in CASES}
    for case in CASES:  # the fix applied is the one the entry's text gives
        text = " ".join(entries()[case.entry].text.split())
        missing = [w for w in case.words if w not in text]
        assert not missing, (case.entry, missing)


def assert_relays_and_names_the_fix(
    case: Case, result: ProbeResult, verdict: Verdict
) -> SoftwareGuess:
    software = case.entry.split("/")[0]
    assert verdict.status.value == case.kind.value, (verdict.summary, outcomes(result))
    finding = relay_of(verdict)
    assert finding.kind is case.kind
    guess = finding.fingerprint.software_guess
    assert guess is not None and guess.name == NAMES[software], guess
    assert guess.confidence is GuessConfidence.HIGH, guess
    assert finding.remediation is not None and finding.remediation.id == case.entry
    assert finding.remediation.doc_url == entries()[case.entry].doc_url
    # people read the software's fix only, marked verified (a high-confidence guess)
    text = advice_text(finding.remediation)
    assert text.startswith(f"How to fix it in {NAMES[software]} (verified on a real"), text
    assert "any mail server" not in text
    return guess


def assert_refused(result: ProbeResult, verdict: Verdict) -> None:
    assert verdict.status is VerdictStatus.RELAY_REFUSED, (verdict.summary, outcomes(result))
    assert not [f for f in verdict.findings if f.kind.is_relay or f.remediation is not None]


# -- Postfix ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postfix_base() -> Iterator[Path]:
    require_postfix()
    base = make_lab_directory()
    yield base
    shutil.rmtree(base, ignore_errors=True)


def postfix(
    base: Path,
    n: int,
    policy: str,
    *,
    overrides: dict[str, str],
    maps: dict[str, str] | None = None,
) -> PostfixInstance:
    """An instance of its own on 127.0.<slot>.<11 + n>, beside the shared lab's."""
    return PostfixInstance(
        policy,
        lab_host(11 + n),
        2525,
        base / f"verify-{n}-{policy}",
        overrides=overrides,
        maps=dict(maps or {}),
    )


@pytest.mark.postfix
@pytest.mark.parametrize("n", range(len(POSTFIX_CASES)), ids=[c.entry for c in POSTFIX_CASES])
async def test_a_postfix_fix_closes_the_relay(postfix_base: Path, n: int) -> None:
    case = POSTFIX_CASES[n]
    instance = postfix(postfix_base, n, case.policy, overrides=dict(case.broken), maps=case.maps)
    instance.start()
    try:
        result, verdict = await check(instance.host, instance.port)
        assert_relays_and_names_the_fix(case, result, verdict)
        instance.overrides = {**case.broken, **case.fixed}
        instance.restart()
        result, verdict = await check(instance.host, instance.port)
        assert_refused(result, verdict)
    finally:
        instance.stop()


@pytest.mark.postfix
@pytest.mark.parametrize(
    ("n", "overrides", "confidence"),
    [
        # the product hidden: the EHLO reply and "Relay access denied" still agree
        (20, {"smtpd_banner": "$myhostname ESMTP"}, GuessConfidence.HIGH),
        # a host name naming another product is a host name, not a product token
        (21, {"myhostname": "exchange.campus.test"}, GuessConfidence.HIGH),
        # a banner that names another product: the sources disagree, so low at most
        (22, {"smtpd_banner": "$myhostname ESMTP Exim 4.96"}, GuessConfidence.LOW),
        (23, {"smtpd_banner": "$myhostname Microsoft ESMTP MAIL Service ready"}, GuessConfidence.LOW),
    ],
    ids=["hidden", "host-name", "exim-banner", "microsoft-banner"],
)
async def test_a_postfix_that_hides_or_fakes_its_banner(
    postfix_base: Path, n: int, overrides: dict[str, str], confidence: GuessConfidence
) -> None:
    instance = postfix(postfix_base, n, "campus-sender", overrides=overrides)
    instance.start()
    try:
        result, verdict = await check(instance.host, instance.port)
    finally:
        instance.stop()
    assert result.facts is not None
    # the greeting names Postfix only where the banner is the default one
    assert ("Postfix" in result.facts.banner.text) == ("smtpd_banner" not in overrides)
    finding = relay_of(verdict)
    guess = finding.fingerprint.software_guess
    assert guess is not None and guess.name == "Postfix", guess
    assert guess.confidence is confidence, guess
    named = {s.source.value for s in guess.signs if s.software.value == "postfix"}
    assert named == {"ehlo", "refusal"} | ({"greeting"} if "smtpd_banner" not in overrides else set())
    assert finding.remediation is not None and finding.remediation.id == "postfix/local-sender"
    text = advice_text(finding.remediation)
    if confidence is GuessConfidence.LOW:  # the generic fix first, Postfix's marked as a guess
        assert text.startswith("How to fix it, on any mail server:"), text
        assert "If it runs Postfix (a guess, low confidence" in text
    else:
        assert text.startswith("How to fix it in Postfix"), text


# -- Exim and OpenSMTPD ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exim_lab() -> Iterator[Path]:
    with lab_lock("exim"):
        base = make_mta_directory()
        yield base
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def opensmtpd_lab() -> Iterator[Path]:
    with lab_lock("opensmtpd"):
        base = make_mta_directory()
        yield base
        shutil.rmtree(base, ignore_errors=True)


async def _mta_case(kind: str, base: Path, case: Case) -> None:
    hosts = EXIM_HOSTS if kind == "exim" else OPENSMTPD_HOSTS
    instance = MtaInstance(
        kind, case.policy, hosts[case.policy], base / f"{kind}-{case.policy}", changes=dict(case.broken)
    )
    instance.start()
    try:
        result, verdict = await check(instance.host, instance.port)
        assert_relays_and_names_the_fix(case, result, verdict)
        instance.changes = {**case.broken, **case.fixed}
        instance.restart()
        result, verdict = await check(instance.host, instance.port)
        assert_refused(result, verdict)
    finally:
        instance.stop()


@pytest.mark.parametrize("n", range(len(EXIM_CASES)), ids=[c.entry for c in EXIM_CASES])
async def test_an_exim_fix_closes_the_relay(exim_lab: Path, n: int) -> None:
    await _mta_case("exim", exim_lab, EXIM_CASES[n])


@pytest.mark.parametrize("n", range(len(OPENSMTPD_CASES)), ids=[c.entry for c in OPENSMTPD_CASES])
async def test_an_opensmtpd_fix_closes_the_relay(opensmtpd_lab: Path, n: int) -> None:
    await _mta_case("opensmtpd", opensmtpd_lab, OPENSMTPD_CASES[n])


async def test_an_exim_that_hides_its_banner_is_still_exim(exim_lab: Path) -> None:
    instance = MtaInstance(
        "exim",
        "campus-sender",
        EXIM_HOSTS["campus-sender"],
        exim_lab / "exim-hidden",
        changes={"banner": "$smtp_active_hostname ESMTP"},
    )
    instance.start()
    try:
        result, verdict = await check(instance.host, instance.port)
    finally:
        instance.stop()
    assert result.facts is not None and "Exim" not in result.facts.banner.text
    guess = relay_of(verdict).fingerprint.software_guess
    assert guess is not None and guess.name == "Exim", guess
    assert guess.confidence is GuessConfidence.HIGH  # the EHLO reply and "relay not permitted"
    assert {s.source.value for s in guess.signs} == {"ehlo", "refusal"}
