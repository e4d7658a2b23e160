"""What the HTML report shows (`Page`), read from the state store(s) or from one sweep.

`page_from_stores` reads the findings, their status changes, each shard's sweeps and what the
last sweep saw (read-only); `page_from_sweep` takes a `sweep` or `demo` run's own findings and
counts. html_report.py renders a Page; live_report.py serves it from the daemon.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from relayaudit.config import Config, ScheduleConfig
from relayaudit.evidence import ProbeResult
from relayaudit.export import UNOWNED, Report, for_owner, from_sweep, report_of
from relayaudit.owners import OwnerTable, load_owners
from relayaudit.progress import SweepStats
from relayaudit.records import Transition
from relayaudit.schedule import Schedule
from relayaudit.state import (
    Change,
    SweepRow,
    read_changes,
    read_findings,
    read_observations,
    read_owner_table,
    read_sweeps,
)
from relayaudit.text import span
from relayaudit.verdict import Finding, FindingKind, Verdict, VerdictStatus

__all__ = [
    "CHART_POINTS",
    "SMTP_STATUSES",
    "Page",
    "Service",
    "ServicesSeen",
    "ShardView",
    "page_from_stores",
    "page_from_sweep",
    "page_owners",
    "store_health",
]

CHART_POINTS = 50  # sweeps the trend chart shows, the newest
# verdicts that mean an SMTP service answered (the per-subnet view's "services seen")
SMTP_STATUSES = frozenset(
    {
        VerdictStatus.OPEN_RELAY,
        VerdictStatus.RELAY_CAMPUS_SENDER,
        VerdictStatus.RELAY_AFTER_STARTTLS,
        VerdictStatus.RELAY_CLAIMED_HELO,
        VerdictStatus.RELAY_VIA_XCLIENT,
        VerdictStatus.ACCEPTS_WITHOUT_DELIVERY,
        VerdictStatus.REFUSES_AT_DATA,
        VerdictStatus.RELAY_REFUSED,
        VerdictStatus.AUTH_REQUIRED,
        VerdictStatus.TLS_REQUIRED,
        VerdictStatus.INCONCLUSIVE,
        VerdictStatus.SESSION_REFUSED,
    }
)


@dataclass(frozen=True, slots=True)
class Service:
    """An SMTP service one sweep saw (from the store's observations, or a sweep's verdicts)."""

    address: str
    port: int
    status: VerdictStatus


@dataclass(frozen=True, slots=True)
class ShardView:
    """One shard of one store in the header: its last completed sweep and one running now."""

    shard: str
    source: str
    last: SweepRow | None
    running: SweepRow | None = None


@dataclass(frozen=True)
class Page:
    report: Report
    details: Mapping[str, Finding]  # whole findings by id: evidence, transcript, fingerprint
    history: Mapping[str, tuple[Change, ...]]  # every status change of each finding
    latest: frozenset[str]  # each shard's newest sweep: "what changed since the previous sweep"
    shards: tuple[ShardView, ...]
    series: tuple[tuple[datetime, Mapping[FindingKind, int]], ...]  # open findings per sweep
    services: tuple[Service, ...] | None  # SMTP services of the last sweep; None: not known
    config: Config | None  # scope, targets, approved services; None: not given
    health: tuple[bool, str]
    served_by: str | None = None  # the live page: which daemon (shard) serves it
    # who runs each address (docs/owners.md): the SMTP services nobody owns, the owner of an
    # approved service; None: no owner table is known
    owners: OwnerTable | None = None

    def owner_of(self, address: str, port: int | None = None) -> str | None:
        """The name of the owner of address:port (an approval's `owner`, else the range's);
        None: nobody, or no table."""
        owner = self.owners.lookup(address, port) if self.owners is not None else None
        return owner.name if owner is not None else None

    def shows(self, address: str, port: int | None = None) -> bool:
        """Whether the page's owner filter (`report --owner/--unowned`) keeps this service."""
        wanted = self.report.owner_filter
        if wanted is None:
            return True
        name = self.owner_of(address, port)
        return name is None if wanted == UNOWNED else name == wanted


class ServicesSeen:
    """Sink: the SMTP services a `sweep` saw, for its report's subnet and approved views."""

    wants_unreachable = False

    def __init__(self) -> None:
        self.services: list[Service] = []

    async def emit(self, result: ProbeResult, verdict: Verdict) -> None:
        if verdict.status in SMTP_STATUSES:
            self.services.append(Service(verdict.address, verdict.port, verdict.status))


def _shard_views(paths: Sequence[Path]) -> tuple[list[ShardView], list[SweepRow]]:
    views: list[ShardView] = []
    completed: list[SweepRow] = []
    for path in paths:
        by_shard: dict[str, list[SweepRow]] = defaultdict(list)
        for row in read_sweeps([path]):
            by_shard[row.shard].append(row)  # newest first
        for shard, rows in sorted(by_shard.items()):
            last = next((r for r in rows if r.state == "completed"), None)
            running = next((r for r in rows if r.state == "running"), None)
            if running is not None and last is not None and running.started < last.started:
                running = None
            views.append(ShardView(shard=shard, source=str(path), last=last, running=running))
            completed += [r for r in rows if r.state == "completed"]
    return views, completed


