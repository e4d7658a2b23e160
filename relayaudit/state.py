"""Durable memory across sweeps: findings and their transitions, sweeps, history, the alert outbox."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import sqlite3
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ConfigDict

from relayaudit.errors import ExitCode, StateError
from relayaudit.evidence import address_order
from relayaudit.files import create_private
from relayaudit.owners import OwnerTable
from relayaudit.records import FindingStatus, Lifecycle, Transition
from relayaudit.verdict import Confidence, Finding, FindingKind, Owner, Severity, VerdictStatus

if TYPE_CHECKING:
    from relayaudit.evidence import ProbeResult
    from relayaudit.progress import SweepStats
    from relayaudit.verdict import Verdict

T = TypeVar("T")

__all__ = [
    "SCHEMA_VERSION",
    "Alert",
    "Delivery",
    "DeliveryState",
    "FindingRow",
    "FindingStatus",
    "Folded",
    "ObservationRow",
    "OutboxItem",
    "Restamped",
    "StateSink",
    "StateStore",
    "SweepRecord",
    "SweepRow",
    "Transition",
    "read_changes",
    "read_findings",
    "read_history",
    "read_observations",
    "read_owner_names",
    "read_owner_table",
    "read_sweeps",
]

SCHEMA_VERSION = 4

# Every statement of version 1; a later version adds a migration step (_MIGRATIONS), never edits
# these.
_SCHEMA = """
CREATE TABLE sweeps (
    id          TEXT PRIMARY KEY,
    shard       TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('running', 'completed', 'abandoned')),
    started     TEXT NOT NULL,
    finished    TEXT,
    watermark   INTEGER NOT NULL DEFAULT 0,
    total       INTEGER NOT NULL,
    counts      TEXT
);
CREATE INDEX sweeps_by_state ON sweeps (state, shard);

CREATE TABLE findings (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    address      TEXT NOT NULL,
    port         INTEGER NOT NULL,
    severity     TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('new', 'ongoing', 'resolved', 'reopened')),
    first_seen   TEXT NOT NULL,
    last_seen    TEXT NOT NULL,
    resolved_at  TEXT,
    seen_sweep   TEXT NOT NULL,
    missed       INTEGER NOT NULL DEFAULT 0,
    missed_sweep TEXT,
    seq          INTEGER NOT NULL DEFAULT 0,
    finding      TEXT NOT NULL
);
CREATE INDEX findings_by_endpoint ON findings (address, port);

CREATE TABLE observations (
    sweep_id TEXT NOT NULL,
    address  TEXT NOT NULL,
    port     INTEGER NOT NULL,
    status   TEXT NOT NULL,
    summary  TEXT NOT NULL,
    observed TEXT NOT NULL,
    kinds    TEXT NOT NULL,
    PRIMARY KEY (sweep_id, address, port)
);
CREATE INDEX observations_by_address ON observations (address, observed);

CREATE TABLE alerts (
    key        TEXT PRIMARY KEY,
    finding_id TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    transition TEXT NOT NULL,
    sweep_id   TEXT NOT NULL,
    created    TEXT NOT NULL,
    body       TEXT NOT NULL
);

CREATE TABLE deliveries (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_key    TEXT NOT NULL REFERENCES alerts (key),
    finding_id   TEXT NOT NULL,
    channel      TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt TEXT NOT NULL,
    last_error   TEXT,
    updated      TEXT NOT NULL,
    UNIQUE (alert_key, channel)
);
CREATE INDEX deliveries_due ON deliveries (channel, state, next_attempt);
CREATE INDEX deliveries_by_finding ON deliveries (channel, finding_id, state, id);
"""

# Version N's steps turn a version N-1 file into version N, in one transaction with the new
# user_version. A store of any earlier version opens, upgrades in place and keeps every row.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 2 (relayaudit 0.2): a finding's confidence, title and approval note as columns, so that
    # reports list and sort findings without parsing each one's JSON
    2: (
        "ALTER TABLE findings ADD COLUMN confidence TEXT",
        "ALTER TABLE findings ADD COLUMN title TEXT",
        "ALTER TABLE findings ADD COLUMN approved_note TEXT",
        "UPDATE findings SET confidence = json_extract(finding, '$.confidence'), "
        "title = json_extract(finding, '$.title'), "
        "approved_note = json_extract(finding, '$.approved_note')",
    ),
    # 3 (issue 23): the ticket each hook opened for a finding, so later transitions update it.
    # Deliveries' channels move from `kind:index` to the hook's name when the daemon starts
    # with a config (StateStore.rename_channels): the names are in the config, not the file.
    3: (
        "CREATE TABLE ticket_refs ("
        "    finding_id TEXT NOT NULL,"
        "    hook       TEXT NOT NULL,"
        "    ref        TEXT NOT NULL,"
        "    created    TEXT NOT NULL,"
        "    PRIMARY KEY (finding_id, hook)"
        ")",
    ),
    # 4 (issue 29): who runs each finding's address (the name, for filters; the whole owner is
    # in the finding's JSON), and the daemon's last good owner table, so a restart with an
    # unreadable owners_file still routes findings
    4: (
        "ALTER TABLE findings ADD COLUMN owner TEXT",
        "UPDATE findings SET owner = json_extract(finding, '$.owner.name')",
        "CREATE TABLE owner_table ("
        "    id     INTEGER PRIMARY KEY CHECK (id = 1),"
        "    digest TEXT NOT NULL,"
        "    rows   TEXT NOT NULL,"
        "    saved  TEXT NOT NULL"
        ")",
    ),
}

# every dead letter when :id is NULL, else only that delivery
_REPLAY = (
    "UPDATE deliveries SET state = 'pending', attempts = 0, last_error = NULL, next_attempt = :now, "
    "updated = :now WHERE state = 'dead' AND (:id IS NULL OR id = :id)"
)

# A port that answers nothing and never had a finding is the bulk of every sweep and says nothing;
# writing it would cost one fsync per probe and bury `history` in noise.
_QUIET = frozenset({VerdictStatus.CLOSED, VerdictStatus.FILTERED})
# A probe that could not decide (greylisting, a local error) says nothing about whether a finding
# is gone: counting it as a miss would resolve a relay just because it answered 451 once.
_UNDECIDED = frozenset({VerdictStatus.INCONCLUSIVE, VerdictStatus.ERROR})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Alert(_Frozen):
    """One transition of one finding; `key` is stable so a receiver can drop repeats.

    The lifecycle fields are the finding's as the transition left them; alerts stored by
    relayaudit 0.1 lack them (None), and the alert document falls back to the finding's times.
    """

    key: str
    transition: Transition
    finding: Finding  # for RESOLVED: the finding as last seen
    sweep_id: str
    created: datetime
    status: FindingStatus | None = None
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    resolved_at: datetime | None = None
    previous_severity: Severity | None = None  # for SEVERITY_RAISED: what it was before
    shard: str | None = None
    previous_owner: Owner | None = None  # for OWNER_CHANGED: who owned it before

    @property
    def seq(self) -> int:
        """The finding's transition count this alert is for (1: its first alert)."""
        return int(self.key.rsplit("/", 1)[1])


