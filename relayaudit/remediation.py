"""How to close a relay, per software and way: the data in remedies/, a finding's reference, the text people read.

The data is one TOML file per software (`remedies/postfix.toml`, ..., `generic.toml`), each
entry keyed by the way the server relayed (`RelayWay`) or `any`, with a short fix, the vendor's
documentation page it follows (an https URL on the vendor's own domain: data only, relayaudit
never fetches it) and `verified`: true only where a test applies that fix to a real MTA and
sees the relay refused. A relay finding carries a `RemediationRef` (id, software, guess
confidence, URL), never the text, so findings lines and alerts stay small; `show`, the reports
and the ticket templates render the text with `advice`. `python -m relayaudit.remediation
docs/remediation.md` writes the reference page from the data (a test holds them equal).
"""

from __future__ import annotations

import functools
import sys
import textwrap
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from relayaudit.evidence import TestOutcome, TestResult, TestRole
from relayaudit.software import NAMES, GuessConfidence, Software, SoftwareGuess

__all__ = [
    "FILES",
    "Advice",
    "Entry",
    "RelayWay",
    "RemediationRef",
    "advice",
    "advice_text",
    "entries",
    "markdown",
    "reference",
    "way_of",
]


class RelayWay(StrEnum):
    """How a server relayed: the role of the test it accepted, or the identity its session claimed."""

    PLAIN = "plain"  # an outside sender to a plain outside recipient
    NULL_SENDER = "null-sender"  # only for the null sender <>
    LOCAL_SENDER = "local-sender"  # only for a sender claiming campus or the server itself
    ODD_FORM = "odd-form"  # only for an old routing form (%, !, quotes, source routes)
    AFTER_STARTTLS = "after-starttls"  # only inside TLS
    CLAIMED_HELO = "claimed-helo"  # only for a client claiming a campus HELO name
    XCLIENT = "xclient"  # once XCLIENT claimed a trusted client address


ANY = "any"  # the one entry of a software with one text for every way
GENERIC = "generic"
# the data files, in the order docs/remediation.md lists them; generic first
FILES = ("generic", "postfix", "exim", "opensmtpd", "sendmail", "microsoft")
# the vendor's own domains each file's links may point to
_DOMAINS: dict[str, frozenset[str]] = {
    "generic": frozenset({"www.rfc-editor.org", "www.postfix.org"}),
    "postfix": frozenset({"www.postfix.org"}),
    "exim": frozenset({"www.exim.org"}),
    "opensmtpd": frozenset({"www.opensmtpd.org", "man.openbsd.org"}),
    "sendmail": frozenset({"www.sendmail.org", "www.proofpoint.com"}),
    "microsoft": frozenset({"learn.microsoft.com"}),
}
# the software with a text for every way (the three the tests run, and the generic one)
_EVERY_WAY = frozenset({"generic", "postfix", "exim", "opensmtpd"})


@dataclass(frozen=True, slots=True)
class Entry:
    """One fix: for one software (or any), for one way it relayed (or any)."""

    id: str  # "postfix/local-sender", "sendmail/any", "generic/plain"
    software: str  # the data file: "postfix", ..., "generic"
    name: str  # for people: "Postfix", "any mail server"
    way: str  # a RelayWay value, or "any"
    text: str  # one paragraph
    doc_url: str
    verified: bool


