"""Findings tables and the figures behind them: order, clipping, approval notes, the stats' JSON."""

from __future__ import annotations

import io
import re
import sys

import pytest
from factories import make_finding, observe

from relayaudit.engine import SweepStats
from relayaudit.report import (
    FindingBrief,
    FindingBriefs,
    render_findings,
    render_table,
    table,
    terminal_width,
)
from relayaudit.verdict import Confidence, Finding, FindingKind, Owner, Severity, VerdictStatus


def finding(
    kind: FindingKind, address: str, severity: Severity, confidence: Confidence, port: int = 25
) -> Finding:
    title = f"{kind.value} on {address}:{port} with a title long enough to need clipping"
    made = make_finding(kind, address=address, port=port, severity=severity, title=title)
    return made.model_copy(update={"confidence": confidence})


# in the order the tables must show them: severity, then confidence, then address (numeric,
# IPv4 before IPv6), then port
ORDERED = [
    finding(FindingKind.OPEN_RELAY, "127.0.0.9", Severity.CRITICAL, Confidence.CONFIRMED),
    finding(FindingKind.RELAY_AFTER_STARTTLS, "::1", Severity.CRITICAL, Confidence.CONFIRMED),
    finding(FindingKind.OPEN_RELAY, "127.0.0.10", Severity.HIGH, Confidence.HIGH),
    finding(FindingKind.OPEN_RELAY, "127.0.0.2", Severity.MEDIUM, Confidence.MEDIUM),
    finding(FindingKind.RELAY_CAMPUS_SENDER, "127.0.0.1", Severity.MEDIUM, Confidence.LOW),
    finding(FindingKind.UNAPPROVED_SMTP, "127.0.0.1", Severity.MEDIUM, Confidence.LOW, 587),
    finding(FindingKind.ACCEPTS_WITHOUT_DELIVERY, "127.0.0.3", Severity.LOW, Confidence.HIGH),
]


def test_table_order_is_severity_confidence_address() -> None:
    lines = render_table(map(FindingBrief.of, reversed(ORDERED)))
    assert lines[0].split() == [
        "severity",
        "confidence",
        "address:port",
        "kind",
        "finding",
        "id",
        "title",
    ]
    assert [line.split()[4] for line in lines[1:]] == [f.id for f in ORDERED]
    assert [line.split()[2] for line in lines[1:]] == [
        "127.0.0.9:25",
        "[::1]:25",
        "127.0.0.10:25",
        "127.0.0.2:25",
        "127.0.0.1:25",
        "127.0.0.1:587",
        "127.0.0.3:25",
    ]
    # without a width (a file or a pipe) every title is whole
    assert all(line.endswith(f.title) for line, f in zip(lines[1:], ORDERED, strict=True))


def test_table_clips_titles_at_a_word_to_the_width() -> None:
    lines = render_table(map(FindingBrief.of, ORDERED), width=110)
    assert all(len(line) <= 110 for line in lines)
    for line, f in zip(lines[1:], ORDERED, strict=True):
        shown = line.split(f.id, 1)[1].strip()
        assert shown.endswith("…")
        assert f.title.startswith(shown[:-1] + " ")  # whole words, then the ellipsis


def test_table_shows_the_approval_note_under_its_finding() -> None:
    approved = ORDERED[2].model_copy(update={"approved_note": "ISO-0042 department hub"})
    lines = render_table([FindingBrief.of(approved), FindingBrief.of(ORDERED[0])])
    assert lines[2].split()[4] == approved.id
    title_column = lines[0].index("title")
    assert lines[3] == " " * title_column + "approved: ISO-0042 department hub"


def test_table_has_an_owner_column_when_the_config_has_owners() -> None:
    owned = ORDERED[0].model_copy(
        update={"owner": Owner(name="Chemistry", contact="it@chem.campus.example")}
    )
    briefs = [FindingBrief.of(owned), FindingBrief.of(ORDERED[2])]
    assert "owner" not in render_table(briefs)[0].split()
    lines = render_table(briefs, owners=True)
    assert lines[0].split()[6:] == ["owner", "title"]  # "finding id" is two words
    assert [line.split()[5] for line in lines[1:]] == ["Chemistry", "-"]
    # and the owner survives the pipe from a sweep process
    assert FindingBrief.from_json(briefs[0].to_json()).owner == "Chemistry"


def test_check_lists_findings_in_the_table_order() -> None:
    lines = render_findings(reversed(ORDERED))
    ids = [re.search(r"ra-[0-9a-f]{16}", line) for line in lines if line.startswith("  [")]
    assert [m.group() if m else None for m in ids] == [f.id for f in ORDERED]


def test_a_table_has_its_header_and_pads_every_column_but_the_last() -> None:
    assert table(("a", "bb", "text"), [("long cell", "x", "free text here")]) == [
        "a          bb  text",
        "long cell  x   free text here",
    ]
    assert table(("a", "text"), [("x", "one two three four five six seven")], width=28) == [
        "a  text",
        "x  one two three four five…",
    ]


async def test_the_briefs_sink_keeps_relays_or_everything() -> None:
    relay, unapproved = ORDERED[0], ORDERED[5]
    relays, everything = FindingBriefs(), FindingBriefs(everything=True)
    for sink in (relays, everything):
        await sink.emit(*observe(relay, unapproved))
    assert [b.id for b in relays.briefs] == [relay.id]
    assert [b.id for b in everything.briefs] == [relay.id, unapproved.id]


def test_a_brief_survives_the_pipe_from_a_sweep_process() -> None:
    brief = FindingBrief.of(ORDERED[1].model_copy(update={"approved_note": ""}))
    assert FindingBrief.from_json(brief.to_json()) == brief


def test_stats_carry_the_relay_finding_ids_through_json_and_merge() -> None:
    one, two = SweepStats(), SweepStats()
    one.statuses[VerdictStatus.OPEN_RELAY] += 1
    one.relay_findings.append(ORDERED[0].id)
    two.statuses[VerdictStatus.RELAY_AFTER_STARTTLS] += 1
    two.relay_findings.append(ORDERED[1].id)
    merged = SweepStats.merge([SweepStats.from_json(s.to_json()) for s in (one, two)])
    assert merged.relay_findings == [ORDERED[0].id, ORDERED[1].id]
    assert merged.relays == 2


def test_text_fits_a_terminal_and_stays_whole_in_files_and_pipes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert terminal_width() is None
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert terminal_width() == 100
