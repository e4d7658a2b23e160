"""Builds the relay test battery (MAIL FROM / RCPT TO pairs) for one target; pure."""

from __future__ import annotations

import functools
import ipaddress
import secrets
from dataclasses import dataclass

from relayaudit.evidence import Claim, ClaimKind, RelayTest, TestCategory, TestRole, built

__all__ = [
    "BatteryInputs",
    "address_literal",
    "build_battery",
    "canary_recipient",
    "claim_tests",
    "helo_claims",
    "xclient_claims",
]


@dataclass(frozen=True, slots=True)
class BatteryInputs:
    address: str  # the target's IP address
    hostname: str | None  # the name the target gives itself; the address literal when unknown
    campus_domains: tuple[str, ...]
    external_domains: tuple[str, ...]
    external_local_part: str
    sender_local_part: str


@functools.lru_cache(maxsize=1024)  # the vantage's, asked at each session's hello
def address_literal(address: str) -> str:
    """RFC 5321 address literal: `[192.0.2.7]`, and `[IPv6:2001:db8::7]` for IPv6."""
    ip = ipaddress.ip_address(address)
    return f"[IPv6:{ip.compressed}]" if ip.version == 6 else f"[{ip}]"


# Recipient forms (docs/findings.md lists them): id -> template over u (local part),
# d (external domain), T (target host name) and IP (address literal). The first is the plain
# third-party form; the rest are odd forms.
_PLAIN_FORM = "rcpt-plain"
_RECIPIENT_FORMS: tuple[tuple[str, str], ...] = (
    (_PLAIN_FORM, "{u}@{d}"),
    ("rcpt-percent-ip", "{u}%{d}@{IP}"),
    ("rcpt-percent-host", "{u}%{d}@{T}"),
    ("rcpt-quoted", '"{u}@{d}"'),
    ("rcpt-quoted-percent", '"{u}%{d}"'),
    ("rcpt-double-at-ip", "{u}@{d}@{IP}"),
    ("rcpt-quoted-double-at-ip", '"{u}@{d}"@{IP}'),
    ("rcpt-double-at-host", "{u}@{d}@{T}"),
    ("rcpt-quoted-double-at-host", '"{u}@{d}"@{T}'),
    ("rcpt-source-route-ip", "@{IP}:{u}@{d}"),
    ("rcpt-source-route-host", "@{T}:{u}@{d}"),
    ("rcpt-bang", "{d}!{u}"),
    ("rcpt-bang-ip", "{d}!{u}@{IP}"),
    ("rcpt-bang-host", "{d}!{u}@{T}"),
    ("rcpt-trailing-at", "{u}@{d}@"),
)
# The same odd forms with a campus domain C on the right, once per configured campus domain
# (`-1`, `-2`, ... after the first): a server that relays for the campus domain and honours
# legacy routing (old Sendmail configs, percent_hack_domains) relays `u%d@C` while it refuses
# every form naming itself. A campus MX accepts mail for C anyway, so acceptance is weak
# evidence (an odd form); confirmation decides. 4 tests per campus domain.
_CAMPUS_FORMS: tuple[tuple[str, str], ...] = (
    ("rcpt-percent-campus", "{u}%{d}@{C}"),
    ("rcpt-bang-campus", "{d}!{u}@{C}"),
    ("rcpt-source-route-campus", "@{C}:{u}@{d}"),
    ("rcpt-quoted-campus", '"{u}@{d}"@{C}'),
)


def _recipient(template: str, *, u: str, d: str, host: str, literal: str, campus: str = "") -> str:
    return template.format(u=u, d=d, T=host, IP=literal, C=campus)


def _campus_forms(inputs: BatteryInputs) -> list[tuple[str, str, str]]:
    """(test id, template, campus domain) of every odd form through a campus domain."""
    return [
        (f"{test_id}-{i}" if i else test_id, template, campus)
        for i, campus in enumerate(inputs.campus_domains)
        for test_id, template in _CAMPUS_FORMS
    ]


def canary_recipient(
    test: RelayTest, inputs: BatteryInputs, *, local_part: str, domain: str
) -> str:
    """The same recipient form as `test`, aimed at the canary mailbox instead of the test domain."""
    literal = address_literal(inputs.address)
    host = inputs.hostname or literal
    campus = {test_id: (template, c) for test_id, template, c in _campus_forms(inputs)}
    template, through = campus.get(test.id, (dict(_RECIPIENT_FORMS).get(test.id, "{u}@{d}"), ""))
    return _recipient(template, u=local_part, d=domain, host=host, literal=literal, campus=through)


def _test(
    test_id: str,
    category: TestCategory,
    role: TestRole,
    mail_from: str,
    rcpt_to: str,
    *,
    local: bool = False,
    claim: Claim | None = None,
) -> RelayTest:
    # built, not validated: every value is ours and typed (a battery per host is on the hot path)
    return built(
        RelayTest,
        {
            "id": test_id,
            "category": category,
            "role": role,
            "mail_from": mail_from,
            "rcpt_to": rcpt_to,
            "external_recipient": True,
            "claims_local_sender": local,
            "claim": claim,
        },
    )


