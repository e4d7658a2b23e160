"""The Dialer: refused sockets reused for the next address, every other outcome exactly as the kernel said."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import pytest

from relayaudit.connect import Dialer, InProgress, NoSession, finish_connect, open_socket
from relayaudit.evidence import ProbeStatus

LISTENING = {3, 4, 9, 17}  # last octets of 127.0.0.x that listen; 1..24 are dialled


@pytest.fixture
def listeners() -> Iterator[tuple[int, list[socket.socket]]]:
    """Listening sockets on 127.0.0.{LISTENING}, all on one port that nothing else uses."""
    socks: list[socket.socket] = []
    try:
        first = socket.socket()
        socks.append(first)
        first.bind((f"127.0.0.{min(LISTENING)}", 0))
        port = first.getsockname()[1]
        for octet in sorted(LISTENING - {min(LISTENING)}):
            s = socket.socket()
            socks.append(s)
            s.bind((f"127.0.0.{octet}", port))
        for s in socks:
            s.listen(64)
            s.setblocking(False)
        yield port, socks
    finally:
        for s in socks:
            s.close()


def _accepted(socks: list[socket.socket]) -> list[tuple[str, int]]:
    """The peers of every connection the listeners accepted (closing them)."""
    peers = []
    for s in socks:
        while True:
            try:
                conn, peer = s.accept()
            except BlockingIOError:
                break
            peers.append(peer)
            conn.close()
    return peers


@pytest.mark.parametrize("source", [None, "127.0.0.1"])
def test_refused_sockets_are_reused_and_every_outcome_stays_right(
    listeners: tuple[int, list[socket.socket]], source: str | None
) -> None:
    port, socks = listeners
    dialer = Dialer(source=source)
    connected: dict[int, socket.socket] = {}
    try:
        for round_ in range(3):  # rounds: a socket refused many times still connects right
            for octet in range(1, 25):
                outcome = dialer.connect_now(f"127.0.0.{octet}", port)
                if octet in LISTENING:
                    assert isinstance(outcome, socket.socket), (round_, octet, outcome)
                    assert outcome.getpeername() == (f"127.0.0.{octet}", port)
                    if source:
                        assert outcome.getsockname()[0] == source
                    connected.setdefault(octet, outcome)
                    if connected[octet] is not outcome:
                        outcome.close()
                else:
                    assert isinstance(outcome, NoSession), (round_, octet, outcome)
                    assert outcome.status is ProbeStatus.CLOSED
        # every handed-over socket really reached its listener, with distinct source ports
        peers = _accepted(socks)
        assert len(peers) == 3 * len(LISTENING)
        assert len({p for p in peers}) == len(peers)
        # one socket per connection handed over, plus the one refused sockets kept using:
        # without reuse this would be 72 (one per dial)
        assert dialer.opened == 3 * len(LISTENING) + 1
    finally:
        dialer.close()
        for s in connected.values():
            s.close()


def test_a_closed_dialer_opens_fresh_sockets(listeners: tuple[int, list[socket.socket]]) -> None:
    port, _ = listeners
    dialer = Dialer(source=None)
    assert isinstance(dialer.connect_now("127.0.0.2", port), NoSession)
    dialer.close()
    assert isinstance(dialer.connect_now("127.0.0.2", port), NoSession)
    dialer.close()
    assert dialer.opened == 2


async def test_a_handshake_in_flight_is_handed_over_and_times_out_as_filtered() -> None:
    # a listener that never accepts, with its backlog full, drops new SYNs on Linux: the
    # connect stays in flight (what a firewall's DROP looks like), so the Dialer must hand
    # the socket over as InProgress rather than keep or close it
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    dialer = Dialer(source=None)
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        await asyncio.sleep(0.2)
        outcome = dialer.connect_now("127.0.0.1", port)
        if not isinstance(outcome, InProgress):
            if isinstance(outcome, socket.socket):
                outcome.close()
            pytest.skip(f"this kernel did not drop the SYN (got {outcome!r})")
        result = await finish_connect(outcome, "127.0.0.1", port, timeout=0.3)
        assert isinstance(result, NoSession)
        assert result.status is ProbeStatus.FILTERED
        assert outcome.sock.fileno() == -1  # closed, not kept as a spare
    finally:
        dialer.close()
        for s in fillers:
            s.close()
        listener.close()


async def test_open_socket_keeps_nothing_and_raises_nothing_for_refusals(
    listeners: tuple[int, list[socket.socket]],
) -> None:
    port, socks = listeners
    refused = await open_socket("127.0.0.2", port, source=None, timeout=1.0)
    assert isinstance(refused, NoSession) and refused.status is ProbeStatus.CLOSED
    sock = await open_socket("127.0.0.3", port, source=None, timeout=1.0)
    assert isinstance(sock, socket.socket)
    sock.close()
    assert len(_accepted(socks)) == 1
