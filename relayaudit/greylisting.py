"""Greylisting seen through: which probes met it, and their one retry with the very same addresses."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from relayaudit.evidence import (
    Exchange,
    ProbeResult,
    ProbeStatus,
    TestOutcome,
    TestRole,
    built,
)

__all__ = ["control_recipient", "greylisted", "merged", "retry"]

# the deferrals greylisting answers at RCPT: 450 (Postfix with postgrey, "4.2.0 Greylisted"),
# 451 (Exim, milter-greylist, sqlgrey); 421 closes the session and 452 is a full mailbox or
# too many recipients, neither of them greylisting
_GREYLIST_CODES = {450, 451}
_GREYLIST_WORDS = re.compile(r"gr[ae]y", re.IGNORECASE)

ProbeAgain = Callable[[str | None], Awaitable[ProbeResult]]
"""Probes the same address:port again, with the given control recipient (None: a new one)."""


def greylisted(result: ProbeResult) -> bool:
    """The battery ended in temporary refusals that look like greylisting: an SMTP
    conversation, no test accepted, and the plain third-party test deferred at RCPT (450 or
    451, or any 4xx that says it is greylisting). A retry is never retried again."""
    if result.status is not ProbeStatus.SMTP or result.retried_after is not None:
        return False
    if any(
        t.outcome is TestOutcome.ACCEPTED and t.test.role is not TestRole.CONTROL
        for t in result.tests
    ):
        return False
    for t in result.tests:
        if t.test.role is not TestRole.PLAIN or t.test.claim is not None:
            continue
        reply = t.rcpt
        if (
            t.outcome is TestOutcome.TEMPFAIL
            and reply is not None
            and (reply.code in _GREYLIST_CODES or _GREYLIST_WORDS.search(reply.text))
        ):
            return True
    return False


def control_recipient(result: ProbeResult) -> str | None:
    """The control address of a probe: its retry asks for the same one (greylisting keys on
    client, sender and recipient, so a new control address would be greylisted anew)."""
    return next((t.test.rcpt_to for t in result.tests if t.test.role is TestRole.CONTROL), None)


def merged(first: ProbeResult, again: ProbeResult) -> ProbeResult:
    """The retry's result, judged on its own tests, with the first try's exchanges before its
    own in the transcript (and a line saying where the retry begins)."""
    waited = max(0.0, (again.started - first.finished).total_seconds())
    note = built(
        Exchange,
        {
            "command": None,
            "reply": None,
            "error": f"greylisting: the tests above were deferred; tried again {waited:.0f}s later",
            "elapsed_ms": 0.0,
        },
    )
    return again.model_copy(
        update={
            "started": first.started,
            "transcript": (*first.transcript, note, *again.transcript),
            "sessions": first.sessions + again.sessions,
            "retried_after": round(waited, 1),
        }
    )


async def retry(first: ProbeResult, probe_again: ProbeAgain, *, after: float) -> ProbeResult:
    """Wait until `after` seconds have passed since the first try ended, probe again with the
    same control address, and return the merged result."""
    elapsed = (datetime.now(UTC) - first.finished).total_seconds()
    if elapsed < after:
        await asyncio.sleep(after - elapsed)
    again = await probe_again(control_recipient(first))
    return merged(first, again)