def build_battery(
    inputs: BatteryInputs,
    *,
    control_token: str | None = None,
    control_recipient: str | None = None,
) -> list[RelayTest]:
    """Every recipient form with an external sender, every sender form with a plain recipient,
    and the control test; the plain third-party test comes first, the control second, so a short
    run still holds the two tests the verdict leans on most. `control_recipient`: the control
    address of an earlier try (a retry after greylisting asks for the very same addresses)."""
    literal = address_literal(inputs.address)
    host = inputs.hostname or literal
    u = inputs.external_local_part
    d = inputs.external_domains[0]
    # the external sender's domain differs from the recipient's where the config allows
    d2 = inputs.external_domains[1] if len(inputs.external_domains) > 1 else d
    f = inputs.sender_local_part
    external_sender = f"{f}@{d2}"
    plain = f"{u}@{d}"

    tests: list[RelayTest] = []
    for test_id, template in _RECIPIENT_FORMS:
        plain_form = test_id == _PLAIN_FORM
        tests.append(
            _test(
                test_id,
                TestCategory.RECIPIENT,
                TestRole.PLAIN if plain_form else TestRole.ODD_FORM,
                external_sender,
                _recipient(template, u=u, d=d, host=host, literal=literal),
            )
        )
        if plain_form:
            token = control_token or secrets.token_hex(6)
            tests.append(
                _test(
                    "control-invalid",
                    TestCategory.CONTROL,
                    TestRole.CONTROL,
                    external_sender,
                    control_recipient or f"nx-{token}@nx-{token}.invalid",
                )
            )
    for test_id, template, campus in _campus_forms(inputs):
        tests.append(
            _test(
                test_id,
                TestCategory.RECIPIENT,
                TestRole.ODD_FORM,
                external_sender,
                _recipient(template, u=u, d=d, host=host, literal=literal, campus=campus),
            )
        )

    senders: list[tuple[str, str, bool]] = [
        ("sender-null", "", False),
        ("sender-own-host", f"{f}@{host}", True),
        ("sender-own-literal", f"{f}@{literal}", True),
    ]
    senders += [
        (f"sender-campus-{i}" if i else "sender-campus", f"postmaster@{domain}", True)
        for i, domain in enumerate(inputs.campus_domains)
    ]
    senders += [("sender-unqualified", f, True), ("sender-localhost", f"{f}@localhost", True)]
    for test_id, sender, local in senders:
        tests.append(
            _test(
                test_id,
                TestCategory.SENDER,
                TestRole.LOCAL_SENDER if local else TestRole.NULL_SENDER,
                sender,
                plain,
                local=local,
            )
        )
    # without a host name the host forms repeat the literal forms; one copy is enough
    seen: set[tuple[str, str]] = set()
    unique = []
    for test in tests:
        if (test.mail_from, test.rcpt_to) not in seen:
            seen.add((test.mail_from, test.rcpt_to))
            unique.append(test)
    return unique


def helo_claims(inputs: BatteryInputs, *, own_helo: str) -> list[Claim]:
    """The HELO names a server may trust without cause, one session each when the battery
    found no relay: its own host name, a host under each campus domain, its address literal.
    Names equal to one before (or to the scanner's own HELO name, tested already) are left out.
    """
    candidates: list[tuple[str, str, str]] = []
    if inputs.hostname:
        candidates.append(("helo-host", inputs.hostname, "the server's own host name"))
    for i, domain in enumerate(inputs.campus_domains):
        candidates.append(
            (f"helo-campus-{i}" if i else "helo-campus", f"mail.{domain}", f"a host of {domain}")
        )
    candidates.append(
        ("helo-literal", address_literal(inputs.address), "the server's own address literal")
    )
    seen = {own_helo.lower()}
    claims = []
    for claim_id, value, why in candidates:
        if value.lower() not in seen:
            seen.add(value.lower())
            claims.append(Claim(id=claim_id, kind=ClaimKind.HELO, value=value, why=why))
    return claims


def xclient_claims(inputs: BatteryInputs) -> list[Claim]:
    """The client addresses an XCLIENT session claims: loopback (in every mynetworks), then
    the server's own address. Never any other: the claim goes into the server's logs."""
    loopback = "IPV6:::1" if ipaddress.ip_address(inputs.address).version == 6 else "127.0.0.1"
    own = ipaddress.ip_address(inputs.address)
    own_text = f"IPV6:{own.compressed}" if own.version == 6 else str(own)
    claims = [Claim(id="xclient-loopback", kind=ClaimKind.XCLIENT, value=loopback, why="loopback")]
    if own_text != loopback:
        claims.append(
            Claim(
                id="xclient-address",
                kind=ClaimKind.XCLIENT,
                value=own_text,
                why="the server's own address",
            )
        )
    return claims


def claim_tests(inputs: BatteryInputs, claim: Claim) -> list[RelayTest]:
    """The tests of one claimed identity's session: the plain third-party test, and for a
    claimed HELO name the campus-sender test (the first campus domain) too."""
    u = inputs.external_local_part
    d = inputs.external_domains[0]
    d2 = inputs.external_domains[1] if len(inputs.external_domains) > 1 else d
    plain = f"{u}@{d}"
    tests = [
        _test(
            f"{claim.id}-plain",
            TestCategory.RECIPIENT,
            TestRole.PLAIN,
            f"{inputs.sender_local_part}@{d2}",
            plain,
            claim=claim,
        )
    ]
    if claim.kind is ClaimKind.HELO and inputs.campus_domains:
        tests.append(
            _test(
                f"{claim.id}-campus-sender",
                TestCategory.SENDER,
                TestRole.LOCAL_SENDER,
                f"postmaster@{inputs.campus_domains[0]}",
                plain,
                local=True,
                claim=claim,
            )
        )
    return tests
