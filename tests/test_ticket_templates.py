"""The shipped Jira, TheHive, ServiceNow and chat templates, sent by the real dispatcher to loopback stand-ins."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from alert_flow import deliver, sweep_days
from factories import T0, make_finding

from relayaudit.alert_doc import alert_v2, remediation_context
from relayaudit.alerts import channel_names
from relayaudit.config import SHIPPED_TEMPLATES, AlertsConfig, load_config
from relayaudit.errors import ConfigError
from relayaudit.lab.ticket_apis import (
    HIVE_KEY,
    JIRA_TOKEN,
    JIRA_USER,
    SNOW_PASSWORD,
    SNOW_USER,
    ChatStandIn,
    GenericStandIn,
    JiraStandIn,
    Request,
    ServiceNowStandIn,
    StandIn,
    TheHiveStandIn,
    basic_auth,
    chat_hook,
    jira_hook,
    servicenow_hook,
    thehive_hook,
)
from relayaudit.records import Transition
from relayaudit.remediation import RemediationRef
from relayaudit.software import GuessConfidence
from relayaudit.state import Alert, StateStore
from relayaudit.templating import render_template
from relayaudit.verdict import Owner, Severity

pytestmark = pytest.mark.time_limit(30)

NEW_RAISED_RESOLVED = [Severity.MEDIUM, Severity.CRITICAL, None, None]


# -- configs: what docs/alerts.md tells an operator to write, pointed at a stand-in -------------


def write_config(directory: Path, hooks: str) -> Path:
    path = directory / "relayaudit.toml"
    path.write_text(
        'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/28"]\n'
        '[alerts]\nbackoff_initial = "0.01s"\nbackoff_max = "0.05s"\n' + hooks,
        encoding="utf-8",
    )
    return path


def alerts_config(directory: Path, hooks: str) -> AlertsConfig:
    return load_config(write_config(directory, hooks)).alerts


def open_store(directory: Path, config: AlertsConfig) -> StateStore:
    store = StateStore(directory / "state.sqlite", resolve_after=2)
    store.set_channels(channel_names(config))  # alerts recorded now are queued for these hooks
    return store


# -- one system each: new, severity raised, resolved --------------------------------------------


@dataclass(frozen=True)
class System:
    make: Callable[[], StandIn]
    hook: Callable[[StandIn], str]
    calls: list[tuple[str, str, int]]  # method, path (TICKET for the ticket's ref), status
    resolved: str  # the ticket's status at the end


SYSTEMS = {
    "jira": System(
        lambda: JiraStandIn(authorization=basic_auth(JIRA_USER, JIRA_TOKEN)),
        jira_hook,
        [
            ("POST", "/rest/api/2/issue", 201),
            ("POST", "/rest/api/2/issue/TICKET/comment", 201),
            ("POST", "/rest/api/2/issue/TICKET/transitions", 204),
        ],
        "Done",
    ),
    "thehive": System(
        lambda: TheHiveStandIn(authorization=f"Bearer {HIVE_KEY}"),
        thehive_hook,
        [
            ("POST", "/api/v1/alert", 201),
            ("PATCH", "/api/v1/alert/TICKET", 204),
            ("PATCH", "/api/v1/alert/TICKET", 204),
        ],
        "Other",
    ),
    "servicenow": System(
        lambda: ServiceNowStandIn(authorization=basic_auth(SNOW_USER, SNOW_PASSWORD)),
        servicenow_hook,
        [
            ("POST", "/api/now/table/incident", 201),
            ("PATCH", "/api/now/table/incident/TICKET", 200),
            ("PATCH", "/api/now/table/incident/TICKET", 200),
        ],
        "6",  # Resolved
    ),
}


@pytest.fixture
async def running(request: pytest.FixtureRequest) -> AsyncIterator[StandIn]:
    async with SYSTEMS[request.param].make() as api:
        yield api


def calls(api: StandIn) -> list[tuple[str, str, int]]:
    refs = list(api.tickets)
    shown = [(r.method, r.path, r.status) for r in api.requests]
    for ref in refs:
        shown = [
            (m, p.replace(f"/{ref}/", "/TICKET/").replace(f"/{ref}", "/TICKET"), s)
            for m, p, s in shown
        ]
    return shown


@pytest.mark.parametrize("running", list(SYSTEMS), indirect=True)
async def test_new_raised_resolved_open_one_ticket_update_it_and_resolve_it(
    running: StandIn, tmp_path: Path, loopback_only: None
) -> None:
    system = SYSTEMS[running.name]
    config = alerts_config(tmp_path, system.hook(running))
    with open_store(tmp_path, config) as store:
        alerts = sweep_days(store, NEW_RAISED_RESOLVED)
        assert [a.transition for a in alerts] == [
            Transition.NEW,
            Transition.SEVERITY_RAISED,
            Transition.RESOLVED,
        ]
        await deliver(store, config)
        assert store.outbox_counts() == {"pending": 0, "sent": 3, "dead": 0}
        (ref,) = running.tickets
        assert store.ticket_refs(alerts[0].finding.id) == {running.name: ref}
    assert calls(running) == system.calls, [r.reason for r in running.requests]
    ticket = running.tickets[ref]
    assert ticket.status == system.resolved
    assert alerts[0].finding.id in json.dumps(ticket.fields) + "".join(ticket.comments)


async def test_jira_issue_reads_as_the_documentation_describes(
    tmp_path: Path, loopback_only: None
) -> None:
    async with SYSTEMS["jira"].make() as jira:
        config = alerts_config(tmp_path, jira_hook(jira))
        with open_store(tmp_path, config) as store:
            alerts = sweep_days(store, NEW_RAISED_RESOLVED)
            await deliver(store, config)
    issue = jira.tickets["SEC-1"]
    fields = issue.fields
    assert fields["project"] == {"key": "SEC"} and fields["issuetype"] == {"name": "Task"}
    assert fields["summary"] == f"relayaudit: {alerts[0].finding.title}"
    assert fields["labels"] == ["relayaudit", "open-relay"]
    assert fields["description"].startswith("{noformat}\n3 of the relay tests accepted.")
    assert [c.split("\n")[1].split(":")[0] for c in issue.comments] == [
        "SEVERITY-RAISED",
        "RESOLVED",
    ]
    assert "(was medium)" in issue.comments[0]
    assert issue.history == ["create", "comment", "transition to Done"]


async def test_thehive_alert_is_keyed_by_the_finding_and_closed_with_a_summary(
    tmp_path: Path, loopback_only: None
) -> None:
    async with SYSTEMS["thehive"].make() as hive:
        config = alerts_config(tmp_path, thehive_hook(hive))
        with open_store(tmp_path, config) as store:
            alerts = sweep_days(store, NEW_RAISED_RESOLVED)
            await deliver(store, config)
    (alert,) = hive.tickets.values()
    created = hive.requests[0].json()
    assert (created["type"], created["source"], created["sourceRef"]) == (
        "relayaudit",
        "relayaudit",
        alerts[0].finding.id,
    )
    assert created["severity"] == 2 and created["tags"] == ["relayaudit", "open-relay"]
    raised = hive.requests[1].json()
    assert raised["severity"] == 4 and "status" not in raised
    assert hive.requests[2].json()["summary"].startswith("```\nResolved on ")
    assert alert.history == ["create", "update", "update to Other"]


async def test_servicenow_incident_gets_work_notes_and_is_resolved_with_a_code(
    tmp_path: Path, loopback_only: None
) -> None:
    async with SYSTEMS["servicenow"].make() as snow:
        config = alerts_config(tmp_path, servicenow_hook(snow))
        with open_store(tmp_path, config) as store:
            alerts = sweep_days(store, NEW_RAISED_RESOLVED)
            await deliver(store, config)
    (incident,) = snow.tickets.values()
    assert incident.fields["number"] == "INC0010001"
    assert incident.fields["correlation_id"] == alerts[0].finding.id
    assert incident.fields["assignment_group"] == "ISO"
    assert incident.fields["urgency"] == "1"  # raised from medium ("2") to critical
    assert incident.fields["close_code"] == "Solution provided"
    assert incident.fields["close_notes"].startswith("Resolved on ")
    assert [n.split(":")[0] for n in incident.comments] == ["SEVERITY-RAISED", "RESOLVED"]


async def test_chat_gets_one_message_per_transition(tmp_path: Path, loopback_only: None) -> None:
    async with ChatStandIn() as chat:
        config = alerts_config(tmp_path, chat_hook(chat))
        with open_store(tmp_path, config) as store:
            alerts = sweep_days(store, NEW_RAISED_RESOLVED)
            await deliver(store, config)
            assert store.ticket_refs(alerts[0].finding.id) == {}
    assert [m.split(" ")[0] for m in chat.messages] == ["*NEW*", "*SEVERITY", "*RESOLVED*"]
    assert all(r.status == 200 for r in chat.requests) and len(chat.requests) == 3
    assert chat.messages[2].splitlines()[1].startswith("Resolved on ")


async def test_a_hook_without_a_template_sends_the_alert_v1(
    tmp_path: Path, loopback_only: None
) -> None:
    async with GenericStandIn(authorization="Bearer generic") as generic:
        hook = f"""
