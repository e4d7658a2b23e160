"""An open finding whose owner changes (issue 29): one owner-changed alert and when there is none,
the tickets it moves (Jira and ServiceNow stand-ins; a real RT in test_rt_alerts.py), the
older alert documents that cannot say it, and the owner copied on mail (`cc_owner`)."""

from __future__ import annotations

import ipaddress
import json
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from alert_flow import deliver
from daemon_harness import DaemonProcess, base_config, read_jsonl, write_config
from factories import make_finding, observe, one_sweep
from smtp_sink import MessageSink
from structlog.testing import capture_logs
from test_ticket_templates import alerts_config, calls, open_store

from relayaudit.alert_doc import AlertFormat, alert_document, alert_v1, alert_v2
from relayaudit.config import AlertsConfig, EmailHook, parse_config
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.lab.ticket_apis import (
    JIRA_TOKEN,
    JIRA_USER,
    SNOW_PASSWORD,
    SNOW_USER,
    GenericStandIn,
    JiraStandIn,
    ServiceNowStandIn,
    basic_auth,
    jira_hook,
    servicenow_hook,
)
from relayaudit.owners import OwnerCache, OwnerRow, OwnerTable, load_owners
from relayaudit.records import FindingStatus, Transition
from relayaudit.state import StateStore
from relayaudit.verdict import Finding, FindingKind, Owner

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
CHEM = Owner(name="Chemistry", contact="it@chem.campus.example", queue="chem-it")
PHYS = Owner(name="Physics", contact="it@phys.campus.example", queue="phys-it")
RELAY, GONE, FRESH = "192.0.2.7", "192.0.2.130", "192.0.2.200"


def table(*rows: tuple[str, Owner]) -> OwnerTable:
    return OwnerTable(
        rows=tuple(
            OwnerRow(ipaddress.ip_network(net), owner, f"test:{i}")
            for i, (net, owner) in enumerate(rows, 1)
        )
    )


def sweep(store: StateStore, *findings: Finding, absent: tuple[str, ...] = ()) -> str:
    """One completed sweep that saw `findings` and a closed relay at each `absent` address;
    its id."""
    seen = [observe(f, address=f.address) for f in findings]
    one_sweep(store, *seen, *(observe(address=a) for a in absent))
    return store.sweeps(limit=1)[0].id


def owned(finding: Finding, owner: Owner | None) -> Finding:
    """The finding as the sweep stamps it from the table it uses."""
    return finding.model_copy(update={"owner": owner})


# -- the rules --------------------------------------------------------------------------------


def test_an_open_finding_moved_between_owners_raises_one_owner_changed_alert(
    tmp_path: Path,
) -> None:
    relay = make_finding(address=RELAY)
    gone = make_finding(FindingKind.UNAPPROVED_SMTP, address=GONE)
    fresh = make_finding(FindingKind.UNAPPROVED_SMTP, address=FRESH)
    chemistry = table(("192.0.2.0/25", CHEM), ("192.0.2.128/26", CHEM))
    physics = table(("192.0.2.0/24", PHYS))
    with StateStore(tmp_path / "state.sqlite", resolve_after=1) as store:
        store.set_channels(["webhook"])
        first = sweep(store, relay, gone, fresh)
        # the first table: none -> some is recorded without a transition
        done = store.restamp_owners(chemistry, sweep_id=first)
        assert (done.changed, done.alerts) == (2, [])
        second = sweep(store, relay, fresh, absent=(GONE,))
        assert {r.address: r.status for r in store.findings()}[GONE] is FindingStatus.RESOLVED
        # the row changes: the open relay moves (one alert); the resolved finding is re-stamped
        # silently, and the one nobody owned gets its first owner silently
        done = store.restamp_owners(physics, sweep_id=second)
        assert done.changed == 3
        (alert,) = done.alerts
        assert alert.transition is Transition.OWNER_CHANGED
        assert alert.key == f"{relay.id}/owner-changed/2" and alert.sweep_id == second
        assert (alert.previous_owner, alert.finding.owner) == (CHEM, PHYS)
        assert alert.status is FindingStatus.ONGOING
        assert {r.address: r.finding.owner for r in store.findings()} == {
            RELAY: PHYS,
            GONE: PHYS,
            FRESH: PHYS,
        }
        # the same table again changes nothing; a corrected contact alone moves no ticket
        assert store.restamp_owners(physics, sweep_id=second).changed == 0
        new_contact = PHYS.model_copy(update={"contact": "helpdesk@phys.campus.example"})
        done = store.restamp_owners(table(("192.0.2.0/24", new_contact)), sweep_id=second)
        assert (done.changed, done.alerts) == (3, [])
        # an owner dropped (some -> none) is no move between owners either
        done = store.restamp_owners(OwnerTable(), sweep_id=second)
        assert (done.changed, done.alerts) == (3, [])
        # the one alert is in the outbox, once, and the finding's next transition counts it
        owner_changed = [d for d in store.deliveries() if d.transition is Transition.OWNER_CHANGED]
        assert [d.alert_key for d in owner_changed] == [alert.key]
        sweep(store, absent=(RELAY,))
        resolved = [a for a in store.alerts() if a.transition is Transition.RESOLVED]
        assert f"{relay.id}/resolved/3" in {a.key for a in resolved}


