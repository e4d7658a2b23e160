"""The lab's relay policy: which Behaviour decides a RCPT now, and what it answers to the path."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from relayaudit.lab.framing import encode
from relayaudit.lab.recipients import RecipientKind, is_plain_address, resolve_recipient
from relayaudit.lab.spec import Behaviour

if TYPE_CHECKING:
    from relayaudit.lab.listener import Listener

__all__ = ["rcpt_mode", "rcpt_reply"]

# u%d@host: the only odd form a percent-hack server relays (host must be its own name or IP).
_PERCENT_RE: Final = re.compile(r'([^@%!"]+)%([^@%!"]+)@([^@%!"]+)')


def rcpt_mode(
    behaviour: Behaviour, *, tls: bool, mail_from: str | None, campus_domains: frozenset[str]
) -> Behaviour:
    """The behaviour that decides RCPT now, after STARTTLS and sender are taken into account."""
    if behaviour in (Behaviour.OPEN_RELAY, Behaviour.HELO_ONLY):
        return Behaviour.OPEN_RELAY
    if behaviour is Behaviour.RELAY_AFTER_STARTTLS:
        return Behaviour.OPEN_RELAY if tls else Behaviour.CLOSED
    if behaviour is Behaviour.CAMPUS_SENDER:
        domain = (mail_from or "").rpartition("@")[2].lower()
        campus = domain in campus_domains
        return Behaviour.OPEN_RELAY if campus else Behaviour.CLOSED
    if behaviour in (
        Behaviour.PERCENT_HACK,
        Behaviour.ACCEPT_ALL_DISCARD,
        Behaviour.REFUSE_AT_DATA,
        Behaviour.ODD_FORMS_LOCAL,
        Behaviour.GREYLIST,
    ):
        return behaviour
    return Behaviour.CLOSED


def rcpt_reply(listener: Listener, mode: Behaviour, path: str) -> tuple[bytes | None, str | None]:
    """(refusal or None for 250, external address to relay to or None)."""
    if mode in (Behaviour.ACCEPT_ALL_DISCARD, Behaviour.REFUSE_AT_DATA):
        return None, None
    kind, address = resolve_recipient(path, listener.own_names)
    if mode is Behaviour.ODD_FORMS_LOCAL:
        if is_plain_address(path) and kind is RecipientKind.EXTERNAL:
            return b"550 Invalid recipient\r\n", None
        return None, None  # odd forms land in a local mailbox named after the whole path
    if kind is RecipientKind.LOCAL:
        return None, None
    if mode is Behaviour.GREYLIST:
        return b"451 4.7.1 Greylisted, try again later\r\n", None
    if kind is RecipientKind.BAD:
        return b"501 5.1.3 Bad recipient address syntax\r\n", None
    if mode is Behaviour.OPEN_RELAY:
        return None, address
    if mode is Behaviour.PERCENT_HACK:
        m = _PERCENT_RE.fullmatch(path)
        if m is not None and m.group(3).lower() in (listener.hostname_l, listener.ip_literal):
            return None, address
    return encode(f"554 5.7.1 <{path}>: Relay access denied"), None
