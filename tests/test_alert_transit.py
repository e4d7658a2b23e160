"""Hook secrets in transit and at rest (issue 22, item 2): TLS for the email hook, no token over
plain HTTP, secrets scrubbed in every encoding, command hooks without the daemon's environment."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from leaks import exception_texts
from pydantic import SecretStr
from structlog.testing import capture_logs
from test_alerts import Receiver, open_store, raise_alerts, receiving
from trusted_tls import TrustedTLS, trusted_tls

import relayaudit
from relayaudit.alerts import (
    DeliveryError,
    Dispatcher,
    deliver_email,
    deliver_webhook,
    render_payload,
)
from relayaudit.config import (
    AlertsConfig,
    CommandHook,
    Config,
    EmailHook,
    WebhookHook,
    parse_config,
)
from relayaudit.errors import ConfigError
from relayaudit.state import Alert, StateStore

USER = "relayaudit"
# "???" and ">>>" make base64 write "/" and "+" (so the URL-safe form differs); "/", "+", " ",
# "&", "%" and the umlaut make every percent-encoding differ from the raw text
PASSWORD = "Gw-pw ???>>> /+&%ü 4711"
TOKEN = "tok/+ ???>>> 0815"


def written_forms(secret: str, user: str | None = None) -> set[str]:
    """Every form of `secret` that must never be logged: raw, base64 (standard and URL-safe,
    padded or not), percent-encoded, and, with a user, the AUTH PLAIN strings in base64.

    Written out here on purpose, not imported from relayaudit.alerts."""
    plain = [secret]
    if user is not None:
        plain += [f"\0{user}\0{secret}", f"{user}\0{user}\0{secret}"]
    forms = {
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        quote_plus(secret, safe="/"),
    }
    for text in plain:
        for encoded in (base64.b64encode(text.encode()), base64.urlsafe_b64encode(text.encode())):
            forms |= {encoded.decode(), encoded.decode().rstrip("=")}
    return forms


def assert_no_form(texts: list[str], secret: str, user: str | None = None) -> None:
    for text in texts:
        for form in written_forms(secret, user):
            assert form not in text, f"a form of the secret ({form!r}) leaked into: {text!r}"


def named(*hooks: dict[str, Any]) -> list[dict[str, Any]]:
    """Several hooks of one kind need names (issue 23): hook-0, hook-1, ..."""
    return [{"name": f"hook-{i}", **hook} for i, hook in enumerate(hooks)]


def config_of(alerts: dict[str, Any]) -> Config:
    return parse_config(
        {"scope": ["192.0.2.0/24"], "targets": ["192.0.2.0/24"], "alerts": alerts}, source="t.toml"
    )


def error_of(alerts: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_of(alerts)
    return str(info.value)


MAIL = {
    "host": "mail.campus.example",
    "mail_from": "relayaudit@campus.example",
    "to": ["iso@campus.example"],
}


# -- a mail gateway with STARTTLS, implicit TLS and AUTH ---------------------------------------


@dataclass
class Gateway:
    """SMTP on 127.0.0.1: STARTTLS, implicit TLS and AUTH as told. A wrong credential is answered
    535 quoting the client's credential line back, as the gateway of the incident did."""

    tls: TrustedTLS
    starttls: bool = True  # offers STARTTLS
    implicit: bool = False  # TLS from the first byte
    auth: str = "PLAIN LOGIN"  # mechanisms offered (inside TLS and outside)
    password: str = ""  # the password accepted
    lines: list[tuple[bool, bytes]] = field(default_factory=list)  # (inside TLS?, line) received
    messages: list[bytes] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, ssl=self.tls.server if self.implicit else None
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    def received(self, verb: bytes) -> list[tuple[bool, bytes]]:
        return [(secure, line) for secure, line in self.lines if line.upper().startswith(verb)]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                await self._serve(reader, writer)
        except (TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _line(self, reader: asyncio.StreamReader, secure: bool) -> bytes:
        line = (await reader.readline()).rstrip(b"\r\n")
        self.lines.append((secure, line))
        return line

    def _accepts(self, mechanism: bytes, credential: bytes) -> bool:
        try:
            decoded = base64.b64decode(credential, validate=True).decode()
        except ValueError:
            return False
        given = decoded.split("\0")[-1] if mechanism == b"PLAIN" else decoded
        return bool(self.password) and given == self.password

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        secure = self.implicit
        writer.write(b"220 gateway.campus.test ESMTP\r\n")
        for _ in range(50):
            await writer.drain()
            line = await self._line(reader, secure)
            verb = line.split(b" ", 1)[0].upper()
            if verb == b"EHLO":
                offers = [b"gateway.campus.test", b"AUTH " + self.auth.encode()]
                if self.starttls and not secure:
                    offers.append(b"STARTTLS")
                writer.write(
                    b"".join(b"250-" + o + b"\r\n" for o in offers[:-1])
                    + b"250 "
                    + offers[-1]
                    + b"\r\n"
                )
            elif verb == b"STARTTLS" and self.starttls and not secure:
                writer.write(b"220 2.0.0 ready\r\n")
                await writer.drain()
                await writer.start_tls(self.tls.server)
                secure = True
            elif verb == b"AUTH":
                _, mechanism, *initial = line.split(b" ")
                mechanism = mechanism.upper()
                if mechanism == b"LOGIN":
                    writer.write(b"334 UGFzc3dvcmQ6\r\n")
                    await writer.drain()
                    credential = await self._line(reader, secure)
                else:
                    credential = initial[0] if initial else b""
                if self._accepts(mechanism, credential):
                    writer.write(b"235 2.7.0 authenticated\r\n")
                else:
                    writer.write(b"535 5.7.8 authentication failed for " + credential + b"\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                body = b""
                while not body.endswith(b"\r\n.\r\n") and len(body) < 1_000_000:
                    chunk = await reader.readline()
                    if not chunk:
                        return
                    body += chunk
                self.messages.append(body)
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"502 5.5.2 not here\r\n")


@contextlib.asynccontextmanager
async def serving(gateway: Gateway) -> AsyncIterator[Gateway]:
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


@pytest.fixture
def tls(tmp_path: Path) -> TrustedTLS:
    return trusted_tls(tmp_path)


@pytest.fixture
def alert(tmp_path: Path) -> Alert:
    with StateStore(tmp_path / "scratch.sqlite") as store:
        return raise_alerts(store, ports=(25,))[0]


def email_hook(port: int, **options: Any) -> EmailHook:
    return EmailHook(
        host="127.0.0.1",
        port=port,
        mail_from="relayaudit@iso.campus.test",
        to=("rt@campus.test",),
        timeout=5,
        **options,
    )


# -- email: tls --------------------------------------------------------------------------------


def test_tls_key_defaults_and_the_old_starttls_key() -> None:
    tls_of = [
        h.tls
        for h in config_of(
            {
                "email": named(
                    MAIL,  # no credentials: plain SMTP, as before
                    {**MAIL, "username": USER, "password": "x"},  # credentials: STARTTLS required
                    {**MAIL, "port": 465},  # submissions: TLS from the first byte
                    {**MAIL, "port": 465, "username": USER, "password": "x"},
                    {**MAIL, "tls": "implicit", "port": 2465},
                )
            }
        ).alerts.email
    ]
    assert tls_of == ["none", "starttls", "implicit", "implicit", "implicit"]

    old = config_of(
        {"email": named({**MAIL, "starttls": True}, {**MAIL, "starttls": False}, MAIL)}
    )
    assert [h.tls for h in old.alerts.email] == ["starttls", "none", "none"]
    assert old.warnings == (
        'alerts.email[0].starttls: the old name of tls; starttls = true is read as tls = "starttls" '
        "(write that instead)",
        'alerts.email[1].starttls: the old name of tls; starttls = false is read as tls = "none" '
        "(write that instead)",
    )
    assert config_of({"email": [{**MAIL, "tls": "starttls"}]}).warnings == ()
    # the old key is not part of what is dumped (nor of the config fingerprint)
    assert "starttls" not in old.alerts.email[0].model_dump()


def test_tls_config_errors_name_the_key_and_value() -> None:
    with_password = {**MAIL, "username": USER, "password": PASSWORD}
    assert error_of({"email": named(MAIL, {**with_password, "tls": "none"})}) == (
        "t.toml: alerts.email[1].tls: 'none' with a username or password would send them in clear "
        'text; use tls = "starttls" (port 587) or tls = "implicit" (port 465)'
    )
    assert error_of({"email": [{**with_password, "starttls": False}]}) == (
        "t.toml: alerts.email[0].tls: 'none' (from starttls = false) with a username or password "
        'would send them in clear text; use tls = "starttls" (port 587) or tls = "implicit" (port 465)'
    )
    assert error_of({"email": [{**MAIL, "tls": "starttls", "starttls": True}]}) == (
        "t.toml: alerts.email[0]: tls and starttls are both given: starttls is the old name of tls; "
        'keep only tls ("starttls", "implicit" or "none")'
    )
    assert error_of({"email": [{**MAIL, "tls": "ssl"}]}).startswith("t.toml: alerts.email[0].tls: ")
    assert PASSWORD not in error_of({"email": [{**with_password, "tls": "none"}]})


async def test_credentials_never_cross_in_clear_when_the_gateway_offers_no_starttls(
    tls: TrustedTLS, alert: Alert
) -> None:
    async with serving(Gateway(tls, starttls=False, password=PASSWORD)) as gateway:
        # as a configuration written before `tls` existed: credentials, no TLS key
        hook = email_hook(gateway.port, username=USER, password=SecretStr(PASSWORD))
        with pytest.raises(DeliveryError, match="STARTTLS") as info:
            await deliver_email(hook, alert, render_payload(alert))
    assert gateway.received(b"EHLO")  # it did talk to the gateway
    assert gateway.received(b"AUTH") == [] and gateway.received(b"MAIL") == []
    assert_no_form([line.decode("latin-1") for _, line in gateway.lines], PASSWORD, USER)
    assert_no_form(exception_texts(info.value), PASSWORD, USER)


async def test_starttls_sends_credentials_and_message_only_inside_verified_tls(
    tls: TrustedTLS, alert: Alert, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(Gateway(tls, password=PASSWORD)) as gateway:
        hook = email_hook(gateway.port, username=USER, password=SecretStr(PASSWORD))
        # an untrusted certificate: nothing is sent
        with pytest.raises(DeliveryError, match=r"(?i)certificate"):
            await deliver_email(hook, alert, render_payload(alert))
        assert gateway.received(b"AUTH") == [] and gateway.messages == []
        # trusted (through the system store, as an operator's own CA would be)
        monkeypatch.setenv("SSL_CERT_FILE", str(tls.cafile))
        await deliver_email(hook, alert, render_payload(alert))
    assert len(gateway.messages) == 1
    for verb in (b"AUTH", b"MAIL", b"RCPT", b"DATA"):
        assert gateway.received(verb) and all(secure for secure, _ in gateway.received(verb)), verb


async def test_implicit_tls_speaks_tls_from_the_first_byte(
    tls: TrustedTLS, alert: Alert, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.cafile))
    async with serving(Gateway(tls, implicit=True, starttls=False, password=PASSWORD)) as gateway:
        hook = email_hook(gateway.port, tls="implicit", username=USER, password=SecretStr(PASSWORD))
        await deliver_email(hook, alert, render_payload(alert))
    assert len(gateway.messages) == 1
    assert gateway.lines and all(secure for secure, _ in gateway.lines)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_a_gateway_echoing_the_auth_line_leaks_no_form_of_the_password(
    tls: TrustedTLS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mechanism: str
) -> None:
    # the incident: a 535 reply quoting the client's base64 AUTH line reached the log
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.cafile))
    async with serving(Gateway(tls, auth=mechanism, password="not the one configured")) as gateway:
        hook = email_hook(gateway.port, username=USER, password=SecretStr(PASSWORD))
        config = AlertsConfig(email=(hook,), max_attempts=1)
        store = open_store(tmp_path / "state.sqlite", config)
        try:
            alert = raise_alerts(store, ports=(25,))[0]
            with pytest.raises(DeliveryError) as info:
                await deliver_email(hook, alert, render_payload(alert))
            with capture_logs() as logs:
                await Dispatcher(store, config).run_once()
            dead = store.dead_letters()
        finally:
            store.close()
    # the gateway did echo what the client sent, and the echo was scrubbed
    assert gateway.received(b"AUTH " + mechanism.encode())
    assert "535" in str(info.value) and "***" in str(info.value)
    texts = [
        *exception_texts(info.value),
        json.dumps(logs, default=str),
        *(d.last_error or "" for d in dead),
    ]
    assert dead and any(e["event"] == "alert.dead" for e in logs)
    assert_no_form(texts, PASSWORD, USER)


