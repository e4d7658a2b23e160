"""The one exception map of a probe: every failure of a connection or session, as a typed outcome.

Third-party exceptions (aiosmtplib, ssl, OSError) are translated here and nowhere else
(`kind_of`), and `OUTCOMES` says, for each stage of a session and each kind of failure, what
it means: no session at all (a probe status) or a broken connection (fatal or not). Anything
that is not a known kind is a bug of ours and surfaces as `internal-error` (probe.py).
"""

from __future__ import annotations

import functools
import re
import ssl
from dataclasses import dataclass
from enum import StrEnum

from relayaudit.errors import ProbeError
from relayaudit.evidence import PortState, ProbeStatus, Reply, writable_text

__all__ = [
    "OUTCOMES",
    "QUIT_ANSWER_BYTES",
    "QUIT_ANSWER_WAIT",
    "Broken",
    "Confused",
    "FailureKind",
    "NoSession",
    "Rule",
    "SessionFailure",
    "Stage",
    "answer_to_quit",
    "describe",
    "failure",
    "kind_of",
    "outcome",
    "reply_code",
    "reply_text",
    "rule_for",
]


class SessionFailure(ProbeError):
    """A connection or session ended in a known network outcome (a value, never a crash)."""


class NoSession(SessionFailure):
    """No SMTP session could be set up: the status says why."""

    def __init__(self, status: ProbeStatus, reason: str, port_state: PortState) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.port_state = port_state


