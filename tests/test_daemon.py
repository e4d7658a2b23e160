"""The daemon as a real process: resume after SIGKILL, resolved alerts, SIGHUP, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon_harness import DaemonProcess, base_config, write_config

from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.state import StateStore, Transition
from relayaudit.verdict import FindingKind, finding_id

PORT = 2725


def daemon_config(
    tmp: Path, net: str, *, concurrency: int = 16, rate: int = 500, interval: str = "1h"
) -> Path:
    """A config sweeping `net`; its command hook appends each alert to tmp/tickets.jsonl."""
    data = base_config(tmp, net, PORT)
    del data["identity"]
    data["limits"] = {"concurrency": concurrency, "rate": rate, "subnet_rate": rate}
    data["schedule"] = {"interval": interval}
    (hook,) = data["alerts"]["command"]
    data["alerts"] = {"backoff_initial": "0.2s", "command": [{"argv": hook["argv"]}]}
    return write_config(tmp / "relayaudit.toml", data)


def tickets(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "tickets.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_sigkill_mid_sweep_resumes_and_loses_nothing(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    # 64 addresses, every 4th an open relay answering slowly, 2 workers: a sweep of several seconds
    net = "127.0.51.0/26"
    specs = [
        ServerSpec(
            host=f"127.0.51.{i}", port=PORT, behaviour=Behaviour.OPEN_RELAY, reply_delay=0.01
        )
        for i in range(0, 64, 4)
    ]
    cfg = daemon_config(tmp_path, net, concurrency=2, rate=40)
    async with Lab(specs):
        first = DaemonProcess(cfg, tmp_path / "log.jsonl")
        daemons.append(first)
        await first.start()
        await first.wait_for(lambda: len(first.events("probe")) >= 12, 30, "a dozen probes")
        await asyncio.sleep(CHECKPOINT_SLACK)
        await first.kill()  # SIGKILL: no chance to clean up
        done_before = {(e["address"]) for e in first.events("probe")}
        assert len(done_before) < 64

        second = DaemonProcess(cfg, tmp_path / "log.jsonl")
        daemons.append(second)
        await second.start()
        await second.wait_for(
            lambda: len(second.events("sweep.summary")) >= 1, 60, "the resumed sweep to finish"
        )
        starts = second.events("sweep.start")
        assert starts[-1]["resumed"] is True and starts[-1]["start"] > 0
        assert starts[-1]["sweep_id"] == starts[0]["sweep_id"]
        # every address was probed by one of the two runs
        probed = {e["address"] for e in second.events("probe")}
        assert probed == {f"127.0.51.{i}" for i in range(64)}
        # give the dispatcher time to deliver, then stop cleanly
        await second.wait_for(lambda: len(tickets(tmp_path)) >= 32, 30, "32 tickets")
        await second.signal(signal.SIGTERM)
        assert await second.exit_code(15) == 0

    store = StateStore(tmp_path / "state.sqlite")
    store.open(readonly=True)
    try:
        findings = store.findings()
        alerts = store.alerts()
    finally:
        store.close()
    # 16 relays x (open-relay + unapproved-smtp): every finding stored once, one NEW alert each
    assert len(findings) == 32
    new_alerts = Counter(a.finding.id for a in alerts if a.transition is Transition.NEW)
    assert set(new_alerts) == {f.id for f in findings} and set(new_alerts.values()) == {1}
    # the ticketing side: every alert key arrived, and no key names two different tickets
    delivered = Counter(t["idempotency_key"] for t in tickets(tmp_path))
    assert set(delivered) == {a.key for a in alerts}


CHECKPOINT_SLACK = 2.5  # the daemon checkpoints every 2 s


async def test_fixed_relay_gives_one_resolved_alert_and_nothing_else(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    cfg = daemon_config(tmp_path, "127.0.52.0/30", interval="1s")
    relay = [ServerSpec(host="127.0.52.1", port=PORT, behaviour=Behaviour.OPEN_RELAY)]
    closed = [ServerSpec(host="127.0.52.1", port=PORT, behaviour=Behaviour.CLOSED)]
    other = [ServerSpec(host="127.0.52.2", port=PORT, behaviour=Behaviour.CLOSED)]
    d = DaemonProcess(cfg, tmp_path / "log.jsonl")
    daemons.append(d)
    async with Lab(other):
        async with Lab(relay):
            await d.start()
            await d.wait_for(lambda: len(d.events("sweep.summary")) >= 1, 30, "first sweep")
            await d.signal(signal.SIGSTOP)  # hold the schedule while the admin fixes the server
        async with Lab(closed):
            await d.signal(signal.SIGCONT)
            await d.wait_for(lambda: len(d.events("sweep.summary")) >= 2, 30, "second sweep")
            await d.signal(signal.SIGTERM)
            assert await d.exit_code(15) == 0
    summaries = d.events("sweep.summary")
    assert summaries[0]["transitions"] == {"new": 3}  # open-relay + two unapproved-smtp
    assert summaries[1]["transitions"] == {"resolved": 1}
    # the summary names the relay it counts
    relay_id = finding_id(FindingKind.OPEN_RELAY, "127.0.52.1", PORT)
    assert [(s["relays"], s["relay_findings"]) for s in summaries[:2]] == [(1, [relay_id]), (0, [])]
    resolved = [e for e in d.events("finding.transition") if e["transition"] == "resolved"]
    assert [(e["kind"], e["address"]) for e in resolved] == [("open-relay", "127.0.52.1")]


async def test_sighup_with_a_broken_config_keeps_the_old_one(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    cfg = daemon_config(tmp_path, "127.0.53.0/30", interval="1s")
    d = DaemonProcess(cfg, tmp_path / "log.jsonl")
    daemons.append(d)
    async with Lab([ServerSpec(host="127.0.53.1", port=PORT, behaviour=Behaviour.CLOSED)]):
        await d.start()
        await d.wait_for(lambda: len(d.events("sweep.summary")) >= 1, 30, "first sweep")
        good = cfg.read_text()
        cfg.write_text(good.replace('targets = ["127.0.53.0/30"]', 'targets = ["10.1.2.3/8"]'))
        await d.signal(signal.SIGHUP)
        await d.wait_for(
            lambda: bool(d.events("config.reload_rejected")), 10, "the reload to be rejected"
        )
        (rejected,) = d.events("config.reload_rejected")
        assert "targets[0]: line 2: '10.1.2.3/8' has host bits set" in rejected["error"]
        n = len(d.events("sweep.summary"))
        await d.wait_for(
            lambda: len(d.events("sweep.summary")) > n, 30, "a sweep after the bad reload"
        )
        assert all(e["address"].startswith("127.0.53.") for e in d.events("probe"))
        await d.signal(signal.SIGTERM)
        assert await d.exit_code(15) == 0


async def test_sigterm_mid_sweep_exits_within_the_bound(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    # tarpits hold every worker in a long wait: the stop must not wait for them
    specs = [
        ServerSpec(host=f"127.0.54.{i}", port=PORT, behaviour=Behaviour.TARPIT) for i in range(1, 9)
    ]
    cfg = daemon_config(tmp_path, "127.0.54.0/28", concurrency=8)
    d = DaemonProcess(cfg, tmp_path / "log.jsonl")
    daemons.append(d)
    async with Lab(specs):
        await d.start()
        await d.wait_for(lambda: bool(d.events("sweep.start")), 15, "the sweep to start")
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await d.signal(signal.SIGTERM)
        assert await d.exit_code(20) == 0
        took = time.monotonic() - started
    assert took < 12, took  # STOP_GRACE is 10 s; in practice cancellation is immediate
    assert d.events("sweep.interrupted")
    assert os.path.exists(tmp_path / "state.sqlite")


async def test_a_restart_keeps_the_schedule_instead_of_sweeping_at_once(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    cfg = daemon_config(tmp_path, "127.0.55.0/30", interval="1h")
    async with Lab([ServerSpec(host="127.0.55.1", port=PORT, behaviour=Behaviour.CLOSED)]):
        first = DaemonProcess(cfg, tmp_path / "log.jsonl")
        daemons.append(first)
        await first.start()
        await first.wait_for(lambda: bool(first.events("sweep.summary")), 30, "the first sweep")
        await first.signal(signal.SIGTERM)
        assert await first.exit_code(15) == 0
        second = DaemonProcess(cfg, tmp_path / "log.jsonl")
        daemons.append(second)
        await second.start()
        await second.wait_for(lambda: len(second.events("sweep.scheduled")) >= 2, 15, "a schedule")
        await asyncio.sleep(1.0)
        assert len(second.events("sweep.start")) == 1  # only the first daemon's sweep
        when = datetime.fromisoformat(second.events("sweep.scheduled")[-1]["at"])
        assert (when - datetime.now(UTC)).total_seconds() > 50 * 60
        await second.signal(signal.SIGTERM)
        assert await second.exit_code(15) == 0
