"""Shards as real processes: n `run`/`sweep --shard i/n` cover every target once, and their findings merge."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cli_runner import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from relayaudit.daemon import STOP_GRACE
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.targets import Shard, TargetSpace

NET = "127.0.62.0/27"
PORT = 2762
N = 3
ADDRESSES = {f"127.0.62.{i}" for i in range(32)}
LAB = [
    ServerSpec(host="127.0.62.3", port=PORT, behaviour=Behaviour.OPEN_RELAY),
    ServerSpec(host="127.0.62.9", port=PORT, behaviour=Behaviour.OPEN_RELAY),
    ServerSpec(host="127.0.62.17", port=PORT, behaviour=Behaviour.CAMPUS_SENDER),
    ServerSpec(host="127.0.62.21", port=PORT, behaviour=Behaviour.CLOSED),
    ServerSpec(host="127.0.62.30", port=PORT, behaviour=Behaviour.AUTH_NO_TLS),
]
SEED = 7


def write_config(directory: Path) -> Path:
    """One shard's config: the same targets and seed as every other shard, its own files."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / "relayaudit.toml"
    cfg.write_text(
        f"""
scope = ["127.0.62.0/24"]
targets = ["{NET}"]
ports = [{PORT}]
seed = {SEED}
[relay]
campus_domains = ["campus.test"]
[timeouts]
connect = "1s"
command = "3s"
session = "20s"
[limits]
concurrency = 16
rate = 500
subnet_rate = 500
[schedule]
interval = "1h"
[state]
path = "{directory / "state.sqlite"}"
[output]
findings = "{directory / "findings.jsonl"}"
[logging]
file = "{directory / "log.jsonl"}"
stdout = false
[metrics]
enabled = false
"""
    )
    return cfg


def events(directory: Path, name: str) -> list[dict[str, Any]]:
    path = directory / "log.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == name]


def findings_lines(directory: Path) -> list[dict[str, Any]]:
    path = directory / "findings.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def relayaudit(*args: str, timeout: float = 60) -> tuple[int, str]:
    code, out, err = await run_cli(*args, timeout=timeout)
    assert code in (0, 1), err
    return code, out


async def findings_json(*states: Path) -> list[dict[str, Any]]:
    args = [a for s in states for a in ("--state", str(s))]
    code, out = await relayaudit("findings", *args, "--json")
    assert code == 0
    rows = json.loads(out)
    assert isinstance(rows, list)
    return rows


async def test_daemon_shards_cover_every_target_once_and_merge(tmp_path: Path) -> None:
    dirs = [tmp_path / f"shard-{i}" for i in range(N)]
    whole = tmp_path / "whole"  # one unsharded daemon: what the shards must add up to
    jobs = [(d, ["--shard", f"{i}/{N}"]) for i, d in enumerate(dirs)] + [(whole, [])]
    procs: list[asyncio.subprocess.Process] = []
    async with Lab(LAB):
        try:
            for directory, extra in jobs:
                cfg = write_config(directory)
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "relayaudit", "run", "--config", str(cfg), *extra,
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                )  # fmt: skip
            deadline = time.monotonic() + 60
            while not all(events(d, "sweep.summary") for d, _ in jobs):
                assert time.monotonic() < deadline, "timed out waiting for every shard's sweep"
                assert all(p.returncode is None for p in procs), "a shard exited early"
                await asyncio.sleep(0.2)
            for p in procs:
                p.send_signal(signal.SIGTERM)
            codes = [await asyncio.wait_for(p.wait(), STOP_GRACE * 2) for p in procs]
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
    assert codes == [0] * len(jobs)

    # every address probed by exactly one shard, and each shard probed what it owns
    space = TargetSpace([ipaddress.ip_network(NET)], [], seed=SEED)  # the shards' own split
    probed = Counter(e["address"] for d in dirs for e in events(d, "probe"))
    assert set(probed) == ADDRESSES and set(probed.values()) == {1}
    for i, d in enumerate(dirs):
        owned = {str(a) for _, a in space.iter_shard(Shard(i, N))}
        assert {e["address"] for e in events(d, "probe")} == owned
        (start,) = events(d, "sweep.start")
        assert start["total"] == len(owned) and start["shard"] == f"{i}/{N}"
    assert {e["address"] for e in events(whole, "probe")} == ADDRESSES

    # `relayaudit findings` reads the three state files together: nothing twice, nothing lost
    per_shard = [await findings_json(d / "state.sqlite") for d in dirs]
    merged = await findings_json(*(d / "state.sqlite" for d in dirs))
    ids = [r["id"] for r in merged]
    assert len(ids) == len(set(ids)) == sum(len(rows) for rows in per_shard)
    assert {r["id"] for rows in per_shard for r in rows} == set(ids)
    reference = await findings_json(whole / "state.sqlite")
    assert {r["id"] for r in reference} == set(ids)
    relays = {r["address"] for r in merged if r["kind"] in {"open-relay", "relay-campus-sender"}}
    assert relays == {"127.0.62.3", "127.0.62.9", "127.0.62.17"}
    # overlapping state files (say, before and after a re-shard) still give each finding once
    overlapping = await findings_json(*(d / "state.sqlite" for d in dirs), whole / "state.sqlite")
    assert sorted(r["id"] for r in overlapping) == sorted(ids)