def test_the_alert_v2_names_both_owners_and_v1_cannot_carry_it(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state.sqlite") as store:
        sweep(store, owned(make_finding(address=RELAY), CHEM))
        moved = store.restamp_owners(table(("192.0.2.0/24", PHYS)), sweep_id=sweep(store))
    (alert,) = moved.alerts
    doc = alert_v2(alert).model_dump(mode="json")
    jsonschema.validate(doc, json.loads((SCHEMAS / "alert.v2.schema.json").read_text("utf-8")))
    assert doc["transition"] == "owner-changed" and doc["schema_version"] == 2
    assert doc["previous_owner"]["name"] == "Chemistry" and doc["owner"]["queue"] == "phys-it"
    assert doc["summary"].startswith(
        "Owner changed from Chemistry (queue chem-it) to Physics (queue phys-it)"
    )
    # v1 (and 0.1's full document) have no owners: its committed schema lists four transitions
    v1 = json.loads((SCHEMAS / "alert.v1.schema.json").read_text("utf-8"))
    assert "owner-changed" not in v1["$defs"]["Transition"]["enum"]
    older: tuple[AlertFormat, ...] = ("v1", "full")
    for fmt in older:
        with pytest.raises(ValueError, match="owner-changed"):
            alert_document(alert, fmt)
    with pytest.raises(ValueError, match="owner-changed"):
        alert_v1(alert)


def test_an_unreadable_owners_file_moves_nobody(tmp_path: Path) -> None:
    path = tmp_path / "owners.csv"
    path.write_text(
        "range,name,contact,queue\n192.0.2.0/25,Chemistry,it@chem.campus.example,chem-it\n",
        encoding="utf-8",
    )
    central = {"name": "Central IT", "contact": "noc@campus.example", "queue": "noc"}
    data = {
        "scope": ["192.0.2.0/24"],
        "targets": ["192.0.2.0/24"],
        "relay": {"campus_domains": ["campus.example"]},
        "owners": [{**central, "ranges": ["192.0.2.0/24"]}],
    }
    cfg = parse_config({**data, "owners_file": str(path)}, source=str(tmp_path / "a.toml"))
    cache = OwnerCache()
    failures: list[str] = []
    relay = make_finding(address=RELAY)
    with StateStore(tmp_path / "state.sqlite") as store:
        store.set_channels(["webhook"])
        good = cache.load(cfg, on_failure=lambda error, kept: failures.append(error))
        assert good is not None
        store.restamp_owners(good, sweep_id=sweep(store, owned(relay, good.lookup(RELAY))))
        path.unlink()  # the IPAM export is gone before the next sweep
        kept = cache.load(cfg, on_failure=lambda error, kept: failures.append(error))
        assert cache.stale and failures and kept is good
        # as the daemon does it: the table it kept is no news, and announces nothing
        second = sweep(store, relay)
        done = store.restamp_owners(kept, sweep_id=None if cache.stale else second)
        assert (done.changed, done.alerts) == (0, [])
        # a table without the file's rows would have moved the relay to Central IT: without a
        # sweep to announce it in, even such a change is silent
        inline = load_owners(parse_config(data, source=str(tmp_path / "b.toml")))
        done = store.restamp_owners(inline)
        assert (done.changed, done.alerts) == (1, [])
        assert [a.transition for a in store.alerts()] == [Transition.NEW]


LAB_HOST, LAB_PORT = "127.0.138.1", 2838  # the daemon test's lab: 127.0.138.0/30


async def test_the_daemon_announces_a_moved_row_once_after_the_next_sweep(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    owners = tmp_path / "owners.csv"
    row = "range,name,contact,queue\n127.0.138.0/30,{},it@{}.campus.test,{}-it\n"
    owners.write_text(row.format("Chemistry", "chem", "chem"), encoding="utf-8")
    data = base_config(tmp_path, "127.0.138.0/30", LAB_PORT)
    data["owners_file"] = str(owners)
    config = write_config(tmp_path / "relayaudit.toml", data)
    async with Lab([ServerSpec(host=LAB_HOST, port=LAB_PORT, behaviour=Behaviour.OPEN_RELAY)]):
        daemon = DaemonProcess(config, tmp_path / "log.jsonl")
        daemons.append(daemon)
        await daemon.start()
        await daemon.wait_for(lambda: bool(daemon.events("sweep.summary")), 30, "a sweep")
        owners.write_text(row.format("Physics", "phys", "phys"), encoding="utf-8")

        def moved() -> list[dict[str, Any]]:
            return [
                e for e in daemon.events("finding.transition") if e["transition"] == "owner-changed"
            ]

        await daemon.wait_for(lambda: bool(moved()), 30, "an owner-changed transition")
        summaries = len(daemon.events("sweep.summary"))
        await daemon.wait_for(
            lambda: len(daemon.events("sweep.summary")) >= summaries + 2, 30, "two more sweeps"
        )
        assert await daemon.stop() == 0
    # once per open finding there (the relay and the unapproved service): later sweeps find
    # each owner as the table says
    ids = [e["finding_id"] for e in moved()]
    with StateStore(tmp_path / "state.sqlite") as store:
        found = store.findings()
    assert sorted(ids) == sorted(r.id for r in found) and len(ids) == 2
    assert {r.finding.owner.name for r in found if r.finding.owner} == {"Physics"}
    (restamped,) = [e for e in daemon.events("owners.restamped") if e.get("owner_changed")]
    assert restamped["findings"] == 2 and restamped["owner_changed"] == 2
    docs = [t for t in read_jsonl(tmp_path / "tickets.jsonl") if t["transition"] == "owner-changed"]
    assert sorted(d["idempotency_key"] for d in docs) == sorted(e["key"] for e in moved())
    assert {(d["previous_owner"]["queue"], d["owner"]["queue"]) for d in docs} == {
        ("chem-it", "phys-it")
    }


# -- hooks ------------------------------------------------------------------------------------


def moved_relay(store: StateStore) -> Finding:
    """A relay opened under Chemistry, then its row moved to Physics: new, then owner-changed."""
    relay = owned(make_finding(address=RELAY), CHEM)
    sweep(store, relay)
    done = store.restamp_owners(table(("192.0.2.0/24", PHYS)), sweep_id=sweep(store, relay))
    assert [a.transition for a in done.alerts] == [Transition.OWNER_CHANGED]
    return relay


async def test_jira_moves_the_issue_to_the_new_owners_component(
    tmp_path: Path, loopback_only: None
) -> None:
    async with JiraStandIn(authorization=basic_auth(JIRA_USER, JIRA_TOKEN)) as api:
        config = alerts_config(tmp_path, jira_hook(api))
        with open_store(tmp_path, config) as store:
            moved_relay(store)
            await deliver(store, config)
            assert store.outbox_counts()["dead"] == 0
    assert calls(api) == [
        ("POST", "/rest/api/2/issue", 201),
        ("PUT", "/rest/api/2/issue/TICKET", 204),
    ]
    (issue,) = api.tickets.values()
    assert issue.fields["components"] == [{"name": "phys-it"}]  # it opened under chem-it
    assert issue.comments[0].startswith("{noformat}\nOWNER-CHANGED: ")
    assert "Was:        Chemistry" in issue.comments[0]


async def test_servicenow_moves_the_incident_to_the_new_owners_group(
    tmp_path: Path, loopback_only: None
) -> None:
    async with ServiceNowStandIn(authorization=basic_auth(SNOW_USER, SNOW_PASSWORD)) as api:
        config = alerts_config(tmp_path, servicenow_hook(api))
        with open_store(tmp_path, config) as store:
            moved_relay(store)
            await deliver(store, config)
            assert store.outbox_counts()["dead"] == 0
    assert calls(api) == [
        ("POST", "/api/now/table/incident", 201),
        ("PATCH", "/api/now/table/incident/TICKET", 200),
    ]
    (incident,) = api.tickets.values()
    assert [r.json().get("assignment_group") for r in api.requests] == ["chem-it", "phys-it"]
    assert incident.fields["assignment_group"] == "phys-it"
    assert incident.comments[0].startswith("OWNER-CHANGED: ")


@pytest.mark.parametrize("fmt", ["v1", "v2"])
async def test_a_hook_sending_the_v1_document_is_not_sent_owner_changed(
    tmp_path: Path, fmt: str, loopback_only: None
) -> None:
    async with GenericStandIn(authorization=None) as api:
        hook = f'format = "{fmt}"\n[[alerts.webhook]]\nurl = "{api.url}/hooks/relayaudit"\n'
        config = alerts_config(tmp_path, hook)
        with open_store(tmp_path, config) as store:
            moved_relay(store)
            with capture_logs() as logs:
                await deliver(store, config)
            assert store.outbox_counts() == {"pending": 0, "sent": 2, "dead": 0}, [
                (d.alert.key, d.last_error) for d in store.dead_letters()
            ]
    received = [d.transition for d in api.documents]
    skipped = [e for e in logs if e["event"] == "alert.skipped"]
    if fmt == "v1":
        assert received == ["new"]  # v1's schema has no owner-changed: not sent, not dead
        assert [e["transition"] for e in skipped] == ["owner-changed"]
    else:
        assert received == ["new", "owner-changed"] and skipped == []
        assert api.documents[1].model_dump()["previous_owner"]["name"] == "Chemistry"


# -- cc_owner ---------------------------------------------------------------------------------


async def test_cc_owner_copies_the_findings_owner_on_its_mails(
    tmp_path: Path, smtp_sink: tuple[MessageSink, int]
) -> None:
    handler, port = smtp_sink

    def hook(name: str, *, cc_owner: bool) -> EmailHook:
        return EmailHook(
            name=name,
            host="127.0.0.1",
            port=port,
            mail_from="relayaudit@iso.campus.example",
            to=("iso@campus.example",),
            timeout=5,
            cc_owner=cc_owner,
        )

    config = AlertsConfig(email=(hook("copied", cc_owner=True), hook("plain", cc_owner=False)))
    nobodys = make_finding(FindingKind.UNAPPROVED_SMTP, address=FRESH)
    with StateStore(tmp_path / "state.sqlite") as store:
        store.set_channels(["copied", "plain"])
        relay = moved_relay(store)
        sweep(store, owned(relay, PHYS), nobodys)
        await deliver(store, config)
        assert store.outbox_counts()["dead"] == 0
    mails = [
        (rcpts, BytesParser(policy=policy.default).parsebytes(content))
        for _, rcpts, content in handler.messages
    ]
    seen = {
        (m["X-Relayaudit-Idempotency-Key"], tuple(rcpts), m["Cc"])
        for rcpts, m in mails
        if "iso@campus.example" in rcpts
    }
    iso = "iso@campus.example"
    assert len(mails) == 6, [m["Subject"] for _, m in mails]  # 3 alerts x 2 hooks
    assert seen == {
        # the copying hook: the owner as it was when each alert was raised, Cc and envelope
        (f"{relay.id}/new/1", (iso, CHEM.contact), CHEM.contact),
        (f"{relay.id}/owner-changed/2", (iso, PHYS.contact), PHYS.contact),
        (f"{nobodys.id}/new/1", (iso,), None),  # nobody owns it: to alone
        # the other hook copies nobody
        (f"{relay.id}/new/1", (iso,), None),
        (f"{relay.id}/owner-changed/2", (iso,), None),
        (f"{nobodys.id}/new/1", (iso,), None),
    }
    moved = next(m for _, m in mails if m["Cc"] == PHYS.contact)
    text = moved.get_body().get_content()  # type: ignore[union-attr]
    assert text.startswith("OWNER-CHANGED: ")
    assert "Owner:       Physics <it@phys.campus.example>, queue phys-it" in text
    assert "Owner until now: Chemistry <it@chem.campus.example>, queue chem-it" in text
