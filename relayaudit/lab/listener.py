"""One lab listener's constants (names, banner, EHLO replies, TLS), computed once for all its sessions."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from relayaudit.lab.framing import encode
from relayaudit.lab.spec import Behaviour, ServerSpec
from relayaudit.lab.tls import server_tls_context

if TYPE_CHECKING:
    from relayaudit.lab.lab import Lab

__all__ = ["Listener"]

_SIZE_ADVERTISED: Final = 10240000  # Postfix's default message_size_limit, as real servers say


def _ehlo_reply(hostname: str, extra: Sequence[str]) -> bytes:
    lines = [hostname, "PIPELINING", f"SIZE {_SIZE_ADVERTISED}", "8BITMIME", *extra]
    body = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
    return body.encode()


class Listener:
    """Per-listener constants, computed once so that sessions stay small and cheap."""

    __slots__ = (
        "address",
        "banner",
        "ehlo_plain",
        "ehlo_tls",
        "hostname_l",
        "ip_literal",
        "lab",
        "own_names",
        "server",
        "spec",
        "tls_context",
    )

    def __init__(self, lab: Lab, spec: ServerSpec) -> None:
        self.lab = lab
        self.spec = spec
        self.address: tuple[str, int] = (spec.host, spec.port)
        self.server: asyncio.Server | None = None
        self.hostname_l = spec.hostname.lower()
        self.ip_literal = f"[{spec.host}]"
        self.own_names = frozenset({self.hostname_l, self.ip_literal, *lab._local_domains})
        greeting = (spec.banner or f"{spec.hostname} ESMTP relaylab").split("\n")
        self.banner = b"".join(encode(f"220-{line}") for line in greeting[:-1]) + encode(
            f"220 {greeting[-1]}"
        )
        b = spec.behaviour
        auth = ["AUTH PLAIN LOGIN"] if b in (Behaviour.AUTH_REQUIRED, Behaviour.AUTH_NO_TLS) else []
        offers_starttls = b in (Behaviour.TLS_REQUIRED, Behaviour.RELAY_AFTER_STARTTLS)
        starttls = ["STARTTLS"] if offers_starttls and not spec.implicit_tls else []
        self.ehlo_plain = _ehlo_reply(spec.hostname, starttls + auth)
        self.ehlo_tls = _ehlo_reply(spec.hostname, auth)
        needs_tls = spec.implicit_tls or bool(starttls)
        self.tls_context = server_tls_context(spec.hostname) if needs_tls else None