class SweepRecord(_Frozen):
    id: str
    shard: str
    fingerprint: str
    started: datetime
    watermark: int  # every target position below it is done: resume from here
    total: int
    resumed: bool


class OutboxItem(_Frozen):
    """One pending delivery of one alert to one channel."""

    id: int
    channel: str
    alert: Alert
    attempts: int
    next_attempt: datetime
    last_error: str | None = None


class DeliveryState(StrEnum):
    PENDING = "pending"  # to be sent (again) at `next_attempt`
    SENT = "sent"
    DEAD = "dead"  # given up after `alerts.max_attempts`; `outbox --replay` requeues it


class Delivery(_Frozen):
    """One delivery of one alert to one channel, in whatever state (`relayaudit outbox list`)."""

    id: int
    state: DeliveryState
    channel: str
    alert_key: str
    finding_id: str
    transition: Transition
    address: str | None  # of the finding (None only if its row is gone)
    port: int | None
    attempts: int
    next_attempt: datetime
    last_error: str | None
    updated: datetime


class Folded:
    """What one probe did to the store: the alerts it raised, and one Lifecycle per finding
    that the sweep saw or resolved there (the findings file's lines)."""

    __slots__ = ("alerts", "lines")

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.lines: list[Lifecycle] = []


class Restamped:
    """What one restamp did: how many findings changed owner, and the owner-changed alerts
    it raised (one per open finding moved from one owner to another)."""

    __slots__ = ("alerts", "changed")

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.changed = 0


class FindingRow(_Frozen):
    id: str
    kind: FindingKind
    severity: Severity
    confidence: Confidence
    title: str
    approved_note: str | None
    status: FindingStatus
    address: str
    port: int
    first_seen: datetime
    last_seen: datetime
    resolved_at: datetime | None
    missed: int
    last_sweep: str  # the id of the last sweep that saw it
    finding: Finding


class Change(_Frozen):
    """One transition of one finding (the alert it raised): `show` and `report` list these."""

    finding_id: str
    transition: Transition
    at: datetime
    sweep_id: str
    kind: FindingKind
    severity: Severity
    address: str
    port: int
    title: str


class ObservationRow(_Frozen):
    sweep_id: str
    shard: str | None
    address: str
    port: int
    status: VerdictStatus
    summary: str
    observed: datetime
    kinds: tuple[FindingKind, ...]


class SweepRow(_Frozen):
    """One sweep as the `sweeps` table keeps it (the report's header; read-only)."""

    id: str
    shard: str
    state: str  # running, completed, abandoned
    started: datetime
    finished: datetime | None
    total: int  # target positions of the sweep
    watermark: int  # positions done (all of them once completed)
    probes: int | None  # None until the sweep completes: counts are written then
    hosts: int | None
    relays: int | None
    statuses: dict[str, int]

    @property
    def errors(self) -> int:
        """Probes that ended in `error` or `internal-error` (0 while the sweep runs)."""
        return self.statuses.get("error", 0) + self.statuses.get("internal-error", 0)

    @property
    def duration(self) -> float | None:
        if self.finished is None:
            return None
        return (self.finished - self.started).total_seconds()


def _sweep_row(r: sqlite3.Row) -> SweepRow:
    counts = json.loads(r["counts"]) if r["counts"] else {}
    return SweepRow(
        id=r["id"],
        shard=r["shard"],
        state=r["state"],
        started=_dt(r["started"]),
        finished=_dt(r["finished"]) if r["finished"] else None,
        total=r["total"],
        watermark=r["watermark"],
        probes=counts.get("probes"),
        hosts=counts.get("hosts"),
        relays=counts.get("relays"),
        statuses={str(k): int(v) for k, v in counts.get("statuses", {}).items()},
    )