# -- webhook -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["token", "hmac_key"])
def test_a_webhook_secret_over_plain_http_is_refused_at_load(key: str) -> None:
    url = "http://tickets.campus.example:8080/hooks/s3cret-path?sig=s3cret-query"
    error = error_of({"webhook": [{"url": url, key: TOKEN}]})
    assert error == (
        f"t.toml: alerts.webhook[0].{key}: refused over http://tickets.campus.example: the request "
        "would carry it in clear text; use an https:// url (http:// only to a loopback host: "
        "127.0.0.0/8, ::1, localhost)"
    )
    assert "s3cret" not in error and TOKEN not in error
    v6 = error_of({"webhook": [{"url": "http://[2001:db8::80]/h", key: TOKEN}]})
    assert "refused over http://[2001:db8::80]:" in v6


@pytest.mark.parametrize("later", ["update_url", "resolve_url", "move_url"])
def test_a_webhook_secret_is_refused_for_a_later_call_over_plain_http(later: str) -> None:
    # before: only `url` was checked (the later URLs were not yet validated when the secret's
    # validator ran), so a ticket's update could carry the token in clear text
    hook = {
        "url": "https://tickets.campus.example/api",
        "token": TOKEN,
        "ticket_ref": "/id",
        later: "http://tickets.campus.example/api/{{ ticket_ref }}?sig=s3cret-query",
    }
    error = error_of({"webhook": [hook]})
    assert f"token: refused over http://tickets.campus.example ({later}): " in error, error
    assert "s3cret" not in error and TOKEN not in error
    hook[later] = "http://127.0.0.1:8080/api/{{ ticket_ref }}"  # loopback: a local agent
    config_of({"webhook": [hook]})


