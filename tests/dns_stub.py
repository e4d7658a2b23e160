"""A loopback DNS server for tests: answers UDP queries from a fixed zone (dnspython's wire format)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["DnsStub"]

Zone = Mapping[tuple[str, str], Sequence[str]]
"""(name, type) -> the records' data as zone-file text, e.g. ("canary.test", "MX"): ["10 mx"]."""


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone) -> None:
        self.zone = {
            (name.lower().rstrip("."), rtype.upper()): v for (name, rtype), v in zone.items()
        }
        self.names = {name for name, _ in self.zone}
        self.transport: asyncio.DatagramTransport | None = None
        self.queries: list[tuple[str, str]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return  # not a DNS message: no answer, as a real server would
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            name = question.name.to_text(omit_final_dot=True).lower()
            rtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rtype))
            records = self.zone.get((name, rtype))
            if records:
                response.answer.append(
                    dns.rrset.from_text_list(question.name, 300, dns.rdataclass.IN, rtype, records)
                )
            elif name not in self.names:
                response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


class DnsStub:
    """`async with DnsStub(zone) as dns:` serves `zone` on 127.0.0.1:`dns.port` (UDP)."""

    def __init__(self, zone: Zone) -> None:
        self._protocol = _Protocol(zone)
        self._transport: asyncio.DatagramTransport | None = None
        self.port = 0

    @property
    def queries(self) -> list[tuple[str, str]]:
        return self._protocol.queries

    async def __aenter__(self) -> DnsStub:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self._protocol, local_addr=("127.0.0.1", 0)
        )
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._transport is not None:
            self._transport.close()
