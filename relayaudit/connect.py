"""Opens TCP connections for discovery and probes: settled at once when it can be, awaited when not."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import sys

from relayaudit.evidence import PortState, ProbeStatus
from relayaudit.failures import NoSession

__all__ = [
    "Dialer",
    "InProgress",
    "NoSession",
    "connect_socket",
    "finish_connect",
    "open_socket",
]


class InProgress:
    """A connect the kernel has not answered yet (a handshake in flight): finish_connect waits."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES}
_REFUSED = NoSession(ProbeStatus.CLOSED, "connection refused", PortState.CLOSED)


def _connect_failure(err: int) -> NoSession:
    if err == errno.ECONNREFUSED:
        return _REFUSED  # the sweep's commonest outcome: one shared, never-raised instance
    text = os.strerror(err)
    if err in _UNREACHABLE:
        return NoSession(ProbeStatus.FILTERED, f"unreachable: {text}", PortState.FILTERED)
    return NoSession(ProbeStatus.ERROR, f"connect failed: {text}", PortState.ERROR)


# Linux creates the socket non-blocking in the same call (one syscall instead of three)
_STREAM_NONBLOCK_FLAG = getattr(socket, "SOCK_NONBLOCK", 0)
_STREAM_NONBLOCK = socket.SOCK_STREAM | _STREAM_NONBLOCK_FLAG
# A second connect() on a socket reports how the first ended; these mean "not yet" / "done".
_PENDING = {errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK}
_CONNECTED = {0, errno.EISCONN}
# Linux resets a refused socket for another connect(); BSDs and macOS answer EINVAL instead
_REUSE_REFUSED = sys.platform.startswith("linux")


def _v4_mapped(family: int, address: str) -> bool:
    """An IPv4-mapped IPv6 address: its socket stays on the IPv4 path, unfit for a native one."""
    return family == socket.AF_INET6 and ipaddress.IPv6Address(address).ipv4_mapped is not None


class Dialer:
    """Non-blocking connects that settle at once when the kernel already has the answer.

    The hot path of discovery, so outcomes are returned, not raised, and nothing touches the
    event loop: on near hosts (a RST, or a handshake done within the call, as on loopback and
    fast LANs) the result is final here; otherwise an InProgress for finish_connect.

    A socket whose connect was refused is kept for the next address. Linux returns a TCP
    socket to the unconnected state when connect() reports the failure (and frees its
    ephemeral port), so the next connect needs neither socket() nor close(): a refused
    address costs two system calls instead of four. Any other outcome hands the socket over
    (connected, in flight) or closes it. One Dialer may serve many tasks: connect_now never
    awaits, so no two callers ever hold the spare socket at once.
    """

    __slots__ = ("_source", "_spare", "opened")

    def __init__(self, *, source: str | None) -> None:
        self._source = source
        self._spare: dict[int, socket.socket] = {}
        self.opened = 0  # sockets created (a figure for tests and benchmarks)

    def connect_now(self, address: str, port: int) -> socket.socket | NoSession | InProgress:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = self._spare.pop(family, None)
        if sock is None:
            try:
                sock = self._new_socket(family)
            except OSError as exc:  # out of file descriptors, say: this address gets an error
                return _connect_failure(exc.errno or errno.EIO)
        try:
            err = sock.connect_ex((address, port))
            if err == errno.EINPROGRESS:
                # asks again: the answer if the kernel already has it (a RST on loopback
                # arrives within the first call), and a refused socket is reset for reuse
                err = sock.connect_ex((address, port))
        except OSError as exc:
            sock.close()
            return _connect_failure(exc.errno or errno.EIO)
        except BaseException:
            sock.close()
            raise
        if err in _CONNECTED:
            return sock
        if err in _PENDING:
            return InProgress(sock)
        if err == errno.ECONNREFUSED and _REUSE_REFUSED and not _v4_mapped(family, address):
            self._spare[family] = sock
        else:
            sock.close()
        return _connect_failure(err)

    def _new_socket(self, family: int) -> socket.socket:
        sock = socket.socket(family, _STREAM_NONBLOCK)
        self.opened += 1
        try:
            if not _STREAM_NONBLOCK_FLAG:
                sock.setblocking(False)
            if self._source:
                sock.bind((self._source, 0))
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        """Close the kept sockets (the Dialer can still be used; it opens new ones)."""
        for sock in self._spare.values():
            sock.close()
        self._spare.clear()


async def finish_connect(
    pending: InProgress, address: str, port: int, *, timeout: float
) -> socket.socket | NoSession:
    """Wait, under the connect deadline, for a handshake connect_now left in flight."""
    sock = pending.sock
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except TimeoutError:
        sock.close()
        return NoSession(ProbeStatus.FILTERED, "connect timed out", PortState.FILTERED)
    except OSError as exc:
        sock.close()
        return _connect_failure(exc.errno or errno.EIO)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_socket(
    address: str, port: int, *, source: str | None, timeout: float
) -> socket.socket | NoSession:
    """A connected non-blocking TCP socket, or the NoSession saying closed / filtered / error."""
    dialer = Dialer(source=source)
    try:
        outcome = dialer.connect_now(address, port)
    finally:
        dialer.close()  # a one-off connect keeps no spare socket
    if isinstance(outcome, InProgress):
        return await finish_connect(outcome, address, port, timeout=timeout)
    return outcome


async def connect_socket(
    address: str, port: int, *, source: str | None, timeout: float
) -> socket.socket:
    """Like open_socket, but a failure is raised as NoSession."""
    outcome = await open_socket(address, port, source=source, timeout=timeout)
    if isinstance(outcome, NoSession):
        # a fresh exception to raise: the refused outcome is one shared instance
        raise NoSession(outcome.status, outcome.reason, outcome.port_state)
    return outcome
