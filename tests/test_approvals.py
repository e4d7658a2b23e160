"""Approvals that name an owner and expire (issue 29, item 3): `[[approved]]` `owner` and
`expires`, judged at the sweep's recorded start in the schedule's zone; config check, the
gauge and the report's approved-services table. Every test gives the day or the start."""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cli_runner import run_main
from daemon_harness import DaemonProcess, base_config, write_config
from factories import observe
from loopback import free_port
from test_alert_gauges import scrape_text

from relayaudit.config import Config, load_config, parse_config
from relayaudit.engine import Sweep, judge_result
from relayaudit.errors import ConfigError
from relayaudit.evidence import ProbeResult, ProbeStatus
from relayaudit.html_page import Service, page_from_sweep
from relayaudit.html_report import render_html
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.owners import load_owners
from relayaudit.progress import SweepStats
from relayaudit.report import expiry_lines
from relayaudit.sinks import Collector
from relayaudit.state import StateSink, StateStore
from relayaudit.verdict import FindingKind, VerdictStatus

HOST, PORT = "127.0.137.1", 2837  # this file's lab: 127.0.137.0/24
LAST_DAY = date(2027, 3, 31)
CHEM = {
    "name": "Chemistry",
    "contact": "it@chem.campus.test",
    "queue": "chem-it",
    "ranges": ["127.0.137.0/25"],
}
PHYS = {"name": "Physics", "contact": "it@phys.campus.test", "ranges": ["127.0.137.128/25"]}


def config(*approved: dict[str, Any], **extra: Any) -> Config:
    data: dict[str, Any] = {
        "scope": ["127.0.137.0/24"],
        "targets": [f"{HOST}/32"],
        "ports": [PORT],
        "identity": {"helo_name": "relayaudit.campus.test"},
        "relay": {"campus_domains": ["campus.test"]},
        "timeouts": {"connect": "1s", "command": "2s", "session": "10s"},
        "approved": list(approved),
        **extra,
    }
    return parse_config(data, source="approvals.toml")


HUB_ADDRESS = ipaddress.ip_address(HOST)
HUB = {"address": HOST, "port": PORT, "note": "ISO-0042 chem hub", "expires": LAST_DAY}


def smtp_result() -> ProbeResult:
    """An SMTP server answered at HOST:PORT (the approval decides whether that is a finding)."""
    result, _ = observe(address=HOST, port=PORT, status=VerdictStatus.RELAY_REFUSED)
    assert result.status is ProbeStatus.SMTP
    return result


def unapproved(cfg: Config, day: date) -> list[str]:
    verdict = judge_result(cfg, smtp_result(), day=day)
    return [f.summary for f in verdict.findings if f.kind is FindingKind.UNAPPROVED_SMTP]


def test_an_approval_holds_through_its_last_day_and_then_names_itself() -> None:
    cfg = config(HUB)
    assert unapproved(cfg, LAST_DAY - timedelta(days=1)) == []
    assert unapproved(cfg, LAST_DAY) == []  # valid through that day
    (summary,) = unapproved(cfg, LAST_DAY + timedelta(days=1))
    assert summary.endswith(
        f"its approval ran out: the approval {HOST}/32 port {PORT} ('ISO-0042 chem hub') "
        "expired after 2027-03-31."
    )
    # without a day (no sweep start known) expiry is not considered
    no_day = judge_result(cfg, smtp_result()).findings
    assert all(f.kind is not FindingKind.UNAPPROVED_SMTP for f in no_day)


def test_a_valid_approval_wins_over_an_expired_one_for_the_same_service() -> None:
    renewed = {"address": f"{HOST}/32", "note": "ISO-0077 renewed", "expires": date(2028, 3, 31)}
    cfg = config(HUB, renewed)
    after = LAST_DAY + timedelta(days=1)
    verdict = judge_result(cfg, smtp_result(), day=after)
    assert all(f.kind is not FindingKind.UNAPPROVED_SMTP for f in verdict.findings)
    approved = cfg.is_approved(HUB_ADDRESS, PORT, day=after)
    assert approved is not None and approved.note == "ISO-0077 renewed"
    assert cfg.expired_approval(HUB_ADDRESS, PORT, day=after) is None


