"""Alert delivery against real receivers on 127.0.0.1: webhook, command subprocess, SMTP gateway."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from factories import ADDR, T0, make_finding, observe
from http_stub import listen, read_request
from leaks import exception_texts
from loopback import free_port
from pydantic import SecretStr
from smtp_sink import MessageSink
from structlog.testing import capture_logs

import relayaudit
from relayaudit.alerts import (
    DeliveryError,
    Dispatcher,
    channel_names,
    deliver_command,
    deliver_email,
    deliver_webhook,
    email_subject,
    render_payload,
)
from relayaudit.config import AlertsConfig, CommandHook, EmailHook, WebhookHook
from relayaudit.engine import SweepStats
from relayaudit.evidence import Exchange, Reply
from relayaudit.lab import server_tls_context
from relayaudit.state import Alert, StateStore, Transition
from relayaudit.verdict import Finding, FindingKind, Severity, VerdictStatus, finding_id

TOKEN = "tok-9f8e7d6c5b4a-SECRET"
HMAC_KEY = "hmac-0a1b2c3d4e5f-SECRET"
PASSWORD = "pw-77aa88bb99cc-SECRET"
SECRETS = (TOKEN, HMAC_KEY, PASSWORD)

pytestmark = pytest.mark.time_limit(30)  # a safety net on top of each test's own deadlines


# -- alerts made by a real store ---------------------------------------------------------------


def relay_finding(port: int, severity: Severity, when: datetime) -> Finding:
    return make_finding(
        port=port,
        severity=severity,
        when=when,
        title=f"Open relay on {ADDR}:{port}",
        summary="3 of the relay tests accepted.",
        transcript=(
            Exchange(command=None, reply=Reply(code=220, text="mx.campus.test ESMTP")),
            Exchange(
                command="RCPT TO:<relaytest@relay-test.example>", reply=Reply(code=250, text="Ok")
            ),
        ),
    )


def raise_alerts(store: StateStore, ports: tuple[int, ...]) -> list[Alert]:
    """Per port: NEW, SEVERITY_RAISED, RESOLVED (two misses), REOPENED: four ordered alerts each."""
    plan: list[tuple[Severity | None, int]] = [
        (Severity.MEDIUM, 0),
        (Severity.CRITICAL, 1),
        (None, 2),
        (None, 3),
        (Severity.HIGH, 4),
    ]
    alerts: list[Alert] = []
    for severity, day in plan:
        when = T0 + timedelta(days=day)
        rec = store.begin_sweep(shard="0/1", config_fingerprint="fp", total=len(ports))
        for port in ports:
            if severity:
                seen = observe(relay_finding(port, severity, when), port=port, when=when)
            else:  # the relay was fixed: an SMTP server that refuses
                seen = observe(port=port, when=when, status=VerdictStatus.RELAY_REFUSED)
            alerts += store.record(rec.id, *seen)
        store.complete_sweep(rec.id, SweepStats())
    assert len(alerts) == 4 * len(ports)
    return alerts


def open_store(path: Path, config: AlertsConfig) -> StateStore:
    store = StateStore(path, resolve_after=2)
    store.open()
    store.set_channels(channel_names(config))
    return store


async def eventually(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> None:
    for _ in range(int(timeout / interval) + 1):
        if predicate():
            return
        await asyncio.sleep(interval)
    assert predicate(), f"condition not met within {timeout}s"


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"a secret leaked into: {text!r}"


# -- a webhook receiver ------------------------------------------------------------------------


@dataclass
class Received:
    key: str
    headers: dict[str, str]
    body: bytes
    answered: int | None  # None: the connection was dropped without an answer


@dataclass
class Receiver:
    """HTTP/1.1 on 127.0.0.1 with a script of failures; dedupes by Idempotency-Key like a good
    ticketing system (a ticket is opened on the first acceptance of a key only)."""

    fail_first: int = 0  # answer 500 to this many requests
    drop_after_accept: int = 0  # then accept (open the ticket) but drop the connection this often
    down_for: float = 0.0  # then close the listener (connection refused) this long
    status: int = 200  # otherwise answer this
    body: bytes = b""
    hang: bool = False  # accept and never answer
    requests: list[Received] = field(default_factory=list)
    tickets: list[str] = field(default_factory=list)
    lost_answers: list[str] = field(default_factory=list)  # keys accepted whose answer was dropped
    port: int = 0
    _open: set[asyncio.StreamWriter] = field(default_factory=set)
    _server: asyncio.Server | None = None
    _went_down: bool = False

    async def start(self) -> None:
        self._server, self.port = await listen(self._handle, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):  # 3.11's close() leaves accepted connections open
                writer.transport.abort()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None

    async def _bounce(self) -> None:
        await self.stop()  # a real outage: connections are refused, not answered
        await asyncio.sleep(self.down_for)
        await self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/relayaudit"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            async with asyncio.timeout(5):
                await self._serve(reader, writer)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._open.discard(writer)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, body = await read_request(reader)
        if self.hang:
            await asyncio.sleep(10)
        key = headers.get("idempotency-key", "")
        n = len(self.requests)
        if n < self.fail_first:
            return self._answer(writer, key, headers, body, 500, b"upstream database unavailable")
        if n < self.fail_first + self.drop_after_accept:
            self._accept(key)
            self.lost_answers.append(key)
            self.requests.append(Received(key, headers, body, None))
            writer.transport.abort()  # the ticket exists, the answer is lost
            return None
        if self.down_for and not self._went_down:
            self._went_down = True
            self.requests.append(Received(key, headers, body, None))
            writer.transport.abort()
            asyncio.get_running_loop().create_task(self._bounce())
            return None
        if 200 <= self.status < 300:
            self._accept(key)
        return self._answer(writer, key, headers, body, self.status, self.body)

    def _accept(self, key: str) -> None:
        if key not in self.tickets:
            self.tickets.append(key)

    def _answer(
        self,
        writer: asyncio.StreamWriter,
        key: str,
        headers: dict[str, str],
        body: bytes,
        status: int,
        reply: bytes,
    ) -> None:
        self.requests.append(Received(key, headers, body, status))
        writer.write(
            f"HTTP/1.1 {status} Whatever\r\nContent-Length: {len(reply)}\r\nConnection: close\r\n\r\n".encode()
            + reply
        )


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@contextlib.asynccontextmanager
async def dispatching(dispatcher: Dispatcher) -> AsyncIterator[Dispatcher]:
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(dispatcher.run(stop))
    try:
        yield dispatcher
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task


# -- webhook -----------------------------------------------------------------------------------


async def test_every_alert_arrives_once_in_order_through_failures_an_outage_and_a_restart(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    async with asyncio.timeout(20):
        receiver = Receiver(fail_first=4, drop_after_accept=2, down_for=1.0)
        async with receiving(receiver):
            config = AlertsConfig(
                webhook=(
                    WebhookHook(
                        url=receiver.url,
                        timeout=2.0,
                        token=SecretStr(TOKEN),
                        hmac_key=SecretStr(HMAC_KEY),
                    ),
                ),
                max_attempts=100,
                backoff_initial=0.05,
                backoff_max=0.4,
            )
            path = tmp_path / "state.sqlite"
            store = open_store(path, config)
            alerts = raise_alerts(store, ports=(25, 465, 587))
            try:
                async with dispatching(Dispatcher(store, config, poll_interval=0.05)):
                    await eventually(lambda: receiver._went_down, 10)
                assert store.outbox_counts()["pending"] > 0  # there is something left to carry over
            finally:
                store.close()  # the daemon stops while the receiver is down: a restart
            store = open_store(path, config)
            try:
                async with dispatching(Dispatcher(store, config, poll_interval=0.05)):
                    await eventually(lambda: len(receiver.tickets) == len(alerts), 12)
                    await eventually(lambda: store.outbox_counts()["pending"] == 0, 5)
                assert store.outbox_counts() == {"pending": 0, "sent": len(alerts), "dead": 0}
            finally:
                store.close()

    # exactly once, by idempotency key, and no ticket that was not an alert
    keys = [a.key for a in alerts]
    assert sorted(receiver.tickets) == sorted(keys)
    assert len(set(receiver.tickets)) == len(receiver.tickets)
    # the lost answers made the dispatcher resend; the receiver's dedupe by key absorbed them
    assert len(receiver.lost_answers) == 2
    sent = Counter(r.key for r in receiver.requests)
    for key in receiver.lost_answers:
        assert sent[key] >= 2 and receiver.tickets.count(key) == 1
        assert any(r.key == key and r.answered == 200 for r in receiver.requests)
    assert sum(1 for r in receiver.requests if r.answered is None) == 3  # 2 drops + outage
    # in order per finding: each finding's tickets follow its transitions
    for port in (25, 465, 587):
        fid = finding_id(FindingKind.OPEN_RELAY, ADDR, port)
        mine = [k for k in receiver.tickets if k.startswith(fid)]
        assert mine == [a.key for a in alerts if a.finding.id == fid]
        assert [k.split("/")[1] for k in mine] == ["new", "severity-raised", "resolved", "reopened"]
    # every request carried the headers, and the signature verifies with the key
    for request in receiver.requests:
        h = request.headers
        assert h["content-type"] == "application/json"
        assert h["authorization"] == f"Bearer {TOKEN}"
        expected = hmac.new(HMAC_KEY.encode(), request.body, hashlib.sha256).hexdigest()
        assert h["x-relayaudit-signature"] == f"sha256={expected}"
        doc = json.loads(request.body)
        assert doc["idempotency_key"] == h["idempotency-key"] == request.key
        # the compact alert v2 (alerts.format's default): what a ticket needs, not the transcript
        assert doc["schema_version"] == 2 and doc["finding_id"] == request.key.split("/")[0]
        assert "transcript" not in doc and doc["show"] == f"relayaudit show {doc['finding_id']}"
    assert time.monotonic() - started < 20


async def test_webhook_failures_never_reveal_secrets(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s.sqlite") as scratch:
        alert = raise_alerts(scratch, ports=(25,))[0]
    payload = render_payload(alert)
    texts: list[str] = []

    def hook(url: str, timeout: float = 2.0) -> WebhookHook:
        return WebhookHook(
            url=url, timeout=timeout, token=SecretStr(TOKEN), hmac_key=SecretStr(HMAC_KEY)
        )

    async def failure(h: WebhookHook) -> DeliveryError:
        with pytest.raises(DeliveryError) as info:
            await deliver_webhook(h, payload, alert.key)
        texts.extend(exception_texts(info.value))
        return info.value

    refused = await failure(hook(f"http://127.0.0.1:{free_port()}/x/{TOKEN}"))  # secret in the path
    assert "127.0.0.1" in str(refused) and "/x/" not in str(refused)
    # a receiver that echoes the request headers back in its error page
    echo = Receiver(status=401, body=f"bad credentials: Bearer {TOKEN} sig {HMAC_KEY}".encode())
    async with receiving(echo):
        unauthorized = await failure(hook(echo.url))
    assert unauthorized.status == 401 and "client error" in str(unauthorized)
    assert "***" in str(unauthorized)
    for status in (408, 429, 503):
        async with receiving(Receiver(status=status)) as r:
            error = await failure(hook(r.url))
        assert error.status == status and "client error" not in str(error)
    async with receiving(Receiver(hang=True)) as r:
        started = time.monotonic()
        timed_out = await failure(hook(r.url, timeout=0.3))
        assert time.monotonic() - started < 2
    assert "no answer within 0.3s" in str(timed_out)
    async with receiving(Receiver(status=204)) as r:
        await deliver_webhook(hook(r.url), payload, alert.key)  # any 2xx is delivered
    # https: the lab's self-signed certificate is refused (certificates are verified)
    tls = await asyncio.start_server(
        lambda _r, w: w.close(), "127.0.0.1", 0, ssl=server_tls_context("hooks.campus.test")
    )
    try:
        untrusted = await failure(hook(f"https://127.0.0.1:{tls.sockets[0].getsockname()[1]}/"))
    finally:
        tls.close()
    assert "certificate" in str(untrusted).lower()
    assert_no_secret(*texts)

    # and through the dispatcher: nothing secret in the outbox or in the logs
    config = AlertsConfig(
        webhook=(hook(echo.url),), max_attempts=2, backoff_initial=0.01, backoff_max=0.01
    )
    store = open_store(tmp_path / "d.sqlite", config)
    try:
        raise_alerts(store, ports=(25,))
        async with receiving(Receiver(status=401, body=f"echo {TOKEN}".encode(), port=echo.port)):
            dispatcher = Dispatcher(store, config)
            with capture_logs() as logs:
                for _ in range(20):
                    await dispatcher.run_once()
                    if store.outbox_counts()["dead"] == 1:
                        break
                    await asyncio.sleep(0.02)
        assert store.outbox_counts()["dead"] == 1
        assert dispatcher.dead == 1
        (dead,) = store.dead_letters()
        assert dead.last_error is not None and "HTTP 401" in dead.last_error
        assert_no_secret(dead.last_error, json.dumps(logs, default=str))
        assert any(e["event"] == "alert.dead" for e in logs)
    finally:
        store.close()


# -- command -----------------------------------------------------------------------------------

APPEND_STDIN = "import sys; open(sys.argv[1], 'ab').write(sys.stdin.buffer.read() + b'\\n')"
FAIL_3 = (
    "import sys; sys.stdin.buffer.read(); open(sys.argv[1], 'a').write('x'); "
    "sys.stderr.write('ticket system says no\\n'); sys.exit(3)"
)


async def test_command_hook_receives_the_json_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "tickets.jsonl"
    config = AlertsConfig(
        command=(CommandHook(argv=(sys.executable, "-c", APPEND_STDIN, str(out)), timeout=10),)
    )
    store = open_store(tmp_path / "state.sqlite", config)
    try:
        alerts = raise_alerts(store, ports=(25, 587))
        dispatcher = Dispatcher(store, config)
        async with asyncio.timeout(20):
            assert await dispatcher.drain(15) == 0
        docs = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(d["idempotency_key"] for d in docs) == sorted(a.key for a in alerts)
        for fid in {a.finding.id for a in alerts}:
            assert [d["idempotency_key"] for d in docs if d["finding_id"] == fid] == [
                a.key for a in alerts if a.finding.id == fid
            ]
        assert store.outbox_counts() == {"pending": 0, "sent": 8, "dead": 0}
    finally:
        store.close()


async def test_a_failing_command_is_retried_then_dead_lettered(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    hook = CommandHook(argv=(sys.executable, "-c", FAIL_3, str(runs)), timeout=10)
    config = AlertsConfig(command=(hook,), max_attempts=3, backoff_initial=0.01, backoff_max=0.05)
    store = open_store(tmp_path / "state.sqlite", config)
    try:
        (alert,) = raise_alerts(store, ports=(25,))[:1]
        with pytest.raises(DeliveryError) as info:
            await deliver_command(hook, render_payload(alert), alert.key)
        assert info.value.returncode == 3
        assert "exited 3: ticket system says no" in str(info.value)
        runs.unlink()
        dispatcher = Dispatcher(store, config)
        async with asyncio.timeout(20):
            for _ in range(200):
                await dispatcher.run_once()
                if store.outbox_counts()["pending"] == 0:
                    break
                await asyncio.sleep(0.02)
        # four alerts, each tried max_attempts times (the later ones wait behind the first)
        assert store.outbox_counts() == {"pending": 0, "sent": 0, "dead": 4}
        assert runs.read_text() == "x" * 12
        assert dispatcher.dead == 4 and dispatcher.retried == 8
        assert all("exited 3" in (d.last_error or "") for d in store.dead_letters())
    finally:
        store.close()


async def test_a_hanging_command_is_killed_at_its_timeout(tmp_path: Path) -> None:
    hook = CommandHook(argv=(sys.executable, "-c", "import time; time.sleep(30)"), timeout=0.3)
    started = time.monotonic()
    with pytest.raises(DeliveryError, match=r"no exit within 0\.3s \(killed\)"):
        await deliver_command(hook, b"{}", "k/new/1")
    assert time.monotonic() - started < 5
    with pytest.raises(DeliveryError, match="cannot start"):
        await deliver_command(
            CommandHook(argv=(str(tmp_path / "no-such-program"),)), b"{}", "k/new/1"
        )


async def test_a_command_hook_sees_the_listed_variables_never_relayaudits_own_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # relayaudit turns pydantic's plugin scan off in its own process; a hook must not inherit
    # that, even when its env key names it (the rest of the environment: test_alert_transit.py)
    monkeypatch.setenv("RELAYAUDIT_TEST_MARK", "kept")
    out = tmp_path / "env.json"
    dump = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))"
    hook = CommandHook(
        argv=(sys.executable, "-c", dump, str(out)),
        timeout=10,
        env=("RELAYAUDIT_TEST_MARK", "PYDANTIC_DISABLE_PLUGINS"),
    )
    await deliver_command(hook, b"{}", "k/new/1")
    env = json.loads(out.read_text())
    assert env["RELAYAUDIT_TEST_MARK"] == "kept"
    if relayaudit._SET_PLUGINS_OFF:
        assert os.environ["PYDANTIC_DISABLE_PLUGINS"] == "__all__"  # still on in relayaudit
        assert "PYDANTIC_DISABLE_PLUGINS" not in env


# -- email -------------------------------------------------------------------------------------


async def test_email_alerts_of_one_finding_thread_onto_its_first_mail(
    tmp_path: Path, smtp_sink: tuple[MessageSink, int]
) -> None:
    # issue 23: before, each transition was a new thread (Message-ID from its own key, no
    # In-Reply-To) and the subject changed with the transition, so a mail client showed four
    handler, port = smtp_sink
    hook = EmailHook(
        host="127.0.0.1",
        port=port,
        mail_from="relayaudit@iso.campus.test",
        to=("rt@campus.test",),
        timeout=5,
    )
    config = AlertsConfig(email=(hook,))
    store = open_store(tmp_path / "state.sqlite", config)
    try:
        alerts = raise_alerts(store, ports=(25,))
        async with asyncio.timeout(15):
            assert await Dispatcher(store, config).drain(10) == 0
    finally:
        store.close()
    assert len(handler.messages) == len(alerts)
    first = alerts[0]
    mail_from, rcpts, _ = handler.messages[0]
    assert (mail_from, rcpts) == ("relayaudit@iso.campus.test", ["rt@campus.test"])
    mails = [BytesParser(policy=policy.default).parsebytes(c) for _, _, c in handler.messages]
    root = f"<relayaudit.{first.finding.id}@iso.campus.test>"
    assert mails[0]["Message-ID"] == root and mails[0]["In-Reply-To"] is None
    for mail, alert in zip(mails[1:], alerts[1:], strict=True):
        assert mail["In-Reply-To"] == mail["References"] == root
        assert mail["Message-ID"] == f"<relayaudit.{alert.key.replace('/', '.')}@iso.campus.test>"
    assert [m["X-Relayaudit-Idempotency-Key"] for m in mails] == [a.key for a in alerts]
    # one stable tag per finding; the transition follows it
    tag = f"[relayaudit {first.finding.id}]"
    assert [m["Subject"].split(" ", 2)[:2] for m in mails] == [
        [tag.split(maxsplit=1)[0], f"{first.finding.id}]"]
    ] * 4
    assert [m["Subject"].split()[2] for m in mails] == [
        "NEW:",
        "SEVERITY-RAISED:",
        "RESOLVED:",
        "REOPENED:",
    ]
    assert mails[0]["Subject"] == f"{tag} NEW: {first.finding.title}" == email_subject(first)
    text = mails[0].get_body().get_content()  # type: ignore[union-attr]
    assert text.startswith(f"NEW: Open relay on {ADDR}:25")
    doc = json.loads(text[text.index("-- the alert as JSON") :].split("\n", 1)[1])
    assert doc["idempotency_key"] == first.key and doc["transition"] == Transition.NEW
    resolved = mails[2].get_body().get_content()  # type: ignore[union-attr]
    assert "RESOLVED: " in resolved and "Resolved:    " in resolved  # since when it is gone


async def test_email_failures_never_reveal_the_password(
    tmp_path: Path, smtp_sink: tuple[MessageSink, int]
) -> None:
    _, port = smtp_sink
    with StateStore(tmp_path / "s.sqlite") as store:
        alert = raise_alerts(store, ports=(25,))[0]
    texts: list[str] = []
    for target in (port, free_port()):  # no AUTH offered; nothing listening
        hook = EmailHook(
            host="127.0.0.1",
            port=target,
            username="relayaudit",
            password=SecretStr(PASSWORD),
            mail_from="relayaudit@iso.campus.test",
            to=("rt@campus.test",),
            timeout=3,
        )
        with pytest.raises(DeliveryError) as info:
            await deliver_email(hook, alert, render_payload(alert))
        assert f"127.0.0.1:{target}" in str(info.value)
        texts += exception_texts(info.value)
    assert_no_secret(*texts)
