"""Shared pytest fixtures: real Postfix and RT, a loopback-only guard, an SMTP sink, daemon cleanup, time limits."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import factories
import pytest
from daemon_harness import DaemonProcess
from hypothesis import settings as hypothesis_settings
from postfix_lab import (
    CANARY_DOMAIN,
    POSTFIX_SINK_HOST,
    POSTFIX_SINK_PORT,
    PostfixInstance,
    make_lab_directory,
    require_postfix,
    start_lab,
    stop_lab,
)
from postgrey_lab import postgrey_available
from rt_lab import RtServer, rt_available, start_rt
from smtp_sink import MessageSink, serve_smtp

from relayaudit.canary import CanaryReceiver

# CI (which sets CI=true, as .ci/run does) runs the property tests on a fixed example sequence, so
# a red run is reproducible from the commit alone; a local run explores new random examples each
# time, which is how the verdict crash fixed in issue 22's session was found.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture(params=[True, False], ids=["pipelined", "lock-step"])
def pipelining(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The verdict suites run twice: commands pipelined where the server offers PIPELINING
    (RFC 2920), and in lock-step; their expected verdicts are the same either way."""
    monkeypatch.setattr(factories, "PIPELINING", request.param)
    return bool(request.param)


@pytest.fixture(scope="session")
def postfix_lab() -> Iterator[dict[str, PostfixInstance]]:
    """One running Postfix per policy, keyed by policy name; skipped (or failed) without Postfix.

    With RELAYAUDIT_REQUIRE_POSTFIX=1 (set by scripts/test, hence CI) a missing Postfix is an
    error, so a broken install can never turn into a green run of skipped tests.
    """
    require_postfix()
    base = make_lab_directory()
    instances = start_lab(base)  # on failure it stops what it started and keeps BASE's logs
    try:
        yield instances
    finally:
        stop_lab(instances)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def canary() -> AsyncIterator[CanaryReceiver]:
    """The canary receiver at the lab Postfix instances' relayhost: whatever they relay
    arrives here and nowhere else (tests/postfix_lab.py)."""
    async with CanaryReceiver(
        POSTFIX_SINK_HOST, POSTFIX_SINK_PORT, domain=CANARY_DOMAIN
    ) as receiver:
        yield receiver


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection a replayed probe tried to make would fail the test (tests/replay.py)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a replayed probe tried to connect a socket")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def postgrey_ready() -> None:
    """Skip a test that needs postgrey where it cannot run, or fail it with
    RELAYAUDIT_REQUIRE_POSTGREY=1 (scripts/test and CI), as for Postfix."""
    reason = postgrey_available()
    if reason is not None:
        if os.environ.get("RELAYAUDIT_REQUIRE_POSTGREY") == "1":
            pytest.fail(f"RELAYAUDIT_REQUIRE_POSTGREY=1 but {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def rt_server() -> Iterator[RtServer]:
    """A running Request Tracker 5 on 127.0.0.1 (tests/rt_lab.py), shared by the session.

    Its state carries over between tests: take `rt` for a clean one. Skipped when RT is not
    installed, failed instead with RELAYAUDIT_REQUIRE_RT=1 (CI), as for Postfix.
    """
    reason = rt_available()
    if reason is not None:
        if os.environ.get("RELAYAUDIT_REQUIRE_RT") == "1":
            pytest.fail(f"RELAYAUDIT_REQUIRE_RT=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    server = start_rt()  # on failure it keeps its directory, with the server's log
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def rt(rt_server: RtServer) -> RtServer:
    """The session's RT, reset to its pristine database: no tickets, ids from 1."""
    rt_server.reset()
    return rt_server


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse any connect to, or name lookup of, anything but loopback (in this process).

    The probe turns unexpected exceptions into an ERROR result, so refusals are also recorded
    and fail the test at teardown.
    """
    refused: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(address: Any) -> None:
        if isinstance(address, tuple) and not ipaddress.ip_address(address[0]).is_loopback:
            refused.append(f"connect to {address}")
            raise AssertionError(f"test connects to {address}")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".invalid"):
            # RFC 6761: .invalid never resolves; answer as the resolver would, without asking it
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        try:
            loopback = host is None or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            refused.append(f"lookup of {host!r}")
            raise AssertionError(f"test resolves {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert refused == [], "the test tried to leave loopback"


@pytest.fixture
def fixed_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """argparse wraps usage lines to the terminal width; make it the same everywhere."""
    monkeypatch.setenv("COLUMNS", "80")


@pytest.fixture
def smtp_sink() -> Iterator[tuple[MessageSink, int]]:
    """An SMTP receiver on 127.0.0.1 keeping every message, and its port."""
    sink = MessageSink()
    with serve_smtp(sink) as port:
        yield sink, port


@pytest.fixture
async def daemons() -> AsyncIterator[list[DaemonProcess]]:
    """Append each started daemon; whichever still runs when the test ends is killed."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        await d.kill()


@pytest.fixture(autouse=True)
def _time_limit(request: pytest.FixtureRequest) -> Iterator[None]:
    """@pytest.mark.time_limit(seconds): a safety net on top of each test's own deadlines."""
    marker = request.node.get_closest_marker("time_limit")
    started = time.monotonic()
    yield
    if marker is not None:
        limit = marker.args[0]
        assert time.monotonic() - started < limit
