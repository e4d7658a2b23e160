"""A compact sorted set of IP addresses (a target list), never a Python object per address.

IPv4 addresses are 32-bit integers in an array, IPv6 addresses 16 packed bytes each.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["AddressSet", "AddressSetBuilder"]

_V4_CODE = "I" if array("I").itemsize == 4 else "L"  # 4 bytes on every platform Python runs on

# Half-open integer intervals [lo, hi) of one family, sorted and disjoint (targets._Intervals).
_Intervals = Sequence[tuple[int, int]]


class _Packed128:
    """Sorted IPv6 addresses as one bytes object of 16-byte big-endian values, indexable as ints.

    Big-endian bytes of one width sort as their numbers do, so the sort and bisect work on bytes.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data) // 16

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < len(self.data) // 16:  # (a slice past the end would read as 0)
            raise IndexError(f"address index {index} out of range")
        start = index * 16
        return int.from_bytes(self.data[start : start + 16], "big")

    def __iter__(self) -> Iterator[int]:
        data = self.data
        return (int.from_bytes(data[i : i + 16], "big") for i in range(0, len(data), 16))


def _outside(values: Iterable[int], intervals: _Intervals) -> Iterable[int]:
    """The sorted `values` that lie in no interval (both sorted)."""
    if not intervals:
        yield from values
        return
    los = [lo for lo, _ in intervals]
    his = [hi for _, hi in intervals]
    for value in values:
        i = bisect_right(los, value) - 1
        if i < 0 or value >= his[i]:
            yield value


class AddressSet:
    """Unique addresses in ascending order per family; IPv4 first, as TargetSpace indexes them.

    A million IPv4 addresses take 4 MB, a million IPv6 addresses 16 MB (bench/list_memory.py).
    """

    __slots__ = ("_v4", "_v6")

    def __init__(self, v4: array[int] | None = None, v6: bytes = b"") -> None:
        self._v4 = v4 if v4 is not None else array(_V4_CODE)
        self._v6 = _Packed128(v6)

    @property
    def v4(self) -> Sequence[int]:
        """The IPv4 addresses as integers, ascending (an array: indexable, bisectable)."""
        return self._v4

    @property
    def v6(self) -> Sequence[int]:
        """The IPv6 addresses as integers, ascending."""
        return self._v6  # type: ignore[return-value]  # __len__ and __getitem__ of ints suffice

    def __len__(self) -> int:
        return len(self._v4) + len(self._v6)

    def count(self, version: int) -> int:
        return len(self._v4) if version == 4 else len(self._v6)

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        version, value = item
        values: Sequence[int] = self._v4 if version == 4 else self._v6  # type: ignore[assignment]
        i = bisect_right(values, value) - 1
        return i >= 0 and values[i] == value

    def digest(self) -> str:
        """sha256 of the set's contents (the same addresses give the same digest)."""
        h = hashlib.sha256()
        h.update(len(self._v4).to_bytes(8, "big"))
        h.update(_big_endian(self._v4))
        h.update(self._v6.data)
        return h.hexdigest()

    def without(self, v4: _Intervals, v6: _Intervals) -> AddressSet:
        """The addresses in none of the intervals (exclusions, or ranges that already hold them)."""
        if not v4 and not v6:
            return self
        kept4 = array(_V4_CODE, _outside(self._v4, v4))
        if v6:
            kept = _outside(iter(self._v6), v6)
            data = b"".join(value.to_bytes(16, "big") for value in kept)
        else:
            data = self._v6.data
        return AddressSet(kept4, data)

    @staticmethod
    def union(sets: Iterable[AddressSet]) -> AddressSet:
        builder = AddressSetBuilder()
        for one in sets:
            builder.add_v4_array(one._v4)
            builder.add_v6_bytes(one._v6.data)
        return builder.build()


def _big_endian(values: array[int]) -> bytes:
    """The array's bytes in network order, whatever the machine's (a digest the same everywhere)."""
    if sys.byteorder == "big":
        return values.tobytes()
    out = array(values.typecode, values)
    out.byteswap()
    return out.tobytes()


class AddressSetBuilder:
    """Collects addresses as they are read (4 or 16 bytes each), then sorts and deduplicates once."""

    __slots__ = ("_v4", "_v6", "added")

    def __init__(self) -> None:
        self._v4 = array(_V4_CODE)
        self._v6 = bytearray()
        self.added = 0  # addresses added, duplicates counted

    def add(self, version: int, value: int) -> None:
        self.added += 1
        if version == 4:
            self._v4.append(value)
        else:
            self._v6 += value.to_bytes(16, "big")

    def add_v4_array(self, values: array[int]) -> None:
        self.added += len(values)
        self._v4.extend(values)

    def add_v6_bytes(self, data: bytes) -> None:
        self.added += len(data) // 16
        self._v6 += data

    def build(self) -> AddressSet:
        # the sort needs one int (or bytes) object per address for a moment; the result does not
        v4 = array(_V4_CODE)
        last = -1
        for value in sorted(self._v4):
            if value != last:
                v4.append(value)
                last = value
        self._v4 = array(_V4_CODE)
        raw = self._v6
        chunks = [bytes(raw[i : i + 16]) for i in range(0, len(raw), 16)]
        self._v6 = raw = bytearray()
        chunks.sort()  # in place: no second list
        v6 = bytearray()
        previous = b""
        for chunk in chunks:
            if chunk != previous:
                v6 += chunk
                previous = chunk
        del chunks
        return AddressSet(v4, bytes(v6))
