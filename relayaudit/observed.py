"""What the battery sees of a session (the `Session` protocol) and what a probe's sessions have seen (`Observed`).

`Session` is the small protocol the battery runner and the canary sender talk to (session.py
implements it over a Wire); `Observed` is the probe's evidence so far, which a deadline leaves
whole; `Waiting` is what a probe waits for right now, for `check`'s progress line.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from relayaudit.evidence import Capabilities, Exchange, PortState, Reply, SessionFacts, TlsFacts

__all__ = ["WAITING", "Observed", "Session", "Waiting"]


class Session(Protocol):
    """What the battery needs of a connection: one command at a time, and a goodbye."""

    @property
    def connected(self) -> bool: ...

    async def command(self, line: str) -> Reply:
        """Send `line`, return the reply; raises Broken when the connection fails."""
        ...

    @property
    def pipelining(self) -> bool:
        """Whether commands may go in groups (RFC 2920: the server offered PIPELINING)."""
        ...

    @property
    def pipelined(self) -> bool:
        """Whether a pipelined group was answered on this host already."""
        ...

    @property
    def refusals(self) -> int:
        """The error replies (4xx, 5xx) this connection has had so far, its hello's included."""
        ...

    async def pipeline(self, lines: list[str]) -> list[Reply]:
        """Send `lines` in one write, return their replies in order (fewer if a 421 closed
        the connection); raises Confused when the server got out of step, Broken (with the
        replies that came before the failure) when the connection fails."""
        ...

    @property
    def sender_groups(self) -> bool:
        """Whether MAIL FROMs may still go in groups of their own, each followed by RSET and
        never by a RCPT: the server offers PIPELINING, and only a refused MAIL FROM ended
        whole groups on this host."""
        ...

    def stop_pipelining(self, reason: str, *, senders: bool = False) -> None:
        """No more whole groups, on this connection and the host's later ones; `senders`: a
        refused MAIL FROM is why, so MAIL FROMs may still go in groups (sender_groups),
        else lock-step from here."""
        ...

    async def data(self, message: bytes, *, shown_as: str) -> Reply:
        """DATA and a message; the final reply, a refusal too; raises Broken when the
        connection fails."""
        ...

    async def quit(self) -> None:
        """QUIT (unless a pipelined group ended with it, answered) and close."""
        ...


class Waiting:
    """What a probe waits for right now, for `check`'s progress line on a terminal: set at the
    connect, the greeting, the answer to QUIT and each command (only when a probe is given one)."""

    __slots__ = ("idle", "limit", "since", "what", "where")

    def __init__(self) -> None:
        self.where = ""  # the address:port probed
        self.what = ""  # "the greeting", "the reply to RCPT"; empty: nothing
        self.since = 0.0  # time.monotonic() when the wait began
        self.limit = 0.0  # seconds it may last
        self.idle: Callable[[], None] | None = None  # called when a probe ends

    def start(self, what: str, limit: float) -> None:
        self.what, self.since, self.limit = what, time.monotonic(), limit

    def done(self) -> None:
        """The probe ended: nothing is waited for."""
        self.what = ""
        if self.idle is not None:
            self.idle()

    def line(self) -> str | None:
        """`192.0.2.1:25: waiting for the greeting, 12 s of 30 s`, or None between waits."""
        if not self.what:
            return None
        waited = min(time.monotonic() - self.since, self.limit)
        return f"{self.where}: waiting for {self.what}, {waited:.0f} s of {self.limit:g} s"


# set by `check` on a terminal: each probe in this context keeps it told what it waits for
WAITING: contextvars.ContextVar[Waiting | None] = contextvars.ContextVar("WAITING", default=None)


@dataclass
class Observed:
    """What a probe's sessions have seen so far: a deadline still leaves all of it."""

    helo: str  # the HELO name in use: the configured one, or the literal it fell back to
    vantage: str = ""
    port_state: PortState = PortState.ERROR
    banner_seen: bool = False
    sessions: int = 0
    transcript: list[Exchange] = field(default_factory=list)
    facts: SessionFacts | None = None
    tls: TlsFacts | None = None
    after_starttls: Capabilities | None = None  # the first EHLO reply inside STARTTLS
    pipelined: bool = False  # some commands went in pipelined groups (RFC 2920)
    lockstep: str | None = None  # why pipelining stopped for this host, if it did
    # a refused MAIL FROM stopped whole groups, nothing else: MAIL FROMs still go in groups
    senders_only: bool = False
    waiting: Waiting | None = None  # told what the probe waits for (`check` on a terminal)
