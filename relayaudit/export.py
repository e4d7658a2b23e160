"""`relayaudit report`: the findings of the state store(s), or of one sweep, as CSV, Markdown or JSON.

One `Report` model holds the data (header, findings, what changed); each format renders it.
The JSON form is that model (`schemas/report.v1.schema.json`); docs/findings.md documents it.
The HTML page (the default format) shows more than this model and is html_report.py's.

Markdown, CSV and `render_shown` are read by people: server text in them passes `text.visible`
(a newline, terminal escape or bidi override shows as an escape), so it can neither start a line
or a row nor reorder one. The JSON form keeps the text exactly, escaped only as JSON requires.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from relayaudit import __version__, records
from relayaudit.alert_doc import ALERT_SCHEMA_VERSION, AlertV1, AlertV2
from relayaudit.errors import UsageError
from relayaudit.evidence import address_order, endpoint
from relayaudit.records import FindingStatus
from relayaudit.remediation import RemediationRef, advice, advice_text
from relayaudit.software import describe
from relayaudit.state import Change, FindingRow, read_changes, read_findings
from relayaudit.text import utc_time, visible, wrap
from relayaudit.verdict import Confidence, Finding, FindingKind, Owner, Severity

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "Format",
    "Report",
    "ReportFinding",
    "Shown",
    "TextFormat",
    "find",
    "format_of",
    "from_stores",
    "from_sweep",
    "render",
    "render_shown",
    "report_of",
    "schema_files",
]

REPORT_SCHEMA_VERSION = 1
Format = Literal["html", "csv", "md", "json"]
TextFormat = Literal["csv", "md", "json"]  # what `render` writes; HTML is html_report.py's
CSV_COLUMNS = (
    "id",
    "kind",
    "severity",
    "confidence",
    "status",
    "address",
    "port",
    "first_seen",
    "last_seen",
    "resolved_at",
    "title",
    "approved_note",
    "last_sweep_id",
    "origin",
    "owner",
    "owner_contact",
    "owner_queue",
)
# a spreadsheet runs a cell that starts with one of these as a formula (CSV injection)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class ReportFinding(_Frozen):
    """One finding as a report lists it (the CSV's row)."""

    id: str
    kind: FindingKind
    severity: Severity
    confidence: Confidence
    status: FindingStatus | None  # null: a sweep with no state store
    address: str
    port: int
    first_seen: datetime
    last_seen: datetime
    resolved_at: datetime | None
    title: str
    summary: str
    approved_note: str | None
    last_sweep_id: str | None
    # the DNS names the address was found under (targets_from): "mx1.campus.example A (mx
    # campus.example)"; empty for an address from a range or a list file
    origin: tuple[str, ...] = ()
    # relays: the fix that applies (docs/remediation.md); the Markdown report prints its text
    remediation: RemediationRef | None = None
    # who runs the address (owners.py); null: nobody listed
    owner: Owner | None = None


class Report(_Frozen):
    schema_version: Literal[1] = 1
    tool: Literal["relayaudit"] = "relayaudit"
    tool_version: str = __version__
    generated_at: datetime
    sources: tuple[str, ...]  # the state files read, or "sweep <id>"
    since: datetime  # "what changed" covers transitions at or after this time
    findings: tuple[ReportFinding, ...]  # open findings first, most severe first
    changes: tuple[Change, ...]  # new, reopened, severity-raised and resolved, oldest first
    changes_note: str | None = None  # why "what changed" is empty, when it cannot be known
    # `report --owner NAME` (the name) or `--unowned` ("(no owner)"); null: every finding
    owner_filter: str | None = None


UNOWNED = "(no owner)"


def for_owner(report: Report, *, name: str | None = None, unowned: bool = False) -> Report:
    """The report of one owner's findings (`name`), or of those nobody owns (`unowned`): every
    section, what changed included, so a department's report shows no other's hosts."""
    if name is None and not unowned:
        return report
    kept = tuple(
        f
        for f in report.findings
        if (f.owner is None if unowned else f.owner is not None and f.owner.name == name)
    )
    ids = {f.id for f in kept}
    return report.model_copy(
        update={
            "findings": kept,
            "changes": tuple(c for c in report.changes if c.finding_id in ids),
            "owner_filter": UNOWNED if unowned else name,
        }
    )


def _order(f: ReportFinding) -> tuple[int, int, int, tuple[int, int], int, str]:
    closed = f.status is FindingStatus.RESOLVED
    return (
        closed,
        f.severity.rank,
        list(Confidence).index(f.confidence),
        address_order(f.address),
        f.port,
        f.kind.value,
    )


def _listed(
    f: Finding,
    *,
    status: FindingStatus | None,
    first_seen: datetime,
    last_seen: datetime,
    resolved_at: datetime | None,
    last_sweep_id: str | None,
) -> ReportFinding:
    """A finding as a report lists it, with what the store (if any) knows of its lifecycle."""
    return ReportFinding(
        id=f.id,
        kind=f.kind,
        severity=f.severity,
        confidence=f.confidence,
        status=status,
        address=f.address,
        port=f.port,
        first_seen=first_seen,
        last_seen=last_seen,
        resolved_at=resolved_at,
        title=f.title,
        summary=f.summary,
        approved_note=f.approved_note,
        last_sweep_id=last_sweep_id,
        origin=tuple(str(o) for o in f.origin),
        remediation=f.remediation,
        owner=f.owner,
    )


def _from_row(row: FindingRow) -> ReportFinding:
    return _listed(
        row.finding,
        status=row.status,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        resolved_at=row.resolved_at,
        last_sweep_id=row.last_sweep,
    )


def from_stores(paths: Sequence[Path], *, since: timedelta, now: datetime | None = None) -> Report:
    """The report of the state files (shards merged as `findings` merges them)."""
    now = now or datetime.now(UTC)
    start = now - since
    return report_of(
        read_findings(paths),
        read_changes(paths, since=start),
        sources=tuple(str(p) for p in paths),
        since=start,
        now=now,
    )


def report_of(
    rows: Iterable[FindingRow],
    changes: Iterable[Change],
    *,
    sources: Sequence[str],
    since: datetime,
    now: datetime,
) -> Report:
    """The report of findings and changes already read (the HTML page reads more of the store)."""
    return Report(
        generated_at=now,
        sources=tuple(sources),
        since=since,
        findings=tuple(sorted((_from_row(r) for r in rows), key=_order)),
        changes=tuple(c for c in changes if c.at >= since),
    )


def from_sweep(
    findings: Iterable[Finding], *, sweep_id: str, now: datetime | None = None
) -> Report:
    """The report of one `sweep` or `demo` run, which keeps no state store."""
    now = now or datetime.now(UTC)
    return Report(
        generated_at=now,
        sources=(f"sweep {sweep_id}",),
        since=now,
        findings=tuple(
            sorted(
                (
                    _listed(
                        f,
                        status=None,
                        first_seen=f.observed_at,
                        last_seen=f.observed_at,
                        resolved_at=None,
                        last_sweep_id=sweep_id,
                    )
                    for f in findings
                ),
                key=_order,
            )
        ),
        changes=(),
        changes_note=(
            "A single sweep keeps no state store, so nothing can be compared with an earlier "
            "sweep: run the daemon (relayaudit run) and `relayaudit report --config FILE`."
        ),
    )


class Shown(_Frozen):
    """`relayaudit show ID --json`: one finding whole, with its lifecycle and status changes."""

    schema_version: Literal[1] = 1
    status: FindingStatus
    first_seen: datetime
    last_seen: datetime
    resolved_at: datetime | None
    last_sweep_id: str
    changes: tuple[Change, ...]
    finding: Finding


def find(paths: Sequence[Path], finding_id: str) -> Shown | None:
    """The finding `finding_id` from the state files (its newest sighting), or None."""
    row = next((r for r in read_findings(paths) if r.id == finding_id), None)
    if row is None:
        return None
    return Shown(
        status=row.status,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        resolved_at=row.resolved_at,
        last_sweep_id=row.last_sweep,
        changes=tuple(read_changes(paths, finding_id=finding_id)),
        finding=row.finding,
    )


def _owner_text(owner: Owner | None) -> str:
    if owner is None:
        return "none listed (no [[owners]] range or owners_file row holds the address)"
    queue = f", queue {owner.queue}" if owner.queue else ""
    return f"{owner.name} <{owner.contact}>{queue}"


def render_shown(shown: Shown) -> str:
    """A finding whole, for a person: what, why, every test and reply, the transcript. Each
    line passes `visible`, so no server text in it can start another."""
    f = shown.finding
    lines = [
        f"{f.id}  {f.severity.value.upper()}  {f.kind.value}  confidence {f.confidence.value}",
        f"  {f.title}",
        *wrap(visible(f.summary), 100, indent="  "),
        "",
        f"  status:      {shown.status.value}",
        f"  first seen:  {utc_time(shown.first_seen)}",
        f"  last seen:   {utc_time(shown.last_seen)} (sweep {shown.last_sweep_id})",
    ]
    if shown.resolved_at is not None:
        lines.append(f"  resolved:    {utc_time(shown.resolved_at)}")
    lines.append(f"  seen from:   {f.vantage}")
    for i, origin in enumerate(f.origin):  # the DNS names the address was found under
        lines.append(f"  {'found as:' if i == 0 else '':13}{origin}")
    lines.append(f"  approval:    {f.approved_note or 'not on the approved list'}")
    lines.append(f"  owner:       {_owner_text(f.owner)}")
    if f.fingerprint.banner:
        lines.append(f"  greeting:    {f.fingerprint.banner}")
    if f.fingerprint.software_guess is not None:  # the weighed guess and its signs
        guessed = wrap(describe(f.fingerprint.software_guess), 86)
        lines += [f"  {'software:' if i == 0 else '':13}{part}" for i, part in enumerate(guessed)]
    if f.remediation is not None:
        lines += ["", *advice_text(f.remediation, width=98, indent="  ").splitlines()]
    if shown.changes:
        lines += ["", "status changes:"]
        lines += [
            f"  {utc_time(c.at)}  {c.transition.value:16} sweep {c.sweep_id}" for c in shown.changes
        ]
    if f.evidence:
        lines += ["", "evidence (each test and the server's reply):"]
        for t in f.evidence:
            lines.append(
                f"  {t.test.id} ({t.transport.value}, {t.test.role.value}): {t.outcome.value}"
            )
            lines.append(f"    MAIL FROM:<{t.test.mail_from}>  ->  {t.mail or t.error or ''}")
            if t.rcpt is not None:
                lines.append(f"    RCPT TO:<{t.test.rcpt_to}>  ->  {t.rcpt}")
    if f.transcript:
        lines += ["", "transcript:"]
        for ex in f.transcript:
            if ex.command is not None:
                lines.append(f"  C: {ex.command}")
            if ex.reply is not None:
                replies = ex.reply.text.split("\n")  # the reply's lines, as the wire joined them
                for i, text in enumerate(replies):
                    lines.append(
                        f"  S: {ex.reply.code}{'-' if i < len(replies) - 1 else ' '}{text}"
                    )
            if ex.error is not None:
                lines.append(f"  !  {ex.error}")
    return "".join(visible(line) + "\n" for line in lines)


_SUFFIXES: dict[str, Format] = {
    ".html": "html",
    ".htm": "html",
    ".md": "md",
    ".markdown": "md",
    ".csv": "csv",
    ".json": "json",
}


def format_of(path: Path) -> Format:
    """The format a `--report PATH` names by its suffix."""
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"--report: cannot tell the format of {str(path)!r} from its suffix: "
            "use .html, .md, .csv or .json"
        )
    return fmt


