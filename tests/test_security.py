"""Secrets never leak (logs, findings, state, stderr, exceptions); AUTH redacted; metrics on loopback by default."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import socket
import sqlite3
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword
from daemon_harness import DaemonProcess, StoreView, base_config, write_config
from http_stub import listen, read_request
from hypothesis import given, settings
from hypothesis import strategies as st
from leaks import exception_texts
from loopback import free_port
from smtp_sink import serve_smtp
from trusted_tls import trusted_tls

from relayaudit.alerts import DeliveryError, deliver_email, deliver_webhook, render_payload
from relayaudit.config import load_config, parse_config
from relayaudit.evidence import redact_command
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.probe import ProbeSettings, probe

PORT = 2793


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(12)}"


# -- hostile receivers: they fail a few times, echoing the credentials they were sent ------------------


class EchoingWebhook:
    """Answers the first `failures` POSTs 401 with the request headers in the body, then 200."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests = 0
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        # the same port again after a stop: the hook's URL names it
        self._server, self.port = await listen(self._handle, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head, _, _ = await read_request(reader)
                self.requests += 1
                if self.requests <= self.failures:
                    body = b"denied; you sent: " + head
                    status = b"401 Unauthorized"
                else:
                    self.accepted += 1
                    body, status = b"", b"200 OK"
                writer.write(
                    b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                )
                await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


class EchoingGateway:
    """aiosmtpd handler + authenticator: refuses the first `failures` logins quoting the password."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.logins = 0
        self.messages: list[bytes] = []
        self.lock = threading.Lock()

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        with self.lock:
            self.logins += 1
            if self.logins <= self.failures:
                password = auth_data.password.decode()
                return AuthResult(
                    success=False, handled=False, message=f"535 5.7.8 wrong password {password!r}"
                )
        return AuthResult(success=True)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append(envelope.content)
        return "250 2.0.0 queued"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[EchoingGateway, int, Path]]:
    """The gateway, its port, and the certificate file (SSL_CERT_FILE) that makes it trusted."""
    handler = EchoingGateway(failures=2)
    tls = trusted_tls(tmp_path)
    # credentials go only inside STARTTLS (the email hook's default with a password)
    with serve_smtp(
        handler, authenticator=handler, auth_require_tls=True, tls_context=tls.server
    ) as port:
        yield handler, port, tls.cafile


def db_text(path: Path) -> str:
    """Every row of every table, plus the raw bytes of the file and its WAL (freed pages too)."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    raw = b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
    return dump + "\n" + raw.decode("latin-1")


async def http_get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(5):
            return (await reader.read()).decode()
    finally:
        writer.close()


async def test_secrets_never_appear_in_any_output(
    tmp_path: Path, gateway: tuple[EchoingGateway, int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    token, hmac_key, password, url_secret = (
        unique(n) for n in ("token", "hmac", "password", "urlpath")
    )
    everything = {
        "token": token,
        "hmac_key": hmac_key,
        "password": password,
        "url path": url_secret,
    }
    handler, smtp_port, cafile = gateway
    monkeypatch.setenv("SSL_CERT_FILE", str(cafile))  # for the deliveries in this process
    webhook = EchoingWebhook(failures=2)
    await webhook.start()
    key_file = tmp_path / "hmac.key"
    key_file.write_text(hmac_key + "\n")
    metrics_port = free_port()
    data = base_config(tmp_path, "127.0.78.0/30", PORT)
    data["logging"] = {"file": str(tmp_path / "log.jsonl"), "stdout": True, "level": "debug"}
    data["metrics"] = {"enabled": True, "listen": f"127.0.0.1:{metrics_port}"}
    data["alerts"] = {
        "backoff_initial": "0.1s",
        "backoff_max": "0.3s",
        "max_attempts": 100,
        "webhook": [
            {
                "url": f"http://127.0.0.1:{webhook.port}/hooks/{url_secret}",
                "timeout": "3s",
                "token": {"env": "RELAYAUDIT_TEST_TOKEN"},
                "hmac_key": {"file": str(key_file)},
            }
        ],
        "email": [
            {
                "host": "127.0.0.1",
                "port": smtp_port,
                "username": "relayaudit",
                "password": password,
                "mail_from": "relayaudit@iso.campus.test",
                "to": ["rt@campus.test"],
                "timeout": "5s",
            }
        ],
    }
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    monkeypatch.setenv("RELAYAUDIT_TEST_TOKEN", token)
    stdout = tmp_path / "stdout.txt"
    d = DaemonProcess(
        cfg,
        tmp_path / "log.jsonl",
        env={"RELAYAUDIT_TEST_TOKEN": token, "SSL_CERT_FILE": str(cafile)},
    )
    lab = [
        ServerSpec(host="127.0.78.1", port=PORT, behaviour=Behaviour.OPEN_RELAY),
        ServerSpec(host="127.0.78.2", port=PORT, behaviour=Behaviour.AUTH_NO_TLS),
    ]
    scraped: list[str] = []
    try:
        async with Lab(lab):
            await d.start(stdout=stdout)
            await d.wait_for(
                lambda: (
                    StoreView(tmp_path / "state.sqlite").outbox["pending"] == 0
                    and d.events("alert.retry") != []
                ),
                60,
                "every alert delivered after failures",
            )
            scraped += [
                await http_get(metrics_port, "/metrics"),
                await http_get(metrics_port, "/healthz"),
            ]
            await d.signal(signal.SIGHUP)  # a reload logs the config fingerprint again
            await d.wait_for(lambda: d.events("config.reloaded") != [], 15, "the reload")
            assert await d.stop() == 0
    finally:
        await webhook.stop()
    # the hostile receivers really did echo the secrets, and deliveries failed then succeeded
    assert webhook.requests > webhook.accepted > 0 and handler.logins > 2 and handler.messages
    retries = [e["error"] for e in d.events("alert.retry")]
    assert any("HTTP 401" in e for e in retries) and any("535" in e for e in retries), retries

    # and the same failures in this process: every exception text, chained ones included
    texts: list[str] = []
    config = load_config(cfg)
    alert = StoreView(tmp_path / "state.sqlite").alerts[0]
    calls: list[Callable[[], Awaitable[None]]] = [
        lambda: deliver_webhook(config.alerts.webhook[0], render_payload(alert), alert.key),
        lambda: deliver_email(config.alerts.email[0], alert, render_payload(alert)),
    ]
    for hook_call in calls:
        webhook.failures, webhook.requests = 10**6, 0
        await webhook.start()
        handler.failures, handler.logins = 10**6, 0
        try:
            with pytest.raises(DeliveryError) as info:
                await hook_call()
            texts += exception_texts(info.value)
        finally:
            await webhook.stop()
    assert any("HTTP 401" in t for t in texts) and any("535" in t for t in texts), texts
    # the loaded configuration shows no secret either (the URL is plain configuration)
    shown = [
        repr(config),
        str(config),
        config.model_dump_json(),
        json.dumps(config.model_dump(mode="json")),
    ]
    assert not [s for s in (token, hmac_key, password) for text in shown if s in text]

    outputs = {
        "log file": (tmp_path / "log.jsonl").read_text(),
        "stdout": stdout.read_text(),
        "stderr": d.stderr.decode(),
        "findings file": (tmp_path / "findings.jsonl").read_text(),
        "state database": db_text(tmp_path / "state.sqlite"),
        "metrics": "\n".join(scraped),
        "exceptions": "\n".join(texts),
    }
    assert outputs["log file"] and outputs["stdout"] and outputs["findings file"]
    leaks = [
        (what, name)
        for what, text in outputs.items()
        for name, s in everything.items()
        if s in text
    ]
    assert leaks == [], f"secrets leaked: {leaks}"


def test_auth_exchanges_are_redacted_in_transcripts() -> None:
    assert redact_command("AUTH PLAIN AHJlbGF5YXVkaXQAc2VjcmV0") == "AUTH PLAIN <redacted>"
    assert redact_command("auth login cmVsYXlhdWRpdA==") == "auth login <redacted>"
    assert redact_command("AUTH\tCRAM-MD5\tZm9v") == "AUTH\tCRAM-MD5 <redacted>"
    assert redact_command("c2VjcmV0", in_auth=True) == "<redacted>"


@settings(max_examples=200, deadline=None)
@given(
    mechanism=st.sampled_from(["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "plain"]),
    credential=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=6, max_size=60),
    space=st.sampled_from([" ", "\t", "  "]),
)
def test_no_credential_survives_redaction(mechanism: str, credential: str, space: str) -> None:
    line = f"AUTH {mechanism}{space}{credential}"
    assert credential not in redact_command(line).removeprefix(f"AUTH {mechanism}")
    assert redact_command(credential, in_auth=True) == "<redacted>"


async def test_the_probe_never_sends_credentials_even_where_auth_is_offered() -> None:
    settings_ = ProbeSettings(
        helo_name="relayaudit.campus.test", command_timeout=3, session_timeout=20
    )
    specs = [
        ServerSpec(host="127.0.0.1", port=0, behaviour=Behaviour.AUTH_REQUIRED),
        ServerSpec(host="127.0.0.1", port=0, behaviour=Behaviour.AUTH_NO_TLS),
    ]
    async with Lab(specs) as lab:
        for i in range(len(specs)):
            result = await probe(*lab.address_of(i), settings_)
            assert result.facts is not None and result.facts.auth_mechanisms
            commands = [e.command or "" for e in result.transcript]
            assert not any(c.upper().startswith("AUTH") for c in commands), commands


def test_metrics_listen_on_loopback_unless_configured() -> None:
    config = parse_config({"scope": ["192.0.2.0/24"], "targets": ["192.0.2.0/24"]})
    assert config.metrics.enabled and config.metrics.listen == ("127.0.0.1", 9425)


def _listening(pid: int) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state that process `pid` holds (its netns)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path(f"/proc/{pid}/net/{table}")
        lines = path.read_text().splitlines()[1:] if path.exists() else []
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                host = socket.inet_ntop(
                    family, b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                )
                found.append(f"{host}:{int(port, 16)}")
    return found


# in a network namespace of its own, so the default port 9425 is free whatever else runs here
NETNS = ("unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh")


async def test_a_daemon_with_default_metrics_listens_on_loopback_only(tmp_path: Path) -> None:
    check = await asyncio.create_subprocess_exec(
        *NETNS, "true", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(check.communicate(), 10)
    if check.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {err.decode().strip()}")
    data = base_config(tmp_path, "127.0.78.4/30", PORT)
    del data["metrics"]  # the defaults: enabled, 127.0.0.1:9425
    data["canary"] = {
        "enabled": True,
        "domain": "canary.iso.test",
        "wait": "1s",
    }  # default listen
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    d = DaemonProcess(cfg, tmp_path / "log.jsonl", prefix=NETNS)
    await d.start()
    try:
        await d.wait_for(lambda: d.events("sweep.start") != [], 30, "a sweep (canary receiver up)")
        listening = _listening(d.pid)
        health = await asyncio.create_subprocess_exec(
            "nsenter", "-t", str(d.pid), "-n", sys.executable, "-c",
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9425/healthz').status)",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(health.communicate(), 15)
        assert await d.stop() == 0
    finally:
        await d.kill()
    assert out.decode().strip() == "200"
    # metrics, and the canary receiver if sampled mid-sweep: nothing listens beyond loopback
    assert "127.0.0.1:9425" in listening
    assert all(a.startswith("127.0.0.1:") for a in listening), listening
