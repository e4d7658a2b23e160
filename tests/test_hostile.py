"""Hostile servers (tests/hostile.py) against probe() and sweep(): classified in time, memory bounded, nothing leaks."""

from __future__ import annotations

import asyncio
import json
import os
import time
import tracemalloc
from pathlib import Path

import aiosmtplib.protocol
import pytest
from factories import probe_settings
from hostile import BEASTS, Beast, BlindRelay, HostileServer, Zoo

from relayaudit.config import Config, parse_config
from relayaudit.engine import sweep
from relayaudit.evidence import ProbeResult
from relayaudit.probe import ProbeSettings, probe
from relayaudit.sinks import Collector, FindingsFile
from relayaudit.state import StateSink, StateStore
from relayaudit.verdict import VerdictStatus, judge

CONNECT, COMMAND, SESSION = 1.0, 2.0, 6.0
SLACK = 1.0  # seconds a probe may overrun the session deadline (cleanup, a loaded CI machine)
# tracemalloc peak of one probe, client and (in-process) server together. The 10 MB line and the
# endless 250- stream would each push it far past 10 MB if a reply buffer grew without bound.
PROBE_MEMORY = 4 * 1024 * 1024
SWEEP_MEMORY = 20 * 1024 * 1024  # the whole zoo swept at once
ZOO_NET = "127.0.70.0/27"  # beast i on 127.0.70.(i+1), the rest of the /27 closed

SETTINGS = probe_settings(connect_timeout=CONNECT, command_timeout=COMMAND, session_timeout=SESSION)

pytestmark = pytest.mark.time_limit(60)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def fds_back_to(count: int) -> int:
    """Open fds once closed transports are released (a few loop turns), bounded to 1 s."""
    for _ in range(50):
        if open_fds() <= count:
            break
        await asyncio.sleep(0.02)
    return open_fds()


def assert_writable(result: ProbeResult) -> None:
    """What the sinks do: JSON for the findings file and logs, UTF-8 for SQLite."""
    verdict = judge(result)
    for text in (result.model_dump_json(), verdict.model_dump_json()):
        json.loads(text)
        text.encode("utf-8")
    for finding in verdict.findings:
        json.loads(finding.model_dump_json())


def test_aiosmtplib_bounds_one_reply() -> None:
    """The memory bound below rests on this: aiosmtplib >= 5.1.2 drops a reply over 32 KiB.

    Older versions buffer a reply without limit (a 10 MB line is 10 MB, an endless 250- stream
    grows until the session deadline); pyproject.toml requires aiosmtplib>=5.1.2 for this.
    """
    limit = getattr(aiosmtplib.protocol, "MAX_RESPONSE_LENGTH", None)
    assert limit is not None, "aiosmtplib without MAX_RESPONSE_LENGTH buffers replies without bound"
    assert limit <= 64 * 1024


@pytest.mark.parametrize("beast", BEASTS, ids=lambda b: b.name)
async def test_each_beast_is_classified_in_time_with_bounded_memory(beast: Beast) -> None:
    fds = open_fds()
    server = beast.server()
    await server.start()
    try:
        tracemalloc.start()
        try:
            started = time.monotonic()
            result = await probe("127.0.0.1", server.port, SETTINGS)
            elapsed = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        await server.stop()
    verdict = judge(result)
    print(
        f"{beast.name}: {verdict.status} in {elapsed:.2f}s, peak {peak / 1e6:.2f} MB, "
        f"{result.sessions} session(s), error={result.error!r}"
    )
    assert elapsed <= SESSION + SLACK
    assert peak < PROBE_MEMORY
    assert verdict.status in beast.verdicts, result.error
    assert_writable(result)
    assert server.errors == []
    assert await fds_back_to(fds) <= fds  # every socket of the probe (and the server) is closed


async def test_a_dripped_banner_costs_one_command_timeout_not_the_session() -> None:
    (beast,) = [b for b in BEASTS if b.name == "drip-banner"]
    async with beast.server() as server:
        started = time.monotonic()
        result = await probe("127.0.0.1", server.port, SETTINGS)
        elapsed = time.monotonic() - started
    assert judge(result).status is VerdictStatus.NO_BANNER
    assert result.error == f"no greeting within {COMMAND:g}s"
    assert COMMAND - 0.1 <= elapsed <= COMMAND + SLACK


async def test_replies_each_just_in_time_are_cut_by_the_session_deadline() -> None:
    (beast,) = [b for b in BEASTS if b.name == "slow-replies"]
    async with beast.server() as server:
        started = time.monotonic()
        result = await probe("127.0.0.1", server.port, SETTINGS)
        elapsed = time.monotonic() - started
    assert SESSION - 0.1 <= elapsed <= SESSION + SLACK
    assert result.error == f"session deadline of {SESSION:g}s reached; results are partial"
    assert judge(result).status is VerdictStatus.OPEN_RELAY  # what was seen is kept


