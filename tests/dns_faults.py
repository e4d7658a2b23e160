"""A small loopback DNS server for what NSD will not do on demand: refused, truncated, silent.

NSD serves the real records in the tests (tests/nsd_lab.py); this server exists only for
failures a real server cannot be told to produce: REFUSED with the zone present, a transfer
whose connection closes before the closing SOA, and no answer at all (TCP and UDP), so the
timeouts are tested.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import dns.message
import dns.rcode
import dns.rrset

__all__ = ["Fault", "faulty_dns"]

Fault = Literal["refused", "truncated", "silent"]


def _read_query(conn: socket.socket) -> dns.message.Message | None:
    head = conn.recv(2)
    if len(head) < 2:
        return None
    (length,) = struct.unpack("!H", head)
    data = b""
    while len(data) < length:
        chunk = conn.recv(length - len(data))
        if not chunk:
            return None
        data += chunk
    return dns.message.from_wire(data)


def _send(conn: socket.socket, message: dns.message.Message) -> None:
    wire = message.to_wire()
    conn.sendall(struct.pack("!H", len(wire)) + wire)


def _serve(conn: socket.socket, fault: Fault, stop: threading.Event) -> None:
    with conn:
        conn.settimeout(5)
        try:
            query = _read_query(conn)
        except OSError:
            return
        if query is None:
            return
        if fault == "silent":
            stop.wait(30)  # hold the connection, answer nothing
            return
        response = dns.message.make_response(query)
        if fault == "refused":
            response.set_rcode(dns.rcode.REFUSED)
            _send(conn, response)
            return
        # truncated: the opening SOA and one record, then the connection closes
        zone = query.question[0].name.to_text()  # absolute: "campus.test."
        soa = f"ns1.{zone} hostmaster.{zone} 1 3600 600 86400 300"
        response.answer.append(dns.rrset.from_text(zone, 300, "IN", "SOA", soa))
        response.answer.append(dns.rrset.from_text(f"www.{zone}", 300, "IN", "A", "127.0.0.9"))
        _send(conn, response)


@contextmanager
def faulty_dns(fault: Fault) -> Iterator[int]:
    """A server on 127.0.0.1:PORT (TCP; UDP too, silent) that fails transfers as `fault` says."""
    stop = threading.Event()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", 0))
    port: int = tcp.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))  # queries arrive and are never answered
    tcp.listen(8)
    tcp.settimeout(0.1)
    threads: list[threading.Thread] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            worker = threading.Thread(target=_serve, args=(conn, fault, stop), daemon=True)
            worker.start()
            threads.append(worker)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield port
    finally:
        stop.set()
        acceptor.join(5)
        for worker in threads:
            worker.join(5)
        tcp.close()
        udp.close()
