"""Paces new connections: a global rate in two sliding windows and a per-/24 (or /64) reservation."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import deque

from asyncio_throttle.throttler import Throttler

__all__ = ["Pacer"]


class _Window:
    """One sliding window of grants: asyncio-throttle's Throttler, read through this class only.

    The Throttler keeps its window as a log of grant times (`_task_logs`, a private attribute);
    reading it lets the pacer sleep exactly until the oldest grant expires and grant a whole
    batch in one wake-up, where Throttler.acquire() would poll every retry_interval, once per
    caller. tests/test_pacer.py fails if an upstream release changes that log.
    """

    __slots__ = ("_log", "_throttler", "period", "rate_limit")

    def __init__(self, *, rate_limit: int, period: float) -> None:
        self._throttler = Throttler(rate_limit=rate_limit, period=period)
        self._log: deque[float] = self._throttler._task_logs
        self.rate_limit = rate_limit
        self.period = period

    def delay(self, now: float) -> float:
        """Seconds until a grant is possible (0: now)."""
        self._throttler.flush()  # type: ignore[no-untyped-call]
        log = self._log
        return log[0] + self.period - now if len(log) >= self.rate_limit else 0.0

    def free(self) -> int:
        self._throttler.flush()  # type: ignore[no-untyped-call]
        return self.rate_limit - len(self._log)

    def grant(self, now: float) -> None:
        self._log.append(now)


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
            _Window(rate_limit=max(1, int(rate)), period=max(1.0, 1 / rate)),
            _Window(rate_limit=burst, period=burst / rate),
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

    def _delay(self) -> float:
        now = time.monotonic()
        return max(window.delay(now) for window in self._windows)

    def _take(self) -> None:
        now = time.monotonic()
        for window in self._windows:
            window.grant(now)
        self._budget -= 1
        self.issued += 1

    def _free(self) -> int:
        """Slots free in both windows this instant."""
        return min(window.free() for window in self._windows)

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
