"""Lean asyncio SMTP lab: many loopback-only listeners in one process, scripted relay behaviour."""

# Used by `relayaudit demo`, the tests and bench/. The modules, each importing only those before
# it: spec (what a listener is told), recipients (how a RCPT path resolves), tls, framing (lines,
# DATA, paced replies), policy (what each behaviour answers to a RCPT), listener, session (the
# SMTP commands), lab (the Lab class). ticket_apis (HTTP stand-ins of the ticket APIs that the
# alert templates call) stands apart: import it as relayaudit.lab.ticket_apis.

from relayaudit.lab.lab import Lab
from relayaudit.lab.recipients import RecipientKind, is_plain_address, resolve_recipient
from relayaudit.lab.spec import MAX_LINE, MAX_MESSAGE, Behaviour, Delivery, ServerSpec
from relayaudit.lab.tls import server_tls_context

__all__ = [
    "MAX_LINE",
    "MAX_MESSAGE",
    "Behaviour",
    "Delivery",
    "Lab",
    "RecipientKind",
    "ServerSpec",
    "is_plain_address",
    "resolve_recipient",
    "server_tls_context",
]
