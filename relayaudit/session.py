"""One SMTP session: a command and its reply under a watchdog, every exchange in the transcript.

`SmtpSession` implements the small `Session` protocol (observed.py) that the battery runner
and the canary sender talk to, over a Wire. Failures leave as the typed outcomes of failures.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from relayaudit.evidence import (
    Exchange,
    Reply,
    built,
    redact_command,
    shared_reply,
    writable_text,
)
from relayaudit.failures import (
    Broken,
    Confused,
    FailureKind,
    Stage,
    describe,
    failure,
    kind_of,
    reply_code,
    reply_text,
)
from relayaudit.observed import WAITING, Observed, Session, Waiting
from relayaudit.wire import PipelineConfused, Wire

if TYPE_CHECKING:
    from aiosmtplib.response import SMTPResponse

__all__ = ["WAITING", "Observed", "Session", "SmtpSession", "Waiting"]


class SmtpSession:
    """One SMTP connection of a probe; its exchanges join the transcript as one block."""

    __slots__ = (
        "_watchdog",
        "expired",
        "log",
        "observed",
        "offered",
        "pipelining",
        "refusals",
        "said_goodbye",
        "timeout",
        "waiting_since",
        "wire",
    )

    def __init__(self, wire: Wire, *, timeout: float, observed: Observed) -> None:
        self.wire = wire
        self.pipelining = False  # set by the handshake: offered, allowed, no confusion yet
        self.offered = False  # set by the handshake: offered (this EHLO) and allowed
        self.timeout = timeout  # the command timeout
        self.observed = observed
        self.log: list[Exchange] = []
        self.refusals = 0  # error replies (4xx, 5xx) on this connection so far
        self.waiting_since: float | None = None  # the command in flight was sent then
        self.expired = False  # the watchdog closed the connection: that command timed out
        self.said_goodbye = False  # a pipelined group's QUIT was answered
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def connected(self) -> bool:
        return self.wire.connected

    @property
    def pipelined(self) -> bool:
        return self.observed.pipelined

    # One timer per session instead of one per command (a per-command wait_for was a tenth of
    # a relay test's CPU): it fires at most once per timeout period, and ends the connection
    # only if the command then in flight has waited the whole timeout.
    def _sent(self, verb: str) -> None:
        self.waiting_since = time.monotonic()
        if self.observed.waiting is not None:
            self.observed.waiting.start(f"the reply to {verb}", self.timeout)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self.timeout, self._check)

    def _replied(self) -> None:
        """A reply of a pipelined group came: the next one has a whole timeout of its own."""
        if self.waiting_since is not None:
            self.waiting_since = time.monotonic()

    def _check(self) -> None:
        self._watchdog = None
        if self.waiting_since is None:
            return
        waited = time.monotonic() - self.waiting_since
        loop = asyncio.get_running_loop()
        if waited >= self.timeout:
            # decided one loop turn later: a reply read in this same turn resumes the command
            # first (and clears waiting_since) instead of losing the connection
            loop.call_soon(self._expire)
        else:
            self._watchdog = loop.call_later(self.timeout - waited, self._check)

    def _expire(self) -> None:
        if self.waiting_since is None or time.monotonic() - self.waiting_since < self.timeout:
            return
        self.expired = True
        self.wire.abort()  # the read in flight ends with SMTPServerDisconnected

    def record(
        self,
        line: str | None,
        reply: Reply | None,
        started: float,
        *,
        error: str | None = None,
        elapsed: float | None = None,
    ) -> None:
        """File one exchange; `elapsed` (ms): given when a group's replies share it."""
        if elapsed is None:
            elapsed = round((time.monotonic() - started) * 1000, 1)
        if reply is not None and reply.code >= 400:
            self.refusals += 1
        # built without validation: the values come typed from the framing and from us; only
        # the server's text needs what validation would do (writable_text)
        self.log.append(
            built(
                Exchange,
                {
                    "command": redact_command(line) if line is not None else None,
                    "reply": reply,
                    "error": writable_text(error) if error is not None else None,
                    "elapsed_ms": elapsed,
                },
            )
        )

    async def command(self, line: str) -> Reply:
        """Send one command and wait for its reply."""
        started = time.monotonic()
        verb, _, arg = line.partition(" ")
        if not self.wire.connected:
            # the server closed after its last reply (421, a hang-up after RSET): nothing is sent
            raise Broken(f"server hung up before {verb}")
        args = (verb.encode(), arg.encode("utf-8", "surrogateescape")) if arg else (verb.encode(),)
        self._sent(verb)
        try:
            response = await self.wire.command(*args)
        except asyncio.CancelledError:
            self.record(line, None, started, error="cancelled (session deadline or stop)")
            raise
        except BaseException as exc:
            kind = kind_of(exc)
            if kind is None:
                raise
            if kind is FailureKind.DISCONNECTED and self.expired:
                kind = FailureKind.TIMEOUT
            self.record(line, None, started, error=_error_text(kind, exc))
            raise failure(Stage.COMMAND, kind, exc, verb=verb, wait=self.timeout) from None
        finally:
            self.waiting_since = None
        # the reply made it, even if the watchdog ended the connection in the same instant: the
        # next command then finds a hang-up, not a timeout
        self.expired = False
        reply = shared_reply(response.code, response.message)
        self.record(line, reply, started)
        return reply

    async def pipeline(self, lines: list[str]) -> list[Reply]:
        """Send the lines in one write (RFC 2920), one exchange each in the transcript.

        A failure part-way (a hang-up, a timeout) raises Broken with the replies that came
        before it in `partial`: they are the server's answers, as in lock-step.
        """
        started = time.monotonic()
        if not self.wire.connected:
            raise Broken(f"server hung up before {lines[0].partition(' ')[0]}")
        self._sent(f"{len(lines)} pipelined commands")
        try:
            responses = await self.wire.pipeline(
                [line.encode("utf-8", "surrogateescape") + b"\r\n" for line in lines],
                on_reply=self._replied,
            )
        except asyncio.CancelledError:
            rest = lines[len(self._answered(lines, started)) :]
            self.record(
                " / ".join(rest), None, started, error="cancelled (session deadline or stop)"
            )
            raise
        except PipelineConfused as exc:
            self.record(" / ".join(lines), None, started, error=f"pipelining confused: {exc}")
            self.stop_pipelining(f"confused: {exc}")
            raise Confused(f"pipelining confused: {exc}") from None
        except BaseException as exc:
            kind = kind_of(exc)
            if kind is None:
                raise
            if kind is FailureKind.DISCONNECTED and self.expired:
                kind = FailureKind.TIMEOUT
            partial = self._answered(lines, started)
            rest = lines[len(partial) :]
            self.record(" / ".join(rest), None, started, error=_error_text(kind, exc))
            verb = rest[0].partition(" ")[0]
            broken = failure(Stage.COMMAND, kind, exc, verb=verb, wait=self.timeout)
            if isinstance(broken, Broken):
                broken.partial = partial
            raise broken from None
        finally:
            self.waiting_since = None
        self.expired = False
        self.observed.pipelined = True
        replies = self._answered(lines, started, responses)
        if lines[-1] == "QUIT" and len(responses) == len(lines):
            self.said_goodbye = True
        for line in lines[len(responses) :]:  # sent, but the server closed first (421)
            self.record(line, None, started, error="no reply: the server closed the connection")
        return replies

    def _answered(
        self, lines: list[str], started: float, responses: list[SMTPResponse] | None = None
    ) -> list[Reply]:
        """The group's replies (so far) as evidence, each in the transcript with its line."""
        replies = []
        answered = self.wire.answered if responses is None else responses
        elapsed = round((time.monotonic() - started) * 1000, 1)  # the group's, read at once
        for line, response in zip(lines, answered, strict=False):
            reply = shared_reply(response.code, response.message)
            self.record(line, reply, started, elapsed=elapsed)
            replies.append(reply)
        return replies

    @property
    def sender_groups(self) -> bool:
        return self.offered and self.observed.senders_only

    def stop_pipelining(self, reason: str, *, senders: bool = False) -> None:
        """No more whole groups, for this connection and the host's later ones; the transcript
        says why (a line of its own, no command or reply). `senders`: a refused MAIL FROM is
        why, so MAIL FROMs may still go in groups; otherwise (or later confused) lock-step."""
        self.pipelining = False
        seen = self.observed
        first = seen.lockstep is None
        if not first and not (seen.senders_only and not senders):
            return  # lock-step already, or sender groups already
        seen.senders_only = senders
        seen.lockstep = reason
        after = (
            "MAIL FROM commands in groups, a RCPT only after its MAIL's reply"
            if senders
            else "lock-step from here"
        )
        self.log.append(
            Exchange.model_construct(
                command=None,
                reply=None,
                error=writable_text(f"pipelining stopped ({reason}): {after}"),
                elapsed_ms=0.0,
            )
        )

    async def data(self, message: bytes, *, shown_as: str) -> Reply:
        """DATA and a message (the canary); the transcript shows `shown_as`, not the body."""
        started = time.monotonic()
        try:
            response = await self.wire.data(message, timeout=self.timeout)
        except BaseException as exc:
            kind = kind_of(exc)
            if kind is None or isinstance(exc, asyncio.CancelledError):
                raise
            if kind is FailureKind.REFUSED:
                # a refused message (to DATA or at its end) is the server's answer, a value:
                # the verdict reads it (a server that decides at DATA is no relay)
                reply = Reply(code=reply_code(exc), text=reply_text(exc))
                self.record(shown_as, reply, started)
                return reply
            self.record(shown_as, None, started, error=describe(exc))
            raise failure(Stage.DATA, kind, exc) from None
        reply = Reply(code=response.code, text=response.message)
        self.record(shown_as, reply, started)
        return reply

    async def quit(self) -> None:
        """Say goodbye politely, but never wait long for it (a silent QUIT is not an error).

        Past the session deadline (the task is being cancelled) there is no goodbye at all.
        """
        answered = self.said_goodbye
        try:
            task = asyncio.current_task()
            if (
                not answered
                and self.wire.connected
                and not (task is not None and task.cancelling())
            ):
                with contextlib.suppress(Broken, TimeoutError):
                    async with asyncio.timeout(min(2.0, self.timeout)):
                        await self.command("QUIT")
                        answered = True
        finally:
            self.end(abort=not answered)

    def end(self, *, abort: bool = True) -> None:
        """Close the connection and file its exchanges in the transcript.

        abort: drop it at once (the default for every end but an answered QUIT): a TLS
        connection's graceful close would wait up to 30 s for a silent server's close_notify.
        """
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if abort:
            self.wire.abort()
        self.wire.close()
        if self.log:
            self.observed.transcript.extend(self.log)
            self.log = []


def _error_text(kind: FailureKind, exc: BaseException) -> str:
    if kind is FailureKind.TIMEOUT:
        return "timeout: no reply"
    if kind is FailureKind.DISCONNECTED:
        return f"disconnected: {exc}"
    return describe(exc)
