"""`relayaudit run`: scheduled, resumable sweeps with state, alerts, logs, metrics and signals."""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

# the sweep imports the SMTP client at its first open port (start-up time of a one-off sweep);
# the daemon loads it now, so a package upgraded on disk later is never half-loaded
import relayaudit.probe  # noqa: F401
from relayaudit.alerts import Dispatcher, check_templates
from relayaudit.canary import CanaryReceiver, start_canary
from relayaudit.config import Config, config_fingerprint, file_warnings, load_config
from relayaudit.engine import Sweep, SweepStats, Watermark, approval_day
from relayaudit.errors import ConfigError, RelayAuditError, StateError, listen_error
from relayaudit.eventloop import loop_name
from relayaudit.evidence import ProbeResult
from relayaudit.live_report import LiveReport
from relayaudit.logs import LogHandle, configure_logging
from relayaudit.metrics import Metrics, MetricsServer
from relayaudit.owners import OwnerCache, OwnerTable
from relayaudit.schedule import Schedule, local_zone
from relayaudit.sdnotify import Notifier
from relayaudit.sinks import FindingsFile
from relayaudit.sources import Loaded, SourceCache, TargetList, family_gaps, sweep_fingerprint
from relayaudit.state import Alert, StateSink, StateStore
from relayaudit.targets import Shard
from relayaudit.verdict import Verdict, VerdictStatus

__all__ = ["Daemon", "raise_open_file_limit", "worker_count"]

STOP_GRACE = 10.0  # seconds a stop may take before in-flight probes are abandoned
CHECKPOINT_EVERY = 2.0
HEARTBEAT = 1.0  # seconds between the event loop's heartbeat ticks (/livez, systemd's watchdog)
LIVE_WITHIN = 30.0  # /livez fails when the loop has not ticked for this long
STATUS_EVERY = 5.0  # seconds between sweep progress STATUS= notifications to systemd

