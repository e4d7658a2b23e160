"""Byte-replay of recorded SMTP servers: a probe runs against a transcript, with no socket at all.

A recording (tests/transcripts/*.json, made by tests/record_transcripts.py against the real
Postfix, Exim and OpenSMTPD of the test suite) holds, per connection the probe made, the bytes
each side sent, in order. `ReplayDial` hands the probe one recorded connection per dial; its
transport checks every byte the client writes against the recording and answers with the
server's recorded bytes, through aiosmtplib's real framing (relayaudit.wire.Wire).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayaudit.evidence import PortState, ProbeStatus
from relayaudit.failures import NoSession
from relayaudit.wire import Wire

TRANSCRIPTS = Path(__file__).parent / "transcripts"

Event = tuple[str, bytes]  # ("c", client bytes) or ("s", server bytes)
# the control recipient's token is random in every run; recordings hold it as zeros
CONTROL_TOKEN = re.compile(rb"nx-[0-9a-f]{12}")
FIXED_TOKEN = b"nx-000000000000"


def encode(data: bytes) -> str:
    return data.decode("latin-1")


def decode(text: str) -> bytes:
    return text.encode("latin-1")


class Mismatch(AssertionError):
    """The client sent something other than what the recording holds."""


class ReplayTransport(asyncio.Transport):
    """Plays one recorded connection to whichever protocol is set on it."""

    def __init__(self, events: list[Event], *, local: str, peer: tuple[str, int]) -> None:
        super().__init__()
        self._events = list(events)
        self._pending = b""  # client bytes written but not yet matched
        self._closing = False
        self._protocol: asyncio.BaseProtocol | None = None
        self._extra = {"sockname": (local, 40000), "peername": peer}
        self.sent: list[bytes] = []

    # -- what the client sees
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._end()

    def abort(self) -> None:
        self._end()

    def write(self, data: bytes) -> None:  # type: ignore[override]
        if self._closing:
            return
        self.sent.append(bytes(data))
        self._pending += CONTROL_TOKEN.sub(FIXED_TOKEN, bytes(data))
        while self._events and self._events[0][0] == "c" and self._pending:
            want = self._events[0][1]
            if self._pending.startswith(want):
                self._pending = self._pending[len(want) :]
                self._events.pop(0)
            elif want.startswith(self._pending):
                self._events[0] = ("c", want[len(self._pending) :])
                self._pending = b""
            else:
                raise Mismatch(f"client sent {self._pending!r}, the recording has {want!r}")
        if self._pending and not (self._events and self._events[0][0] == "c"):
            raise Mismatch(f"client sent {self._pending!r} after the recording's end")
        self.serve()

    # -- the recorded server
    def serve(self) -> None:
        """Deliver the server's next recorded bytes, one loop turn later, as a socket would."""
        loop = asyncio.get_running_loop()
        while self._events and self._events[0][0] == "s":
            chunk = self._events.pop(0)[1]
            loop.call_soon(self._deliver, chunk)
        if not self._events:
            loop.call_soon(self._eof)

    def _deliver(self, chunk: bytes) -> None:
        if not self._closing and isinstance(self._protocol, asyncio.Protocol):
            self._protocol.data_received(chunk)

    def _eof(self) -> None:
        # the recording ends where the server closed or the client hung up: only the former
        # matters to the client, and it reads it as the server closing
        protocol = self._protocol
        if (
            not self._closing
            and isinstance(protocol, asyncio.Protocol)
            and not protocol.eof_received()
        ):
            self._end()

    def _end(self) -> None:
        if self._closing:
            return
        self._closing = True
        protocol = self._protocol
        if protocol is not None:
            asyncio.get_running_loop().call_soon(protocol.connection_lost, None)


@dataclass
class ReplayConnection:
    """One recorded connection, as relayaudit.wire.Connection."""

    events: list[Event]
    peer: tuple[str, int]
    transport: ReplayTransport | None = None

    def local_address(self) -> str | None:
        return "127.0.0.1"

    async def wire(self, *, tls: bool, server_hostname: str, timeout: float) -> Wire:
        assert not tls, "TLS sessions cannot be replayed"
        self.transport = ReplayTransport(self.events, local="127.0.0.1", peer=self.peer)
        wire = Wire.over(self.transport)
        self.transport.serve()  # the greeting
        return wire

    def close(self) -> None:
        pass


class ReplayDial:
    """The probe's `dial`: each call opens the next recorded connection."""

    def __init__(self, connections: list[list[Event]], peer: tuple[str, int]) -> None:
        self._connections = list(connections)
        self._peer = peer
        self.opened: list[ReplayConnection] = []

    async def __call__(self) -> ReplayConnection:
        if not self._connections:  # the recorded server accepts no more connections
            raise NoSession(ProbeStatus.CLOSED, "connection refused", PortState.CLOSED)
        conn = ReplayConnection(self._connections.pop(0), self._peer)
        self.opened.append(conn)
        return conn

    @property
    def unused(self) -> int:
        return len(self._connections)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((TRANSCRIPTS / f"{name}.json").read_text(encoding="utf-8"))
    data["connections"] = [
        [(side, decode(text)) for side, text in conn] for conn in data["connections"]
    ]
    return data


def recordings() -> list[str]:
    return sorted(p.stem for p in TRANSCRIPTS.glob("*.json"))
