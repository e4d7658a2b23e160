"""`relayaudit report`'s data and formats: CSV (injection-safe), Markdown, JSON against its schema."""

from __future__ import annotations

import csv
import io
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
from factories import make_finding, observe

from relayaudit.export import CSV_COLUMNS, find, from_stores, from_sweep, render, render_shown
from relayaudit.progress import SweepStats
from relayaudit.records import FindingStatus
from relayaudit.state import StateStore
from relayaudit.verdict import FindingKind

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "report.v1.schema.json"
V1_STORE = Path(__file__).parent / "data" / "state-v1.sqlite"


def _store_with_history(path: Path) -> None:
    """Sweep 1: a relay and a hostile title; sweep 2: the relay is gone (resolve_after=1)."""
    relay = make_finding(FindingKind.OPEN_RELAY, address="127.0.0.8")
    hostile = make_finding(
        FindingKind.UNAPPROVED_SMTP,
        address="127.0.0.9",
        title='=HYPERLINK("http://x.invalid")|pipe',
    )
    with StateStore(path, resolve_after=1) as store:
        first = store.begin_sweep(shard="0/1", config_fingerprint="fp", total=2)
        store.record(first.id, *observe(relay, address="127.0.0.8"))
        store.record(first.id, *observe(hostile, address="127.0.0.9"))
        store.complete_sweep(first.id, _stats())
        second = store.begin_sweep(shard="0/1", config_fingerprint="fp", total=2)
        store.record(second.id, *observe(address="127.0.0.8"))  # the relay is gone
        store.record(second.id, *observe(hostile, address="127.0.0.9"))
        store.complete_sweep(second.id, _stats())


def _stats() -> SweepStats:
    stats = SweepStats()
    stats.finished = stats.started
    return stats


def test_csv_names_each_finding_and_neutralises_formulas(tmp_path: Path) -> None:
    _store_with_history(tmp_path / "state.sqlite")
    report = from_stores([tmp_path / "state.sqlite"], since=timedelta(days=7))
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    assert tuple(rows[0]) == CSV_COLUMNS
    by_kind = {r["kind"]: r for r in rows}
    assert by_kind["open-relay"]["address"] == "127.0.0.8"
    assert by_kind["open-relay"]["status"] == "resolved"
    assert by_kind["unapproved-smtp"]["status"] == "ongoing"
    # a cell starting with = is text in a spreadsheet, not a formula
    assert by_kind["unapproved-smtp"]["title"].startswith("'=HYPERLINK(")
    assert all(r["last_sweep_id"] and r["first_seen"].endswith("+00:00") for r in rows)


def test_what_changed_lists_new_and_resolved_within_the_window(tmp_path: Path) -> None:
    _store_with_history(tmp_path / "state.sqlite")
    report = from_stores([tmp_path / "state.sqlite"], since=timedelta(days=7))
    assert [(c.transition.value, c.kind.value) for c in report.changes] == [
        ("new", "open-relay"),
        ("new", "unapproved-smtp"),
        ("resolved", "open-relay"),
    ]
    later = datetime.now(UTC) + timedelta(hours=1)
    assert (
        from_stores([tmp_path / "state.sqlite"], since=timedelta(minutes=5), now=later).changes
        == ()
    )
    markdown = render(report, "md")
    assert "## What changed since" in markdown and "| resolved |" in markdown
    # a pipe in server-provided text cannot split a Markdown table row
    assert '=HYPERLINK("http://x.invalid")\\|pipe' in markdown


def test_json_validates_against_the_committed_schema(tmp_path: Path) -> None:
    _store_with_history(tmp_path / "state.sqlite")
    data = json.loads(
        render(from_stores([tmp_path / "state.sqlite"], since=timedelta(days=7)), "json")
    )
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.validators.validator_for(schema)(schema).validate(data)
    assert [f["status"] for f in data["findings"]] == ["ongoing", "resolved"]  # open first


def test_a_single_sweep_reports_its_findings_and_says_why_nothing_changed() -> None:
    findings = [make_finding(address="127.0.0.10"), make_finding(address="127.0.0.2")]
    report = from_sweep(findings, sweep_id="abc123")
    assert report.changes == () and report.changes_note
    # same severity and confidence: numeric address order (text order would put .10 first)
    assert [f.address for f in report.findings] == ["127.0.0.2", "127.0.0.10"]
    assert all(f.status is None and f.last_sweep_id == "abc123" for f in report.findings)
    assert "keeps no state store" in render(report, "md")


def test_a_release_one_store_gives_a_report_without_an_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    shutil.copy(V1_STORE, path)
    report = from_stores([path], since=timedelta(days=36500))
    assert report.findings and report.changes
    assert {f.status for f in report.findings} <= set(FindingStatus)
    assert "open-relay" in render(report, "csv")


def test_show_gives_one_finding_whole_with_its_status_changes(tmp_path: Path) -> None:
    _store_with_history(tmp_path / "state.sqlite")
    relay_id = make_finding(FindingKind.OPEN_RELAY, address="127.0.0.8").id
    shown = find([tmp_path / "state.sqlite"], relay_id)
    assert shown is not None
    assert shown.status is FindingStatus.RESOLVED and shown.resolved_at is not None
    assert [c.transition.value for c in shown.changes] == ["new", "resolved"]
    text = render_shown(shown)
    assert "status changes:" in text and "resolved" in text
    assert "transcript:" in text and "S: 220 lab ESMTP" in text
    assert "first seen:  2025-01-06 12:00:00 UTC" in text
    assert find([tmp_path / "state.sqlite"], "ra-0000000000000000") is None
