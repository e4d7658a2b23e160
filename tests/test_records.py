"""The findings file's records: the committed JSON Schema, one meaning per line, the v1 store upgrade."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from factories import make_finding

from relayaudit import __version__
from relayaudit.config import Config, parse_config
from relayaudit.engine import sweep
from relayaudit.evidence import Exchange, Reply
from relayaudit.export import schema_files
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.records import (
    EVIDENCE_LINES,
    RECORD_SCHEMA_VERSION,
    FindingRecord,
    record_lines,
    to_record,
)
from relayaudit.sinks import FindingsFile
from relayaudit.state import SCHEMA_VERSION, StateSink, StateStore
from relayaudit.verdict import FindingKind

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
V1_STORE = Path(__file__).parent / "data" / "state-v1.sqlite"  # written by release 0.1.0
HOST, PORT = "127.0.77.1", 2577


def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(
        (SCHEMAS / f"finding-record.v{RECORD_SCHEMA_VERSION}.schema.json").read_text()
    )
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def config(tmp: Path, *targets: str) -> Config:
    return parse_config(
        {
            "scope": ["127.0.0.0/8"],
            "targets": list(targets),
            "ports": [PORT],
            "identity": {"helo_name": "relayaudit.campus.test"},
            # the greylisting server is tried again at the sweep's end: soon, in tests
            "relay": {"campus_domains": ["campus.test"], "greylist_retry_after": "1s"},
            "timeouts": {"connect": "1s", "command": "2s", "greeting": "2s", "session": "20s"},
            "limits": {"concurrency": 8, "rate": 1000, "subnet_rate": 1000},
            "output": {"findings": str(tmp / "findings.jsonl")},
        },
        source="(test)",
    )


def test_the_committed_schemas_are_the_ones_the_models_give() -> None:
    generated = schema_files()
    committed = {p.name: p.read_text(encoding="utf-8") for p in SCHEMAS.glob("*.schema.json")}
    assert committed == generated, "run: python -m relayaudit.export schemas/"
    schema = json.loads(generated[f"finding-record.v{RECORD_SCHEMA_VERSION}.schema.json"])
    assert schema["additionalProperties"] is False  # a closed model gives a closed schema
    assert "schema_version" in schema["required"] or "schema_version" in schema["properties"]


async def test_every_line_of_a_lab_sweep_validates_and_says_who_wrote_it(tmp_path: Path) -> None:
    specs = [
        ServerSpec(host="127.0.77.1", port=PORT, behaviour=Behaviour.OPEN_RELAY),
        ServerSpec(host="127.0.77.2", port=PORT, behaviour=Behaviour.CAMPUS_SENDER),
        ServerSpec(host="127.0.77.3", port=PORT, behaviour=Behaviour.AUTH_NO_TLS),
    ]
    cfg = config(tmp_path, "127.0.77.0/29")
    out = FindingsFile(cfg.output.findings, shard="0/1")
    async with Lab(specs):
        await sweep(cfg, sinks=[out])
    out.close()
    records = lines(cfg.output.findings)
    kinds = {r["kind"] for r in records}
    assert {"open-relay", "relay-campus-sender", "auth-without-tls", "unapproved-smtp"} <= kinds
    check = validator()
    for record in records:
        check.validate(record)
        assert record["schema_version"] == RECORD_SCHEMA_VERSION
        assert (record["tool"], record["tool_version"]) == ("relayaudit", __version__)
        assert record["sweep_id"] == out.sweep_id and record["shard"] == "0/1"
        assert record["status"] is None and record["compact"] is False  # no store: all whole
    relay = next(r for r in records if r["kind"] == "open-relay")
    assert relay["transcript"] and relay["evidence"]


def test_lines_sharing_one_transcript_are_each_the_records_own_json() -> None:
    """record_lines serializes a probe's transcript once for all its findings: each line must
    still be exactly the record's own JSON, whatever the server wrote into the transcript."""
    hostile = (
        Exchange(command=None, reply=Reply(code=220, text='mx "transcript":[] \\" ESMTP \u00e9')),
        Exchange(command='EHLO "transcript":[]', reply=Reply(code=250, text="mx\nPIPELINING")),
        Exchange(command="QUIT", reply=None, error="closed \u2603", elapsed_ms=1.5),
    )
    shared = [
        to_record(make_finding(kind, transcript=hostile), sweep_id="s", shard="0/1")
        for kind in (FindingKind.OPEN_RELAY, FindingKind.UNAPPROVED_SMTP)
    ]
    other = to_record(make_finding(FindingKind.AUTH_WITHOUT_TLS), sweep_id="s", shard="0/1")
    empty = to_record(make_finding(transcript=()), sweep_id="s", shard="0/1")
    for records in ([*shared, other, empty], [other, *shared], shared[:1], []):
        got = record_lines(records)
        assert got == [r.model_dump_json() for r in records]
        # and the records themselves are what validation would have made
        for line, record in zip(got, records, strict=True):
            assert FindingRecord.model_validate_json(line) == record


def test_a_record_with_an_unknown_field_or_a_wrong_type_is_refused() -> None:
    check = validator()
    with pytest.raises(jsonschema.ValidationError):
        check.validate({"schema_version": 1, "surprise": True})
    with pytest.raises(jsonschema.ValidationError):
        check.validate({"schema_version": "1"})


async def _sweep_into(store: StateStore, cfg: Config, findings: FindingsFile) -> str:
    record = store.begin_sweep(shard="0/1", config_fingerprint="fp", total=1)
    findings.sweep_id = record.id
    sink = StateSink(store, record.id, on_lines=findings.write)
    store.complete_sweep(record.id, await sweep(cfg, sinks=[sink]))
    return record.id


