"""Typed evidence records a probe returns: replies, relay test results, session facts, TLS facts."""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator

__all__ = [
    "Capabilities",
    "Claim",
    "ClaimKind",
    "Confirmation",
    "Exchange",
    "PortState",
    "ProbeResult",
    "ProbeStatus",
    "RelayTest",
    "Reply",
    "ReplyClass",
    "SessionFacts",
    "TestCategory",
    "TestOutcome",
    "TestResult",
    "TestRole",
    "TlsFacts",
    "Transport",
    "address_order",
    "built",
    "classify_reply",
    "endpoint",
    "redact_command",
    "shared_reply",
    "writable_text",
]


class _Frozen(BaseModel):
    # schemas are built on first use, not at import: start-up counts in every sweep, and a
    # sweep where every port refuses never builds a result at all
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


_M = TypeVar("_M", bound=BaseModel)


def built(cls: type[_M], values: dict[str, Any]) -> _M:
    """An instance from values already typed and complete (every field given, nothing to
    default or validate): what `model_construct` makes, at half its cost. The per-command
    evidence (every exchange and reply, every test result) is built this way on the hot path;
    tests/test_evidence_built.py holds it equal to `model_construct` for each model it is used on.
    """
    obj = _new(cls)
    _set(obj, "__dict__", values)
    _set(obj, "__pydantic_fields_set__", set(values))
    _set(obj, "__pydantic_extra__", None)
    _set(obj, "__pydantic_private__", None)
    return obj


_new, _set = object.__new__, object.__setattr__  # built()'s, looked up once


# C0 controls but tab and newline (multi-line replies are joined by newlines), DEL, C1 controls
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def writable_text(value: str) -> str:
    """Server text made safe to write anywhere: invalid UTF-8 and control bytes become `\\xNN`.

    aiosmtplib decodes replies with surrogateescape; a lone surrogate makes every later
    serialization (findings file, state store, log line) raise UnicodeEncodeError. Control
    characters (ESC sequences) would reach the analyst's terminal through `relayaudit check`.
    """
    if value.isascii() and _CONTROL.search(value) is None:
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        raw = value.encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


Text = Annotated[str, AfterValidator(writable_text)]
"""A string that may carry bytes a server sent."""


class PortState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    FILTERED = "filtered"
    ERROR = "error"


class ProbeStatus(StrEnum):
    """How far the conversation with one address:port got; a closed vocabulary (zgrab2-style)."""

    CLOSED = "closed"
    FILTERED = "filtered"
    NO_BANNER = "no-banner"  # connected, but no greeting within the deadline (tarpit) or hung up
    NOT_SMTP = "not-smtp"  # the greeting is not an SMTP reply (HTTP, SSH, garbage)
    SESSION_REFUSED = "session-refused"  # an SMTP greeting that is not 220 (554 no service)
    SMTP = "smtp"  # an SMTP conversation took place; the relay tests say the rest
    ERROR = "error"  # a known failure with no better status (an unusable source address, ...)
    INTERNAL_ERROR = "internal-error"  # a failure no known case explains: a bug, logged once


class Transport(StrEnum):
    PLAIN = "plain"
    STARTTLS = "starttls"
    IMPLICIT_TLS = "implicit-tls"


_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})\b")


