"""Records the byte transcripts tests/test_replay.py replays: real Postfix, Exim and OpenSMTPD.

Run by hand (as root, after scripts/test has installed the MTAs) when the battery changes:

    .venv/bin/python tests/record_transcripts.py

For each server below it starts the real MTA on loopback (tests/postfix_lab.py,
tests/mta_lab.py), puts a recording TCP proxy on the server's own address (another port) and
probes the proxy, so the battery's address forms name the server's address. The proxy's
outgoing connections come from the scanner's lab source address, outside the MTAs' trusted
networks. Each connection's bytes, both ways and in order, go to tests/transcripts/<name>.json
with the settings used and the verdict the live probe gave.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import shutil
import socket
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import mta_lab
import postfix_lab
from factories import probe_settings
from replay import CONTROL_TOKEN, FIXED_TOKEN, TRANSCRIPTS, encode

from relayaudit.probe import ProbeSettings, probe
from relayaudit.verdict import judge

# (recording name, MTA kind, policy)
SERVERS = (
    ("postfix-closed", "postfix", "closed"),
    ("postfix-open", "postfix", "open"),
    ("exim-closed", "exim", "closed"),
    ("opensmtpd-default", "opensmtpd", "default"),
)


class Recorder:
    """A loopback proxy to one server that keeps every connection's bytes in order."""

    def __init__(self, upstream: tuple[str, int], source: str) -> None:
        self.upstream = upstream
        self.source = source
        self.connections: list[list[tuple[str, bytes]]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        events: list[tuple[str, bytes]] = []
        self.connections.append(events)
        up_reader, up_writer = await asyncio.open_connection(
            *self.upstream, local_addr=(self.source, 0)
        )

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, side: str) -> None:
            while data := await src.read(65536):
                events.append((side, data))
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()

        await asyncio.gather(
            pump(reader, up_writer, "c"), pump(up_reader, writer, "s"), return_exceptions=True
        )
        writer.close()
        up_writer.close()


def merged(events: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
    """Adjacent chunks of one side joined; the control recipient's random token made fixed."""
    out: list[tuple[str, bytes]] = []
    for side, data in events:
        if out and out[-1][0] == side:
            out[-1] = (side, out[-1][1] + data)
        else:
            out.append((side, data))
    return [(side, encode(CONTROL_TOKEN.sub(FIXED_TOKEN, data))) for side, data in out]


async def record(name: str, host: str, port: int, settings: ProbeSettings) -> dict[str, Any]:
    recorder = Recorder((host, port), settings.source_address or "127.0.0.1")
    server = await asyncio.start_server(recorder.handle, host, 0, family=socket.AF_INET)
    proxy_port = server.sockets[0].getsockname()[1]
    try:
        direct = settings.__class__(**{**asdict(settings), "source_address": None})
        result = await probe(host, proxy_port, direct)
    finally:
        server.close()
        await server.wait_closed()
    verdict = judge(result)
    return {
        "name": name,
        "address": host,
        "port": proxy_port,
        "settings": {k: v for k, v in asdict(direct).items() if k != "canary"},
        "expected": {
            "status": result.status.value,
            "verdict": verdict.status.value,
            "sessions": result.sessions,
            "tests": [[t.test.id, t.transport.value, t.outcome.value] for t in result.tests],
        },
        "connections": [merged(c) for c in recorder.connections],
    }


def main() -> None:
    TRANSCRIPTS.mkdir(exist_ok=True)
    settings = probe_settings(
        source_address=postfix_lab.SCANNER_SOURCE,
        connect_timeout=3.0,
        command_timeout=10.0,
        session_timeout=60.0,
        external_domains=("outside-b.test", "outside-a.test"),
        retest_after_starttls=False,  # a TLS session cannot be replayed
    )
    for name, kind, policy in SERVERS:
        if kind != "postfix":  # the MTA lab's addresses are fixed: wait for a test run using it
            lock = (Path(tempfile.gettempdir()) / f"relayaudit-mta-{kind}.lock").open("a")
            fcntl.flock(lock, fcntl.LOCK_EX)
        base = (postfix_lab if kind == "postfix" else mta_lab).make_lab_directory()
        try:
            instances: Any
            if kind == "postfix":
                instances = postfix_lab.start_lab(base, policies=(policy,))
                stop: Any = postfix_lab.stop_lab
            else:
                instances = mta_lab.start_instances(base, kind, (policy,))
                stop = mta_lab.stop_instances
            host, port = instances[policy].host, instances[policy].port
            try:
                data = asyncio.run(record(name, host, port, settings))
            finally:
                stop(instances)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        path = TRANSCRIPTS / f"{name}.json"
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{path}: {data['expected']['verdict']}, {len(data['connections'])} connections")


if __name__ == "__main__":
    main()
