"""Confirmation mode: one self-identifying canary message through the strongest accepted test form."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from relayaudit.battery import BatteryInputs, address_literal, canary_recipient
from relayaudit.evidence import (
    Confirmation,
    RelayTest,
    ReplyClass,
    TestOutcome,
    TestResult,
    TestRole,
    classify_reply,
)
from relayaudit.failures import Broken, SessionFailure
from relayaudit.runner import Opener
from relayaudit.settings import CanaryTarget, ProbeSettings

__all__ = ["Expect", "canary_sender", "choose", "send_canary"]

Expect = Callable[[str], None]
"""Tells the canary receiver a token is about to be sent (it keeps only tokens it expects)."""


def canary_sender(test: RelayTest, *, canary: CanaryTarget, inputs: BatteryInputs) -> str | None:
    """The canary's envelope sender when it repeats `test`; None: canary.campus_sender is needed.

    It never names an external test domain, so no bounce ever leaves for one. The null sender
    and the server's own names (its host name, address literal, localhost, an unqualified name)
    are kept: that is what was accepted, and bounces stay on the server. A campus sender becomes
    the ISO's own campus address; any other sender an address of the canary domain, so bounces
    come back to the ISO's receiver.
    """
    sender = test.mail_from
    if test.role is TestRole.NULL_SENDER:
        return sender
    if test.role is TestRole.LOCAL_SENDER:
        domain = sender.rpartition("@")[2].lower() if "@" in sender else ""
        literal = address_literal(inputs.address).lower()
        if domain in {"", "localhost", literal, (inputs.hostname or literal).lower()}:
            return sender
        if any(domain == c or domain.endswith("." + c) for c in inputs.campus_domains):
            return canary.campus_sender
    return f"{inputs.sender_local_part}@{canary.domain}"


def choose(
    results: Sequence[TestResult], *, canary: CanaryTarget, inputs: BatteryInputs
) -> tuple[TestResult, Confirmation] | None:
    """The accepted test to repeat with the canary, and its token; None when none was accepted."""
    candidates = [
        t
        for t in results
        if t.outcome is TestOutcome.ACCEPTED and t.test.role is not TestRole.CONTROL
    ]
    if not candidates:
        return None

    def rank(result: TestResult) -> tuple[bool, int, int]:
        # a test whose canary needs the unset canary.campus_sender comes last
        missing = canary_sender(result.test, canary=canary, inputs=inputs) is None
        return (missing, *_preference(result))

    best = min(candidates, key=rank)
    token = f"relayaudit-{secrets.token_hex(16)}"
    rcpt = canary_recipient(
        best.test, inputs, local_part=f"{canary.local_part}+{token}", domain=canary.domain
    )
    return best, Confirmation(
        token=token,
        test_id=best.test.id,
        transport=best.transport,
        rcpt_to=rcpt,
        mail_from=canary_sender(best.test, canary=canary, inputs=inputs),
    )


async def send_canary(
    best: TestResult,
    conf: Confirmation,
    *,
    opener: Opener,
    canary: CanaryTarget,
    inputs: BatteryInputs,
    settings: ProbeSettings,
    port: int,
    expect: Expect,
) -> Confirmation:
    """Repeat `best` with the canary recipient and send the message; what happened, in `conf`."""
    if conf.mail_from is None:
        return conf.model_copy(
            update={
                "error": f"not sent: {best.test.id} was accepted only with a campus sender, and "
                "canary.campus_sender (the ISO's campus address for it) is not set"
            }
        )
    try:
        session = await opener(best.transport)
    except SessionFailure as exc:
        return conf.model_copy(update={"error": f"could not reconnect: {exc}"})
    try:
        mail = await session.command(f"MAIL FROM:<{conf.mail_from}>")
        rcpt_reply = await session.command(f"RCPT TO:<{conf.rcpt_to}>")
        if (
            classify_reply(mail) is not ReplyClass.OK
            or classify_reply(rcpt_reply) is not ReplyClass.OK
        ):
            return conf.model_copy(update={"error": f"canary refused: {mail} / {rcpt_reply}"})
        body = _message(
            conf.token, inputs, settings=settings, canary=canary, rcpt=conf.rcpt_to, port=port
        )
        shown = f"DATA <message carrying token {conf.token}>"
        expect(conf.token)  # before DATA: the receiver records only tokens it was told of
        # a refusal (5xx, 4xx) comes back as the reply: the verdict reads it
        reply = await session.data(body, shown_as=shown)
        return conf.model_copy(update={"data_reply": reply, "sent": 200 <= reply.code <= 299})
    except Broken as exc:
        return conf.model_copy(update={"error": exc.reason})
    finally:
        await session.quit()


def _preference(result: TestResult) -> tuple[int, int]:
    """Plain third-party first, then the sender forms, then the shortest odd form."""
    role = result.test.role
    if role is TestRole.PLAIN:
        return (0, 0)
    if role.plain_recipient:
        return (1, 0)
    return (2, len(result.test.rcpt_to))


def _message(
    token: str,
    inputs: BatteryInputs,
    *,
    settings: ProbeSettings,
    canary: CanaryTarget,
    rcpt: str,
    port: int,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"relayaudit <{settings.sender_local_part}@{settings.helo_name}>"
    msg["To"] = f"<{canary.local_part}@{canary.domain}>"
    msg["Subject"] = f"relayaudit relay confirmation {token}"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=settings.helo_name)
    msg["X-Relayaudit-Token"] = token
    msg.set_content(
        "This message was sent by relayaudit, the campus security office's relay audit,\n"
        f"through the SMTP server {inputs.address} port {port} to a mailbox the office owns.\n"
        f"It proves the server relays mail for outside senders. Contact: {canary.contact or 'n/a'}\n"
        f"Token: {token}\nRecipient form: {rcpt}\n",
        cte="7bit",
    )
    return bytes(msg)