def test_a_webhook_secret_over_http_to_loopback_or_https_loads() -> None:
    urls = [
        "http://127.0.0.1:8080/h",
        "http://127.9.8.7/h",
        "http://[::1]:8080/h",
        "http://localhost/h",
        "http://LOCALHOST:80/h",
        "https://tickets.campus.example/h",
    ]
    config = config_of(
        {"webhook": named(*({"url": u, "token": TOKEN, "hmac_key": TOKEN} for u in urls))}
    )
    assert len(config.alerts.webhook) == len(urls)
    # no secret, no refusal
    assert config_of({"webhook": [{"url": "http://tickets.campus.example/h"}]}).alerts.webhook


async def test_a_webhook_echoing_the_token_encoded_leaks_no_form_of_it(alert: Alert) -> None:
    echoed = " ".join(sorted(written_forms(TOKEN)))
    async with receiving(Receiver(status=401, body=f"you sent: {echoed}".encode())) as r:
        hook = WebhookHook(url=r.url, timeout=3, token=SecretStr(TOKEN))
        with pytest.raises(DeliveryError) as info:
            await deliver_webhook(hook, render_payload(alert), alert.key)
    assert "HTTP 401" in str(info.value) and "***" in str(info.value)
    assert_no_form(exception_texts(info.value), TOKEN)