[[alerts.webhook]]
url = "{generic.url}/hooks/relayaudit"
token = "generic"
"""
        config = alerts_config(tmp_path, hook)
        with open_store(tmp_path, config) as store:
            alerts = sweep_days(store, NEW_RAISED_RESOLVED)
            await deliver(store, config)
    assert [d.idempotency_key for d in generic.documents] == [a.key for a in alerts]
    assert generic.documents[2].resolved_at is not None


# -- names, retries and template errors ---------------------------------------------------------


async def test_reordered_hooks_keep_updating_their_own_ticket(
    tmp_path: Path, loopback_only: None
) -> None:
    # two Jira projects with different workflows: an update aimed at the other hook's issue
    # would be refused (its resolve transition does not exist there)
    projects = {"SEC": {"31": "Done"}, "OPS": {"41": "Closed"}}
    auth = basic_auth(JIRA_USER, JIRA_TOKEN)
    async with JiraStandIn(authorization=auth, projects=projects) as jira:
        sec = jira_hook(jira, name="jira-sec", project="SEC", to="31")
        ops = jira_hook(jira, name="jira-ops", project="OPS", to="41")
        first = alerts_config(tmp_path, sec + ops)
        with open_store(tmp_path, first) as store:
            sweep_days(store, NEW_RAISED_RESOLVED[:1])
            await deliver(store, first)
            assert sorted(jira.tickets) == ["OPS-1", "SEC-1"]
            swapped = alerts_config(tmp_path, ops + sec)  # the operator reorders the file
            store.set_channels(channel_names(swapped))
            sweep_days(store, NEW_RAISED_RESOLVED[1:], first_day=1)
            await deliver(store, swapped)
            assert store.outbox_counts() == {"pending": 0, "sent": 6, "dead": 0}
    assert [r.reason for r in jira.requests if r.status >= 300] == []
    assert (jira.tickets["SEC-1"].status, jira.tickets["OPS-1"].status) == ("Done", "Closed")
    for issue in jira.tickets.values():
        assert issue.history == ["create", "comment", f"transition to {issue.status}"]


async def test_a_failed_create_is_retried_and_later_transitions_update_that_ticket(
    tmp_path: Path, loopback_only: None
) -> None:
    async with SYSTEMS["servicenow"].make() as snow:
        snow.fail_next(1, status=503)
        config = alerts_config(tmp_path, servicenow_hook(snow))
        with open_store(tmp_path, config) as store:
            alerts = sweep_days(store, NEW_RAISED_RESOLVED)
            dispatcher = await deliver(store, config)
            assert dispatcher.retried == 1
            assert store.outbox_counts() == {"pending": 0, "sent": 3, "dead": 0}
            (sys_id,) = snow.tickets
            assert store.ticket_refs(alerts[0].finding.id) == {"servicenow": sys_id}
    assert calls(snow) == [
        ("POST", "/api/now/table/incident", 503),
        *SYSTEMS["servicenow"].calls,
    ]
    assert snow.tickets[sys_id].status == "6"


def test_a_template_syntax_error_is_a_config_error_naming_the_file_and_line(
    tmp_path: Path,
) -> None:
    # a copy of a shipped template beside the config (found relative to the config's directory)
    copy = tmp_path / "templates" / "jira-comment.json.j2"
    copy.parent.mkdir()
    shipped = (SHIPPED_TEMPLATES / "jira-comment.json.j2").read_text(encoding="utf-8")
    lines = shipped.splitlines()
    broken = lines.index("{{ transition | upper }}: {{ alert.title }}") + 1
    lines[broken - 1] = "{{ transition | upper }: {{ alert.title }}"
    copy.write_text("\n".join(lines) + "\n", encoding="utf-8")
    api = JiraStandIn(authorization=None)
    hook = jira_hook(api).replace('"jira-comment.json.j2"', '"templates/jira-comment.json.j2"')
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, hook))
    assert re.search(
        rf"update_template: line \d+: template {re.escape(str(copy))}: line {broken}: ",
        str(info.value),
    ), info.value

    shutil.copy(SHIPPED_TEMPLATES / "jira-comment.json.j2", copy)  # the copy, repaired, loads
    assert load_config(write_config(tmp_path, hook)).alerts.webhook[0].update_template


# -- the templates and the stand-ins on their own -----------------------------------------------

SHIPPED = sorted(p.name for p in SHIPPED_TEMPLATES.glob("*.j2") if not p.name.startswith("rt-"))


@pytest.mark.parametrize("name", SHIPPED)
def test_each_template_names_its_api_documentation_and_how_it_was_checked(name: str) -> None:
    header = (SHIPPED_TEMPLATES / name).read_text(encoding="utf-8").split("-#}", 1)[0]
    assert header.startswith("{#- ") and "https://" in header
    assert "Checked against a loopback stand-in" in header and "not a live system" in header


def hostile_context(transition: Transition) -> dict[str, Any]:
    """What a template sees for an alert whose evidence quotes a hostile server."""
    finding = make_finding(severity=Severity.HIGH, title="Open relay on 127.0.9.7:25")
    chem = Owner(name="Chemistry", contact="it@chem.campus.test", queue="chem-it")
    moved = transition is Transition.OWNER_CHANGED
    alert = Alert(
        key=f"{finding.id}/{transition.value}/1",
        transition=transition,
        finding=finding.model_copy(update={"owner": chem}),
        sweep_id="s1",
        created=T0,
        resolved_at=T0 if transition is Transition.RESOLVED else None,
        previous_owner=Owner(name="Central IT", contact="noc@campus.test") if moved else None,
    )
    doc = alert_v2(alert).model_dump(mode="json")  # templates see the v2 alert (docs/alerts.md)
    doc["evidence"] = [
        "rcpt-plain (plain): <a@b> 250, <c@d> 250 {noformat} [code]<img src=x> ``` <!channel>",
    ]
    return {
        "alert": doc,
        "document": doc,
        "transition": transition.value,
        "ticket_ref": "REF-1",
        "tickets": {},
        "hook": "h",
        "vars": {"project": "SEC", "resolve_transition": "31"},
        "remediation": remediation_context(
            RemediationRef(
                id="postfix/plain",
                software="Postfix",
                guess_confidence=GuessConfidence.LOW,
                doc_url="https://www.postfix.org/SMTPD_ACCESS_README.html",
            )
        ),
    }


@pytest.mark.parametrize("transition", list(Transition))
@pytest.mark.parametrize("name", SHIPPED)
def test_server_text_stays_inside_its_block(name: str, transition: Transition) -> None:
    text = (SHIPPED_TEMPLATES / name).read_text(encoding="utf-8")
    body = json.dumps(json.loads(render_template(text, name, hostile_context(transition))))
    if "evidence" not in text:
        return  # this template quotes no server text
    if name.startswith("jira-"):
        assert body.count("{noformat}") == 2  # only the block's own start and end
    elif name.startswith("servicenow-"):
        assert "[code]" not in body.lower()
    elif name.startswith("thehive-"):
        assert body.count("```") == 2
    elif name.startswith("chat-"):
        assert "<" not in body  # the evidence (left out of a resolved message) as &lt;!channel&gt;
        assert ("&lt;!channel&gt;" in body) == (transition is not Transition.RESOLVED)
    # a ticket that opens (and a chat message of a relay still open) says how to fix it: the
    # generic text first, as the guess is low, then Postfix's, marked as a guess (issue 30)
    opens = name.endswith(("-create.json.j2", "-incident.json.j2", "-alert.json.j2"))
    if opens or (name.startswith("chat-") and transition is not Transition.RESOLVED):
        assert "How to fix it, on any mail server" in body, body
        assert "If it runs Postfix (a guess, low confidence" in body, body
        assert body.index("on any mail server") < body.index("If it runs Postfix")


def refused(api: StandIn, method: str, path: str, body: object, **headers: str) -> tuple[int, str]:
    """What `api` answers to one request, sent without a socket."""
    raw = json.dumps(body).encode() if not isinstance(body, bytes) else body
    all_headers = {"content-type": "application/json", **headers}
    if api.authorization is not None:
        all_headers.setdefault("authorization", api.authorization)
    request = Request(method, path, "", {k.lower(): v for k, v in all_headers.items()}, raw)
    status, _ = api.answer(request)
    return status, request.reason


def test_the_stand_ins_refuse_what_their_api_would() -> None:
    jira = JiraStandIn(authorization="Bearer pat")
    issue = {"project": {"key": "SEC"}, "summary": "s", "issuetype": {"name": "Task"}}
    assert refused(jira, "POST", "/rest/api/2/issue", {"fields": issue})[0] == 201
    assert refused(
        jira, "POST", "/rest/api/2/issue", {"fields": issue}, authorization="Bearer x"
    ) == (
        401,
        "bad credentials",
    )
    assert refused(jira, "PUT", "/rest/api/2/issue", {"fields": issue})[0] == 405
    assert (
        refused(jira, "POST", "/rest/api/2/issue", b"{}", **{"content-type": "text/plain"})[0]
        == 415
    )
    no_type = {k: v for k, v in issue.items() if k != "issuetype"}
    assert refused(jira, "POST", "/rest/api/2/issue", {"fields": no_type}) == (
        400,
        "body.fields.issuetype: required",
    )
    assert refused(jira, "POST", "/rest/api/2/issue", {"fields": {**issue, "summry": "x"}}) == (
        400,
        "body.fields.summry: not a field this call takes",
    )
    assert refused(jira, "POST", "/rest/api/2/issue", {"fields": {**issue, "summary": "a\nb"}}) == (
        400,
        "body.fields.summary: must be one line",
    )
    assert refused(
        jira, "POST", "/rest/api/2/issue/SEC-1/transitions", {"transition": {"id": "5"}}
    ) == (
        400,
        "Transition id '5' is not valid for this issue.",
    )
    assert refused(jira, "POST", "/rest/api/2/issue/SEC-9/comment", {"body": "x"})[0] == 404

    hive = TheHiveStandIn(authorization="Bearer key")
    alert = {"type": "t", "source": "s", "sourceRef": "ra-1", "title": "x", "description": "d"}
    assert refused(hive, "POST", "/api/v1/alert", alert)[0] == 201
    assert refused(hive, "POST", "/api/v1/alert", alert)[0] == 400  # type+source+sourceRef again
    assert (
        refused(hive, "POST", "/api/v1/alert", {**alert, "sourceRef": "ra-2", "severity": 5})[0]
        == 400
    )
    assert refused(hive, "PATCH", "/api/v1/alert/~4096", {"status": "Other"})[0] == 204
    assert refused(hive, "PATCH", "/api/v1/alert/~4096", {"status": "New"}) == (
        400,
        "body.status: a Closed alert cannot go back to New",
    )
    assert refused(hive, "PATCH", "/api/v1/alert/~4096", {"status": "InProgress"})[0] == 204

    snow = ServiceNowStandIn(authorization=basic_auth("u", "p"))
    assert refused(snow, "POST", "/api/now/table/incident", {"description": "d"}) == (
        400,
        "body.short_description: required",
    )
    assert refused(snow, "POST", "/api/now/table/incident", {"short_description": "x"})[0] == 201
    (sys_id,) = snow.tickets
    path = f"/api/now/table/incident/{sys_id}"
    assert refused(snow, "PATCH", path, {"state": "6"})[0] == 403  # no resolution code and notes
    assert refused(snow, "PATCH", path, {"urgency": "high"})[0] == 400
    assert refused(snow, "PATCH", "/api/now/table/incident/0", {"urgency": "1"})[0] == 404

    chat = ChatStandIn()
    assert refused(chat, "POST", chat.path, {"txt": "x"}) == (400, "no_text")
    assert refused(chat, "POST", chat.path, {"text": "x", "attachments": []})[0] == 400
    assert refused(chat, "POST", "/hooks/elsewhere", {"text": "x"})[0] == 404
    assert chat.messages == []


def test_the_configs_docs_alerts_md_shows_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "alerts.md").read_text("utf-8")
    section = docs.split("\n## Ticket systems\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```toml\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 5  # RT, Jira, TheHive, ServiceNow, chat
    for name in re.findall(r'env = "([A-Z_]+)"', section):
        monkeypatch.setenv(name, "from-the-environment")
    for block in blocks:
        hook = load_config(write_config(tmp_path, block)).alerts.webhook[0]
        assert hook.template is not None
        assert Path(hook.template.path).parent == SHIPPED_TEMPLATES
        shipped = [p.name for p in SHIPPED_TEMPLATES.glob("*.j2")]
        assert any(name.startswith(f"{hook.name}-") for name in shipped)  # its own templates
