"""The canary receiver under hostile clients: its bounds in process, then a real daemon attacked.

The daemon test runs `relayaudit run` sweeping a lab with confirmation on, and attacks its
receiver from another process (tests/canary_attacker.py: a token flood, endless DATA lines,
900 idle connections; every loop bounded in count and time): the daemon's RSS, read from
/proc, grows by less than 50 MB, and the sweep finishes in time with the same verdicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cli_runner import ROOT
from daemon_harness import DaemonProcess, base_config, read_jsonl, write_config
from loopback import free_port

import relayaudit.canary as canary_module
from relayaudit.canary import MAX_LINE, MAX_MESSAGES, CanaryReceiver
from relayaudit.lab import Behaviour, Lab, ServerSpec

DOMAIN = "canary.iso.test"
ATTACKER = "127.0.0.66"  # one hostile host on campus


@pytest.fixture
async def receiver() -> AsyncIterator[CanaryReceiver]:
    async with CanaryReceiver("127.0.0.1", 0, domain=DOMAIN, max_connections=4) as r:
        yield r


class Client:
    """A raw SMTP client: one line out, one reply in; every read bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def to(cls, receiver: CanaryReceiver, source: str = "127.0.0.1") -> Client:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", receiver.port, local_addr=(source, 0)
        )
        return cls(reader, writer)

    async def reply(self) -> str:
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 5)
            if not line:
                return " ".join(lines) or "closed"
            lines.append(line.decode().rstrip())
            if line[3:4] != b"-":
                return " ".join(lines)

    async def send(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def closed(self) -> bool:
        """The receiver ended the connection (EOF within 5 s)."""
        with contextlib.suppress(ConnectionError):
            return await asyncio.wait_for(self.reader.read(), 5) == b""
        return True

    def close(self) -> None:
        self.writer.close()


async def deliver(receiver: CanaryReceiver, rcpt: str, body: bytes) -> str:
    client = await Client.to(receiver)
    try:
        await client.reply()
        for line in ("EHLO relay.campus.test", "MAIL FROM:<>", f"RCPT TO:<{rcpt}>", "DATA"):
            await client.send(line)
        client.writer.write(body + b"\r\n.\r\n")
        return await client.reply()
    finally:
        client.close()


# -- the bounds, in process --------------------------------------------------------------------


async def test_the_greeting_names_no_software(receiver: CanaryReceiver) -> None:
    client = await Client.to(receiver)
    try:
        assert await client.reply() == f"220 {DOMAIN} ESMTP"  # aiosmtpd's: "Python SMTP 1.4.6"
        ehlo = await client.send("EHLO relay.campus.test")
        assert "python" not in ehlo.lower() and "aiosmtpd" not in ehlo.lower()
    finally:
        client.close()


async def test_only_a_token_the_scanner_sent_and_waits_for_is_kept(
    receiver: CanaryReceiver,
) -> None:
    sent, forged, late = (f"relayaudit-{c * 32}" for c in "abc")
    receiver.expect(sent)
    receiver.expect(late)
    assert await receiver.wait_for(late, 0.05) is None  # given up: no longer waited for
    for token in (sent, forged, late):
        reply = await deliver(receiver, f"c+{token}@{DOMAIN}", f"Token: {token}".encode())
        assert reply.startswith("250"), reply
    assert receiver.arrived(sent) is not None
    assert receiver.arrived(forged) is None and receiver.arrived(late) is None
    assert receiver.stats["messages", "token"] == 1
    assert receiver.stats["messages", "unexpected-token"] == 2
    assert await receiver.wait_for(sent, 1) is not None


async def test_a_relay_may_send_several_messages_on_one_connection_up_to_a_cap(
    receiver: CanaryReceiver,
) -> None:
    # OpenSMTPD sends its next message over the connection it has: refused (421), that canary
    # waited for the relay's retry, minutes, and the relay read as accepting without delivery
    client = await Client.to(receiver)
    try:
        await client.reply()
        await client.send("EHLO r.test")
        for n in range(MAX_MESSAGES):
            for line in ("MAIL FROM:<>", f"RCPT TO:<c@{DOMAIN}>", "DATA"):
                await client.send(line)
            client.writer.write(f"Subject: {n}\r\n\r\nx\r\n.\r\n".encode())
            assert (await client.reply()).startswith("250")
        assert await client.send("MAIL FROM:<>") == (
            f"421 4.7.0 At most {MAX_MESSAGES} messages per connection"
        )
        assert await client.closed()
    finally:
        client.close()


async def _in_data(receiver: CanaryReceiver) -> Client:
    client = await Client.to(receiver)
    await client.reply()
    for line in ("EHLO r.test", "MAIL FROM:<>", f"RCPT TO:<c@{DOMAIN}>", "DATA"):
        await client.send(line)
    return client


async def test_a_line_without_end_is_cut_at_the_cap(receiver: CanaryReceiver) -> None:
    client = await _in_data(receiver)
    try:
        client.writer.write(b"x" * (MAX_LINE + 1000))  # no line ending
        assert await client.reply() == "500 5.5.2 Line too long"
        assert await client.closed()
    finally:
        client.close()
    # one that keeps streaming is cut off too: its writes fail long before 64 MB
    client = await _in_data(receiver)
    streamed = 0
    try:
        with contextlib.suppress(ConnectionError, TimeoutError):
            for _ in range(1024):  # 64 MB at most
                client.writer.write(b"x" * 65536)
                await asyncio.wait_for(client.writer.drain(), 5)
                streamed += 65536
    finally:
        client.close()
    assert streamed < 16 * 1024 * 1024
    assert receiver.stats["connections", "line-too-long"] == 2
    await asyncio.sleep(0.1)
    assert receiver.connections == 0
    assert MAX_LINE <= 4096


async def test_a_message_larger_than_a_canary_is_cut(receiver: CanaryReceiver) -> None:
    token = "relayaudit-" + "d" * 32
    receiver.expect(token)
    body = (f"{token}\r\n" * 4000).encode()  # 180 KB: far more than a canary
    with contextlib.suppress(ConnectionError):
        reply = await deliver(receiver, f"c+{token}@{DOMAIN}", body)
        assert reply.startswith(("552", "closed")), reply
    assert receiver.arrived(token) is None
    assert receiver.stats["connections", "too-large"] == 1


async def test_a_flooding_host_cannot_lock_the_relays_out(receiver: CanaryReceiver) -> None:
    # max_connections=4: one host takes them all, then a relay comes
    flood = [await Client.to(receiver, "127.0.0.66") for _ in range(4)]
    for c in flood:
        assert (await c.reply()).startswith("220")
    extra = await Client.to(receiver, "127.0.0.66")
    assert (await extra.reply()).startswith("421")  # its fifth: refused
    relay = await Client.to(receiver, "127.0.0.77")
    try:
        assert (await relay.reply()).startswith("220")  # admitted: the flooder's oldest went
        assert (await flood[0].reply()).startswith("421")
        assert await flood[0].closed()
        assert receiver.connections == 4
        assert receiver.stats["connections", "refused-busy"] == 1
        assert receiver.stats["connections", "evicted"] == 1
        # the flooder cannot push the relay out again: it holds 3, the relay 1
        again = await Client.to(receiver, "127.0.0.66")
        assert (await again.reply()).startswith("421")
        again.close()
    finally:
        for c in [*flood, extra, relay]:
            c.close()


async def test_every_connection_has_a_deadline(
    receiver: CanaryReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(canary_module, "DEADLINE", 0.5)
    client = await Client.to(receiver)
    try:
        started = time.monotonic()
        await client.reply()
        for _ in range(20):  # busy, never idle: only the total deadline ends it
            await client.send("NOOP")
            if client.reader.at_eof():
                break
            await asyncio.sleep(0.1)
        assert await client.closed()
        assert time.monotonic() - started < 3
    finally:
        client.close()
    assert receiver.stats["connections", "deadline"] == 1


# -- a real daemon, attacked from another process ------------------------------------------------

NET = "127.0.61"
LAB = {
    1: Behaviour.OPEN_RELAY,
    2: Behaviour.CLOSED,
    3: Behaviour.CAMPUS_SENDER,
    4: Behaviour.ACCEPT_ALL_DISCARD,
}
EXPECTED = {  # address -> (status, the relay finding's kind and confidence)
    f"{NET}.1": ("open-relay", ("open-relay", "confirmed")),
    f"{NET}.2": ("relay-refused", None),
    f"{NET}.3": ("relay-campus-sender", ("relay-campus-sender", "confirmed")),
    f"{NET}.4": ("accepts-without-delivery", ("accepts-without-delivery", "high")),
}


def rss_mb(pid: int) -> float:
    """The process's resident set size from /proc (not tracemalloc: every byte the process holds)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # loopback only
        return str(response.read().decode())


def verdicts(tmp: Path, sweep_id: str) -> dict[str, tuple[str, tuple[str, str] | None]]:
    """address -> (status, relay finding) of one sweep, from the probe log and findings file."""
    relays = {
        "open-relay",
        "relay-campus-sender",
        "relay-after-starttls",
        "accepts-without-delivery",
    }
    found: dict[str, tuple[str, tuple[str, str] | None]] = {}
    for event in read_jsonl(tmp / "log.jsonl"):
        if event.get("event") == "probe" and event.get("sweep_id") == sweep_id:
            found[event["address"]] = (event["status"], None)
    for line in read_jsonl(tmp / "findings.jsonl"):
        if line["sweep_id"] == sweep_id and line["kind"] in relays:
            status, _ = found[line["address"]]
            found[line["address"]] = (status, (line["kind"], line["confidence"]))
    return found


@pytest.mark.time_limit(240)
async def test_an_attacked_daemon_stays_small_and_its_sweep_finishes_right(tmp_path: Path) -> None:
    port, canary_port, metrics_port = free_port(), free_port(), free_port()
    specs = [
        ServerSpec(
            host=f"{NET}.{i}",
            port=port,
            behaviour=b,
            hostname=f"mx{i}.campus.test",
            reply_delay=0.05,
        )
        for i, b in LAB.items()
    ]
    data: dict[str, Any] = base_config(tmp_path, f"{NET}.0/28", port)
    data["scope"] = [f"{NET}.0/24"]
    data["relay"] = {
        "campus_domains": ["campus.test"],
        "external_domains": ["relay-test.example", "sender.example"],
    }
    data["canary"] = {
        "enabled": True,
        "domain": DOMAIN,
        "listen": f"{NET}.20:{canary_port}",
        "wait": "8s",
        "campus_sender": "iso@campus.test",
    }
    data["timeouts"] = {"connect": "1s", "command": "5s", "session": "60s"}
    data["metrics"] = {"enabled": True, "listen": f"127.0.0.1:{metrics_port}"}
    data["schedule"] = {"interval": "1s"}
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    daemon = DaemonProcess(cfg, tmp_path / "log.jsonl")
    async with Lab(specs, campus_domains=("campus.test",), mx={DOMAIN: (f"{NET}.20", canary_port)}):
        await daemon.start()
        try:
            # sweep 1, unattacked: the daemon's size and the sweep's duration to compare with
            await daemon.wait_for(lambda: len(daemon.events("sweep.summary")) >= 1, 90, "sweep 1")
            first = daemon.events("sweep.summary")[0]
            await daemon.wait_for(lambda: len(daemon.events("sweep.start")) >= 2, 30, "sweep 2")
            baseline = rss_mb(daemon.pid)
            attacker = await asyncio.create_subprocess_exec(
                sys.executable,
                str(ROOT / "tests" / "canary_attacker.py"),
                f"{NET}.20",
                str(canary_port),
                "--domain",
                DOMAIN,
                "--source",
                ATTACKER,
                "--seconds",
                "30",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            peak = baseline
            communicate = asyncio.ensure_future(attacker.communicate())
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (
                communicate.done() and len(daemon.events("sweep.summary")) >= 2
            ):
                assert daemon.running, "the daemon died under attack"
                peak = max(peak, rss_mb(daemon.pid))
                await asyncio.sleep(0.1)
            out, err = await asyncio.wait_for(communicate, 60)
            metrics = await asyncio.to_thread(fetch, f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            with contextlib.suppress(ProcessLookupError):
                if "attacker" in locals() and attacker.returncode is None:
                    attacker.kill()
            code = await daemon.stop()
    assert code == 0, daemon.stderr.decode()
    report = json.loads(out.decode().splitlines()[-1])
    # the attack happened: idle connections held or refused, streams cut, messages cut
    assert report["sent"].get("endless-bytes", 0) > 0, json.dumps(report)
    assert report["sent"].get("flood-bytes", 0) > 0, json.dumps(report)
    growth = peak - baseline
    assert growth < 50, f"the daemon grew {growth:.0f} MB ({baseline:.0f} -> {peak:.0f}): {report}"
    second = daemon.events("sweep.summary")[1]
    # on time: the attacked sweep takes about as long as the quiet one
    assert second["duration_s"] < first["duration_s"] * 1.5 + 10, (first, second, report)
    sweep_ids = [e["sweep_id"] for e in daemon.events("sweep.summary")[:2]]
    for sweep_id in sweep_ids:
        found = verdicts(tmp_path, sweep_id)
        assert {a: found.get(a) for a in EXPECTED} == EXPECTED, (sweep_id, report)
        assert {v for a, v in found.items() if a not in EXPECTED} == {("closed", None)}
    # what the receiver did with the attack, in the daemon's metrics
    counted = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("relayaudit_canary_")
    }
    assert counted.get('relayaudit_canary_messages_total{result="token"}', 0) >= 2, counted
    assert counted.get('relayaudit_canary_connections_total{outcome="refused-busy"}', 0) > 0, (
        counted
    )
    assert counted.get('relayaudit_canary_connections_total{outcome="line-too-long"}', 0) > 0, (
        counted
    )
    assert counted.get('relayaudit_canary_connections_total{outcome="too-large"}', 0) > 0, counted
