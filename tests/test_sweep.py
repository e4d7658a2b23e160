"""A whole sweep of a loopback lab: engine, findings file, CLI `sweep` and `check` end to end."""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cli_runner import run_cli

from relayaudit.canary import CanaryReceiver
from relayaudit.config import Config, parse_config
from relayaudit.engine import Pacer, sweep
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.sinks import Collector, FindingsFile
from relayaudit.targets import Shard
from relayaudit.verdict import FindingKind, VerdictStatus

NET = "127.0.20.0/29"
PORT = 2625
CANARY = ("127.0.20.7", 2626)
LAB = {
    1: Behaviour.OPEN_RELAY,
    2: Behaviour.CLOSED,
    3: Behaviour.CAMPUS_SENDER,
    4: Behaviour.ACCEPT_ALL_DISCARD,
}


def lab_config(tmp_path: Path, **overrides: object) -> Config:
    data: dict[str, object] = {
        "scope": ["127.0.20.0/24"],
        "targets": [NET],
        "exclude": ["127.0.20.7"],
        "ports": [PORT],
        "identity": {"helo_name": "relayaudit.campus.test"},
        "relay": {"campus_domains": ["campus.test"], "external_domains": ["relay-test.example"]},
        "canary": {
            "enabled": True,
            "domain": "canary.iso.test",
            "listen": f"{CANARY[0]}:{CANARY[1]}",
            "campus_sender": "iso@campus.test",
            "wait": "3s",
        },
        "timeouts": {"connect": "1s", "command": "3s", "session": "20s"},
        "limits": {"concurrency": 8, "rate": 500, "subnet_rate": 500},
        "approved": [{"address": "127.0.20.2", "note": "ISO-7 hub"}],
        "output": {"findings": str(tmp_path / "findings.jsonl")},
    }
    data.update(overrides)
    return parse_config(data, source="(test)")


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    specs = [ServerSpec(host=f"127.0.20.{i}", port=PORT, behaviour=b) for i, b in LAB.items()]
    async with Lab(specs, mx={"canary.iso.test": CANARY}) as running:
        yield running


async def test_sweep_of_a_lab(tmp_path: Path, lab: Lab) -> None:
    config = lab_config(tmp_path)
    collector = Collector()
    findings_file = FindingsFile(config.output.findings)
    async with CanaryReceiver(*CANARY, domain="canary.iso.test") as canary:
        stats = await sweep(config, sinks=[collector, findings_file], canary=canary)
    findings_file.close()
    status = {r.address: v.status for r, v in collector.results}
    assert status == {
        "127.0.20.0": VerdictStatus.CLOSED,
        "127.0.20.1": VerdictStatus.OPEN_RELAY,
        "127.0.20.2": VerdictStatus.RELAY_REFUSED,
        "127.0.20.3": VerdictStatus.RELAY_CAMPUS_SENDER,
        "127.0.20.4": VerdictStatus.ACCEPTS_WITHOUT_DELIVERY,
        "127.0.20.5": VerdictStatus.CLOSED,
        "127.0.20.6": VerdictStatus.CLOSED,
    }
    assert stats.hosts == 7 and stats.probes == 7 and stats.relays == 2
    lines = [json.loads(line) for line in config.output.findings.read_text().splitlines()]
    assert len(lines) == findings_file.written == len(collector.findings)
    kinds = {(f["address"], f["kind"]) for f in lines}
    assert ("127.0.20.1", "open-relay") in kinds
    assert ("127.0.20.2", "unapproved-smtp") not in kinds  # approved
    assert ("127.0.20.3", "unapproved-smtp") in kinds
    # ids are stable: a second sweep gives the same ids for the same problems
    again = Collector()
    async with CanaryReceiver(*CANARY, domain="canary.iso.test") as canary:
        await sweep(config, sinks=[again], canary=canary)
    assert {f.id for f in again.findings} == {f.id for f in collector.findings}


async def test_shards_cover_the_lab_exactly_once(tmp_path: Path, lab: Lab) -> None:
    config = lab_config(tmp_path, canary={"enabled": False})
    seen: list[str] = []
    for i in range(3):
        collector = Collector()
        await sweep(config, sinks=[collector], shard=Shard(i, 3))
        seen += [r.address for r, _ in collector.results]
    assert sorted(seen) == sorted(f"127.0.20.{i}" for i in range(7))


async def test_pacer_never_exceeds_the_configured_rate() -> None:
    # bounded: 330 tokens at 200/s is ~1.6 s
    rate = 200
    pacer = Pacer(rate=rate, subnet_rate=10_000)
    pacer.start()
    stamps: list[float] = []
    try:
        for i in range(330):
            await pacer(f"127.0.{i % 5}.1")
            stamps.append(time.monotonic())
    finally:
        await pacer.stop()
    # no one-second window holds more than the configured rate ...
    worst = max(bisect.bisect_left(stamps, s + 1.0) - i for i, s in enumerate(stamps))
    assert worst <= rate, worst
    # ... nor any 50 ms window more than its share (no second's worth in one burst)
    burst = max(bisect.bisect_left(stamps, s + 0.05) - i for i, s in enumerate(stamps))
    assert burst <= rate // 20, burst
    # and the rate achieved is the configured one, within 5 %
    achieved = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    assert rate * 0.95 <= achieved <= rate * 1.05, achieved


async def test_per_subnet_cap_is_a_reservation() -> None:
    pacer = Pacer(rate=10_000, subnet_rate=50)
    pacer.start()
    started = time.monotonic()
    try:
        for _ in range(11):
            await pacer("127.0.30.1")
    finally:
        await pacer.stop()
    # 11 connections to one /24 at 50/s need at least 10 gaps of 20 ms
    assert time.monotonic() - started >= 0.19


async def test_cli_sweep_and_check(tmp_path: Path, lab: Lab) -> None:
    cfg = tmp_path / "lab.toml"
    cfg.write_text(
        f"""
scope = ["127.0.20.0/24"]
targets = ["{NET}"]
exclude = ["127.0.20.7"]
ports = [{PORT}]
[relay]
campus_domains = ["campus.test"]
[timeouts]
connect = "1s"
command = "3s"
[limits]
subnet_rate = 500
[output]
findings = "{tmp_path / "out.jsonl"}"
"""
    )
    code, out, err = await run_cli("sweep", "--config", str(cfg))
    assert code == 1, err  # relays were found
    assert "open-relay" in out and "relay-campus-sender" in out and "closed" in out
    assert (tmp_path / "out.jsonl").read_text().count("\n") >= 4

    code, out, _ = await run_cli("check", "127.0.20.1", "--port", str(PORT), "--config", str(cfg))
    assert code == 1
    assert "OPEN-RELAY" in out and "rcpt-percent-ip" in out and "C: RCPT TO:<" in out

    code, out, _ = await run_cli("check", "127.0.20.2", "--port", str(PORT), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["verdict"]["status"] == "relay-refused"
    assert doc["result"]["facts"]["banner"]["code"] == 220

    code, out, _ = await run_cli("check", "127.0.20.9", "--config", str(cfg))
    assert code == 0 and "127.0.20.9:2625  CLOSED" in out  # in scope (/24), nothing listening
    code, _, err = await run_cli("check", "127.0.21.1", "--config", str(cfg))
    assert code == 2 and "127.0.21.1 is outside scope (127.0.20.0/24)" in err
    assert FindingKind.OPEN_RELAY.value in (tmp_path / "out.jsonl").read_text()
