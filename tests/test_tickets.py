"""Alerts that open, update and close the right ticket (issue 23): the compact alert v1 and its
schema, hooks keyed by name (and the store migrated from `kind:index`), ticket references from a
create call's response, templates checked when the config loads."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from alert_flow import deliver, sweep_days
from cli_runner import run_main
from factories import observe
from http_stub import listen, read_request
from test_alerts import raise_alerts

from relayaudit import demo
from relayaudit.alert_doc import alert_document, alert_v1, render_payload
from relayaudit.alerts import Dispatcher, json_pointer, ticket_ref_of
from relayaudit.config import load_config, parse_config
from relayaudit.errors import ConfigError, ExitCode
from relayaudit.records import FindingRecord
from relayaudit.remediation import entries
from relayaudit.state import SCHEMA_VERSION, Alert, StateStore
from relayaudit.verdict import Finding, FindingKind, Severity, Verdict, VerdictStatus

ROOT = Path(__file__).resolve().parent.parent
V2_STORE = Path(__file__).parent / "data" / "state-v2.sqlite"  # written at schema version 2
ALERT_SCHEMA = ROOT / "schemas" / "alert.v2.schema.json"
ALERT_V1_SCHEMA = ROOT / "schemas" / "alert.v1.schema.json"


# -- a ticket API on loopback: creates return an id, updates must name it ---------------------


@dataclass
class TicketDesk:
    """Plays a minimal ticket API: POST /tickets creates (201 {"id": N}); POST
    /tickets/N/notes appends; PUT /tickets/N sets fields. Unknown ids get 404."""

    tickets: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    fail_creates: int = 0  # answer this many creates with 503 first
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _, body = await read_request(reader)
        method, path, _ = head.split(b" ", 2)
        doc = json.loads(body) if body else {}
        self.requests.append((method.decode(), path.decode(), doc))
        status, answer = self.route(method.decode(), path.decode(), doc)
        data = json.dumps(answer).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        writer.close()

    def route(self, method: str, path: str, doc: dict[str, Any]) -> tuple[int, object]:
        parts = path.strip("/").split("/")
        if (method, parts) == ("POST", ["tickets"]):
            if self.fail_creates:
                self.fail_creates -= 1
                return 503, {"error": "busy"}
            ticket_id = str(len(self.tickets) + 1)
            self.tickets[ticket_id] = {**doc, "notes": [], "status": "open"}
            return 201, {"data": {"ticket": {"id": int(ticket_id)}}}
        if len(parts) >= 2 and parts[1] not in self.tickets:
            return 404, {"error": f"no ticket {parts[1]}"}
        if method == "POST" and len(parts) == 3 and parts[2] == "notes":
            self.tickets[parts[1]]["notes"].append(doc)
            return 201, {}
        if method == "PUT" and len(parts) == 2:
            self.tickets[parts[1]].update(doc)
            return 200, {}
        return 400, {"error": f"unexpected {method} {path}"}


@pytest.fixture
async def desk() -> AsyncIterator[TicketDesk]:
    d = TicketDesk()
    server, d.port = await listen(d.handle, 0)
    try:
        yield d
    finally:
        server.close()
        await server.wait_closed()


TEMPLATES = {
    "create.j2": '{"title": {{ alert.title | json }}, "finding": {{ alert.finding_id | json }}}',
    "note.j2": '{"text": {{ (transition ~ ": " ~ alert.summary) | json }}, '
    '"on": {{ ticket_ref | json }}}',
    "resolve.j2": '{"status": "resolved", "why": {{ alert.summary | json }}}',
}


def desk_hook(name: str, port: int) -> str:
    return f"""
