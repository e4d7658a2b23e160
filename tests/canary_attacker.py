"""Hostile clients of a canary receiver, run as their own process: token flood, endless line, idle.

    python tests/canary_attacker.py HOST PORT --domain D --source ADDR [--seconds S]

Every loop is bounded in count and in time: at most FLOOD_MESSAGES messages of FLOOD_BYTES,
ENDLESS_STREAMS streams of at most ENDLESS_BYTES each, IDLE_CONNECTIONS connections held at most
IDLE_SECONDS, and the whole run at most --seconds. Loopback only (the host and the source must
be in 127.0.0.0/8). Prints one JSON line with what it did and what the receiver answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import resource
import sys
import time
from collections import Counter

FLOOD_MESSAGES = 300  # the reproduction: 300 messages of 256 KB full of tokens
FLOOD_BYTES = 256 * 1024
FLOOD_PARALLEL = 16
FLOOD_RCPTS = 20  # recipients per message, each with a token of its own
# lines of 20 tokens (880 bytes): under the 1000 of RFC 5321, so every token is read
ENDLESS_STREAMS = 3  # DATA lines with no line ending: 3 x 100 MB
ENDLESS_BYTES = 100 * 1024 * 1024
FLOOD_HEAD_START = 10.0
IDLE_CONNECTIONS = 900
IDLE_SECONDS = 20.0
CHUNK = 64 * 1024


def _token() -> str:
    return "relayaudit-" + os.urandom(16).hex()


class Attack:
    def __init__(self, host: str, port: int, domain: str, source: str, until: float) -> None:
        self.host, self.port, self.domain, self.source = host, port, domain, source
        self.until = until
        self.replies: Counter[str] = Counter()  # first reply code of each connection's end
        self.sent = Counter[str]()

    def left(self) -> float:
        return max(0.0, self.until - time.monotonic())

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, local_addr=(self.source, 0)),
                min(5.0, self.left() + 0.01),
            )
        except (OSError, TimeoutError):
            self.replies["connect-failed"] += 1
            return None

    async def reply(self, reader: asyncio.StreamReader) -> str:
        """The code of the next reply (its last line), or "closed"."""
        for _ in range(100):
            try:
                line = await asyncio.wait_for(reader.readline(), min(10.0, self.left() + 0.01))
            except (OSError, TimeoutError, ValueError):
                return "closed"
            if not line:
                return "closed"
            if line[3:4] != b"-":
                return line[:3].decode("ascii", "replace")
        return "closed"

    async def command(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str
    ) -> str:
        writer.write(line.encode() + b"\r\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        return await self.reply(reader)

    async def envelope(
        self, rcpts: list[str]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection that got to DATA's 354, or None (the code it got instead is counted)."""
        conn = await self.connect()
        if conn is None:
            return None
        reader, writer = conn
        steps = ["EHLO attacker.test", "MAIL FROM:<x@attacker.test>"]
        steps += [f"RCPT TO:<{r}>" for r in rcpts] + ["DATA"]
        code = await self.reply(reader)  # the greeting
        for step in steps:
            if code[0] not in "23":
                break
            code = await self.command(reader, writer, step)
        if code != "354":
            self.replies[f"before-data:{code}"] += 1
            writer.close()
            return None
        return reader, writer

    async def flood_one(self) -> None:
        rcpts = [f"canary+{_token()}@{self.domain}" for _ in range(FLOOD_RCPTS)]
        conn = await self.envelope(rcpts)
        if conn is None:
            return
        reader, writer = conn
        body = b""
        while len(body) < FLOOD_BYTES:
            body += (" ".join(_token() for _ in range(20)) + "\r\n").encode()
        try:
            for i in range(0, len(body), CHUNK):
                writer.write(body[i : i + CHUNK])
                await asyncio.wait_for(writer.drain(), min(10.0, self.left() + 0.01))
                self.sent["flood-bytes"] += len(body[i : i + CHUNK])
            writer.write(b".\r\n")
            await writer.drain()
            self.replies[f"flood:{await self.reply(reader)}"] += 1
        except (OSError, TimeoutError):
            self.replies["flood:cut"] += 1
        finally:
            writer.close()

    async def flood(self) -> None:
        sem = asyncio.Semaphore(FLOOD_PARALLEL)

        async def one() -> None:
            async with sem:
                if self.left() > 0:
                    await self.flood_one()

        await asyncio.gather(*(one() for _ in range(FLOOD_MESSAGES)))

    async def endless(self) -> None:
        conn = await self.envelope([f"canary@{self.domain}"])
        if conn is None:
            return
        reader, writer = conn
        chunk = b"x" * CHUNK
        sent = 0
        try:
            while sent < ENDLESS_BYTES and self.left() > 0 and not reader.at_eof():
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), min(10.0, self.left() + 0.01))
                sent += len(chunk)
            self.replies["endless:not-cut"] += 1
        except (OSError, TimeoutError):
            self.replies["endless:cut"] += 1
        finally:
            self.sent["endless-bytes"] += sent
            writer.close()

    async def idle_one(self) -> None:
        conn = await self.connect()
        if conn is None:
            return
        reader, writer = conn
        try:
            # hold the connection without a word, until the receiver ends it or time is up
            data = await asyncio.wait_for(reader.read(4096), min(IDLE_SECONDS, self.left() + 0.01))
            self.replies[f"idle:{data[:3].decode('ascii', 'replace') or 'closed'}"] += 1
            await asyncio.wait_for(reader.read(4096), min(IDLE_SECONDS, self.left() + 0.01))
            self.replies["idle:ended-by-receiver"] += 1
        except (OSError, TimeoutError):
            self.replies["idle:held"] += 1
        finally:
            writer.close()

    async def idle(self) -> None:
        await asyncio.gather(*(self.idle_one() for _ in range(IDLE_CONNECTIONS)))


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--domain", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--seconds", type=float, default=40.0)
    args = p.parse_args()
    loopback = ipaddress.ip_network("127.0.0.0/8")
    if (
        ipaddress.ip_address(args.host) not in loopback
        or ipaddress.ip_address(args.source) not in loopback
    ):
        print("loopback only", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4096)), hard))
    started = time.monotonic()
    attack = Attack(args.host, args.port, args.domain, args.source, started + args.seconds)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.seconds + 5):
            flood = asyncio.ensure_future(attack.flood())
            streams = [asyncio.ensure_future(attack.endless()) for _ in range(ENDLESS_STREAMS)]
            # the idle horde comes once the flood has had its go (at most FLOOD_HEAD_START s):
            # from one host, it would otherwise keep the flood's own connections out
            await asyncio.wait([flood], timeout=FLOOD_HEAD_START)
            await asyncio.gather(attack.idle(), flood, *streams)
    report = {
        "seconds": round(time.monotonic() - started, 1),
        "replies": dict(attack.replies),
        "sent": dict(attack.sent),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
