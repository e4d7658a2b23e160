"""Turns one probe's evidence into a status and findings; a pure function, no I/O."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from relayaudit.evidence import (
    Capabilities,
    ClaimKind,
    Confirmation,
    Exchange,
    ProbeResult,
    ProbeStatus,
    TestOutcome,
    TestResult,
    TestRole,
    TlsFacts,
    Transport,
    endpoint,
)
from relayaudit.remediation import RemediationRef, reference, way_of
from relayaudit.software import SoftwareGuess, guess_of

__all__ = [
    "Confidence",
    "Finding",
    "FindingKind",
    "Fingerprint",
    "Owner",
    "Severity",
    "TargetOrigin",
    "Verdict",
    "VerdictStatus",
    "finding_id",
    "judge",
    "status_of",
]


class FindingKind(StrEnum):
    OPEN_RELAY = "open-relay"
    RELAY_CAMPUS_SENDER = "relay-campus-sender"
    RELAY_AFTER_STARTTLS = "relay-after-starttls"
    RELAY_CLAIMED_HELO = "relay-claimed-helo"  # relays for a client claiming a HELO name
    RELAY_VIA_XCLIENT = "relay-via-xclient"  # relays once XCLIENT claimed a trusted address
    ACCEPTS_WITHOUT_DELIVERY = "accepts-without-delivery"
    REFUSES_AT_DATA = "refuses-at-data"  # accepted at RCPT, but the canary refused at DATA
    UNAPPROVED_SMTP = "unapproved-smtp"
    AUTH_WITHOUT_TLS = "auth-without-tls"
    XCLIENT_OFFERED = "xclient-offered"  # XCLIENT offered to the scanner: anyone can impersonate

    @property
    def is_relay(self) -> bool:
        """The finding of a relay verdict: one per relay status, so they count alike."""
        return self in _RELAY_KINDS


class Severity(StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"

    @property
    def rank(self) -> int:
        return list(Severity).index(self)  # 0 = most severe


class Confidence(StrEnum):
    CONFIRMED = "confirmed"  # the canary message arrived
    HIGH = "high"  # plain third-party recipient accepted, control recipient refused
    # only odd recipient forms accepted (may be read as local addresses), or a plain one with
    # no refused control (none answered, or only temporarily: greylisting)
    MEDIUM = "medium"
    LOW = "low"  # the server accepts even the impossible control recipient

    @property
    def rank(self) -> int:
        return list(Confidence).index(self)  # 0 = strongest evidence


class VerdictStatus(StrEnum):
    OPEN_RELAY = "open-relay"
    RELAY_CAMPUS_SENDER = "relay-campus-sender"
    RELAY_AFTER_STARTTLS = "relay-after-starttls"
    RELAY_CLAIMED_HELO = "relay-claimed-helo"
    RELAY_VIA_XCLIENT = "relay-via-xclient"
    ACCEPTS_WITHOUT_DELIVERY = "accepts-without-delivery"
    REFUSES_AT_DATA = "refuses-at-data"  # accepted at RCPT; the canary message refused at DATA
    RELAY_REFUSED = "relay-refused"
    AUTH_REQUIRED = "auth-required"
    TLS_REQUIRED = "tls-required"
    INCONCLUSIVE = "inconclusive"
    SESSION_REFUSED = "session-refused"
    NOT_SMTP = "not-smtp"
    NO_BANNER = "no-banner"
    CLOSED = "closed"
    FILTERED = "filtered"
    ERROR = "error"
    INTERNAL_ERROR = "internal-error"  # a bug of relayaudit's: the probe logged its traceback

    @property
    def is_relay(self) -> bool:
        return self in _RELAY_STATUSES


_RELAY_STATUSES = {
    VerdictStatus.OPEN_RELAY,
    VerdictStatus.RELAY_CAMPUS_SENDER,
    VerdictStatus.RELAY_AFTER_STARTTLS,
    VerdictStatus.RELAY_CLAIMED_HELO,
    VerdictStatus.RELAY_VIA_XCLIENT,
}
_RELAY_KINDS = {
    FindingKind.OPEN_RELAY,
    FindingKind.RELAY_CAMPUS_SENDER,
    FindingKind.RELAY_AFTER_STARTTLS,
    FindingKind.RELAY_CLAIMED_HELO,
    FindingKind.RELAY_VIA_XCLIENT,
}


class _Frozen(BaseModel):
    # schemas are built on first use, not at import: start-up counts in every sweep, and a
    # sweep where every port refuses never builds a result at all
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class Fingerprint(_Frozen):
    banner: str | None = None
    hostname: str | None = None
    software: str | None = None
    capabilities: tuple[str, ...] = ()
    auth_mechanisms: tuple[str, ...] = ()
    starttls: bool = False
    tls: TlsFacts | None = None
    after_starttls: Capabilities | None = None  # the EHLO reply inside TLS
    # `software` weighed from the greeting, the EHLO reply and the refusals, with its signs
    software_guess: SoftwareGuess | None = None


class TargetOrigin(_Frozen):
    """Where a target address came from: a targets_from source, the DNS name and its record."""

    source: str  # the targets_from entry: "mx campus.example", "zone_file zones/campus.zone", ...
    name: str  # the DNS name whose record holds the address: "mx1.campus.example"
    record: str  # the record type that gave the address: "A" or "AAAA"

    def __str__(self) -> str:
        return f"{self.name} {self.record} ({self.source})"


class Owner(_Frozen):
    """Who runs an address (owners.py): the department, where its mail goes, its ticket queue."""

    name: str
    contact: str
    queue: str | None = None

    def __str__(self) -> str:
        return self.name


class Finding(_Frozen):
    """One problem at one address:port; `id` is the same for the same problem in every sweep."""

    id: str
    kind: FindingKind
    severity: Severity
    confidence: Confidence
    address: str
    port: int
    vantage: str
    title: str
    summary: str
    observed_at: datetime
    approved_note: str | None = None
    evidence: tuple[TestResult, ...] = ()
    transcript: tuple[Exchange, ...] = ()
    fingerprint: Fingerprint = Fingerprint()
    # relay findings: which fix applies (the text is relayaudit's data: `relayaudit show`)
    remediation: RemediationRef | None = None
    confirmation_token: str | None = None
    # the DNS names (and records) the address was found under, when targets_from derived it
    origin: tuple[TargetOrigin, ...] = ()
    # who runs the address, from the owner table as the last sweep read it (None: nobody listed)
    owner: Owner | None = None


class Verdict(_Frozen):
    address: str
    port: int
    status: VerdictStatus
    summary: str
    findings: tuple[Finding, ...] = ()

    @property
    def relay(self) -> bool:
        return self.status.is_relay


def finding_id(kind: FindingKind, address: str, port: int) -> str:
    digest = hashlib.sha256(f"{kind}|{address}|{port}".encode()).hexdigest()
    return f"ra-{digest[:16]}"


_NON_SMTP = {
    ProbeStatus.CLOSED: VerdictStatus.CLOSED,
    ProbeStatus.FILTERED: VerdictStatus.FILTERED,
    ProbeStatus.NO_BANNER: VerdictStatus.NO_BANNER,
    ProbeStatus.NOT_SMTP: VerdictStatus.NOT_SMTP,
    ProbeStatus.SESSION_REFUSED: VerdictStatus.SESSION_REFUSED,
    ProbeStatus.ERROR: VerdictStatus.ERROR,
    ProbeStatus.INTERNAL_ERROR: VerdictStatus.INTERNAL_ERROR,
}


def status_of(status: ProbeStatus) -> VerdictStatus:
    """The verdict status of a probe that held no SMTP conversation (closed, filtered, ...)."""
    return _NON_SMTP[status]


_SEVERITY = {
    Confidence.CONFIRMED: Severity.CRITICAL,
    Confidence.HIGH: Severity.HIGH,
    Confidence.MEDIUM: Severity.MEDIUM,
    Confidence.LOW: Severity.MEDIUM,
}


def _accepted(results: Iterable[TestResult]) -> list[TestResult]:
    return [
        r
        for r in results
        if r.outcome is TestOutcome.ACCEPTED and r.test.role is not TestRole.CONTROL
    ]


def _is_plain_recipient(result: TestResult) -> bool:
    return result.test.role.plain_recipient


def _refused(result: TestResult) -> bool:
    """The server's last answer to the test was a permanent refusal (5xx): a 4xx (greylisting,
    a rate limit) or no answer says nothing about whether it accepts everything."""
    reply = result.rcpt or result.mail
    return reply is not None and 500 <= reply.code <= 599


def _describe(result: TestResult) -> str:
    parts = [f"MAIL FROM:<{result.test.mail_from}>"]
    if result.mail is not None:
        parts.append(f"-> {result.mail.code}")
    parts.append(f"RCPT TO:<{result.test.rcpt_to}>")
    if result.rcpt is not None:
        parts.append(f"-> {result.rcpt}")
    return " ".join(parts)


class _Context:
    """The facts shared by every finding of one probe."""

    def __init__(self, result: ProbeResult, approved_note: str | None) -> None:
        self.result = result
        self.approved_note = approved_note
        facts = result.facts
        self.guess = guess_of(result)
        self.fingerprint = (
            Fingerprint(
                banner=str(facts.banner),
                hostname=facts.hostname,
                software=self.guess.name,
                software_guess=self.guess,
                capabilities=facts.capabilities,
                auth_mechanisms=facts.auth_mechanisms,
                starttls=facts.starttls,
                tls=facts.tls,
                after_starttls=facts.after_starttls,
            )
            if facts is not None
            # no session facts (e.g. HELO refused): the greeting is still in the transcript
            else Fingerprint(banner=_greeting(result))
        )
        controls = [r for r in result.tests if r.test.role is TestRole.CONTROL]
        self.controls = controls
        self.control = controls[0] if controls else None
        self.accepts_everything = any(r.outcome is TestOutcome.ACCEPTED for r in controls)

    def finding(
        self,
        kind: FindingKind,
        *,
        severity: Severity,
        confidence: Confidence,
        title: str,
        summary: str,
        evidence: Iterable[TestResult] = (),
        remediation: RemediationRef | None = None,
    ) -> Finding:
        r = self.result
        conf = r.confirmation
        return Finding(
            id=finding_id(kind, r.address, r.port),
            kind=kind,
            severity=severity,
            confidence=confidence,
            address=r.address,
            port=r.port,
            vantage=r.vantage,
            title=title,
            summary=summary,
            observed_at=r.finished,
            approved_note=self.approved_note,
            evidence=tuple(evidence),
            transcript=r.transcript,
            fingerprint=self.fingerprint,
            remediation=remediation,
            confirmation_token=conf.token if conf is not None else None,
        )

    def relay_finding(
        self,
        kind: FindingKind,
        accepted: list[TestResult],
        what: str,
        *,
        confirmable: list[TestResult],
        notes: Iterable[str] = (),
        severity: Severity | None = None,
    ) -> Finding:
        """`accepted`: the tests the finding is about; `confirmable`: every accepted test of the
        same transport, any of which a delivered canary may have gone through."""
        r = self.result
        conf = r.confirmation
        confirmed = (
            conf is not None
            and conf.delivered is True
            and any(
                a.test.id == conf.test_id and a.transport is conf.transport for a in confirmable
            )
        )
        # the control of the accepted tests' transport: a server may refuse it in plain text and
        # accept it after STARTTLS, and the summary and evidence must show the one they are about
        control, accepts_everything = self.control, self.accepts_everything
        same = next((c for c in self.controls if c.transport is accepted[0].transport), None)
        if same is not None:
            control, accepts_everything = same, same.outcome is TestOutcome.ACCEPTED
        plain = [a for a in accepted if _is_plain_recipient(a)]
        # only a control refused for good shows the server does not accept everything
        control_refused = control is not None and _refused(control)
        if confirmed:
            confidence = Confidence.CONFIRMED
        elif accepts_everything:
            confidence = Confidence.LOW
        elif plain and control_refused:
            confidence = Confidence.HIGH
        else:
            confidence = Confidence.MEDIUM
        lead = (plain or accepted)[0]
        what_notes = list(notes)
        notes = [f"{len(accepted)} of the relay tests accepted, e.g. {_describe(lead)}."]
        notes += what_notes
        if accepts_everything and control is not None:
            notes.append(
                f"It also accepted the impossible control recipient <{control.test.rcpt_to}>: "
                "it accepts everything at RCPT, so acceptance alone is weak evidence."
            )
            if conf is None or not conf.sent:
                notes.append(
                    "An open relay that does not verify recipients, or an accept-all trap: "
                    "confirmation mode (--confirm / canary.enabled) tells them apart."
                )
        elif control_refused and control is not None and control.rcpt is not None:
            notes.append(f"The control recipient was refused ({control.rcpt.code}).")
        elif control is not None and control.outcome is TestOutcome.TEMPFAIL:
            reply = control.rcpt or control.mail
            notes.append(
                f"The control recipient was inconclusive ({reply.code if reply else 'no reply'}: "
                "greylisted or rate-limited, not refused), so nothing shows the server refuses "
                "anything: the confidence is what it would be with no control."
            )
        elif plain and not confirmed:
            notes.append(
                "No control recipient was refused, so nothing shows the server refuses anything: "
                "the confidence is what it would be with no control."
            )
        if r.retried_after is not None:
            notes.append(
                f"Seen on a retry {r.retried_after:.0f}s after a first try that met "
                "greylisting (its deferrals are in the transcript)."
            )
        if confidence is Confidence.MEDIUM and not plain:
            notes.append(
                "Only unusual address forms were accepted; some servers read them as local mailboxes."
            )
        if conf is not None and conf.deferred and conf.data_reply is not None:
            notes.append(
                f"The canary message {conf.token} was deferred at DATA ({conf.data_reply}): "
                "not confirmed; a later sweep tries again."
            )
        elif conf is not None and not conf.sent and conf.error:
            notes.append(f"The canary message could not be sent: {conf.error}.")
        if confirmed and conf is not None:
            notes.append(f"Confirmed: canary message {conf.token} arrived at the ISO's mailbox.")
        elif conf is not None and conf.sent and conf.delivered is None:
            notes.append(f"Canary message {conf.token} sent; delivery not yet seen.")
        elif conf is not None and conf.sent and conf.delivered is False:
            notes.append(
                f"Canary message {conf.token} was accepted but not seen within the wait: it may "
                "still be queued; the RCPT evidence above stands."
            )
        title = f"{what} on {endpoint(r.address, r.port)}"
        evidence = [*accepted, *([control] if control is not None else [])]
        return self.finding(
            kind,
            severity=severity or _SEVERITY[confidence],
            confidence=confidence,
            title=title,
            summary=" ".join(notes),
            evidence=evidence,
            remediation=reference(self.guess, way_of(kind.value, accepted)),
        )


def _refusal_status(results: list[TestResult]) -> VerdictStatus:
    outcomes = {r.outcome for r in results}
    plain = next((r for r in results if r.test.role is TestRole.PLAIN), None)
    undecided = {TestOutcome.TEMPFAIL, TestOutcome.DOMAIN_UNKNOWN}
    if plain is not None and plain.outcome in undecided:
        return VerdictStatus.INCONCLUSIVE  # the decisive test has no answer
    if TestOutcome.TEMPFAIL in outcomes:
        return VerdictStatus.INCONCLUSIVE
    if TestOutcome.TLS_REQUIRED in outcomes:
        return VerdictStatus.TLS_REQUIRED
    if TestOutcome.AUTH_REQUIRED in outcomes:
        return VerdictStatus.AUTH_REQUIRED
    if outcomes & {TestOutcome.REFUSED, TestOutcome.SENDER_REFUSED}:
        return VerdictStatus.RELAY_REFUSED
    if TestOutcome.DOMAIN_UNKNOWN in outcomes:
        return VerdictStatus.INCONCLUSIVE
    return VerdictStatus.ERROR


def judge(
    result: ProbeResult,
    *,
    approved_note: str | None = None,
    approved: bool = False,
    expired: str | None = None,
) -> Verdict:
    """The verdict for one probe. `approved`: the ISO approved an SMTP service here;
    `expired`: which approval of it expired, and when (its unapproved-smtp summary says so)."""
    if result.status is not ProbeStatus.SMTP:
        session_status = _NON_SMTP[result.status]
        unapproved = result.status is ProbeStatus.SESSION_REFUSED and not approved
        # built without validation: closed ports pass here by the thousand, all values typed
        return Verdict.model_construct(
            address=result.address,
            port=result.port,
            status=session_status,
            summary=result.error or session_status.value,
            findings=(_unapproved(_Context(result, approved_note), expired),) if unapproved else (),
        )

    ctx = _Context(result, approved_note)
    findings: list[Finding] = []

    if not approved:
        findings.append(_unapproved(ctx, expired))
    facts = result.facts
    # the facts come from the first EHLO, which is in clear text unless the port is implicit TLS
    if facts is not None and facts.auth_mechanisms and not _implicit(result):
        weak = {"PLAIN", "LOGIN"} & set(facts.auth_mechanisms)
        findings.append(
            ctx.finding(
                FindingKind.AUTH_WITHOUT_TLS,
                severity=Severity.MEDIUM if weak else Severity.LOW,
                confidence=Confidence.HIGH,
                title=f"AUTH offered without TLS on {endpoint(result.address, result.port)}",
                summary=(
                    f"The server offers AUTH {' '.join(facts.auth_mechanisms)} before any TLS: "
                    + (
                        "passwords can cross the network in clear text."
                        if weak
                        else "credentials exchange is unprotected."
                    )
                ),
            )
        )

    # tests under a claimed identity (issue 27) are judged on their own, below
    own = [r for r in result.tests if r.test.claim is None]
    plain_group = [r for r in own if r.transport is not Transport.STARTTLS]
    tls_group = [r for r in own if r.transport is Transport.STARTTLS]
    offered = _offers_xclient(result)
    if offered:
        findings.append(_xclient_offered(ctx, result))
    conf = result.confirmation
    # Not delivered within the wait clears a relay for a server that accepts everything (a trap,
    # accept-then-discard) or only odd forms (read as local mailboxes); a server that refused the
    # control but accepted a plain third-party recipient is selective: its canary may be queued.
    selective_plain = conf is not None and any(
        _is_plain_recipient(a) for a in _accepted(result.tests) if a.transport is conf.transport
    )
    # A canary is only ever sent after a relay test was accepted the same way; evidence that says
    # otherwise (a hand-edited or corrupt record) is judged on its tests alone.
    canary_backed = conf is not None and any(
        a.transport is conf.transport for a in _accepted(result.tests)
    )
    undelivered = (
        conf is not None
        and canary_backed
        and conf.sent
        and conf.delivered is False
        and (ctx.accepts_everything or not selective_plain)
    )
    # A canary refused at DATA is evidence too: the server decides after the message (an ACL
    # at DATA), so its acceptances at RCPT are no relay; never silently "relay-refused" either.
    refused_at_data = conf is not None and canary_backed and conf.refused

    status: VerdictStatus | None = None
    for group, after_tls in ((plain_group, False), (tls_group, True)):
        accepted = _accepted(group)
        if not accepted or status is not None:
            continue
        if (
            (undelivered or refused_at_data)
            and conf is not None
            and any(a.transport is conf.transport for a in accepted)
        ):
            continue  # handled below: accepted, but the canary never arrived or was refused
        outside = [a for a in accepted if a.test.role is not TestRole.LOCAL_SENDER]
        if after_tls:
            kind, what, status = (
                FindingKind.RELAY_AFTER_STARTTLS,
                "Open relay after STARTTLS",
                VerdictStatus.RELAY_AFTER_STARTTLS,
            )
        elif outside:
            kind, what, status = FindingKind.OPEN_RELAY, "Open relay", VerdictStatus.OPEN_RELAY
        else:
            kind, what, status = (
                FindingKind.RELAY_CAMPUS_SENDER,
                "Relays for anyone claiming a campus sender",
                VerdictStatus.RELAY_CAMPUS_SENDER,
            )
        findings.append(ctx.relay_finding(kind, outside or accepted, what, confirmable=accepted))

    if status is None:
        status = _claimed_relay(ctx, result, findings, skip=undelivered or refused_at_data)

    if status is None and undelivered and conf is not None:
        status = VerdictStatus.ACCEPTS_WITHOUT_DELIVERY
        findings.append(
            ctx.finding(
                FindingKind.ACCEPTS_WITHOUT_DELIVERY,
                severity=Severity.LOW,
                confidence=Confidence.HIGH,
                title=f"Accepts relay recipients but delivers nothing on {endpoint(result.address, result.port)}",
                summary=(
                    f"Relay tests were accepted at RCPT, but the canary message {conf.token} "
                    f"(form {conf.test_id}) did not arrive within the wait: an accept-then-discard "
                    "server or a trap, not an open relay."
                ),
                evidence=_accepted(result.tests),
            )
        )

    if status is None and refused_at_data and conf is not None:
        status = VerdictStatus.REFUSES_AT_DATA
        findings.append(_refused_at_data(ctx, conf))

    status_summary: str | None = None
    if status is None:
        status = _refusal_status(plain_group) if plain_group else VerdictStatus.ERROR
        after = _refusal_status(tls_group) if tls_group else VerdictStatus.ERROR
        if status is VerdictStatus.TLS_REQUIRED and after is not VerdictStatus.ERROR:
            # the battery ran again inside TLS: what it met there is the port's answer
            status_summary = _after_starttls_summary(after, plain_group, tls_group, result)
            status = after
    summary = next(
        (
            f.summary
            for f in findings
            if f.kind
            not in {
                FindingKind.UNAPPROVED_SMTP,
                FindingKind.AUTH_WITHOUT_TLS,
                FindingKind.XCLIENT_OFFERED,
            }
        ),
        None,
    )
    return Verdict(
        address=result.address,
        port=result.port,
        status=status,
        summary=summary or status_summary or _status_summary(status, plain_group, result),
        findings=tuple(findings),
    )


# the fixes themselves are data (relayaudit/remedies/), referenced by `Finding.remediation`
_HELO_RISK = (
    "A HELO name is whatever the client types, so this is an open relay for anyone who claims one."
)
_XCLIENT_RISK = (
    "The server honours XCLIENT from the scanner's address, so any client there can claim any "
    "client address, its trusted networks included, and relay."
)


def _offers_xclient(result: ProbeResult) -> bool:
    facts = result.facts
    if facts is None:
        return False
    inside = facts.after_starttls.capabilities if facts.after_starttls is not None else ()
    return "xclient" in facts.capabilities or "xclient" in inside


def _xclient_offered(ctx: _Context, result: ProbeResult) -> Finding:
    """XCLIENT offered to the scanner: anyone at its address can claim any client identity."""
    tried = [r for r in result.tests if r.test.claim and r.test.claim.kind is ClaimKind.XCLIENT]
    notes = [
        f"The server offers XCLIENT to the scanner ({result.vantage}): a client it authorises "
        "can claim any client address, name and HELO, and is then judged as that client "
        "(trusted networks, access maps) and logged as it. XCLIENT is meant for a front-end "
        "proxy only."
    ]
    if tried and not any(r.outcome is TestOutcome.ACCEPTED for r in tried):
        notes.append(f"Relay tests claiming {tried[0].test.claim} and the like were not accepted.")
    return ctx.finding(
        FindingKind.XCLIENT_OFFERED,
        severity=Severity.HIGH,
        confidence=Confidence.HIGH,
        title=f"XCLIENT offered to any client on {endpoint(result.address, result.port)}",
        summary=" ".join(notes),
        evidence=tried,
        remediation=reference(ctx.guess, way_of(FindingKind.XCLIENT_OFFERED.value, tried)),
    )


def _claimed_relay(
    ctx: _Context, result: ProbeResult, findings: list[Finding], *, skip: bool
) -> VerdictStatus | None:
    """No relay under the scanner's own name: a relay under a claimed identity, if any (XCLIENT
    first: critical); None when none was accepted. `skip`: a canary through the claimed test
    was not delivered or was refused; that verdict is made below."""
    conf = result.confirmation
    for kind in (ClaimKind.XCLIENT, ClaimKind.HELO):
        accepted = [
            a for a in _accepted(result.tests) if a.test.claim and a.test.claim.kind is kind
        ]
        if not accepted:
            continue
        if skip and conf is not None and any(a.test.id == conf.test_id for a in accepted):
            return None
        claim = accepted[0].test.claim
        assert claim is not None
        own = [
            r for r in result.tests if r.test.claim is None and r.test.role is not TestRole.CONTROL
        ]
        refused = (
            f" Under the scanner's own name all {len(own)} relay tests were refused or not accepted."
            if own
            else ""
        )
        if kind is ClaimKind.XCLIENT:
            findings.append(
                ctx.relay_finding(
                    FindingKind.RELAY_VIA_XCLIENT,
                    accepted,
                    f"Open relay via XCLIENT ({claim})",
                    confirmable=accepted,
                    notes=[
                        f"It relayed after the session claimed {claim} ({claim.why}).{refused}",
                        _XCLIENT_RISK,
                    ],
                    severity=Severity.CRITICAL,
                )
            )
            return VerdictStatus.RELAY_VIA_XCLIENT
        findings.append(
            ctx.relay_finding(
                FindingKind.RELAY_CLAIMED_HELO,
                accepted,
                f"Open relay for clients that claim a campus name (EHLO {claim.value})",
                confirmable=accepted,
                notes=[
                    f"It relayed for a client that said EHLO {claim.value} ({claim.why}).{refused}",
                    _HELO_RISK,
                ],
            )
        )
        return VerdictStatus.RELAY_CLAIMED_HELO
    return None


def _refused_at_data(ctx: _Context, conf: Confirmation) -> Finding:
    """Accepted at RCPT, but the canary message itself was refused: the finding says so."""
    r = ctx.result
    accepted = [a for a in _accepted(r.tests) if a.transport is conf.transport]
    lead = next((a for a in accepted if _is_plain_recipient(a)), accepted[0])
    control = next((c for c in ctx.controls if c.transport is conf.transport), ctx.control)
    notes = [
        f"{len(accepted)} of the relay tests were accepted at RCPT, e.g. {_describe(lead)}, "
        f"but the canary message {conf.token} sent the same way (form {conf.test_id}) was "
        f"refused at DATA: {conf.data_reply}.",
        "The server decides after the message (an ACL or policy check at DATA), so its "
        "acceptance at RCPT is not a relay: not an open relay as tested. The refusal text says "
        "why; a server that refuses only some messages (content filters) may still relay others.",
    ]
    if control is not None and control.outcome is TestOutcome.ACCEPTED:
        notes.append(
            f"It also accepted the impossible control recipient <{control.test.rcpt_to}> at RCPT."
        )
    return ctx.finding(
        FindingKind.REFUSES_AT_DATA,
        severity=Severity.LOW,
        confidence=Confidence.HIGH,
        title=(
            "Accepts relay recipients but refuses the message at DATA on "
            f"{endpoint(r.address, r.port)}"
        ),
        summary=" ".join(notes),
        evidence=[*accepted, *([control] if control is not None else [])],
    )


def _greeting(result: ProbeResult) -> str | None:
    first = next((ex for ex in result.transcript if ex.command is None and ex.reply), None)
    return str(first.reply) if first is not None and first.reply is not None else None


def _implicit(result: ProbeResult) -> bool:
    return any(r.transport is Transport.IMPLICIT_TLS for r in result.tests)


def _unapproved(ctx: _Context, expired: str | None = None) -> Finding:
    r = ctx.result
    why = "the ISO has not approved it." if expired is None else f"its approval ran out: {expired}."
    return ctx.finding(
        FindingKind.UNAPPROVED_SMTP,
        severity=Severity.MEDIUM,
        confidence=Confidence.HIGH,
        title=f"SMTP service not on the approved list: {endpoint(r.address, r.port)}",
        summary=(
            f"An SMTP server answers on {endpoint(r.address, r.port)} "
            f"({ctx.fingerprint.banner or 'no banner'}) and {why}"
        ),
    )


def _status_summary(status: VerdictStatus, group: list[TestResult], result: ProbeResult) -> str:
    unknown = next((r for r in group if r.outcome is TestOutcome.DOMAIN_UNKNOWN), None)
    if status is VerdictStatus.INCONCLUSIVE and unknown is not None:
        reply = unknown.rcpt or unknown.mail
        return (
            f"The server refused a test address's domain as unknown ({reply}), which says nothing "
            "about relaying: set relay.external_domains to domains that resolve (an MX the ISO "
            "controls). Inconclusive."
        )
    first = next((r for r in group if r.rcpt is not None or r.mail is not None), None)
    sample = ""
    if first is not None:
        reply = first.rcpt or first.mail
        sample = f" (e.g. {reply})" if reply is not None else ""
    if status is VerdictStatus.RELAY_REFUSED:  # the one summary that counts them
        syntax = sum(1 for r in group if _syntax_refusal(r))
        how = f" ({syntax} of them as bad address syntax, 501 / x.1.3)" if syntax else ""
        return f"All {len(group)} relay tests refused{sample}{how}."
    return {
        VerdictStatus.AUTH_REQUIRED: f"Relaying needs authentication{sample}.",
        VerdictStatus.TLS_REQUIRED: f"The server requires STARTTLS before mail{sample}.",
        VerdictStatus.INCONCLUSIVE: (
            f"Temporary refusals (greylisting or rate limits) again on a retry "
            f"{result.retried_after:.0f}s after the first try{sample}."
            if result.retried_after is not None
            else f"Temporary refusals (greylisting or rate limits): retry later{sample}."
        ),
    }.get(status, result.error or status.value)


def _after_starttls_summary(
    after: VerdictStatus,
    plain_group: list[TestResult],
    tls_group: list[TestResult],
    result: ProbeResult,
) -> str:
    """A port that requires STARTTLS, judged by what the battery met inside TLS."""
    before = _status_summary(VerdictStatus.TLS_REQUIRED, plain_group, result)
    inside = _status_summary(after, tls_group, result)
    text = f"{before} After STARTTLS: {inside[0].lower()}{inside[1:]}"
    facts = result.facts
    offered = facts.after_starttls if facts is not None else None
    if offered is not None and offered.auth_mechanisms and facts is not None:
        where = "only after STARTTLS" if not facts.auth_mechanisms else "after STARTTLS"
        text += f" It offers AUTH {' '.join(offered.auth_mechanisms)} {where}."
    return text


def _syntax_refusal(result: TestResult) -> bool:
    """Refused for how the address is written (the odd forms), not as a relay attempt."""
    reply = result.rcpt or result.mail
    if reply is None or result.outcome not in (TestOutcome.REFUSED, TestOutcome.SENDER_REFUSED):
        return False
    return reply.code == 501 or (reply.enhanced or "")[1:] in (".1.3", ".5.2", ".5.4")