# -- command: the environment --------------------------------------------------------------------

DUMP_ENV = "import json, os, sys; sys.stdin.read(); open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))"


async def test_a_command_hook_gets_a_minimal_environment_and_the_idempotency_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAYAUDIT_TEST_DB_PASSWORD", "daemon-only-secret")
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("TZ", "Europe/Zurich")
    out = tmp_path / "env.json"
    hook = CommandHook(argv=(sys.executable, "-c", DUMP_ENV, str(out)), timeout=10)
    config = AlertsConfig(command=(hook,))
    store = open_store(tmp_path / "state.sqlite", config)
    try:
        alert = raise_alerts(store, ports=(25,))[0]
        assert await Dispatcher(store, config, batch=1).run_once() == 1  # the first alert only
    finally:
        store.close()
    env = json.loads(out.read_text())
    assert "RELAYAUDIT_TEST_DB_PASSWORD" not in env
    assert "daemon-only-secret" not in out.read_text()
    assert env["PATH"] == os.environ["PATH"]
    assert env["LANG"] == "C.UTF-8" and env["TZ"] == "Europe/Zurich"
    assert env["RELAYAUDIT_IDEMPOTENCY_KEY"] == alert.key
    if relayaudit._SET_PLUGINS_OFF:  # relayaudit's own setting is never passed on
        assert "PYDANTIC_DISABLE_PLUGINS" not in env


async def test_a_command_hook_gets_the_variables_its_env_key_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TICKET_API_TOKEN", "for-the-hook")
    monkeypatch.setenv("RELAYAUDIT_TEST_OTHER", "not-listed")
    monkeypatch.delenv("TICKET_QUEUE", raising=False)
    out = tmp_path / "env.json"
    config = config_of(
        {
            "command": [
                {
                    "argv": [sys.executable, "-c", DUMP_ENV, str(out)],
                    "env": ["TICKET_API_TOKEN", "TICKET_QUEUE"],
                }
            ]
        }
    )
    store = open_store(tmp_path / "state.sqlite", config.alerts)
    try:
        raise_alerts(store, ports=(25,))
        assert await Dispatcher(store, config.alerts, batch=1).run_once() == 1
    finally:
        store.close()
    env = json.loads(out.read_text())
    assert env["TICKET_API_TOKEN"] == "for-the-hook"
    assert "TICKET_QUEUE" not in env  # listed but not set: left out, not set empty
    assert "RELAYAUDIT_TEST_OTHER" not in env


def test_the_env_key_takes_variable_names_only() -> None:
    argv = ["/usr/local/bin/ticket"]
    assert error_of({"command": [{"argv": argv, "env": ["A=B"]}]}) == (
        "t.toml: alerts.command[0].env: 'A=B' is not an environment variable name"
    )
    assert error_of({"command": [{"argv": argv, "env": ["RELAYAUDIT_IDEMPOTENCY_KEY"]}]}) == (
        "t.toml: alerts.command[0].env: 'RELAYAUDIT_IDEMPOTENCY_KEY' is set by relayaudit for each "
        "run; do not list it"
    )
    assert error_of({"command": [{"argv": argv, "env": ["HOME", "HOME"]}]}) == (
        "t.toml: alerts.command[0].env: ['HOME', 'HOME'] lists a name twice"
    )
