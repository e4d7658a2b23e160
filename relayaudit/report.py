"""Human-readable renderings: one probe's verdict with tests and transcript, findings tables,
sweep summaries.

Every line is ours: server text (a reply, a certificate name, a title or summary quoting one)
passes `text.visible` where it is laid out, so a newline, a terminal escape or a bidi override
it carries is shown as an escape and can neither start a line nor reorder one.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from relayaudit.config import Config
from relayaudit.engine import SweepStats
from relayaudit.evidence import (
    ProbeResult,
    ProbeStatus,
    TestOutcome,
    TestResult,
    address_order,
    endpoint,
)
from relayaudit.text import clip, visible, wrap
from relayaudit.verdict import (
    Confidence,
    Finding,
    FindingKind,
    Owner,
    Severity,
    Verdict,
    VerdictStatus,
)

__all__ = [
    "FindingBrief",
    "FindingBriefs",
    "approval_text",
    "expiry_lines",
    "owner_text",
    "render_check",
    "render_findings",
    "render_summary",
    "render_table",
    "table",
    "terminal_width",
]

_MIN_TEXT = 24  # columns a table's last, free-text column keeps on the narrowest terminal
_NEEDS_APPROVAL = {ProbeStatus.SMTP, ProbeStatus.SESSION_REFUSED}


def terminal_width() -> int | None:
    """Columns to fit text to when standard output is a terminal; None for a file or a pipe,
    where every word is kept for grep, tickets and scripts (as systemctl does)."""
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


@dataclass(frozen=True, slots=True)
class FindingBrief:
    """What a findings table shows of one finding: a sweep keeps these, not whole findings with
    their transcripts, and `sweep --processes` children send them to the parent as JSON."""

    id: str
    kind: FindingKind
    severity: Severity
    confidence: Confidence
    address: str
    port: int
    title: str
    approved_note: str | None = None
    owner: str | None = None  # the owner's name (docs/owners.md); None: nobody listed

    @classmethod
    def of(cls, finding: Finding) -> FindingBrief:
        return cls(
            id=finding.id,
            kind=finding.kind,
            severity=finding.severity,
            confidence=finding.confidence,
            address=finding.address,
            port=finding.port,
            title=finding.title,
            approved_note=finding.approved_note,
            owner=finding.owner.name if finding.owner is not None else None,
        )

    def order(self) -> tuple[int, int, tuple[int, int], int, str, str]:
        """Most severe first, then the strongest evidence, then by address and port."""
        return (
            self.severity.rank,
            self.confidence.rank,
            address_order(self.address),
            self.port,
            self.kind.value,
            self.id,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind.value,
            "severity": self.severity.value,
            "confidence": self.confidence.value,
            "address": self.address,
            "port": self.port,
            "title": self.title,
            "approved_note": self.approved_note,
            "owner": self.owner,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FindingBrief:
        return cls(
            id=str(data["id"]),
            kind=FindingKind(data["kind"]),
            severity=Severity(data["severity"]),
            confidence=Confidence(data["confidence"]),
            address=str(data["address"]),
            port=int(data["port"]),
            title=str(data["title"]),
            approved_note=data.get("approved_note"),
            owner=data.get("owner"),
        )


class FindingBriefs:
    """Sink: the brief of every relay finding of a sweep, or of every finding (`everything`)."""

    wants_unreachable = False  # closed ports have no findings

    def __init__(self, *, everything: bool = False) -> None:
        self.everything = everything
        self.briefs: list[FindingBrief] = []

    async def emit(self, result: ProbeResult, verdict: Verdict) -> None:
        for f in verdict.findings:
            if self.everything or f.kind.is_relay:
                self.briefs.append(FindingBrief.of(f))


def expiry_lines(config: Config, today: date, *, within: int = 30) -> list[str]:
    """`config check`: the approvals that expired (their services are findings again) and
    those that expire within `within` days of `today`, soonest first."""
    lines = [
        f"expired after {a.expires}: {a.describe()}"
        for a in sorted(config.approved, key=lambda a: a.expires or date.max)
        if a.expires is not None and a.expires < today
    ]
    for a in config.expiring(today, within=within):
        assert a.expires is not None
        days = (a.expires - today).days
        when = "today is its last day" if days == 0 else f"{days} day{'s' * (days != 1)} left"
        lines.append(f"expires {a.expires} ({when}): {a.describe()}")
    return lines


def approval_text(approved_note: str | None) -> str:
    """The approval of an SMTP service: its note (None: not approved, "": approved, no note)."""
    if approved_note is None:
        return "not on the approved list"
    return f"approved: {approved_note}" if approved_note else "approved (no note)"


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int | None = None,
    notes: Sequence[str | None] = (),
) -> list[str]:
    """A header and rows: each column as wide as its widest cell, two spaces apart. The last
    column is free text, clipped at a word boundary to what `width` leaves (at least 24
    columns); `notes[i]`, if given, is a line of its own under row i, in the last column.
    Every cell and note passes `visible`: a cell is never more than its one line."""
    header = [visible(cell) for cell in header]
    rows = [[visible(cell) for cell in row] for row in rows]
    lead_cells = [r[:-1] for r in (header, *rows)]
    widths = [max(len(r[i]) for r in lead_cells) for i in range(len(header) - 1)]
    lead = sum(w + 2 for w in widths)
    room = None if width is None else max(_MIN_TEXT, width - lead)
    lines = []
    for i, row in enumerate((header, *rows)):
        pads = "".join(v.ljust(w + 2) for v, w in zip(row[:-1], widths, strict=True))
        lines.append(pads + clip(row[-1], room))
        note = notes[i - 1] if 0 < i <= len(notes) else None
        if note is not None:
            lines.append(" " * lead + clip(visible(note), room))
    return lines


def render_table(
    briefs: Iterable[FindingBrief], *, width: int | None = None, owners: bool = False
) -> list[str]:
    """One line per finding, in `FindingBrief.order`; an approved service's note follows on a
    line of its own. `owners` (the config has an owner table): an owner column, "-" for an
    address nobody owns."""
    rows = sorted(briefs, key=FindingBrief.order)
    header = ("severity", "confidence", "address:port", "kind", "finding id")
    return table(
        (*header, *(("owner",) if owners else ()), "title"),
        [
            (
                b.severity.value,
                b.confidence.value,
                endpoint(b.address, b.port),
                b.kind.value,
                b.id,
                *((b.owner or "-",) if owners else ()),
                b.title,
            )
            for b in rows
        ],
        width=width,
        notes=[
            approval_text(b.approved_note) if b.approved_note is not None else None for b in rows
        ],
    )


def _first_line(text: str) -> str:
    """A reply's first line: the wire joins a multi-line reply's lines with "\\n", and only there."""
    return text.split("\n", 1)[0]


def _reply(result: TestResult) -> str:
    if result.rcpt is not None:
        return f"{result.rcpt.code} {_first_line(result.rcpt.text)}"
    if result.mail is not None:
        return f"MAIL {result.mail.code} {_first_line(result.mail.text)}"
    return result.error or ""


def render_findings(findings: Iterable[Finding], *, width: int | None = None) -> list[str]:
    """Each finding whole, in the order of the findings tables, wrapped to `width`."""
    indent = " " * 13
    lines = []
    for f in sorted(findings, key=lambda f: FindingBrief.of(f).order()):
        lines.append(
            f"  [{f.severity.value:8}] {f.kind.value:24} {f.id}  confidence {f.confidence.value}"
        )
        lines += wrap(visible(f.title), width, indent=indent)
        lines += wrap(visible(f.summary), width, indent=indent)
        if f.approved_note is not None:
            lines += wrap(visible(approval_text(f.approved_note)), width, indent=indent)
        if f.owner is not None:
            lines += wrap(visible(f"owner: {owner_text(f.owner)}"), width, indent=indent)
    return lines


def owner_text(owner: Owner) -> str:
    """`Chemistry <it@chem.campus.example>, queue chem-it`, as `show` names an owner."""
    queue = f", queue {owner.queue}" if owner.queue else ""
    return f"{owner.name} <{owner.contact}>{queue}"


def render_check(
    result: ProbeResult,
    verdict: Verdict,
    *,
    transcript: bool = True,
    approved_note: str | None = None,
    approvals: bool = True,
    width: int | None = None,
) -> str:
    """One probe for `check`; `approved_note` as in `approval_text` (`approvals` False: no
    approved list was given). Each line passes `visible`, so no server text in it can start
    another."""
    lines = [
        f"{endpoint(result.address, result.port)}  {verdict.status.value.upper()}  (seen from {result.vantage})"
    ]
    lines += wrap(visible(verdict.summary), width, indent="  ")
    if result.status in _NEEDS_APPROVAL:
        lines.append(
            f"  {approval_text(approved_note)}"
            if approvals
            else "  no approved list given (--config names one)"
        )
    facts = result.facts
    if facts is not None:
        lines.append(f"  greeting: {facts.banner}")
        software = f"  software: {facts.software}" if facts.software else ""
        lines.append(
            f"  {'EHLO' if facts.ehlo else 'HELO only'}: {' '.join(facts.capabilities) or '-'}{software}"
        )
        if facts.auth_mechanisms:
            lines.append(f"  AUTH: {' '.join(facts.auth_mechanisms)}")
        tls = facts.tls
        if tls is not None:
            if tls.error:
                lines.append(f"  TLS: failed: {tls.error}")
            else:
                expiry = tls.not_after.date().isoformat() if tls.not_after else "?"
                lines.append(
                    f"  TLS: {tls.protocol} {tls.cipher}; subject {tls.subject}; issuer {tls.issuer}; "
                    f"expires {expiry}{'; self-signed' if tls.self_signed else ''}"
                )
    if verdict.findings:
        lines.append("findings:")
        lines.extend(render_findings(verdict.findings, width=width))
    if result.tests:
        lines.append("relay tests:")
        for t in result.tests:
            mark = "ACCEPTED" if t.outcome is TestOutcome.ACCEPTED else t.outcome.value
            # the addresses are the evidence: whole; the reply takes what the line has left
            pair = f"<{t.test.mail_from}> -> <{t.test.rcpt_to}>"
            start = f"  {t.transport.value:12} {t.test.id:28} {mark:14} {pair:70} "
            room = None if width is None else max(_MIN_TEXT, width - len(start))
            lines.append(start + clip(visible(_reply(t)), room))
    conf = result.confirmation
    if conf is not None:
        state = {True: "ARRIVED", False: "did not arrive", None: "not known"}[conf.delivered]
        lines.append(
            f"confirmation: token {conf.token} via {conf.test_id} ({conf.transport.value}) to <{conf.rcpt_to}>: "
            f"sent={conf.sent} {state}{'; ' + conf.error if conf.error else ''}"
        )
    if transcript and result.transcript:
        lines.append("transcript:")
        for ex in result.transcript:
            if ex.command is not None:
                lines.append(f"  C: {ex.command}")
            if ex.reply is not None:
                replies = ex.reply.text.split("\n")  # the reply's lines, as the wire joined them
                for i, text in enumerate(replies):
                    sep = "-" if i < len(replies) - 1 else " "
                    lines.append(f"  S: {ex.reply.code}{sep}{text}")
            if ex.error is not None:
                lines.append(f"  !  {ex.error}")
    return "\n".join(visible(line) for line in lines)


def render_summary(stats: SweepStats) -> str:
    elapsed = ((stats.finished or stats.started) - stats.started).total_seconds()
    lines = [
        f"sweep: {stats.hosts} hosts, {stats.probes} address:port probes in {elapsed:.1f}s",
        "",
        f"  {'status':28} {'count':>7}",
    ]
    for status in VerdictStatus:
        if stats.statuses.get(status):
            lines.append(f"  {status.value:28} {stats.statuses[status]:>7}")
    if stats.findings:
        lines += ["", f"  {'finding kind':28} {'count':>7}"]
        for kind, count in sorted(stats.findings.items()):
            lines.append(f"  {kind:28} {count:>7}")
    return "\n".join(lines)