class RemediationRef(BaseModel):
    """What a relay finding carries: which fix applies, for which software guess, and where the
    vendor documents it; the text itself is in relayaudit's data (`relayaudit show`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    id: str  # an entry of relayaudit's remediation data: "postfix/local-sender", "generic/plain"
    software: str | None = None  # the software guess it was chosen for ("Postfix"); None: none
    guess_confidence: GuessConfidence = GuessConfidence.UNKNOWN
    doc_url: str  # the documentation page the fix follows (data; never fetched)


def _paragraph(text: str) -> str:
    return " ".join(text.split())


def _load(name: str) -> list[Entry]:
    raw = tomllib.loads(
        resources.files("relayaudit").joinpath("remedies", f"{name}.toml").read_text("utf-8")
    )
    if raw.get("software") != name:
        raise ValueError(f"remedies/{name}.toml: software = {raw.get('software')!r}, not {name!r}")
    ways = {w.value for w in RelayWay}
    found: list[Entry] = []
    for way, item in raw.items():
        if not isinstance(item, dict):
            continue
        if way not in ways and way != ANY:
            raise ValueError(f"remedies/{name}.toml: [{way}] is not a way: {sorted(ways)} or any")
        url = item["doc_url"]
        parts = urlsplit(url)
        if parts.scheme != "https" or parts.hostname not in _DOMAINS[name]:
            raise ValueError(
                f"remedies/{name}.toml [{way}]: {url} is not https on {_DOMAINS[name]}"
            )
        found.append(
            Entry(
                id=f"{name}/{way}",
                software=name,
                name=str(raw["name"]),
                way=way,
                text=_paragraph(str(item["text"])),
                doc_url=url,
                verified=bool(item["verified"]),
            )
        )
    keys = {e.way for e in found}
    if name in _EVERY_WAY and keys != ways:
        raise ValueError(f"remedies/{name}.toml: no text for {sorted(ways - keys)}")
    if name not in _EVERY_WAY and keys != {ANY}:
        raise ValueError(f"remedies/{name}.toml: one [any] entry expected, found {sorted(keys)}")
    return found


@functools.cache
def entries() -> dict[str, Entry]:
    """Every entry of the package data, by id (read once; the data is part of the package)."""
    return {e.id: e for name in FILES for e in _load(name)}


def way_of(kind: str, evidence: Iterable[TestResult]) -> RelayWay:
    """The way a relay finding of `kind` relayed, from the tests it is about (plain recipient
    first: when a server relays a plain address, that is the rule to fix)."""
    special = {
        "relay-via-xclient": RelayWay.XCLIENT,
        "xclient-offered": RelayWay.XCLIENT,
        "relay-claimed-helo": RelayWay.CLAIMED_HELO,
        "relay-after-starttls": RelayWay.AFTER_STARTTLS,
        "relay-campus-sender": RelayWay.LOCAL_SENDER,
    }
    if kind in special:
        return special[kind]
    roles = {r.test.role for r in evidence if r.outcome is TestOutcome.ACCEPTED}
    for role, way in (
        (TestRole.PLAIN, RelayWay.PLAIN),
        (TestRole.NULL_SENDER, RelayWay.NULL_SENDER),
        (TestRole.LOCAL_SENDER, RelayWay.LOCAL_SENDER),
        (TestRole.ODD_FORM, RelayWay.ODD_FORM),
    ):
        if role in roles:
            return way
    return RelayWay.PLAIN


def _entry_for(software: str, way: str) -> Entry | None:
    table = entries()
    return table.get(f"{software}/{way}") or table.get(f"{software}/{ANY}")


def reference(guess: SoftwareGuess, way: RelayWay) -> RemediationRef:
    """The fix for `way` on the guessed software (at any confidence: `advice` puts the generic
    text first below high), else the generic one."""
    entry = _entry_for(guess.software.value, way) if guess.software is not None else None
    if entry is None:
        entry = entries()[f"{GENERIC}/{way.value}"]
    return RemediationRef(
        id=entry.id,
        software=guess.name,
        guess_confidence=guess.confidence,
        doc_url=entry.doc_url,
    )


@dataclass(frozen=True, slots=True)
class Advice:
    """What people read: sections in order, each a heading, one paragraph and its link."""

    sections: tuple[tuple[str, str, str], ...]  # (heading, text, doc_url)
    verified: bool  # the software-specific fix shown was verified on a real MTA


def advice(ref: RemediationRef) -> Advice:
    """The text of a reference. High confidence: the software's fix. Low or unknown: the generic
    fix first, then the software's, marked as a guess. An id this version does not know (a
    finding stored by another release) falls back to the generic text of its way."""
    table = entries()
    entry = table.get(ref.id)
    way = ref.id.rpartition("/")[2]
    generic = table.get(f"{GENERIC}/{way}") or table[f"{GENERIC}/{RelayWay.PLAIN.value}"]
    if entry is None or entry.software == GENERIC:
        note = ""
        if ref.software and ref.guess_confidence is not GuessConfidence.UNKNOWN:
            note = (
                f" (the server looks like {ref.software}, {ref.guess_confidence.value} confidence;"
                " relayaudit has no text of its own for it)"
            )
        return Advice(
            ((f"How to fix it, on any mail server{note}", generic.text, generic.doc_url),),
            verified=False,
        )
    mark = "verified on a real " + entry.name if entry.verified else "not verified here"
    specific = (
        f"How to fix it in {entry.name} ({mark})",
        entry.text,
        entry.doc_url,
    )
    if ref.guess_confidence is GuessConfidence.HIGH:
        return Advice((specific,), verified=entry.verified)
    guessed = (
        f"If it runs {entry.name} (a guess, {ref.guess_confidence.value} confidence; {mark})",
        entry.text,
        entry.doc_url,
    )
    return Advice(
        (("How to fix it, on any mail server", generic.text, generic.doc_url), guessed),
        verified=entry.verified,
    )


def advice_text(ref: RemediationRef, *, width: int = 96, indent: str = "") -> str:
    """The advice as plain text: each section's heading, its paragraph wrapped, its link."""
    lines: list[str] = []
    for heading, text, url in advice(ref).sections:
        lines.append(f"{indent}{heading}:")
        lines += textwrap.wrap(
            text, width=width, initial_indent=indent + "  ", subsequent_indent=indent + "  "
        )
        lines.append(f"{indent}  Documentation: {url}")
    return "\n".join(lines)


