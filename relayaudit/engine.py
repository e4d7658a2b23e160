"""Runs a sweep: plan the targets, discover open ports, probe each, await canaries, record the verdicts."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, tzinfo
from typing import TYPE_CHECKING, Protocol

from relayaudit.config import ApprovedService, Config
from relayaudit.connect import Dialer, InProgress, finish_connect, open_socket
from relayaudit.errors import RelayAuditError
from relayaudit.evidence import PortState, ProbeResult, ProbeStatus
from relayaudit.failures import NoSession
from relayaudit.greylisting import greylisted, retry
from relayaudit.owners import OwnerTable, load_owners
from relayaudit.pacer import Pacer
from relayaudit.progress import SweepStats, Watermark
from relayaudit.schedule import local_zone
from relayaudit.settings import CanaryTarget, ProbeSettings
from relayaudit.sources import TargetList, load_targets
from relayaudit.targets import Shard, TargetSpace
from relayaudit.verdict import TargetOrigin, Verdict, judge, status_of

if TYPE_CHECKING:  # the receiver (aiosmtpd) is imported only where confirmation mode runs
    from relayaudit.canary import CanaryReceiver

__all__ = [
    "Pacer",
    "Sink",
    "Sweep",
    "SweepStats",
    "Watermark",
    "approval_day",
    "expired_text",
    "judge_result",
    "probe_settings",
    "sweep",
]

Connect = socket.socket | NoSession | InProgress  # what Dialer.connect_now settled
_YIELD_EVERY = 64  # addresses a worker settles without awaiting before it lets others run
_NEEDS_APPROVAL = {ProbeStatus.SMTP, ProbeStatus.SESSION_REFUSED}


class Sink(Protocol):
    """Where each judged probe goes (findings file, state store, logs, metrics).

    A sink that never cares about closed, filtered or failed connects sets
    `wants_unreachable = False`; when no sink wants them, the sweep's hot path builds no result
    objects for them at all (they are still counted).
    """

    async def emit(self, result: ProbeResult, verdict: Verdict) -> None: ...


def probe_settings(config: Config, *, confirm: bool | None = None) -> ProbeSettings:
    """The probe's view of the configuration."""
    use_canary = config.canary.enabled if confirm is None else confirm
    first = config.source_address[0] if config.source_address else None
    return ProbeSettings(
        helo_name=config.identity.helo_name,
        source_address=str(first) if first is not None else None,
        connect_timeout=config.timeouts.connect,
        command_timeout=config.timeouts.command,
        greeting_timeout=config.timeouts.greeting_wait,
        session_timeout=config.timeouts.session,
        max_tests_per_session=config.relay.max_tests_per_session,
        sessions_per_host=config.relay.sessions_per_host,
        pipelining=config.relay.pipelining,
        claimed_identity=config.relay.claimed_identity,
        retest_after_starttls=config.relay.retest_after_starttls,
        campus_domains=config.relay.campus_domains,
        external_domains=config.relay.external_domains,
        external_local_part=config.relay.external_local_part,
        sender_local_part=config.relay.sender_local_part,
        canary=CanaryTarget(
            local_part=config.canary.local_part,
            domain=config.canary.domain,
            contact=config.identity.contact,
            campus_sender=config.canary.campus_sender,
        )
        if use_canary
        else None,
    )


def judge_result(config: Config, result: ProbeResult, *, day: date | None = None) -> Verdict:
    """judge() with the approval that applies to the result's address:port on `day` (the
    sweep's start, in the schedule's zone: `approval_day`); None: expiry not considered."""
    if result.status not in _NEEDS_APPROVAL:  # closed, filtered, ...: no finding either way
        return judge(result)
    address = ipaddress.ip_address(result.address)
    approved = config.is_approved(address, result.port, day=day)
    gone = (
        config.expired_approval(address, result.port, day=day)
        if approved is None and day is not None
        else None
    )
    return judge(
        result,
        approved=approved is not None,
        approved_note=approved.note if approved is not None else None,
        expired=expired_text(gone) if gone is not None else None,
    )


