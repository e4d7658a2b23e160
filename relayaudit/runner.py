"""Runs the relay battery over sessions: at most N tests per connection, reconnects and retry rules.

What one connection does with its tests is session_tests.py. Written against the small
`Session` protocol (session.py), so tests replay recorded server bytes through it with no
socket (tests/test_replay.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relayaudit.evidence import RelayTest, TestResult, Transport
from relayaudit.failures import SessionFailure
from relayaudit.session import Session
from relayaudit.session_tests import ERROR_BUDGET, Battery, session_tests

__all__ = ["Limits", "Opener", "run_battery"]

Opener = Callable[[Transport], Awaitable[Session]]
"""Opens a fresh session of the given transport (greeting, EHLO, STARTTLS done)."""


@dataclass(frozen=True, slots=True)
class Limits:
    tests_per_session: int
    parallel_sessions: int  # sessions of one battery at a time
    reconnects: int  # fresh connections beyond the first


async def run_battery(
    tests: list[RelayTest],
    transport: Transport,
    first: Session | None,
    *,
    opener: Opener,
    limits: Limits,
    results: list[TestResult],
) -> None:
    """Run every test, at most N per session, in up to `parallel_sessions` sessions at once.

    A session hung up on, or answering 421, hands its unfinished tests back for a fresh
    connection. Results are appended to `results` in battery order, whichever session ran them.
    """
    wanted = -(-len(tests) // limits.tests_per_session)  # sessions needed without failures
    parallel = max(1, min(limits.parallel_sessions, wanted))
    state = Battery(
        queue=deque(tests),
        transport=transport,
        results=results,
        # as many connections as before parallel sessions: the first plus the reconnects
        sessions_left=limits.reconnects + (first is None),
        # more tests per session than the budget allows: the operator's choice, no budget
        error_budget=ERROR_BUDGET if limits.tests_per_session <= ERROR_BUDGET else None,
    )
    order = {t.id: i for i, t in enumerate(tests)}
    mark = len(results)
    try:
        if parallel == 1:
            await _worker(state, first, opener, limits.tests_per_session)
        else:
            async with asyncio.TaskGroup() as group:
                group.create_task(_worker(state, first, opener, limits.tests_per_session))
                for _ in range(parallel - 1):
                    group.create_task(_worker(state, None, opener, limits.tests_per_session))
        reason = state.stop or state.last_failure
        while state.queue:
            state.error(state.queue.popleft(), reason)
    finally:
        results[mark:] = sorted(results[mark:], key=lambda r: order.get(r.test.id, 0))


async def _worker(state: Battery, session: Session | None, opener: Opener, per: int) -> None:
    """One connection at a time: claim up to `per` tests, run them, hand back what is unfinished."""
    try:
        while state.queue and state.stop is None:
            # the tests are claimed before a connection is opened for them: a worker never opens
            # one only to find that the others took the rest meanwhile
            claimed = [state.queue.popleft() for _ in range(min(per, len(state.queue)))]
            if session is None:
                if state.sessions_left <= 0:
                    state.queue.extendleft(reversed(claimed))
                    state.last_failure = "not run: too many reconnects"
                    return
                state.sessions_left -= 1
                try:
                    session = await opener(state.transport)
                except (SessionFailure, OSError) as exc:
                    state.queue.extendleft(reversed(claimed))
                    state.last_failure = f"not run: reconnect failed: {exc}"
                    return
                if state.stop is not None:
                    state.queue.extendleft(reversed(claimed))
                    break
            unfinished = await session_tests(session, claimed, state)
            state.queue.extendleft(reversed(unfinished))
            await session.quit()
            session = None
    finally:
        if session is not None:
            await session.quit()  # at the deadline: closed at once, no goodbye


