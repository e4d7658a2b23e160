"""Sweeps fed by targets_from: a zone file and an MX lookup on NSD, the last good list, sources per family."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cli_runner import ROOT, run_cli
from daemon_harness import DaemonProcess, base_config, read_jsonl, write_config
from nsd_lab import nsd_server
from toml_writer import toml_document

from relayaudit.config import parse_config
from relayaudit.engine import sweep
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.sinks import Collector
from relayaudit.verdict import VerdictStatus

PORT = 2760  # the lab's SMTP port on 127.0.160.x (this file's block: 127.0.160.0/24)

# campus.test's MX hosts are the open relay .1 and the closed server .2; the zone file names .3
# (relays for campus senders) and .4 (closed); .5 runs an open relay that no source names
ZONE = """$ORIGIN campus.test.
$TTL 300
@      SOA   ns1 hostmaster 2024010101 3600 600 86400 300
@      NS    ns1
@      MX    10 mx1
@      MX    20 mx2
ns1    A     127.0.0.1
mx1    A     127.0.160.1
mx2    A     127.0.160.2
www    A     192.0.2.80
"""
DEPT_ZONE = """$ORIGIN dept.campus.test.
$TTL 300
@        SOA   ns1.campus.test. hostmaster.campus.test. 1 3600 600 86400 300
@        NS    ns1.campus.test.
smtp     A     127.0.160.3
printer  A     127.0.160.4
cloud    A     198.51.100.25
"""
LAB = {
    1: Behaviour.OPEN_RELAY,
    2: Behaviour.CLOSED,
    3: Behaviour.CAMPUS_SENDER,
    4: Behaviour.CLOSED,
    5: Behaviour.OPEN_RELAY,
}


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    specs = [ServerSpec(host=f"127.0.160.{i}", port=PORT, behaviour=b) for i, b in LAB.items()]
    async with Lab(specs) as running:
        yield running


def sweep_config(tmp_path: Path, nsd_port: int) -> dict[str, Any]:
    (tmp_path / "dept.zone").write_text(DEPT_ZONE, encoding="utf-8")
    return {
        "scope": ["127.0.160.0/24"],
        "targets": [],  # only what DNS names
        "targets_from": [
            {"zone_file": "dept.zone"},
            {"mx": "campus.test", "server": "127.0.0.1", "port": nsd_port},
        ],
        "ports": [PORT],
        "identity": {"helo_name": "relayaudit.campus.test"},
        "relay": {"campus_domains": ["campus.test"], "external_domains": ["relay-test.example"]},
        "timeouts": {"connect": "1s", "command": "3s", "session": "20s"},
        "limits": {"concurrency": 8, "rate": 500, "subnet_rate": 500},
        "output": {"findings": str(tmp_path / "findings.jsonl")},
    }


async def test_a_sweep_fed_by_a_zone_file_and_an_mx_lookup(tmp_path: Path, lab: Lab) -> None:
    """The issue's "done when": the relays among the DNS-named addresses, each with its name."""
    with nsd_server(tmp_path / "nsd", {"campus.test": ZONE}) as nsd:
        cfg = tmp_path / "relayaudit.toml"
        cfg.write_text(toml_document(sweep_config(tmp_path, nsd.port)), encoding="utf-8")
        code, _, err = await run_cli(
            "sweep", "--config", str(cfg), "--all", "--report", str(tmp_path / "report.csv")
        )
    assert code == 1, err  # relays found
    mx = f"mx campus.test from 127.0.0.1:{nsd.port}"
    assert f"relayaudit: {mx}: 2 addresses, 0 out of scope, 0 bad lines" in err
    zone = f"zone_file {tmp_path / 'dept.zone'}"
    assert f"relayaudit: {zone}: 2 addresses, 1 out of scope, 0 bad lines" in err
    assert f"{zone}: cloud.dept.campus.test A 198.51.100.25 is outside scope" in err
    lines = [json.loads(line) for line in (tmp_path / "findings.jsonl").read_text().splitlines()]
    found = {(r["address"], r["kind"]): r["origin"] for r in lines}
    assert found[("127.0.160.1", "open-relay")] == [
        {"source": mx, "name": "mx1.campus.test", "record": "A"}
    ]
    assert found[("127.0.160.3", "relay-campus-sender")] == [
        {"source": zone, "name": "smtp.dept.campus.test", "record": "A"}
    ]
    assert {a for a, _ in found} <= {"127.0.160.1", "127.0.160.2", "127.0.160.3", "127.0.160.4"}
    assert "127.0.160.5" not in (tmp_path / "findings.jsonl").read_text()  # named by no source
    report = (tmp_path / "report.csv").read_text()
    assert f"mx1.campus.test A ({mx})" in report


