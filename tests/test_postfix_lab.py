"""Proves with the stdlib SMTP client only that each lab Postfix has the relay policy it claims."""

from __future__ import annotations

import smtplib
import uuid
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
from aiosmtpd.controller import Controller
from postfix_lab import (
    POSTFIX_SINK_HOST,
    POSTFIX_SINK_PORT,
    SCANNER_SOURCE,
    PostfixInstance,
    SinkHandler,
)

pytestmark = pytest.mark.postfix

OUTSIDE_RCPT = "u@outside.test"
OUTSIDE_SENDER = "f@outside.test"
CAMPUS_SENDER = "postmaster@campus.test"
DELIVERY_TIMEOUT_S = 30.0


def _connect(instance: PostfixInstance, source: str = SCANNER_SOURCE) -> smtplib.SMTP:
    client = smtplib.SMTP(
        instance.host,
        instance.port,
        local_hostname="scanner.relayaudit.test",
        timeout=10,
        source_address=(source, 0),
    )
    code, _ = client.ehlo()
    assert code == 250
    return client


def _rcpt_reply(
    instance: PostfixInstance, sender: str, rcpt: str, source: str = SCANNER_SOURCE
) -> tuple[int, bytes]:
    """MAIL then RCPT in a fresh session, never DATA: nothing is queued."""
    client = _connect(instance, source)
    try:
        code, text = client.mail(sender)
        assert code == 250, text
        return client.rcpt(rcpt)
    finally:
        client.rset()
        client.quit()


@pytest.fixture
def sink() -> Iterator[SinkHandler]:
    handler = SinkHandler()
    controller = Controller(
        handler, hostname=POSTFIX_SINK_HOST, port=POSTFIX_SINK_PORT, server_hostname="sink.test"
    )
    controller.start()
    try:
        yield handler
    finally:
        controller.stop()


@pytest.mark.parametrize("policy", ["closed", "open", "campus-sender", "auth-required"])
def test_banner_names_the_policy(postfix_lab: dict[str, PostfixInstance], policy: str) -> None:
    instance = postfix_lab[policy]
    client = _connect(instance)
    try:
        code, _ = client.noop()
        assert code == 250
        assert client.ehlo_resp is not None
        assert client.ehlo_resp.startswith(f"mx-{policy}.campus.test".encode())
    finally:
        client.quit()


def test_closed_refuses_relay(postfix_lab: dict[str, PostfixInstance]) -> None:
    code, text = _rcpt_reply(postfix_lab["closed"], OUTSIDE_SENDER, OUTSIDE_RCPT)
    assert code == 554
    assert b"Relay access denied" in text


def test_closed_refuses_relay_even_for_campus_sender(
    postfix_lab: dict[str, PostfixInstance],
) -> None:
    code, text = _rcpt_reply(postfix_lab["closed"], CAMPUS_SENDER, OUTSIDE_RCPT)
    assert code == 554
    assert b"Relay access denied" in text


def test_closed_accepts_its_own_recipients(postfix_lab: dict[str, PostfixInstance]) -> None:
    closed = postfix_lab["closed"]
    assert _rcpt_reply(closed, OUTSIDE_SENDER, "alice@campus.test")[0] == 250
    code, text = _rcpt_reply(closed, OUTSIDE_SENDER, "nobody@campus.test")
    assert code == 550
    assert b"User unknown" in text


def test_closed_relays_for_its_own_network(postfix_lab: dict[str, PostfixInstance]) -> None:
    # The verdict depends on the vantage point: 127.0.0.1 is inside the closed mynetworks.
    code, _ = _rcpt_reply(postfix_lab["closed"], OUTSIDE_SENDER, OUTSIDE_RCPT, source="127.0.0.1")
    assert code == 250


def test_open_accepts_relay(postfix_lab: dict[str, PostfixInstance]) -> None:
    code, text = _rcpt_reply(postfix_lab["open"], OUTSIDE_SENDER, OUTSIDE_RCPT)
    assert code == 250, text


def test_campus_sender_relays_for_campus_sender(postfix_lab: dict[str, PostfixInstance]) -> None:
    code, text = _rcpt_reply(postfix_lab["campus-sender"], CAMPUS_SENDER, OUTSIDE_RCPT)
    assert code == 250, text


def test_campus_sender_refuses_outside_sender(postfix_lab: dict[str, PostfixInstance]) -> None:
    code, text = _rcpt_reply(postfix_lab["campus-sender"], OUTSIDE_SENDER, OUTSIDE_RCPT)
    assert code == 554
    assert b"Relay access denied" in text


def test_auth_required_advertises_auth_and_answers_530(
    postfix_lab: dict[str, PostfixInstance],
) -> None:
    instance = postfix_lab["auth-required"]
    client = _connect(instance)
    try:
        assert client.has_extn("auth")
        assert "PLAIN" in client.esmtp_features["auth"].split()
        # No SASL user exists: every login fails.
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login("alice", "secret")
        assert failed.value.smtp_code == 535
    finally:
        client.quit()
    code, text = _rcpt_reply(instance, CAMPUS_SENDER, OUTSIDE_RCPT)
    assert code == 530
    assert b"Authentication required" in text
    assert _rcpt_reply(instance, OUTSIDE_SENDER, "alice@campus.test")[0] == 250


def test_open_relay_delivers_to_the_sink(
    postfix_lab: dict[str, PostfixInstance], sink: SinkHandler
) -> None:
    open_relay = postfix_lab["open"]
    token = uuid.uuid4().hex
    message = EmailMessage()
    message["From"] = CAMPUS_SENDER
    message["To"] = "canary@canary.test"
    message["Subject"] = f"relayaudit canary {token}"
    message.set_content(f"relayaudit lab delivery test, token {token}\n")
    client = _connect(open_relay)
    try:
        refused = client.send_message(message)
    finally:
        client.quit()
    assert refused == {}

    received = sink.wait_for(lambda m: token.encode() in m.content, DELIVERY_TIMEOUT_S)
    assert received is not None, (
        f"sink got nothing with token {token} within {DELIVERY_TIMEOUT_S:.0f} s;"
        f" it has {len(sink.messages)} other message(s)\n{open_relay.maillog()[-3000:]}"
    )
    assert received.rcpt_tos == ("canary@canary.test",)
    assert received.mail_from == CAMPUS_SENDER
    assert received.peer == open_relay.host