def _series(
    changes: Sequence[Change], completed: Sequence[SweepRow], points: int
) -> tuple[tuple[datetime, Mapping[FindingKind, int]], ...]:
    """Open findings per kind at the end of each of the last `points` sweeps, replayed from the
    store's transitions (new and reopened open a finding, resolved closes it)."""
    ends = sorted(r.finished for r in completed if r.finished is not None)[-points:]
    events = sorted(changes, key=lambda c: c.at)
    open_now: dict[str, FindingKind] = {}
    series: list[tuple[datetime, Mapping[FindingKind, int]]] = []
    i = 0
    for end in ends:
        while i < len(events) and events[i].at <= end:
            c = events[i]
            if c.transition is Transition.RESOLVED:
                open_now.pop(c.finding_id, None)
            else:
                open_now[c.finding_id] = c.kind
            i += 1
        series.append((end, dict(Counter(open_now.values()))))
    return tuple(series)


def store_health(
    shards: Sequence[ShardView], schedule: ScheduleConfig, now: datetime
) -> tuple[bool, str]:
    """The daemon's /healthz rule, read from the store: each shard completed a sweep recently."""
    window = schedule.healthy_within or 2 * Schedule(schedule).expected_gap(now) + 3600
    if not shards:
        return False, "no sweep recorded in the state store"
    reasons, ok = [], True
    for view in shards:
        name = f"shard {view.shard}: " if len(shards) > 1 else ""
        if view.last is None or view.last.finished is None:
            ok = False
            reasons.append(f"{name}no sweep completed yet")
            continue
        age = (now - view.last.finished).total_seconds()
        if age > window:
            ok = False
            reasons.append(
                f"{name}last sweep completed {span(age)} ago, longer than the expected "
                f"{span(window)}"
            )
        else:
            reasons.append(f"{name}last sweep completed {span(age)} ago")
    return ok, "; ".join(reasons)


def page_from_stores(
    paths: Sequence[Path],
    *,
    since: timedelta,
    config: Config | None = None,
    now: datetime | None = None,
    health: tuple[bool, str] | None = None,
    served_by: str | None = None,
    chart_points: int = CHART_POINTS,
    owner: str | None = None,
    unowned: bool = False,
) -> Page:
    """The page of the state files (shards merged as `findings` merges them), read-only;
    `owner`/`unowned`: only that owner's (or nobody's) findings, in every section."""
    now = now or datetime.now(UTC)
    rows = read_findings(paths)
    changes = read_changes(paths)
    report = for_owner(
        report_of(rows, changes, sources=tuple(str(p) for p in paths), since=now - since, now=now),
        name=owner,
        unowned=unowned,
    )
    kept = {f.id for f in report.findings}
    rows = [r for r in rows if r.id in kept]
    changes = [c for c in changes if c.finding_id in kept]
    shards, completed = _shard_views(paths)
    history: dict[str, list[Change]] = defaultdict(list)
    for c in changes:
        history[c.finding_id].append(c)
    last_ids = [v.last.id for v in shards if v.last is not None]
    latest = frozenset(last_ids + [v.running.id for v in shards if v.running is not None])
    services = tuple(
        Service(o.address, o.port, o.status)
        for o in read_observations(paths, last_ids)
        if o.status in SMTP_STATUSES
    )
    if health is None:
        health = store_health(shards, config.schedule if config else ScheduleConfig(), now)
    page = Page(
        report=report,
        details={r.id: r.finding for r in rows},
        history={k: tuple(v) for k, v in history.items()},
        latest=latest,
        shards=tuple(shards),
        series=_series(changes, completed, chart_points),
        services=services if last_ids else None,
        config=config,
        health=health,
        served_by=served_by,
        # the table the findings were stamped with; else the config's
        owners=read_owner_table(paths) or page_owners(config),
    )
    return _only_shown(page)


def page_owners(config: Config | None) -> OwnerTable | None:
    """The config's owner table (an unreadable owners_file: ConfigError), or None."""
    if config is None or not (config.owners or config.owners_file is not None):
        return None
    return load_owners(config)


def _only_shown(page: Page) -> Page:
    """The page with only the SMTP services its owner filter keeps."""
    if page.report.owner_filter is None or page.services is None:
        return page
    return replace(page, services=tuple(s for s in page.services if page.shows(s.address, s.port)))


def page_from_sweep(
    findings: Iterable[Finding],
    *,
    sweep_id: str,
    stats: SweepStats,
    config: Config | None,
    services: Iterable[Service] | None,
    shard: str = "0/1",
    now: datetime | None = None,
    owners: OwnerTable | None = None,
) -> Page:
    """The page of one `sweep` or `demo` run, which keeps no state store; `owners`: the table
    its findings were stamped with (None: the config's)."""
    now = now or datetime.now(UTC)
    found = list(findings)
    report = from_sweep(found, sweep_id=sweep_id, now=now)
    row = SweepRow(
        id=sweep_id,
        shard=shard,
        state="completed",
        started=stats.started,
        finished=stats.finished or now,
        total=stats.hosts,
        watermark=stats.hosts,
        probes=stats.probes,
        hosts=stats.hosts,
        relays=stats.relays,
        statuses={k.value: v for k, v in stats.statuses.items()},
    )
    internal = row.statuses.get(VerdictStatus.INTERNAL_ERROR.value, 0)
    health = (
        (True, "one-off sweep, completed")
        if internal == 0
        else (False, f"{internal} probe(s) ended in internal-error: a relayaudit bug, see the log")
    )
    return Page(
        report=report,
        details={f.id: f for f in found},
        history={},
        latest=frozenset({sweep_id}),
        shards=(ShardView(shard=shard, source=f"sweep {sweep_id}", last=row),),
        series=(),
        services=tuple(services) if services is not None else None,
        config=config,
        health=health,
        owners=owners if owners is not None else page_owners(config),
    )