[[alerts.webhook]]
name = "{name}"
url = "http://127.0.0.1:{port}/tickets"
template = "create.j2"
ticket_ref = "/data/ticket/id"
update_url = "http://127.0.0.1:{port}/tickets/{{{{ ticket_ref }}}}/notes"
update_template = "note.j2"
resolve_url = "http://127.0.0.1:{port}/tickets/{{{{ ticket_ref }}}}"
resolve_method = "PUT"
resolve_template = "resolve.j2"
"""


def write_config(tmp: Path, hooks: str) -> Path:
    for name, text in TEMPLATES.items():
        (tmp / name).write_text(text, encoding="utf-8")
    path = tmp / "relayaudit.toml"
    path.write_text(
        'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/28"]\n'
        '[alerts]\nbackoff_initial = "0.01s"\nbackoff_max = "0.05s"\n' + hooks,
        encoding="utf-8",
    )
    return path


def new_raised_resolved(store: StateStore) -> list[Alert]:
    """A relay seen (medium), seen worse (critical), then gone for two sweeps: three alerts."""
    alerts = sweep_days(store, [Severity.MEDIUM, Severity.CRITICAL, None, None])
    assert [a.transition.value for a in alerts] == ["new", "severity-raised", "resolved"]
    return alerts


async def test_new_raised_resolved_touch_one_ticket_and_leave_it_resolved(
    tmp_path: Path, desk: TicketDesk
) -> None:
    config = load_config(write_config(tmp_path, desk_hook("desk", desk.port))).alerts
    with StateStore(tmp_path / "state.sqlite", resolve_after=2) as store:
        store.set_channels([name for name, _ in config.hooks()])
        alerts = new_raised_resolved(store)
        store_alerts_only = [a.key for a in alerts]
        desk.fail_creates = 1  # the first create fails: retried, still one ticket
        await deliver(store, config)
        assert store.ticket_refs(alerts[0].finding.id) == {"desk": "1"}
    assert len(desk.tickets) == 1, desk.requests
    ticket = desk.tickets["1"]
    assert ticket["finding"] == alerts[0].finding.id and ticket["status"] == "resolved"
    assert [n["text"].split(":")[0] for n in ticket["notes"]] == ["severity-raised"]
    assert ticket["notes"][0]["on"] == "1"
    assert ticket["why"].startswith("Resolved")
    methods = [(m, p) for m, p, _ in desk.requests]
    assert methods == [
        ("POST", "/tickets"),  # 503
        ("POST", "/tickets"),
        ("POST", "/tickets/1/notes"),
        ("PUT", "/tickets/1"),
    ], store_alerts_only


async def test_hooks_keep_their_tickets_when_the_config_reorders_them(
    tmp_path: Path, desk: TicketDesk
) -> None:
    other = TicketDesk()
    server, other.port = await listen(other.handle, 0)
    try:
        first = load_config(
            write_config(tmp_path, desk_hook("iso", desk.port) + desk_hook("dept", other.port))
        ).alerts
        with StateStore(tmp_path / "state.sqlite", resolve_after=2) as store:
            store.set_channels([name for name, _ in first.hooks()])
            alerts = raise_alerts(store, ports=(25,))
            new = alerts[0]
            assert store.deliveries() != []
            # only the new alert goes out with this config
            for later in alerts[1:]:
                with sqlite3.connect(store.path) as db:
                    db.execute(
                        "UPDATE deliveries SET next_attempt = '9999' WHERE alert_key = ?",
                        (later.key,),
                    )
            await Dispatcher(store, first).run_once()
            assert store.ticket_refs(new.finding.id) == {"iso": "1", "dept": "1"}
            desk.tickets["1"]["marker"] = "iso's"
            # the operator swaps the two hooks in the file: names, not positions, find tickets
            swapped = load_config(
                write_config(tmp_path, desk_hook("dept", other.port) + desk_hook("iso", desk.port))
            ).alerts
            with sqlite3.connect(store.path) as db:
                db.execute("UPDATE deliveries SET next_attempt = '2000-01-01T00:00:00+00:00'")
            await deliver(store, swapped)
        assert len(desk.tickets) == len(other.tickets) == 1
        assert desk.tickets["1"]["marker"] == "iso's" and desk.tickets["1"]["status"] == "resolved"
        assert [n["text"].split(":")[0] for n in desk.tickets["1"]["notes"]] == [
            "severity-raised",
            "reopened",
        ]
        assert other.tickets["1"]["notes"] == desk.tickets["1"]["notes"]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_create_whose_response_has_no_id_is_not_retried(
    tmp_path: Path, desk: TicketDesk
) -> None:
    hook = desk_hook("desk", desk.port).replace('"/data/ticket/id"', '"/data/ticket/number"')
    config = load_config(write_config(tmp_path, hook)).alerts
    with StateStore(tmp_path / "state.sqlite", resolve_after=2) as store:
        store.set_channels(["desk"])
        raise_alerts(store, ports=(25,))
        await deliver(store, config)
        assert store.outbox_counts()["sent"] == 4
    # no id to update: each transition opened a ticket (logged), none was sent twice
    assert len(desk.tickets) == 4


# -- the store of relayaudit 0.1 --------------------------------------------------------------


async def test_a_version_2_store_moves_its_deliveries_to_the_hooks_names(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    shutil.copy(V2_STORE, path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        before = sorted(db.execute("SELECT channel, state FROM deliveries").fetchall())
    # the config as it stood, hooks named now: command:0, webhook:0, webhook:1, email:0
    config = parse_config(
        {
            "scope": ["192.0.2.0/24"],
            "targets": ["192.0.2.0/28"],
            "alerts": {
                "command": [{"argv": ["/bin/true"]}],
                "webhook": [
                    {"name": "rt", "url": "http://127.0.0.1:9/rt"},
                    {"name": "chat", "url": "http://127.0.0.1:9/chat"},
                ],
                "email": [{"host": "127.0.0.1", "mail_from": "a@b.example", "to": ["c@d.example"]}],
            },
        }
    ).alerts
    with StateStore(path) as store:
        Dispatcher(store, config)  # renames at start
        after = sorted((d.channel, d.state.value) for d in store.deliveries())
        assert store.ticket_refs("ra-x") == {}
    rename = {"command:0": "command", "webhook:0": "rt", "webhook:1": "chat", "email:0": "email"}
    assert after == sorted((rename[c], s) for c, s in before)
    assert ("chat", "dead") in after and ("rt", "sent") in after  # dead and sent kept, renamed
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 3
    # read-only commands read a version 2 file as it is (upgraded in memory)
    fresh = tmp_path / "untouched.sqlite"
    shutil.copy(V2_STORE, fresh)
    reader = StateStore(fresh)
    reader.open(readonly=True)
    try:
        assert len(reader.deliveries()) == len(before)
    finally:
        reader.close()


# -- names and templates in the config --------------------------------------------------------


def test_several_hooks_of_a_kind_need_distinct_names(tmp_path: Path) -> None:
    two = '[[alerts.webhook]]\nurl = "https://a.example/h"\n[[alerts.webhook]]\nurl = "https://b.example/h"\n'
    with pytest.raises(ConfigError, match=r"alerts\.webhook\[0\]\.name: line \d+: required when there are"):
        load_config(write_config(tmp_path, two))
    same = two.replace("url = ", 'name = "x"\nurl = ', 2)
    with pytest.raises(ConfigError, match=r"alerts\.webhook\[1\]\.name: line \d+: 'x' is also the name"):
        load_config(write_config(tmp_path, same))
    bad = '[[alerts.webhook]]\nname = "Has Space"\nurl = "https://a.example/h"\n'
    with pytest.raises(ConfigError, match="is not a hook name"):
        load_config(write_config(tmp_path, bad))


def test_a_template_error_is_a_config_error_naming_file_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, desk_hook("desk", 9))
    (tmp_path / "note.j2").write_text('{\n  "text": {{ alert.title | json }\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # the config's line of the key, then the template's line of the error
    assert f"update_template: line 13: template {tmp_path / 'note.j2'}: line 2: " in str(info.value)
    (tmp_path / "note.j2").unlink()
    with pytest.raises(ConfigError, match=r"note\.j2' cannot be read: No such file"):
        load_config(path)
    url = desk_hook("desk", 9).replace("{{ ticket_ref }}/notes", "{{ ticket_ref }/notes")
    (tmp_path / "note.j2").write_text("{}")
    with pytest.raises(ConfigError, match=r"update_url: line \d+: update_url: line 1"):
        load_config(write_config(tmp_path, url))


def test_an_update_url_needs_a_ticket_ref(tmp_path: Path) -> None:
    hook = desk_hook("desk", 9).replace('ticket_ref = "/data/ticket/id"\n', "")
    with pytest.raises(ConfigError, match="update_url needs ticket_ref"):
        load_config(write_config(tmp_path, hook))


# -- the alert v1 ------------------------------------------------------------------------------


def test_json_pointer_and_ticket_refs() -> None:
    doc = {"a": {"b/c": [{"~d": 7}]}, "id": "12", "bad": "1/../2", "t": True}
    assert json_pointer(doc, "/a/b~1c/0/~0d") == 7
    assert ticket_ref_of(json.dumps(doc).encode(), "/id") == "12"
    assert ticket_ref_of(b'{"result": {"sys_id": "9d3c1e"}}', "/result/sys_id") == "9d3c1e"
    for pointer in ("/bad", "/t", "/missing", "/a"):
        with pytest.raises(ValueError):
            ticket_ref_of(json.dumps(doc).encode(), pointer)
    with pytest.raises(ValueError, match="not a usable id"):
        ticket_ref_of(b'{"id": "1?x=2"}', "/id")


def test_every_demo_alert_is_compact_valid_and_under_4_kb(tmp_path: Path) -> None:
    validator = jsonschema.Draft202012Validator(json.loads(ALERT_SCHEMA.read_text("utf-8")))
    v1 = jsonschema.Draft202012Validator(json.loads(ALERT_V1_SCHEMA.read_text("utf-8")))
    alerts = demo_alerts(tmp_path)
    assert len(alerts) >= 10
    sizes = []
    for alert in alerts:
        doc = alert_document(alert)
        validator.validate(doc)
        assert doc["schema_version"] == 2
        # a relay names its fix, an entry of the remediation data (issue 30)
        relay = FindingKind(doc["kind"]).is_relay
        assert (doc["remediation"] is not None) == relay or doc["kind"] == "xclient-offered", doc
        if relay:
            assert doc["remediation"]["id"] in entries(), doc["remediation"]
        assert doc == json.loads(render_payload(alert))
        sizes.append(len(render_payload(alert)))
        old = alert_document(alert, "v1")  # alerts.format = "v1": the document of 0.1.x
        v1.validate(old)
        assert "remediation" not in old and old["schema_version"] == 1
        full = render_payload(alert, "full")
        assert json.loads(full)["finding"]["id"] == doc["finding_id"]
    assert max(sizes) < 4096, sizes
    print(f"alert v2 sizes over {len(sizes)} demo findings: max {max(sizes)} B")


def test_a_resolved_alert_says_since_when_the_problem_is_gone(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state.sqlite", resolve_after=2) as store:
        new, raised, resolved, reopened = raise_alerts(store, ports=(25,))
    doc = alert_v1(resolved)
    assert doc.transition == "resolved" and doc.status == "resolved"
    assert doc.resolved_at is not None and doc.first_seen < doc.last_seen < doc.resolved_at
    assert doc.summary.startswith("Resolved on ") and "not seen since" in doc.summary
    assert alert_v1(raised).previous_severity == "medium"
    assert alert_v1(raised).summary.startswith("Severity raised from medium to critical.")
    assert alert_v1(reopened).summary.startswith("Seen again after it had been resolved.")
    assert alert_v1(new).shard == "0/1" and alert_v1(new).status == "new"


def demo_alerts(tmp: Path) -> list[Any]:
    """The alerts a first sweep of the demo lab raises, from its recorded findings."""
    by_endpoint: dict[tuple[str, int], list[Finding]] = defaultdict(list)
    for finding in demo_findings(tmp):
        by_endpoint[finding.address, finding.port].append(finding)
    with StateStore(tmp / "demo.sqlite") as store:
        record = store.begin_sweep(shard="0/1", config_fingerprint="demo", total=1)
        alerts = []
        for (address, port), findings in by_endpoint.items():
            result, _ = observe(*findings, address=address, port=port)
            verdict = Verdict(
                address=address,
                port=port,
                status=VerdictStatus.OPEN_RELAY,
                summary="demo",
                findings=tuple(findings),
            )
            alerts += store.record(record.id, result, verdict)
    return alerts


def demo_findings(tmp: Path) -> list[Any]:
    """Every finding `relayaudit demo` writes (its lab, swept for real, on loopback)."""
    out = tmp / "demo-findings.jsonl"
    code = asyncio.run(demo.run_demo(out, report=tmp / "r.md"))
    assert code == 0
    records = [
        FindingRecord.model_validate_json(line)
        for line in out.read_text(encoding="utf-8").splitlines()
    ]
    return [Finding(**{k: getattr(r, k) for k in Finding.model_fields}) for r in records]


def test_templates_are_tried_on_sample_alerts_when_the_config_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a vars.NAME only the resolved branch uses, missing: before, it failed days later, at the
    # first resolved alert, and retried into a dead letter
    path = write_config(tmp_path, desk_hook("desk", 9))
    (tmp_path / "resolve.j2").write_text(
        '{"status": {{ vars.resolved_status | json }}}', encoding="utf-8"
    )
    code, out, err = run_main(capsys, "config", "check", str(path))
    assert code == ExitCode.CONFIG and out == ""
    assert err.startswith(
        f"relayaudit: alerts.webhook[0].resolve_template: template {tmp_path / 'resolve.j2'}: "
        "line 1: 'dict object' has no attribute 'resolved_status' (tried on a sample new alert)"
    ), err
    (tmp_path / "resolve.j2").write_text('{"status": {{ vars.resolved_status }}', encoding="utf-8")
    path.write_text(
        path.read_text(encoding="utf-8").replace(
            'resolve_template = "resolve.j2"',
            'resolve_template = "resolve.j2"\nvars = { resolved_status = "done" }',
        ),
        encoding="utf-8",
    )
    code, _, err = run_main(capsys, "config", "check", str(path))
    assert code == ExitCode.CONFIG and "renders no JSON for a sample new alert" in err, err


def test_demo_with_hooks_sends_its_alerts_to_every_stand_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = asyncio.run(demo.run_demo(tmp_path / "f.jsonl", report=tmp_path / "r.md", hooks=True))
    out = capsys.readouterr().out
    assert code == 0
    summary = re.search(r"alert hooks \(--hooks\): (\d+) deliveries sent, 0 pending, 0 dead", out)
    assert summary is not None, out
    for api in ("jira", "thehive", "servicenow"):
        assert re.search(rf"^  {api} +http://127\.0\.0\.1:\d+ +\d+ ticket\(s\)", out, re.M), out
    assert re.search(r"^  chat +http://127\.0\.0\.1:\d+ +\d+ message\(s\)", out, re.M)
    assert int(summary[1]) % 4 == 0  # each alert went to the four stand-ins


async def test_an_alert_of_a_finding_whose_create_died_creates_the_ticket(
    tmp_path: Path, desk: TicketDesk
) -> None:
    config = load_config(write_config(tmp_path, desk_hook("desk", desk.port))).alerts.model_copy(
        update={"max_attempts": 1}
    )
    with StateStore(tmp_path / "state.sqlite", resolve_after=2) as store:
        store.set_channels(["desk"])
        new = sweep_days(store, [Severity.MEDIUM])
        desk.fail_creates = 1
        await deliver(store, config)
        assert store.outbox_counts()["dead"] == 1 and store.ticket_refs(new[0].finding.id) == {}
        sweep_days(store, [Severity.CRITICAL, None, None], first_day=1)  # raised, resolved
        await deliver(store, config)
        assert store.ticket_refs(new[0].finding.id) == {"desk": "1"}
    # the severity-raised alert created the ticket; the resolved one resolved that ticket
    assert [(m, p) for m, p, _ in desk.requests] == [
        ("POST", "/tickets"),
        ("POST", "/tickets"),
        ("PUT", "/tickets/1"),
    ]
    assert len(desk.tickets) == 1 and desk.tickets["1"]["status"] == "resolved"
