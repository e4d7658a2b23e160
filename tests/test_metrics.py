"""Tests for relayaudit.metrics: text exposition format, and the HTTP server under real requests."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relayaudit.metrics import (
    Metrics,
    MetricsServer,
    Registry,
    Request,
    Response,
    Route,
    render_value,
)

ROOT = Path(__file__).resolve().parent.parent

# --- exposition format -------------------------------------------------------------------------

SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\\\|\\"|\\n)*",?)*)\})?'
    r" (?P<value>\S+)$"
)


def check_exposition(text: str) -> dict[str, str]:
    """Validates the text format line by line; returns {family name: type}."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helped, f"second HELP for {name}"
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge"}
            assert name not in types, f"second TYPE for {name}"
            types[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"bad sample line {line!r}"
            assert match["name"] in types, f"sample before its TYPE: {line!r}"
            float(match["value"].replace("+Inf", "inf"))
    assert helped == set(types)
    return types


def test_all_relayaudit_families_are_declared() -> None:
    metrics = Metrics()
    types = check_exposition(metrics.render())
    assert types == {
        "relayaudit_build_info": "gauge",
        "relayaudit_probes_total": "counter",
        "relayaudit_findings": "gauge",
        "relayaudit_alerts": "gauge",
        "relayaudit_alerts_dead_total": "counter",
        "relayaudit_sweep_duration_seconds": "gauge",
        "relayaudit_sweep_progress_ratio": "gauge",
        "relayaudit_sweep_hosts_done": "gauge",
        "relayaudit_last_completed_sweep_timestamp_seconds": "gauge",
        "relayaudit_canary_connections_total": "counter",
        "relayaudit_canary_messages_total": "counter",
        "relayaudit_target_source_failures_total": "counter",
        "relayaudit_target_source_addresses": "gauge",
        "relayaudit_target_source_stale": "gauge",
        "relayaudit_owners_file_failures_total": "counter",
        "relayaudit_owners_file_stale": "gauge",
        "relayaudit_owner_ranges": "gauge",
        "relayaudit_approvals_expiring": "gauge",
    }
    text = metrics.render()
    # alert states exist at zero before anything happened
    for state in ("pending", "sent", "dead"):
        assert f'relayaudit_alerts{{state="{state}"}} 0\n' in text
    assert "relayaudit_alerts_dead_total 0\n" in text


def test_updates_show_in_output() -> None:
    metrics = Metrics()
    metrics.probe("open")
    metrics.probe("open")
    metrics.probe("refused", 3)
    metrics.set_findings({("open_relay", "new"): 2, ("unapproved_smtp", "ongoing"): 5})
    metrics.set_alerts(pending=4, sent=10, dead=1)
    metrics.alert_dead()
    metrics.sweep_progress(25, 100)
    text = metrics.render()
    check_exposition(text)
    assert 'relayaudit_probes_total{status="open"} 2\n' in text
    assert 'relayaudit_probes_total{status="refused"} 3\n' in text
    assert 'relayaudit_findings{kind="open_relay",status="new"} 2\n' in text
    assert 'relayaudit_findings{kind="unapproved_smtp",status="ongoing"} 5\n' in text
    assert 'relayaudit_alerts{state="pending"} 4\n' in text
    assert "relayaudit_alerts_dead_total 1\n" in text
    assert "relayaudit_sweep_progress_ratio 0.25\n" in text
    assert "relayaudit_sweep_hosts_done 25\n" in text
    metrics.sweep_completed(duration=12.5, finished_at=1_700_000_000.0)
    text = metrics.render()
    assert "relayaudit_sweep_duration_seconds 12.5\n" in text
    assert "relayaudit_last_completed_sweep_timestamp_seconds 1700000000\n" in text
    assert "relayaudit_sweep_progress_ratio 1\n" in text


def test_update_by_name() -> None:
    metrics = Metrics()
    metrics.inc("relayaudit_probes_total", status="open")
    metrics.inc("relayaudit_probes_total", 2, status="open")
    metrics.set("relayaudit_sweep_hosts_done", 7)
    metrics.set("relayaudit_alerts", 3, state="pending")
    assert metrics.probes_total.value(status="open") == 3.0
    assert metrics.sweep_hosts_done.value() == 7.0
    assert metrics.alerts.value(state="pending") == 3.0
    with pytest.raises(ValueError, match="only gauges"):
        metrics.set("relayaudit_probes_total", 1, status="open")
    with pytest.raises(KeyError, match="no metric"):
        metrics.inc("relayaudit_nope_total")


def test_findings_replace_drops_vanished_combinations() -> None:
    metrics = Metrics()
    metrics.set_findings({("open_relay", "new"): 1})
    metrics.set_findings({("open_relay", "ongoing"): 1})
    text = metrics.render()
    assert 'status="new"' not in text
    assert 'relayaudit_findings{kind="open_relay",status="ongoing"} 1\n' in text
    assert metrics.findings.value(kind="open_relay", status="new") == 0.0


def test_label_value_and_help_escaping() -> None:
    registry = Registry()
    gauge = registry.gauge("demo_value", 'help with \\ backslash\nand "quotes"', ("path",))
    gauge.set(1, path='C:\\dir "x"\nnext')
    text = registry.render()
    check_exposition(text)
    assert '# HELP demo_value help with \\\\ backslash\\nand "quotes"\n' in text
    assert 'demo_value{path="C:\\\\dir \\"x\\"\\nnext"} 1\n' in text


def test_samples_are_sorted_for_stable_output() -> None:
    registry = Registry()
    counter = registry.counter("demo_total", "demo", ("k",))
    for key in ("b", "a", "c"):
        counter.inc(k=key)
    lines = [line for line in registry.render().splitlines() if not line.startswith("#")]
    assert lines == ['demo_total{k="a"} 1', 'demo_total{k="b"} 1', 'demo_total{k="c"} 1']


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0"),
        (3.0, "3"),
        (-2.0, "-2"),
        (0.25, "0.25"),
        (1e20, "1e+20"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_render_value(value: float, text: str) -> None:
    assert render_value(value) == text


def test_misuse_is_refused() -> None:
    registry = Registry()
    counter = registry.counter("demo_total", "demo", ("status",))
    with pytest.raises(ValueError, match="cannot go down"):
        counter.inc(-1, status="x")
    with pytest.raises(ValueError, match="expected"):
        counter.inc(kind="x")
    with pytest.raises(ValueError, match="registered twice"):
        registry.gauge("demo_total", "again")
    with pytest.raises(ValueError, match="not a valid metric name"):
        registry.gauge("bad-name", "x")
    with pytest.raises(ValueError, match="not a valid label name"):
        registry.gauge("ok_name", "x", ("__reserved",))
    gauge = registry.gauge("pair", "x", ("a", "b"))
    with pytest.raises(ValueError, match="do not fit"):
        gauge.replace({("only-one",): 1})


# --- the HTTP server ---------------------------------------------------------------------------


@dataclass
class Health:
    ok: bool = True
    reason: str = "last sweep 10s ago"
    calls: list[float] = field(default_factory=list)

    def __call__(self) -> tuple[bool, str]:
        self.calls.append(time.monotonic())
        return self.ok, self.reason


@dataclass
class Running:
    server: MetricsServer
    metrics: Metrics
    health: Health

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    metrics = Metrics()
    health = Health()
    server = MetricsServer(metrics, "127.0.0.1", 0, health=health, read_deadline=0.5)
    await server.start()
    try:
        yield Running(server, metrics, health)
    finally:
        await server.stop()


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """A real HTTP client; no proxies, whatever the environment says."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, method=method)
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


async def raw(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Sends bytes as they are and reads until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


async def test_get_metrics(running: Running) -> None:
    running.metrics.probe("open")
    status, headers, body = await asyncio.to_thread(fetch, running.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["Content-Length"]) == len(body)
    text = body.decode()
    check_exposition(text)
    assert 'relayaudit_probes_total{status="open"} 1\n' in text
    # the version of pyproject.toml, the one place it is written (tests/test_release.py)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f'relayaudit_build_info{{version="{version}"}} 1\n' in text


async def test_query_string_is_ignored(running: Running) -> None:
    status, _, _ = await asyncio.to_thread(fetch, running.url + "/metrics?name[]=x")
    assert status == 200


async def test_healthz_ok_and_failing(running: Running) -> None:
    status, _, body = await asyncio.to_thread(fetch, running.url + "/healthz")
    assert (status, body) == (200, b"ok last sweep 10s ago\n")
    running.health.ok = False
    running.health.reason = "no sweep completed in 7h (expected within 6h)"
    status, _, body = await asyncio.to_thread(fetch, running.url + "/healthz")
    assert (status, body) == (503, b"no sweep completed in 7h (expected within 6h)\n")


async def test_healthz_when_the_check_itself_breaks() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("database is locked")

    async with MetricsServer(Metrics(), "127.0.0.1", 0, health=broken) as server:
        status, _, body = await asyncio.to_thread(fetch, f"http://127.0.0.1:{server.port}/healthz")
    assert status == 503
    assert body == b"health check failed: RuntimeError\n"


async def test_unknown_path_and_method(running: Running) -> None:
    status, _, _ = await asyncio.to_thread(fetch, running.url + "/")
    assert status == 404
    status, headers, _ = await asyncio.to_thread(fetch, running.url + "/metrics", "POST")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    reply = await raw(running.server.port, b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 405 ")


async def test_head_has_headers_but_no_body(running: Running) -> None:
    reply = await raw(running.server.port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Length: " in head and not head.endswith(b"Content-Length: 0")
    assert body == b""


async def test_http10_and_bare_newlines(running: Running) -> None:
    reply = await raw(running.server.port, b"GET /healthz HTTP/1.0\n\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert reply.endswith(b"\r\n\r\nok last sweep 10s ago\n")


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\xfe\x80 garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET /metrics SMTP/1.0\r\n\r\n",
        b"G(T /metrics HTTP/1.1\r\n\r\n",
        b"EHLO relayaudit.invalid\r\n\r\n",
        b"GET http://[::1 HTTP/1.1\r\n\r\n",
    ],
)
async def test_garbage_gets_400_and_server_lives_on(running: Running, garbage: bytes) -> None:
    reply = await raw(running.server.port, garbage)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    status, _, _ = await asyncio.to_thread(fetch, running.url + "/metrics")
    assert status == 200


async def test_client_that_hangs_up_early(running: Running) -> None:
    for data in (b"", b"GET /metr", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
        _, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
        writer.write(data)
        writer.close()
        await writer.wait_closed()
    status, _, _ = await asyncio.to_thread(fetch, running.url + "/healthz")
    assert status == 200


async def test_oversized_head_gets_431(running: Running) -> None:
    many = b"GET /metrics HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 100 + b"\r\n"
    reply = await raw(running.server.port, many + b"X-More: " + b"b" * 9000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"c" * 60) for i in range(200))  # 200 short lines
    reply = await raw(running.server.port, b"GET /metrics HTTP/1.1\r\n" + headers + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")


async def test_head_just_under_the_limit_is_served(running: Running) -> None:
    start = b"GET /metrics HTTP/1.1\r\n"
    filler = b"X-F: " + b"d" * (8192 - len(start) - 2 - 7) + b"\r\n"
    request = start + filler + b"\r\n"
    assert len(request) == 8192
    reply = await raw(running.server.port, request)
    assert reply.startswith(b"HTTP/1.1 200 OK")


async def test_request_that_never_finishes_is_closed_at_the_deadline(running: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
    started = time.monotonic()
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line, ever
    await writer.drain()
    async with asyncio.timeout(5):
        reply = await reader.read()
    elapsed = time.monotonic() - started
    writer.close()
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert 0.4 <= elapsed < 2.0


async def test_trickling_client_is_cut_off_by_total_deadline(running: Running) -> None:
    # A byte every 50 ms would keep resetting a per-read timeout forever; the deadline is total.
    reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)

    async def trickle() -> None:
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"z" * 100:  # 6 s worth
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                return
            await asyncio.sleep(0.05)

    started = time.monotonic()
    trickler = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(5):
            reply = await reader.read()
        elapsed = time.monotonic() - started
    finally:
        trickler.cancel()
        await asyncio.gather(trickler, return_exceptions=True)
        writer.close()
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert 0.4 <= elapsed < 2.0


async def test_idle_flood_does_not_lock_out_the_scraper() -> None:
    metrics = Metrics()
    server = MetricsServer(
        metrics, "127.0.0.1", 0, health=Health(), read_deadline=30.0, max_connections=8
    )
    await server.start()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(40):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /metrics HTTP/1.1\r\n")
            idle.append((reader, writer))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        status, _, _ = await asyncio.to_thread(fetch, f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200
        assert time.monotonic() - started < 2.0  # long before the 30 s read deadline
        assert server.connections_dropped >= 32
        assert server.open_connections <= 8
    finally:
        for _, writer in idle:
            writer.close()
        await server.stop()


async def test_many_concurrent_requests(running: Running) -> None:
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    replies = await asyncio.gather(*(raw(running.server.port, request) for _ in range(150)))
    assert all(r.startswith(b"HTTP/1.1 200 OK") for r in replies)
    assert running.server.requests_served >= 150


async def test_stop_closes_open_connections_and_the_port() -> None:
    server = MetricsServer(Metrics(), "127.0.0.1", 0, health=Health(), read_deadline=30.0)
    await server.start()
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metr")
    await writer.drain()
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await server.stop()
    assert time.monotonic() - started < 1.0
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(2):
            await reader.read()  # EOF (or reset) rather than hanging
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await server.stop()  # a second stop is harmless


# --- routes beside /metrics (the daemon's report pages) ----------------------------------------


async def _echo(request: Request) -> Response:
    text = f"{request.method} {request.path} auth={request.headers.get('authorization')}\n"
    return Response(200, text.encode(), "text/plain; charset=utf-8", (("X-Extra", "1"),))


async def _big(request: Request) -> Response:
    return Response(200, b"x" * (8 << 20), "text/html; charset=utf-8")


async def _slow(request: Request) -> Response:
    await asyncio.sleep(5)
    return Response(200, b"late\n")


async def test_a_route_sees_the_headers_under_the_same_limits() -> None:
    routes = {"/": Route(_echo)}
    async with MetricsServer(Metrics(), "127.0.0.1", 0, health=Health(), routes=routes) as server:
        reply = await raw(
            server.port, b"GET /?x=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer abc\r\n\r\n"
        )
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"\r\nX-Extra: 1" in head
        assert body == b"GET / auth=Bearer abc\n"
        reply = await raw(server.port, b"HEAD / HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"\r\n\r\n")
        reply = await raw(server.port, b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 405 ")
        big = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
        assert (await raw(server.port, big)).startswith(b"HTTP/1.1 431 ")
        status, _, _ = await asyncio.to_thread(fetch, f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200


def _read_late(port: int, path: bytes, delay: float) -> bytes:
    """A client that sends its request, then reads nothing for `delay` seconds (small buffers,
    so the server's writes stall meanwhile), then reads to the end."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\n\r\n")
        time.sleep(delay)
        chunks = []
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
        return b"".join(chunks)


async def test_a_routes_write_deadline_is_its_own() -> None:
    """The server's write deadline (here 0.3 s; /metrics keeps 5 s) does not cut a route that
    has its own: 8 MB to a client that waits a second before reading arrive whole."""
    routes = {"/": Route(_big, deadline=10.0), "/short": Route(_big, deadline=0.3)}
    async with MetricsServer(
        Metrics(), "127.0.0.1", 0, health=Health(), write_deadline=0.3, routes=routes
    ) as server:
        whole = await asyncio.to_thread(_read_late, server.port, b"/", 1.0)
        cut = await asyncio.to_thread(_read_late, server.port, b"/short", 1.0)
    assert whole.endswith(b"\r\n\r\n" + b"x" * (8 << 20))
    assert len(cut) < 8 << 20  # the same page under a 0.3 s deadline is dropped unfinished


async def test_a_route_that_does_not_answer_in_time_gets_503() -> None:
    routes = {"/": Route(_slow, deadline=0.2)}
    async with MetricsServer(Metrics(), "127.0.0.1", 0, health=Health(), routes=routes) as server:
        started = time.monotonic()
        reply = await raw(server.port, b"GET / HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503 ") and time.monotonic() - started < 2


def test_defaults() -> None:
    server = MetricsServer(Metrics(), "127.0.0.1", 0, health=Health())
    assert server.read_deadline == 5.0
    assert server.max_head == 8192
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port
