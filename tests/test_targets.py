"""Tests for relayaudit.targets: exclusions, counts, permutation, shards, resume, laziness."""

from __future__ import annotations

import ipaddress
import itertools
import tracemalloc
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayaudit.errors import ConfigError
from relayaudit.targets import Address, Network, Shard, TargetSpace, _Feistel


def net(text: str) -> Network:
    return ipaddress.ip_network(text)


def addr(text: str) -> Address:
    return ipaddress.ip_address(text)


def expand(*nets: str) -> set[Address]:
    return {a for n in nets for a in net(n)}


def all_addresses(space: TargetSpace, shard: Shard | None = None) -> list[Address]:
    return [a for _, a in space.iter_shard(shard)]


# --- exclusions and counting -------------------------------------------------------------------


def test_single_address_exclusion() -> None:
    space = TargetSpace([net("192.0.2.0/24")], [net("192.0.2.7/32")])
    assert len(space) == 255
    assert addr("192.0.2.7") not in space
    assert addr("192.0.2.6") in space
    assert set(all_addresses(space)) == expand("192.0.2.0/24") - {addr("192.0.2.7")}


def test_subnet_exclusion() -> None:
    space = TargetSpace([net("198.51.100.0/24")], [net("198.51.100.64/26")])
    assert len(space) == 192
    assert addr("198.51.100.64") not in space
    assert addr("198.51.100.127") not in space
    assert addr("198.51.100.128") in space
    assert set(all_addresses(space)) == expand("198.51.100.0/24") - expand("198.51.100.64/26")


def test_exclusion_covering_everything_gives_empty_space() -> None:
    space = TargetSpace([net("203.0.113.0/25"), net("203.0.113.128/25")], [net("203.0.113.0/24")])
    assert len(space) == 0
    assert space.size == 0
    assert all_addresses(space) == []
    assert list(space.iter_shard(Shard(0, 3))) == []
    assert space.shard_size(Shard(0, 3)) == 0
    assert space.count_per_range() == [(net("203.0.113.0/25"), 0), (net("203.0.113.128/25"), 0)]


def test_no_targets_gives_empty_space() -> None:
    space = TargetSpace([])
    assert len(space) == 0
    assert all_addresses(space) == []


def test_single_address_space() -> None:
    space = TargetSpace([net("192.0.2.1/32")], seed=5)
    assert len(space) == 1
    assert list(space.iter_shard()) == [(0, addr("192.0.2.1"))]
    assert list(space.iter_shard(Shard(1, 2))) == []
    assert list(space.iter_shard(start=1)) == []


def test_exclusion_of_other_family_is_ignored() -> None:
    space = TargetSpace([net("192.0.2.0/28")], [net("2001:db8::/32")])
    assert len(space) == 16


def test_overlapping_targets_counted_once() -> None:
    targets = [net("192.0.2.0/24"), net("192.0.2.128/25"), net("192.0.2.0/24"), net("192.0.2.0/23")]
    space = TargetSpace(targets)
    assert len(space) == 512
    assert sorted(all_addresses(space)) == sorted(expand("192.0.2.0/23"))


def test_count_per_range_attributes_overlap_to_first_and_sums_to_len() -> None:
    targets = [
        net("198.51.100.128/25"),
        net("198.51.100.0/24"),
        net("198.51.100.0/24"),
        net("203.0.113.0/24"),
    ]
    space = TargetSpace(targets, [net("198.51.100.0/30"), net("203.0.113.255/32")])
    counts = space.count_per_range()
    assert counts == [
        (net("198.51.100.128/25"), 128),
        (net("198.51.100.0/24"), 124),
        (net("198.51.100.0/24"), 0),
        (net("203.0.113.0/24"), 255),
    ]
    assert sum(c for _, c in counts) == len(space) == 507


def test_contains_rejects_non_addresses_and_wrong_family() -> None:
    space = TargetSpace([net("192.0.2.0/24")])
    assert "192.0.2.1" not in space
    assert 3221225985 not in space
    assert addr("::ffff:192.0.2.1") not in space
    assert addr("192.0.1.255") not in space
    assert addr("192.0.3.0") not in space


