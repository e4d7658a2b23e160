"""The target space: which addresses a sweep covers, in what pseudo-random order, per shard."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from relayaudit.addresses import AddressSet
from relayaudit.errors import ConfigError

T = TypeVar("T")

__all__ = ["MAX_ADDRESSES", "Address", "Network", "Shard", "TargetSpace", "address_count"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: A sweep beyond this is not a sweep but a mistake (an IPv6 /64 alone is 2**64 addresses).
MAX_ADDRESSES = 2**32

_SHARD_RE = re.compile(r"([0-9]+)/([0-9]+)")
_MASK32 = 0xFFFFFFFF

# Half-open integer intervals [lo, hi) of one address family, sorted and disjoint.
_Intervals = list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count``: the permutation positions p with p % count == index."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"shard: count {self.count} must be at least 1")
        if not 0 <= self.index < self.count:
            raise ConfigError(
                f"shard: index {self.index} must be between 0 and {self.count - 1} inclusive"
            )

    @classmethod
    def parse(cls, text: str, *, source: str = "--shard") -> Shard:
        """Parse ``"i/n"`` (0-based index i of n shards); errors name ``source`` and the value."""
        match = _SHARD_RE.fullmatch(text.strip())
        if match is None:
            raise ConfigError(f"{source}: {text!r} is not of the form i/n")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1:
            raise ConfigError(f"{source}: {text!r} shard count must be at least 1")
        if index >= count:
            raise ConfigError(f"{source}: {text!r} index must be below the shard count {count}")
        return cls(index, count)

    def split(self, parts: int) -> tuple[Shard, ...]:
        """`parts` shards of ``count * parts`` whose positions are exactly this shard's.

        Sub-shard p is ``(index + p * count) / (count * parts)``: a position q with
        ``q % (count * parts) == index + p * count`` has ``q % count == index``, and every
        position of this shard has one such p. (``(index * parts + p)`` would not: its
        positions have ``q % count == (index * parts + p) % count``, another shard's.)
        """
        if parts < 1:
            raise ConfigError(f"shard {self}: cannot split into {parts} parts")
        return tuple(Shard(self.index + p * self.count, self.count * parts) for p in range(parts))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _merge(intervals: _Intervals) -> _Intervals:
    merged: _Intervals = []
    for lo, hi in sorted(intervals):
        # Adjacent intervals merge too, so that lookups bisect over as few intervals as possible.
        if merged and lo <= merged[-1][1]:
            if hi > merged[-1][1]:
                merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


def _subtract(keep: _Intervals, remove: _Intervals) -> _Intervals:
    """``keep`` minus ``remove``; both sorted and disjoint."""
    result: _Intervals = []
    j = 0
    for lo, hi in keep:
        cur = lo
        while j < len(remove) and remove[j][1] <= cur:
            j += 1
        k = j
        while k < len(remove) and remove[k][0] < hi:
            rlo, rhi = remove[k]
            if rlo > cur:
                result.append((cur, rlo))
            cur = max(cur, rhi)
            if cur >= hi:
                break
            k += 1
        if cur < hi:
            result.append((cur, hi))
    return result


def _interval(net: Network) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address) + 1


def _by_family(nets: Sequence[Network]) -> dict[int, _Intervals]:
    families: dict[int, _Intervals] = {4: [], 6: []}
    for net in nets:
        families[net.version].append(_interval(net))
    return {version: _merge(ivs) for version, ivs in families.items()}


def address_count(networks: Sequence[Network], exclude: Sequence[Network] = ()) -> dict[int, int]:
    """Addresses per family (4, 6) in `networks` and in no `exclude`, overlaps counted once."""
    wanted, unwanted = _by_family(networks), _by_family(exclude)
    return {
        version: sum(hi - lo for lo, hi in _subtract(wanted[version], unwanted[version]))
        for version in (4, 6)
    }


_TABLE_BITS = 14


def _round(value: int, key: int) -> int:
    """The Feistel round function (what _Feistel._computed inlines)."""
    h = ((value ^ key) * 0x7FEB352D) & _MASK32
    h ^= h >> 15
    h = (h * 0x846CA68B) & _MASK32
    return h ^ (h >> 16)


class _Feistel:
    """A keyed bijection on [0, n): a 4-round Feistel over 2**bits >= n, cycle-walked below n.

    When bits is odd the halves differ by one bit and alternate roles each round (as in NIST
    FF1), which keeps the domain below 2n; a balanced network would need 4**k and up to four
    times as many cycle-walking passes.
    """

    __slots__ = ("_hi_mask", "_keys", "_lo_bits", "_lo_mask", "_n", "_tables")

    def __init__(self, n: int, seed: int) -> None:
        self._n = n
        bits = max(2, (n - 1).bit_length())
        hi_bits = bits // 2
        self._lo_bits = bits - hi_bits
        self._hi_mask = (1 << hi_bits) - 1
        self._lo_mask = (1 << self._lo_bits) - 1
        # Hashing the seed once here (not per call) accepts any int seed, negative or huge,
        # and gives unrelated round keys even for neighbouring seeds.
        digest = hashlib.blake2b(repr(seed).encode(), digest_size=16).digest()
        self._keys = tuple(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))
        # Each round's function depends on one half alone, so for halves of up to 14 bits (any
        # space up to 2**28 addresses, a /4) it is four lookup tables of at most 16384 entries,
        # built once: the same bijection at a third of the cost per address.
        self._tables: tuple[list[int], list[int], list[int], list[int]] | None = None
        if self._lo_bits <= _TABLE_BITS:
            k0, k1, k2, k3 = self._keys
            lo_side = range(1 << self._lo_bits)  # rounds 1 and 3 read the low half
            hi_side = range(1 << hi_bits)  # rounds 2 and 4 the high half
            self._tables = (
                [_round(v, k0) & self._hi_mask for v in lo_side],
                [_round(v, k1) & self._lo_mask for v in hi_side],
                [_round(v, k2) & self._hi_mask for v in lo_side],
                [_round(v, k3) & self._lo_mask for v in hi_side],
            )

    def __call__(self, x: int) -> int:
        return self.apply(x)

    @property
    def apply(self) -> Callable[[int], int]:
        """The permutation as one function (the walk calls it per address: no dispatch)."""
        return self._by_table if self._tables is not None else self._computed

    def _by_table(self, x: int) -> int:
        n = self._n
        lo_bits = self._lo_bits
        lo_mask = self._lo_mask
        assert self._tables is not None
        t0, t1, t2, t3 = self._tables
        while True:
            a = x >> lo_bits
            b = x & lo_mask
            a ^= t0[b]
            b ^= t1[a]
            a ^= t2[b]
            b ^= t3[a]
            x = (a << lo_bits) | b
            if x < n:
                return x

    def _computed(self, x: int) -> int:
        n = self._n
        lo_bits = self._lo_bits
        hi_mask = self._hi_mask
        lo_mask = self._lo_mask
        k0, k1, k2, k3 = self._keys
        # The four rounds are unrolled and the round function inlined, because this runs once
        # per scanned address and a function or hashlib call per round would dominate the cost.
        # The round function is lowbias32 (C. Wellons) minus its first xor-shift, which is a
        # no-op on a half of at most 16 bits beyond what xoring the 32-bit key already does.
        while True:
            a = x >> lo_bits
            b = x & lo_mask
            h = ((b ^ k0) * 0x7FEB352D) & _MASK32
            h ^= h >> 15
            h = (h * 0x846CA68B) & _MASK32
            a ^= (h ^ (h >> 16)) & hi_mask
            h = ((a ^ k1) * 0x7FEB352D) & _MASK32
            h ^= h >> 15
            h = (h * 0x846CA68B) & _MASK32
            b ^= (h ^ (h >> 16)) & lo_mask
            h = ((b ^ k2) * 0x7FEB352D) & _MASK32
            h ^= h >> 15
            h = (h * 0x846CA68B) & _MASK32
            a ^= (h ^ (h >> 16)) & hi_mask
            h = ((a ^ k3) * 0x7FEB352D) & _MASK32
            h ^= h >> 15
            h = (h * 0x846CA68B) & _MASK32
            b ^= (h ^ (h >> 16)) & lo_mask
            x = (a << lo_bits) | b
            # Cycle-walking: 2**bits < 2n, so on average fewer than two passes.
            if x < n:
                return x


class TargetSpace:
    """The addresses in some target network or list and in no exclusion, indexable in [0, size).

    Ranges are not materialised: they become merged integer intervals per family, so memory is
    O(number of ranges) however many addresses they hold. A target list (`listed`, from
    targets_from) is a compact sorted array (addresses.AddressSet): its addresses that no range
    holds and no exclusion removes follow the ranges in the index space, and the same
    permutation walks them all.
    """

    __slots__ = (
        "_bases",
        "_exclude",
        "_family_his",
        "_family_los",
        "_kinds",
        "_listed",
        "_permute",
        "_size",
        "_starts",
        "_targets",
    )

    def __init__(
        self,
        targets: Sequence[Network],
        exclude: Sequence[Network] = (),
        *,
        seed: int = 0,
        listed: AddressSet | None = None,
    ) -> None:
        self._targets = tuple(targets)
        self._exclude = tuple(exclude)
        wanted = _by_family(self._targets)
        unwanted = _by_family(self._exclude)

        self._family_los: dict[int, list[int]] = {}
        self._family_his: dict[int, list[int]] = {}
        # Index space: IPv4 intervals first, then IPv6, each interval a contiguous block.
        self._starts: list[int] = []
        self._bases: list[int] = []
        # per block: offset -> address (an address class over a range, a _ListBlock over a list)
        self._kinds: list[Callable[[int], Address]] = []
        total = 0
        for version, kind in ((4, ipaddress.IPv4Address), (6, ipaddress.IPv6Address)):
            intervals = _subtract(wanted[version], unwanted[version])
            self._family_los[version] = [lo for lo, _ in intervals]
            self._family_his[version] = [hi for _, hi in intervals]
            for lo, hi in intervals:
                self._starts.append(total)
                self._bases.append(lo)
                self._kinds.append(kind)
                total += hi - lo
        # a listed address that a range holds is walked once, as part of the range
        self._listed = (
            listed.without(
                _merge(wanted[4] + unwanted[4]), _merge(wanted[6] + unwanted[6])
            )
            if listed is not None
            else AddressSet()
        )
        for version in (4, 6):
            n = self._listed.count(version)
            if n:
                self._starts.append(total)
                self._bases.append(0)  # an index into the list, not an address
                self._kinds.append(_ListBlock(self._listed, version))
                total += n
        if total > MAX_ADDRESSES:
            raise ConfigError(
                f"targets: {total} addresses is more than relayaudit sweeps (2**32 at most); "
                "narrow the IPv6 ranges"
            )
        self._size = total
        self._permute = _Feistel(total, seed)

    def __repr__(self) -> str:
        return (
            f"TargetSpace({len(self._targets)} targets, {len(self._exclude)} exclusions, "
            f"{self._size} addresses)"
        )

    def __len__(self) -> int:
        return self._size

    @property
    def size(self) -> int:
        """Number of addresses after exclusions, overlapping targets counted once."""
        return self._size

    def __contains__(self, addr: object) -> bool:
        if not isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        value = int(addr)
        los = self._family_los[addr.version]
        i = bisect_right(los, value) - 1
        if i >= 0 and value < self._family_his[addr.version][i]:
            return True
        return (addr.version, value) in self._listed

    @property
    def listed_count(self) -> int:
        """Addresses the target lists add beyond the ranges (after exclusions)."""
        return len(self._listed)

    def count_per_range(self) -> list[tuple[Network, int]]:
        """Addresses each configured target contributes after exclusions, in config order.

        An address listed by several targets is attributed to the first of them, so the counts
        sum to ``len(self)``.
        """
        unwanted = _by_family(self._exclude)
        seen: dict[int, _Intervals] = {4: [], 6: []}
        result: list[tuple[Network, int]] = []
        for net in self._targets:
            own = [_interval(net)]
            fresh = _subtract(_subtract(own, seen[net.version]), unwanted[net.version])
            result.append((net, sum(hi - lo for lo, hi in fresh)))
            seen[net.version] = _merge(seen[net.version] + own)
        return result

    def address_at(self, index: int) -> Address:
        """The address at ``index`` of the sorted (v4 then v6) target space."""
        if not 0 <= index < self._size:
            raise IndexError(f"index {index} outside target space of {self._size} addresses")
        i = bisect_right(self._starts, index) - 1
        return self._kinds[i](self._bases[i] + index - self._starts[i])

    def shard_size(self, shard: Shard | None) -> int:
        """How many addresses ``shard`` yields (all of them for ``None``)."""
        if shard is None:
            return self._size
        if shard.index >= self._size:
            return 0
        return (self._size - shard.index + shard.count - 1) // shard.count

    def iter_shard(
        self, shard: Shard | None = None, *, start: int = 0
    ) -> Iterator[tuple[int, Address]]:
        """Yield ``(position, address)`` of ``shard`` in seeded pseudo-random order.

        ``position`` counts 0, 1, 2, ... within the shard; ``start=W`` resumes at position W in
        O(1), because each address is computed from its position alone.
        """
        return self._walk(shard, start, self._kinds)

    def iter_shard_text(
        self, shard: Shard | None = None, *, start: int = 0
    ) -> Iterator[tuple[int, str]]:
        """iter_shard, with each address as text: the sweep's hot path, without address objects."""
        texts: list[Callable[[int], str]] = [
            kind.text
            if isinstance(kind, _ListBlock)
            else _v4_text
            if kind is ipaddress.IPv4Address
            else _v6_text
            for kind in self._kinds
        ]
        return self._walk(shard, start, texts)

    def _walk(
        self, shard: Shard | None, start: int, convert: Sequence[Callable[[int], T]]
    ) -> Iterator[tuple[int, T]]:
        if start < 0:
            raise ValueError(f"start must not be negative, got {start}")
        index, count = (0, 1) if shard is None else (shard.index, shard.count)
        size = self._size
        permute = self._permute.apply
        starts = self._starts
        bases = self._bases
        position = start
        p = start * count + index
        if len(starts) == 1:  # one interval (one range, no exclusions): no search per address
            one, base = convert[0], bases[0] - starts[0]
            while p < size:
                yield position, one(base + permute(p))
                position += 1
                p += count
            return
        while p < size:
            flat = permute(p)
            i = bisect_right(starts, flat) - 1
            yield position, convert[i](bases[i] + flat - starts[i])
            position += 1
            p += count


class _ListBlock:
    """One family of a target list as a block of the index space: offset -> address."""

    __slots__ = ("_values", "_version")

    def __init__(self, listed: AddressSet, version: int) -> None:
        self._values = listed.v4 if version == 4 else listed.v6
        self._version = version

    def __call__(self, offset: int) -> Address:
        value = self._values[offset]
        if self._version == 4:
            return ipaddress.IPv4Address(value)
        return ipaddress.IPv6Address(value)

    def text(self, offset: int) -> str:
        value = self._values[offset]
        return _v4_text(value) if self._version == 4 else _v6_text(value)


def _v4_text(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "big"))  # what str(IPv4Address) gives, 4x faster


def _v6_text(value: int) -> str:
    return str(ipaddress.IPv6Address(value))