def test_expires_is_a_toml_date_and_owner_needs_an_owner_table(tmp_path: Path) -> None:
    path = tmp_path / "relayaudit.toml"
    path.write_text(
        f'scope = ["127.0.137.0/24"]\ntargets = ["{HOST}/32"]\n'
        '[relay]\ncampus_domains = ["campus.test"]\n'
        f'[[approved]]\naddress = "{HOST}"\nexpires = 2027-03-31\nowner = "Physics"\n',
        encoding="utf-8",
    )
    with pytest.raises(
        ConfigError, match=r"approved\[0\]\.owner: line 8: 'Physics' names an owner"
    ):
        load_config(path)
    with_owners = path.read_text(encoding="utf-8") + (
        '[[owners]]\nname = "Chemistry"\nranges = ["127.0.137.0/25"]\n'
        'contact = "it@chem.campus.test"\n'
    )
    path.write_text(with_owners, encoding="utf-8")
    cfg = load_config(path)
    assert cfg.approved[0].expires == LAST_DAY
    with pytest.raises(
        ConfigError, match=r"approved\[0\]\.owner: 'Physics' is no owner .*Chemistry"
    ):
        load_owners(cfg)


def test_an_approvals_owner_beats_the_ranges_owner_for_that_service_only() -> None:
    cfg = config({**HUB, "owner": "Physics"}, owners=[CHEM, PHYS])
    table = load_owners(cfg)
    owner = table.lookup(HOST, PORT)
    assert owner is not None and owner.name == "Physics"
    other = table.lookup(HOST, PORT + 1)  # another port of the host: the range's owner
    assert other is not None and other.name == "Chemistry"
    # the state store keeps the override with the table (a restart with an unreadable file)
    again = type(table).from_json(table.to_json(), where="store")
    kept = again.lookup(HOST, PORT)
    assert again.digest == table.digest and kept is not None and kept.name == "Physics"


@pytest.mark.parametrize(
    ("zone", "expired"),
    [(UTC, False), (timezone(timedelta(hours=2)), True)],
    ids=["utc-still-march-31", "utc+2-already-april-1"],
)
async def test_a_sweep_judges_every_host_at_its_recorded_start_in_the_schedules_zone(
    zone: timezone, expired: bool
) -> None:
    # recorded at 23:30 UTC on the last day, long before now: in UTC+2 it is April 1st already
    started = datetime(2027, 3, 31, 23, 30, tzinfo=UTC)
    cfg = config({**HUB, "owner": "Physics"}, owners=[CHEM, PHYS])
    collector = Collector()
    async with Lab([ServerSpec(host=HOST, port=PORT, behaviour=Behaviour.CLOSED)]):
        plan = Sweep(cfg, started=started, zone=zone)
        await plan.run(sinks=[collector])
    found = [f for f in collector.findings if f.kind is FindingKind.UNAPPROVED_SMTP]
    if not expired:
        assert found == []
        return
    (finding,) = found
    assert "expired after 2027-03-31" in finding.summary and "ISO-0042" in finding.summary
    # the expired approval's owner still names who runs the service
    assert finding.owner is not None and finding.owner.name == "Physics"


async def test_a_sweep_resumed_after_midnight_judges_at_its_recorded_start(
    tmp_path: Path,
) -> None:
    # the approval's last day ends while the sweep is interrupted: the part resumed after
    # midnight must judge its hosts as the part before it did, at the start the store recorded
    now = [datetime(2027, 3, 31, 23, 50, tzinfo=UTC)]
    hubs = {"address": "127.0.137.0/30", "port": PORT, "note": "ISO-0042", "expires": LAST_DAY}
    cfg = config(hubs, targets=["127.0.137.1/32", "127.0.137.2/32"])
    servers = [
        ServerSpec(host=h, port=PORT, behaviour=Behaviour.CLOSED)
        for h in ("127.0.137.1", "127.0.137.2")
    ]
    with StateStore(tmp_path / "state.sqlite", clock=lambda: now[0]) as store:
        async with Lab(servers):
            first = store.begin_sweep(shard="0/1", config_fingerprint="fp", total=2)
            before = Sweep(cfg, started=first.started, zone=UTC)
            await before.run(sinks=[StateSink(store, first.id)])
            store.checkpoint(first.id, 1)  # interrupted with one host done, before midnight
            now[0] = datetime(2027, 4, 1, 0, 10, tzinfo=UTC)  # restarted after midnight
            resumed = store.begin_sweep(shard="0/1", config_fingerprint="fp", total=2)
            assert resumed.resumed and resumed.id == first.id
            assert resumed.started == datetime(2027, 3, 31, 23, 50, tzinfo=UTC)
            after = Sweep(cfg, started=resumed.started, zone=UTC)
            collector = Collector()
            await after.run(sinks=[StateSink(store, resumed.id), collector], start=1)
            # what judging at the wall clock would have done to the resumed part
            wall = Collector()
            await Sweep(cfg, started=now[0], zone=UTC).run(sinks=[wall], start=1)
        store.complete_sweep(resumed.id, SweepStats(finished=now[0]))
        assert len(collector.results) == 1  # the resumed part: the second host only
        assert collector.findings == []  # still approved: judged on March 31
        kinds = {r.kind for r in store.findings()}
        assert FindingKind.UNAPPROVED_SMTP not in kinds
    (expired,) = [f for f in wall.findings if f.kind is FindingKind.UNAPPROVED_SMTP]
    assert "expired after 2027-03-31" in expired.summary