async def test_sweep_shards_write_disjoint_findings(tmp_path: Path) -> None:
    dirs = [tmp_path / f"shard-{i}" for i in range(N)]
    whole = tmp_path / "whole"
    async with Lab(LAB):
        results = await asyncio.gather(
            *(
                relayaudit("sweep", "--config", str(write_config(d)), "--shard", f"{i}/{N}")
                for i, d in enumerate(dirs)
            ),
            relayaudit("sweep", "--config", str(write_config(whole))),
        )
    # exit 1 exactly for the shards that found a relay
    for (code, _), d in zip(results, [*dirs, whole], strict=True):
        relay = any(f["kind"] in {"open-relay", "relay-campus-sender"} for f in findings_lines(d))
        assert code == (1 if relay else 0)
    by_shard = [{f["id"] for f in findings_lines(d)} for d in dirs]
    assert sum(len(s) for s in by_shard) == len(set().union(*by_shard)), "a finding in two shards"
    assert set().union(*by_shard) == {f["id"] for f in findings_lines(whole)}
    assert by_shard.count(set()) < N  # the lab's servers are spread over the shards


# -- sweep --processes: sub-shards that add up to the shard ------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(0, 300),
    count=st.integers(1, 7),
    processes=st.integers(1, 7),
    seed=st.integers(0, 2**32),
)
def test_process_sub_shards_add_up_to_the_shard(
    size: int, count: int, processes: int, seed: int
) -> None:
    """Over random n and P: the P processes of shard i/n cover exactly i/n, each address once."""
    targets = [ipaddress.ip_network(f"127.0.0.0/{32 - (size - 1).bit_length()}")] if size else []
    space = TargetSpace(targets, [], seed=seed)
    everything: set[str] = set()
    for index in range(count):
        shard = Shard(index, count)
        own = [str(a) for _, a in space.iter_shard(shard)]
        subs = shard.split(processes)
        assert len(subs) == processes
        parts = [[str(a) for _, a in space.iter_shard(sub)] for sub in subs]
        flat = [a for part in parts for a in part]
        assert len(flat) == len(set(flat)), f"{shard} x {processes}: an address in two processes"
        assert set(flat) == set(own), f"{shard} x {processes}: not the shard's addresses"
        assert sum(space.shard_size(sub) for sub in subs) == space.shard_size(shard)
        assert not everything & set(own), f"{shard}: an address in two shards"
        everything |= set(own)
    assert everything == {str(a) for _, a in space.iter_shard()}


PROCESSES_NET = "127.0.121.0/28"
PROCESSES_PORT = 2721


def _processes_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / "relayaudit.toml"
    cfg.write_text(
        f"""
scope = ["127.0.121.0/24"]
targets = ["{PROCESSES_NET}"]
ports = [{PROCESSES_PORT}]
seed = {SEED}
[timeouts]
connect = "1s"
command = "3s"
session = "20s"
[limits]
rate = 500
subnet_rate = 500
[output]
findings = "{directory / "findings.jsonl"}"
"""
    )
    return cfg


async def test_sweep_processes_probe_exactly_the_shard(tmp_path: Path) -> None:
    """`sweep --shard i/2 --processes P` finds the same hosts for P = 1, 2 and 3.

    Every address of the range runs an SMTP server, so each probed address leaves a finding
    (an unapproved SMTP service): the findings file lists what the processes probed.
    """
    hosts = [str(a) for a in ipaddress.ip_network(PROCESSES_NET)]
    lab = [ServerSpec(host=h, port=PROCESSES_PORT, behaviour=Behaviour.CLOSED) for h in hosts]
    probed: dict[tuple[int, int], set[str]] = {}
    async with Lab(lab):
        for index in range(2):
            for processes in (1, 2, 3):
                run = tmp_path / f"shard-{index}-p{processes}"
                await relayaudit(
                    "sweep", "--config", str(_processes_config(run)),
                    "--shard", f"{index}/2", "--processes", str(processes),
                )  # fmt: skip
                probed[index, processes] = {f["address"] for f in findings_lines(run)}
    space = TargetSpace([ipaddress.ip_network(PROCESSES_NET)], [], seed=SEED)
    for index in range(2):
        owned = {str(a) for _, a in space.iter_shard(Shard(index, 2))}
        for processes in (1, 2, 3):
            assert probed[index, processes] == owned, (index, processes)
    assert probed[0, 1] | probed[1, 1] == set(hosts)
