"""Sessions that claim an identity the scanner is not (a HELO name, an XCLIENT address), a few tests each."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from relayaudit.evidence import Claim, RelayTest, TestOutcome, TestResult, Transport
from relayaudit.failures import SessionFailure
from relayaudit.runner import Limits, run_battery
from relayaudit.session import Session

__all__ = ["ClaimOpener", "run_claims"]

ClaimOpener = Callable[[Transport, Claim], Awaitable[Session]]
"""Opens a fresh session of the given transport that claims the identity (handshake done)."""


async def run_claims(
    claims: Sequence[tuple[Claim, list[RelayTest]]],
    transport: Transport,
    *,
    opener: ClaimOpener,
    limits: Limits,
    results: list[TestResult],
) -> None:
    """One short session per claimed identity, in order, each running its tests (at most
    `limits.tests_per_session` a session, one reconnect after a 421 or a hang-up).

    Stops at the first identity a test of which was accepted: that one is the finding, and
    the server has been pretended at enough. A session the server refuses to open (the
    claimed EHLO name refused, XCLIENT not honoured) leaves its tests as errors saying why.
    """
    for claim, tests in claims:
        try:
            first = await opener(transport, claim)
        except SessionFailure as exc:
            results.extend(
                TestResult(
                    test=t, transport=transport, outcome=TestOutcome.ERROR, error=f"{claim}: {exc}"
                )
                for t in tests
            )
            continue
        mark = len(results)

        async def reopen(t: Transport, claim: Claim = claim) -> Session:
            return await opener(t, claim)

        await run_battery(
            tests,
            transport,
            first,
            opener=reopen,
            limits=Limits(
                tests_per_session=limits.tests_per_session,
                parallel_sessions=1,
                reconnects=min(1, limits.reconnects),
            ),
            results=results,
        )
        if any(r.outcome is TestOutcome.ACCEPTED for r in results[mark:]):
            return