def expired_text(entry: ApprovedService) -> str:
    """`the approval 192.0.2.7/32 port 25 ('ISO-0042') expired after 2027-03-31`."""
    last = entry.expires.isoformat() if entry.expires is not None else "?"
    return f"the approval {entry.describe()} expired after {last}"


def approval_day(at: datetime, zone: tzinfo) -> date:
    """The day an approval is judged on: `at` (a sweep's recorded start) in `zone`."""
    return at.astimezone(zone).date()


def no_source(config: Config, version: int) -> NoSession:
    """The outcome of a target whose family source_address has no address for: one clear line."""
    sources = ", ".join(str(a) for a in config.source_address)
    return NoSession(
        ProbeStatus.ERROR,
        f"not probed: source_address ({sources}) has no IPv{version} address to connect from",
        PortState.ERROR,
    )


class _NoSourceDialer:
    """The dialer of a family without a source address: every connect is that outcome, at once."""

    def __init__(self, outcome: NoSession) -> None:
        self.outcome = outcome

    def connect_now(self, address: str, port: int) -> NoSession:
        return self.outcome

    def close(self) -> None:
        pass


class _FamilyDialer:
    """One dialer per address family, each bound to its family's source address."""

    def __init__(self, v4: Dialer | _NoSourceDialer, v6: Dialer | _NoSourceDialer) -> None:
        self._v4, self._v6 = v4, v6

    def connect_now(self, address: str, port: int) -> Connect:
        return (self._v6 if ":" in address else self._v4).connect_now(address, port)

    def close(self) -> None:
        self._v4.close()
        self._v6.close()


async def await_confirmation(
    result: ProbeResult, canary: CanaryReceiver | None, wait: float
) -> ProbeResult:
    """Fill in whether the canary message arrived (bounded by `wait`)."""
    conf = result.confirmation
    if conf is None or not conf.sent or canary is None:
        return result
    arrival = await canary.wait_for(conf.token, wait)
    return result.model_copy(
        update={"confirmation": conf.model_copy(update={"delivered": arrival is not None})}
    )


def _text(address: object | None) -> str | None:
    return str(address) if address is not None else None