# --- permutation -------------------------------------------------------------------------------


def test_permutation_is_exactly_the_set() -> None:
    space = TargetSpace([net("198.51.100.0/22")], seed=42)
    out = all_addresses(space)
    assert sorted(out) == sorted(expand("198.51.100.0/22"))
    assert out != sorted(out)
    assert [p for p, _ in space.iter_shard()] == list(range(1024))


def test_permutation_deterministic_per_seed_and_differs_across_seeds() -> None:
    targets = [net("198.51.100.0/22")]
    first = all_addresses(TargetSpace(targets, seed=1))
    assert first == all_addresses(TargetSpace(targets, seed=1))
    assert first != all_addresses(TargetSpace(targets, seed=2))
    assert first != all_addresses(TargetSpace(targets, seed=-1))


def test_permutation_spreads_across_subnets() -> None:
    space = TargetSpace([net("10.20.0.0/16")], seed=7)
    head = [a for _, a in itertools.islice(space.iter_shard(), 256)]
    assert len({int(a) >> 8 for a in head}) >= 100


@pytest.mark.parametrize("size", [1, 2, 3, 5, 17, 255, 257, 1000])
def test_permutation_of_awkward_sizes(size: int) -> None:
    # Sizes just off a power of two exercise cycle-walking and the unbalanced Feistel halves.
    first = ipaddress.IPv4Address("192.0.2.0")
    last = first + (size - 1)
    space = TargetSpace(list(ipaddress.summarize_address_range(first, last)), seed=size)
    out = all_addresses(space)
    assert len(out) == size
    assert set(out) == {first + i for i in range(size)}


