"""State store on real SQLite files: transitions, idempotent recording, resume, outbox, errors, merge."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from factories import ADDR, SHARD, T0, make_finding, observe, one_sweep, probe_settings

from relayaudit.cli import main
from relayaudit.engine import SweepStats
from relayaudit.errors import StateError
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.probe import probe
from relayaudit.state import (
    FindingStatus,
    StateSink,
    StateStore,
    Transition,
    read_findings,
    read_history,
)
from relayaudit.verdict import (
    FindingKind,
    Severity,
    VerdictStatus,
    finding_id,
    judge,
)


def status_of(store: StateStore, fid: str) -> FindingStatus:
    (row,) = [r for r in store.findings() if r.id == fid]
    return row.status


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore(tmp_path / "state.sqlite", resolve_after=2)
    s.open()
    yield s
    s.close()


def at(day: int) -> datetime:
    return T0 + timedelta(days=day)


# -- transitions -------------------------------------------------------------------------------


def test_lifecycle_new_ongoing_resolved_reopened(store: StateStore) -> None:
    fid = finding_id(FindingKind.OPEN_RELAY, ADDR, 25)

    alerts = one_sweep(store, observe(make_finding(when=at(0)), when=at(0)))
    assert [(a.key, a.transition) for a in alerts] == [(f"{fid}/new/1", Transition.NEW)]
    assert status_of(store, fid) is FindingStatus.NEW

    assert one_sweep(store, observe(make_finding(when=at(1)), when=at(1))) == []
    assert status_of(store, fid) is FindingStatus.ONGOING

    assert one_sweep(store, observe(when=at(2))) == []  # absent once: not yet resolved
    (row,) = store.findings()
    assert (row.status, row.missed) == (FindingStatus.ONGOING, 1)

    alerts = one_sweep(store, observe(when=at(3)))
    assert [(a.key, a.transition) for a in alerts] == [(f"{fid}/resolved/2", Transition.RESOLVED)]
    assert alerts[0].finding.observed_at == at(1)  # the finding as last seen
    (row,) = store.findings()
    assert (row.status, row.resolved_at, row.last_seen, row.first_seen) == (
        FindingStatus.RESOLVED,
        at(3),
        at(1),
        at(0),
    )

    assert one_sweep(store, observe(when=at(4))) == []  # resolved stays resolved, no alert

    alerts = one_sweep(store, observe(make_finding(when=at(5)), when=at(5)))
    assert [(a.key, a.transition) for a in alerts] == [(f"{fid}/reopened/3", Transition.REOPENED)]
    assert status_of(store, fid) is FindingStatus.REOPENED
    assert store.findings()[0].resolved_at is None

    assert one_sweep(store, observe(make_finding(when=at(6)), when=at(6))) == []
    assert status_of(store, fid) is FindingStatus.ONGOING
    assert [a.key for a in store.alerts()] == [
        f"{fid}/new/1",
        f"{fid}/resolved/2",
        f"{fid}/reopened/3",
    ]


def test_resolution_needs_consecutive_absences(store: StateStore) -> None:
    one_sweep(store, observe(make_finding()))
    for day in range(1, 7):  # absent, present, absent, present...: never two misses in a row
        present = day % 2 == 0
        obs = (
            observe(make_finding(when=at(day)), when=at(day)) if present else observe(when=at(day))
        )
        assert one_sweep(store, obs) == []
    assert store.findings()[0].status is FindingStatus.ONGOING


def test_an_undecided_probe_is_not_a_miss(store: StateStore) -> None:
    one_sweep(store, observe(make_finding()))
    for day, status in (
        (1, VerdictStatus.INCONCLUSIVE),
        (2, VerdictStatus.ERROR),
    ):  # 451s, local error
        assert one_sweep(store, observe(when=at(day), status=status)) == []
    (row,) = store.findings()
    assert (row.status, row.missed) == (FindingStatus.NEW, 0)
    assert [h.status for h in store.history(ADDR)][1:] == [
        VerdictStatus.INCONCLUSIVE,
        VerdictStatus.ERROR,
    ]


def test_severity_raised_alerts_and_lowered_does_not(store: StateStore) -> None:
    fid = finding_id(FindingKind.OPEN_RELAY, ADDR, 25)
    one_sweep(store, observe(make_finding(severity=Severity.MEDIUM)))
    alerts = one_sweep(store, observe(make_finding(severity=Severity.HIGH, when=at(1))))
    assert [(a.key, a.finding.severity) for a in alerts] == [
        (f"{fid}/severity-raised/2", Severity.HIGH)
    ]
    assert one_sweep(store, observe(make_finding(severity=Severity.LOW, when=at(2)))) == []
    assert store.findings()[0].severity is Severity.LOW  # lowered quietly, remembered
    alerts = one_sweep(store, observe(make_finding(severity=Severity.CRITICAL, when=at(3))))
    assert [a.key for a in alerts] == [f"{fid}/severity-raised/3"]


def test_one_fixed_problem_of_two_at_an_endpoint_resolves_alone(store: StateStore) -> None:
    relay = make_finding(FindingKind.OPEN_RELAY)
    unapproved = make_finding(FindingKind.UNAPPROVED_SMTP, severity=Severity.MEDIUM)
    assert {a.transition for a in one_sweep(store, observe(relay, unapproved))} == {Transition.NEW}
    still = make_finding(FindingKind.UNAPPROVED_SMTP, severity=Severity.MEDIUM, when=at(1))
    fixed = observe(still, when=at(1), status=VerdictStatus.RELAY_REFUSED)
    assert one_sweep(store, fixed) == []
    alerts = one_sweep(store, fixed)
    assert [(a.transition, a.finding.kind) for a in alerts] == [
        (Transition.RESOLVED, FindingKind.OPEN_RELAY)
    ]
    statuses = {r.kind: r.status for r in store.findings()}
    assert statuses == {
        FindingKind.OPEN_RELAY: FindingStatus.RESOLVED,
        FindingKind.UNAPPROVED_SMTP: FindingStatus.ONGOING,
    }


def test_recording_twice_in_one_sweep_never_duplicates(store: StateStore) -> None:
    present = observe(make_finding())
    rec = store.begin_sweep(shard=SHARD, config_fingerprint="fp", total=1)
    assert len(store.record(rec.id, *present)) == 1
    assert store.record(rec.id, *present) == []
    # a resumed sweep (same id) re-probing the same address must not alert again either
    store.close()
    store.open()
    again = store.begin_sweep(shard=SHARD, config_fingerprint="fp", total=1)
    assert again.resumed and again.id == rec.id
    assert store.record(again.id, *present) == []
    store.complete_sweep(again.id, SweepStats())

    # misses: one per sweep however often the sweep re-probes the empty port
    rec = store.begin_sweep(shard=SHARD, config_fingerprint="fp", total=1)
    for _ in range(3):
        assert store.record(rec.id, *observe(when=at(1))) == []
    store.complete_sweep(rec.id, SweepStats())
    assert store.findings()[0].missed == 1
    rec = store.begin_sweep(shard=SHARD, config_fingerprint="fp", total=1)
    resolved = [a for _ in range(3) for a in store.record(rec.id, *observe(when=at(2)))]
    assert [a.transition for a in resolved] == [Transition.RESOLVED]
    assert len(store.alerts()) == 2


def test_a_sighting_in_the_same_sweep_wins_over_a_miss(store: StateStore) -> None:
    one_sweep(store, observe(make_finding()))
    rec = store.begin_sweep(shard=SHARD, config_fingerprint="fp", total=1)
    store.record(rec.id, *observe(make_finding(when=at(1)), when=at(1)))
    store.record(rec.id, *observe(when=at(1)))  # a flaky re-probe of a resumed sweep
    (row,) = store.findings()
    assert (row.status, row.missed) == (FindingStatus.ONGOING, 0)


# -- sweeps ------------------------------------------------------------------------------------


def test_resume_returns_the_unfinished_sweep_and_its_watermark(tmp_path: Path) -> None:
    path = tmp_path / "shard0.sqlite"
    with StateStore(path) as store:
        first = store.begin_sweep(shard=SHARD, config_fingerprint="fp-a", total=100)
        assert not first.resumed and first.watermark == 0
        store.checkpoint(first.id, 40)
        store.checkpoint(first.id, 30)  # late and smaller: never moves the resume point back
        assert store.last_completed() is None
    with StateStore(path) as store:  # a restart
        resumed = store.begin_sweep(shard=SHARD, config_fingerprint="fp-a", total=100)
        assert (resumed.id, resumed.watermark, resumed.total, resumed.resumed) == (
            first.id,
            40,
            100,
            True,
        )
        assert resumed.started == first.started
        other = store.begin_sweep(shard=SHARD, config_fingerprint="fp-b", total=7)
        assert other.id != first.id and not other.resumed
        # the first was abandoned (another configuration ran since): it is never resumed again
        fresh = store.begin_sweep(shard=SHARD, config_fingerprint="fp-a", total=100)
        assert fresh.id not in (first.id, other.id) and not fresh.resumed
        store.complete_sweep(fresh.id, SweepStats(finished=at(1)))
        assert store.last_completed() == at(1)
        with pytest.raises(StateError, match="no running sweep"):
            store.checkpoint(fresh.id, 1)
        with pytest.raises(StateError, match="no sweep"):
            store.record("nonexistent", *observe(make_finding()))


# -- outbox ------------------------------------------------------------------------------------


def test_outbox_survives_a_restart_and_orders_per_finding(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    relay = finding_id(FindingKind.OPEN_RELAY, ADDR, 25)
    other = finding_id(FindingKind.OPEN_RELAY, ADDR, 587)
    with StateStore(path, resolve_after=1) as store:
        store.set_channels(["webhook:0", "command:0"])
        one_sweep(store, observe(make_finding()), observe(make_finding(port=587), port=587))
        one_sweep(store, observe(when=at(1)))  # port 25 fixed: resolved (resolve_after=1)
        assert store.outbox_counts() == {"pending": 6, "sent": 0, "dead": 0}

    with StateStore(path, resolve_after=1) as store:  # a restart: the outbox is all in the file
        now = datetime.now(UTC)
        due = store.due("webhook:0", now)
        # the resolution of port 25 waits behind its NEW; the other finding is not held up
        assert [i.alert.key for i in due] == [f"{relay}/new/1", f"{other}/new/1"]
        store.delivered(due[0])
        assert [i.alert.key for i in store.due("webhook:0", now)] == [
            f"{other}/new/1",
            f"{relay}/resolved/2",
        ]
        store.failed(due[1], "HTTP 500", next_attempt=now + timedelta(minutes=5), dead=False)
        assert [i.alert.key for i in store.due("webhook:0", now)] == [f"{relay}/resolved/2"]
        later = store.due("webhook:0", now + timedelta(minutes=6))
        assert (later[0].alert.key, later[0].attempts, later[0].last_error) == (
            f"{other}/new/1",
            1,
            "HTTP 500",
        )
        # a dead earlier item does not block the later ones of its finding forever
        command = store.due("command:0", now)
        store.failed(command[0], "exit 3", next_attempt=now, dead=True)
        assert [i.alert.key for i in store.due("command:0", now)] == [
            f"{other}/new/1",
            f"{relay}/resolved/2",
        ]
        assert store.outbox_counts() == {"pending": 4, "sent": 1, "dead": 1}
        assert [d.alert.key for d in store.dead_letters()] == [f"{relay}/new/1"]
        assert store.due("email:0", now) == []


def test_alerts_without_channels_are_kept_without_deliveries(store: StateStore) -> None:
    alerts = one_sweep(store, observe(make_finding()))
    assert store.alerts() == alerts
    assert store.outbox_counts() == {"pending": 0, "sent": 0, "dead": 0}


# -- queries -----------------------------------------------------------------------------------


def test_history_skips_silent_ports_but_keeps_smtp_and_known_endpoints(store: StateStore) -> None:
    one_sweep(
        store,
        observe(address="127.0.9.8", when=at(0)),  # closed, never interesting: not written
        observe(address="127.0.9.8", port=587, status=VerdictStatus.RELAY_REFUSED, when=at(0)),
        observe(make_finding(), when=at(0)),
    )
    one_sweep(store, observe(when=at(1)))  # closed now, but it had a finding: written
    assert [(h.port, h.status) for h in store.history("127.0.9.8")] == [
        (587, VerdictStatus.RELAY_REFUSED)
    ]
    rows = store.history(ADDR)
    assert [(h.observed, h.status, h.kinds, h.shard) for h in rows] == [
        (at(0), VerdictStatus.OPEN_RELAY, (FindingKind.OPEN_RELAY,), SHARD),
        (at(1), VerdictStatus.CLOSED, (), SHARD),
    ]


def test_read_only_merge_over_shard_files(tmp_path: Path) -> None:
    a, b = tmp_path / "s0.sqlite", tmp_path / "s1.sqlite"
    with StateStore(a) as store:
        one_sweep(store, observe(make_finding(when=at(0)), when=at(0)))
        one_sweep(store, observe(make_finding(port=465, severity=Severity.CRITICAL), port=465))
    with StateStore(b) as store:  # the same problem seen later from another shard's file
        one_sweep(store, observe(make_finding(when=at(3)), when=at(3)))
        auth = make_finding(
            FindingKind.AUTH_WITHOUT_TLS, address="127.0.9.10", severity=Severity.LOW
        )
        one_sweep(store, observe(auth, address="127.0.9.10"))
        with pytest.raises(ValueError, match="not about"):
            one_sweep(store, observe(auth))
    rows = read_findings([a, b])
    assert [(r.port, r.severity, r.last_seen) for r in rows] == [
        (465, Severity.CRITICAL, T0),
        (25, Severity.HIGH, at(3)),
        (25, Severity.LOW, T0),
    ]
    assert [r.kind for r in read_findings([a, b], status="new")] == [
        FindingKind.OPEN_RELAY,
        FindingKind.OPEN_RELAY,
        FindingKind.AUTH_WITHOUT_TLS,
    ]
    assert [h.observed for h in read_history([a, b], ADDR)] == [T0, T0, at(3)]
    with pytest.raises(ValueError):
        read_findings([a], status="bogus")
    with pytest.raises(StateError, match="no such file"):
        read_findings([tmp_path / "missing.sqlite"])
    reader = StateStore(a)
    reader.open(readonly=True)
    try:
        with pytest.raises(StateError, match="read-only"):
            reader.begin_sweep(shard=SHARD, config_fingerprint="fp", total=1)
    finally:
        reader.close()


def test_reads_while_a_writer_holds_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with StateStore(path) as writer:
        one_sweep(writer, observe(make_finding()))
        rec = writer.begin_sweep(shard=SHARD, config_fingerprint="fp", total=1)
        writer.record(rec.id, *observe(make_finding(port=587), port=587))
        assert len(read_findings([path])) == 2  # WAL: the CLI reads beside the daemon


# -- errors ------------------------------------------------------------------------------------


def test_a_locked_file_becomes_a_state_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with StateStore(path, busy_timeout=0.2) as store:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            started = time.monotonic()
            with pytest.raises(StateError) as info:
                store.begin_sweep(shard=SHARD, config_fingerprint="fp", total=1)
            assert time.monotonic() - started < 5
            assert str(path) in str(info.value) and "locked" in str(info.value)
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
            other.execute("ROLLBACK")
        finally:
            other.close()
        store.begin_sweep(shard=SHARD, config_fingerprint="fp", total=1)  # usable again


def test_files_that_are_not_ours_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StateError, match="not a relayaudit state file, or corrupt") as info:
        StateStore(garbage).open()
    assert str(garbage) in str(info.value)

    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StateError, match="did not create"):
        StateStore(foreign).open()

    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StateError, match="newer relayaudit"):
        StateStore(newer).open()

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    with pytest.raises(StateError, match="cannot be created"):
        StateStore(blocked / "state.sqlite").open()

    closed = StateStore(tmp_path / "unused.sqlite")
    with pytest.raises(StateError, match="not open"):
        closed.findings()


# -- as an engine sink, against the loopback lab -----------------------------------------------

SETTINGS = probe_settings(
    connect_timeout=2.0,
    command_timeout=3.0,
    session_timeout=30.0,
    external_domains=("relay-test.example",),
)


async def test_a_relay_fixed_between_sweeps_gives_one_resolved_alert(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite", resolve_after=1)
    store.open()
    try:

        async def lab_sweep(behaviour: Behaviour, port: int) -> tuple[StateSink, int]:
            lab = Lab([ServerSpec(host="127.0.66.1", port=port, behaviour=behaviour)])
            async with lab:
                host, bound = lab.address_of(0)
                rec = store.begin_sweep(shard=SHARD, config_fingerprint="lab", total=1)
                sink = StateSink(store, rec.id)
                result = await probe(host, bound, SETTINGS)
                await sink.emit(result, judge(result))
                store.complete_sweep(rec.id, SweepStats())
            return sink, bound

        first, port = await lab_sweep(Behaviour.OPEN_RELAY, 0)
        assert first.transitions == {Transition.NEW: 2}  # open relay + unapproved SMTP
        second, _ = await lab_sweep(Behaviour.CLOSED, port)  # same address:port, relay fixed
        assert second.transitions == {Transition.RESOLVED: 1}
        resolved = [a for a in store.alerts() if a.transition is Transition.RESOLVED]
        assert [a.finding.kind for a in resolved] == [FindingKind.OPEN_RELAY]
        assert [h.status for h in store.history("127.0.66.1")] == [
            VerdictStatus.OPEN_RELAY,
            VerdictStatus.RELAY_REFUSED,
        ]
    finally:
        store.close()


def test_prune_drops_old_history_and_sent_deliveries_only(store: StateStore) -> None:
    store.set_channels(["command:0"])
    for day in range(6):
        one_sweep(store, observe(make_finding(when=at(day)), when=at(day)))
    assert len(store.history(ADDR)) == 6
    item, *_ = store.due("command:0", datetime.now(UTC) + timedelta(days=1))  # the NEW alert
    store.delivered(item)
    assert store.outbox_counts() == {"pending": 0, "sent": 1, "dead": 0}

    assert store.prune(at(3)) == {"observations": 3, "deliveries": 0}  # sent just now: kept
    assert [h.observed for h in store.history(ADDR)] == [at(3), at(4), at(5)]
    assert store.prune(datetime.now(UTC) + timedelta(days=1))["deliveries"] == 1
    assert store.outbox_counts() == {"pending": 0, "sent": 0, "dead": 0}
    # the finding and its ticket key stay: the same alert is never enqueued twice
    (row,) = store.findings()
    assert row.status is FindingStatus.ONGOING
    assert [a.key for a in store.alerts()] == [f"{row.id}/new/1"]


def test_dead_letters_can_be_replayed(
    store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.set_channels(["webhook:0"])
    for day, address in enumerate(("127.0.9.1", "127.0.9.2")):
        one_sweep(store, observe(make_finding(address=address, when=at(day)), address=address))
    later = datetime.now(UTC) + timedelta(days=1)
    first, second = store.due("webhook:0", later)
    store.failed(first, "HTTP 500", next_attempt=later, dead=True)
    store.failed(second, "HTTP 500", next_attempt=later, dead=True)
    assert store.due("webhook:0", later) == []

    assert store.replay_dead([second.id]) == 1
    (again,) = store.due("webhook:0", datetime.now(UTC) + timedelta(seconds=1))
    assert (again.id, again.attempts, again.last_error) == (second.id, 0, None)
    assert store.outbox_counts() == {"pending": 1, "sent": 0, "dead": 1}

    # the command line, against the same file (WAL: a running daemon may hold it open)
    assert main(["outbox", "--state", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "1 pending, 0 sent, 1 dead" in out
    assert f"dead #{first.id} webhook:0 {first.alert.key} after 1 attempt(s): HTTP 500" in out
    assert main(["outbox", "--state", str(store.path), "--json"]) == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert doc["counts"] == {"pending": 1, "sent": 0, "dead": 1} and doc["replayed"] is None
    assert doc["dead"] == [
        {
            "id": first.id,
            "channel": "webhook:0",
            "alert": first.alert.key,
            "attempts": 1,
            "last_error": "HTTP 500",
        }
    ]
    assert main(["outbox", "--state", str(store.path), "--replay"]) == 0
    assert "1 dead letter(s) requeued" in capsys.readouterr().out
    assert store.outbox_counts() == {"pending": 2, "sent": 0, "dead": 0}
    assert main(["outbox", "--state", str(store.path / "nope")]) == 2
    assert "--state: " in capsys.readouterr().err
