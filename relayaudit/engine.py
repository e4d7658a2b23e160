"""Runs a sweep: one pacer, a bounded worker pool, discovery then each open port's probe, canary waits."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from asyncio_throttle.throttler import Throttler

from relayaudit.config import Config
from relayaudit.connect import (
    Dialer,
    InProgress,
    NoSession,
    finish_connect,
    open_socket,
    unreachable,
)
from relayaudit.errors import RelayAuditError
from relayaudit.evidence import ProbeResult, ProbeStatus
from relayaudit.settings import CanaryTarget, ProbeSettings
from relayaudit.targets import Shard, TargetSpace
from relayaudit.verdict import Verdict, VerdictStatus, judge

if TYPE_CHECKING:  # the receiver (aiosmtpd) is imported only where confirmation mode runs
    from relayaudit.canary import CanaryReceiver

_UNREACHABLE_STATUS = {
    ProbeStatus.CLOSED: VerdictStatus.CLOSED,
    ProbeStatus.FILTERED: VerdictStatus.FILTERED,
    ProbeStatus.ERROR: VerdictStatus.ERROR,
}

__all__ = ["Pacer", "Sink", "SweepStats", "Watermark", "judge_result", "probe_settings", "sweep"]

Connect = socket.socket | NoSession | InProgress  # what Dialer.connect_now settled
_YIELD_EVERY = 64  # addresses a worker settles without awaiting before it lets others run


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
    return ProbeSettings(
        helo_name=config.identity.helo_name,
        source_address=str(config.source_address) if config.source_address else None,
        connect_timeout=config.timeouts.connect,
        command_timeout=config.timeouts.command,
        greeting_timeout=config.timeouts.greeting_wait,
        session_timeout=config.timeouts.session,
        max_tests_per_session=config.relay.max_tests_per_session,
        sessions_per_host=config.relay.sessions_per_host,
        retest_after_starttls=config.relay.retest_after_starttls,
        campus_domains=config.relay.campus_domains,
        external_domains=config.relay.external_domains,
        external_local_part=config.relay.external_local_part,
        sender_local_part=config.relay.sender_local_part,
        canary=CanaryTarget(
            local_part=config.canary.local_part,
            domain=config.canary.domain,
            contact=config.identity.contact,
        )
        if use_canary
        else None,
    )


def unreachable_verdict(result: ProbeResult) -> Verdict:
    """The verdict of a closed, filtered or failed connect, built without validation (hot path)."""
    status = _UNREACHABLE_STATUS[result.status]
    return Verdict.model_construct(
        address=result.address,
        port=result.port,
        status=status,
        summary=result.error or status.value,
        findings=(),
    )


def judge_result(config: Config, result: ProbeResult) -> Verdict:
    approved = config.is_approved(ipaddress.ip_address(result.address), result.port)
    return judge(
        result,
        approved=approved is not None,
        approved_note=approved.note if approved is not None else None,
    )


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


class Pacer:
    """The one place connection rates are enforced.

    A single task takes slots from two asyncio-throttle windows -- at most `rate` in any second,
    and at most `rate/20` in any 50 ms, so the second's worth never leaves in one burst -- and
    grants them to waiting workers in arrival order: thousands of workers sleep on a future
    instead of each polling the throttle. The task itself sleeps exactly until the oldest slot expires
    rather than polling at the throttle's retry interval. The per-/24 cap is a reservation: each
    connection books the next free slot of its subnet and sleeps exactly until then.
    """

    def __init__(self, rate: float, subnet_rate: float) -> None:
        burst = max(1, round(rate / 20))
        self._windows = (
            Throttler(rate_limit=max(1, int(rate)), period=max(1.0, 1 / rate)),
            Throttler(rate_limit=burst, period=burst / rate),
        )
        self._subnet_gap = 1.0 / subnet_rate
        # a subnet can never get more than the global rate: then its cap cannot bind
        self._subnet_binds = subnet_rate < rate
        self._next_slot: dict[str, float] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()
        # slots known free in both windows: a lower bound (windows only empty out as time
        # passes, and every grant goes through _take), so try_now flushes only when it runs out
        self._budget = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.issued = 0

    # asyncio-throttle keeps each window as a log of grant times; reading it lets the pacer
    # sleep exactly until the oldest grant expires and grant a whole batch in one wake-up,
    # where Throttler.acquire() would poll every retry_interval, once per caller.
    def _delay(self) -> float:
        delay = 0.0
        now = time.monotonic()
        for window in self._windows:
            window.flush()  # type: ignore[no-untyped-call]
            log: deque[float] = window._task_logs
            if len(log) >= window.rate_limit:
                delay = max(delay, log[0] + window.period - now)
        return delay

    def _take(self) -> None:
        now = time.monotonic()
        for window in self._windows:
            window._task_logs.append(now)
        self._budget -= 1
        self.issued += 1

    def _free(self) -> int:
        """Slots free in both windows this instant."""
        free = []
        for window in self._windows:
            window.flush()  # type: ignore[no-untyped-call]
            free.append(window.rate_limit - len(window._task_logs))
        return min(free)

    async def _produce(self) -> None:
        while True:
            while not self._waiters:
                self._wake.clear()
                await self._wake.wait()
            delay = self._delay()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            while self._waiters and self._delay() <= 0:
                waiter = self._waiters.popleft()
                if not waiter.done():  # a cancelled waiter takes no slot
                    self._take()
                    waiter.set_result(None)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._produce(), name="pacer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def try_now(self, address: str) -> bool:
        """Take a slot for `address` if one is free this instant (nobody waiting, both windows
        and the subnet's reservation open); False means await the pacer instead."""
        if self._waiters:
            return False
        if self._budget <= 0:
            self._budget = self._free()
            if self._budget <= 0:
                return False
        if self._subnet_binds:
            subnet = _subnet_key(address)
            now = time.monotonic()
            if self._next_slot.get(subnet, 0.0) > now:
                return False
            self._book(subnet, now)
        self._take()
        return True

    async def __call__(self, address: str) -> None:
        if self._subnet_binds:
            await self._subnet_slot(address)
        if not self._waiters and self._delay() <= 0:
            self._take()  # a free slot and nobody ahead: no future, no task switch
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        await waiter

    async def _subnet_slot(self, address: str) -> None:
        now = time.monotonic()
        slot = self._book(_subnet_key(address), now)
        if slot > now:
            await asyncio.sleep(slot - now)

    def _book(self, subnet: str, now: float) -> float:
        """Reserve the subnet's next free slot; the time it starts."""
        slot = max(now, self._next_slot.get(subnet, 0.0))
        self._next_slot[subnet] = slot + self._subnet_gap
        if len(self._next_slot) > 65536:
            self._next_slot = {k: v for k, v in self._next_slot.items() if v > now}
        return slot


def _subnet_key(address: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) a per-subnet rate applies to."""
    if ":" in address:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return address.rpartition(".")[0]


@dataclass
class Watermark:
    """Tracks out-of-order completions; `low` = every position below it is done (resume point)."""

    low: int = 0
    _done: set[int] = field(default_factory=set)

    def done(self, position: int) -> None:
        self._done.add(position)
        while self.low in self._done:
            self._done.discard(self.low)
            self.low += 1


@dataclass
class SweepStats:
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished: datetime | None = None
    hosts: int = 0
    probes: int = 0
    statuses: Counter[VerdictStatus] = field(default_factory=Counter)
    findings: Counter[str] = field(default_factory=Counter)

    @property
    def relays(self) -> int:
        return sum(n for s, n in self.statuses.items() if s.is_relay)

    def to_json(self) -> dict[str, Any]:
        return {
            "started": self.started.isoformat(),
            "finished": (self.finished or self.started).isoformat(),
            "hosts": self.hosts,
            "probes": self.probes,
            "statuses": {k.value: v for k, v in self.statuses.items()},
            "findings": dict(self.findings),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepStats:
        return cls(
            started=datetime.fromisoformat(data["started"]),
            finished=datetime.fromisoformat(data["finished"]),
            hosts=int(data["hosts"]),
            probes=int(data["probes"]),
            statuses=Counter({VerdictStatus(k): int(v) for k, v in data["statuses"].items()}),
            findings=Counter({str(k): int(v) for k, v in data["findings"].items()}),
        )

    @classmethod
    def merge(cls, parts: Sequence[SweepStats]) -> SweepStats:
        merged = cls(started=min(p.started for p in parts))
        merged.finished = max((p.finished or p.started) for p in parts)
        for p in parts:
            merged.hosts += p.hosts
            merged.probes += p.probes
            merged.statuses.update(p.statuses)
            merged.findings.update(p.findings)
        return merged


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
) -> SweepStats:
    """Probe every (address, port) of the shard once; each judged result goes to every sink."""
    space = TargetSpace(config.targets, config.exclude, seed=config.seed)
    total = space.shard_size(shard)
    settings = probe_settings(config, confirm=confirm)
    if settings.canary is not None and canary is None:
        raise ValueError("confirmation mode needs a running canary receiver")
    pacer = Pacer(config.limits.rate, config.limits.subnet_rate)
    stats = SweepStats()
    mark = watermark or Watermark(low=start)
    work: Iterator[tuple[int, str]] = space.iter_shard_text(shard, start=start)
    # A position counts as done (for the resume watermark) only once its results reached the
    # sinks, including those whose canary is still awaited: each holds a reference.
    refs: dict[int, int] = {}
    group = asyncio.TaskGroup()

    def release(position: int) -> None:
        refs[position] -= 1
        if not refs[position]:
            del refs[position]
            mark.done(position)

    async def finish_later(result: ProbeResult, position: int) -> None:
        try:
            await finish(result)
        finally:
            release(position)

    done_hosts = start
    unreachable_sinks = [s for s in sinks if getattr(s, "wants_unreachable", True)]

    async def finish(result: ProbeResult) -> None:
        result = await await_confirmation(result, canary, config.canary.wait)
        verdict = judge_result(config, result)
        await deliver(result, verdict, sinks)

    async def deliver(result: ProbeResult, verdict: Verdict, to: Sequence[Sink]) -> None:
        stats.probes += 1
        stats.statuses[verdict.status] += 1
        for f in verdict.findings:
            stats.findings[f.kind.value] += 1
        for sink in to:
            await sink.emit(result, verdict)

    async def host(address: str, position: int, pre: list[Connect | None]) -> None:
        # discovery of all ports at once (what connect_now settled in the worker, the rest here);
        # then each open port's probe, one port after another
        async def connect(
            port: int, outcome: Connect | None
        ) -> tuple[int, socket.socket | NoSession]:
            if outcome is None:  # no free pacer slot in the worker: wait for one here
                await pacer(address)
                source, timeout = settings.source_address, settings.connect_timeout
                return port, await open_socket(address, port, source=source, timeout=timeout)
            if isinstance(outcome, InProgress):
                outcome = await finish_connect(
                    outcome, address, port, timeout=settings.connect_timeout
                )
            return port, outcome

        # discovery sockets not yet handed to probe(), which owns each one from then on
        unclaimed: list[socket.socket] = [
            o.sock if isinstance(o, InProgress) else o
            for o in pre
            if isinstance(o, socket.socket | InProgress)
        ]
        try:
            found: Sequence[tuple[int, socket.socket | NoSession]]
            if len(config.ports) == 1:
                # no task per connect when there is one port
                found = [await connect(config.ports[0], pre[0])]
            else:
                found = await asyncio.gather(
                    *(connect(p, o) for p, o in zip(config.ports, pre, strict=True))
                )
            unclaimed = [o for _, o in found if isinstance(o, socket.socket)]
            vantage = settings.source_address or "default"
            for port, outcome in found:
                if isinstance(outcome, NoSession):
                    if not unreachable_sinks:
                        stats.probes += 1
                        stats.statuses[_UNREACHABLE_STATUS[outcome.status]] += 1
                        continue
                    result = unreachable(address, port, outcome, vantage=vantage)
                    await deliver(result, unreachable_verdict(result), unreachable_sinks)
                    continue
                unclaimed.remove(outcome)
                # the SMTP client (aiosmtplib, email) loads at the first open port: a sweep
                # that finds none never pays its import in start-up time
                from relayaudit.probe import probe  # noqa: PLC0415

                result = await probe(
                    address,
                    port,
                    settings,
                    implicit_tls=port in config.implicit_tls_ports,
                    gate=pacer,
                    sock=outcome,
                )
                if result.confirmation is not None and result.confirmation.sent:
                    # waiting for the canary must not hold a worker; the task group still owns it
                    refs[position] += 1
                    group.create_task(finish_later(result, position))
                else:
                    await finish(result)
        finally:
            # a cancelled or failed host leaves no discovery connection open
            for sock in unclaimed:
                sock.close()

    def settled_closed(pre: list[Connect | None]) -> bool:
        """Every port refused or unreachable at once, and no sink wants those: only counted."""
        if unreachable_sinks:
            return False
        for outcome in pre:
            if not isinstance(outcome, NoSession):
                return False
        statuses = stats.statuses
        for outcome in pre:
            statuses[_UNREACHABLE_STATUS[outcome.status]] += 1  # type: ignore[union-attr]
        stats.probes += len(pre)
        return True

    async def worker() -> None:
        nonlocal done_hosts
        confirming = settings.canary is not None
        in_a_row = 0
        ports = config.ports
        only_port = ports[0] if len(ports) == 1 else None
        for position, addr in work:
            # the fast path of a sweep, where most addresses refuse: a free pacer slot and a
            # connect the kernel answers at once settle an address without a single await
            pre: list[Connect | None]
            if only_port is not None:  # (no comprehension frame per address)
                pre = [dialer.connect_now(addr, only_port) if pacer.try_now(addr) else None]
            else:
                pre = [dialer.connect_now(addr, p) if pacer.try_now(addr) else None for p in ports]
            if settled_closed(pre):
                stats.hosts += 1
                done_hosts += 1
                mark.done(position)
                if progress is not None:
                    progress(done_hosts, total)
                in_a_row += 1
                if in_a_row >= _YIELD_EVERY:
                    in_a_row = 0
                    await asyncio.sleep(0)  # let the other workers, timers and signals run
                continue
            in_a_row = 0
            if confirming:
                refs[position] = 1
            await host(addr, position, pre)
            stats.hosts += 1
            done_hosts += 1
            if confirming:
                release(position)
            else:
                mark.done(position)
            if progress is not None:
                progress(done_hosts, total)

    # one for the whole sweep: its connect_now never awaits, so workers never share a socket
    dialer = Dialer(source=settings.source_address)
    pacer.start()
    try:
        async with group:
            for _ in range(max(1, min(workers or config.limits.concurrency, total))):
                group.create_task(worker())
    except BaseExceptionGroup as failed:
        # a sink that cannot write (state store locked or full, findings file) ends the sweep;
        # the caller gets that error, with its clear message, not a group around it
        ours = next((e for e in failed.exceptions if isinstance(e, RelayAuditError)), None)
        if ours is None:
            raise
        raise ours from None
    finally:
        dialer.close()
        await pacer.stop()
    stats.finished = datetime.now(UTC)
    return stats
