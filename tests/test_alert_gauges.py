"""/metrics' alert gauges move when a delivery succeeds or dies, not when the next sweep ends
(issue 22, item 4): a real daemon, a loopback open relay, command hooks, the metrics listener."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from daemon_harness import DaemonProcess, base_config, write_config
from loopback import free_port

from relayaudit.lab import Behaviour, Lab, ServerSpec

HOST, PORT = "127.0.133.1", 2833  # this file's lab: 127.0.133.0/24

# fails while its gate file exists, then succeeds: a ticket system that comes back
GATED = "import os, sys; sys.exit(1 if os.path.exists(sys.argv[1]) else 0)"
ALWAYS_FAILS = "import sys; sys.exit(3)"


async def scrape(port: int) -> dict[str, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = (await asyncio.wait_for(reader.read(), 10)).decode()
    finally:
        writer.close()
    return {
        m[1]: float(m[2])
        for m in re.finditer(
            r'^(relayaudit_alerts(?:\{state="\w+"\}|_dead_total)) (\S+)$', body, re.M
        )
    }


async def test_alert_gauges_follow_deliveries_between_sweeps(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    gate = tmp_path / "ticket-system-down"
    gate.touch()
    metrics_port = free_port()
    data = base_config(tmp_path, f"{HOST}/32", PORT)
    data["schedule"] = {"interval": "1h"}  # one sweep: anything that moves later is the dispatcher
    data["metrics"] = {"enabled": True, "listen": f"127.0.0.1:{metrics_port}"}
    data["alerts"] = {
        "backoff_initial": "1s",
        "backoff_max": "1s",
        "max_attempts": 3,
        "command": [
            {"name": "gated", "argv": [sys.executable, "-c", GATED, str(gate)]},
            {"name": "broken", "argv": [sys.executable, "-c", ALWAYS_FAILS]},
        ],
    }
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    async with Lab([ServerSpec(host=HOST, port=PORT, behaviour=Behaviour.OPEN_RELAY)]):
        daemon = DaemonProcess(cfg, tmp_path / "log.jsonl")
        daemons.append(daemon)
        await daemon.start()
        await daemon.wait_for(lambda: bool(daemon.events("sweep.summary")), 30, "the sweep")
        at_summary = await scrape(metrics_port)
        alerts = at_summary['relayaudit_alerts{state="pending"}']
        assert alerts >= 2 and at_summary['relayaudit_alerts{state="sent"}'] == 0, at_summary
        gate.unlink()  # the ticket system is back: the gated hook's next try succeeds
        await daemon.wait_for(
            lambda: (
                len(daemon.events("alert.delivered")) >= alerts / 2
                and len(daemon.events("alert.dead")) >= alerts / 2
            ),
            30,
            "every alert delivered by one hook and dead on the other",
        )
        await asyncio.sleep(0.5)  # the gauges are set right after the pass that moved them
        later = await scrape(metrics_port)
        assert len(daemon.events("sweep.summary")) == 1  # no second sweep refreshed them
        await daemon.stop()
    # before: still {pending: N, sent: 0, dead: 0, dead_total: 0} until the next sweep ended
    assert later == {
        'relayaudit_alerts{state="pending"}': 0,
        'relayaudit_alerts{state="sent"}': alerts / 2,
        'relayaudit_alerts{state="dead"}': alerts / 2,
        "relayaudit_alerts_dead_total": alerts / 2,
    }, later


async def test_a_restarted_daemon_shows_what_its_store_knows_before_its_next_sweep(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    # before: after a restart the gauges read 0 or were absent until the next sweep (hours),
    # so "no sweep completed", "open relay" and "dead letters" alert rules resolved falsely
    metrics_port = free_port()
    data = base_config(tmp_path, f"{HOST}/32", PORT)
    data["schedule"] = {"interval": "1h"}
    data["metrics"] = {"enabled": True, "listen": f"127.0.0.1:{metrics_port}"}
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    async with Lab([ServerSpec(host=HOST, port=PORT, behaviour=Behaviour.OPEN_RELAY)]):
        first = DaemonProcess(cfg, tmp_path / "log.jsonl")
        daemons.append(first)
        await first.start()
        await first.wait_for(lambda: bool(first.events("sweep.summary")), 30, "the sweep")
        assert await first.stop() == 0
    second = DaemonProcess(cfg, tmp_path / "log.jsonl")
    daemons.append(second)
    await second.start()
    await second.wait_for(lambda: len(second.events("sweep.scheduled")) >= 2, 30, "the schedule")
    body = await scrape_text(metrics_port)
    await second.stop()
    completed = re.search(r"^relayaudit_last_completed_sweep_timestamp_seconds (\S+)$", body, re.M)
    assert completed is not None and float(completed[1]) > 0, body
    assert re.search(r'^relayaudit_findings\{kind="open-relay",status="new"\} 1$', body, re.M), body
    assert 'relayaudit_probes_total{status="internal-error"} 0' in body
    assert len(second.events("sweep.start")) == 1  # the first daemon's: the next is an hour away


async def scrape_text(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return (await asyncio.wait_for(reader.read(), 10)).decode()
    finally:
        writer.close()
