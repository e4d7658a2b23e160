"""What a lab listener is told (ServerSpec, Behaviour) and what it records (Delivery), with its limits."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

__all__ = [
    "HARD_ERROR_LIMIT",
    "MAX_LINE",
    "MAX_MESSAGE",
    "SOFT_ERROR_LIMIT",
    "Behaviour",
    "Delivery",
    "ServerSpec",
]

MAX_LINE: Final = 4096  # longest command line (without CRLF) before "500 5.5.0 Line too long"
MAX_MESSAGE: Final = 1024 * 1024  # DATA larger than this is read to the end, then refused with 552
SOFT_ERROR_LIMIT: Final = 10  # Postfix smtpd_soft_error_limit
HARD_ERROR_LIMIT: Final = 20  # Postfix smtpd_hard_error_limit


class Behaviour(StrEnum):
    """How one lab server answers relay attempts; each is a case from relay-tests/verdicts."""

    OPEN_RELAY = "open_relay"  # relays any resolvable off-host recipient, odd forms included
    CLOSED = "closed"  # local recipients only; others "554 5.7.1 <rcpt>: Relay access denied"
    CAMPUS_SENDER = "campus_sender"  # relays when MAIL FROM's domain is a campus domain
    PERCENT_HACK = "percent_hack"  # relays u%d@[IP] and u%d@<hostname>; otherwise CLOSED
    AUTH_REQUIRED = "auth_required"  # MAIL answered 530 5.7.0 Authentication required
    TLS_REQUIRED = "tls_required"  # MAIL refused before STARTTLS; CLOSED after it
    RELAY_AFTER_STARTTLS = "relay_after_starttls"  # CLOSED in plaintext, OPEN_RELAY after TLS
    ACCEPT_ALL_DISCARD = "accept_all_discard"  # 250 to everything, delivers nothing
    REFUSE_AT_DATA = "refuse_at_data"  # 250 to every RCPT, then 550 at the end of DATA (an ACL)
    ODD_FORMS_LOCAL = "odd_forms_local"  # OpenSMTPD-like: odd forms taken as local, never relayed
    GREYLIST = "greylist"  # 451 at RCPT for every non-local recipient
    AUTH_NO_TLS = "auth_no_tls"  # CLOSED, but advertises AUTH without STARTTLS
    HELO_ONLY = "helo_only"  # EHLO unknown, HELO works; otherwise OPEN_RELAY
    NOT_SMTP = "not_smtp"  # silent until input, then an HTTP 400 and close
    TARPIT = "tarpit"  # accepts TCP, never sends a banner, never reads


@dataclass(frozen=True)
class ServerSpec:
    """One listener of the lab."""

    host: str  # an IPv4 address in 127.0.0.0/8
    port: int  # 0 = ephemeral; Lab.address_of() reports the bound port
    behaviour: Behaviour
    hostname: str = "mx.campus.test"  # banner/EHLO name; PERCENT_HACK accepts u%d@<hostname>
    # the greeting's text after "220" (default "<hostname> ESMTP relaylab"); each "\n" starts
    # another line of a multi-line greeting. For tests of what reports make of hostile servers.
    banner: str | None = None
    implicit_tls: bool = False  # TLS from the first byte (port-465 style)
    reply_delay: float = 0.0  # seconds before every reply, banner included (a slow server)
    # seconds each flight of the client's bytes takes to arrive (a network's latency): the
    # replies to one pipelined group come back together, one round trip later; the banner too
    flight_delay: float = 0.0
    error_limits: bool = False  # Postfix soft/hard error limits (10 / 20 refused commands)
    error_sleep: float = 1.0  # Postfix smtpd_error_sleep_time; tests shorten it


@dataclass(frozen=True)
class Delivery:
    """A message the lab relayed onward for one recipient (recorded when DATA is accepted)."""

    server: tuple[str, int]  # the lab listener that relayed it
    mail_from: str  # the MAIL FROM path without <>, "" for the null sender
    rcpt: str  # the external address the relay resolved the RCPT path to
    data: bytes  # the message as received, dot-unstuffed