@pytest.mark.parametrize("size", [2, 3, 255, 256, 1000, 65536, 2**20 + 3, 2**27 + 1])
def test_feistel_lookup_tables_give_the_computed_permutation(size: int) -> None:
    feistel = _Feistel(size, seed=size)
    assert feistel._tables is not None  # spaces up to 2**28 use the tables
    sample = range(0, size, max(1, size // 5000))
    assert [feistel._by_table(x) for x in sample] == [feistel._computed(x) for x in sample]


def test_the_walk_order_is_stable_across_versions() -> None:
    # resume positions in a state store written by an earlier version must name the same
    # addresses: these are the first addresses the permutation gave before the lookup tables
    first = {
        ("192.0.2.0/24", 7): ["192.0.2.113", "192.0.2.188", "192.0.2.111", "192.0.2.162"],
        ("2001:db8::/104", 3): [
            "2001:db8::65:cbb9",
            "2001:db8::b1:9832",
            "2001:db8::f5:95e6",
            "2001:db8::2c:4456",
        ],
    }
    for (network, seed), expected in first.items():
        space = TargetSpace([net(network)], seed=seed)
        assert [a for _, a in itertools.islice(space.iter_shard_text(), 4)] == expected
    # beyond the tables the rounds are computed per address: pinned the same way
    huge = _Feistel(2**40, seed=1)
    assert huge._tables is None
    assert [huge(x) for x in range(4)] == [296925415486, 1012932223678, 862071399858, 142063766082]
    odd = _Feistel(2**29 + 5, seed=2)  # odd bit count, cycle-walking
    assert odd._tables is None
    assert [odd(x) for x in range(4)] == [8399242, 257206009, 393194936, 294283833]


# --- shards and resume -------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_the_set(count: int) -> None:
    space = TargetSpace([net("192.0.2.0/24"), net("198.51.100.0/25")], [net("192.0.2.9/32")])
    everything = expand("192.0.2.0/24", "198.51.100.0/25") - {addr("192.0.2.9")}
    parts = [all_addresses(space, Shard(i, count)) for i in range(count)]
    for part in parts:
        assert len(part) == len(set(part))
    for a, b in itertools.combinations(parts, 2):
        assert not set(a) & set(b)
    assert set().union(*parts) == everything
    sizes = [space.shard_size(Shard(i, count)) for i in range(count)]
    assert sizes == [len(p) for p in parts]
    assert sum(sizes) == len(space) == space.shard_size(None)


def test_shard_positions_are_local_and_consecutive() -> None:
    space = TargetSpace([net("192.0.2.0/24")])
    positions = [p for p, _ in space.iter_shard(Shard(2, 3))]
    assert positions == list(range(space.shard_size(Shard(2, 3))))


def test_shards_interleave_the_global_order() -> None:
    space = TargetSpace([net("192.0.2.0/24")], seed=3)
    whole = all_addresses(space)
    for i in range(3):
        assert all_addresses(space, Shard(i, 3)) == whole[i::3]


@pytest.mark.parametrize("shard", [None, Shard(0, 1), Shard(1, 3), Shard(6, 7)])
@pytest.mark.parametrize("start", [0, 1, 17, 100])
def test_resume_yields_exactly_the_tail(shard: Shard | None, start: int) -> None:
    space = TargetSpace([net("198.51.100.0/24"), net("2001:db8::/121")], seed=11)
    full = list(space.iter_shard(shard))
    assert list(space.iter_shard(shard, start=start)) == full[start:]


def test_resume_past_the_end_yields_nothing() -> None:
    space = TargetSpace([net("192.0.2.0/24")])
    assert list(space.iter_shard(start=256)) == []
    assert list(space.iter_shard(Shard(0, 2), start=10_000)) == []


def test_negative_start_rejected() -> None:
    space = TargetSpace([net("192.0.2.0/24")])
    with pytest.raises(ValueError, match="start"):
        next(space.iter_shard(start=-1))


# --- laziness ----------------------------------------------------------------------------------


def test_slash_eight_is_not_materialised() -> None:
    taken = 100_000
    # Preallocated before tracing, so the peak measures the target space and not the test.
    seen = array("I", bytes(4 * taken))
    tracemalloc.start()
    try:
        # 10.0.0.0/8 is only parsed and enumerated here; nothing connects to it.
        space = TargetSpace([net("10.0.0.0/8")], seed=99)
        for position, a in space.iter_shard():
            if position == taken:
                break
            seen[position] = int(a)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(space) == 2**24
    assert peak < 5 * 1024 * 1024, f"peak traced memory {peak} bytes"
    assert all(value >> 24 == 10 for value in seen)
    assert len(set(seen)) == taken


# --- IPv6 and size limits ----------------------------------------------------------------------


def test_ipv6_slash_120() -> None:
    space = TargetSpace([net("2001:db8::/120")], [net("2001:db8::10/124")], seed=4)
    assert len(space) == 240
    out = all_addresses(space)
    assert set(out) == expand("2001:db8::/120") - expand("2001:db8::10/124")
    assert all(a.version == 6 for a in out)
    assert addr("2001:db8::ff") in space
    assert addr("2001:db8::1f") not in space


def test_mixed_families() -> None:
    space = TargetSpace([net("2001:db8:1::/124"), net("192.0.2.0/28")], seed=8)
    assert len(space) == 32
    out = all_addresses(space)
    assert set(out) == expand("2001:db8:1::/124", "192.0.2.0/28")
    assert addr("192.0.2.3") in space
    assert addr("2001:db8:1::3") in space
    assert addr("::3") not in space
    assert space.count_per_range() == [(net("2001:db8:1::/124"), 16), (net("192.0.2.0/28"), 16)]


def test_slash_64_refused() -> None:
    with pytest.raises(ConfigError) as info:
        TargetSpace([net("2001:db8::/64")])
    assert str(info.value) == (
        "targets: 18446744073709551616 addresses is more than relayaudit sweeps (2**32 at most); "
        "narrow the IPv6 ranges"
    )


def test_exactly_two_to_the_32_is_accepted_lazily() -> None:
    space = TargetSpace([net("2001:db8::/96")])
    assert space.size == len(space) == 2**32
    head = [a for _, a in itertools.islice(space.iter_shard(start=2**31), 10)]
    assert len(set(head)) == 10
    assert all(a in space for a in head)


def test_exclusions_can_bring_a_large_space_under_the_limit() -> None:
    # The limit applies to what is swept, not to what is written in the target list.
    space = TargetSpace([net("2001:db8::/95")], [net("2001:db8::/96")])
    assert len(space) == 2**32


# --- Shard.parse -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0/1", Shard(0, 1)), ("2/3", Shard(2, 3)), (" 6/7 ", Shard(6, 7)), ("0/100", Shard(0, 100))],
)
def test_shard_parse_good(text: str, expected: Shard) -> None:
    shard = Shard.parse(text)
    assert shard == expected
    assert str(shard) == f"{expected.index}/{expected.count}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3/3", "--shard: '3/3' index must be below the shard count 3"),
        ("7/2", "--shard: '7/2' index must be below the shard count 2"),
        ("0/0", "--shard: '0/0' shard count must be at least 1"),
        ("x", "--shard: 'x' is not of the form i/n"),
        ("", "--shard: '' is not of the form i/n"),
        ("1/", "--shard: '1/' is not of the form i/n"),
        ("-1/3", "--shard: '-1/3' is not of the form i/n"),
        ("1/2/3", "--shard: '1/2/3' is not of the form i/n"),
        # int() would accept other scripts' digits; a shard spec should be plain ASCII.
        ("\u0661/\u0662", "--shard: '\u0661/\u0662' is not of the form i/n"),
    ],
)
def test_shard_parse_bad(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Shard.parse(text)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_shard_parse_names_its_source() -> None:
    with pytest.raises(ConfigError) as info:
        Shard.parse("5/4", source="config: scan.shard")
    assert str(info.value) == "config: scan.shard: '5/4' index must be below the shard count 4"


def test_shard_constructor_validates() -> None:
    with pytest.raises(ConfigError):
        Shard(3, 3)
    with pytest.raises(ConfigError):
        Shard(0, 0)
    with pytest.raises(ConfigError):
        Shard(-1, 2)


# --- against a brute-force model ---------------------------------------------------------------

_BASE = int(addr("198.51.100.0"))


def _block(offset: int, prefix: int) -> Network:
    size = 2 ** (32 - prefix)
    return ipaddress.IPv4Network((_BASE + offset // size * size, prefix))


_blocks = st.builds(_block, st.integers(0, 1023), st.integers(23, 32))


@settings(max_examples=60, deadline=None)
@given(
    targets=st.lists(_blocks, max_size=5),
    exclude=st.lists(_blocks, max_size=4),
    seed=st.integers(),
    count=st.integers(1, 5),
)
def test_matches_brute_force_model(
    targets: list[Network], exclude: list[Network], seed: int, count: int
) -> None:
    model = {a for n in targets for a in n} - {a for n in exclude for a in n}
    space = TargetSpace(targets, exclude, seed=seed)
    assert len(space) == len(model)
    assert sum(c for _, c in space.count_per_range()) == len(model)
    parts = [all_addresses(space, Shard(i, count)) for i in range(count)]
    flat = [a for part in parts for a in part]
    assert len(flat) == len(set(flat)) == len(model)
    assert set(flat) == model
    assert all(a in space for a in model)


@pytest.mark.parametrize("shard", [None, Shard(1, 3)])
def test_text_walk_is_the_same_walk(shard: Shard | None) -> None:
    """The sweep walks addresses as text; same order, same positions, same spelling."""
    space = TargetSpace(
        [
            net("198.51.100.0/25"),
            net("2001:db8::ff00/120"),
            net("192.0.2.0/30"),
            net("203.0.113.0/30"),
        ],
        [net("198.51.100.7/32")],
        seed=9,
    )
    as_objects = [(p, str(a)) for p, a in space.iter_shard(shard, start=2)]
    assert list(space.iter_shard_text(shard, start=2)) == as_objects
    assert any(":" in a for _, a in as_objects) and "203.0.113.1" in {a for _, a in as_objects}
