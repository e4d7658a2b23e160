"""The shipped Request Tracker templates against a real RT 5 on loopback (issues 23 and 29): REST2
creates one ticket, comments on it, resolves it, moves it when the finding's owner changes; mail
reaches the same ticket through rt-mailgate only when its subject carries RT's tag."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from alert_flow import deliver
from factories import make_finding, observe, one_sweep
from rt_lab import RTNAME, MailgateResult, RtServer
from smtp_sink import serve_smtp
from test_tickets import new_raised_resolved

from relayaudit.config import AlertsConfig, Config, load_config
from relayaudit.owners import load_owners
from relayaudit.records import Transition
from relayaudit.state import StateStore


class Mailgate:
    """An SMTP receiver on loopback that hands every message to RT as its MTA alias would."""

    def __init__(self, rt: RtServer) -> None:
        self.rt = rt
        self.results: list[MailgateResult] = []
        self.subjects: list[str] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = bytes(envelope.content)
        subject = str(BytesParser(policy=policy.default).parsebytes(message)["Subject"])
        result = await asyncio.to_thread(self.rt.mailgate, message)
        with self.lock:
            self.results.append(result)
            self.subjects.append(subject)
        # an MTA bounces what the gateway could not hand over; RT refusing is its own answer
        return "250 2.0.0 handed to RT" if result.returncode == 0 else "451 4.3.0 RT is down"


@pytest.fixture
def mailgate(rt: RtServer) -> Iterator[tuple[Mailgate, int]]:
    gate = Mailgate(rt)
    with serve_smtp(gate) as port:
        yield gate, port


def rt_config(tmp: Path, rt: RtServer, extra: str = "") -> AlertsConfig:
    """The example config's RT hook, pointed at the loopback RT, with the shipped templates."""
    return rt_whole_config(tmp, rt, extra).alerts


def rt_whole_config(tmp: Path, rt: RtServer, extra: str = "", top: str = "") -> Config:
    """rt_config's config whole; `top` goes before the first table (owners_file, say)."""
    path = tmp / "relayaudit.toml"
    path.write_text(
        f"""
scope = ["192.0.2.0/24"]
targets = ["192.0.2.0/28"]
{top}
[alerts]
backoff_initial = "0.05s"
backoff_max = "0.2s"
[[alerts.webhook]]
name = "rt"
url = "{rt.rest2_url}/ticket"
token = "{rt.token}"
token_scheme = "token"
template = "rt-create.json.j2"
vars = {{ queue = "{rt.queue}" }}
ticket_ref = "/id"
update_url = "{rt.rest2_url}/ticket/{{{{ ticket_ref }}}}/comment"
update_template = "rt-comment.json.j2"
{extra}""",
        encoding="utf-8",
    )
    return load_config(path)


async def test_rest2_new_raised_resolved_is_one_ticket_commented_then_resolved(
    tmp_path: Path, rt: RtServer
) -> None:
    config = rt_config(tmp_path, rt)
    with StateStore(tmp_path / "state.sqlite", resolve_after=2) as store:
        store.set_channels(["rt"])
        new, _, _ = new_raised_resolved(store)
        await deliver(store, config, timeout=60)
        assert store.outbox_counts()["dead"] == 0
        assert store.ticket_refs(new.finding.id) == {"rt": "1"}
    tickets = await asyncio.to_thread(rt.tickets)
    assert tickets == [(1, f"relayaudit: {new.finding.title}", "resolved")]
    history = await asyncio.to_thread(rt.history, 1)
    assert history.count("Create") == 1 and history.count("Comment") == 2, history
    assert "Status" in history  # the resolved comment set it
    status, body = await asyncio.to_thread(
        rt.request, "GET", "/ticket/1/history?fields=Type,Content"
    )
    assert status == 200, body


async def test_mail_with_rts_tag_lands_on_the_rest2_ticket(
    tmp_path: Path, rt: RtServer, mailgate: tuple[Mailgate, int]
) -> None:
    gate, port = mailgate
    config = rt_config(
        tmp_path,
        rt,
        f"""
[[alerts.email]]
name = "rt-mail"
host = "127.0.0.1"
port = {port}
mail_from = "relayaudit@iso.example.test"
to = ["rt@{RTNAME}"]
subject_template = "[{RTNAME} #{{{{ tickets.rt }}}}] {{{{ alert.title }}}}"
""",
    )
    with StateStore(tmp_path / "state.sqlite", resolve_after=2) as store:
        store.set_channels(["rt", "rt-mail"])
        new_raised_resolved(store)
        await deliver(store, config, timeout=60)
        assert store.outbox_counts()["dead"] == 0
    assert len(gate.results) == 3 and all(r.accepted for r in gate.results), gate.results
    assert all(s.startswith(f"[{RTNAME} #1] ") for s in gate.subjects), gate.subjects
    tickets = await asyncio.to_thread(rt.tickets)
    assert [t[0] for t in tickets] == [1], tickets  # the mails joined the REST2 ticket
    history = await asyncio.to_thread(rt.history, 1)
    assert history.count("Correspond") == 3, history


