"""The document an alert hook receives: the compact, versioned alert v2 (the default), v1, or the finding whole.

v1 is what a ticket needs, in under 4 KB: what changed, where, how bad, since when, and the first
tests with their replies. v2 (issues 29 and 30, released together) is v1 and a relay's
`remediation`: a reference to the fix for the software it seems to run (the text is relayaudit's
data, rendered for templates as `remediation.text`), the finding's `owner`, and the transition
v1 cannot say, `owner-changed`, with `previous_owner`. The full evidence stays one step away:
`relayaudit show FINDING_ID`
and `GET /findings/<id>.json` on the daemon's listener. schemas/alert.v1.schema.json and
alert.v2.schema.json are generated from `AlertV1` and `AlertV2` (python -m relayaudit.export
schemas/) and tested like the findings schema.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from relayaudit import __version__
from relayaudit.evidence import endpoint
from relayaudit.records import EVIDENCE_LINES, FindingStatus, Transition, evidence_line
from relayaudit.remediation import RelayWay, RemediationRef, advice_text, entries
from relayaudit.software import GuessConfidence
from relayaudit.state import Alert
from relayaudit.text import utc_time
from relayaudit.verdict import Confidence, FindingKind, Owner, Severity

__all__ = [
    "ALERT_SCHEMA_VERSION",
    "AlertFormat",
    "AlertV1",
    "AlertV2",
    "alert_document",
    "alert_v1",
    "alert_v2",
    "carries",
    "remediation_context",
    "render_payload",
    "sample_alert",
]

ALERT_SCHEMA_VERSION = 2
AlertFormat = Literal["v2", "v1", "full"]
_SUMMARY, _TITLE = 1200, 300  # characters: a long server reply cannot push an alert past 4 KB


class _V1:
    """Alert v1's own vocabulary: its committed schema (schemas/alert.v1.schema.json) stays as it
    was, byte for byte, for receivers that validate against it."""

    class Transition(StrEnum):
        """The changes of a finding that raise an alert; nothing else does."""

        NEW = "new"
        REOPENED = "reopened"
        SEVERITY_RAISED = "severity-raised"
        RESOLVED = "resolved"


def carries(fmt: AlertFormat, transition: Transition) -> bool:
    """Whether the document of `fmt` can say `transition`: v1 and full (relayaudit 0.1's) know
    nothing of owners, so an owner-changed alert exists in v2 only."""
    return fmt == "v2" or transition is not Transition.OWNER_CHANGED


class AlertV1(BaseModel):
    """One transition of one finding, as hooks receive it (`alerts.format = "v1"`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1  # ALERT_SCHEMA_VERSION
    tool: Literal["relayaudit"] = "relayaudit"
    tool_version: str = __version__
    idempotency_key: str = Field(description="the same for every delivery of this alert")
    transition: _V1.Transition
    finding_id: str
    kind: FindingKind
    severity: Severity
    previous_severity: Severity | None = Field(
        default=None, description="for severity-raised: the severity before"
    )
    confidence: Confidence
    status: FindingStatus | None = Field(
        default=None, description="the finding's status after this transition"
    )
    address: str
    port: int
    endpoint: str = Field(description="address:port ([v6]:port)")
    server_name: str | None = Field(
        default=None,
        description="the host name the server gives in its greeting, else its certificate's subject",
    )
    title: str
    summary: str = Field(description="what this transition means, in one paragraph")
    first_seen: datetime
    last_seen: datetime
    resolved_at: datetime | None = None
    created: datetime = Field(description="when the alert was raised")
    sweep_id: str
    shard: str | None = None
    approval_note: str | None = Field(
        default=None, description="the [[approved]] entry's note, for an approved service"
    )
    evidence: tuple[str, ...] = Field(
        default=(), description=f"up to {EVIDENCE_LINES} tests: what was sent, what the server said"
    )
    show: str = Field(description="the command that prints the whole finding")


class AlertV2(AlertV1):
    """v1 and, for a relay, which fix applies (`alerts.format = "v2"`, the default)."""

    schema_version: Literal[2] = 2  # type: ignore[assignment]  # ALERT_SCHEMA_VERSION
    transition: Transition  # type: ignore[assignment]  # v1's and owner-changed
    remediation: RemediationRef | None = Field(
        default=None,
        description=(
            "relays: the fix for the way it relayed, on the software it seems to run: id (an "
            "entry of docs/remediation.md), software, guess_confidence, doc_url"
        ),
    )
    owner: Owner | None = Field(
        default=None,
        description="who runs the address (name, contact, queue), from the owner table; null: "
        "nobody listed",
    )
    previous_owner: Owner | None = Field(
        default=None, description="for owner-changed: who owned it before (name, contact, queue)"
    )


def _cut(text: str, limit: int) -> str:
    """At most `limit` characters, the text as it is (JSON escapes it; people's renderers
    neutralise it), with "…" where it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _summary(alert: Alert, first_seen: datetime, last_seen: datetime) -> str:
    f = alert.finding
    match alert.transition:
        case Transition.RESOLVED:
            when = f" on {utc_time(alert.resolved_at)}" if alert.resolved_at else ""
            return (
                f"Resolved{when}: not seen since {utc_time(last_seen)} (first seen "
                f"{utc_time(first_seen)}); the sweeps since found it gone. It was: {f.title}."
            )
        case Transition.REOPENED:
            return f"Seen again after it had been resolved. {f.summary}"
        case Transition.SEVERITY_RAISED:
            before = alert.previous_severity.value if alert.previous_severity else "lower"
            return f"Severity raised from {before} to {f.severity.value}. {f.summary}"
        case Transition.OWNER_CHANGED:
            return (
                f"Owner changed from {_owner_text(alert.previous_owner)} to "
                f"{_owner_text(f.owner)}: the owner table now lists the address under another "
                f"owner. {f.summary}"
            )
        case _:
            return f.summary


def _owner_text(owner: Owner | None) -> str:
    if owner is None:
        return "nobody"
    return f"{owner.name} (queue {owner.queue})" if owner.queue else owner.name


def alert_v1(alert: Alert) -> AlertV1:
    """The compact alert of `alert` (alerts stored by relayaudit 0.1 fall back to the finding's
    time where they lack the lifecycle); ValueError for an owner-changed alert (see `carries`)."""
    if not carries("v1", alert.transition):
        raise ValueError(f"alert {alert.key}: the alert v1 has no {alert.transition.value}")
    return AlertV1(**_fields(alert))


def _fields(alert: Alert) -> dict[str, Any]:
    """What the v1 and v2 alerts share, but `schema_version`."""
    f = alert.finding
    first_seen = alert.first_seen or f.observed_at
    last_seen = alert.last_seen or f.observed_at
    tls = f.fingerprint.tls
    return dict(
        idempotency_key=alert.key,
        transition=alert.transition,
        finding_id=f.id,
        kind=f.kind,
        severity=f.severity,
        previous_severity=alert.previous_severity,
        confidence=f.confidence,
        status=alert.status,
        address=f.address,
        port=f.port,
        endpoint=endpoint(f.address, f.port),
        server_name=_cut(f.fingerprint.hostname or (tls.subject if tls else None) or "", 255)
        or None,
        title=_cut(f.title, _TITLE),
        summary=_cut(_summary(alert, first_seen, last_seen), _SUMMARY),
        first_seen=first_seen,
        last_seen=last_seen,
        resolved_at=alert.resolved_at,
        created=alert.created,
        sweep_id=alert.sweep_id,
        shard=alert.shard,
        approval_note=_cut(f.approved_note, _TITLE) if f.approved_note else None,
        evidence=tuple(evidence_line(r) for r in f.evidence[:EVIDENCE_LINES]),
        show=f"relayaudit show {f.id}",
    )


def alert_v2(alert: Alert) -> AlertV2:
    """The compact alert with the finding's remediation reference and owners."""
    return AlertV2(
        **_fields(alert),
        remediation=alert.finding.remediation,
        owner=alert.finding.owner,
        previous_owner=alert.previous_owner,
    )


def remediation_context(ref: RemediationRef | None) -> dict[str, Any] | None:
    """What templates see as `remediation`: the reference and its text, ready to print."""
    if ref is None:
        return None
    return {**ref.model_dump(mode="json"), "text": advice_text(ref, width=88)}


def alert_document(alert: Alert, fmt: AlertFormat = "v2") -> dict[str, Any]:
    """The JSON document of `alert` in the configured format (ValueError where the format
    cannot say the transition: see `carries`)."""
    if not carries(fmt, alert.transition):
        raise ValueError(f"alert {alert.key}: the {fmt} document has no {alert.transition.value}")
    if fmt == "v2":
        return alert_v2(alert).model_dump(mode="json")
    if fmt == "v1":
        return alert_v1(alert).model_dump(mode="json")
    return {  # "full": relayaudit 0.1's document, evidence and transcript included
        "idempotency_key": alert.key,
        "transition": alert.transition.value,
        "sweep_id": alert.sweep_id,
        "created": alert.created.isoformat(),
        "finding": alert.finding.model_dump(mode="json"),
    }


def render_payload(alert: Alert, fmt: AlertFormat = "v2") -> bytes:
    """The alert document as the bytes a hook receives when it has no template."""
    return json.dumps(
        alert_document(alert, fmt), ensure_ascii=False, separators=(",", ":")
    ).encode()


def sample_alert(transition: Transition) -> AlertV2:
    """A made-up alert of `transition` (192.0.2.25, a documentation address): what templates are
    tried on when the config is loaded, so a missing `vars.NAME` shows then, not at resolve time."""
    when = datetime(2026, 1, 1, tzinfo=UTC)
    resolved = transition is Transition.RESOLVED
    moved = transition is Transition.OWNER_CHANGED
    fix = entries()[f"postfix/{RelayWay.PLAIN.value}"]
    return AlertV2(
        idempotency_key=f"ra-0000000000000000/{transition.value}/1",
        transition=transition,
        finding_id="ra-0000000000000000",
        kind=FindingKind.OPEN_RELAY,
        severity=Severity.CRITICAL,
        previous_severity=Severity.HIGH if transition is Transition.SEVERITY_RAISED else None,
        confidence=Confidence.HIGH,
        status=FindingStatus.RESOLVED if resolved else FindingStatus.NEW,
        address="192.0.2.25",
        port=25,
        endpoint="192.0.2.25:25",
        server_name="mx.campus.example",
        title="Open relay on 192.0.2.25:25",
        summary="A sample alert: relays mail from outside to outside.",
        first_seen=when,
        last_seen=when,
        resolved_at=when if resolved else None,
        created=when,
        sweep_id="sample",
        shard="0/1",
        approval_note=None,
        evidence=("rcpt-plain (plain): <a@example.org> 250, <b@example.net> 250 -> accepted",),
        show="relayaudit show ra-0000000000000000",
        remediation=RemediationRef(
            id=fix.id,
            software="Postfix",
            guess_confidence=GuessConfidence.HIGH,
            doc_url=fix.doc_url,
        ),
        owner=Owner(name="Chemistry", contact="it-support@chem.campus.example", queue="chem-it"),
        previous_owner=Owner(name="Central IT", contact="noc@campus.example", queue="noc")
        if moved
        else None,
    )
