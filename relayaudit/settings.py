"""What one probe is told (ProbeSettings, CanaryTarget): plain values, importable without the SMTP client."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CanaryTarget", "ProbeSettings"]


@dataclass(frozen=True, slots=True)
class CanaryTarget:
    local_part: str
    domain: str
    contact: str
    campus_sender: str | None = None  # the sender for a relay that relays only for campus senders


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    helo_name: str
    source_address: str | None = None
    connect_timeout: float = 3.0
    command_timeout: float = 15.0
    greeting_timeout: float = 0.0  # the wait for the 220; never less than command_timeout
    session_timeout: float = 120.0
    max_tests_per_session: int = 9
    retest_after_starttls: bool = True
    campus_domains: tuple[str, ...] = ()
    external_domains: tuple[str, ...] = ("relayaudit-test.example",)
    external_local_part: str = "relaytest"
    sender_local_part: str = "relayaudit"
    canary: CanaryTarget | None = None  # set: confirmation mode
    max_reconnects: int = 6
    sessions_per_host: int = 1  # sessions of one probe's battery at a time (opt-in: up to 3)
    pipelining: bool = True  # group commands where the server offers PIPELINING (RFC 2920)
    # no relay found: sessions that claim the server's trust (a HELO name, XCLIENT; issue 27)
    claimed_identity: bool = True