class Broken(SessionFailure):
    """The current SMTP connection is unusable; `fatal` means do not reconnect either."""

    def __init__(self, reason: str, *, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal
        # a pipelined group's replies that came before the failure, in order
        self.partial: list[Reply] = []


class Confused(Broken):
    """A pipelined group went out of step (RFC 2920): the connection is closed; the battery
    goes on in lock-step on a fresh one."""


class Stage(StrEnum):
    TLS_HANDSHAKE = "tls-handshake"  # implicit TLS (port 465): the handshake before the greeting
    GREETING = "greeting"  # the TCP/TLS connection is up; waiting for the 220
    # the greeting wait ended with nothing received: QUIT sent, its answer read (a service
    # that waits for the client to speak first, HTTP or TLS, answers that; a tarpit does not)
    SILENCE = "after-silence"
    HELLO = "hello"  # EHLO and HELO both refused
    STARTTLS = "starttls"
    COMMAND = "command"  # EHLO, HELO, MAIL, RCPT, RSET, QUIT
    DATA = "data"  # the canary message (confirmation mode)


class FailureKind(StrEnum):
    TIMEOUT = "timeout"  # no (complete) reply within the wait
    DISCONNECTED = "disconnected"  # the server closed the connection
    REFUSED = "refused"  # a well-formed SMTP error reply (5xx greeting, HELO 5xx, STARTTLS 454)
    MALFORMED = "malformed"  # bytes that are not an SMTP reply (bad code, too long, garbage)
    TRANSPORT = "transport"  # a socket or TLS error, or a command we could not even send
    LATE_REPLY = "late-reply"  # an SMTP reply, but only after its wait had ended


_Types = type[BaseException] | tuple[type[BaseException], ...]


@functools.cache
def _exceptions() -> tuple[tuple[_Types, FailureKind], ...]:
    """The exception map; ordered, the first match wins (SMTPTimeoutError is an SMTPException).

    Built at the first failure: discovery, which never meets one, never loads the SMTP client.
    """
    import aiosmtplib  # noqa: PLC0415

    return (
        ((aiosmtplib.SMTPTimeoutError, TimeoutError), FailureKind.TIMEOUT),
        (aiosmtplib.SMTPServerDisconnected, FailureKind.DISCONNECTED),
        (aiosmtplib.SMTPResponseException, FailureKind.REFUSED),  # MALFORMED by code, below
        ((aiosmtplib.SMTPException, OSError, ssl.SSLError, ValueError), FailureKind.TRANSPORT),
    )


def kind_of(exc: BaseException) -> FailureKind | None:
    """The kind of a network failure, or None when `exc` is no known one (a bug: internal-error)."""
    for types, kind in _exceptions():
        if isinstance(exc, types):
            if kind is FailureKind.REFUSED and not 200 <= reply_code(exc) <= 599:
                return FailureKind.MALFORMED
            return kind
    return None


def _reply(exc: BaseException) -> tuple[int, str] | None:
    code, message = getattr(exc, "code", None), getattr(exc, "message", None)
    if isinstance(code, int) and isinstance(message, str):  # aiosmtplib.SMTPResponseException
        return code, message
    return None


def reply_code(exc: BaseException) -> int:
    reply = _reply(exc)
    return reply[0] if reply is not None else -1


def reply_text(exc: BaseException) -> str:
    reply = _reply(exc)
    return reply[1] if reply is not None else str(exc)


def describe(exc: BaseException) -> str:
    """`SMTPServerDisconnected: Connection lost`, as a transcript line shows a failure."""
    reply = _reply(exc)
    if reply is not None:
        return f"{type(exc).__name__}: {reply[0]} {reply[1]}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


@dataclass(frozen=True, slots=True)
class Rule:
    """What one kind of failure at one stage means.

    `status` set: there is no session (the probe's status); else the connection is broken and
    `fatal` says whether reconnecting may help. `reason` is formatted with `verb` (the command),
    `wait` (seconds), `detail` (describe(exc)) and `text` (the server's reply text, cut short).
    """

    reason: str
    status: ProbeStatus | None = None
    fatal: bool = True


_NO_GREETING = Rule("hung up before the greeting: {detail}", ProbeStatus.NO_BANNER)
_SILENT = Rule("no greeting within {wait:g}s; {detail}", ProbeStatus.NO_BANNER)

OUTCOMES: dict[tuple[Stage, FailureKind], Rule] = {
    (Stage.TLS_HANDSHAKE, FailureKind.TIMEOUT): Rule(
        "no greeting within {wait:g}s", ProbeStatus.NO_BANNER
    ),
    (Stage.GREETING, FailureKind.TIMEOUT): Rule(
        "no greeting within {wait:g}s", ProbeStatus.NO_BANNER
    ),
    (Stage.GREETING, FailureKind.DISCONNECTED): _NO_GREETING,
    (Stage.GREETING, FailureKind.TRANSPORT): _NO_GREETING,
    (Stage.GREETING, FailureKind.REFUSED): Rule("greeting {text}", ProbeStatus.SESSION_REFUSED),
    (Stage.GREETING, FailureKind.MALFORMED): Rule(
        "not an SMTP greeting: {text}", ProbeStatus.NOT_SMTP
    ),
    # after a silent greeting wait: what the server answered to QUIT (answer_to_quit); a
    # MALFORMED answer is anything no SMTP server says (HTTP, a TLS record, a TLS handshake
    # where plaintext was expected), a LATE_REPLY an SMTP reply after the wait had ended
    (Stage.SILENCE, FailureKind.TIMEOUT): _SILENT,
    (Stage.SILENCE, FailureKind.DISCONNECTED): _SILENT,
    (Stage.SILENCE, FailureKind.TRANSPORT): _SILENT,
    (Stage.SILENCE, FailureKind.MALFORMED): Rule(
        "not SMTP: no greeting within {wait:g}s, then {detail}", ProbeStatus.NOT_SMTP
    ),
    (Stage.SILENCE, FailureKind.LATE_REPLY): Rule(
        "no greeting within {wait:g}s, then {detail}: greets late; raise timeouts.greeting",
        ProbeStatus.NO_BANNER,
    ),
    (Stage.STARTTLS, FailureKind.REFUSED): Rule("STARTTLS refused"),
    (Stage.COMMAND, FailureKind.TIMEOUT): Rule("no reply to {verb} within {wait:g}s"),
    (Stage.COMMAND, FailureKind.DISCONNECTED): Rule("server hung up after {verb}", fatal=False),
    (Stage.COMMAND, FailureKind.MALFORMED): Rule("unreadable reply to {verb}: {text}"),
    (Stage.COMMAND, FailureKind.REFUSED): Rule("unreadable reply to {verb}: {text}"),
    (Stage.COMMAND, FailureKind.TRANSPORT): Rule("{verb} failed: {detail}"),
    # a refused message is no failure: session.data returns the refusal as the reply
}
# every other kind at these stages: one rule for the stage
_STAGE_DEFAULT = {
    Stage.TLS_HANDSHAKE: Rule("implicit TLS failed: {detail}", ProbeStatus.NOT_SMTP),
    Stage.HELLO: Rule("HELO refused: {text}", ProbeStatus.SESSION_REFUSED),
    Stage.STARTTLS: Rule("STARTTLS handshake failed"),
    Stage.DATA: Rule("message not accepted: {detail}"),
    Stage.SILENCE: _SILENT,
}
# a kind that belongs to one stage, met at another: a reply out of step breaks the connection
_KIND_DEFAULT = {FailureKind.LATE_REPLY: Rule("a reply after its wait had ended: {text}")}


def rule_for(stage: Stage, kind: FailureKind) -> Rule:
    rule = OUTCOMES.get((stage, kind)) or _STAGE_DEFAULT.get(stage) or _KIND_DEFAULT.get(kind)
    assert rule is not None, f"no outcome rule for {stage} / {kind}"  # a test walks every pair
    return rule


def failure(
    stage: Stage, kind: FailureKind, exc: BaseException, *, verb: str = "", wait: float = 0.0
) -> NoSession | Broken:
    """The outcome of `exc` (of `kind`) at `stage`, as the exception the session raises."""
    text = reply_text(exc)
    if kind is FailureKind.REFUSED:
        text = f"{reply_code(exc)} {text}"
    return outcome(stage, kind, verb=verb, wait=wait, detail=describe(exc), text=text)


def outcome(
    stage: Stage,
    kind: FailureKind,
    *,
    verb: str = "",
    wait: float = 0.0,
    detail: str = "",
    text: str = "",
) -> NoSession | Broken:
    """The outcome of a failure of `kind` at `stage` (a reply or an exception), as raised."""
    rule = rule_for(stage, kind)
    reason = rule.reason.format(verb=verb, wait=wait, detail=detail, text=text[:120])
    if rule.status is not None:
        return NoSession(rule.status, reason, PortState.OPEN)
    return Broken(reason, fatal=rule.fatal)


# what a server that waited for the client to speak first answers to QUIT
_HTTP = re.compile(rb"HTTP/[0-9]")
_TLS_TYPES = {0x15: "a TLS alert record", 0x16: "a TLS handshake record"}
_SMTP_REPLY = re.compile(rb"[2-5][0-9][0-9](?:[ -]|\r?\n|$)")
QUIT_ANSWER_BYTES = 64  # read at most this much of the answer to QUIT
QUIT_ANSWER_WAIT = 5.0  # seconds, at most


def answer_to_quit(data: bytes, *, closed: bool) -> tuple[FailureKind, str]:
    """What the answer to the QUIT sent after a silent greeting wait says, for the
    `Stage.SILENCE` rows of `OUTCOMES`: the kind, and the `detail` of the reason, quoting the
    bytes as other server text is kept (evidence.writable_text: control bytes and bytes that
    are no UTF-8 as `\\xNN`).

    An HTTP response, a TLS record (content type 0x15 or 0x16, version 0x03 0x00-0x04) or other
    bytes that are no SMTP reply: not SMTP. An SMTP reply: a server that greets late. Nothing:
    silence (`closed`: it hung up).
    """
    if not data:
        if closed:
            return FailureKind.DISCONNECTED, "hung up after QUIT without a word"
        return FailureKind.TIMEOUT, "no answer to QUIT either"
    text = f'"{writable_text(data.decode("utf-8", "surrogateescape"))}"'
    if _HTTP.match(data):
        return FailureKind.MALFORMED, f"an HTTP response in answer to QUIT: {text}"
    if len(data) >= 3 and data[0] in _TLS_TYPES and data[1] == 0x03 and data[2] <= 0x04:
        return FailureKind.MALFORMED, f"{_TLS_TYPES[data[0]]} in answer to QUIT: {text}"
    if _SMTP_REPLY.match(data):
        line = writable_text(data.split(b"\n", 1)[0].strip().decode("utf-8", "surrogateescape"))
        return FailureKind.LATE_REPLY, f'an SMTP reply in answer to QUIT: "{line}"'
    return FailureKind.MALFORMED, f"bytes that are no SMTP reply in answer to QUIT: {text}"
