"""The pacer's one wrapper around asyncio-throttle's private grant log, checked against upstream."""

from __future__ import annotations

import time
from collections import deque

from asyncio_throttle.throttler import Throttler

from relayaudit.pacer import _Window


def test_upstream_still_keeps_its_window_as_a_deque_flushed_in_place() -> None:
    # _Window reads Throttler._task_logs: a release that renames it, or replaces the deque
    # instead of trimming it, must fail here rather than silently unpace a sweep
    throttler = Throttler(rate_limit=2, period=0.05)
    log = throttler._task_logs
    assert isinstance(log, deque)
    log.append(time.monotonic() - 1.0)  # an expired grant
    log.append(time.monotonic())
    throttler.flush()  # type: ignore[no-untyped-call]
    assert throttler._task_logs is log and len(log) == 1


def test_a_window_grants_up_to_its_limit_then_says_how_long_to_wait() -> None:
    window = _Window(rate_limit=3, period=0.5)
    now = time.monotonic()
    assert window.free() == 3 and window.delay(now) == 0.0
    for _ in range(3):
        window.grant(now)
    assert window.free() == 0
    assert 0.45 < window.delay(now) <= 0.5
    # a grant expires after the period: the window frees up by itself
    assert window.delay(now + 0.6) <= 0.0
