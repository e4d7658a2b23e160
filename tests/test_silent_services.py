"""Services that wait for the client to speak first, on an SMTP port (issue 32): an HTTP server
and a TLS-only server are `not-smtp`, a tarpit `no-banner`, each after one greeting wait.

The HTTP server is Python's own `http.server` in a thread; the TLS-only server is an in-process
asyncio server with Python's ssl (OpenSSL 3), which hangs up on a first record that is no TLS
without sending an alert; the tarpit is the lab's. The late-greeting MTA is real Exim
(tests/test_exim_opensmtpd.py). Everything listens on 127.0.232.x.
"""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from factories import probe_settings

from relayaudit.evidence import ProbeStatus
from relayaudit.lab import Behaviour, Lab, ServerSpec, server_tls_context
from relayaudit.probe import probe
from relayaudit.verdict import VerdictStatus, judge

HTTP = ("127.0.232.1", 2525)
TLS_ONLY = ("127.0.232.2", 2525)
TARPIT = ("127.0.232.3", 2525)
GREETING = 0.5  # seconds of silence before the QUIT
SETTINGS = probe_settings(command_timeout=1.0, greeting_timeout=GREETING, session_timeout=10.0)


@pytest.fixture(scope="module")
def http_server() -> Iterator[None]:
    """Python's http.server: silent until a request line, which "QUIT" is (HTTP/0.9)."""

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.HTTPServer(HTTP, Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest_asyncio.fixture
async def tls_only() -> AsyncIterator[list[str]]:
    """A TLS-only service: asyncio with Python's ssl (OpenSSL 3) on an SMTP port. It says
    nothing before the client's ClientHello; the list holds each handshake it completed."""
    done: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        done.append(ssl_object.version() if ssl_object is not None else "?")
        writer.close()

    server = await asyncio.start_server(
        handle, *TLS_ONLY, ssl=server_tls_context("mx.campus.test"), reuse_address=True
    )
    try:
        yield done
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.usefixtures("http_server")
async def test_an_http_server_on_an_smtp_port_is_not_smtp_after_one_greeting_wait() -> None:
    started = time.monotonic()
    result = await probe(*HTTP, SETTINGS)
    took = time.monotonic() - started
    assert result.status is ProbeStatus.NOT_SMTP, result.error
    assert judge(result).status is VerdictStatus.NOT_SMTP
    assert result.error is not None and result.error.startswith(
        'not SMTP: no greeting within 1s, then bytes that are no SMTP reply in answer to QUIT: "'
        "<!DOCTYPE HTML>"
    ), result.error
    assert took < 3.0  # the greeting wait and one read, not the QUIT wait's 5 s


async def test_a_tls_only_server_on_an_smtp_port_is_not_smtp(tls_only: list[str]) -> None:
    result = await probe(*TLS_ONLY, SETTINGS)
    assert result.status is ProbeStatus.NOT_SMTP, result.error
    assert judge(result).status is VerdictStatus.NOT_SMTP
    assert result.error is not None
    assert "hung up after QUIT without a word, and a new connection completed a TLS handshake" in (
        result.error
    ), result.error
    assert "implicit_tls_ports" in result.error
    for _ in range(100):  # the server's handler runs once the loop gets to it
        if tls_only:
            break
        await asyncio.sleep(0.01)
    assert tls_only == ["TLSv1.3"]  # the server completed the handshake too
    assert [ex.command for ex in result.transcript][:2] == [None, "QUIT"]


async def test_a_tarpit_stays_no_banner_after_its_quit() -> None:
    async with Lab([ServerSpec(host=TARPIT[0], port=TARPIT[1], behaviour=Behaviour.TARPIT)]):
        started = time.monotonic()
        result = await probe(*TARPIT, SETTINGS)
        took = time.monotonic() - started
    assert result.status is ProbeStatus.NO_BANNER, result.error
    assert result.error == "no greeting within 1s; no answer to QUIT either"
    assert 1.9 < took < 3.5  # the greeting wait, then the whole answer wait
