"""Whether mail for the canary domain reaches canary.listen: its MX, their addresses, this host, port 25."""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

import dns.exception
import dns.rdatatype
import dns.resolver

from relayaudit.evidence import endpoint

__all__ = ["RouteCheck", "check_route", "is_wildcard", "parse_nameserver"]

SMTP_PORT = 25
_LIFETIME = 5.0  # seconds for one name's whole lookup (every server, every retry)


@dataclass(frozen=True, slots=True)
class RouteCheck:
    """One finding of `canary check`: whether it holds, and one line that says what was seen."""

    ok: bool
    text: str


def is_wildcard(host: str) -> bool:
    """0.0.0.0 or ::, every address of this host."""
    return ipaddress.ip_address(host).is_unspecified


def parse_nameserver(value: str) -> tuple[str, int]:
    """`192.0.2.53`, `192.0.2.53:5300`, `2001:db8::53` or `[2001:db8::53]:5300`."""
    host, port = value, 53
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else -1
    elif value.count(":") == 1:
        host, _, tail = value.partition(":")
        port = int(tail) if tail.isdigit() else -1
    ipaddress.ip_address(host)  # ValueError: not an address
    if not 0 < port < 65536:
        raise ValueError(f"{value!r}: the port is not 1-65535")
    return host, port


def _resolver(nameserver: tuple[str, int] | None) -> dns.resolver.Resolver:
    if nameserver is None:
        resolver = dns.resolver.Resolver()  # the system's (/etc/resolv.conf)
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [nameserver[0]]
        resolver.port = nameserver[1]
    resolver.lifetime = _LIFETIME
    return resolver


def _addresses(resolver: dns.resolver.Resolver, host: str) -> list[str]:
    """The A and AAAA addresses of `host`; raises dns.resolver.NXDOMAIN when it does not exist."""
    found: list[str] = []
    for rtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            answer = resolver.resolve(host, rtype, raise_on_no_answer=False)
        except dns.resolver.NoAnswer:
            continue
        found += [str(ipaddress.ip_address(r.address)) for r in answer]
    return found


def _on_this_host(address: str) -> bool | None:
    """Whether `address` is one of this host's (it can be bound); None when that cannot be told."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError as exc:
            return False if exc.errno == errno.EADDRNOTAVAIL else None
    return True


def check_route(
    domain: str,
    listen: tuple[str, int],
    *,
    nameserver: tuple[str, int] | None = None,
    redirected: bool = False,
) -> list[RouteCheck]:
    """Whether a relay that delivers a canary to `domain` reaches the receiver on `listen`."""
    host, port = listen
    wildcard = is_wildcard(host)
    checks: list[RouteCheck] = []
    if port == SMTP_PORT:
        checks.append(RouteCheck(True, f"canary.listen {endpoint(host, port)} is on port 25"))
    elif redirected:
        checks.append(
            RouteCheck(
                True,
                f"canary.listen is on port {port}: relays deliver to port 25, which you say a "
                f"port redirect on this host sends to {port} (not checked)",
            )
        )
    else:
        checks.append(
            RouteCheck(
                False,
                f"canary.listen is on port {port}, but an MX cannot name a port: relays deliver "
                "to port 25. Listen on 25 without root (README: CAP_NET_BIND_SERVICE), or "
                "redirect 25 to this port and run canary check --redirected",
            )
        )

    local = "every address of this host" if wildcard else None
    if not wildcard:
        here = _on_this_host(host)
        if here is True:
            checks.append(RouteCheck(True, f"{host} is an address of this host"))
        elif here is False:
            checks.append(
                RouteCheck(
                    False, f"{host} is not an address of this host: nothing can listen there"
                )
            )
        else:
            checks.append(RouteCheck(False, f"could not tell whether {host} is on this host"))

    resolver = _resolver(nameserver)
    try:
        answer = resolver.resolve(domain, dns.rdatatype.MX, raise_on_no_answer=False)
        exchanges = sorted(
            ((r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer),
            key=lambda mx: mx[0],
        )
        implicit = not exchanges
        if implicit:  # RFC 5321 5.1: no MX, the domain's own addresses are its mail host
            exchanges = [(0, domain)]
        if any(name in ("", ".") for _, name in exchanges):  # RFC 7505 null MX
            checks.append(RouteCheck(False, f"{domain} has a null MX: it accepts no mail at all"))
            return checks
        hosts = [(pref, name, _addresses(resolver, name)) for pref, name in exchanges]
    except dns.resolver.NXDOMAIN:
        checks.append(RouteCheck(False, f"canary.domain {domain} does not exist in DNS"))
        return checks
    except dns.exception.DNSException as exc:
        checks.append(RouteCheck(False, f"the DNS lookup of {domain} failed: {exc}"))
        return checks

    shown = "; ".join(
        f"{name} (preference {pref}): {', '.join(addrs) or 'no address'}"
        for pref, name, addrs in hosts
    )
    what = "no MX; its own address records" if implicit else "MX"
    checks.append(RouteCheck(bool(any(a for *_, a in hosts)), f"{domain} {what}: {shown}"))
    best = min(pref for pref, *_ in hosts)
    preferred = {a for pref, _, addrs in hosts if pref == best for a in addrs}
    anywhere = {a for *_, addrs in hosts for a in addrs}
    if wildcard:
        ours = sorted(a for a in preferred if _on_this_host(a))
        checks.append(
            RouteCheck(
                bool(ours),
                f"canary.listen is {local}; the preferred MX addresses on this host: "
                f"{', '.join(ours) or 'none'}",
            )
        )
    else:
        target = str(ipaddress.ip_address(host))
        if target in preferred:
            checks.append(RouteCheck(True, f"the preferred MX of {domain} is {target}"))
        elif target in anywhere:
            checks.append(
                RouteCheck(
                    False,
                    f"{target} is only a less preferred MX of {domain}: relays deliver to "
                    f"{', '.join(sorted(preferred))} first",
                )
            )
        else:
            checks.append(
                RouteCheck(False, f"no MX of {domain} points at canary.listen's {target}")
            )
    return checks