def _ts(when: datetime) -> str:
    # Fixed-width UTC text compares like the instants it names, so SQL can order and filter on it;
    # a naive datetime is taken as local time, which is what datetime.now() returns.
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _why(exc: sqlite3.Error, busy_timeout: float) -> tuple[str, ExitCode]:
    """What went wrong, in words, and whether trying again may help (75) or not (78)."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return f"locked by another process (waited {busy_timeout:g}s)", ExitCode.TEMPFAIL
    if "readonly" in text or "read-only" in text:
        return "the file or its directory is read-only", ExitCode.CONFIG
    if "full" in text:
        return "the disk is full", ExitCode.TEMPFAIL
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return "not a relayaudit state file, or corrupt", ExitCode.CONFIG
    if "unable to open" in text:
        return "cannot be opened (missing directory or no permission)", ExitCode.CONFIG
    return "database error", ExitCode.TEMPFAIL


_BAD_FILE = ExitCode.CONFIG  # the file named is no state store: a retry cannot mend it


class StateStore:
    """One SQLite file (one per shard) in WAL mode; every method is one short transaction.

    The connection is shared by the event loop thread and worker threads (see StateSink), so every
    use holds `_lock`: sqlite3 is thread-safe, but a transaction must not interleave with another.
    """

    def __init__(
        self,
        path: Path,
        *,
        resolve_after: int = 2,
        busy_timeout: float = 10.0,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if resolve_after < 1:
            raise ValueError(f"resolve_after must be at least 1, not {resolve_after}")
        self.path = Path(path)
        self.resolve_after = resolve_after
        self.busy_timeout = busy_timeout
        self.readonly = False
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._channels: tuple[str, ...] = ()

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self, *, readonly: bool = False) -> None:
        """Open (and for writing, create or migrate) the file; idempotent."""
        with self._lock:
            if self._db is not None:
                return
            self.readonly = readonly
            if self.path.is_dir():  # sqlite would only say "unable to open database file"
                raise StateError(f"state file {self.path}: is a directory", exit_code=_BAD_FILE)
            try:
                if readonly:
                    if not self.path.is_file():
                        raise StateError(
                            f"state file {self.path}: no such file", exit_code=_BAD_FILE
                        )
                    db = sqlite3.connect(
                        f"{self.path.resolve().as_uri()}?mode=ro",
                        uri=True,
                        timeout=self.busy_timeout,
                        isolation_level=None,
                        check_same_thread=False,
                    )
                else:
                    try:
                        self.path.parent.mkdir(parents=True, exist_ok=True)
                    except FileExistsError:  # a file where the directory should be
                        raise NotADirectoryError(
                            errno.ENOTDIR, f"{self.path.parent} is not a directory"
                        ) from None
                    create_private(self.path)  # evidence and ticket refs: 0600, as -wal, -shm
                    db = sqlite3.connect(
                        self.path,
                        timeout=self.busy_timeout,
                        isolation_level=None,  # we issue BEGIN IMMEDIATE ourselves
                        check_same_thread=False,  # shared with worker threads, under _lock
                    )
            except OSError as exc:
                raise StateError(
                    f"state file {self.path}: cannot be created: {exc.strerror}",
                    exit_code=_BAD_FILE,
                ) from exc
            except sqlite3.Error as exc:
                raise self._error(exc, "open") from exc
            db.row_factory = sqlite3.Row
            try:
                db = self._prepare(db, readonly=readonly)
            except BaseException:
                db.close()
                raise
            self._db = db

    def _prepare(self, db: sqlite3.Connection, *, readonly: bool) -> sqlite3.Connection:
        """Check the file's schema version; create or upgrade it. Returns the connection to use:
        a read-only open of an older file reads an upgraded copy in memory (the file is kept)."""
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"state file {self.path}: schema version {version} was written by a newer "
                    f"relayaudit (this one knows {SCHEMA_VERSION})",
                    exit_code=_BAD_FILE,
                )
            if readonly:
                if version == SCHEMA_VERSION:
                    return db
                if version == 0:
                    raise StateError(
                        f"state file {self.path}: not a relayaudit state file", exit_code=_BAD_FILE
                    )
                copy = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
                copy.row_factory = sqlite3.Row
                db.backup(copy)
                db.close()
                self._upgrade(copy, version)
                return copy
            # WAL: the CLI can read while the daemon writes. FULL: a commit is on disk before
            # record() returns, so an alert the outbox acknowledged survives a power cut, not
            # only a crash (NORMAL would only lose a suffix, but costs nothing to avoid here).
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            if version < SCHEMA_VERSION:
                db.execute("BEGIN IMMEDIATE")
                try:
                    # re-read under the write lock: another process may have done it meanwhile
                    version = int(db.execute("PRAGMA user_version").fetchone()[0])
                    if version == 0:
                        if db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
                            raise StateError(
                                f"state file {self.path}: an SQLite file that relayaudit did not "
                                "create; refusing to add tables to it",
                                exit_code=_BAD_FILE,
                            )
                        for statement in _SCHEMA.split(";"):
                            if statement.strip():
                                db.execute(statement)
                        version = 1
                    self._upgrade(db, version, in_transaction=True)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise self._error(exc, "open") from exc
        return db

    @staticmethod
    def _upgrade(db: sqlite3.Connection, version: int, *, in_transaction: bool = False) -> None:
        """Apply the migrations after `version`, ending at SCHEMA_VERSION."""
        if not in_transaction:
            db.execute("BEGIN IMMEDIATE")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if not in_transaction:
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                db, self._db = self._db, None
                with contextlib.suppress(sqlite3.Error):
                    db.close()

    def __enter__(self) -> StateStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_channels(self, names: Iterable[str]) -> None:
        """The delivery channels each new alert is queued for (e.g. `webhook:0`)."""
        self._channels = tuple(dict.fromkeys(names))

    @property
    def channels(self) -> tuple[str, ...]:
        return self._channels

    # -- transactions --------------------------------------------------------------------------

    def _error(self, exc: sqlite3.Error, action: str) -> StateError:
        """The one place sqlite errors become StateError (the file is always named)."""
        why, code = _why(exc, self.busy_timeout)
        return StateError(
            f"state file {self.path}: {action}: {why} (sqlite: {exc})", exit_code=code
        )

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError(f"state file {self.path}: not open")
        return self._db

    @contextlib.contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._conn()
            if self.readonly:
                raise StateError(f"state file {self.path}: {action}: opened read-only")
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._error(exc, action) from exc
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._error(exc, action) from exc
                raise

    @contextlib.contextmanager
    def _read(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._conn()
            try:
                yield db
            except sqlite3.Error as exc:
                raise self._error(exc, action) from exc

    # -- sweeps --------------------------------------------------------------------------------

    def begin_sweep(self, *, shard: str, config_fingerprint: str, total: int) -> SweepRecord:
        """Resume this shard's unfinished sweep of the same configuration, or start a new one."""
        now = _ts(self._clock())
        with self._write("begin sweep") as db:
            running = db.execute(
                "SELECT * FROM sweeps WHERE state = 'running' AND shard = ? "
                "ORDER BY started DESC, rowid DESC",
                (shard,),
            ).fetchall()
            resume = next((r for r in running if r["fingerprint"] == config_fingerprint), None)
            for row in running:
                if row is not resume:
                    # its targets or settings differ: continuing it would mix two configurations
                    db.execute(
                        "UPDATE sweeps SET state = 'abandoned', finished = ? WHERE id = ?",
                        (now, row["id"]),
                    )
            if resume is not None:
                return SweepRecord(
                    id=resume["id"],
                    shard=shard,
                    fingerprint=config_fingerprint,
                    started=_dt(resume["started"]),
                    watermark=int(resume["watermark"]),
                    total=int(resume["total"]),
                    resumed=True,
                )
            sweep_id = uuid.uuid4().hex[:12]
            db.execute(
                "INSERT INTO sweeps (id, shard, fingerprint, state, started, watermark, total) "
                "VALUES (?, ?, ?, 'running', ?, 0, ?)",
                (sweep_id, shard, config_fingerprint, now, total),
            )
        return SweepRecord(
            id=sweep_id,
            shard=shard,
            fingerprint=config_fingerprint,
            started=_dt(now),
            watermark=0,
            total=total,
            resumed=False,
        )

    def checkpoint(self, sweep_id: str, watermark: int) -> None:
        with self._write("checkpoint") as db:
            # MAX: a late, smaller checkpoint must never move the resume point backwards
            cur = db.execute(
                "UPDATE sweeps SET watermark = MAX(watermark, ?) WHERE id = ? AND state = 'running'",
                (watermark, sweep_id),
            )
            if cur.rowcount == 0:
                raise StateError(
                    f"state file {self.path}: checkpoint: no running sweep {sweep_id!r}"
                )

    def complete_sweep(self, sweep_id: str, stats: SweepStats) -> None:
        counts = {
            "hosts": stats.hosts,
            "probes": stats.probes,
            "relays": stats.relays,
            "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
            "findings": dict(sorted(stats.findings.items())),
        }
        finished = _ts(stats.finished or self._clock())
        with self._write("complete sweep") as db:
            cur = db.execute(
                "UPDATE sweeps SET state = 'completed', finished = ?, counts = ?, watermark = total "
                "WHERE id = ? AND state = 'running'",
                (finished, json.dumps(counts), sweep_id),
            )
            if cur.rowcount == 0:
                raise StateError(
                    f"state file {self.path}: complete sweep: no running sweep {sweep_id!r}"
                )

    def resumable(self, *, shard: str, config_fingerprint: str) -> bool:
        """Whether begin_sweep would continue an interrupted sweep rather than start one."""
        with self._read("look for an interrupted sweep") as db:
            row = db.execute(
                "SELECT 1 FROM sweeps WHERE state = 'running' AND shard = ? AND fingerprint = ?",
                (shard, config_fingerprint),
            ).fetchone()
        return row is not None

    def last_started(self) -> datetime | None:
        """When the latest sweep that ran to the end (or is running) started: the schedule's base."""
        with self._read("last sweep start") as db:
            row = db.execute(
                "SELECT MAX(started) FROM sweeps WHERE state IN ('completed', 'running')"
            ).fetchone()
        return _dt(row[0]) if row[0] is not None else None

    def last_completed(self) -> datetime | None:
        with self._read("last completed sweep") as db:
            row = db.execute(
                "SELECT MAX(finished) FROM sweeps WHERE state = 'completed'"
            ).fetchone()
        return _dt(row[0]) if row[0] is not None else None

    # -- findings ------------------------------------------------------------------------------

    def record(self, sweep_id: str, result: ProbeResult, verdict: Verdict) -> list[Alert]:
        """Fold one judged probe into the findings; the alerts it raised (see `fold`)."""
        return self.fold(sweep_id, result, verdict).alerts

    def fold(self, sweep_id: str, result: ProbeResult, verdict: Verdict) -> Folded:
        """Fold one judged probe into the findings, in one transaction with its outbox rows.

        Safe to repeat for the same (sweep, address, port): a resumed sweep re-probes the
        positions after its last checkpoint, and must not alert twice.
        """
        address, port = verdict.address, verdict.port
        strays = [f.id for f in verdict.findings if (f.address, f.port) != (address, port)]
        if strays:
            # resolution works per address:port; a finding filed elsewhere would never resolve
            raise ValueError(f"findings {strays} are not about {address}:{port}")
        if not verdict.findings and verdict.status in _QUIET:
            with self._read("record") as db:
                known = db.execute(
                    "SELECT 1 FROM findings WHERE address = ? AND port = ? LIMIT 1", (address, port)
                ).fetchone()
            if known is None:
                return Folded()
        now = self._clock()
        folded = Folded()
        alerts = folded.alerts
        with self._write("record") as db:
            if not _has_sweep(db, sweep_id):
                raise StateError(f"state file {self.path}: record: no sweep {sweep_id!r}")
            stored = {
                row["id"]: row
                for row in db.execute(
                    "SELECT * FROM findings WHERE address = ? AND port = ? ORDER BY id",
                    (address, port),
                )
            }
            present = {f.id: f for f in verdict.findings}
            for finding in present.values():
                before = stored.get(finding.id)
                line = self._seen(db, sweep_id, finding, before, now)
                folded.lines.append(line)
                if line.transition is not None:
                    alerts.append(self._alert(db, line, sweep_id, now, before))
            for fid, row in stored.items():
                if fid not in present and verdict.status not in _UNDECIDED:
                    gone = self._absent(db, sweep_id, row, result.finished)
                    if gone is not None:
                        folded.lines.append(gone)
                        alerts.append(self._alert(db, gone, sweep_id, now, row))
            db.execute(
                "INSERT OR REPLACE INTO observations "
                "(sweep_id, address, port, status, summary, observed, kinds) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    sweep_id,
                    address,
                    port,
                    verdict.status.value,
                    verdict.summary,
                    _ts(result.finished),
                    json.dumps([f.kind.value for f in verdict.findings]),
                ),
            )
            folded.alerts = [a for a in alerts if self._enqueue(db, a)]
        return folded

    def _seen(
        self,
        db: sqlite3.Connection,
        sweep_id: str,
        finding: Finding,
        row: sqlite3.Row | None,
        now: datetime,
    ) -> Lifecycle:
        seen = _ts(finding.observed_at)
        if row is not None:
            # a known finding keeps its owner: only restamp_owners changes it, after the sweep,
            # where a change between owners becomes one owner-changed transition
            kept = json.loads(row["finding"]).get("owner")
            finding = finding.model_copy(
                update={"owner": Owner.model_validate(kept) if kept else None}
            )
        body = finding.model_dump_json()
        if row is None:
            db.execute(
                "INSERT INTO findings (id, kind, address, port, severity, confidence, title, "
                "approved_note, status, first_seen, last_seen, seen_sweep, missed, seq, finding, "
                "owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'new', ?, ?, ?, 0, 1, ?, ?)",
                (
                    finding.id,
                    finding.kind.value,
                    finding.address,
                    finding.port,
                    finding.severity.value,
                    finding.confidence.value,
                    finding.title,
                    finding.approved_note,
                    seen,
                    seen,
                    sweep_id,
                    body,
                    finding.owner.name if finding.owner is not None else None,
                ),
            )
            return Lifecycle(finding, FindingStatus.NEW, Transition.NEW, 1)
        status = FindingStatus(row["status"])
        transition: Transition | None = None
        if status is FindingStatus.RESOLVED:
            transition, status = Transition.REOPENED, FindingStatus.REOPENED
        else:
            if finding.severity.rank < Severity(row["severity"]).rank:
                transition = Transition.SEVERITY_RAISED
            if row["seen_sweep"] != sweep_id:
                status = FindingStatus.ONGOING  # a later sweep saw it again
        seq = int(row["seq"]) + (transition is not None)
        db.execute(
            # MAX: a resumed sweep may re-probe out of order; last_seen never moves back
            "UPDATE findings SET severity = ?, confidence = ?, title = ?, approved_note = ?, "
            "status = ?, last_seen = MAX(last_seen, ?), resolved_at = NULL, seen_sweep = ?, "
            "missed = 0, seq = ?, finding = ? WHERE id = ?",
            (
                finding.severity.value,
                finding.confidence.value,
                finding.title,
                finding.approved_note,
                status.value,
                seen,
                sweep_id,
                seq,
                body,
                finding.id,
            ),
        )
        return Lifecycle(finding, status, transition, seq)

    def _absent(
        self,
        db: sqlite3.Connection,
        sweep_id: str,
        row: sqlite3.Row,
        observed: datetime,
    ) -> Lifecycle | None:
        """Count one sweep's miss of a finding; the Lifecycle when that resolves it."""
        if not FindingStatus(row["status"]).open:
            return None
        if sweep_id in (row["seen_sweep"], row["missed_sweep"]):
            # seen by this sweep already (a re-probe disagrees: the sighting wins), or this
            # sweep already counted its miss: one miss per sweep, however often it re-probes
            return None
        missed = int(row["missed"]) + 1
        if missed < self.resolve_after:
            db.execute(
                "UPDATE findings SET missed = ?, missed_sweep = ? WHERE id = ?",
                (missed, sweep_id, row["id"]),
            )
            return None
        seq = int(row["seq"]) + 1
        db.execute(
            "UPDATE findings SET missed = ?, missed_sweep = ?, status = 'resolved', "
            "resolved_at = ?, seq = ? WHERE id = ?",
            (missed, sweep_id, _ts(observed), seq, row["id"]),
        )
        last = Finding.model_validate_json(row["finding"])
        return Lifecycle(last, FindingStatus.RESOLVED, Transition.RESOLVED, seq)

    @staticmethod
    def _alert(
        db: sqlite3.Connection,
        line: Lifecycle,
        sweep_id: str,
        now: datetime,
        before: sqlite3.Row | None,
        *,
        previous_owner: Owner | None = None,
    ) -> Alert:
        """The alert of a transition, keyed by the finding's transition count (its `seq`), with
        the finding's lifecycle as the transition left it (`before`: its row until then)."""
        assert line.transition is not None
        row = db.execute(
            "SELECT f.first_seen, f.last_seen, f.resolved_at, s.shard FROM findings f, sweeps s "
            "WHERE f.id = ? AND s.id = ?",
            (line.finding.id, sweep_id),
        ).fetchone()
        raised = line.transition is Transition.SEVERITY_RAISED and before is not None
        return Alert(
            key=f"{line.finding.id}/{line.transition.value}/{line.seq}",
            transition=line.transition,
            finding=line.finding,
            sweep_id=sweep_id,
            created=now,
            status=line.status,
            first_seen=_dt(row["first_seen"]),
            last_seen=_dt(row["last_seen"]),
            resolved_at=_dt(row["resolved_at"]) if row["resolved_at"] else None,
            previous_severity=Severity(before["severity"]) if raised and before else None,
            shard=row["shard"],
            previous_owner=previous_owner,
        )

    def _enqueue(self, db: sqlite3.Connection, alert: Alert) -> bool:
        """Store the alert and one delivery per channel; False if this key was stored before."""
        created = _ts(alert.created)
        cur = db.execute(
            "INSERT OR IGNORE INTO alerts (key, finding_id, seq, transition, sweep_id, created, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                alert.key,
                alert.finding.id,
                int(alert.key.rsplit("/", 1)[1]),
                alert.transition.value,
                alert.sweep_id,
                created,
                alert.model_dump_json(),
            ),
        )
        if cur.rowcount == 0:
            return False
        db.executemany(
            "INSERT OR IGNORE INTO deliveries "
            "(alert_key, finding_id, channel, state, attempts, next_attempt, updated) "
            "VALUES (?, ?, ?, 'pending', 0, ?, ?)",
            [(alert.key, alert.finding.id, ch, created, created) for ch in self._channels],
        )
        return True

    # -- outbox --------------------------------------------------------------------------------

    def rename_channels(self, names: Mapping[str, str]) -> int:
        """Move deliveries from old channel names to new ones (relayaudit 0.1's `webhook:0` to
        the hook's name); how many moved. A delivery already queued under the new name wins."""
        moved = 0
        with self._write("rename channels") as db:
            for old, new in names.items():
                if old == new:
                    continue
                moved += db.execute(
                    "UPDATE OR IGNORE deliveries SET channel = ? WHERE channel = ?", (new, old)
                ).rowcount
                db.execute("DELETE FROM deliveries WHERE channel = ?", (old,))
        return moved

    def restamp_owners(self, owners: OwnerTable, *, sweep_id: str | None = None) -> Restamped:
        """Set every stored finding's owner, resolved ones included, from `owners` (the table
        the sweep just used), so a corrected row shows everywhere at once.

        An open finding moved from one owner to another (another name or another queue: where
        its ticket belongs) raises one owner-changed alert in `sweep_id`, in this transaction.
        The rest is re-stamped silently: resolved findings, a first owner (none to some, as
        when a table is loaded for the first time), an owner dropped, a corrected contact, and
        every change when no `sweep_id` is given (the daemon gives none when `owners` is the
        last good table it kept because owners_file could not be read).
        """
        done = Restamped()
        now = self._clock()
        with self._write("restamp owners") as db:
            if sweep_id is not None and not _has_sweep(db, sweep_id):
                raise StateError(f"state file {self.path}: restamp owners: no sweep {sweep_id!r}")
            rows = db.execute("SELECT * FROM findings ORDER BY id").fetchall()
            for r in rows:
                body = json.loads(r["finding"])
                owner = owners.lookup(r["address"], int(r["port"]))
                new = owner.model_dump(mode="json") if owner is not None else None
                old = body.get("owner")
                if old == new:
                    continue
                body["owner"] = new
                status = FindingStatus(r["status"])
                moved = (
                    sweep_id is not None
                    and status.open
                    and old is not None
                    and new is not None
                    and (old["name"], old.get("queue")) != (new["name"], new["queue"])
                )
                seq = int(r["seq"]) + moved
                text = json.dumps(body, separators=(",", ":"))
                db.execute(
                    "UPDATE findings SET finding = ?, owner = ?, seq = ? WHERE id = ?",
                    (text, owner.name if owner is not None else None, seq, r["id"]),
                )
                done.changed += 1
                if moved:
                    assert sweep_id is not None
                    line = Lifecycle(
                        Finding.model_validate_json(text), status, Transition.OWNER_CHANGED, seq
                    )
                    alert = self._alert(
                        db, line, sweep_id, now, r, previous_owner=Owner.model_validate(old)
                    )
                    if self._enqueue(db, alert):
                        done.alerts.append(alert)
            self._save_owners(db, owners)
        return done

    def _save_owners(self, db: sqlite3.Connection, owners: OwnerTable) -> None:
        db.execute(
            "INSERT OR REPLACE INTO owner_table (id, digest, rows, saved) VALUES (1, ?, ?, ?)",
            (owners.digest, owners.to_json(), _ts(self._clock())),
        )

    def owner_table(self) -> OwnerTable | None:
        """The last good owner table a sweep used (None: none yet)."""
        with self._read("read the owner table") as db:
            row = db.execute("SELECT digest, rows FROM owner_table WHERE id = 1").fetchone()
        if row is None:
            return None
        return OwnerTable.from_json(row["rows"], where=f"{self.path} (last good table)")

    def ticket_refs(self, finding_id: str) -> dict[str, str]:
        """The tickets the hooks opened for a finding: {hook name: ticket reference}."""
        with self._read("read ticket refs") as db:
            rows = db.execute(
                "SELECT hook, ref FROM ticket_refs WHERE finding_id = ?", (finding_id,)
            ).fetchall()
        return {str(r["hook"]): str(r["ref"]) for r in rows}

    def set_ticket_ref(self, finding_id: str, hook: str, ref: str) -> None:
        """Remember the ticket `hook` opened for the finding (a later create replaces it)."""
        with self._write("store ticket ref") as db:
            db.execute(
                "INSERT OR REPLACE INTO ticket_refs (finding_id, hook, ref, created) "
                "VALUES (?, ?, ?, ?)",
                (finding_id, hook, ref, _ts(self._clock())),
            )

    def due(self, channel: str, now: datetime, limit: int = 50) -> list[OutboxItem]:
        """Pending deliveries of `channel` due by `now`, oldest first, in order per finding."""
        with self._read("read outbox") as db:
            rows = db.execute(
                "SELECT d.id, d.channel, d.attempts, d.next_attempt, d.last_error, a.body "
                "FROM deliveries d JOIN alerts a ON a.key = d.alert_key "
                "WHERE d.channel = ? AND d.state = 'pending' AND d.next_attempt <= ? "
                # a later transition of a finding waits until the earlier one is out (or dead)
                "AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.channel = d.channel "
                "    AND e.finding_id = d.finding_id AND e.state = 'pending' AND e.id < d.id) "
                "ORDER BY d.id LIMIT ?",
                (channel, _ts(now), limit),
            ).fetchall()
        return [_outbox_item(r) for r in rows]

    def delivered(self, item: OutboxItem) -> None:
        with self._write("mark delivered") as db:
            db.execute(
                "UPDATE deliveries SET state = 'sent', attempts = attempts + 1, updated = ?, "
                "last_error = NULL WHERE id = ? AND state = 'pending'",
                (_ts(self._clock()), item.id),
            )

    def failed(self, item: OutboxItem, error: str, *, next_attempt: datetime, dead: bool) -> None:
        with self._write("mark failed") as db:
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, next_attempt = ?, "
                "state = ?, updated = ? WHERE id = ? AND state = 'pending'",
                (
                    error[:1000],
                    _ts(next_attempt),
                    "dead" if dead else "pending",
                    _ts(self._clock()),
                    item.id,
                ),
            )

    def replay_dead(self, ids: Sequence[int] = ()) -> int:
        """Dead letters (all, or those with these delivery ids) back to pending, due now, with a
        fresh attempt count: a running daemon's dispatcher sends them within a second."""
        now = _ts(self._clock())
        with self._write("replay dead letters") as db:
            targets: Sequence[int | None] = ids or [None]
            return sum(int(db.execute(_REPLAY, {"now": now, "id": i}).rowcount) for i in targets)

    def prune(self, before: datetime) -> dict[str, int]:
        """Delete history rows observed, and deliveries sent, before `before`; the counts.

        Findings, alerts (the ticket keys that keep alerts idempotent), pending deliveries and
        dead letters are never pruned: only what is both old and settled.
        """
        cutoff = _ts(before)
        with self._write("prune") as db:
            observations = db.execute(
                "DELETE FROM observations WHERE observed < ?", (cutoff,)
            ).rowcount
            deliveries = db.execute(
                "DELETE FROM deliveries WHERE state = 'sent' AND updated < ?", (cutoff,)
            ).rowcount
        return {"observations": observations, "deliveries": deliveries}

    def finding_counts(self) -> dict[tuple[str, str], int]:
        """{(kind, status): count}: what the metrics need, without parsing any finding."""
        with self._read("count findings") as db:
            rows = db.execute(
                "SELECT kind, status, COUNT(*) FROM findings GROUP BY kind, status"
            ).fetchall()
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}

    def outbox_counts(self) -> dict[str, int]:
        with self._read("count outbox") as db:
            rows = db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall()
        counts = {"pending": 0, "sent": 0, "dead": 0}
        counts.update({r[0]: int(r[1]) for r in rows})
        return counts

    def dead_letters(self, limit: int = 100) -> list[OutboxItem]:
        """Deliveries given up on, newest first (for the operator to look at and replay)."""
        with self._read("read dead letters") as db:
            rows = db.execute(
                "SELECT d.id, d.channel, d.attempts, d.next_attempt, d.last_error, a.body "
                "FROM deliveries d JOIN alerts a ON a.key = d.alert_key "
                "WHERE d.state = 'dead' ORDER BY d.id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_outbox_item(r) for r in rows]

    def deliveries(self, state: DeliveryState | str | None = None) -> list[Delivery]:
        """Every delivery (or those in one state), oldest first: the order they are sent in."""
        wanted = DeliveryState(state).value if state is not None else None
        with self._read("read outbox") as db:
            rows = db.execute(
                "SELECT d.id, d.state, d.channel, d.alert_key, d.finding_id, a.transition, "
                "f.address, f.port, d.attempts, d.next_attempt, d.last_error, d.updated "
                "FROM deliveries d JOIN alerts a ON a.key = d.alert_key "
                "LEFT JOIN findings f ON f.id = d.finding_id "
                "WHERE ? IS NULL OR d.state = ? ORDER BY d.id",
                (wanted, wanted),
            ).fetchall()
        return [
            Delivery(
                id=r["id"],
                state=r["state"],
                channel=r["channel"],
                alert_key=r["alert_key"],
                finding_id=r["finding_id"],
                transition=r["transition"],
                address=r["address"],
                port=r["port"],
                attempts=r["attempts"],
                next_attempt=_dt(r["next_attempt"]),
                last_error=r["last_error"],
                updated=_dt(r["updated"]),
            )
            for r in rows
        ]

    def alerts(self) -> list[Alert]:
        """Every alert ever raised, oldest first (also those created with no channel configured)."""
        with self._read("read alerts") as db:
            rows = db.execute("SELECT body FROM alerts ORDER BY rowid").fetchall()
        return [Alert.model_validate_json(r[0]) for r in rows]

    # -- queries for the CLI -------------------------------------------------------------------

    def changes(
        self, *, since: datetime | None = None, finding_id: str | None = None
    ) -> list[Change]:
        """The transitions raised at or after `since` (of one finding, if given), oldest first."""
        with self._read("read changes") as db:
            rows = db.execute(
                "SELECT a.finding_id, a.transition, a.created, a.sweep_id, f.kind, f.severity, "
                "f.address, f.port, f.title FROM alerts a JOIN findings f ON f.id = a.finding_id "
                "WHERE (? IS NULL OR a.created >= ?) AND (? IS NULL OR a.finding_id = ?) "
                "ORDER BY a.created, a.rowid",
                (
                    _ts(since) if since else None,
                    _ts(since) if since else None,
                    finding_id,
                    finding_id,
                ),
            ).fetchall()
        return [
            Change(
                finding_id=r["finding_id"],
                transition=r["transition"],
                at=_dt(r["created"]),
                sweep_id=r["sweep_id"],
                kind=r["kind"],
                severity=r["severity"],
                address=r["address"],
                port=r["port"],
                title=r["title"] or "",
            )
            for r in rows
        ]

    def owner_names(self) -> set[str]:
        """The owners' names the stored findings carry, resolved ones included (the owner
        column: no finding is parsed)."""
        with self._read("read owner names") as db:
            rows = db.execute(
                "SELECT DISTINCT owner FROM findings WHERE owner IS NOT NULL"
            ).fetchall()
        return {r[0] for r in rows}

    def findings(self, status: FindingStatus | str | None = None) -> list[FindingRow]:
        wanted = FindingStatus(status) if status is not None else None
        with self._read("read findings") as db:
            if wanted is None:
                rows = db.execute("SELECT * FROM findings").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM findings WHERE status = ?", (wanted.value,)
                ).fetchall()
        return _sorted_findings(
            FindingRow(
                id=r["id"],
                kind=r["kind"],
                severity=r["severity"],
                confidence=r["confidence"],
                title=r["title"],
                approved_note=r["approved_note"],
                status=r["status"],
                address=r["address"],
                port=r["port"],
                first_seen=_dt(r["first_seen"]),
                last_seen=_dt(r["last_seen"]),
                resolved_at=_dt(r["resolved_at"]) if r["resolved_at"] else None,
                missed=r["missed"],
                last_sweep=r["seen_sweep"],
                finding=Finding.model_validate_json(r["finding"]),
            )
            for r in rows
        )

    def sweeps(self, limit: int | None = None) -> list[SweepRow]:
        """The sweeps recorded here (every shard that wrote this file), newest start first."""
        with self._read("read sweeps") as db:
            rows = db.execute(
                "SELECT * FROM sweeps ORDER BY started DESC, rowid DESC LIMIT ?",
                (-1 if limit is None else limit,),
            ).fetchall()
        return [_sweep_row(r) for r in rows]

    def observations(self, sweep_id: str) -> list[ObservationRow]:
        """What one sweep recorded, by address and port (closed and filtered ports that never
        had a finding are not recorded)."""
        with self._read("read observations") as db:
            rows = db.execute(
                "SELECT o.*, s.shard FROM observations o LEFT JOIN sweeps s ON s.id = o.sweep_id "
                "WHERE o.sweep_id = ?",
                (sweep_id,),
            ).fetchall()
        return [_observation_row(r) for r in rows]

    def history(self, address: str) -> list[ObservationRow]:
        with self._read("read history") as db:
            rows = db.execute(
                "SELECT o.*, s.shard FROM observations o LEFT JOIN sweeps s ON s.id = o.sweep_id "
                "WHERE o.address = ? ORDER BY o.observed, o.port",
                (address,),
            ).fetchall()
        return [_observation_row(r) for r in rows]


