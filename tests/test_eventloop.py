"""The optional uvloop event loop: chosen by limits.event_loop, and sweeps judge the same on both."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cli_runner import run_cli

from relayaudit import eventloop
from relayaudit.cli import _sweep_young
from relayaudit.config import parse_config
from relayaudit.errors import ConfigError
from relayaudit.lab import Behaviour, Lab, ServerSpec

uvloop = pytest.importorskip("uvloop")  # the test extra installs it; CI runs both loops

PORT = 2627
LAB = {
    1: Behaviour.OPEN_RELAY,
    2: Behaviour.CLOSED,
    3: Behaviour.CAMPUS_SENDER,
    4: Behaviour.ACCEPT_ALL_DISCARD,
    5: Behaviour.AUTH_REQUIRED,
    6: Behaviour.TARPIT,
}


async def _name() -> str:
    return eventloop.loop_name(asyncio.get_running_loop())


def test_the_choice_picks_the_loop() -> None:
    assert eventloop.run(_name(), "asyncio") == "asyncio"
    assert eventloop.run(_name(), "uvloop") == "uvloop"
    assert eventloop.run(_name(), "auto") == "uvloop"  # installed: auto takes it


def test_uvloop_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an install without it looks like
    assert eventloop.run(_name(), "auto") == "asyncio"
    with pytest.raises(ConfigError) as err:
        eventloop.loop_factory("uvloop")
    assert str(err.value).startswith("limits.event_loop: 'uvloop' is not installed")


def test_a_bad_choice_names_the_key() -> None:
    base = {"scope": ["127.0.23.0/24"], "targets": ["127.0.23.0/29"]}
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "limits": {"event_loop": "fast"}}, source="x.toml")
    assert "limits.event_loop" in str(err.value) and "'fast'" in str(err.value)
    assert parse_config(base, source="x.toml").limits.event_loop == "auto"


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    specs = [ServerSpec(host=f"127.0.23.{i}", port=PORT, behaviour=b) for i, b in LAB.items()]
    async with Lab(specs) as running:
        yield running


async def _sweep(tmp_path: Path, loop: str, processes: int) -> dict[str, set[str]]:
    out = tmp_path / f"{loop}-{processes}.jsonl"
    cfg = tmp_path / f"{loop}-{processes}.toml"
    cfg.write_text(
        f"""
scope = ["127.0.23.0/24"]
targets = ["127.0.23.0/29"]
ports = [{PORT}]
[relay]
campus_domains = ["campus.test"]
external_domains = ["relay-test.example", "sender.example"]
[timeouts]
connect = "1s"
command = "2s"
greeting = "2s"
[limits]
subnet_rate = 500
event_loop = "{loop}"
[output]
findings = "{out}"
"""
    )
    code, _, err = await run_cli("sweep", "--config", str(cfg), "--processes", str(processes))
    assert code == 1, err  # relays found
    kinds: dict[str, set[str]] = {}
    for line in out.read_text().splitlines():
        finding = json.loads(line)
        kinds.setdefault(finding["address"], set()).add(finding["kind"])
    return kinds


async def test_both_loops_find_the_same(tmp_path: Path, lab: Lab) -> None:
    plain = await _sweep(tmp_path, "asyncio", 1)
    fast = await _sweep(tmp_path, "uvloop", 2)
    assert fast == plain
    assert "open-relay" in plain["127.0.23.1"]
    assert "relay-campus-sender" in plain["127.0.23.3"]
    assert "127.0.23.6" not in plain  # the tarpit never greets: no-banner, no finding


async def _young() -> int:
    return gc.get_threshold()[0]


def test_only_a_sweep_without_the_canary_receiver_gets_the_larger_first_generation() -> None:
    """The daemon (the canary receiver's hostile peers build cycles) keeps the common
    threshold; a one-shot sweep that only probes gets the larger one (eventloop.py)."""
    before = gc.get_threshold()
    try:
        assert eventloop.run(_young(), "asyncio") == eventloop.GC_THRESHOLD[0] == 50_000
        assert eventloop.run(_young(), "asyncio", young=eventloop.SWEEP_YOUNG) == 500_000
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
    base = {"scope": ["127.0.23.0/24"], "targets": ["127.0.23.0/29"]}
    assert _sweep_young(parse_config(base, source="x.toml")) == eventloop.SWEEP_YOUNG
    with_canary = {
        **base,
        "canary": {"enabled": True, "domain": "canary.campus.test", "listen": "127.0.0.1:2525"},
    }
    assert _sweep_young(parse_config(with_canary, source="x.toml")) is None