def render(report: Report, fmt: TextFormat) -> str:
    if fmt == "csv":
        return _csv(report)
    if fmt == "json":
        return report.model_dump_json(indent=2) + "\n"
    return _markdown(report)


def _cell(value: object) -> str:
    """A CSV cell a spreadsheet shows as text: on one line (`visible`), formula-like starts
    quoted with `'`."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="seconds")
    text = visible(str(value))
    return "'" + text if text.startswith(_FORMULA_START) else text


def _csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for f in report.findings:
        row = f.model_dump()
        row["origin"] = "; ".join(f.origin)
        row["owner"] = f.owner.name if f.owner else None
        row["owner_contact"] = f.owner.contact if f.owner else None
        row["owner_queue"] = f.owner.queue if f.owner else None
        writer.writerow([_cell(row[c]) for c in CSV_COLUMNS])
    return out.getvalue()


def _md(text: object) -> str:
    """A Markdown table cell: one line (`visible`), no pipe that would split it."""
    value = "" if text is None else visible(str(text))
    return " ".join(value.split()).replace("\\", "\\\\").replace("|", "\\|")


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else ""


def _markdown(report: Report) -> str:
    open_ = [f for f in report.findings if f.status is not FindingStatus.RESOLVED]
    resolved = [f for f in report.findings if f.status is FindingStatus.RESOLVED]
    lines = [
        "# relayaudit report",
        "",
        f"Generated {_when(report.generated_at)} by relayaudit {report.tool_version} from "
        f"{', '.join(report.sources)}.",
        *(
            ["", f"Only the findings of owner {_md(report.owner_filter)}."]
            if report.owner_filter not in (None, UNOWNED)
            else ["", "Only the findings nobody owns."]
            if report.owner_filter == UNOWNED
            else []
        ),
        "",
        f"## Open findings ({len(open_)})",
        "",
    ]
    if open_:
        # a "found as" column only where targets_from named some address (DNS names)
        named = any(f.origin for f in open_)
        lines += [
            "| severity | confidence | address:port | kind | title | status | first seen "
            "| last seen | approval | owner |" + (" found as |" if named else ""),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
            + (" --- |" if named else ""),
        ]
        lines += [
            f"| {f.severity.value} | {f.confidence.value} | {endpoint(f.address, f.port)} | "
            f"{f.kind.value} | {_md(f.title)} | {f.status.value if f.status else ''} | "
            f"{_when(f.first_seen)} | {_when(f.last_seen)} | {_md(f.approved_note)} | "
            f"{_md(f.owner.name if f.owner else '')} |"
            + (f" {_md('; '.join(f.origin))} |" if named else "")
            for f in open_
        ]
    else:
        lines.append("None.")
    lines += ["", f"## What changed since {_when(report.since)}", ""]
    if report.changes_note:
        lines.append(report.changes_note)
    elif report.changes:
        lines += [
            "| when | change | severity | address:port | kind | title |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {_when(c.at)} | {c.transition.value} | {c.severity.value} | "
            f"{endpoint(c.address, c.port)} | {c.kind.value} | {_md(c.title)} |"
            for c in report.changes
        ]
    else:
        lines.append("No finding was new, reopened, raised in severity or resolved.")
    fixes = [f for f in open_ if f.remediation is not None]
    if fixes:
        lines += ["", "## How to fix the relays", ""]
        lines.append(
            "Each open relay's fix, for the software it seems to run (docs/remediation.md; the "
            "links are the vendors' documentation)."
        )
        for f in fixes:
            assert f.remediation is not None
            lines += ["", f"### {endpoint(f.address, f.port)}: {_md(f.kind.value)}", ""]
            for heading, text, url in advice(f.remediation).sections:
                lines += [f"**{heading}.** {text} Documentation: <{url}>", ""]
            lines.pop()
    if resolved:
        lines += ["", f"## Resolved findings ({len(resolved)})", ""]
        lines += ["| address:port | kind | title | resolved |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {endpoint(f.address, f.port)} | {f.kind.value} | {_md(f.title)} | {_when(f.resolved_at)} |"
            for f in resolved
        ]
    return "\n".join(lines) + "\n"


def schema_files() -> dict[str, str]:
    """Every committed JSON Schema (finding record, report, alert), by file name under schemas/."""
    schema = Report.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    name = f"report.v{REPORT_SCHEMA_VERSION}.schema.json"
    alerts = {}
    # v1 is still sent where alerts.format = "v1": its schema stays committed beside v2's
    for version, model in ((1, AlertV1), (ALERT_SCHEMA_VERSION, AlertV2)):
        alert = model.model_json_schema(mode="serialization")
        alert["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        alerts[f"alert.v{version}.schema.json"] = json.dumps(alert, indent=2, sort_keys=True) + "\n"
    return records.schema_files() | {name: json.dumps(schema, indent=2, sort_keys=True) + "\n"} | alerts


if __name__ == "__main__":  # python -m relayaudit.export schemas/
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "schemas")
    out.mkdir(parents=True, exist_ok=True)
    for file, text in schema_files().items():
        (out / file).write_text(text, encoding="utf-8")
        print(out / file)
