"""Test data built by hand: findings, a probe's result with its verdict, probe settings for the lab."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from relayaudit.engine import SweepStats
from relayaudit.evidence import Exchange, PortState, ProbeResult, ProbeStatus, Reply
from relayaudit.settings import CanaryTarget, ProbeSettings
from relayaudit.state import Alert, StateStore
from relayaudit.verdict import (
    Confidence,
    Finding,
    FindingKind,
    Severity,
    Verdict,
    VerdictStatus,
    finding_id,
)

__all__ = [
    "ADDR",
    "SHARD",
    "T0",
    "assert_names_its_fix",
    "canary_target",
    "make_finding",
    "observe",
    "one_sweep",
    "probe_settings",
]

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)
ADDR = "127.0.9.7"  # data only: nothing connects to it
SHARD = "0/1"

_BANNER = (Exchange(command=None, reply=Reply(code=220, text="lab ESMTP")),)


def make_finding(
    kind: FindingKind = FindingKind.OPEN_RELAY,
    *,
    address: str = ADDR,
    port: int = 25,
    severity: Severity = Severity.HIGH,
    when: datetime = T0,
    title: str | None = None,
    summary: str | None = None,
    transcript: tuple[Exchange, ...] = _BANNER,
) -> Finding:
    """A finding as the verdict would make it, seen from 127.0.0.1 with high confidence."""
    return Finding(
        id=finding_id(kind, address, port),
        kind=kind,
        severity=severity,
        confidence=Confidence.HIGH,
        address=address,
        port=port,
        vantage="127.0.0.1",
        title=f"{kind.value} on {address}:{port}" if title is None else title,
        summary=f"seen at {when.isoformat()}" if summary is None else summary,
        observed_at=when,
        transcript=transcript,
    )


def observe(
    *findings: Finding,
    address: str = ADDR,
    port: int = 25,
    when: datetime = T0,
    status: VerdictStatus | None = None,
) -> tuple[ProbeResult, Verdict]:
    """One probe's result and verdict: an SMTP server with these findings, else a closed port.

    With no findings the verdict is `status` (default CLOSED); any status but CLOSED means an
    SMTP server answered.
    """
    smtp = bool(findings) or status not in (None, VerdictStatus.CLOSED)
    result = ProbeResult(
        address=address,
        port=port,
        vantage="127.0.0.1",
        started=when,
        finished=when,
        port_state=PortState.OPEN if smtp else PortState.CLOSED,
        status=ProbeStatus.SMTP if smtp else ProbeStatus.CLOSED,
    )
    verdict = Verdict(
        address=address,
        port=port,
        status=status or (VerdictStatus.OPEN_RELAY if findings else VerdictStatus.CLOSED),
        summary="test",
        findings=findings,
    )
    return result, verdict


def one_sweep(
    store: StateStore, *observations: tuple[ProbeResult, Verdict], fingerprint: str = "fp"
) -> list[Alert]:
    """One completed sweep of shard 0/1 that recorded these probes; the alerts they raised."""
    record = store.begin_sweep(shard=SHARD, config_fingerprint=fingerprint, total=len(observations))
    alerts: list[Alert] = []
    for result, verdict in observations:
        alerts += store.record(record.id, result, verdict)
    store.complete_sweep(record.id, SweepStats(finished=T0))
    return alerts


# what probe_settings() sets `pipelining` to: the `pipelining` fixture (tests/conftest.py) runs
# the verdict suites both ways, pipelined and in lock-step, by setting this
PIPELINING = True


def probe_settings(**changes: Any) -> ProbeSettings:
    """Settings for probing a lab: campus.test is the campus; `changes` set any other field."""
    fields: dict[str, Any] = {
        "helo_name": "relayaudit.campus.test",
        "campus_domains": ("campus.test",),
        "external_domains": ("relay-test.example", "sender.example"),
        "pipelining": PIPELINING,
    }
    return ProbeSettings(**{**fields, **changes})


def canary_target(domain: str) -> CanaryTarget:
    """Confirmation mode's canary address, canary@`domain`; the ISO's campus sender iso@campus.test."""
    return CanaryTarget(
        local_part="canary",
        domain=domain,
        contact="iso@campus.test",
        campus_sender="iso@campus.test",
    )


def assert_names_its_fix(finding: Finding, software: str) -> None:
    """A relay finding against a real MTA (issue 30): the software named at high confidence, and a
    reference to that software's fix for the way it relayed, an entry of the remediation data."""
    from relayaudit.remediation import entries, way_of  # noqa: PLC0415 - few tests need it

    guess = finding.fingerprint.software_guess
    assert guess is not None and guess.software is not None, guess
    assert (guess.name, guess.confidence.value) == (software, "high"), guess
    ref = finding.remediation
    way = way_of(finding.kind.value, finding.evidence).value
    assert ref is not None and ref.id == f"{guess.software.value}/{way}", (ref, way)
    assert ref.id in entries() and ref.software == software, ref