log = structlog.get_logger("relayaudit")


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def worker_count(config: Config, open_files: int) -> int:
    """Workers the file limit allows.

    A worker holds one discovery socket per port, and while one port's battery runs, up to
    `relay.sessions_per_host` connections in place of that port's socket.
    """
    reserve = 128  # the state database, logs, metrics, canary, alert deliveries
    per_worker = len(config.ports) + config.relay.sessions_per_host
    return max(1, min(config.limits.concurrency, (open_files - reserve) // per_worker))


class _LogSink:
    """One canonical log event per probed address:port."""

    async def emit(self, result: ProbeResult, verdict: Verdict) -> None:
        log.info(
            "probe",
            address=result.address,
            port=result.port,
            port_state=result.port_state.value,
            status=verdict.status.value,
            findings=[f.kind.value for f in verdict.findings],
            sessions=result.sessions,
            duration_ms=round((result.finished - result.started).total_seconds() * 1000, 1),
            vantage=result.vantage,
            error=result.error,
        )


@dataclass
class _MetricsSink:
    metrics: Metrics

    async def emit(self, result: ProbeResult, verdict: Verdict) -> None:
        self.metrics.probe(verdict.status.value)


@dataclass
class Daemon:
    """Owns the long-lived pieces; a sweep is one call of `_sweep_once`."""

    config_path: Path
    shard: Shard | None = None
    config: Config = field(init=False)
    stopping: asyncio.Event = field(init=False)
    _reload: asyncio.Event = field(init=False)
    _logs: LogHandle | None = None
    _store: StateStore | None = None
    _metrics: Metrics = field(default_factory=Metrics)
    _last_completed: datetime | None = None
    _rng: random.Random = field(default_factory=random.Random)
    _started_at: float = field(default_factory=time.time)
    _notifier: Notifier = field(default_factory=Notifier)  # systemd's notify socket, if any
    _beat: float = field(default_factory=time.monotonic)  # the heartbeat task's last tick
    _status_at: float = 0.0  # when STATUS last went to systemd (progress is throttled)
    _dispatcher_task: asyncio.Task[None] | None = None
    _dispatcher: Dispatcher | None = None
    _dead_counted: int = 0
    _findings_file: FindingsFile | None = None
    _dispatcher_stop: asyncio.Event = field(default_factory=asyncio.Event)
    _live: LiveReport | None = None  # the report pages on the metrics listener
    _sources: SourceCache = field(default_factory=SourceCache)  # targets_from, last good kept
    _owners: OwnerCache = field(default_factory=OwnerCache)  # owner table, last good kept

    async def run(self) -> int:
        self.config = load_config(self.config_path)
        check_templates(self.config.alerts)  # a template failing on a sample alert: exit 78
        self.stopping = asyncio.Event()
        self._reload = asyncio.Event()
        shard_text = str(self.shard) if self.shard else "0/1"
        self._logs = configure_logging(self.config.logging, bind={"shard": shard_text})
        open_files = raise_open_file_limit()
        store = StateStore(self.config.state.path, resolve_after=self.config.state.resolve_after)
        store.open()
        self._store = store
        self._last_completed = store.last_completed()
        # a restart with an unreadable owners_file still routes findings
        self._owners = OwnerCache(store.owner_table())
        self._live = LiveReport(
            store.path,
            config=lambda: self.config,
            shard=shard_text,
            listen_host=self.config.metrics.listen[0],
            health=self._health,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._hangup)
        # what the store already knows, before the first sweep of this run: a restarted daemon
        # must not read as "no sweep ever, no findings, no dead letters" for hours (false
        # resolves of every alert rule)
        for status in VerdictStatus:
            self._metrics.probe(status.value, 0)  # every series present, at zero
        if self._last_completed is not None:
            self._metrics.last_completed_sweep_timestamp_seconds.set(
                self._last_completed.timestamp()
            )
        metrics_server = await self._start_metrics()
        self._start_dispatcher()
        await self._refresh_gauges()
        heartbeat = asyncio.create_task(self._heartbeat())
        log.info(
            "daemon.start",
            config=str(self.config_path),
            fingerprint=config_fingerprint(self.config),
            open_files=open_files,
            workers=worker_count(self.config, open_files),
            event_loop=loop_name(loop),
        )
        _log_warnings(self.config_path, self.config)
        self._notifier.ready(f"started (shard {shard_text}); waiting for the first sweep")
        try:
            await self._loop(open_files)
        finally:
            self._notifier.stopping("stopping: finishing deliveries")
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self._stop_dispatcher()
            if metrics_server is not None:
                await metrics_server.stop()
            store.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info("daemon.stop")
        return 0

    def _start_dispatcher(self) -> None:
        assert self._store is not None
        self._dispatcher_stop = asyncio.Event()
        dispatcher = Dispatcher(self._store, self.config.alerts, on_change=self._refresh_alerts)
        self._dispatcher = dispatcher
        self._dead_counted = 0
        self._dispatcher_task = asyncio.create_task(dispatcher.run(self._dispatcher_stop))

    async def _stop_dispatcher(self) -> None:
        if self._dispatcher_task is None:
            return
        self._dispatcher_stop.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._dispatcher_task, STOP_GRACE / 2)
        self._dispatcher_task = None

    def _hangup(self) -> None:
        self._reload.set()  # applied between sweeps
        if self._live is not None:  # the report renders afresh at its next request, mid-sweep too
            self._live.invalidate()

    def _request_stop(self, sig: int) -> None:
        log.info("daemon.signal", signal=signal.Signals(sig).name)
        self.stopping.set()

    async def _start_metrics(self) -> MetricsServer | None:
        cfg = self.config.metrics
        if not cfg.enabled:
            return None
        routes = self._live.routes() if self._live is not None else None
        server = MetricsServer(
            self._metrics,
            cfg.listen[0],
            cfg.listen[1],
            health=self._health,
            live=self._live_check,
            routes=routes,
        )
        try:
            await server.start()
        except OSError as exc:
            raise listen_error("metrics.listen", cfg.listen[0], cfg.listen[1], exc) from None
        return server

    async def _heartbeat(self) -> None:
        """Ticks while the event loop runs: /livez reads it, and systemd's watchdog gets its
        WATCHDOG=1 from here (a loop blocked for the watchdog's time gets the daemon restarted)."""
        watchdog = self._notifier.watchdog
        period = min(HEARTBEAT, watchdog / 3) if watchdog else HEARTBEAT
        while True:
            self._beat = time.monotonic()
            if watchdog:
                self._notifier.ping()
            await asyncio.sleep(period)

    def _live_check(self) -> tuple[bool, str]:
        """/livez: the process answers, and its event loop ticked within LIVE_WITHIN seconds."""
        age = time.monotonic() - self._beat
        if age > LIVE_WITHIN:
            return False, f"the event loop last ticked {age:.0f}s ago"
        return True, f"alive (loop ticked {age:.1f}s ago)"

    def _status(self, text: str, *, throttle: bool = False) -> None:
        """STATUS= for `systemctl status`; progress at most every STATUS_EVERY seconds."""
        now = time.monotonic()
        if throttle and now - self._status_at < STATUS_EVERY:
            return
        self._status_at = now
        self._notifier.status(text)

    def _health(self) -> tuple[bool, str]:
        window = (
            self.config.schedule.healthy_within
            or 2 * Schedule(self.config.schedule).expected_gap() + 3600
        )
        if self._last_completed is None:
            started = self._started_at
            if time.time() - started < window:
                return True, "starting: no sweep completed yet"
            return False, f"no sweep completed in the {window:.0f}s since start"
        age = (datetime.now(UTC) - self._last_completed).total_seconds()
        if age > window:
            return False, f"last sweep completed {age:.0f}s ago (window {window:.0f}s)"
        return True, f"last sweep completed {age:.0f}s ago"

    async def _apply_reload(self) -> None:
        self._reload.clear()
        if self._logs is not None:
            self._logs.reopen()
        if self._findings_file is not None:
            self._findings_file.reopen()  # logrotate moved it: continue in a fresh file
        try:
            new = load_config(self.config_path)
            check_templates(new.alerts)
        except ConfigError as exc:
            log.error(
                "config.reload_rejected", error=str(exc), kept=config_fingerprint(self.config)
            )
            return
        self.config = new
        if self._live is not None:
            self._live.invalidate()  # scope, targets and approvals are in the report's header
        # the hooks may have changed: a new dispatcher takes over; pending items stay in the outbox
        await self._stop_dispatcher()
        self._start_dispatcher()
        log.info("config.reloaded", fingerprint=config_fingerprint(new))
        _log_warnings(self.config_path, new)

    async def _wait_until(self, when: datetime) -> bool:
        """Sleep until `when`; False if asked to stop first. Reloads are applied while waiting."""
        while not self.stopping.is_set():
            delay = (when - datetime.now(UTC)).total_seconds()
            if delay <= 0:
                return True
            waits = [
                asyncio.create_task(self.stopping.wait()),
                asyncio.create_task(self._reload.wait()),
            ]
            _, pending = await asyncio.wait(
                waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            if self._reload.is_set():
                await self._apply_reload()
        return False

    async def _loop(self, open_files: int) -> None:
        store = self._store
        assert store is not None
        shard = str(self.shard) if self.shard else "0/1"
        last_started = await asyncio.to_thread(store.last_started)
        while not self.stopping.is_set():
            if self._reload.is_set():
                await self._apply_reload()
            schedule = Schedule(self.config.schedule, tz=local_zone())
            targets = await self._read_targets()
            fingerprint = sweep_fingerprint(self.config, targets)
            # an interrupted sweep continues at once; a fresh one waits for its slot (a daemon
            # that never swept starts at once in interval mode, cron always waits for its time)
            resumable = await asyncio.to_thread(
                store.resumable, shard=shard, config_fingerprint=fingerprint
            )
            if not resumable and (last_started is not None or schedule.kind == "cron"):
                when = schedule.next_run(
                    datetime.now(UTC), last_started=last_started, rng=self._rng
                )
                log.info("sweep.scheduled", at=when.isoformat())
                self._status(f"idle: next sweep at {when.isoformat(timespec='seconds')}")
                if not await self._wait_until(when):
                    break
                # reloaded while waiting? and the lists as they are now (an IPAM export changes)
                targets = await self._read_targets()
                fingerprint = sweep_fingerprint(self.config, targets)
            # the target space, built once; the owner table as it is now (the last good one
            # when owners_file cannot be read)
            owners = await self._read_owners()
            plan = Sweep(self.config, shard=self.shard, targets=targets, owners=owners)
            if plan.space.size == 0:
                # every source failed and none has a last good copy: no empty sweep is recorded
                # (it would resolve every finding); the next slot tries again
                log.error("sweep.skipped", reason="no targets: no target source could be read")
                self._status("idle: no targets (see targets.source_failed in the log)")
                last_started = datetime.now(UTC)
                continue
            record = store.begin_sweep(
                shard=shard, config_fingerprint=fingerprint, total=plan.total
            )
            # approvals are judged at the sweep's recorded start: a resumed sweep as it began
            plan.started, plan.zone = record.started, schedule.tz or plan.zone
            last_started = datetime.now(UTC)
            if self._live is not None:
                self._live.sweep_started()
            await self._sweep_once(plan, record.id, record.watermark, record.resumed, open_files)

    async def _read_targets(self) -> TargetList | None:
        """targets_from as it is now; a source that fails keeps its last good copy (SourceCache),
        with a warning and relayaudit_target_source_failures_total."""
        config = self.config
        if not config.targets_from:
            return None

        def failed(label: str, error: str, kept: Loaded | None) -> None:
            self._metrics.target_source_failures_total.inc(source=label)
            log.warning(
                "targets.source_failed",
                source=label,
                error=error,
                kept=kept.count if kept is not None else 0,
                note="using the last good list" if kept is not None else "no good list yet",
            )

        targets = await asyncio.to_thread(self._sources.load, config, on_failure=failed)
        for one in targets.sources:
            self._metrics.target_source_addresses.set(one.count, source=one.label)
            for problem in one.problems:
                log.warning("targets.skipped", source=one.label, problem=problem)
        for entry in config.targets_from:
            stale = entry.label in self._sources.stale
            self._metrics.target_source_stale.set(1 if stale else 0, source=entry.label)
        return targets

    async def _read_owners(self) -> OwnerTable:
        """The owner table as the config and owners_file say now; when that read fails, the
        last good table (kept in the state store), with a warning and a metric."""
        config = self.config

        def failed(error: str, kept: OwnerTable | None) -> None:
            self._metrics.owners_failures_total.inc()
            log.warning(
                "owners.failed",
                error=error,
                kept=kept.digest if kept is not None else None,
                note="using the last good owner table" if kept else "no good owner table yet",
            )

        table = await asyncio.to_thread(self._owners.load, config, on_failure=failed)
        self._metrics.owners_stale.set(1 if self._owners.stale else 0)
        table = table if table is not None else OwnerTable()
        self._metrics.owner_ranges.set(len(table.rows))
        for warning in table.warnings:
            log.warning("owners.warning", warning=warning)
        return table

    async def _sweep_once(
        self, plan: Sweep, sweep_id: str, start: int, resumed: bool, open_files: int
    ) -> None:
        store = self._store
        assert store is not None and self._logs is not None
        config = self.config
        self._logs.bind(sweep_id=sweep_id)
        large = {"allow_large_scope": config.allow_large_scope} if config.allow_large_scope else {}
        lists: dict[str, object] = {}
        if plan.targets is not None and plan.targets.sources:
            # every shard logs the same hashes: the same lists, the same walk
            lists = {
                "targets_hash": plan.targets.digest,
                "target_sources": {
                    one.label: {"addresses": one.count, "sha256": one.digest}
                    for one in plan.targets.sources
                },
            }
        if plan.owners is not None and plan.owners.rows:
            lists["owners_hash"] = plan.owners.digest  # every shard logs the table it used
        log.info("sweep.start", resumed=resumed, start=start, total=plan.total, **large, **lists)
        for gap in family_gaps(config, plan.space, plan.targets):
            log.warning("sweep.no_source", warning=gap)
        mark = Watermark(low=start)

        def on_alerts(alerts: list[Alert]) -> None:
            for alert in alerts:
                log.info(
                    "finding.transition",
                    transition=alert.transition.value,
                    finding_id=alert.finding.id,
                    kind=alert.finding.kind.value,
                    severity=alert.finding.severity.value,
                    address=alert.finding.address,
                    port=alert.finding.port,
                    key=alert.key,
                )

        findings = FindingsFile(
            config.output.findings,
            sweep_id=sweep_id,
            shard=str(self.shard or Shard(0, 1)),
            transcripts=config.output.transcripts,
        )
        # the findings file is written from the store's verdicts: each line carries the
        # finding's lifecycle status (docs/findings.md)
        state_sink = StateSink(store, sweep_id, on_alerts=on_alerts, on_lines=findings.write)
        self._findings_file = findings
        metrics_sink = _MetricsSink(self._metrics)
        canary: CanaryReceiver | None = None
        if config.canary.enabled:  # a port in use is a clear exit; the sweep resumes on restart
            canary = await start_canary(config, count=self._metrics.canary)

        def progress(done: int, of: int) -> None:
            self._metrics.sweep_progress(done, of)
            self._status(f"sweeping: {done} of {of} hosts (sweep {sweep_id})", throttle=True)

        async def checkpoints() -> None:
            while True:
                await asyncio.sleep(CHECKPOINT_EVERY)
                try:
                    await asyncio.to_thread(store.checkpoint, sweep_id, mark.low)
                    await self._refresh_gauges()
                except StateError as exc:  # the resume point lags; the next checkpoint catches up
                    log.error("sweep.checkpoint_failed", error=str(exc))

        started = time.monotonic()
        work = asyncio.create_task(
            plan.run(
                sinks=[state_sink, _LogSink(), metrics_sink],
                start=start,
                canary=canary,
                progress=progress,
                watermark=mark,
                workers=worker_count(config, open_files),
            )
        )
        saver = asyncio.create_task(checkpoints())
        stopper = asyncio.create_task(self.stopping.wait())
        stats: SweepStats | None = None
        try:
            done, _ = await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                stats = work.result()
            else:
                log.info("sweep.interrupted", watermark=mark.low)
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError, RelayAuditError):
                    await asyncio.wait_for(work, STOP_GRACE)
        finally:
            saver.cancel()
            stopper.cancel()
            await asyncio.to_thread(store.checkpoint, sweep_id, mark.low)
            findings.close()
            if canary is not None:
                await canary.stop()
        if stats is None:
            return
        await asyncio.to_thread(store.complete_sweep, sweep_id, stats)
        if plan.owners is not None and (plan.owners.rows or not self._owners.stale):
            # every stored finding, resolved ones too, now names its owner in this table; an
            # open one moved between owners raises owner-changed, but never from the table kept
            # because owners_file could not be read (that is no news about who runs a host)
            restamped = await asyncio.to_thread(
                store.restamp_owners,
                plan.owners,
                sweep_id=None if self._owners.stale else sweep_id,
            )
            if restamped.changed:
                log.info(
                    "owners.restamped",
                    findings=restamped.changed,
                    owner_changed=len(restamped.alerts),
                    owners_hash=plan.owners.digest,
                )
            on_alerts(restamped.alerts)
            state_sink.transitions.update(a.transition for a in restamped.alerts)
        self._last_completed = datetime.now(UTC)
        if self._live is not None:
            self._live.sweep_ended()
        # old history and sent-alert rows go, so the state file stops growing once it holds
        # `state.keep_days` of sweeps; findings, ticket keys and dead letters stay
        pruned = await asyncio.to_thread(
            store.prune, self._last_completed - timedelta(days=config.state.keep_days)
        )
        if any(pruned.values()):
            log.info("state.pruned", **pruned)
        elapsed = time.monotonic() - started
        self._metrics.sweep_completed(duration=elapsed, finished_at=time.time())
        await self._refresh_gauges()
        self._status(
            f"sweep {sweep_id} done in {elapsed:.0f}s: {stats.hosts} hosts, {stats.relays} relay(s)"
        )
        log.info(
            "sweep.summary",
            hosts=stats.hosts,
            probes=stats.probes,
            relays=stats.relays,
            relay_findings=sorted(stats.relay_findings),  # ids, as in the findings file and store
            statuses={k.value: v for k, v in stats.statuses.items()},
            findings=dict(stats.findings),
            transitions={k.value: v for k, v in state_sink.transitions.items()},
            duration_s=round(elapsed, 2),
        )
        self._logs.bind(sweep_id=None)

    async def _refresh_gauges(self) -> None:
        store = self._store
        assert store is not None
        # off the event loop: the store lock is shared with the sink's writer threads
        self._metrics.set_findings(await asyncio.to_thread(store.finding_counts))
        today = approval_day(datetime.now(UTC), local_zone())
        self._metrics.approvals_expiring.set(len(self.config.expiring(today)))
        await self._refresh_alerts()

    async def _refresh_alerts(self) -> None:
        """The outbox gauges and the dead-letter counter: after each sweep, and whenever the
        dispatcher delivered or gave up on an alert."""
        store = self._store
        assert store is not None
        outbox = await asyncio.to_thread(store.outbox_counts)
        self._metrics.set_alerts(
            pending=outbox.get("pending", 0), sent=outbox.get("sent", 0), dead=outbox.get("dead", 0)
        )
        if self._dispatcher is not None and self._dispatcher.dead > self._dead_counted:
            self._metrics.alert_dead(self._dispatcher.dead - self._dead_counted)
            self._dead_counted = self._dispatcher.dead


def _log_warnings(path: Path, config: Config) -> None:
    """What `config check` warns about, in the log: the daemon's operators rarely run it."""
    for warning in (*config.warnings, *file_warnings(path)):
        log.warning("config.warning", config=str(path), warning=warning)