def _has_sweep(db: sqlite3.Connection, sweep_id: str) -> bool:
    return db.execute("SELECT 1 FROM sweeps WHERE id = ?", (sweep_id,)).fetchone() is not None


def _observation_row(r: sqlite3.Row) -> ObservationRow:
    return ObservationRow(
        sweep_id=r["sweep_id"],
        shard=r["shard"],
        address=r["address"],
        port=r["port"],
        status=r["status"],
        summary=r["summary"],
        observed=_dt(r["observed"]),
        kinds=tuple(json.loads(r["kinds"])),
    )


def _outbox_item(row: sqlite3.Row) -> OutboxItem:
    return OutboxItem(
        id=row["id"],
        channel=row["channel"],
        alert=Alert.model_validate_json(row["body"]),
        attempts=row["attempts"],
        next_attempt=_dt(row["next_attempt"]),
        last_error=row["last_error"],
    )


def _sorted_findings(rows: Iterable[FindingRow]) -> list[FindingRow]:
    # most severe first, then numerically by address (text order puts .10 before .9)
    return sorted(
        rows, key=lambda r: (r.severity.rank, address_order(r.address), r.port, r.kind.value)
    )


def _read_each(paths: Sequence[Path], read: Callable[[StateStore], Iterable[T]]) -> list[T]:
    """`read` applied to each shard file opened read-only, the rows of all files in one list."""
    rows: list[T] = []
    for path in paths:
        store = StateStore(path)
        store.open(readonly=True)
        try:
            rows.extend(read(store))
        finally:
            store.close()
    return rows


