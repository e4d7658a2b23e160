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


# 127.0.0.200 is not what the kernel would pick for 127.0.0.x by itself: a lost bind shows
@pytest.mark.parametrize("source", [None, "127.0.0.200"])
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


def _syn_dropping_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener that never accepts, its backlog full: Linux then drops new SYNs silently
    (what a firewall's DROP looks like), so a connect to it stays in flight."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(listener.getsockname())
        fillers.append(s)
    return listener, fillers


def _still_in_flight(address: tuple[str, int]) -> bool:
    """Whether a plain non-blocking connect to `address` is still unanswered a moment later."""
    with socket.socket() as probe_sock:
        probe_sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            probe_sock.connect(address)
        try:
            probe_sock.getpeername()
        except OSError:
            return probe_sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        return False


async def test_a_handshake_in_flight_is_handed_over_and_times_out_as_filtered() -> None:
    # the Dialer must hand such a socket over as InProgress, neither keep it nor close it
    listener, fillers = _syn_dropping_listener()
    port = listener.getsockname()[1]
    dialer = Dialer(source=None)
    try:
        await asyncio.sleep(0.2)
        if not _still_in_flight(("127.0.0.1", port)):
            pytest.skip("this kernel answers a full backlog instead of dropping the SYN")
        outcome = dialer.connect_now("127.0.0.1", port)
        assert isinstance(outcome, InProgress), outcome
        result = await finish_connect(outcome, "127.0.0.1", port, timeout=0.3)
        assert isinstance(result, NoSession)
        assert result.status is ProbeStatus.FILTERED
        assert outcome.sock.fileno() == -1  # closed, not kept as a spare
        assert dialer.opened == 1
    finally:
        dialer.close()
        for s in fillers:
            s.close()
        listener.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_socket_refused_for_a_v4_mapped_address_is_not_reused_for_native_ipv6() -> None:
    # after a mapped connect the socket stays on the IPv4 path: reusing it for ::1 would leave
    # the connect hanging, an open port reported filtered
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        with socket.socket() as free:  # a v4 port nobody listens on, for the refusal
            free.bind(("127.0.0.1", 0))
            refused_port = free.getsockname()[1]
        dialer = Dialer(source=None)
        try:
            refused = dialer.connect_now("::ffff:7f00:1", refused_port)
            assert isinstance(refused, NoSession) and refused.status is ProbeStatus.CLOSED
            native_refused = dialer.connect_now("::1", refused_port)
            assert isinstance(native_refused, NoSession)
            outcome = dialer.connect_now("::1", port)
            assert isinstance(outcome, socket.socket), outcome
            assert outcome.getpeername()[:2] == ("::1", port)
            outcome.close()
            # the native refusal's socket was kept and reused for ::1; the mapped one was not
            assert dialer.opened == 2
        finally:
            dialer.close()


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
