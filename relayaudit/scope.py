"""The address rules of the scope guard: ranges no campus host can hold, IPv4 written in IPv6, zone ids."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Network, IPv6Network

from relayaudit.errors import ConfigError

__all__ = [
    "LARGE_SCOPE",
    "LARGE_V6_PREFIX",
    "UNUSABLE",
    "Address",
    "Network",
    "normal_address",
    "normal_network",
    "parse_address",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = IPv4Network | IPv6Network

#: Addresses of one family that a sweep may enumerate, and IPv4 addresses a scope may hold,
#: without `allow_large_scope` (a /8).
LARGE_SCOPE = 2**24
#: IPv6 scopes this long or longer (a campus's allocation) need no `allow_large_scope`.
LARGE_V6_PREFIX = 32

#: Space no campus host can hold: no scope, target, exclusion, approval or checked address may
#: overlap it. Loopback, private and documentation ranges stay allowed (the lab and the tests
#: live there).
UNUSABLE: tuple[tuple[Network, str], ...] = (
    (IPv4Network("0.0.0.0/8"), '"this network" (RFC 1122)'),
    (IPv4Network("224.0.0.0/4"), "IPv4 multicast (RFC 5771)"),
    (IPv4Network("240.0.0.0/4"), "reserved, with the broadcast address 255.255.255.255 (RFC 1112)"),
    (IPv4Network("169.254.0.0/16"), "IPv4 link-local (RFC 3927)"),
    (IPv6Network("::/128"), "the unspecified address (RFC 4291)"),
    (IPv6Network("ff00::/8"), "IPv6 multicast (RFC 4291)"),
    (IPv6Network("fe80::/10"), "IPv6 link-local (RFC 4291)"),
)

_MAPPED = IPv6Network("::ffff:0:0/96")  # ::ffff:a.b.c.d, IPv4-mapped
_COMPAT = IPv6Network("::/96")  # ::a.b.c.d, IPv4-compatible (deprecated, still routed by some)
_LOOPBACK_V6 = IPv6Network("::1/128")
_EVERY_V4 = IPv4Network("0.0.0.0/0")


def _embedded(net: IPv6Network) -> tuple[IPv4Network, IPv6Network] | None:
    """The IPv4 addresses `net` holds in IPv4-mapped or IPv4-compatible form, and that form."""
    for space in (_MAPPED, _COMPAT):
        if net.subnet_of(space):
            if net == _LOOPBACK_V6:  # ::1 is IPv6's loopback, not 0.0.0.1
                return None
            return IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96)), space
        if net.supernet_of(space):
            return _EVERY_V4, space
    return None


def _refuse_unusable(net: Network, written: str) -> None:
    for bad, rule in UNUSABLE:
        if net.version == bad.version and net.overlaps(bad):
            raise ConfigError(
                f"{written} overlaps {bad}, {rule}: no campus host can hold those addresses, "
                "so relayaudit never connects to them"
            )


def _normal(net: Network, label: str) -> Network:
    zone = net.network_address.scope_id if isinstance(net, IPv6Network) else None
    if zone is not None:
        raise ConfigError(
            f"{label} has a zone id (%{zone}): zone ids are refused, as a scope is the same on "
            "every interface"
        )
    _refuse_unusable(net, label)
    if isinstance(net, IPv4Network):
        return net
    embedded = _embedded(net)
    if embedded is None:
        return net
    v4, space = embedded
    if v4 == _EVERY_V4 and net.prefixlen < space.prefixlen:
        _refuse_unusable(v4, f"{label} holds {space}, all of IPv4 written in IPv6, and so")
    shown = v4 if v4.prefixlen < 32 else v4.network_address
    _refuse_unusable(v4, f"{label} (IPv4 {shown} written in IPv6)")
    return v4


def normal_network(net: Network) -> Network:
    """`net` as relayaudit connects to it: IPv4 written in IPv6 becomes IPv4.

    Refuses a zone id and any overlap with UNUSABLE, in the form written and as IPv4; the
    message names the range and the rule (ConfigError, without the key: the caller adds it).
    """
    return _normal(net, f"'{net}'")


def normal_address(address: Address) -> Address:
    """One address by the rules of normal_network: ::ffff:192.0.2.1 becomes 192.0.2.1."""
    # ip_network keeps the zone id of an address (fe80::1%eth0/128), so _normal sees it
    return _normal(ipaddress.ip_network(address), f"'{address}'").network_address


def parse_address(text: str) -> Address:
    """An address from text (any form Python reads), normalised; refusals as ConfigError."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ConfigError(f"{text!r} is not an IP address") from None
    return normal_address(address)
