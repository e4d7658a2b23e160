"""Pipelining that Postfix's postscreen finds well-behaved (issue 25): its deep protocol tests see a
client that waits for PIPELINING before it pipelines, never a protocol violation."""

from __future__ import annotations

import re

import pytest
from factories import probe_settings
from postfix_lab import SCANNER_SOURCE, PostfixInstance

from relayaudit.probe import probe
from relayaudit.verdict import VerdictStatus, judge

pytestmark = pytest.mark.postfix


async def test_postscreen_defers_the_first_session_then_the_scanner_pipelines_unflagged(
    postfix_lab: dict[str, PostfixInstance],
) -> None:
    instance = postfix_lab["postscreen"]
    s = probe_settings(
        source_address=SCANNER_SOURCE,
        connect_timeout=3.0,
        command_timeout=10.0,
        session_timeout=60.0,
        external_domains=("outside-b.test", "outside-a.test"),
        pipelining=True,
    )
    # a new client: postscreen's own SMTP engine answers, with its deep protocol tests on. It
    # hides PIPELINING (so nothing is pipelined) and defers RCPT with 450 4.3.2 by design
    first = await probe(instance.host, instance.port, s)
    replies = [e.reply.text for e in first.transcript if e.reply is not None]
    assert any(text.startswith("4.3.2") for text in replies), first.transcript
    # the scanner passed: from now on postscreen hands its connections to the real smtpd,
    # which offers PIPELINING, and the battery is pipelined
    second = await probe(instance.host, instance.port, s)
    assert second.facts is not None and second.facts.pipelining
    assert second.pipelined and second.lockstep is None, second.lockstep
    assert judge(second).status is VerdictStatus.RELAY_REFUSED
    log = instance.maillog()
    scanner = re.escape(f"[{SCANNER_SOURCE}]")
    assert re.search(rf"PASS NEW {scanner}", log), log[-3000:]
    for violation in ("PIPELINING", "NON-SMTP COMMAND", "BARE NEWLINE"):
        assert not re.search(rf"{violation} from {scanner}", log), violation
