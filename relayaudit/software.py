"""Which mail software a server runs: independent signs (greeting, EHLO reply, refusal wording) weighed into a guess.

A sign is one source naming one product: the product token of the greeting (never the host name
before it: `exchange.campus.example` may well run Postfix), the EHLO reply (keywords only one
product offers, and the shape of its first line), and the wording of the battery's refusals
("Relay access denied" is Postfix's own text). The guess is the product most sources name:
**high** when two or more sources name it and none names another, **low** when one source names
it or the sources disagree (a banner is one line of configuration, so a Postfix that calls
itself Exim is named at low confidence at most), **unknown** when nothing names a product.
Pure: the same evidence gives the same guess (`verdict.judge` calls `guess_of`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from relayaudit.evidence import ProbeResult, Text

__all__ = [
    "NAMES",
    "GuessConfidence",
    "SignSource",
    "Software",
    "SoftwareGuess",
    "SoftwareSign",
    "describe",
    "ehlo_signs",
    "greeting_signs",
    "guess",
    "guess_of",
    "refusal_signs",
]


class Software(StrEnum):
    """The products relayaudit can tell apart (the keys of the remediation data)."""

    POSTFIX = "postfix"
    EXIM = "exim"
    OPENSMTPD = "opensmtpd"
    SENDMAIL = "sendmail"
    MICROSOFT = "microsoft"  # Exchange, or the IIS SMTP service (one family: one set of fixes)
    QMAIL = "qmail"
    HARAKA = "haraka"


NAMES: dict[Software, str] = {
    Software.POSTFIX: "Postfix",
    Software.EXIM: "Exim",
    Software.OPENSMTPD: "OpenSMTPD",
    Software.SENDMAIL: "Sendmail",
    Software.MICROSOFT: "Microsoft Exchange or IIS SMTP",
    Software.QMAIL: "qmail",
    Software.HARAKA: "Haraka",
}
_EXCHANGE = "Microsoft Exchange"  # the name once a sign only Exchange gives is seen


class SignSource(StrEnum):
    GREETING = "greeting"  # the product token of the 220 greeting, host name left out
    EHLO = "ehlo"  # keywords and first line of the EHLO reply
    REFUSAL = "refusal"  # the wording of a 4xx/5xx reply to a relay test


class GuessConfidence(StrEnum):
    HIGH = "high"  # two or more sources name the product, none names another
    LOW = "low"  # one source names it, or the sources disagree
    UNKNOWN = "unknown"  # no source names a product


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class SoftwareSign(_Frozen):
    """One source naming one product, with what was seen there (at most 60 characters)."""

    source: SignSource
    software: Software
    seen: Text
    exchange_only: bool = False  # a sign only Microsoft Exchange gives (not the IIS SMTP service)


class SoftwareGuess(_Frozen):
    """The weighed guess and every sign it was made from (disagreeing ones included)."""

    software: Software | None = None
    name: str | None = None  # for people: "Postfix", "Microsoft Exchange", ...
    confidence: GuessConfidence = GuessConfidence.UNKNOWN
    signs: tuple[SoftwareSign, ...] = ()


_GREETING: tuple[tuple[Software, re.Pattern[str], bool], ...] = (
    (Software.POSTFIX, re.compile(r"\bpostfix\b", re.I), False),
    (Software.EXIM, re.compile(r"\bexim\b", re.I), False),
    (Software.OPENSMTPD, re.compile(r"\bopensmtpd\b", re.I), False),
    (Software.SENDMAIL, re.compile(r"\bsendmail\b", re.I), False),
    # Exchange 2007 and later: "Microsoft ESMTP MAIL Service ready at <date>"; the IIS SMTP
    # service (and Exchange 2003, built on it): "Microsoft ESMTP MAIL Service, Version: 6.0..."
    (Software.MICROSOFT, re.compile(r"\bmicrosoft exchange\b", re.I), True),
    (Software.MICROSOFT, re.compile(r"\bmicrosoft\s+e?smtp\s+mail\s+service\b", re.I), False),
    (Software.QMAIL, re.compile(r"\bqmail\b", re.I), False),
    (Software.HARAKA, re.compile(r"\bharaka\b", re.I), False),
)
# EHLO keywords only one product offers
_KEYWORDS: dict[str, Software] = {
    **dict.fromkeys(
        (
            "x-exps",
            "xexch50",
            "x-anonymoustls",
            "xrdst",
            "x-link2state",
            "xshadow",
            "xshadowrequest",
            "xproxy",
            "xproxyfrom",
        ),
        Software.MICROSOFT,
    ),
    "pipeconnect": Software.EXIM,  # Exim 4.94 and later (PIPE_CONNECT)
    "x_pipe_connect": Software.EXIM,  # Exim 4.92-4.93
    "deliverby": Software.SENDMAIL,
    "onex": Software.SENDMAIL,
    "verb": Software.SENDMAIL,
}
_PLEASED = re.compile(r"\bhello\b.*,\s*pleased to meet you\s*$", re.I)
_EXIM_HELLO = re.compile(r"^\S+ hello \S+ \[[^\]]+\]$", re.I)
_HARAKA_HELLO = re.compile(r"\bharaka is at your service\b", re.I)
_REFUSALS: tuple[tuple[Software, re.Pattern[str], bool], ...] = (
    (Software.POSTFIX, re.compile(r"\brelay access denied\b", re.I), False),
    (Software.EXIM, re.compile(r"\brelay not permitted\b", re.I), False),
    (Software.EXIM, re.compile(r"\bdomain literals not allowed\b", re.I), False),
    (Software.EXIM, re.compile(r">: malformed address: .{1,120} may not follow <", re.I), False),
    (Software.SENDMAIL, re.compile(r"\.\.\. relaying denied\b", re.I), False),
    (Software.OPENSMTPD, re.compile(r"^invalid recipient: <", re.I), False),
    (Software.MICROSOFT, re.compile(r"\b5\.7\.54\b"), True),
    (Software.MICROSOFT, re.compile(r"\bunable to relay\b", re.I), False),
)


# any of them: one search says whether a refusal names a product at all (most do not)
_ANY_REFUSAL = re.compile("|".join(f"(?:{p.pattern})" for _, p, _ in _REFUSALS), re.I)


def _seen(text: str) -> str:
    return text if len(text) <= 60 else text[:59] + "…"


def greeting_signs(greeting: str) -> list[SoftwareSign]:
    """The product token of a greeting's text (after the code): the host name that begins it
    (RFC 5321: `220 domain [text]`) is left out."""
    words = greeting.split(None, 1)
    rest = words[1] if len(words) > 1 else ""
    for software, pattern, exchange in _GREETING:
        if match := pattern.search(rest):
            return [
                SoftwareSign(
                    source=SignSource.GREETING,
                    software=software,
                    seen=_seen(match.group()),
                    exchange_only=exchange,
                )
            ]
    return []


def ehlo_signs(text: str, keywords: Iterable[str]) -> list[SoftwareSign]:
    """What the EHLO reply says: a keyword only one product offers, else the shape of its
    first line and keyword set (Postfix: the host name alone; Exim: `Hello name [ip]` and HELP;
    OpenSMTPD: Sendmail's `pleased to meet you` without Sendmail's own keywords)."""
    words = {k.split()[0].lower() for k in keywords if k.split()}
    for keyword in sorted(words):
        if keyword in _KEYWORDS:
            named = _KEYWORDS[keyword]
            return [
                SoftwareSign(
                    source=SignSource.EHLO,
                    software=named,
                    seen=keyword.upper(),
                    exchange_only=named is Software.MICROSOFT,
                )
            ]
    first = text.splitlines()[0].strip() if text.strip() else ""
    software: Software | None = None
    if _HARAKA_HELLO.search(first):
        software = Software.HARAKA
    elif _PLEASED.search(first):
        software = Software.SENDMAIL if "etrn" in words else Software.OPENSMTPD
    elif _EXIM_HELLO.match(first) and "help" in words and "etrn" not in words:
        software = Software.EXIM
    elif (
        first
        and len(first.split()) == 1
        and "help" not in words
        and ("etrn" in words or "vrfy" in words or {"enhancedstatuscodes", "dsn"} <= words)
    ):
        software = Software.POSTFIX
    if software is None:
        return []
    shape = "first line: " + first.split()[0] + (" ..." if len(first.split()) > 1 else "")
    if software is Software.POSTFIX:
        shape = "first line: the host name alone; " + ", ".join(
            k for k in ("VRFY", "ETRN", "DSN") if k.lower() in words
        )
    elif software is not Software.HARAKA:
        shape = first.split(None, 1)[1] if len(first.split()) > 1 else first
    return [SoftwareSign(source=SignSource.EHLO, software=software, seen=_seen(shape))]


def refusal_signs(texts: Iterable[str]) -> list[SoftwareSign]:
    """The first refusal wording that names a product, per product."""
    signs: dict[Software, SoftwareSign] = {}
    # a battery's refusals are mostly one text said over and over: each read once, in order
    for text in dict.fromkeys(texts):
        for sign in _named_in(text):
            signs.setdefault(sign.software, sign)
    return list(signs.values())


_NAMED: dict[str, tuple[SoftwareSign, ...]] = {}  # refusal text -> the signs it holds


def _named_in(text: str) -> tuple[SoftwareSign, ...]:
    """The signs one refusal text holds, one per product, in _REFUSALS order; kept for the
    few hundred texts a sweep meets (every host refuses with the same few wordings)."""
    found = _NAMED.get(text)
    if found is None:
        bare = _without_status(text)
        found = (
            tuple(
                SoftwareSign(
                    source=SignSource.REFUSAL,
                    software=software,
                    seen=_seen(match.group() if exchange else text.splitlines()[0]),
                    exchange_only=exchange,
                )
                for software, pattern, exchange in _REFUSALS
                if (match := pattern.search(bare))
            )
            if _ANY_REFUSAL.search(bare)
            else ()
        )
        if len(_NAMED) >= 4096:  # a server with a new wording per reply: start over
            _NAMED.clear()
        _NAMED[text] = found
    return found


_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}\s+")


def _without_status(text: str) -> str:
    """`5.7.1 <u@d>: Relay access denied` without its enhanced code (5.7.54 is matched whole)."""
    first = text.splitlines()[0] if text else ""
    return first if "5.7.54" in first else _STATUS.sub("", first)


def guess(signs: Iterable[SoftwareSign]) -> SoftwareGuess:
    """The product most sources name; high only when two or more do and none names another."""
    found = tuple(signs)
    sources: dict[Software, set[SignSource]] = {}
    for sign in found:
        sources.setdefault(sign.software, set()).add(sign.source)
    if not sources:
        return SoftwareGuess(signs=found)
    order = list(SignSource)
    # most sources first; a tie goes to the product named by the source hardest to change
    # (a refusal's wording, then the EHLO reply, then the greeting: one line of configuration)
    software = max(
        sources, key=lambda s: (len(sources[s]), max(order.index(x) for x in sources[s]))
    )
    agreed = len(sources[software]) >= 2 and len(sources) == 1
    name = NAMES[software]
    if software is Software.MICROSOFT and any(
        s.exchange_only for s in found if s.software is software
    ):
        name = _EXCHANGE
    return SoftwareGuess(
        software=software,
        name=name,
        confidence=GuessConfidence.HIGH if agreed else GuessConfidence.LOW,
        signs=found,
    )


def guess_of(result: ProbeResult) -> SoftwareGuess:
    """The guess from one probe: its greeting, its first EHLO reply and its tests' refusals."""
    facts = result.facts
    signs: list[SoftwareSign] = []
    if facts is not None:
        signs += greeting_signs(facts.banner.text)
        ehlo = next(
            (
                ex.reply.text
                for ex in result.transcript
                if ex.command is not None
                and ex.command[:5].upper() == "EHLO "
                and ex.reply is not None
                and ex.reply.code == 250
            ),
            None,
        )
        if ehlo is not None:
            signs += ehlo_signs(ehlo, facts.capabilities)
    refusals = [
        reply.text
        for r in result.tests
        for reply in (r.mail, r.rcpt)
        if reply is not None and reply.code >= 400
    ]
    signs += refusal_signs(refusals)
    return guess(signs)


def describe(found: SoftwareGuess) -> str:
    """One line for people: `Postfix (high confidence: greeting "Postfix", refusal "...")`."""
    signs = ", ".join(
        f'{s.source.value} "{s.seen}"'
        + ("" if s.software is found.software else f" ({NAMES[s.software]})")
        for s in found.signs
    )
    if found.name is None:
        return "unknown (nothing names a product)"
    return f"{found.name} ({found.confidence.value} confidence: {signs})"