async def test_four_sweeps_give_new_then_nothing_while_undecided_or_absent_then_resolved(
    tmp_path: Path,
) -> None:
    """A relay appears; the next sweep is inconclusive (greylisting); it is absent twice."""
    cfg = config(tmp_path, f"{HOST}/32")
    findings = FindingsFile(cfg.output.findings, shard="0/1")
    spec = ServerSpec(host=HOST, port=PORT, behaviour=Behaviour.OPEN_RELAY)
    sweeps: list[str] = []
    with StateStore(tmp_path / "state.sqlite", resolve_after=2) as store:
        async with Lab([spec]):
            sweeps.append(await _sweep_into(store, cfg, findings))
        greylisting = ServerSpec(host=HOST, port=PORT, behaviour=Behaviour.GREYLIST)
        async with Lab([greylisting]):
            sweeps.append(await _sweep_into(store, cfg, findings))
        for _ in range(2):  # the server is gone: the port is closed
            sweeps.append(await _sweep_into(store, cfg, findings))
        transitions = [(a.sweep_id, a.finding.id, a.transition.value) for a in store.alerts()]
    findings.close()
    records = lines(cfg.output.findings)
    for record in records:
        validator().validate(record)
    relay = [r for r in records if r["kind"] == "open-relay"]
    # sweep 2 was inconclusive (no line, not a miss), sweep 3 a first miss (no line)
    assert [(sweeps.index(r["sweep_id"]), r["status"]) for r in relay] == [
        (0, "new"),
        (3, "resolved"),
    ]
    unapproved = [r for r in records if r["kind"] == "unapproved-smtp"]
    assert [(sweeps.index(r["sweep_id"]), r["status"]) for r in unapproved] == [
        (0, "new"),
        (1, "ongoing"),
        (3, "resolved"),
    ]
    # the file's transitions are exactly the store's own transition events
    in_file = [(r["sweep_id"], r["id"], r["transition"]) for r in records if r["transition"]]
    assert sorted(in_file) == sorted(transitions)
    # what changed, from the file alone: new in sweep 1, resolved in sweep 4
    changed = {(sweeps.index(s), t) for s, _, t in in_file}
    assert changed == {(0, "new"), (3, "resolved")}


async def test_an_ongoing_line_is_compact_and_a_new_one_whole(tmp_path: Path) -> None:
    cfg = config(tmp_path, f"{HOST}/32")
    findings = FindingsFile(cfg.output.findings, shard="0/1")
    spec = ServerSpec(host=HOST, port=PORT, behaviour=Behaviour.OPEN_RELAY)
    with StateStore(tmp_path / "state.sqlite") as store:
        async with Lab([spec]):
            for _ in range(2):
                await _sweep_into(store, cfg, findings)
        whole = FindingsFile(tmp_path / "always.jsonl", shard="0/1", transcripts="always")
        async with Lab([spec]):
            await _sweep_into(store, cfg, whole)
    findings.close()
    whole.close()
    raw = cfg.output.findings.read_text(encoding="utf-8").splitlines()
    first, second = (
        [
            line
            for line in raw
            if json.loads(line)["kind"] == "open-relay" and json.loads(line)["status"] == s
        ]
        for s in ("new", "ongoing")
    )
    new, ongoing = json.loads(first[0]), json.loads(second[0])
    assert new["transcript"] and not new["compact"]
    assert ongoing["transcript"] == ongoing["evidence"] == [] and ongoing["compact"] is True
    assert len(ongoing["evidence_lines"]) == EVIDENCE_LINES < len(new["evidence"])
    assert ongoing["evidence_lines"] == new["evidence_lines"]
    assert ongoing["evidence_lines"][0].startswith("rcpt-plain (plain): <relayaudit@")
    assert len(second[0].encode()) < 2048
    # output.transcripts = "always": today's whole lines for ongoing findings too
    kept = [r for r in lines(tmp_path / "always.jsonl") if r["kind"] == "open-relay"]
    assert kept[0]["status"] == "ongoing" and kept[0]["transcript"] and not kept[0]["compact"]


def _counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return {
            t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("findings", "alerts", "deliveries", "sweeps", "observations")
        }


def test_a_release_one_store_reads_read_only_and_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    shutil.copy(V1_STORE, path)
    before = _counts(path)
    assert before["findings"] > 0 and before["deliveries"] > 0
    # read-only commands read it as it is, and leave it at version 1
    reader = StateStore(path)
    reader.open(readonly=True)
    rows = reader.findings()
    reader.close()
    assert len(rows) == before["findings"]
    assert all(r.confidence == r.finding.confidence and r.title == r.finding.title for r in rows)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    # opened for writing (the daemon, a sweep): upgraded in place, nothing lost
    with StateStore(path) as store:
        assert len(store.findings()) == before["findings"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT COUNT(*) FROM findings WHERE title IS NULL").fetchone()[0] == 0
    assert _counts(path) == before


@pytest.mark.parametrize(
    ("doc_file", "schemas"),
    [("findings.md", ("finding-record", "report")), ("alerts.md", ("alert",))],
)
def test_docs_name_every_field_of_their_schemas(doc_file: str, schemas: tuple[str, ...]) -> None:
    doc = (ROOT / "docs" / doc_file).read_text(encoding="utf-8")
    names: set[str] = set()
    for file, text in schema_files().items():
        if file.split(".v")[0] not in schemas:
            continue
        schema = json.loads(text)
        names |= set(schema["properties"])
        for definition in schema.get("$defs", {}).values():
            names |= set(definition.get("properties", {}))
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"docs/{doc_file} does not describe: {missing}"