async def test_the_same_sweep_from_a_list_on_standard_input(tmp_path: Path, lab: Lab) -> None:
    data = sweep_config(tmp_path, 53)
    del data["targets_from"]
    cfg = tmp_path / "relayaudit.toml"
    cfg.write_text(toml_document(data), encoding="utf-8")
    listed = "# from the IPAM\n127.0.160.5\n127.0.160.5\n::ffff:127.0.160.2\n127.0.161.1\n"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayaudit",
        "sweep",
        "--config",
        str(cfg),
        "--targets-file",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    _, err = await asyncio.wait_for(proc.communicate(listed.encode()), 60)
    assert proc.returncode == 1, err
    assert "<stdin>:5: '127.0.161.1' is outside scope (127.0.160.0/24)" in err.decode()
    assert "file <stdin>: 2 addresses, 1 out of scope, 0 bad lines" in err.decode()
    records = [json.loads(x) for x in (tmp_path / "findings.jsonl").read_text().splitlines()]
    kinds = {(r["address"], r["kind"]) for r in records}
    assert ("127.0.160.5", "open-relay") in kinds
    assert {a for a, _ in kinds} <= {"127.0.160.5", "127.0.160.2"}


async def test_an_unreadable_list_does_not_empty_the_next_sweep(
    tmp_path: Path, lab: Lab, daemons: list[DaemonProcess]
) -> None:
    """The daemon sweeps twice; the list is gone before the second. With resolve_after = 1 an
    emptied sweep would resolve the relay: it stays open, and the log says why."""
    (tmp_path / "ipam.txt").write_text("127.0.160.5\n127.0.160.4\n", encoding="utf-8")
    (tmp_path / "dept.zone").write_text(DEPT_ZONE, encoding="utf-8")
    data = base_config(tmp_path, "127.0.160.0/24", PORT)
    data["scope"] = ["127.0.160.0/24"]
    data["targets"] = []
    data["targets_from"] = [{"file": "ipam.txt"}, {"zone_file": "dept.zone"}]
    data["schedule"] = {"interval": "2s"}
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    daemon = DaemonProcess(cfg, tmp_path / "log.jsonl")
    daemons.append(daemon)
    await daemon.start()
    await daemon.wait_for(lambda: len(daemon.events("sweep.summary")) >= 1, 60, "a first sweep")
    (tmp_path / "ipam.txt").rename(tmp_path / "moved.txt")
    await daemon.wait_for(lambda: len(daemon.events("sweep.summary")) >= 2, 60, "a second sweep")
    assert await daemon.stop() == 0
    first, second = daemon.events("sweep.summary")[:2]
    assert first["hosts"] == second["hosts"] == 3  # .3, .4 (named twice), .5
    assert first["relays"] == second["relays"] == 2  # .5 from the list, .3 from the zone
    failed = daemon.events("targets.source_failed")
    assert failed and failed[0]["source"] == f"file {tmp_path / 'ipam.txt'}"
    assert failed[0]["kept"] == 2 and "No such file or directory" in failed[0]["error"]
    starts = daemon.events("sweep.start")
    assert starts[0]["targets_hash"] == starts[1]["targets_hash"]  # the same list, kept
    assert second["transitions"].get("resolved", 0) == 0
    # the finding of the zone's host names its DNS name in `show`
    findings = read_jsonl(tmp_path / "findings.jsonl")
    campus = next(f for f in findings if f["address"] == "127.0.160.3")
    code, out, _ = await run_cli("show", campus["id"], "--config", str(cfg))
    assert code == 0
    assert (
        f"  found as:    smtp.dept.campus.test A (zone_file {tmp_path / 'dept.zone'})" in out
    )


async def test_each_family_from_its_own_source(tmp_path: Path) -> None:
    """source_address picks by the target's family; a family without one says so in one line."""
    base: dict[str, Any] = {
        "scope": ["127.0.160.0/24", "::1"],
        "targets": ["127.0.160.250", "::1"],
        "ports": [PORT + 1],  # nothing listens: each connect is refused at once
        "timeouts": {"connect": "1s"},
    }
    collector = Collector()
    await sweep(parse_config({**base, "source_address": "127.0.0.1"}), sinks=[collector])
    got = {r.address: (r.status.value, r.vantage, r.error) for r, _ in collector.results}
    assert got["127.0.160.250"] == ("closed", "127.0.0.1", "connection refused")
    assert got["::1"] == (
        "error",
        "default",
        "not probed: source_address (127.0.0.1) has no IPv6 address to connect from",
    )
    both = Collector()
    await sweep(parse_config({**base, "source_address": ["127.0.0.1", "::1"]}), sinks=[both])
    picked = {r.address: (r.status.value, r.vantage) for r, _ in both.results}
    assert picked == {"127.0.160.250": ("closed", "127.0.0.1"), "::1": ("closed", "::1")}
    verdicts = {r.address: v.status for r, v in both.results}
    assert verdicts["::1"] is VerdictStatus.CLOSED