def read_findings(
    paths: Sequence[Path], status: FindingStatus | str | None = None
) -> list[FindingRow]:
    """Findings of several shard files, read-only; a finding in two files keeps its newest sighting."""
    merged: dict[str, FindingRow] = {}
    for row in _read_each(paths, lambda store: store.findings(status)):
        kept = merged.get(row.id)
        if kept is None or row.last_seen > kept.last_seen:
            merged[row.id] = row
    return _sorted_findings(merged.values())


def read_owner_names(paths: Sequence[Path]) -> set[str]:
    """The owners' names the findings of several shard files carry, read-only."""
    return set(_read_each(paths, lambda store: store.owner_names()))


def read_changes(
    paths: Sequence[Path], *, since: datetime | None = None, finding_id: str | None = None
) -> list[Change]:
    """The transitions of several shard files, read-only, oldest first."""
    changes = _read_each(paths, lambda store: store.changes(since=since, finding_id=finding_id))
    return sorted(changes, key=lambda c: c.at)


def read_history(paths: Sequence[Path], address: str) -> list[ObservationRow]:
    """What was seen at `address`, over several shard files, read-only, oldest first."""
    rows = _read_each(paths, lambda store: store.history(address))
    return sorted(rows, key=lambda r: (r.observed, r.port, r.sweep_id))


