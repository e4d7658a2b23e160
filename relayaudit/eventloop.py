"""Which event loop runs relayaudit: uvloop when it is installed and allowed, else asyncio's own.

uvloop is an optional speed-up (`pip install 'relayaudit[speed]'`): its transports and timers are
C, and the relay battery, one aiosmtplib command at a time, is bound by exactly that per-command
event-loop work (bench/run.py: about a quarter less CPU per relay-tested host). Discovery gains
nothing from it (its hot path makes no event-loop calls). `limits.event_loop` picks: "auto" (the
default) uses uvloop if importable, "asyncio" never does, "uvloop" requires it.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from relayaudit.errors import ConfigError

__all__ = ["EventLoopChoice", "loop_factory", "loop_name", "run"]

EventLoopChoice = Literal["auto", "asyncio", "uvloop"]
T = TypeVar("T")


def loop_factory(choice: EventLoopChoice) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None for asyncio's default loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional: only where installed
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "limits.event_loop: 'uvloop' is not installed (pip install 'relayaudit[speed]', "
                'or set event_loop = "auto")'
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """ "uvloop" or "asyncio", for logs and summaries."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


# The first generation's threshold: the cyclic collector runs after this many allocations net.
# At Python's default (700) it ran every few relay tests, each time walking every young object.
# A probe builds no reference cycles (tests/test_gc.py), but hostile peers of the canary receiver
# do: under attack, at 500,000, the daemon grew 51 MB before a collection
# (tests/test_canary_receiver.py), so the daemon and everything else run at 50,000.
GC_THRESHOLD = (50_000, 20, 100)
# A one-shot sweep with no canary receiver only probes: its collections found nothing and walked
# the probes in flight (1,024 of them, 300-500 objects each: four walks of 15-55 ms a process in
# the instant bench, and pauses every probe waits out). Its first generation is larger, a net
# for cycles a rare path may still build, bounded at this many objects (some tens of MB).
SWEEP_YOUNG = 500_000


def run(
    main: Coroutine[Any, Any, T], choice: EventLoopChoice = "auto", *, young: int | None = None
) -> T:
    """asyncio.run, on the chosen loop, with the collector tuned for many short-lived objects.

    What exists before the loop starts (modules, pydantic schemas, the config) lives as long
    as the process: it is frozen out of the collector's sight, and the first generation is
    larger, so the replies and transcript lines of a sweep, nearly all freed by reference
    counting, no longer trigger a scan of the heap every few hundred allocations
    (docs/benchmark.md: about a fifth of a relay test's CPU). No collection first: it would
    cost each process 15 ms to free the few cycles start-up left.
    """
    gc.freeze()
    gc.set_threshold(young or GC_THRESHOLD[0], *GC_THRESHOLD[1:])
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
