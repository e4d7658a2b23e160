"""Proves with the stdlib SMTP client only that each lab Postfix has the relay policy it claims."""

from __future__ import annotations

import contextlib
import smtplib
import time
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
    SinkMessage,
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


@contextlib.contextmanager
def _running_sink() -> Iterator[SinkHandler]:
    """An SMTP receiver on the address every lab instance delivers to."""
    handler = SinkHandler()
    controller = Controller(
        handler, hostname=POSTFIX_SINK_HOST, port=POSTFIX_SINK_PORT, server_hostname="sink.test"
    )
    controller.start()
    try:
        yield handler
    finally:
        controller.stop()


@pytest.fixture
def sink() -> Iterator[SinkHandler]:
    with _running_sink() as handler:
        yield handler


def _send_canary(instance: PostfixInstance) -> str:
    """Send one message to canary@canary.test through INSTANCE; returns its unique token."""
    token = uuid.uuid4().hex
    message = EmailMessage()
    message["From"] = CAMPUS_SENDER
    message["To"] = "canary@canary.test"
    message["Subject"] = f"relayaudit canary {token}"
    message.set_content(f"relayaudit lab delivery test, token {token}\n")
    client = _connect(instance)
    try:
        refused = client.send_message(message)
    finally:
        client.quit()
    assert refused == {}
    return token


def _wait_for_canary(sink: SinkHandler, instance: PostfixInstance, token: str) -> SinkMessage:
    received = sink.wait_for(lambda m: token.encode() in m.content, DELIVERY_TIMEOUT_S)
    assert received is not None, (
        f"sink got nothing with token {token} within {DELIVERY_TIMEOUT_S:.0f} s;"
        f" it has {len(sink.messages)} other message(s)\n{instance.maillog()[-3000:]}"
    )
    assert received.rcpt_tos == ("canary@canary.test",)
    assert received.mail_from == CAMPUS_SENDER
    assert received.peer == instance.host
    return received


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
    token = _send_canary(open_relay)
    _wait_for_canary(sink, open_relay, token)


def test_delivery_is_retried_until_a_late_sink_comes_up(
    postfix_lab: dict[str, PostfixInstance],
) -> None:
    open_relay = postfix_lab["open"]
    token = _send_canary(open_relay)
    # With no sink listening the first attempt must fail: that is what makes this a retry test.
    deadline = time.monotonic() + 10
    while "status=deferred (connect to" not in open_relay.maillog():
        assert time.monotonic() < deadline, open_relay.maillog()[-3000:]
        time.sleep(0.1)
    with _running_sink() as sink:
        _wait_for_canary(sink, open_relay, token)