def test_expiry_lines_list_the_expired_and_those_within_30_days() -> None:
    today = date(2027, 3, 10)
    cfg = config(
        {"address": "127.0.137.2", "note": "gone", "expires": date(2027, 3, 9)},
        {"address": "127.0.137.3", "note": "soon", "expires": date(2027, 3, 31)},
        {"address": "127.0.137.4", "note": "today", "expires": today},
        {"address": "127.0.137.5", "note": "later", "expires": date(2027, 4, 10)},
        {"address": "127.0.137.6", "note": "forever"},
    )
    assert expiry_lines(cfg, today) == [
        "expired after 2027-03-09: 127.0.137.2/32 ('gone')",
        "expires 2027-03-10 (today is its last day): 127.0.137.4/32 ('today')",
        "expires 2027-03-31 (21 days left): 127.0.137.3/32 ('soon')",
    ]
    assert len(cfg.expiring(today)) == 2


def test_config_check_lists_approvals_that_expire_within_30_days(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # config check judges on the host's today: the dates are written relative to it
    today = datetime.now().astimezone().date()
    soon, later = today + timedelta(days=10), today + timedelta(days=45)
    path = tmp_path / "relayaudit.toml"
    path.write_text(
        f'scope = ["127.0.137.0/24"]\ntargets = ["{HOST}/32"]\n'
        f'[[approved]]\naddress = "127.0.137.3"\nnote = "ISO-1"\nexpires = {soon}\n'
        f'[[approved]]\naddress = "127.0.137.4"\nnote = "ISO-2"\nexpires = {later}\n',
        encoding="utf-8",
    )
    code, out, err = run_main(capsys, "config", "check", str(path))
    assert (code, err) == (0, ""), out
    assert f"    expires {soon} (10 days left): 127.0.137.3/32 ('ISO-1')\n" in out
    assert "ISO-2" not in out


def test_the_reports_approved_table_shows_owner_note_and_expiry() -> None:
    cfg = config(
        {**HUB, "owner": "Physics"},
        {"address": "127.0.137.9", "note": "ISO-9 lab", "expires": date(2099, 1, 1)},
        owners=[CHEM, PHYS],
    )
    now = datetime(2027, 4, 2, 12, tzinfo=UTC)
    stats = SweepStats(started=now - timedelta(seconds=5), finished=now)
    page = page_from_sweep(
        [],
        sweep_id="s1",
        stats=stats,
        config=cfg,
        services=[Service(HOST, PORT, VerdictStatus.RELAY_REFUSED)],
        now=now,
    )
    html = render_html(page)
    table = html.split('id="h-approved"', 1)[1].split("</table>", 1)[0]
    assert "<th>owner</th><th>note</th><th>expires</th>" in table
    rows = table.split("<tr>")[2:]
    assert "Physics" in rows[0] and "ISO-0042 chem hub" in rows[0]
    assert "expired after 2027-03-31" in rows[0]
    assert "Chemistry (the range's)" in rows[1] and "2099-01-01" in rows[1]


async def test_the_daemon_counts_approvals_expiring_within_30_days(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    today = datetime.now().astimezone().date()
    metrics_port = free_port()
    data = base_config(tmp_path, f"{HOST}/32", PORT)
    data["schedule"] = {"interval": "1h"}
    data["metrics"] = {"enabled": True, "listen": f"127.0.0.1:{metrics_port}"}
    data["approved"] = [
        {"address": "127.0.137.3", "note": "soon", "expires": today + timedelta(days=3)},
        {"address": "127.0.137.4", "note": "later", "expires": today + timedelta(days=90)},
        {"address": "127.0.137.5", "note": "gone", "expires": today - timedelta(days=1)},
    ]
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    async with Lab([ServerSpec(host=HOST, port=PORT, behaviour=Behaviour.CLOSED)]):
        daemon = DaemonProcess(cfg, tmp_path / "log.jsonl")
        daemons.append(daemon)
        await daemon.start()
        await daemon.wait_for(lambda: bool(daemon.events("sweep.summary")), 30, "a sweep")
        body = await scrape_text(metrics_port)
        assert await daemon.stop() == 0
    assert re.search(r"^relayaudit_approvals_expiring 1(\.0)?$", body, re.M), body
