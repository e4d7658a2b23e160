"""A sweep leaves no cyclic garbage: its objects die by reference counting, not by the collector.

The sweep raises the collector's first threshold far above Python's default (eventloop.py)
because its collections found nothing and only walked the probes in flight. That is safe only
while a probe builds no reference cycle: one cycle through a probe's handshake held its whole
transcript (about 300 objects a host) until a full collection. This sweep covers every lab
behaviour, a closed port and a silent server, with the collector off, then counts what only the
collector could free.
"""

from __future__ import annotations

import collections
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayaudit.config import parse_config
from relayaudit.engine import sweep
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.sinks import FindingsFile

PORT = 2631
BEHAVIOURS = list(Behaviour)


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The collector stopped, and what it would free kept in gc.garbage for the test to read."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _ours(objects: list[object]) -> collections.Counter[str]:
    """The garbage of relayaudit's own types (the lab's servers and asyncio's are not ours)."""
    names: collections.Counter[str] = collections.Counter()
    for obj in objects:
        module = type(obj).__module__ or ""
        if module.startswith("relayaudit") and not module.startswith("relayaudit.lab"):
            names[f"{module}.{type(obj).__qualname__}"] += 1
    return names


async def test_a_sweep_of_every_behaviour_leaves_no_cycles(
    tmp_path: Path, collector_off: None
) -> None:
    specs = [
        ServerSpec(host=f"127.0.31.{i}", port=PORT, behaviour=b)
        for i, b in enumerate(BEHAVIOURS, start=1)
    ]
    config = parse_config(
        {
            "scope": ["127.0.31.0/24"],
            "targets": ["127.0.31.0/27"],  # the lab's addresses, and closed ones above them
            "ports": [PORT],
            "relay": {
                "campus_domains": ["campus.test"],
                "external_domains": ["relay-test.example", "sender.example"],
                "greylist_retry_after": "1s",  # the greylisting server's retry, at once
            },
            "timeouts": {"connect": "1s", "command": "1s", "greeting": "1s", "session": "10s"},
            "limits": {"subnet_rate": 1000},
            "output": {"findings": str(tmp_path / "findings.jsonl")},
        }
    )
    sink = FindingsFile(config.output.findings, sweep_id="gc", shard="0/1")
    sink.open()
    async with Lab(specs):
        gc.collect()  # what the lab's start left
        gc.garbage.clear()
        stats = await sweep(config, sinks=[sink])
    sink.close()
    assert stats.relays  # the sweep did its work: the open relay was found
    assert sink.written >= len(specs)
    gc.collect()
    assert not _ours(gc.garbage), _ours(gc.garbage).most_common(10)