async def test_invalid_utf8_from_a_server_is_kept_as_escapes_in_every_output(
    tmp_path: Path,
) -> None:
    (beast,) = [b for b in BEASTS if b.name == "invalid-utf8-relay"]
    async with beast.server() as server:
        result = await probe("127.0.0.1", server.port, SETTINGS)
    verdict = judge(result)
    assert verdict.status is VerdictStatus.OPEN_RELAY
    assert result.facts is not None
    assert result.facts.banner.text == (
        "mx.h\\xc3(stile.test ESMTP \\xff\\xfe\\x80 \\xed\\xa0\\x80 \\x1b]0;owned\\x07"
    )
    assert "x-\\xff\\xfe" in result.facts.capabilities
    # the sinks a daemon writes to: the findings file and the state store
    findings = FindingsFile(tmp_path / "findings.jsonl")
    await findings.emit(result, verdict)
    findings.close()
    lines = (tmp_path / "findings.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(verdict.findings) >= 2
    with StateStore(tmp_path / "state.sqlite") as store:
        record = store.begin_sweep(shard="0/1", config_fingerprint="fp", total=1)
        assert len(store.record(record.id, result, verdict)) == len(verdict.findings)


async def test_the_window_of_a_server_that_never_reads_fills_and_the_probe_still_ends() -> None:
    blind = BlindRelay()
    one_session = ProbeSettings(
        **{**{f: getattr(SETTINGS, f) for f in SETTINGS.__slots__}, "max_tests_per_session": 50}
    )
    async with HostileServer(blind, read_limit=1, rcvbuf=1) as server:
        started = time.monotonic()
        result = await probe("127.0.0.1", server.port, one_session)
        elapsed = time.monotonic() - started
    sent = sum(len(e.command) + 2 for e in result.transcript if e.command is not None)
    assert result.sessions == 1
    # the server never held more than its window: the rest waited in our socket's send queue
    assert 0 < blind.queued[0] < sent, (blind.queued, sent)
    assert judge(result).status is VerdictStatus.OPEN_RELAY
    assert elapsed <= SESSION + SLACK


def zoo_config(port: int, concurrency: int) -> Config:
    return parse_config(
        {
            "scope": ["127.0.0.0/8"],
            "targets": [ZOO_NET],
            "ports": [port],
            "identity": {"helo_name": "relayaudit.campus.test"},
            "relay": {
                "campus_domains": ["campus.test"],
                "external_domains": ["relay-test.example", "sender.example"],
            },
            "timeouts": {"connect": CONNECT, "command": COMMAND, "session": SESSION},
            "limits": {"concurrency": concurrency, "rate": 2000, "subnet_rate": 2000},
        },
        source="(zoo)",
    )


async def sweep_zoo(tmp_path: Path, concurrency: int, bound: float) -> tuple[float, int, Collector]:
    """Sweep the zoo into a collector, the findings file and a state store; (seconds, peak, results)."""
    hosts = [f"127.0.70.{i}" for i in range(1, len(BEASTS) + 1)]
    fds = open_fds()
    async with Zoo(hosts) as zoo:
        config = zoo_config(zoo.port, concurrency)
        collector = Collector()
        findings = FindingsFile(tmp_path / f"findings-{concurrency}.jsonl")
        with StateStore(tmp_path / f"state-{concurrency}.sqlite") as store:
            record = store.begin_sweep(shard="0/1", config_fingerprint="fp", total=32)
            tracemalloc.start()
            try:
                started = time.monotonic()
                stats = await asyncio.wait_for(
                    sweep(config, sinks=[collector, findings, StateSink(store, record.id)]), bound
                )
                elapsed = time.monotonic() - started
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
                findings.close()
            for host in hosts:
                assert store.history(host), host  # every beast was recorded
    assert zoo.errors == []
    assert stats.probes == 32
    for line in (
        (tmp_path / f"findings-{concurrency}.jsonl").read_text(encoding="utf-8").splitlines()
    ):
        json.loads(line)
    by_host = {r.address: v.status for r, v in collector.results}
    assert len(by_host) == 32
    for host, beast in zip(hosts, BEASTS, strict=True):
        assert by_host.pop(host) in beast.verdicts, beast.name
    assert set(by_host.values()) == {VerdictStatus.CLOSED}
    assert await fds_back_to(fds) <= fds
    return elapsed, peak, collector


async def test_a_sweep_of_the_whole_zoo_at_once(tmp_path: Path) -> None:
    # every beast in parallel: the slowest (a full session deadline) bounds the sweep
    elapsed, peak, _ = await sweep_zoo(tmp_path, concurrency=32, bound=SESSION + 10)
    print(f"zoo at once: {elapsed:.2f}s, tracemalloc peak {peak / 1e6:.2f} MB")
    assert elapsed <= SESSION + 3
    assert peak < SWEEP_MEMORY


async def test_two_workers_get_through_the_whole_zoo(tmp_path: Path) -> None:
    # each beast frees its worker within its own deadline, so two workers get through all 32
    # addresses; the slow beasts (no banner, drip, STARTTLS hang, never reads, slow replies)
    # cost about 2+2+2+2+6 s, i.e. about 7 s for two workers
    elapsed, _, _ = await sweep_zoo(tmp_path, concurrency=2, bound=40)
    print(f"zoo with two workers: {elapsed:.2f}s")
    assert elapsed <= 20