def read_sweeps(paths: Sequence[Path], *, limit: int | None = None) -> list[SweepRow]:
    """The sweeps of several shard files, read-only, newest start first (`limit` per file)."""
    rows = _read_each(paths, lambda store: store.sweeps(limit))
    return sorted(rows, key=lambda r: r.started, reverse=True)


def read_observations(paths: Sequence[Path], sweep_ids: Iterable[str]) -> list[ObservationRow]:
    """What these sweeps recorded, over several shard files, read-only."""
    wanted = tuple(dict.fromkeys(sweep_ids))
    return _read_each(
        paths, lambda store: [row for sid in wanted for row in store.observations(sid)]
    )


def read_owner_table(paths: Sequence[Path]) -> OwnerTable | None:
    """The owner table the last sweep of the first shard file that has one used, read-only."""
    tables = _read_each(paths, lambda store: [store.owner_table()])
    return next((t for t in tables if t is not None), None)


class StateSink:
    """Engine sink: records each judged probe under one sweep id, off the event loop.

    record() commits with fsync; running it in a worker thread keeps a slow disk from stalling
    every probe's timers. If the awaiting task is cancelled the commit still completes in its
    thread; the sweep's watermark then excludes the position and a resume records it again,
    which record() makes harmless.
    """

    def __init__(
        self,
        store: StateStore,
        sweep_id: str,
        *,
        on_alerts: Callable[[list[Alert]], None] | None = None,
        on_lines: Callable[[list[Lifecycle]], None] | None = None,
    ) -> None:
        self.store = store
        self.sweep_id = sweep_id
        self.on_alerts = on_alerts
        self.on_lines = on_lines  # the findings file: one line per finding the store folded
        self.recorded = 0
        self.transitions: Counter[Transition] = Counter()

    @property
    def alerts(self) -> int:
        return sum(self.transitions.values())

    async def emit(self, result: ProbeResult, verdict: Verdict) -> None:
        folded = await asyncio.to_thread(self.store.fold, self.sweep_id, result, verdict)
        alerts = folded.alerts
        self.recorded += 1
        if folded.lines and self.on_lines is not None:
            self.on_lines(folded.lines)
        self.transitions.update(a.transition for a in alerts)
        if alerts and self.on_alerts is not None:
            self.on_alerts(alerts)
