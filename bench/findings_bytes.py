"""Bytes per sweep in the daemon's findings file: whole lines ("always", as before 0.2) vs "changes".

    .venv/bin/python bench/findings_bytes.py [--hosts 24] [--sweeps 3]

Sweeps a loopback lab (open relays, campus-sender relays, AUTH without TLS, accept-all traps,
closed servers: about two findings per host) several times through a state store, once per
setting of `output.transcripts`, and prints the findings file's bytes per sweep side by side.
Loopback only (127.0.78.0/24); bounded in hosts, sweeps and time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relayaudit.config import parse_config
from relayaudit.engine import sweep
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.sinks import FindingsFile
from relayaudit.state import StateSink, StateStore

NET, PORT = "127.0.78", 2578
MIX = (
    Behaviour.OPEN_RELAY,
    Behaviour.CAMPUS_SENDER,
    Behaviour.AUTH_NO_TLS,
    Behaviour.ACCEPT_ALL_DISCARD,
    Behaviour.CLOSED,
    Behaviour.PERCENT_HACK,
)


async def run(hosts: int, sweeps: int, transcripts: str, work: Path) -> list[tuple[int, int]]:
    """(lines, bytes) of each sweep."""
    config = parse_config(
        {
            "scope": ["127.0.0.0/8"],
            "targets": [f"{NET}.0/24"],
            "ports": [PORT],
            "identity": {"helo_name": "relayaudit.campus.test"},
            "relay": {"campus_domains": ["campus.test"]},
            "timeouts": {"connect": "1s", "command": "3s", "greeting": "3s", "session": "30s"},
            "limits": {"concurrency": 64, "rate": 2000, "subnet_rate": 2000},
            "output": {"findings": str(work / f"{transcripts}.jsonl")},
        },
        source="(bench)",
    )
    specs = [
        ServerSpec(host=f"{NET}.{i + 1}", port=PORT, behaviour=MIX[i % len(MIX)])
        for i in range(hosts)
    ]
    out: list[tuple[int, int]] = []
    with StateStore(work / f"{transcripts}.sqlite") as store:
        async with Lab(specs):
            for _ in range(sweeps):
                record = store.begin_sweep(shard="0/1", config_fingerprint="bench", total=256)
                findings = FindingsFile(
                    config.output.findings,
                    sweep_id=record.id,
                    transcripts=transcripts,  # type: ignore[arg-type]
                )
                sink = StateSink(store, record.id, on_lines=findings.write)
                stats = await asyncio.wait_for(sweep(config, sinks=[sink]), 300)
                store.complete_sweep(record.id, stats)
                findings.close()
                out.append((findings.written, findings.bytes))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=24, choices=range(1, 201), metavar="1-200")
    parser.add_argument("--sweeps", type=int, default=3, choices=range(2, 11), metavar="2-10")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="relayaudit-bytes-") as tmp:
        before = asyncio.run(run(args.hosts, args.sweeps, "always", Path(tmp)))
        after = asyncio.run(run(args.hosts, args.sweeps, "changes", Path(tmp)))
    print(f"findings file bytes per sweep, {args.hosts} lab hosts on loopback")
    print(f"{'sweep':>5} {'lines':>6} {'always (before)':>16} {'changes (after)':>16} {'ratio':>7}")
    for i, ((lines, b), (_, a)) in enumerate(zip(before, after, strict=True), 1):
        print(f"{i:>5} {lines:>6} {b:>16,} {a:>16,} {a / b:>7.2f}")
        if i > 1:
            print(f"{'':>5} {'':>6} {b / lines:>13,.0f}/ln {a / lines:>13,.0f}/ln")
    print(f"({time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    main()