class Sweep:
    """One pass over a shard's targets; its steps are the methods below, in the order they run.

    plan (the constructor: the target space, built once, and the probe settings) -> discover
    (`_worker`: a connect per port, settled at once where the kernel knows the answer) ->
    probe (`_host`, `_probe`) -> confirm (`_confirm`: a canary's arrival, awaited off the
    worker) -> record (`_record`: judge, count, hand to every sink). A Sweep runs once.
    """

    def __init__(
        self,
        config: Config,
        *,
        shard: Shard | None = None,
        confirm: bool | None = None,
        targets: TargetList | None = None,
        owners: OwnerTable | None = None,
        started: datetime | None = None,
        zone: tzinfo | None = None,
    ):
        self.config = config
        self.shard = shard
        # approvals are judged at the sweep's recorded start, in the schedule's zone: a sweep
        # across midnight, or a resumed one, judges every host alike (the daemon sets `started`
        # to the stored sweep's start)
        self.started = started or datetime.now(UTC)
        self.zone = zone or local_zone()
        if targets is None and config.targets_from:
            targets = load_targets(config)  # a one-off sweep; the daemon reads them itself
        self.targets = targets
        if owners is None and (config.owners or config.owners_file is not None):
            owners = load_owners(config)  # likewise: a bad owners_file is a config error here
        self.owners = owners
        self.space = (
            targets.space(config)
            if targets is not None
            else TargetSpace(config.targets, config.exclude, seed=config.seed)
        )
        # where each address from DNS came from, for its findings
        self._origins: Mapping[str, tuple[TargetOrigin, ...]] = (
            targets.origins if targets is not None else {}
        )
        self.total = self.space.shard_size(shard)
        self.settings = probe_settings(config, confirm=confirm)
        # with one source per family, each target goes out from its own family's source
        self._family_settings = {
            v: dataclasses.replace(
                self.settings, source_address=_text(config.source_for(v))
            )
            for v in (4, 6)
        }
        self.stats = SweepStats()
        self._pacer = Pacer(config.limits.rate, config.limits.subnet_rate)
        self._dialer: Dialer | _FamilyDialer = (
            Dialer(source=self.settings.source_address)
            if not config.source_address
            else _FamilyDialer(*(self._family_dialer(v) for v in (4, 6)))
        )
        self._group = asyncio.TaskGroup()
        self._sinks: Sequence[Sink] = ()
        self._unreachable_sinks: list[Sink] = []
        self._canary: CanaryReceiver | None = None
        self._progress: Callable[[int, int], None] | None = None
        self._mark = Watermark()
        self._done_hosts = 0
        # A position counts as done (for the resume watermark) only once its results reached
        # the sinks, including those whose canary is still awaited: each holds a reference.
        self._refs: dict[int, int] = {}
        # probes that met greylisting, with their positions: tried again at the sweep's end
        self._greylisted: list[tuple[ProbeResult, int]] = []

    def _family_dialer(self, version: int) -> Dialer | _NoSourceDialer:
        if self.config.unsourced_family(version):
            return _NoSourceDialer(no_source(self.config, version))
        return Dialer(source=self._family_settings[version].source_address)

    async def run(
        self,
        *,
        sinks: Sequence[Sink],
        start: int = 0,
        canary: CanaryReceiver | None = None,
        progress: Callable[[int, int], None] | None = None,
        watermark: Watermark | None = None,
        workers: int | None = None,
    ) -> SweepStats:
        """Probe every (address, port) of the shard once; each judged result goes to every sink."""
        if self.settings.canary is not None and canary is None:
            raise ValueError("confirmation mode needs a running canary receiver")
        self._sinks = sinks
        self._unreachable_sinks = [s for s in sinks if getattr(s, "wants_unreachable", True)]
        self._canary = canary
        self._progress = progress
        self._mark = watermark or Watermark(low=start)
        self._done_hosts = start
        work = self.space.iter_shard_text(self.shard, start=start)
        self._pacer.start()
        try:
            async with self._group:
                count = max(1, min(workers or self.config.limits.concurrency, self.total))
                tasks = [self._group.create_task(self._worker(work)) for _ in range(count)]
                self._group.create_task(self._retry_greylisted(tasks, count))
        except BaseExceptionGroup as failed:
            # a sink that cannot write (state store locked or full, findings file) ends the
            # sweep; the caller gets that error, with its clear message, not a group around it
            ours = next((e for e in failed.exceptions if isinstance(e, RelayAuditError)), None)
            if ours is None:
                raise
            raise ours from None
        finally:
            self._dialer.close()
            await self._pacer.stop()
        self.stats.finished = datetime.now(UTC)
        return self.stats

    # -- discover ------------------------------------------------------------------------

    async def _worker(self, work: Iterator[tuple[int, str]]) -> None:
        pacer, dialer, ports = self._pacer, self._dialer, self.config.ports
        only_port = ports[0] if len(ports) == 1 else None
        in_a_row = 0
        for position, addr in work:
            # the fast path of a sweep, where most addresses refuse: a free pacer slot and a
            # connect the kernel answers at once settle an address without a single await
            pre: list[Connect | None]
            if only_port is not None:  # (no comprehension frame per address)
                pre = [dialer.connect_now(addr, only_port) if pacer.try_now(addr) else None]
            else:
                pre = [dialer.connect_now(addr, p) if pacer.try_now(addr) else None for p in ports]
            if self._settled_closed(pre):
                self._host_done(position)
                in_a_row += 1
                if in_a_row >= _YIELD_EVERY:
                    in_a_row = 0
                    await asyncio.sleep(0)  # let the other workers, timers and signals run
                continue
            in_a_row = 0
            # a host is done for the watermark once every result reached the sinks: a canary
            # awaited, or a retry after greylisting, holds a reference until then
            self._refs[position] = 1
            await self._host(addr, position, pre)
            self._release(position)
            self._host_done(position, mark=False)

    def _settled_closed(self, pre: list[Connect | None]) -> bool:
        """Every port refused or unreachable at once, and no sink wants those: only counted."""
        if self._unreachable_sinks:
            return False
        for outcome in pre:
            if not isinstance(outcome, NoSession):
                return False
        statuses = self.stats.statuses
        for outcome in pre:
            statuses[status_of(outcome.status)] += 1  # type: ignore[union-attr]
        self.stats.probes += len(pre)
        return True

    def _host_done(self, position: int, *, mark: bool = True) -> None:
        self.stats.hosts += 1
        self._done_hosts += 1
        if mark:
            self._mark.done(position)
        if self._progress is not None:
            self._progress(self._done_hosts, self.total)

    async def _connect(
        self, address: str, port: int, pre: Connect | None
    ) -> socket.socket | NoSession:
        """Finish discovery of one port: wait for a pacer slot, or for a handshake in flight."""
        s = self._family_settings[6 if ":" in address else 4]
        if pre is None:  # no free pacer slot in the worker: wait for one here
            if self.config.unsourced_family(6 if ":" in address else 4):
                return no_source(self.config, 6 if ":" in address else 4)
            await self._pacer(address)
            return await open_socket(
                address, port, source=s.source_address, timeout=s.connect_timeout
            )
        if isinstance(pre, InProgress):
            return await finish_connect(pre, address, port, timeout=s.connect_timeout)
        return pre

    # -- probe ---------------------------------------------------------------------------

    async def _host(self, address: str, position: int, pre: list[Connect | None]) -> None:
        """Discovery of all the host's ports at once, then each open port's probe in turn."""
        ports = self.config.ports
        # discovery sockets not yet handed to probe(), which owns each one from then on
        unclaimed: list[socket.socket] = [
            o.sock if isinstance(o, InProgress) else o
            for o in pre
            if isinstance(o, socket.socket | InProgress)
        ]
        try:
            found: Sequence[socket.socket | NoSession]
            if len(ports) == 1:  # no task per connect when there is one port
                found = [await self._connect(address, ports[0], pre[0])]
            else:
                found = await asyncio.gather(
                    *(self._connect(address, p, o) for p, o in zip(ports, pre, strict=True))
                )
            unclaimed = [o for o in found if isinstance(o, socket.socket)]
            for port, outcome in zip(ports, found, strict=True):
                if isinstance(outcome, NoSession):
                    await self._unreachable(address, port, outcome)
                    continue
                unclaimed.remove(outcome)
                await self._probe(address, port, outcome, position)
        finally:
            # a cancelled or failed host leaves no discovery connection open
            for sock in unclaimed:
                sock.close()

    async def _unreachable(self, address: str, port: int, outcome: NoSession) -> None:
        if not self._unreachable_sinks:
            self.stats.probes += 1
            self.stats.statuses[status_of(outcome.status)] += 1
            return
        from relayaudit.probe import settled  # noqa: PLC0415 - see _probe

        settings = self._family_settings[6 if ":" in address else 4]
        vantage = settings.source_address or "default"
        result = settled(address, port, outcome, vantage=vantage)
        await self._record(result, self._unreachable_sinks)

    async def _probe(self, address: str, port: int, sock: socket.socket, position: int) -> None:
        # the SMTP client (aiosmtplib, email) loads at the first open port: a sweep that finds
        # none never pays its import in start-up time
        from relayaudit.probe import probe  # noqa: PLC0415

        result = await probe(
            address,
            port,
            self._family_settings[6 if ":" in address else 4],
            implicit_tls=port in self.config.implicit_tls_ports,
            gate=self._pacer,
            sock=sock,
            expect_token=self._canary.expect if self._canary is not None else None,
        )
        if greylisted(result):
            # tried again near the end of the sweep (_retry_greylisted), recorded only then
            self._refs[position] += 1
            self._greylisted.append((result, position))
            return
        await self._settle(result, position)

    async def _settle(self, result: ProbeResult, position: int) -> None:
        if result.confirmation is not None and result.confirmation.sent:
            # waiting for the canary must not hold a worker; the task group still owns it
            self._refs[position] += 1
            self._group.create_task(self._confirm_later(result, position))
        else:
            await self._record(result, self._sinks)

    # -- retry after greylisting -----------------------------------------------------------

    async def _retry_greylisted(self, workers: list[asyncio.Task[None]], parallel: int) -> None:
        """Once every worker is done, each greylisted probe once more (as many at a time as
        there were workers), no sooner than relay.greylist_retry_after after its first try."""
        await asyncio.wait(workers)
        if any(not w.cancelled() and w.exception() is not None for w in workers):
            return  # the sweep is failing: the group ends it
        slots = asyncio.Semaphore(parallel)
        async with asyncio.TaskGroup() as group:
            for result, position in self._greylisted:
                group.create_task(self._retry(result, position, slots))
        self._greylisted.clear()

    async def _retry(self, first: ProbeResult, position: int, slots: asyncio.Semaphore) -> None:
        from relayaudit.probe import probe  # noqa: PLC0415 - see _probe

        address, port = first.address, first.port

        async def again(control: str | None) -> ProbeResult:
            async with slots:
                return await probe(
                    address,
                    port,
                    self._family_settings[6 if ":" in address else 4],
                    implicit_tls=port in self.config.implicit_tls_ports,
                    gate=self._pacer,
                    expect_token=self._canary.expect if self._canary is not None else None,
                    control_recipient=control,
                )

        try:
            result = await retry(first, again, after=self.config.relay.greylist_retry_after)
            await self._settle(result, position)
        finally:
            self._release(position)

    # -- confirm -------------------------------------------------------------------------

    async def _confirm_later(self, result: ProbeResult, position: int) -> None:
        try:
            result = await await_confirmation(result, self._canary, self.config.canary.wait)
            await self._record(result, self._sinks)
        finally:
            self._release(position)

    def _release(self, position: int) -> None:
        self._refs[position] -= 1
        if not self._refs[position]:
            del self._refs[position]
            self._mark.done(position)

    # -- record --------------------------------------------------------------------------

    async def _record(self, result: ProbeResult, sinks: Sequence[Sink]) -> None:
        day = approval_day(self.started, self.zone)
        verdict = judge_result(self.config, result, day=day)
        if verdict.findings:
            labels: dict[str, object] = {}
            origin = self._origins.get(result.address)
            if origin:
                labels["origin"] = origin
            if self.owners is not None:
                labels["owner"] = self.owners.lookup(result.address, result.port)
            if labels:
                verdict = verdict.model_copy(
                    update={
                        "findings": tuple(f.model_copy(update=labels) for f in verdict.findings)
                    }
                )
        stats = self.stats
        stats.probes += 1
        stats.statuses[verdict.status] += 1
        for f in verdict.findings:
            stats.findings[f.kind.value] += 1
            stats.severities[f.severity.value] += 1
            if f.kind.is_relay:
                stats.relay_findings.append(f.id)
        for sink in sinks:
            await sink.emit(result, verdict)


async def sweep(
    config: Config,
    *,
    sinks: Sequence[Sink],
    shard: Shard | None = None,
    start: int = 0,
    canary: CanaryReceiver | None = None,
    confirm: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    watermark: Watermark | None = None,
    workers: int | None = None,
    targets: TargetList | None = None,
    owners: OwnerTable | None = None,
) -> SweepStats:
    """Plan and run one sweep (see Sweep); `targets`: the lists of targets_from, already read;
    `owners`: the owner table its findings are stamped with (None: read from the config)."""
    return await Sweep(config, shard=shard, confirm=confirm, targets=targets, owners=owners).run(
        sinks=sinks,
        start=start,
        canary=canary,
        progress=progress,
        watermark=watermark,
        workers=workers,
    )
