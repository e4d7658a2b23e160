"""A finding's alerts raised by real sweeps in a state store, and the dispatcher run until the outbox is empty."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta

from factories import ADDR, T0, make_finding, observe

from relayaudit.alerts import Dispatcher
from relayaudit.config import AlertsConfig
from relayaudit.evidence import Exchange, Reply
from relayaudit.progress import SweepStats
from relayaudit.state import Alert, StateStore
from relayaudit.verdict import Severity, VerdictStatus

__all__ = ["deliver", "sweep_days"]

_TRANSCRIPT = (
    Exchange(command=None, reply=Reply(code=220, text="mx.campus.test ESMTP")),
    Exchange(command="RCPT TO:<relaytest@relay-test.example>", reply=Reply(code=250, text="Ok")),
)


def sweep_days(
    store: StateStore, severities: Sequence[Severity | None], *, first_day: int = 0, port: int = 25
) -> list[Alert]:
    """One completed sweep a day from T0 + `first_day`: the open relay on ADDR:`port` seen with
    each severity, or (None) refusing to relay; the alerts these sweeps raised, in order.

    With `resolve_after=2`, [MEDIUM, CRITICAL, None, None] raises new, severity-raised, resolved.
    """
    alerts: list[Alert] = []
    for offset, severity in enumerate(severities):
        when = T0 + timedelta(days=first_day + offset)
        record = store.begin_sweep(shard="0/1", config_fingerprint="fp", total=1)
        if severity is None:
            seen = observe(port=port, when=when, status=VerdictStatus.RELAY_REFUSED)
        else:
            finding = make_finding(
                port=port,
                severity=severity,
                when=when,
                title=f"Open relay on {ADDR}:{port}",
                summary="3 of the relay tests accepted.",
                transcript=_TRANSCRIPT,
            )
            seen = observe(finding, port=port, when=when)
        alerts += store.record(record.id, *seen)
        store.complete_sweep(record.id, SweepStats())
    return alerts


async def deliver(store: StateStore, config: AlertsConfig, *, timeout: float = 20.0) -> Dispatcher:
    """Run a dispatcher until nothing is pending (retries included: keep the config's backoff
    short); the dispatcher, for its counters."""
    dispatcher = Dispatcher(store, config)
    async with asyncio.timeout(timeout):
        while store.outbox_counts()["pending"]:
            if await dispatcher.run_once() == 0:
                await asyncio.sleep(0.02)  # a failed attempt: its retry is due after the backoff
    return dispatcher