class Reply(_Frozen):
    code: int
    text: Text

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code (`5.7.1`) if the reply carries one."""
        match = _ENHANCED.match(self.text)
        return match.group(1) if match else None

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class Exchange(_Frozen):
    """One line of the transcript: what we sent (None for the greeting) and what came back."""

    command: str | None
    reply: Reply | None
    error: Text | None = None
    elapsed_ms: float = 0.0


class TestCategory(StrEnum):
    __test__ = False  # not a pytest test class, despite the name

    RECIPIENT = "recipient"  # an odd or plain recipient form, with an external sender
    SENDER = "sender"  # a sender form, with a plain external recipient
    CONTROL = "control"  # a recipient that cannot exist: does the server accept everything?


class TestRole(StrEnum):
    """What a test's acceptance means; the verdict reads this, never a test's id."""

    __test__ = False  # not a pytest test class, despite the name

    PLAIN = "plain"  # external sender, plain third-party recipient u@d
    NULL_SENDER = "null-sender"  # the null sender <>, plain third-party recipient
    LOCAL_SENDER = "local-sender"  # a sender claiming campus or the server itself, plain recipient
    ODD_FORM = "odd-form"  # an unusual recipient form (%, !, quotes, routes): may be read as local
    CONTROL = "control"  # a recipient that cannot exist: does the server accept everything?

    @property
    def plain_recipient(self) -> bool:
        """The recipient is a plain u@d: acceptance is strong evidence of relaying."""
        return self in _PLAIN_RECIPIENT


_PLAIN_RECIPIENT = {TestRole.PLAIN, TestRole.NULL_SENDER, TestRole.LOCAL_SENDER}


class ClaimKind(StrEnum):
    """How a session pretends to be someone the server may trust (issue 27)."""

    HELO = "helo"  # EHLO with a name that is not the scanner's: the server's own, a campus host's
    XCLIENT = "xclient"  # XCLIENT ADDR=...: the session claims another client address


class Claim(_Frozen):
    """The identity a test's session claimed, instead of the scanner's own."""

    id: str  # stable: "helo-host", "helo-campus", "helo-campus-1", "helo-literal", "xclient-loopback", ...
    kind: ClaimKind
    value: str  # the HELO name, or the address XCLIENT claimed
    why: str  # what the value is, for people: "the server's own host name", "loopback", ...

    def __str__(self) -> str:
        return f"EHLO {self.value}" if self.kind is ClaimKind.HELO else f"XCLIENT ADDR={self.value}"


class RelayTest(_Frozen):
    """One MAIL FROM / RCPT TO pair of the battery."""

    id: str  # stable name, e.g. "rcpt-percent-ip" or "sender-campus"
    category: TestCategory
    role: TestRole
    mail_from: str  # the path between the angle brackets ("" for the null sender)
    rcpt_to: str
    external_recipient: bool = True  # the recipient, if relayed, would leave campus
    claims_local_sender: bool = False  # the sender pretends to be campus / the server itself
    # set: the test ran in a session that claimed this identity (a HELO name, an XCLIENT
    # address), run only when the battery under the scanner's own identity found no relay
    claim: Claim | None = None

    @model_validator(mode="before")
    @classmethod
    def _role_of_stored_record(cls, data: object) -> object:
        """Findings stored before tests carried a role (release 0.1.0) get the one they had."""
        if isinstance(data, dict) and "role" not in data:
            category = data.get("category")
            if category == TestCategory.CONTROL:
                role = TestRole.CONTROL
            elif data.get("claims_local_sender"):
                role = TestRole.LOCAL_SENDER
            elif category == TestCategory.SENDER:
                role = TestRole.NULL_SENDER
            else:
                role = TestRole.PLAIN if data.get("id") == "rcpt-plain" else TestRole.ODD_FORM
            data = {**data, "role": role}
        return data


class ReplyClass(StrEnum):
    OK = "ok"
    TEMPFAIL = "tempfail"  # 4xx: greylisting, rate limits: retry later
    DISCONNECT = "disconnect"  # 421: the server is closing the session
    AUTH_REQUIRED = "auth-required"
    TLS_REQUIRED = "tls-required"
    REFUSED = "refused"
    DOMAIN_UNKNOWN = "domain-unknown"  # x.1.2 / x.1.8: a test address's domain does not resolve
    INVALID = "invalid"  # a code outside 200-599


class TestOutcome(StrEnum):
    __test__ = False  # not a pytest test class, despite the name

    ACCEPTED = "accepted"  # MAIL 2xx and RCPT 250/251
    REFUSED = "refused"  # RCPT 5xx
    SENDER_REFUSED = "sender-refused"  # MAIL 5xx: RCPT never sent
    AUTH_REQUIRED = "auth-required"
    TLS_REQUIRED = "tls-required"
    TEMPFAIL = "tempfail"
    DOMAIN_UNKNOWN = "domain-unknown"  # refused for the test domain, not for relaying: undecided
    ERROR = "error"  # the conversation broke before an answer


_TLS_WORDS = re.compile(r"starttls|\btls\b|encrypt|ssl", re.IGNORECASE)
_AUTH_WORDS = re.compile(r"auth|login|credential|sasl", re.IGNORECASE)


_DOMAIN_STATUS = {"1.2", "1.8", "1.10"}


def classify_reply(reply: Reply) -> ReplyClass:
    """Map one reply to what it means for a relay test; pure and total (and so kept for the
    few dozen codes and texts a sweep meets)."""
    key = (reply.code, reply.text)
    kind = _CLASSIFIED.get(key)
    if kind is None:
        if len(_CLASSIFIED) >= _SHARED_MAX:
            _CLASSIFIED.clear()
        kind = _CLASSIFIED[key] = _classify(reply)
    return kind


_CLASSIFIED: dict[tuple[int, str], ReplyClass] = {}


def _classify(reply: Reply) -> ReplyClass:
    code = reply.code
    if not 200 <= code <= 599:
        return ReplyClass.INVALID
    if code < 400:
        return ReplyClass.OK
    if code == 421:
        return ReplyClass.DISCONNECT
    enhanced = reply.enhanced or ""
    # "bad destination / sender system address": the domain did not resolve, so the refusal
    # says nothing about relaying (servers checking recipient or sender domains do this)
    if enhanced[2:] in _DOMAIN_STATUS:
        return ReplyClass.DOMAIN_UNKNOWN
    if code == 530 or enhanced in {"5.7.0", "5.7.11", "5.7.57", "4.7.0", "4.7.11"} or code == 454:
        if _TLS_WORDS.search(reply.text) or enhanced == "5.7.11":
            return ReplyClass.TLS_REQUIRED
        if code == 530 or enhanced == "5.7.57" or _AUTH_WORDS.search(reply.text):
            return ReplyClass.AUTH_REQUIRED
    if code < 500:
        return ReplyClass.TEMPFAIL
    return ReplyClass.REFUSED


class TestResult(_Frozen):
    __test__ = False  # not a pytest test class, despite the name

    test: RelayTest
    transport: Transport
    mail: Reply | None = None
    rcpt: Reply | None = None
    outcome: TestOutcome
    error: Text | None = None


class TlsFacts(_Frozen):
    protocol: str | None = None
    cipher: str | None = None
    subject: Text | None = None  # from the server's certificate
    issuer: Text | None = None
    not_after: datetime | None = None
    self_signed: bool | None = None
    error: Text | None = None  # the handshake failed: why


class Capabilities(_Frozen):
    """What one EHLO reply offers: its keywords, AUTH mechanisms, SIZE, PIPELINING, 8BITMIME."""

    capabilities: tuple[Text, ...] = ()
    auth_mechanisms: tuple[Text, ...] = ()
    size: int | None = None
    pipelining: bool = False
    eightbitmime: bool = False


class SessionFacts(_Frozen):
    banner: Reply
    ehlo: bool  # False: EHLO was refused and HELO used
    hostname: str | None  # the name the server gives itself (banner / EHLO)
    capabilities: tuple[Text, ...] = ()
    auth_mechanisms: tuple[Text, ...] = ()
    starttls: bool = False
    size: int | None = None
    pipelining: bool = False
    eightbitmime: bool = False
    tls: TlsFacts | None = None
    software: str | None = None  # a guess from the greeting: "Postfix", "Exim", ...
    # the EHLO reply inside TLS, beside the plain one above: submission servers often offer
    # AUTH (and a larger SIZE) only after STARTTLS; None: no STARTTLS session got that far
    after_starttls: Capabilities | None = None


class Confirmation(_Frozen):
    """Confirmation mode: one canary message through the server to a mailbox the ISO owns."""

    token: str
    test_id: str
    transport: Transport
    rcpt_to: str
    mail_from: str | None = None  # the canary's envelope sender; None: none could be formed
    data_reply: Reply | None = None
    sent: bool = False
    delivered: bool | None = None  # None: not known yet (still waiting) or not sent
    error: Text | None = None

    @property
    def refused(self) -> bool:
        """The server refused the message at DATA (5xx to DATA or to its end): evidence, kept."""
        return self.data_reply is not None and 500 <= self.data_reply.code <= 599

    @property
    def deferred(self) -> bool:
        """The server answered the message with a 4xx: no answer yet about relaying."""
        return self.data_reply is not None and 400 <= self.data_reply.code <= 499


class ProbeResult(_Frozen):
    """Everything one probe of one address:port saw; the verdict is computed from this alone."""

    address: str
    port: int
    vantage: str  # the local address the connections came from
    started: datetime
    finished: datetime
    port_state: PortState
    status: ProbeStatus
    error: Text | None = None
    facts: SessionFacts | None = None
    tests: tuple[TestResult, ...] = ()
    transcript: tuple[Exchange, ...] = ()
    confirmation: Confirmation | None = None
    sessions: int = 0
    pipelined: bool = False  # some of the battery went in pipelined groups (RFC 2920)
    lockstep: Text | None = None  # why the battery went on in lock-step, if pipelining stopped
    # set: the tests are a retry after greylisting, this many seconds after the first try
    # ended (whose exchanges begin the transcript); None: one try
    retried_after: float | None = None


_AUTH_COMMAND = re.compile(r"^(AUTH\s+\S+)(\s.*)?$", re.IGNORECASE)


def address_order(address: str) -> tuple[int, int]:
    """Numeric address order, IPv4 before IPv6 (as text, .10 would sort before .9)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (9, 0)
    return (ip.version, int(ip))


def endpoint(address: str, port: int) -> str:
    """`192.0.2.7:25`, and `[2001:db8::7]:25` for IPv6, as people write them."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def redact_command(command: str, *, in_auth: bool = False) -> str:
    """AUTH exchanges never reach a transcript: keep the verb and mechanism only."""
    if in_auth:
        return "<redacted>"
    if command[:4].upper() != "AUTH":  # every command of a relay test: no pattern to run
        return command
    match = _AUTH_COMMAND.match(command)
    if match and match.group(2):
        return f"{match.group(1)} <redacted>"
    return command


_SHARED: dict[tuple[int, str], Reply] = {}
_SHARED_MAX = 4096


def shared_reply(code: int, message: str) -> Reply:
    """The Reply for a code and text, one object for each seen recently: most replies of a
    sweep are a few dozen texts ("250 2.1.0 Ok", "554 5.7.1 Relay access denied"), and a
    frozen Reply can be shared by every transcript that holds it."""
    key = (code, message)
    reply = _SHARED.get(key)
    if reply is None:
        if len(_SHARED) >= _SHARED_MAX:  # a server with a new text per reply: start over
            _SHARED.clear()
        reply = _SHARED[key] = built(Reply, {"code": code, "text": writable_text(message)})
    return reply