def markdown() -> str:
    """docs/remediation.md: every entry of the data, and which are verified."""
    table = entries()
    out = [
        "# Remediation: how to close a relay, per software and per way it relayed",
        "",
        "Generated from the package data `relayaudit/remedies/*.toml` by",
        "`python -m relayaudit.remediation docs/remediation.md`; a test fails when the two disagree.",
        "Edit the data, not this page.",
        "",
        "A relay finding carries a reference to one entry (`remediation`: `id`, `software`,",
        "`guess_confidence`, `doc_url`, see [findings.md](findings.md)); `relayaudit show`, the",
        "reports and the ticket templates print its text. With a high-confidence software guess",
        "the software's text is shown; with a low or unknown one the generic text comes first and",
        "the software's follows, marked as a guess. Software relayaudit has no file for",
        "gets the generic text.",
        "",
        "The documentation links are data: relayaudit never fetches them (a sweep talks to the",
        "hosts in scope and nothing else). **Verified** means a test in this repository applies",
        "that very fix to a real instance of the software on loopback, restarts it, and sees",
        "relayaudit report `relay-refused` (`tests/test_remediation_verified.py`, which `.ci/run`",
        "runs without a skip: it requires Postfix, Exim and OpenSMTPD). Before the fix, the same",
        "test sees relayaudit name the software at high confidence and reference that entry.",
        "",
        "The ways: " + "; ".join(f"`{w.value}`" for w in RelayWay) + "; `any` for a software",
        "with one text for every way.",
        "",
        "| id | software | way | verified | documentation |",
        "| --- | --- | --- | --- | --- |",
    ]
    out += [
        f"| `{e.id}` | {e.name} | {e.way} | {'yes' if e.verified else 'no'} | <{e.doc_url}> |"
        for e in table.values()
    ]
    for name in FILES:
        group = [e for e in table.values() if e.software == name]
        out += ["", f"## {group[0].name}", ""]
        for e in group:
            flag = "verified" if e.verified else "not verified"
            out += [
                f"### `{e.id}` ({flag})",
                "",
                *textwrap.wrap(e.text, width=96),
                "",
                f"Documentation: <{e.doc_url}>",
                "",
            ]
        out.pop()
    out += ["", "## Software names", ""]
    out += [f"* `{s.value}`: {NAMES[s]}" for s in Software]
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # python -m relayaudit.remediation docs/remediation.md
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/remediation.md")
    target.write_text(markdown(), encoding="utf-8")
    print(target)