async def test_mail_threaded_by_headers_alone_opens_a_second_rt_ticket(
    tmp_path: Path, rt: RtServer, mailgate: tuple[Mailgate, int]
) -> None:
    # the measurement docs/alerts.md reports: RT's gateway keys on its own tag, not on
    # In-Reply-To/References, so the default subject is one ticket per mail
    gate, port = mailgate
    path = tmp_path / "relayaudit.toml"
    path.write_text(
        f"""
scope = ["192.0.2.0/24"]
targets = ["192.0.2.0/28"]
[alerts]
backoff_initial = "0.05s"
[[alerts.email]]
host = "127.0.0.1"
port = {port}
mail_from = "relayaudit@iso.example.test"
to = ["rt@{RTNAME}"]
""",
        encoding="utf-8",
    )
    config = load_config(path).alerts
    with StateStore(tmp_path / "state.sqlite", resolve_after=2) as store:
        store.set_channels(["email"])
        new_raised_resolved(store)
        await deliver(store, config, timeout=60)
        assert store.outbox_counts()["dead"] == 0
    assert len(gate.results) == 3 and all(r.accepted for r in gate.results)
    tickets = await asyncio.to_thread(rt.tickets)
    assert len(tickets) == 3, tickets


async def test_an_owner_row_that_changes_moves_the_one_ticket_to_the_new_queue(
    tmp_path: Path, rt: RtServer
) -> None:
    owners = tmp_path / "owners.csv"
    owners.write_text(
        "range,name,contact,queue\n192.0.2.0/24,Chemistry,it@chem.campus.example,chem-it\n",
        encoding="utf-8",
    )
    config = rt_whole_config(
        tmp_path,
        rt,
        f"""move_url = "{rt.rest2_url}/ticket/{{{{ ticket_ref }}}}"
move_template = "rt-move.json.j2"
""",
        top=f'owners_file = "{owners}"\nowners_contact_domains = ["campus.example"]',
    )
    try:
        queues = {}
        for name in ("chem-it", "phys-it"):
            status, body = await asyncio.to_thread(rt.request, "POST", "/queue", {"Name": name})
            assert status == 201, body
            queues[name] = int(body["id"])
        with StateStore(tmp_path / "state.sqlite") as store:
            store.set_channels(["rt"])
            # the sweep stamps a new finding from the table it read
            table = load_owners(config)
            relay = make_finding(address="192.0.2.7")
            relay = relay.model_copy(update={"owner": table.lookup(relay.address)})
            one_sweep(store, observe(relay, address=relay.address))
            store.restamp_owners(table, sweep_id=store.sweeps(limit=1)[0].id)
            await deliver(store, config.alerts, timeout=60)
            assert store.ticket_refs(relay.id) == {"rt": "1"}
            # the IPAM moves the range to Physics; the next sweep reads it and restamps
            owners.write_text(
                "range,name,contact,queue\n192.0.2.0/24,Physics,it@phys.campus.example,phys-it\n",
                encoding="utf-8",
            )
            one_sweep(store, observe(relay, address=relay.address))
            moved = store.restamp_owners(load_owners(config), sweep_id=store.sweeps(limit=1)[0].id)
            assert [a.transition for a in moved.alerts] == [Transition.OWNER_CHANGED]
            await deliver(store, config.alerts, timeout=60)
            assert store.outbox_counts() == {"pending": 0, "sent": 2, "dead": 0}
        tickets = await asyncio.to_thread(rt.tickets)
        assert tickets == [(1, f"relayaudit: {relay.title}", "new")]  # one ticket, no second
        status, ticket = await asyncio.to_thread(rt.request, "GET", "/ticket/1")
        assert status == 200 and int(ticket["Queue"]["id"]) == queues["phys-it"], ticket
        history = await asyncio.to_thread(rt.history, 1)
        assert history.count("Create") == 1 and "Set" in history, history
        status, found = await asyncio.to_thread(
            rt.request, "GET", "/ticket/1/history?fields=Type,Field,OldValue,NewValue"
        )
        assert status == 200, found
        (change,) = [t for t in found["items"] if t.get("Field") == "Queue"]
        assert (int(change["OldValue"]), int(change["NewValue"])) == (
            queues["chem-it"],
            queues["phys-it"],
        )
    finally:
        # queues were added: the next test gets RT restarted on its pristine database. In this
        # thread, not asyncio.to_thread: the server dies with the thread that started it.
        rt.reset(restart=True)
